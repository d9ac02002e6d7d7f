// Input checks shared by the CPU and CUDA kernels of an op, so that both reject the same inputs
// with the same messages. The Python wrappers check the arguments' metadata first, with the
// names of the public functions; the index ranges are checked here only (for the compiled
// backends), so that a call reads them once (see solo_fast/ops/_checks.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/stack.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <utility>
#include <vector>

namespace solo_fast {

// One index tensor and the range [0, limit) its values must lie in; `letter` names the limit in
// the message ("N", "S", "C", "Q").
struct IndexRange {
  const char* name;
  const at::Tensor& index;
  int64_t limit;
  const char* letter;
};

// Every index within its range, so that no kernel reads out of bounds. The minimum and maximum of
// every non-empty index tensor and the scalars `extra` (0-D int64 tensors the caller needs on the
// host) come back in one device-to-host copy: one synchronisation per call on a GPU, none when
// `check` is false (the caller built the indices) and nothing is extra. A bad range raises a
// ValueError in Python. Returns the values of `extra`.
inline std::vector<int64_t> check_index_ranges(bool check,
                                               std::initializer_list<IndexRange> ranges,
                                               const char* op,
                                               std::initializer_list<at::Tensor> extra = {}) {
  std::vector<at::Tensor> values;
  for (const IndexRange& range : ranges) {
    if (check && range.index.numel() > 0) {
      values.push_back(range.index.min());
      values.push_back(range.index.max());
    }
  }
  values.insert(values.end(), extra.begin(), extra.end());
  if (values.empty()) return {};
  const at::Tensor host = at::stack(values).cpu();  // min, max of each range, then the extras
  const int64_t* value = host.const_data_ptr<int64_t>();
  for (const IndexRange& range : ranges) {
    if (!check || range.index.numel() == 0) continue;
    TORCH_CHECK_VALUE(value[0] >= 0 && value[1] < range.limit, op, ": ", range.name,
                      " must lie in [0, ", range.letter, ") = [0, ", range.limit,
                      "), got values in [", value[0], ", ", value[1], "]");
    value += 2;
  }
  return std::vector<int64_t>(value, value + extra.size());
}

// dice_loss: pred (N, P) floating; target pred's shape, uint8 (0/1), bool or pred's dtype, on
// pred's device.
inline void check_dice_inputs(const at::Tensor& pred, const at::Tensor& target, const char* op) {
  TORCH_CHECK(pred.dim() == 2, op, ": pred must be 2-D (N, P), got shape ", pred.sizes(),
              "; flatten the pixel dimensions first");
  TORCH_CHECK(target.sizes() == pred.sizes(), op, ": target must have pred's shape ",
              pred.sizes(), ", got ", target.sizes());
  TORCH_CHECK(target.device() == pred.device(), op, ": target is on ", target.device(),
              " but pred is on ", pred.device(), "; move both to the same device");
  const auto dtype = pred.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), op,
              ": pred must be float16, bfloat16, float32 or float64, got ", dtype);
  const auto target_dtype = target.scalar_type();
  TORCH_CHECK(target_dtype == at::kByte || target_dtype == at::kBool || target_dtype == dtype, op,
              ": target must be uint8 (0/1), bool or pred's dtype ", dtype, ", got ", target_dtype,
              "; convert it with target.to(pred.dtype)");
}

// The upstream gradient (items,) and the float64 sums (items, 3) a dice forward returned, on the
// device of ``like``.
inline void check_grad_and_sums(const at::Tensor& grad_loss, const at::Tensor& sums,
                                int64_t items, const at::Tensor& like, const char* op,
                                const char* forward) {
  TORCH_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == items &&
                  at::isFloatingType(grad_loss.scalar_type()),
              op, ": grad_loss must be a floating (", items, ",) tensor, got ",
              grad_loss.scalar_type(), " ", grad_loss.sizes());
  TORCH_CHECK(sums.dim() == 2 && sums.size(0) == items && sums.size(1) == 3 &&
                  at::isFloatingType(sums.scalar_type()),
              op, ": sums must be the float64 (", items, ", 3) tensor returned by ", forward,
              ", got ", sums.scalar_type(), " ", sums.sizes());
  TORCH_CHECK(grad_loss.device() == like.device() && sums.device() == like.device(), op,
              ": grad_loss (", grad_loss.device(), ") and sums (", sums.device(),
              ") must be on the inputs' device ", like.device());
}

