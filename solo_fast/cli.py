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


def _convert(args: argparse.Namespace) -> int:
    from solo_fast.config import parse_overrides
    from solo_fast.convert import convert_mmdet_checkpoint

    overrides = parse_overrides(args.set)
    written = convert_mmdet_checkpoint(args.source, args.destination, args.preset,
                                       trusted=args.trusted, **overrides)
    print(f"wrote {args.destination}: {len(written['state_dict'])} tensors for preset "
          f"{args.preset}" + (f" with {overrides}" if overrides else ""))
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

    convert = commands.add_parser(
        "convert", help="convert an mmdetection SOLO/SOLOv2 checkpoint to solo_fast",
        description="Rename the weights of an mmdetection SOLO-family checkpoint for solo_fast, "
                    "check them against the preset's model and write them atomically.")
    convert.add_argument("source", help="mmdetection checkpoint (.pth)")
    convert.add_argument("destination", help="solo_fast checkpoint to write (.pt)")
    convert.add_argument("--preset", required=True,
                         help="mmdetection config name, e.g. solov2_r50_fpn_1x_coco")
    convert.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="config override, e.g. --set num_classes=3 (repeatable)")
    convert.add_argument("--trusted", action="store_true",
                         help="allow arbitrary pickled objects in the source (trusted files only)")
    convert.set_defaults(run=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError) as error:
        print(f"solo-fast {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
