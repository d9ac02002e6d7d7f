"""The ``solo-fast`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _info(_: argparse.Namespace) -> int:
    import torch

    from solo_fast import __version__
    from solo_fast.ops import available_backends, cuda_compiled, has_ops
    from solo_fast.ops._extension import load_error

    print(f"solo_fast {__version__}, torch {torch.__version__}")
    print(f"compiled ops (solo_fast._C): {'loaded' if has_ops() else f'NOT loaded: {load_error()}'}")
    print(f"CUDA kernels compiled in: {'yes' if cuda_compiled() else 'no'}")
    print(f"backends on cpu tensors: {', '.join(available_backends('cpu'))}")
    if torch.cuda.is_available():
        print(f"backends on cuda tensors: {', '.join(available_backends('cuda'))}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from solo_fast import showcase

    showcase.main(repeats=args.repeats)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solo-fast",
        description="SOLO / SOLOv2 instance segmentation with fused CPU, CUDA and Triton kernels.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser("info", help="show the build: compiled ops, CUDA, backends")
    info.set_defaults(run=_info)

    demo = commands.add_parser(
        "demo", help="run every available backend of the fused ops against the reference, timed")
    demo.add_argument("--repeats", type=int, default=5, help="timed runs per backend (default 5)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