// decoupled_dice_loss: x, y (N, S, P) floating; pos_image (K,) int64 in [0, N), pos_row,
// pos_col (K,) int64 in [0, S); target (K, P) uint8, bool or x's dtype; all on x's device. The
// ranges are read only with check_index.
inline void check_decoupled_inputs(const at::Tensor& x, const at::Tensor& y,
                                   const at::Tensor& pos_image, const at::Tensor& pos_row,
                                   const at::Tensor& pos_col, const at::Tensor& target,
                                   bool check_index, const char* op) {
  TORCH_CHECK(x.dim() == 3, op, ": x_logits must be 3-D (N, S, P), got shape ", x.sizes(),
              "; flatten the pixel dimensions first");
  TORCH_CHECK(y.sizes() == x.sizes(), op, ": y_logits must have x_logits' shape ", x.sizes(),
              ", got ", y.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op,
              ": x_logits must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), op, ": y_logits must have x_logits' dtype ",
              x.scalar_type(), ", got ", y.scalar_type());
  const int64_t k = pos_image.dim() == 1 ? pos_image.size(0) : -1;
  const std::pair<const char*, const at::Tensor*> indices[] = {
      {"pos_image", &pos_image}, {"pos_row", &pos_row}, {"pos_col", &pos_col}};
  for (const auto& [name, index] : indices) {
    TORCH_CHECK(index->dim() == 1 && index->size(0) == k, op, ": ", name,
                " must be 1-D with one entry per positive (pos_image has shape ",
                pos_image.sizes(), "), got shape ", index->sizes());
    TORCH_CHECK(index->scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
                index->scalar_type());
    TORCH_CHECK(index->device() == x.device(), op, ": ", name, " is on ", index->device(),
                " but x_logits is on ", x.device(), "; move both to the same device");
  }
  TORCH_CHECK(target.dim() == 2 && target.size(0) == k && target.size(1) == x.size(2), op,
              ": target must have shape (K, P) = (", k, ", ", x.size(2), "), got ",
              target.sizes());
  const auto target_dtype = target.scalar_type();
  TORCH_CHECK(target_dtype == at::kByte || target_dtype == at::kBool ||
                  target_dtype == x.scalar_type(),
              op, ": target must be uint8 (0/1), bool or x_logits' dtype ", x.scalar_type(),
              ", got ", target_dtype, "; convert it with target.to(x_logits.dtype)");
  TORCH_CHECK(y.device() == x.device() && target.device() == x.device(), op, ": y_logits (",
              y.device(), ") and target (", target.device(), ") must be on x_logits' device ",
              x.device());
  check_index_ranges(check_index,
                     {{"pos_image", pos_image, x.size(0), "N"},
                      {"pos_row", pos_row, x.size(1), "S"},
                      {"pos_col", pos_col, x.size(1), "S"}},
                     op);
}

// matrix_nms_pack: masks (n, H, W) bool or uint8.
inline void check_matrix_nms_pack_inputs(const at::Tensor& masks, const char* op) {
  TORCH_CHECK(masks.dim() == 3, op, ": masks must be 3-D (n, H, W), got shape ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kBool || masks.scalar_type() == at::kByte, op,
              ": masks must be bool or uint8 (nonzero = inside the mask), got ",
              masks.scalar_type());
}

// matrix_nms_popcount (and decay): packed, the int64 (n, words) tensor of matrix_nms_pack.
inline void check_packed_masks(const at::Tensor& packed, const char* op) {
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kLong, op,
              ": packed must be the int64 (n, words) tensor of matrix_nms_pack, got ",
              packed.scalar_type(), " ", packed.sizes());
}

// matrix_nms_decay: packed (n, words) int64; labels (n,) int64; areas (n,) float32 or float64;
// segments (B + 1,) int64; all on packed's device; kernel 0 (gaussian) or 1 (linear). The values
// of segments (0 first, n last, non-decreasing) are data: the kernels check them where reading
// them is free (on the CPU).
inline void check_matrix_nms_decay_inputs(const at::Tensor& packed, const at::Tensor& labels,
                                          const at::Tensor& areas, const at::Tensor& segments,
                                          int64_t kernel, const char* op) {
  check_packed_masks(packed, op);
  const int64_t n = packed.size(0);
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == n && labels.scalar_type() == at::kLong, op,
              ": labels must be int64 of shape (", n, ",), one per packed row, got ",
              labels.scalar_type(), " ", labels.sizes());
  TORCH_CHECK(areas.dim() == 1 && areas.size(0) == n &&
                  (areas.scalar_type() == at::kFloat || areas.scalar_type() == at::kDouble),
              op, ": areas must be float32 or float64 of shape (", n, ",), got ",
              areas.scalar_type(), " ", areas.sizes());
  TORCH_CHECK(segments.dim() == 1 && segments.size(0) >= 1 &&
                  segments.scalar_type() == at::kLong,
              op, ": segments must be int64 offsets of shape (B + 1,) with B >= 0, got ",
              segments.scalar_type(), " ", segments.sizes());
  TORCH_CHECK(kernel == 0 || kernel == 1, op, ": kernel must be 0 (gaussian) or 1 (linear), got ",
              kernel);
  TORCH_CHECK(labels.device() == packed.device() && areas.device() == packed.device() &&
                  segments.device() == packed.device(),
              op, ": labels (", labels.device(), "), areas (", areas.device(), ") and segments (",
              segments.device(), ") must be on packed's device ", packed.device());
}

