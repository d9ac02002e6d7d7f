// The one place where solo_fast's operator schemas are declared. Each backend registers its kernels
// in its own file (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu) with TORCH_LIBRARY_IMPL; Python adds fake
// kernels and autograd (solo_fast/ops/<op>.py).
#include <torch/library.h>
#include <torch/extension.h>

TORCH_LIBRARY(solo_fast, m) {
  // pred: (N, P) logits or probabilities; target: (N, P) uint8 or pred's dtype.
  // Returns the loss (N,) in pred's dtype and the raw sums (N, 3) = [sum p*t, sum p*p, sum t*t]
  // in float64, kept for the backward.
  m.def(
      "dice_loss_forward(Tensor pred, Tensor target, bool logits, float eps) -> (Tensor, Tensor)");
  m.def(
      "dice_loss_backward(Tensor grad_loss, Tensor pred, Tensor target, Tensor sums, bool logits, "
      "float eps) -> Tensor");
  // Decoupled SOLO: x_logits, y_logits (N, S, P) in one floating dtype; pos_image, pos_row,
  // pos_col (K,) int64; target (K, P) uint8, bool or x_logits' dtype. The soft mask of positive
  // k is sigmoid(y_logits[pos_image[k], pos_row[k]]) * sigmoid(x_logits[pos_image[k], pos_col[k]]).
  // Returns the dice loss (K,) in x_logits' dtype and the raw sums (K, 3) in float64, as
  // dice_loss_forward; the backward returns (grad_x_logits, grad_y_logits), both (N, S, P).
  m.def(
      "decoupled_dice_loss_forward(Tensor x_logits, Tensor y_logits, Tensor pos_image, "
      "Tensor pos_row, Tensor pos_col, Tensor target, float eps) -> (Tensor, Tensor)");
  m.def(
      "decoupled_dice_loss_backward(Tensor grad_loss, Tensor x_logits, Tensor y_logits, "
      "Tensor pos_image, Tensor pos_row, Tensor pos_col, Tensor target, Tensor sums, float eps) "
      "-> (Tensor, Tensor)");
  // Candidate scoring at inference (SOLOv2 and Decoupled SOLO): per candidate k, the area of its
  // binary mask s > threshold and soft_sum = sum of s over that mask, without storing any s.
  // Returns area (K,) int64 and soft_sum (K,) float64. threshold is compared in the inputs' dtype.
  // dynamic_mask_scores: kernels (K, E) and mask_feats (N, E, P) contiguous, one floating dtype;
  // image (K,) int64 in [0, N), any order; s = sigmoid(kernels[k] . mask_feats[image[k]]).
  m.def(
      "dynamic_mask_scores(Tensor kernels, Tensor mask_feats, Tensor image, float threshold) "
      "-> (Tensor, Tensor)");
  // decoupled_mask_scores: x_probs, y_probs (N, C, P) probabilities (the levels' upsampled
  // sigmoid maps concatenated along C) in one floating dtype; image, row, col (K,) int64;
  // s = y_probs[image[k], row[k]] * x_probs[image[k], col[k]].
  m.def(
      "decoupled_mask_scores(Tensor x_probs, Tensor y_probs, Tensor image, Tensor row, "
      "Tensor col, float threshold) -> (Tensor, Tensor)");
}

namespace {

bool cuda_compiled() {
#ifdef SOLO_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "solo_fast native kernels; the operators live in torch.ops.solo_fast";
  module.def("cuda_compiled", &cuda_compiled,
             "Whether the CUDA kernels were compiled into this build");
}
