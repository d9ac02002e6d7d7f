"""solo_fast's fused ops: one public function per op, each with a PyTorch reference
(``solo_fast.ops.reference``) and C++ CPU, CUDA and Triton backends chosen per call."""

from solo_fast.ops._backend import BACKENDS, available_backends, choose_backend
from solo_fast.ops._common import MaskScores
from solo_fast.ops._extension import cuda_compiled, has_ops
from solo_fast.ops.decoupled_dice_loss import decoupled_dice_loss
from solo_fast.ops.decoupled_mask_scores import decoupled_mask_scores
from solo_fast.ops.dice_loss import dice_loss
from solo_fast.ops.dynamic_mask_dice_loss import dynamic_mask_dice_loss
from solo_fast.ops.dynamic_mask_scores import dynamic_mask_scores
from solo_fast.ops.matrix_nms import PackedMasks, batched_matrix_nms, matrix_nms
from solo_fast.ops.solo_mask_scores import solo_mask_scores

__all__ = ["BACKENDS", "MaskScores", "PackedMasks", "available_backends", "batched_matrix_nms",
           "choose_backend", "cuda_compiled", "decoupled_dice_loss", "decoupled_mask_scores",
           "dice_loss", "dynamic_mask_dice_loss", "dynamic_mask_scores", "has_ops", "matrix_nms",
           "solo_mask_scores"]
