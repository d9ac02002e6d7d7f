// C++ CPU kernels of solo_fast::matrix_nms_pack / matrix_nms_decay (contract: csrc/solo_fast.cpp,
// solo_fast/ops/matrix_nms.py; arithmetic: matrix_nms.h).
//
// The reference multiplies float copies of the masks (n x P, 4 bytes a pixel) into an n x n GEMM
// and builds five n x n temporaries. Here a mask is P bits; the intersection of two masks is the
// popcount of their AND, over the words where both have pixels; and only pairs of one image and
// one label are visited (the others cannot decay anything). The decay runs in two passes over
// those pairs:
// 1. per column j: iou_ij for every higher-scored i of its group, comp_j = max of them, and
//    f(iou_ij) stored (a triangle per group: sum of g(g - 1)/2 values, 50 KB at n = 500 with ten
//    labels), then f(comp_j);
// 2. per column j: decay_j = min(1, min_i f(iou_ij) / f(comp_i)).
// Each pass writes its column's results only, so no races and no dependence on the thread count.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "cpu/cpu_kernel.h"
#include "matrix_nms.h"
#include "op_checks.h"

// n=candidates, P=H*W pixels of a mask, Wd=words = ceil(P / 64), B=images (segments)

namespace solo_fast {
namespace {

using matrix_nms::kWordBits;

// Bit k of the result is set when byte k of x (little-endian) is nonzero.
inline uint64_t nonzero_byte_bits(uint64_t x) {
  constexpr uint64_t kLow7 = 0x7F7F7F7F7F7F7F7FULL;
  // The high bit of each byte: set by the byte's own high bit or by a carry out of its low bits.
  const uint64_t high = (((x & kLow7) + kLow7) | x) & ~kLow7;
  // Gathers bit 8k + 7 to bit 56 + k; the partial products never overlap, so nothing carries.
  return ((high >> 7) * 0x0102040810204080ULL) >> 56;
}

SOLO_FAST_CPU_CLONES void pack_row(const uint8_t* __restrict mask, int64_t pixels,
                                   uint64_t* __restrict out) {
  const int64_t full = pixels / kWordBits;
  for (int64_t w = 0; w < full; ++w) {
    uint64_t word = 0;
    for (int chunk = 0; chunk < 8; ++chunk) {
      uint64_t bytes;
      std::memcpy(&bytes, mask + w * kWordBits + chunk * 8, sizeof(bytes));
      word |= nonzero_byte_bits(bytes) << (chunk * 8);
    }
    out[w] = word;
  }
  const int64_t tail = pixels - full * kWordBits;
  if (tail > 0) {
    uint64_t word = 0;
    for (int64_t b = 0; b < tail; ++b) {
      word |= uint64_t(mask[full * kWordBits + b] != 0) << b;
    }
    out[full] = word;
  }
}

at::Tensor matrix_nms_pack_cpu(const at::Tensor& masks_in) {
  constexpr const char* op = "matrix_nms_pack";
  check_matrix_nms_pack_inputs(masks_in, op);
  TORCH_CHECK(masks_in.device().is_cpu(), op, ": expected CPU tensors, got ", masks_in.device());
  const at::Tensor masks = masks_in.contiguous();
  const int64_t n = masks.size(0);
  const int64_t pixels = masks.size(1) * masks.size(2);
  const int64_t words = (pixels + kWordBits - 1) / kWordBits;
  at::Tensor packed = at::empty({n, words}, masks.options().dtype(at::kLong));
  if (n == 0 || words == 0) {
    return packed;
  }
  // bool and uint8 share one byte layout; a bool byte is 0 or 1.
  const uint8_t* source = static_cast<const uint8_t*>(masks.data_ptr());
  uint64_t* target = static_cast<uint64_t*>(packed.data_ptr());
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      pack_row(source + row * pixels, pixels, target + row * words);
    }
  });
  return packed;
}

// popcount(a AND b) over words [begin, end). GCC's target_clones cannot dispatch on the
// VPOPCNTQ feature alone (only on whole arches, and x86-64-v4 lacks it), so the variants are
// compiled with `target` and picked once at load time from the CPU's feature bits.
#define SOLO_FAST_AND_POPCOUNT_BODY                 \
  int64_t count = 0;                                \
  for (int64_t w = begin; w < end; ++w) {           \
    count += __builtin_popcountll(a[w] & b[w]);     \
  }                                                 \
  return count;

using AndPopcount = int64_t (*)(const uint64_t*, const uint64_t*, int64_t, int64_t);

