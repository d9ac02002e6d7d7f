// Per-element arithmetic of Decoupled SOLO's dice loss, shared by the CPU and CUDA kernels (and
// mirrored by kernels/decoupled_dice_loss.py) on top of dice_loss.h: the sigmoid, the three sums,
// the loss and the gradient coefficients are those of the plain dice loss.
//
// Positive k of image n sits in grid row i and column j; over the P pixels of a mask map,
//   px = sigmoid(X[n, j]),  py = sigmoid(Y[n, i]),  p = py * px,  t = target[k],
//   a, b, c, L as in dice_loss.h, and dL_k/dp = coef_p * p - coef_t * t.
// Every positive in column j of image n adds to the same gradient row of X (and every positive in
// row i to the same row of Y):
//   dL/dX[n, j] = (sum over those k of dL_k/dp * py_k) * px (1 - px),
//   dL/dY[n, i] = (sum over those k of dL_k/dp * px_k) * py (1 - py).
// The kernels form the sum of a row ("own" side) over its positives in ascending k, each term from
// the other side's ("partner") probability, then multiply once by the own side's derivative.
// Because p = own * partner is a product of two floats, it rounds the same whichever side is
// "own"; so both rows of one positive see the same p and dL/dp.
#pragma once

#include "dice_loss.h"

namespace solo_fast {
namespace decoupled_dice_loss {

// The soft mask of one positive at one pixel, in the reference's order (sigmoid(Y) * sigmoid(X)).
template <typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t product(acc_t py, acc_t px) {
  return py * px;
}

// One positive's term of the own row's gradient sum: dL/dp times the partner probability.
template <typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t row_term(acc_t p, acc_t partner_p, acc_t t,
                                     dice_loss::GradCoefficients<acc_t> coef) {
  return dice_loss::grad_element(p, t, coef, /*logits=*/false) * partner_p;
}

// The gradient of an own-row logit from the summed terms of its positives.
template <typename acc_t>
SOLO_FAST_HOST_DEVICE acc_t row_gradient(acc_t summed_terms, acc_t own_dp) {
  return summed_terms * own_dp;
}

}  // namespace decoupled_dice_loss
}  // namespace solo_fast
