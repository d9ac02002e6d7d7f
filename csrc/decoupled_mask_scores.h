// Per-element arithmetic of decoupled_mask_scores (Decoupled SOLO's candidate scoring), shared by
// the CPU and CUDA kernels (and mirrored by kernels/decoupled_mask_scores.py) on top of
// dynamic_mask_scores.h: the threshold, the area and the soft sum are those of the SOLOv2 op.
//
// Candidate k of image n in grid row i and column j (channels of the concatenated levels) has the
// soft mask s = y_probs[n, i] * x_probs[n, j]: a product of two probabilities, rounded once in the
// inputs' dtype as torch's multiplication rounds it (float16 / bfloat16 are multiplied in float32
// and rounded back), so that the thresholded set is exactly the reference's.
#pragma once

#include "dynamic_mask_scores.h"

namespace solo_fast {
namespace mask_scores {

template <typename prob_t, typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t decoupled_soft(acc_t py, acc_t px) {
  return round_to<prob_t>(py * px);
}

}  // namespace mask_scores
}  // namespace solo_fast
