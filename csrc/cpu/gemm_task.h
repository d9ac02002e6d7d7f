// What a worker of at::parallel_for needs before it calls ATen's GEMMs (at::mm_out) on its own
// tile, shared by the CPU kernels that run one GEMM per task (dynamic_mask_dice_loss,
// dynamic_mask_scores).
//
// 1. The caller's thread-local state. The dispatcher runs a kernel with the autograd keys
//    excluded on the calling thread only; an OpenMP worker starts with grad mode on and no
//    exclusions, so an ATen op on inputs that require grad raises there ("functions with out=...
//    arguments don't support automatic differentiation"), as in every backward.
// 2. One BLAS thread. MKL called inside an OpenMP region otherwise starts threads of its own, two
//    per core here, and the tasks fight over the cores (forward + backward of
//    dynamic_mask_dice_loss took 4-5 s instead of 0.3 s, RESULTS.md).
#pragma once

#include <ATen/ThreadLocalState.h>

// MKL's per-thread thread count (C interface, by value). Weak: absent from torch builds without
// MKL, where the GEMMs of a task run however that BLAS runs them.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace solo_fast {

// Construct at the top of each parallel_for body, from a state captured on the calling thread
// (`const at::ThreadLocalState caller;` before the parallel_for). Restores both on exit.
class GemmTaskScope {
 public:
  explicit GemmTaskScope(const at::ThreadLocalState& caller) : state_(caller) {
    if (MKL_Set_Num_Threads_Local != nullptr) previous_threads_ = MKL_Set_Num_Threads_Local(1);
  }
  ~GemmTaskScope() {
    if (MKL_Set_Num_Threads_Local != nullptr) MKL_Set_Num_Threads_Local(previous_threads_);
  }
  GemmTaskScope(const GemmTaskScope&) = delete;
  GemmTaskScope& operator=(const GemmTaskScope&) = delete;

 private:
  at::ThreadLocalStateGuard state_;
  int previous_threads_ = 0;
};

}  // namespace solo_fast
