// Transparent huge pages for large output buffers of the CPU kernels.
//
// A fresh multi-megabyte tensor comes straight from mmap, and the first write to each 4 KiB page
// traps into the kernel: for a 43 MB gradient that is ~10,600 faults, which cost more than the
// kernel's arithmetic (RESULTS.md). Asking for huge pages before the first write makes it ~21
// faults of 2 MiB. It is a hint: where THP is off or unavailable nothing changes.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace solo_fast {

inline void advise_huge_pages(const at::Tensor& fresh_output) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(fresh_output.data_ptr());
  const uintptr_t end = begin + fresh_output.nbytes();
  // Only whole huge pages inside the buffer: the hint must not reach memory of other tensors.
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = end & ~(kHugePage - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)fresh_output;
#endif
}

}  // namespace solo_fast
