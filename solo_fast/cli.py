"""The ``solo-fast`` command line."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _info(_: argparse.Namespace) -> int:
    import torch

    from solo_fast import __version__
    from solo_fast.ops import available_backends, cuda_compiled, has_ops
    from solo_fast.ops._extension import load_error

    print(f"solo_fast {__version__}, torch {torch.__version__}")
    loaded = "loaded" if has_ops() else f"NOT loaded: {load_error()}"
    print(f"compiled ops (solo_fast._C): {loaded}")
    print(f"CUDA kernels compiled in: {'yes' if cuda_compiled() else 'no'}")
    print(f"backends on cpu tensors: {', '.join(available_backends('cpu'))}")
    if torch.cuda.is_available():
        print(f"backends on cuda tensors: {', '.join(available_backends('cuda'))}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from solo_fast import bench

    return bench.main(size=args.size, ops=args.op, devices=args.device, repeats=args.repeats,
                      max_error=args.max_error)


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from solo_fast.config import parse_overrides
    from solo_fast.demo import DemoSettings, run_demo
    from solo_fast.engine.distributed import shutdown

    settings = DemoSettings(work_dir=Path(args.work_dir), preset=args.preset,
                            overrides=parse_overrides(args.set), num_train=args.num_train,
                            num_val=args.num_val, workers=args.workers, device=args.device,
                            amp=not args.no_amp)
    try:
        run_demo(settings)
    finally:
        shutdown(wait=False)
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


def _make_shapes(args: argparse.Namespace) -> int:
    from solo_fast.data import make_shapes

    style = {}
    if args.easy:
        from solo_fast.demo import DEMO_SHAPES

        style = DEMO_SHAPES
    paths = make_shapes(args.root, num_train=args.num_train, num_val=args.num_val,
                        seed=args.seed, overwrite=args.overwrite, **style)
    print(f"synthetic shapes: {args.num_train} training and {args.num_val} held-out images\n"
          f"  {paths.train_annotations}\n  {paths.val_annotations}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from solo_fast.config import parse_overrides
    from solo_fast.engine.distributed import shutdown
    from solo_fast.engine.train import RunSettings, train_on_coco

    settings = RunSettings(work_dir=args.work_dir, device=args.device, amp=args.amp,
                           epochs=args.epochs, max_iters=args.max_iters,
                           checkpoint_interval=args.checkpoint_interval,
                           log_interval=args.log_interval, resume=not args.no_resume)
    try:
        _, records = train_on_coco(preset=args.preset, overrides=parse_overrides(args.set),
                                   annotation_file=args.train_annotations,
                                   image_dir=args.train_images, settings=settings,
                                   batch_size=args.batch_size, num_workers=args.workers,
                                   seed=args.seed)
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()
    if records:
        last = records[-1]
        print(f"trained to iteration {last['iteration']} (epoch {last['epoch']}): loss "
              f"{last['loss']:.4f}; checkpoints and log.jsonl in {args.work_dir}")
    return 0


def _load_checkpoint(path: str, device: str | None):
    """A model from a ``solo-fast train`` checkpoint (run.json beside it) or a converted one."""
    from pathlib import Path

    import torch

    from solo_fast.builder import build_model
    from solo_fast.engine.checkpoint import load_checkpoint

    checkpoint_path = Path(path)
    checkpoint = load_checkpoint(checkpoint_path)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path!r} holds a {type(checkpoint).__name__}, not a solo_fast "
                         f"checkpoint (a dict)")
    run_file = checkpoint_path.parent / "run.json"
    if "model" in checkpoint and run_file.is_file():  # written by the trainer
        run = json.loads(run_file.read_text())
        # a run with ema_decay is evaluated with its weight average, as training returns it
        state_dict = checkpoint["ema"]["module"] if "ema" in checkpoint else checkpoint["model"]
    elif "state_dict" in checkpoint and "preset" in checkpoint:  # written by solo-fast convert
        run = {"preset": checkpoint["preset"], "overrides": checkpoint.get("overrides", {})}
        state_dict = checkpoint["state_dict"]
    else:
        raise ValueError(f"{path!r} is neither a solo-fast train checkpoint (with run.json "
                         f"beside it) nor a solo-fast convert output")
    model = build_model(run["preset"], **run["overrides"])
    model.load_state_dict(state_dict)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), run, device


def _eval(args: argparse.Namespace) -> int:
    from solo_fast.data import CocoInstances, build_eval_loader, build_eval_transform
    from solo_fast.engine.evaluate import CocoEvaluator, evaluate_model

    model, run, device = _load_checkpoint(args.checkpoint, args.device)
    test_scale = model_config(run).train.test_scale
    dataset = CocoInstances(annotation_file=args.annotations, image_dir=args.images, train=False,
                            transform=build_eval_transform(scale=test_scale))
    evaluator = CocoEvaluator(coco_gt=dataset.coco,
                              label_to_category_id=dataset.label_to_category_id,
                              output_file=args.output)
    loader = build_eval_loader(dataset, batch_size=args.batch_size, num_workers=args.workers)
    metrics = evaluate_model(model, loader, evaluator, device=device)
    if args.metrics:
        from solo_fast.engine.checkpoint import write_json_atomically

        write_json_atomically(metrics, args.metrics)
    return 0


def model_config(run: dict):
    from solo_fast.config import get_preset

    return get_preset(run["preset"], **run["overrides"])


def _predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from solo_fast.engine.checkpoint import write_json_atomically
    from solo_fast.engine.predict import predictions_to_coco_json
    from solo_fast.engine.visualize import save_overlay

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.onnx:
        names, category_ids, predictions = _onnx_predictions(args)
    else:
        names, category_ids, predictions = _torch_predictions(args)
    results = []
    for path, image, prediction in predictions:
        results.append((path, prediction))
        if args.overlays:
            save_overlay(Path(args.overlays) / f"{Path(path).stem}.png", image(), prediction,
                         names, score_thr=args.score_thr)
    records = predictions_to_coco_json(results, label_to_category_id=category_ids)
    write_json_atomically(records, args.output)
    print(f"{len(records)} instances in {len(results)} images -> {args.output}"
          + (f"; overlays in {args.overlays}" if args.overlays else ""))
    return 0


def _torch_predictions(args: argparse.Namespace):
    """Names, category ids and ``(path, image loader, prediction)`` of a checkpoint's model."""
    from solo_fast.data import load_image
    from solo_fast.engine.predict import predict_images

    model, run, device = _load_checkpoint(args.checkpoint, args.device)
    names = run.get("category_names") or [f"class {i}" for i in range(model.head.num_classes)]
    category_ids = run.get("label_to_category_id")
    predictions = predict_images(
        model, args.images, test_scale=model_config(run).train.test_scale, device=device,
        batch_size=args.batch_size, category_names=names, label_to_category_id=category_ids)
    return names, category_ids, ((path, lambda path=path: load_image(path), prediction)
                                 for path, prediction in predictions)