int64_t and_popcount_baseline(const uint64_t* __restrict a, const uint64_t* __restrict b,
                              int64_t begin, int64_t end) {
  SOLO_FAST_AND_POPCOUNT_BODY
}

#ifdef SOLO_FAST_X86_DISPATCH
// Eight words a step: VPANDQ + VPOPCNTQ on 512-bit registers (Ice Lake, Zen 4 and newer).
__attribute__((target("avx512f,avx512vpopcntdq"))) int64_t and_popcount_vpopcnt(
    const uint64_t* __restrict a, const uint64_t* __restrict b, int64_t begin, int64_t end) {
  SOLO_FAST_AND_POPCOUNT_BODY
}

// One POPCNT instruction a word instead of the baseline's bit-twiddling sequence.
__attribute__((target("popcnt"))) int64_t and_popcount_popcnt(
    const uint64_t* __restrict a, const uint64_t* __restrict b, int64_t begin, int64_t end) {
  SOLO_FAST_AND_POPCOUNT_BODY
}

AndPopcount pick_and_popcount() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vpopcntdq")) {
    return and_popcount_vpopcnt;
  }
  if (__builtin_cpu_supports("popcnt")) {
    return and_popcount_popcnt;
  }
  return and_popcount_baseline;
}

const AndPopcount and_popcount = pick_and_popcount();
#else
const AndPopcount and_popcount = and_popcount_baseline;
#endif
#undef SOLO_FAST_AND_POPCOUNT_BODY

at::Tensor matrix_nms_popcount_cpu(const at::Tensor& packed_in) {
  constexpr const char* op = "matrix_nms_popcount";
  check_packed_masks(packed_in, op);
  TORCH_CHECK(packed_in.device().is_cpu(), op, ": expected CPU tensors, got ",
              packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const int64_t n = packed.size(0);
  const int64_t words = packed.size(1);
  at::Tensor counts = at::empty({n}, packed.options());
  const uint64_t* bits = static_cast<const uint64_t*>(packed.data_ptr());
  int64_t* out = counts.data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      out[row] = and_popcount(bits + row * words, bits + row * words, 0, words);
    }
  });
  return counts;
}

// Who interacts with whom: the rows of each (segment, label) group in ascending row order (= by
// descending score), and per row its group and position in it.
struct Groups {
  std::vector<int64_t> members;      // (n,) rows, group by group
  std::vector<int64_t> group_start;  // (groups + 1,) offsets into members
  std::vector<int64_t> group_of;     // (n,) the group of each row
  std::vector<int64_t> position;     // (n,) index of each row inside its group
  std::vector<int64_t> triangle;     // (n,) where column j's f(iou_ij) start in the pair store
  int64_t pairs = 0;
};

Groups group_rows(const int64_t* labels, const int64_t* segments, int64_t num_segments,
                  int64_t n) {
  Groups groups;
  groups.members.resize(n);
  std::iota(groups.members.begin(), groups.members.end(), 0);
  groups.group_of.resize(n);
  groups.position.resize(n);
  groups.triangle.resize(n);
  groups.group_start.push_back(0);
  for (int64_t s = 0; s < num_segments; ++s) {
    const auto first = groups.members.begin() + segments[s];
    const auto last = groups.members.begin() + segments[s + 1];
    // Stable: equal labels keep ascending rows, which is the score order the decay needs.
    std::stable_sort(first, last, [&](int64_t a, int64_t b) { return labels[a] < labels[b]; });
    for (int64_t m = segments[s]; m < segments[s + 1]; ++m) {
      const int64_t row = groups.members[m];
      if (m > segments[s] && labels[groups.members[m - 1]] != labels[row]) {
        groups.group_start.push_back(m);
      }
      const int64_t group = static_cast<int64_t>(groups.group_start.size()) - 1;
      const int64_t position = m - groups.group_start[group];
      groups.group_of[row] = group;
      groups.position[row] = position;
      groups.triangle[row] = groups.pairs;
      groups.pairs += position;
    }
    if (segments[s + 1] > segments[s]) {
      groups.group_start.push_back(segments[s + 1]);
    }
  }
  // The segment loop closed every group with a start; the last start is the end of members.
  return groups;
}

// Runs body(j) for every row j on all threads. Rows late in big groups cost the most; dealing
// rows out with a stride gives each task a similar mix (contiguous ranges would not).
template <typename Body>
void for_each_column(int64_t n, const Body& body) {
  const int64_t tasks = std::min<int64_t>(n, 8 * at::get_num_threads());
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      for (int64_t j = task; j < n; j += tasks) {
        body(j);
      }
    }
  });
}

