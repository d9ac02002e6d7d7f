// What every C++ CPU kernel file shares: the attribute that compiles a hot loop for several
// instruction sets, and typed data pointers.
#pragma once

#include <ATen/core/Tensor.h>

// One binary for every x86-64 machine: a function marked SOLO_FAST_CPU_CLONES is compiled for
// AVX-512, AVX2 (both with FMA) and the baseline, and the loader picks the best (GNU ifunc).
// Functions called from one must be inlined into it (SOLO_FAST_HOST_DEVICE forces that) to be
// compiled for its instruction set.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define SOLO_FAST_X86_DISPATCH 1
#define SOLO_FAST_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SOLO_FAST_CPU_CLONES
#endif

namespace solo_fast {

// A tensor's data as T*, for kernels that checked its dtype and layout.
template <typename T>
inline T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

}  // namespace solo_fast
