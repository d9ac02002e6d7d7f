"""Ahead-of-time compile of every Triton kernel for the GPU architectures solo_fast ships for.

No GPU is needed: ``triton.compile`` lowers each kernel to PTX and cubin for a given target, and the
bundled ``ptxas -v`` reports registers and spills (Triton itself reads those from the CUDA driver,
which a build machine does not have). A kernel that spills, or that does not compile for an
architecture, shows up here rather than on the first GPU run.

Every op module ``kernels/<op>.py`` has an entry in ``COMPILE_TABLE``: the kernels to compile, each
with the argument signatures (dtypes), constexprs and alignment of the variants worth checking. A
new op adds its rows; ``compile_report`` refuses op modules that have none, and kernels missing
from the table.

Run ``python -m solo_fast.kernels._compile`` (installed) or ``python kernels/_compile.py`` (source
tree) for a markdown table. ``TRITON_INTERPRET`` must not be set in the process that imports the
kernels (interpreted kernels cannot be compiled); the command-line entry point unsets it itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

__all__ = ["COMPILE_TABLE", "CompileEntry", "compile_report", "format_table", "op_modules"]

DEFAULT_ARCHES = (80, 90)
_DIVISIBLE_BY_16 = [["tt.divisibility", 16]]


@dataclasses.dataclass(frozen=True)
class CompileEntry:
    """One kernel in one specialisation.

    Attributes:
        kernel: the ``@triton.jit`` function's name in its op module.
        variant: a short label for the report, e.g. ``"fp32/u8 logits"``.
        signature: Triton type of every non-constexpr argument (``"*fp32"``, ``"*u8"``, ``"i32"``).
        constexprs: value of every constexpr argument.
        aligned: arguments that Triton's launcher would specialise as divisible by 16 (pointers
            from PyTorch allocations, sizes that are multiples of 16); these decide vectorisation
            and so register use.
        num_warps: as the host launcher passes it.
        options: other compile options the host launcher passes (e.g. ``enable_reflect_ftz``).
    """

    kernel: str
    variant: str
    signature: dict[str, str]
    constexprs: dict[str, object]
    aligned: tuple[str, ...] = ()
    num_warps: int = 4
    options: dict[str, object] = dataclasses.field(default_factory=dict)


def _dice_loss_entries(module: ModuleType) -> list[CompileEntry]:
    import torch

    dtypes = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    entries = []
    # (pred, target, pixel counts multiples of 16): SOLO's masks (stride-4 feature maps of
    # 32-aligned images) are; one variant checks the scalar-load code of other sizes.
    variants = (("fp32", "u8", True), ("fp32", "fp32", True), ("fp16", "u8", True),
                ("fp64", "fp64", True), ("fp32", "u8", False))
    for pred, target, aligned_sizes in variants:
        acc = "fp64" if pred == "fp64" else "fp32"
        variant = f"{pred}/{target} logits" + ("" if aligned_sizes else ", P % 16 != 0")
        sizes = ("num_pixels", "pixels_per_chunk") if aligned_sizes else ("pixels_per_chunk",)
        block, num_warps = module.launch_config(dtypes[pred], backward=False)
        entries.append(CompileEntry(
            kernel="_dice_loss_fwd_kernel", variant=variant,
            signature={"pred_ptr": f"*{pred}", "target_ptr": f"*{target}",
                       "partial_ptr": f"*{acc}", "num_pixels": "i32", "num_chunks": "i32",
                       "pixels_per_chunk": "i32"},
            constexprs={"LOGITS": True, "BLOCK": block},
            aligned=("pred_ptr", "target_ptr", "partial_ptr") + sizes, num_warps=num_warps))
        block, num_warps = module.launch_config(dtypes[pred], backward=True)
        entries.append(CompileEntry(
            kernel="_dice_loss_bwd_kernel", variant=variant,
            signature={"pred_ptr": f"*{pred}", "target_ptr": f"*{target}", "coef_ptr": f"*{acc}",
                       "grad_ptr": f"*{pred}", "num_pixels": "i32", "pixels_per_chunk": "i32"},
            constexprs={"LOGITS": True, "BLOCK": block},
            aligned=("pred_ptr", "target_ptr", "coef_ptr", "grad_ptr") + sizes,
            num_warps=num_warps))
    return entries


def _decoupled_dice_loss_entries(module: ModuleType) -> list[CompileEntry]:
    import torch

    dtypes = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    entries = []
    # (logits, target, pixel counts multiples of 16): as the dice loss; the index and group
    # arrays are int64 PyTorch allocations, so always 16-byte aligned.
    variants = (("fp32", "u8", True), ("fp32", "fp32", True), ("fp16", "u8", True),
                ("fp64", "fp64", True), ("fp32", "u8", False))
    for logits, target, aligned_sizes in variants:
        acc = "fp64" if logits == "fp64" else "fp32"
        variant = f"{logits}/{target}" + ("" if aligned_sizes else ", P % 16 != 0")
        sizes = ("num_pixels", "pixels_per_chunk") if aligned_sizes else ("pixels_per_chunk",)
        block, num_warps = module.launch_config(dtypes[logits], backward=False)
        entries.append(CompileEntry(
            kernel="_decoupled_dice_loss_fwd_kernel", variant=variant,
            signature={"x_ptr": f"*{logits}", "y_ptr": f"*{logits}", "pos_image_ptr": "*i64",
                       "pos_row_ptr": "*i64", "pos_col_ptr": "*i64", "target_ptr": f"*{target}",
                       "partial_ptr": f"*{acc}", "num_grids": "i32", "num_pixels": "i32",
                       "num_chunks": "i32", "pixels_per_chunk": "i32"},
            constexprs={"BLOCK": block},
            aligned=("x_ptr", "y_ptr", "pos_image_ptr", "pos_row_ptr", "pos_col_ptr",
                     "target_ptr", "partial_ptr") + sizes,
            num_warps=num_warps))
        block, num_warps = module.launch_config(dtypes[logits], backward=True)
        entries.append(CompileEntry(
            kernel="_decoupled_dice_loss_bwd_kernel", variant=variant,
            signature={"own_ptr": f"*{logits}", "partner_ptr": f"*{logits}",
                       "partner_channel_ptr": "*i64", "group_start_ptr": "*i64",
                       "member_ptr": "*i64", "target_ptr": f"*{target}", "coef_ptr": f"*{acc}",
                       "grad_ptr": f"*{logits}", "num_grids": "i32", "num_pixels": "i32",
                       "pixels_per_chunk": "i32"},
            constexprs={"BLOCK": block},
            aligned=("own_ptr", "partner_ptr", "partner_channel_ptr", "group_start_ptr",
                     "member_ptr", "target_ptr", "coef_ptr", "grad_ptr") + sizes,
            num_warps=num_warps))
    return entries


def _matrix_nms_entries(module: ModuleType) -> list[CompileEntry]:
    entries = [
        # A mask map of 200 x 272 pixels is 850 words: the word counts are not multiples of 16.
        CompileEntry(
            kernel="_matrix_nms_pack_kernel", variant="u8 masks",
            signature={"mask_ptr": "*u8", "packed_ptr": "*i64", "num_pixels": "i32",
                       "num_words": "i32", "total_words": "i32"},
            constexprs={"BLOCK_WORDS": module.PACK_WORDS},
            aligned=("mask_ptr", "packed_ptr", "num_pixels")),
        CompileEntry(
            kernel="_matrix_nms_word_range_kernel", variant="int64 words",
            signature={"packed_ptr": "*i64", "order_ptr": "*i64", "first_ptr": "*i32",
                       "end_ptr": "*i32", "num": "i32", "num_words": "i32"},
            constexprs={"BLOCK_ROWS": module.RANGE_ROWS, "BLOCK_WORDS": module.RANGE_WORDS},
            aligned=("packed_ptr", "order_ptr", "first_ptr", "end_ptr")),
    ]
    # The decay runs in the areas' dtype; the kernel (gaussian 0, linear 1) is a constexpr.
    for dtype in ("fp32", "fp64"):
        entries.append(CompileEntry(
            kernel="_matrix_nms_iou_kernel", variant=f"{dtype} areas",
            signature={"packed_ptr": "*i64", "order_ptr": "*i64", "group_start_ptr": "*i32",
                       "first_ptr": "*i32", "end_ptr": "*i32", "area_ptr": f"*{dtype}",
                       "iou_ptr": f"*{dtype}", "tile_ptr": "*i64", "num_tiles": "i32",
                       "num": "i32", "num_words": "i32"},
            constexprs={"TILE": module.TILE, "BLOCK_WORDS": module.TILE_WORDS,
                        "USE_LIBDEVICE": True},
            aligned=("packed_ptr", "order_ptr", "group_start_ptr", "first_ptr", "end_ptr",
                     "area_ptr", "iou_ptr", "tile_ptr"),
            num_warps=module.TILE_WARPS))
        for kernel, name in ((module.GAUSSIAN, "gaussian"), (module.LINEAR, "linear")):
            entries.append(CompileEntry(
                kernel="_matrix_nms_compensation_kernel", variant=f"{dtype} {name}",
                signature={"iou_ptr": f"*{dtype}", "group_start_ptr": "*i32",
                           "neg_sigma_ptr": f"*{dtype}", "f_comp_ptr": f"*{dtype}",
                           "num": "i32"},
                constexprs={"KERNEL": kernel, "BLOCK_I": module.ROWS, "BLOCK_J": module.COLUMNS,
                            "USE_LIBDEVICE": True},
                aligned=("iou_ptr", "group_start_ptr", "neg_sigma_ptr", "f_comp_ptr"),
                options=module.EXP_OPTIONS))
            entries.append(CompileEntry(
                kernel="_matrix_nms_decay_kernel", variant=f"{dtype} {name}",
                signature={"iou_ptr": f"*{dtype}", "group_start_ptr": "*i32",
                           "f_comp_ptr": f"*{dtype}", "order_ptr": "*i64",
                           "neg_sigma_ptr": f"*{dtype}", "decay_ptr": f"*{dtype}", "num": "i32"},
                constexprs={"KERNEL": kernel, "BLOCK_I": module.ROWS, "BLOCK_J": module.COLUMNS,
                            "USE_LIBDEVICE": True},
                aligned=("iou_ptr", "group_start_ptr", "f_comp_ptr", "order_ptr",
                         "neg_sigma_ptr", "decay_ptr"),
                options=module.EXP_OPTIONS))
    return entries


def _dynamic_mask_dice_loss_entries(module: ModuleType) -> list[CompileEntry]:
    import torch

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
              "fp64": torch.float64}
    entries = []
    # (inputs, target, E, pixel counts multiples of 16): SOLOv2's E = 256 (128 for the light
    # models); one variant checks the scalar-load code of other sizes.
    # 16-bit inputs run only the forward: their backward upcasts to float32 (see launch_config).
    variants = (("fp32", "u8", 256, True), ("fp32", "fp32", 256, True), ("fp16", "u8", 256, True),
                ("bf16", "u8", 256, True), ("fp64", "fp64", 256, True), ("fp32", "u8", 128, True),
                ("fp32", "u8", 256, False))
    indices = {"member_ptr": "*i64", "block_first_ptr": "*i64", "block_count_ptr": "*i64",
               "block_image_ptr": "*i64"}
    for data, target, channels, aligned_sizes in variants:
        acc = "fp64" if data == "fp64" else "fp32"
        variant = f"{data}/{target}, E={channels}" + ("" if aligned_sizes else ", P % 16 != 0")
        sizes = ("num_channels",) + (("num_pixels", "pixels_per_chunk") if aligned_sizes
                                     else ("pixels_per_chunk",))
        inputs = {"kernels_ptr": f"*{data}", "feats_ptr": f"*{data}"}
        config = module.launch_config(dtypes[data], channels, kernel="forward")
        num_warps = config.pop("num_warps")
        signature = {**inputs, **indices, "target_ptr": f"*{target}", "partial_ptr": f"*{acc}",
                     "num_channels": "i32", "num_pixels": "i32", "num_chunks": "i32",
                     "pixels_per_chunk": "i32"}
        entries.append(CompileEntry(
            kernel="_dmd_fwd_kernel", variant=variant, signature=signature, constexprs=config,
            aligned=tuple(n for n in signature if n.endswith("_ptr")) + sizes,
            num_warps=num_warps))
        if data in ("fp16", "bf16"):
            continue
        config = module.launch_config(dtypes[data], channels, kernel="feats")
        num_warps = config.pop("num_warps")
        signature = {**inputs, "member_ptr": "*i64", "group_start_ptr": "*i64",
                     "target_ptr": f"*{target}", "coef_ptr": f"*{acc}",
                     "grad_feats_ptr": f"*{data}", "num_channels": "i32", "num_pixels": "i32",
                     "num_tiles": "i32"}
        entries.append(CompileEntry(
            kernel="_dmd_bwd_feats_kernel", variant=variant, signature=signature,
            constexprs=config, aligned=tuple(n for n in signature if n.endswith("_ptr"))
            + sizes[:-1], num_warps=num_warps))
        config = module.launch_config(dtypes[data], channels, kernel="kernels")
        num_warps = config.pop("num_warps")
        signature = {**inputs, **indices, "target_ptr": f"*{target}", "coef_ptr": f"*{acc}",
                     "partial_ptr": f"*{acc}", "num_channels": "i32", "num_pixels": "i32",
                     "num_chunks": "i32", "pixels_per_chunk": "i32"}
        entries.append(CompileEntry(
            kernel="_dmd_bwd_kernels_kernel", variant=variant, signature=signature,
            constexprs=config, aligned=tuple(n for n in signature if n.endswith("_ptr")) + sizes,
            num_warps=num_warps))
    return entries


def _dynamic_mask_scores_entries(module: ModuleType) -> list[CompileEntry]:
    import torch

    dtypes = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    entries = []
    # (features, pixel and channel counts multiples of 16): SOLOv2's E = 256 and stride-4 maps of
    # 32-aligned images are; one variant checks the masked loads of other sizes. Each with and
    # without the bit-packed masks (Wd = ceil(P / 64) is rarely a multiple of 16: never aligned).
    variants = (("fp32", True), ("fp64", True), ("fp16", True), ("fp32", False))
    for (feats, aligned_sizes), pack_masks in itertools.product(variants, (False, True)):
        config = module.launch_config(dtypes[feats])
        sizes = ("num_channels", "num_pixels") if aligned_sizes else ()
        entries.append(CompileEntry(
            kernel="_dynamic_mask_scores_kernel",
            variant=f"{feats}" + ("" if aligned_sizes else ", E, P % 16 != 0")
            + (", packed masks" if pack_masks else ""),
            signature={"kernels_ptr": f"*{feats}", "feats_ptr": f"*{feats}",
                       "tile_image_ptr": "*i64", "row_begin_ptr": "*i64", "row_end_ptr": "*i64",
                       "threshold_ptr": f"*{feats}", "area_ptr": "*i32", "soft_ptr": "*fp64",
                       "order_ptr": "*i64", "packed_ptr": "*i64", "num_channels": "i32",
                       "num_pixels": "i32", "num_tiles": "i32", "num_pixel_tiles": "i32",
                       "num_words": "i32"},
            constexprs={"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"],
                        "BLOCK_K": config["BLOCK_K"],
                        "INPUT_PRECISION": module._input_precision(dtypes[feats]),
                        "PACK_MASKS": pack_masks},
            aligned=("kernels_ptr", "feats_ptr", "tile_image_ptr", "row_begin_ptr",
                     "row_end_ptr", "area_ptr", "soft_ptr", "order_ptr", "packed_ptr") + sizes,
            num_warps=config["num_warps"]))
    return entries


def _decoupled_mask_scores_entries(module: ModuleType) -> list[CompileEntry]:
    import torch

    dtypes = {"fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    entries = []
    # (probabilities, pixel counts multiples of 16): as the dice loss.
    for probs, aligned_sizes in (("fp32", True), ("fp64", True), ("fp16", True), ("fp32", False)):
        block, num_warps = module.launch_config(dtypes[probs])
        sizes = ("num_pixels", "pixels_per_chunk") if aligned_sizes else ("pixels_per_chunk",)
        entries.append(CompileEntry(
            kernel="_decoupled_mask_scores_kernel",
            variant=f"{probs}" + ("" if aligned_sizes else ", P % 16 != 0"),
            signature={"x_ptr": f"*{probs}", "y_ptr": f"*{probs}", "image_ptr": "*i64",
                       "row_ptr": "*i64", "col_ptr": "*i64", "threshold_ptr": f"*{probs}",
                       "area_ptr": "*i32", "soft_ptr": "*fp64", "num_channels": "i32",
                       "num_pixels": "i32", "num_chunks": "i32", "pixels_per_chunk": "i32"},
            constexprs={"BLOCK": block},
            aligned=("x_ptr", "y_ptr", "image_ptr", "row_ptr", "col_ptr", "threshold_ptr",
                     "area_ptr", "soft_ptr") + sizes,
            num_warps=num_warps))
    return entries


def _solo_mask_scores_entries(module: ModuleType) -> list[CompileEntry]:
    import torch

    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32,
              "fp64": torch.float64}
    # SOLO's levels at an 800 x 1088 input, all resized to the 200 x 272 level-0 map: levels 0-1
    # (identity), 2 (x2) and 3-4 (x4); the tile and band sizes are the launcher's for each.
    levels = {"x1": (200, 272), "x2": (100, 136), "x4": (50, 68)}
    variants = (("fp32", "x1", True), ("fp32", "x2", True), ("fp32", "x4", True),
                ("fp32", "x4", False), ("fp64", "x1", True), ("fp64", "x4", True),
                ("fp16", "x4", True), ("bf16", "x4", True))
    entries = []
    for preds, level, logits in variants:
        config = module.launch_config(dtypes[preds], levels[level], (200, 272))
        num_warps = config.pop("num_warps")
        entries.append(CompileEntry(
            kernel="_solo_mask_scores_kernel",
            variant=f"{preds} {level}" + (" logits" if logits else " probabilities"),
            signature={"preds_ptr": f"*{preds}", "image_ptr": "*i64", "channel_ptr": "*i64",
                       "threshold_ptr": f"*{preds}", "area_ptr": "*i32", "soft_ptr": "*fp64",
                       "num_channels": "i32", "in_h": "i32", "in_w": "i32", "out_h": "i32",
                       "out_w": "i32", "tiles_x": "i32", "num_tiles": "i32"},
            constexprs={"LOGITS": logits, **config, "EMULATE_FMA": False},
            aligned=("preds_ptr", "image_ptr", "channel_ptr", "threshold_ptr", "area_ptr",
                     "soft_ptr"),
            num_warps=num_warps))
    return entries


# Op module name -> a function of the imported module that lists its compile entries (reading the
# launcher's own tile sizes, so that the report compiles what runs).
COMPILE_TABLE = {
    "dice_loss": _dice_loss_entries,
    "decoupled_dice_loss": _decoupled_dice_loss_entries,
    "matrix_nms": _matrix_nms_entries,
    "dynamic_mask_dice_loss": _dynamic_mask_dice_loss_entries,
    "dynamic_mask_scores": _dynamic_mask_scores_entries,
    "decoupled_mask_scores": _decoupled_mask_scores_entries,
    "solo_mask_scores": _solo_mask_scores_entries,
}


def _package() -> str:
    if __package__:
        return __package__  # "solo_fast.kernels" installed, "kernels" in the source tree
    # Run as a script (python kernels/_compile.py): make the source tree's package importable.
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    return "kernels"


def op_modules() -> list[str]:
    """Names of the op modules of this package: every ``kernels/*.py`` not starting with ``_``."""
    folder = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(folder)])
                  if not m.name.startswith("_") and not m.ispkg)


def _jit_kernels(module: ModuleType) -> set[str]:
    import triton

    return {name for name, value in vars(module).items()
            if name.endswith("_kernel") and isinstance(value, triton.runtime.jit.JITFunction)}


def _ptxas_usage(ptx: str, arch: int) -> dict[str, int]:
    """Registers and local memory of the kernel in ``ptx``, from ptxas run as Triton runs it."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        # Triton's own flags (make_cubin), so that the counts are those of the cubin it loads.
        command = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                   f"--gpu-name={sm_arch_from_capability(arch)}", str(source),
                   "-o", str(Path(folder) / "kernel.cubin")]
        log = subprocess.run(command, check=True, capture_output=True, text=True).stderr
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      log)
    if registers is None or frame is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return {"n_regs": int(registers.group(1)), "stack_bytes": stack, "spill_store_bytes": stores,
            "spill_load_bytes": loads}


def compile_report(arches=DEFAULT_ARCHES) -> list[dict]:
    """Compiles every kernel of every op module for each architecture.

    Args:
        arches: CUDA compute capabilities as integers (80: A100, 90: H100).

    Returns:
        One row per (op, kernel, variant, arch): ``{op, kernel, arch, variant, n_regs, n_spills,
        spill_store_bytes, spill_load_bytes, shared_bytes}``. ``n_spills`` is Triton's own measure
        (local memory bytes / 4), ``shared_bytes`` the shared memory Triton allocates per program.

    Raises:
        RuntimeError: ``TRITON_INTERPRET=1`` was set when the kernels were imported.
        LookupError: an op module has no ``COMPILE_TABLE`` entry, or a kernel of it none.
        triton.CompilationError, subprocess.CalledProcessError: a kernel does not compile.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    package = _package()
    missing = [op for op in op_modules() if op not in COMPILE_TABLE]
    if missing:
        raise LookupError(f"op modules without entries in {__name__}.COMPILE_TABLE: {missing}")
    rows = []
    for op, make_entries in COMPILE_TABLE.items():
        module = importlib.import_module(f"{package}.{op}")
        entries = make_entries(module)
        for entry in entries:
            kernel = getattr(module, entry.kernel)
            if not isinstance(kernel, triton.runtime.jit.JITFunction):
                raise RuntimeError(
                    f"{op}.{entry.kernel} is a {type(kernel).__name__}, not a JITFunction: the "
                    f"module was imported with TRITON_INTERPRET=1; compile in a process without it")
        uncovered = _jit_kernels(module) - {entry.kernel for entry in entries}
        if uncovered:
            raise LookupError(f"kernels of {op} without entries in {__name__}.COMPILE_TABLE: "
                              f"{sorted(uncovered)}")
        for entry in entries:
            kernel = getattr(module, entry.kernel)
            attrs = {(kernel.arg_names.index(name),): _DIVISIBLE_BY_16 for name in entry.aligned}
            source = ASTSource(fn=kernel, signature=entry.signature, constexprs=entry.constexprs,
                               attrs=attrs)
            for arch in arches:
                compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": entry.num_warps,
                                                   **entry.options})
                usage = _ptxas_usage(compiled.asm["ptx"], arch)
                rows.append({
                    "op": op, "kernel": entry.kernel, "arch": arch, "variant": entry.variant,
                    "n_regs": usage["n_regs"], "n_spills": usage["stack_bytes"] // 4,
                    "spill_store_bytes": usage["spill_store_bytes"],
                    "spill_load_bytes": usage["spill_load_bytes"],
                    "shared_bytes": compiled.metadata.shared,
                })
    return rows


def format_table(rows: list[dict]) -> str:
    """The rows of ``compile_report`` as a markdown table."""
    columns = ("op", "kernel", "variant", "arch", "n_regs", "n_spills", "spill_store_bytes",
               "spill_load_bytes", "shared_bytes")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"sm_{row[c]}" if c == "arch" else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    # Read by Triton when a kernel is decorated: unset before any op module is imported.
    os.environ.pop("TRITON_INTERPRET", None)
    print(format_table(compile_report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