template <typename scalar_t>
void decay_kernel(const uint64_t* packed, int64_t words, const int64_t* labels,
                  const scalar_t* areas, const int64_t* segments, int64_t num_segments,
                  int64_t n, int64_t kernel, double sigma, scalar_t* decay) {
  using namespace matrix_nms;
  // First and one-past-last nonzero word of each mask: two masks can only meet where both ranges
  // overlap (an empty mask gets the empty range [words, 0)).
  std::vector<int64_t> word_begin(n), word_end(n);
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const uint64_t* bits = packed + row * words;
      int64_t lo = 0, hi = words;
      while (lo < words && bits[lo] == 0) ++lo;
      while (hi > lo && bits[hi - 1] == 0) --hi;
      word_begin[row] = lo < hi ? lo : words;
      word_end[row] = lo < hi ? hi : 0;
    }
  });
  const Groups groups = group_rows(labels, segments, num_segments, n);
  const scalar_t neg_sigma = static_cast<scalar_t>(-sigma);
  std::vector<scalar_t> f_iou(groups.pairs), f_comp(n);

  for_each_column(n, [&](int64_t j) {
    const int64_t* mates = groups.members.data() + groups.group_start[groups.group_of[j]];
    scalar_t* out = f_iou.data() + groups.triangle[j];
    scalar_t comp = 0;
    for (int64_t q = 0; q < groups.position[j]; ++q) {
      const int64_t i = mates[q];
      const int64_t begin = std::max(word_begin[i], word_begin[j]);
      const int64_t end = std::min(word_end[i], word_end[j]);
      const int64_t inter =
          begin < end ? and_popcount(packed + i * words, packed + j * words, begin, end) : 0;
      const scalar_t value = iou<scalar_t>(inter, areas[i], areas[j]);
      comp = max_nan(comp, value);
      out[q] = kernel_value(value, kernel, neg_sigma);
    }
    f_comp[j] = kernel_value(comp, kernel, neg_sigma);
  });

  for_each_column(n, [&](int64_t j) {
    const int64_t* mates = groups.members.data() + groups.group_start[groups.group_of[j]];
    const scalar_t* column = f_iou.data() + groups.triangle[j];
    scalar_t result = 1;
    for (int64_t q = 0; q < groups.position[j]; ++q) {
      result = min_nan(result, ratio(column[q], f_comp[mates[q]], kernel));
    }
    decay[j] = result;
  });
}

at::Tensor matrix_nms_decay_cpu(const at::Tensor& packed_in, const at::Tensor& labels_in,
                                const at::Tensor& areas_in, const at::Tensor& segments_in,
                                int64_t kernel, double sigma) {
  constexpr const char* op = "matrix_nms_decay";
  check_matrix_nms_decay_inputs(packed_in, labels_in, areas_in, segments_in, kernel, op);
  TORCH_CHECK(packed_in.device().is_cpu(), op, ": expected CPU tensors, got ",
              packed_in.device());
  const at::Tensor packed = packed_in.contiguous();
  const at::Tensor labels = labels_in.contiguous();
  const at::Tensor areas = areas_in.contiguous();
  const at::Tensor segments = segments_in.contiguous();
  const int64_t n = packed.size(0);
  const int64_t words = packed.size(1);
  const int64_t num_segments = segments.size(0) - 1;
  const int64_t* offsets = segments.data_ptr<int64_t>();
  TORCH_CHECK(offsets[0] == 0 && offsets[num_segments] == n, op,
              ": segments must start at 0 and end at n = ", n, ", got ", offsets[0], " and ",
              offsets[num_segments]);
  for (int64_t s = 0; s < num_segments; ++s) {
    TORCH_CHECK(offsets[s] <= offsets[s + 1], op, ": segments must be non-decreasing, got ",
                offsets[s], " before ", offsets[s + 1], " at position ", s);
  }
  at::Tensor decay = at::empty({n}, areas.options());
  if (n == 0) {
    return decay;
  }
  AT_DISPATCH_FLOATING_TYPES(areas.scalar_type(), "matrix_nms_decay_cpu", [&] {
    decay_kernel<scalar_t>(static_cast<const uint64_t*>(packed.data_ptr()), words,
                           labels.data_ptr<int64_t>(), areas.data_ptr<scalar_t>(), offsets,
                           num_segments, n, kernel, sigma, decay.data_ptr<scalar_t>());
  });
  return decay;
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("matrix_nms_pack", &solo_fast::matrix_nms_pack_cpu);
  m.impl("matrix_nms_popcount", &solo_fast::matrix_nms_popcount_cpu);
  m.impl("matrix_nms_decay", &solo_fast::matrix_nms_decay_cpu);
}