def _onnx_predictions(args: argparse.Namespace):
    """Names, category ids and ``(path, image loader, prediction)`` of an ONNX export."""
    from PIL import Image

    from solo_fast.deploy import OnnxPredictor, load_image
    from solo_fast.engine.predict import expand_image_paths

    # --device picks onnxruntime's providers; None leaves its default order
    providers = {None: None, "cpu": ["CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}.get(args.device)
    if args.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device with --onnx must be cpu or cuda, got {args.device!r}")
    predictor = OnnxPredictor(args.onnx, providers=providers)
    meta = predictor.metadata
    names = list(meta.class_names or [f"class {i}" for i in range(meta.num_classes)])
    files = expand_image_paths(args.images)

    def predictions():
        for start in range(0, len(files), args.batch_size):
            chunk = files[start:start + args.batch_size]
            images = [load_image(path) for path in chunk]
            for path, image, prediction in zip(chunk, images, predictor(images)):
                yield path, lambda image=image: Image.fromarray(image), prediction

    return names, None, predictions()


def _export(args: argparse.Namespace) -> int:
    from solo_fast.builder import build_model
    from solo_fast.config import get_preset, parse_overrides
    from solo_fast.export import export_onnx

    overrides = parse_overrides(args.set)
    class_names = None
    if args.checkpoint:
        trained, run, _ = _load_checkpoint(args.checkpoint, "cpu")
        if args.preset and args.preset != run["preset"]:
            raise ValueError(f"--preset {args.preset!r} disagrees with the checkpoint's preset "
                             f"{run['preset']!r}: leave --preset out")
        # --set on top of the checkpoint's overrides (test settings: max_per_img, score_thr...)
        cfg = get_preset(run["preset"], **{**run["overrides"], **overrides})
        model = build_model(cfg)
        model.load_state_dict(trained.state_dict())
        class_names = run.get("category_names")
    elif args.preset:
        cfg = get_preset(args.preset, **overrides)
        model = build_model(cfg)
        print(f"solo-fast export: no --checkpoint, so {args.preset} is exported with random "
              f"weights", file=sys.stderr)
    else:
        raise ValueError("give --preset, --checkpoint or both")
    export_onnx(model.eval(), args.output, cfg=cfg, graph=args.graph, shapes=args.shapes,
                class_names=class_names, max_candidates=args.max_candidates)
    print(f"{cfg.name} ({args.graph}, {args.shapes} shapes) -> {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solo-fast",
        description="SOLO / SOLOv2 instance segmentation with fused CPU, CUDA and Triton kernels.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser("info", help="show the build: compiled ops, CUDA, backends")
    info.set_defaults(run=_info)

    demo = commands.add_parser(
        "demo", help="make the synthetic data set, train on it, evaluate, draw overlays",
        description="The whole loop with no download: writes the synthetic textured-shapes data "
                    "set, trains a Light SOLOv2 (or --preset) on it, reports COCO mask AP on the "
                    "held-out split and draws overlays. About 14 minutes on 2 CPU cores; an "
                    "interrupted demo resumes where it stopped.")
    demo.add_argument("--work-dir", default="solo_fast_demo",
                      help="where the data, checkpoints, metrics and overlays go (solo_fast_demo)")
    demo.add_argument("--preset", default="solov2-light_r18_fpn_ms-3x_coco",
                      help="any buildable preset, e.g. decoupled-solo-light_r50_fpn_3x_coco")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override the demo's settings, e.g. --set epochs=12 (repeatable)")
    demo.add_argument("--num-train", type=int, default=200, help="training images (200)")
    demo.add_argument("--num-val", type=int, default=50, help="held-out images (50)")
    demo.add_argument("--workers", type=int, default=1, help="data-loading processes (1)")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo.add_argument("--no-amp", action="store_true",
                      help="train in float32 (default: bf16 mixed precision on CPU, fp16 on CUDA)")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser(
        "bench", help="every backend of every fused op against its reference: errors and speed",
        description="Runs the benchmark cases of every fused op (those of benchmarks/, which "
                    "times them with pytest-benchmark) on every backend and device present: "
                    "each output's error against the PyTorch reference, the median time, the "
                    "speed-up and the peak memory of one call.")
    bench.add_argument("--size", choices=["quick", "canonical", "all"], default="quick",
                       help="quick: small odd sizes, seconds (default); canonical: COCO's "
                            "800 x 1088 sizes, the figures of record; all: every size benchmarked")
    bench.add_argument("--op", action="append", default=None, metavar="OP",
                       help="only this op, e.g. --op matrix_nms (repeatable; default all seven)")
    bench.add_argument("--device", action="append", choices=["cpu", "cuda"], default=None,
                       help="only this device (repeatable; default every device present)")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per backend (5)")
    bench.add_argument("--max-error", type=float, default=None, metavar="TOL",
                       help="exit 1 when an output's error against the reference exceeds TOL")
    bench.set_defaults(run=_bench)

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

    shapes = commands.add_parser(
        "make-shapes", help="write the synthetic textured-shapes COCO data set (no download)")
    shapes.add_argument("root", help="output folder")
    shapes.add_argument("--num-train", type=int, default=200, help="training images (200)")
    shapes.add_argument("--num-val", type=int, default=50, help="held-out images (50)")
    shapes.add_argument("--seed", type=int, default=0, help="random seed (0)")
    shapes.add_argument("--overwrite", action="store_true", help="regenerate existing files")
    shapes.add_argument("--easy", action="store_true",
                        help="the demo's easier set: one colour per object, by class, at most 4 "
                             "objects per image (default: textured objects, told by shape only)")
    shapes.set_defaults(run=_make_shapes)

    train = commands.add_parser(
        "train", help="train a preset on a COCO-format data set (CPU or GPU; torchrun for DDP)",
        description="Train a preset on a COCO-format data set. Runs resume from WORK_DIR/"
                    "latest.pt. For several processes: torchrun --nproc_per_node=N -m "
                    "solo_fast.cli train ...")
    train.add_argument("--preset", required=True,
                       help="mmdetection config name, e.g. solov2-light_r18_fpn_ms-3x_coco")
    train.add_argument("--train-annotations", required=True, help="COCO instances JSON")
    train.add_argument("--train-images", required=True, help="folder of the training images")
    train.add_argument("--work-dir", required=True, help="checkpoints and logs go here")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="config override, e.g. --set lr=0.005 (repeatable)")
    train.add_argument("--epochs", type=int, default=None, help="default: the preset's")
    train.add_argument("--max-iters", type=int, default=None, help="stop after this many steps")
    train.add_argument("--batch-size", type=int, default=2, help="images per process (2)")
    train.add_argument("--workers", type=int, default=2, help="data-loading processes (2)")
    train.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    train.add_argument("--amp", action="store_true",
                       help="mixed precision (fp16 on CUDA, bf16 on CPU)")
    train.add_argument("--seed", type=int, default=0, help="shuffling/augmentation seed (0)")
    train.add_argument("--checkpoint-interval", type=int, default=100,
                       help="iterations between checkpoints (100; also every epoch's end)")
    train.add_argument("--log-interval", type=int, default=10, help="iterations between lines")
    train.add_argument("--no-resume", action="store_true", help="ignore WORK_DIR/latest.pt")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser(
        "eval", help="COCO mask and box AP of a checkpoint on a COCO-format data set")
    evaluate.add_argument("--checkpoint", required=True,
                          help="WORK_DIR/latest.pt of solo-fast train, or a convert output")
    evaluate.add_argument("--annotations", required=True, help="COCO instances JSON")
    evaluate.add_argument("--images", required=True, help="folder of the images")
    evaluate.add_argument("--output", default=None, help="write the COCO results JSON here")
    evaluate.add_argument("--metrics", default=None, help="write the metrics JSON here")
    evaluate.add_argument("--batch-size", type=int, default=1, help="images per batch (1)")
    evaluate.add_argument("--workers", type=int, default=2, help="data-loading processes (2)")
    evaluate.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    evaluate.set_defaults(run=_eval)

    predict = commands.add_parser(
        "predict", help="instances of images or folders as COCO-style JSON, optional overlays")
    predict.add_argument("images", nargs="+", help="image files or folders")
    model = predict.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint",
                       help="WORK_DIR/latest.pt of solo-fast train, or a convert output")
    model.add_argument("--onnx", help="an end2end ONNX export, run with onnxruntime")
    predict.add_argument("--output", required=True, help="COCO-style results JSON to write")
    predict.add_argument("--overlays", default=None, help="folder for PNG overlays")
    predict.add_argument("--score-thr", type=float, default=0.3,
                         help="overlays show instances above this score (0.3)")
    predict.add_argument("--batch-size", type=int, default=2, help="images per batch (2)")
    predict.add_argument("--device", default=None,
                         help="cpu or cuda (default: cuda if present; with --onnx, "
                              "onnxruntime's default providers)")
    predict.set_defaults(run=_predict)

    export = commands.add_parser(
        "export", help="an ONNX file of a model with its post-processing (ONNX Runtime-checked)",
        description="Export a model to ONNX (needs the export extra: onnx, onnxscript, "
                    "onnxruntime). The file is run on ONNX Runtime against torch before this "
                    "returns; its metadata_props['solo_fast'] holds the preprocessing and "
                    "thresholds as JSON.")
    export.add_argument("--preset", default=None,
                        help="mmdetection config name (default: the checkpoint's)")
    export.add_argument("--checkpoint", default=None,
                        help="WORK_DIR/latest.pt of solo-fast train, or a convert output")
    export.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set max_per_img=50 (repeatable)")
    export.add_argument("--output", required=True, help="the .onnx file to write")
    export.add_argument("--graph", default="end2end", choices=("end2end", "raw", "postprocess"),
                        help="end2end: images -> detections (default); raw: images -> head "
                             "outputs; postprocess: head outputs -> detections")
    export.add_argument("--shapes", default="dynamic", choices=("dynamic", "static"),
                        help="dynamic: every candidate, for ONNX Runtime (default); static: "
                             "a fixed candidate cap and standard ops only, for TensorRT")
    export.add_argument("--max-candidates", type=int, default=None,
                        help="candidate cap per image of a static graph (default: nms_pre)")
    export.set_defaults(run=_export)
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