// dynamic_mask_dice_loss: kernels (K, E) floating; mask_feats (N, E, P) kernels' dtype;
// pos_image (K,) int64 in [0, N); target (K, P) uint8, bool or kernels' dtype; all on kernels'
// device. The range is read only with check_index.
inline void check_dynamic_mask_inputs(const at::Tensor& kernels, const at::Tensor& mask_feats,
                                      const at::Tensor& pos_image, const at::Tensor& target,
                                      bool check_index, const char* op) {
  TORCH_CHECK(kernels.dim() == 2, op, ": kernels must be 2-D (K, E), got shape ",
              kernels.sizes());
  TORCH_CHECK(at::isFloatingType(kernels.scalar_type()), op,
              ": kernels must be float16, bfloat16, float32 or float64, got ",
              kernels.scalar_type());
  TORCH_CHECK(mask_feats.dim() == 3 && mask_feats.size(1) == kernels.size(1), op,
              ": mask_feats must be 3-D (N, E, P) with E = ", kernels.size(1),
              " (kernels' width), got shape ", mask_feats.sizes(),
              "; flatten the pixel dimensions first");
  TORCH_CHECK(mask_feats.scalar_type() == kernels.scalar_type(), op,
              ": mask_feats must have kernels' dtype ", kernels.scalar_type(), ", got ",
              mask_feats.scalar_type());
  const int64_t k = kernels.size(0);
  TORCH_CHECK(pos_image.dim() == 1 && pos_image.size(0) == k, op,
              ": pos_image must be 1-D with one entry per kernel (", k, ",), got shape ",
              pos_image.sizes());
  TORCH_CHECK(pos_image.scalar_type() == at::kLong, op, ": pos_image must be int64, got ",
              pos_image.scalar_type());
  TORCH_CHECK(target.dim() == 2 && target.size(0) == k && target.size(1) == mask_feats.size(2),
              op, ": target must have shape (K, P) = (", k, ", ", mask_feats.size(2), "), got ",
              target.sizes());
  const auto target_dtype = target.scalar_type();
  TORCH_CHECK(target_dtype == at::kByte || target_dtype == at::kBool ||
                  target_dtype == kernels.scalar_type(),
              op, ": target must be uint8 (0/1), bool or kernels' dtype ", kernels.scalar_type(),
              ", got ", target_dtype, "; convert it with target.to(kernels.dtype)");
  TORCH_CHECK(mask_feats.device() == kernels.device() && pos_image.device() == kernels.device() &&
                  target.device() == kernels.device(),
              op, ": mask_feats (", mask_feats.device(), "), pos_image (", pos_image.device(),
              ") and target (", target.device(), ") must be on kernels' device ",
              kernels.device());
  check_index_ranges(check_index, {{"pos_image", pos_image, mask_feats.size(0), "N"}}, op);
}

// dynamic_mask_scores: kernels (K, E) and mask_feats (N, E, P) of one floating dtype; image (K,)
// int64; all on mask_feats' device. The backends check image's range with check_index_ranges
// themselves: the CUDA one reads it in the same copy as its grid size.
inline void check_dynamic_mask_scores_inputs(const at::Tensor& kernels,
                                             const at::Tensor& mask_feats,
                                             const at::Tensor& image, const char* op) {
  TORCH_CHECK(mask_feats.dim() == 3, op, ": mask_feats must be 3-D (N, E, P), got shape ",
              mask_feats.sizes(), "; flatten the pixel dimensions first");
  TORCH_CHECK(at::isFloatingType(mask_feats.scalar_type()), op,
              ": mask_feats must be float16, bfloat16, float32 or float64, got ",
              mask_feats.scalar_type());
  TORCH_CHECK(kernels.dim() == 2 && kernels.size(1) == mask_feats.size(1), op,
              ": kernels must be (K, E) with E = ", mask_feats.size(1),
              " as mask_feats, got shape ", kernels.sizes());
  TORCH_CHECK(kernels.scalar_type() == mask_feats.scalar_type(), op,
              ": kernels must have mask_feats' dtype ", mask_feats.scalar_type(), ", got ",
              kernels.scalar_type());
  TORCH_CHECK(image.dim() == 1 && image.size(0) == kernels.size(0), op,
              ": image must be 1-D with one entry per kernel (", kernels.size(0),
              "), got shape ", image.sizes());
  TORCH_CHECK(image.scalar_type() == at::kLong, op, ": image must be int64, got ",
              image.scalar_type());
  TORCH_CHECK(kernels.device() == mask_feats.device() && image.device() == mask_feats.device(),
              op, ": kernels (", kernels.device(), ") and image (", image.device(),
              ") must be on mask_feats' device ", mask_feats.device());
}

