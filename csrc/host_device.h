// SOLO_FAST_HOST_DEVICE marks the per-element functions that the CPU and CUDA kernels share
// (csrc/<op>.h): compiled for both, and always inlined.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SOLO_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: the CPU kernels call these from SIMD clones (target_clones), and GCC once left
// sigmoid_with_derivative out of line there, a PLT call per pixel that made dice_loss's
// backward 14x slower (136 ms against 9.7 ms, RESULTS.md).
#define SOLO_FAST_HOST_DEVICE inline __attribute__((always_inline))
#else
#define SOLO_FAST_HOST_DEVICE inline
#endif
