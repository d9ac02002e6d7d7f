// The one place where solo_fast's operator schemas are declared. Each backend registers its kernels
// in its own file (csrc/cpu/<op>.cpp, csrc/cuda/<op>.cu) with TORCH_LIBRARY_IMPL; Python adds fake
// kernels and autograd (solo_fast/ops/<op>.py).
#include <torch/library.h>
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <mutex>
#include <set>

TORCH_LIBRARY(solo_fast, m) {
  // Every op that takes index tensors ends with `bool check_index=True`: with it the op reads the
  // indices' minimum and maximum (one device-to-host copy, a synchronisation on a GPU) and
  // raises a ValueError for a value out of range; callers that built the indices themselves pass
  // False, and the autograd backward passes False (its forward checked the same tensors).
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
      "Tensor pos_row, Tensor pos_col, Tensor target, float eps, bool check_index=True) "
      "-> (Tensor, Tensor)");
  m.def(
      "decoupled_dice_loss_backward(Tensor grad_loss, Tensor x_logits, Tensor y_logits, "
      "Tensor pos_image, Tensor pos_row, Tensor pos_col, Tensor target, Tensor sums, float eps, "
      "bool check_index=True) -> (Tensor, Tensor)");
  // Matrix NMS (SOLOv2), split so that the sorts, cuts and filter stay in Python (they define
  // the stable tie order). matrix_nms_pack: masks (n, H, W) bool or uint8 (nonzero = inside) ->
  // (n, words) int64, words = ceil(H*W / 64); bit b of word w is pixel 64 w + b of the row-major
  // flattened mask; the tail bits are zero.
  m.def("matrix_nms_pack(Tensor masks) -> Tensor");
  // matrix_nms_decay: packed (n, words) int64 of masks sorted by descending score within each
  // segment; labels (n,) int64; areas (n,) float32 or float64, used as given; segments (B + 1,)
  // int64 offsets, rows segments[b] .. segments[b + 1] - 1 being image b's candidates (only pairs
  // within one segment interact); kernel 0 = gaussian, 1 = linear. Returns decay (n,) in areas'
  // dtype: decay_j = min(1, min over same-segment, same-label i < j of f(iou_ij) / f(comp_i)),
  // the arithmetic of csrc/matrix_nms.h.
  // matrix_nms_popcount: packed (n, words) int64 -> (n,) int64 set bits per row, the pixel count
  // of each mask. CPU only: on other devices the count is a few PyTorch elementwise ops, which on
  // the CPU cost more than the whole decay.
  m.def("matrix_nms_popcount(Tensor packed) -> Tensor");
  m.def(
      "matrix_nms_decay(Tensor packed, Tensor labels, Tensor areas, Tensor segments, int kernel, "
      "float sigma) -> Tensor");
  // SOLOv2: kernels (K, E) and mask_feats (N, E, P) in one floating dtype, both contiguous;
  // pos_image (K,) int64 in [0, N), positives in any order; target (K, P) uint8, bool or kernels'
  // dtype. The logits of positive k are z_k = kernels[k] . mask_feats[pos_image[k]] (a 1x1
  // convolution), never stored. Returns the dice loss (K,) of sigmoid(z_k) in kernels' dtype and
  // the raw sums (K, 3) in float64, as dice_loss_forward; the backward recomputes the logits and
  // returns (grad_kernels (K, E), grad_mask_feats (N, E, P)).
  m.def(
      "dynamic_mask_dice_loss_forward(Tensor kernels, Tensor mask_feats, Tensor pos_image, "
      "Tensor target, float eps, bool check_index=True) -> (Tensor, Tensor)");
  m.def(
      "dynamic_mask_dice_loss_backward(Tensor grad_loss, Tensor kernels, Tensor mask_feats, "
      "Tensor pos_image, Tensor target, Tensor sums, float eps, bool check_index=True) "
      "-> (Tensor, Tensor)");
  // Candidate scoring at inference (SOLOv2 and Decoupled SOLO): per candidate k, the area of its
  // binary mask s > threshold and soft_sum = sum of s over that mask, without storing any s.
  // Returns area (K,) int64 and soft_sum (K,) float64. threshold is compared in the inputs' dtype.
  // dynamic_mask_scores: kernels (K, E) and mask_feats (N, E, P) contiguous, one floating dtype;
  // image (K,) int64 in [0, N), any order; s = sigmoid(kernels[k] . mask_feats[image[k]]).
  // Its third output, packed, is the binary masks in matrix_nms_pack's layout when pack_masks is
  // true: (K, ceil(P / 64)) int64, row k = candidate k in the input order, a bit set exactly where
  // the pixel counts into area (popcount(packed[k]) == area[k]), tail bits zero. When pack_masks
  // is false it is an empty (0, ceil(P / 64)) int64 tensor and nothing is written.
  m.def(
      "dynamic_mask_scores(Tensor kernels, Tensor mask_feats, Tensor image, float threshold, "
      "bool pack_masks, bool check_index=True) -> (Tensor, Tensor, Tensor)");
  // decoupled_mask_scores: x_probs, y_probs (N, C, P) probabilities (the levels' upsampled
  // sigmoid maps concatenated along C) in one floating dtype; image, row, col (K,) int64;
  // s = y_probs[image[k], row[k]] * x_probs[image[k], col[k]].
  m.def(
      "decoupled_mask_scores(Tensor x_probs, Tensor y_probs, Tensor image, Tensor row, "
      "Tensor col, float threshold, bool check_index=True) -> (Tensor, Tensor)");
  // solo_mask_scores (vanilla SOLO): mask_preds (N, Q, h, w) contiguous, one level's channels,
  // logits (logits true) or probabilities; image (K,) int64 in [0, N), channel (K,) int64 in
  // [0, Q), any order, may repeat; out_height, out_width >= 1. s = bilinear resize
  // (align_corners=False, torch's CPU arithmetic: solo_mask_scores.h) of sigmoid(mask_preds[n, q])
  // (or of the probabilities) to (out_height, out_width).
  m.def(
      "solo_mask_scores(Tensor mask_preds, Tensor image, Tensor channel, int out_height, "
      "int out_width, float threshold, bool logits, bool check_index=True) -> (Tensor, Tensor)");
}

namespace {

bool cuda_compiled() {
#ifdef SOLO_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// How many threads at::parallel_for really runs a CPU kernel's tasks on. at::parallel_for is an
// inline template: compiled without OpenMP it runs every task on the calling thread, silently
// (solo_fast's kernels did until the build added -fopenmp). The tests hold this to
// torch.get_num_threads().
int64_t cpu_parallel_threads() {
  std::mutex mutex;
  std::set<int> seen;
  const int64_t tasks = 4 * at::get_num_threads();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const std::lock_guard<std::mutex> lock(mutex);
    seen.insert(at::get_thread_num());
  });
  return static_cast<int64_t>(seen.size());
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "solo_fast native kernels; the operators live in torch.ops.solo_fast";
  module.def("cuda_compiled", &cuda_compiled,
             "Whether the CUDA kernels were compiled into this build");
  module.def("cpu_parallel_threads", &cpu_parallel_threads,
             "Threads at::parallel_for runs this library's CPU tasks on (a build check)");
}