// The candidates' index tensors of a scoring op, (K,) int64 each on the device of `data` (the
// argument named data_name), K taken from the first (the image index).
inline void check_candidate_indices(
    std::initializer_list<std::pair<const char*, const at::Tensor*>> indices,
    const at::Tensor& data, const char* data_name, const char* op) {
  const at::Tensor& image = *indices.begin()->second;
  const int64_t k = image.dim() == 1 ? image.size(0) : -1;
  for (const auto& [name, index] : indices) {
    TORCH_CHECK(index->dim() == 1 && index->size(0) == k, op, ": ", name,
                " must be 1-D with one entry per candidate (image has shape ", image.sizes(),
                "), got shape ", index->sizes());
    TORCH_CHECK(index->scalar_type() == at::kLong, op, ": ", name, " must be int64, got ",
                index->scalar_type());
    TORCH_CHECK(index->device() == data.device(), op, ": ", name, " is on ", index->device(),
                " but ", data_name, " is on ", data.device(), "; move both to the same device");
  }
}

// decoupled_mask_scores: x_probs, y_probs (N, C, P) of one floating dtype; image (K,) int64 in
// [0, N), row, col (K,) int64 in [0, C); all on x_probs' device. The ranges are read only with
// check_index.
inline void check_decoupled_mask_scores_inputs(const at::Tensor& x_probs,
                                               const at::Tensor& y_probs,
                                               const at::Tensor& image, const at::Tensor& row,
                                               const at::Tensor& col, bool check_index,
                                               const char* op) {
  TORCH_CHECK(x_probs.dim() == 3, op, ": x_probs must be 3-D (N, C, P), got shape ",
              x_probs.sizes(), "; flatten the pixel dimensions first");
  TORCH_CHECK(y_probs.sizes() == x_probs.sizes(), op, ": y_probs must have x_probs' shape ",
              x_probs.sizes(), ", got ", y_probs.sizes());
  TORCH_CHECK(at::isFloatingType(x_probs.scalar_type()), op,
              ": x_probs must be float16, bfloat16, float32 or float64, got ",
              x_probs.scalar_type());
  TORCH_CHECK(y_probs.scalar_type() == x_probs.scalar_type(), op,
              ": y_probs must have x_probs' dtype ", x_probs.scalar_type(), ", got ",
              y_probs.scalar_type());
  check_candidate_indices({{"image", &image}, {"row", &row}, {"col", &col}}, x_probs,
                          "x_probs", op);
  TORCH_CHECK(y_probs.device() == x_probs.device(), op, ": y_probs (", y_probs.device(),
              ") must be on x_probs' device ", x_probs.device());
  check_index_ranges(check_index,
                     {{"image", image, x_probs.size(0), "N"},
                      {"row", row, x_probs.size(1), "C"},
                      {"col", col, x_probs.size(1), "C"}},
                     op);
}

// solo_mask_scores: mask_preds (N, Q, h, w) floating; image (K,) int64 in [0, N), channel (K,)
// int64 in [0, Q), on its device; h, w, out_height, out_width >= 1; every size fits an int (the
// shared math indexes with int). The ranges are read only with check_index.
inline void check_solo_mask_scores_inputs(const at::Tensor& mask_preds, const at::Tensor& image,
                                          const at::Tensor& channel, int64_t out_height,
                                          int64_t out_width, bool check_index, const char* op) {
  TORCH_CHECK(mask_preds.dim() == 4, op, ": mask_preds must be 4-D (N, Q, h, w), got shape ",
              mask_preds.sizes());
  TORCH_CHECK(at::isFloatingType(mask_preds.scalar_type()), op,
              ": mask_preds must be float16, bfloat16, float32 or float64, got ",
              mask_preds.scalar_type());
  check_candidate_indices({{"image", &image}, {"channel", &channel}}, mask_preds, "mask_preds",
                          op);
  constexpr int64_t kIntMax = 2147483647;
  TORCH_CHECK(out_height >= 1 && out_width >= 1 && out_height <= kIntMax &&
                  out_width <= kIntMax,
              op, ": out_height and out_width must be positive (and below 2^31), got (",
              out_height, ", ", out_width, ")");
  TORCH_CHECK(mask_preds.size(2) >= 1 && mask_preds.size(3) >= 1 &&
                  mask_preds.size(2) <= kIntMax && mask_preds.size(3) <= kIntMax,
              op, ": mask_preds' maps must be at least 1 x 1 (and below 2^31 a side), got shape ",
              mask_preds.sizes());
  check_index_ranges(check_index,
                     {{"image", image, mask_preds.size(0), "N"},
                      {"channel", channel, mask_preds.size(1), "Q"}},
                     op);
}

}  // namespace solo_fast
