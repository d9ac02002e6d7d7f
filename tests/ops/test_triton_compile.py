"""Every op's Triton kernels compile for sm_80 and sm_90 without spilling; no GPU needed.

The compile runs in a subprocess: Triton decides at decoration time whether kernels are interpreted,
and this test session may run with ``TRITON_INTERPRET=1`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO_ROOT = Path(__file__).resolve().parents[2]
ARCHES = (80, 90)
# The kernels each op must have (kernels/<op>.py; kernels/_compile.py's COMPILE_TABLE).
OP_KERNELS = {
    "dice_loss": {"_dice_loss_fwd_kernel", "_dice_loss_bwd_kernel"},
    "decoupled_dice_loss": {"_decoupled_dice_loss_fwd_kernel", "_decoupled_dice_loss_bwd_kernel"},
    "matrix_nms": {"_matrix_nms_pack_kernel", "_matrix_nms_word_range_kernel",
                   "_matrix_nms_iou_kernel", "_matrix_nms_compensation_kernel",
                   "_matrix_nms_decay_kernel"},
    "dynamic_mask_dice_loss": {"_dmd_fwd_kernel", "_dmd_bwd_feats_kernel",
                               "_dmd_bwd_kernels_kernel"},
    "dynamic_mask_scores": {"_dynamic_mask_scores_kernel"},
    "decoupled_mask_scores": {"_decoupled_mask_scores_kernel"},
    "solo_mask_scores": {"_solo_mask_scores_kernel"},
}

# The installed package is solo_fast.kernels; the source tree has it as the top-level `kernels`.
_REPORT_SCRIPT = f"""
import json
try:
    from solo_fast.kernels import _compile
except ImportError:
    from kernels import _compile
print(json.dumps(_compile.compile_report(arches={ARCHES!r})))
"""


@pytest.fixture(scope="module")
def report() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    result = subprocess.run([sys.executable, "-c", _REPORT_SCRIPT], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (f"compile report failed (exit {result.returncode}):\n"
                                    f"{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    # The report is the last line; anything before it is Triton's or a warning's.
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("op", sorted(OP_KERNELS))
def test_every_kernel_compiles_for_each_arch(report, op):
    compiled = {(row["kernel"], row["arch"]) for row in report if row["op"] == op}
    assert compiled == {(kernel, arch) for kernel in OP_KERNELS[op] for arch in ARCHES}


@pytest.mark.slow
def test_no_kernel_spills(report):
    assert report, "the compile report is empty"
    for row in report:
        where = f"{row['op']}.{row['kernel']} [{row['variant']}] on sm_{row['arch']}"
        assert row["n_regs"] > 0, f"{where}: no register count ({row})"
        assert row["n_spills"] == 0, f"{where}: {row['n_spills']} spills ({row})"
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, \
            f"{where}: spills ({row})"
