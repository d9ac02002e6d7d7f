// Reassociation lets GCC vectorise the per-row reductions of the epilogue (each row's sums are
// formed in SIMD lanes in an order fixed at compile time, so results do not depend on the thread
// count). It must precede every include so that the shared math is inlined under the same
// options; it only affects this file.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("associative-math", "no-signed-zeros", "no-trapping-math")
#endif

// C++ CPU kernel of solo_fast::dynamic_mask_scores (contract: csrc/solo_fast.cpp,
// solo_fast/ops/dynamic_mask_scores.py; arithmetic: dynamic_mask_scores.h).
//
// The candidates are grouped by image (stable inside an image) and their kernels gathered into
// one (K, E) matrix in that order. A task is one image and one tile of kTile pixels: it packs the
// tile's features into a contiguous (E, T) matrix (converting float16 / bfloat16 to float32),
// then, per block of at most kBlock of the image's candidates, runs the GEMM
// z = kernels_block (B x E) @ tile (E x T) into a task-local buffer (B x T floats, 512 KiB, in
// L2) and the epilogue: sigmoid, threshold, count and soft sum per candidate while z is still in
// cache. Each (candidate, tile) pair gets its own float64 partial; the tiles are added in
// ascending order at the end, so the result does not depend on how tasks are spread over
// threads. Nothing of size K x P is stored but, when asked for (pack_masks), the binary masks
// bit-packed (P / 8 bytes a candidate): the epilogue notes each pixel's in-mask test as a byte
// while it counts, and turns the row's bytes into bits while they are in L1. A tile is kTile =
// 8 x 64 pixels and starts on a word boundary, so each (candidate, tile) pair writes its own 8
// words: no two tasks write one word.
//
// Two schedules (chosen by SOLO_FAST_SCORES_SCHEDULE, for the measurement in
// benchmarks/RESULTS.md): "tiles" (default) runs tasks in parallel, each GEMM single-threaded
// (MKL runs one thread inside a parallel region); "gemm" runs tasks one after another with
// multi-threaded GEMMs and a parallel epilogue over the block's rows. Both run the same GEMM
// shapes, so they give the same bits.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/cpu_kernel.h"
#include "cpu/gemm_task.h"
#include "dynamic_mask_scores.h"
#include "op_checks.h"

// N=images, E=mask-feature channels, K=candidates, P=pixels of a mask map,
// B=kBlock candidates of a task, T=kTile pixels of a task, Wd=ceil(P / 64) words of a packed mask

namespace solo_fast {
namespace {

namespace ms = mask_scores;

// B x T floats = 512 KiB of logits per task (a quarter of this machine's 2 MiB L2, beside the
// E x T = 512 KiB feature tile at E = 256): the epilogue reads z from L2 right after the GEMM wrote
// it. 256 x 512 x 256 is large enough for MKL to run near its peak (67 MFLOP a call), and a
// 200 x 272 map still makes 107 tiles per image, so two threads are never short of tasks.
constexpr int64_t kBlock = 256;
constexpr int64_t kTile = 512;
// Bits of a packed word (matrix_nms_pack's layout: bit b of word w is pixel 64 w + b).
constexpr int64_t kWordBits = 64;
static_assert(kTile % kWordBits == 0, "a tile must own whole words of the packed masks");
constexpr int64_t kTileWords = kTile / kWordBits;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// The epilogue: one row of logits -> (count, soft sum). Always inlined into the SIMD clones.

// kFlags: also store the in-mask test of pixel i as flags[i] = 0 or 1. A byte store per pixel
// keeps the loop vectorised, where or-ing bits into a word would serialise it on the word.
template <typename prob_t, bool kFlags, typename acc_t>
__attribute__((always_inline)) inline void score_row(const acc_t* __restrict z, int64_t count,
                                                     acc_t threshold, int64_t* __restrict area,
                                                     double* __restrict soft_sum,
                                                     uint8_t* __restrict flags) {
  int64_t inside = 0;
  double sum = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    const acc_t s = ms::soft_from_logit<prob_t>(z[i]);
    const bool in = ms::in_mask(s, threshold);
    inside += in ? 1 : 0;
    sum += static_cast<double>(ms::masked_value(s, threshold));
    if constexpr (kFlags) flags[i] = in ? 1 : 0;
  }
  *area = inside;
  *soft_sum = sum;
}

// flags[0 .. count) of 0/1 bytes -> ceil(count / 64) packed words in out; the bits past count
// are zero. flags must have room for the whole last word (it is zero-filled up to it).
__attribute__((always_inline)) inline void pack_flags(uint8_t* __restrict flags, int64_t count,
                                                      uint64_t* __restrict out) {
  const int64_t words = ceil_div(count, kWordBits);
  std::memset(flags + count, 0, words * kWordBits - count);
  for (int64_t w = 0; w < words; ++w) {
    uint64_t word = 0;
    for (int chunk = 0; chunk < 8; ++chunk) {
      uint64_t bytes;  // 8 flags, flag j in byte j (little-endian), each 0 or 1
      std::memcpy(&bytes, flags + w * kWordBits + chunk * 8, sizeof(bytes));
      // The constant has bit 8i + 7 - i set for i = 0 .. 7: flag j (bit 8j) times it puts a bit
      // at 8(i + j) + 7 - i, i.e. at 56 + j for i = 7 - j. The products below bit 56 all land
      // on different bits, so nothing carries into the top byte, which holds the 8 flags.
      word |= ((bytes * 0x0102040810204080ULL) >> 56) << (chunk * 8);
    }
    out[w] = word;
  }
}

// One row of logits -> its (count, soft sum) and, when bits is not null, its packed words.
template <typename prob_t, typename acc_t>
__attribute__((always_inline)) inline void score_row_packed(const acc_t* z, int64_t count,
                                                            acc_t threshold, int64_t* area,
                                                            double* soft_sum, uint64_t* bits) {
  if (bits == nullptr) {
    score_row<prob_t, false>(z, count, threshold, area, soft_sum, nullptr);
    return;
  }
  alignas(64) uint8_t flags[kTile];
  score_row<prob_t, true>(z, count, threshold, area, soft_sum, flags);
  pack_flags(flags, count, bits);
}

SOLO_FAST_CPU_CLONES void score_row_f32(const float* z, int64_t count, float threshold,
                                        int64_t* area, double* soft_sum, uint64_t* bits) {
  score_row_packed<float>(z, count, threshold, area, soft_sum, bits);
}

template <typename prob_t, typename acc_t>
void score_row_any(const acc_t* z, int64_t count, acc_t threshold, int64_t* area,
                   double* soft_sum, uint64_t* bits) {
  if constexpr (std::is_same_v<prob_t, float>) {
    score_row_f32(z, count, threshold, area, soft_sum, bits);
  } else {
    score_row_packed<prob_t>(z, count, threshold, area, soft_sum, bits);
  }
}

// ---------------------------------------------------------------------------------------------
// Candidates grouped by image, and the tasks.

// The candidates of image n are members[image_start[n] .. image_start[n + 1]), ascending k.
struct Groups {
  std::vector<int64_t> image_start;
  std::vector<int64_t> members;
};

// The indices were range-checked by the op (or by the caller, check_index false).
Groups group_by_image(const at::Tensor& image_in, int64_t images) {
  const int64_t num = image_in.size(0);
  const int64_t* image = ptr<const int64_t>(image_in);
  Groups groups;
  groups.image_start.assign(images + 1, 0);
  for (int64_t k = 0; k < num; ++k) ++groups.image_start[image[k] + 1];
  for (int64_t n = 0; n < images; ++n) groups.image_start[n + 1] += groups.image_start[n];
  std::vector<int64_t> cursor(groups.image_start.begin(), groups.image_start.end() - 1);
  groups.members.resize(num);
  for (int64_t k = 0; k < num; ++k) groups.members[cursor[image[k]]++] = k;
  return groups;
}

// All candidates of image `image` (in blocks of kBlock) against pixel tile `tile`.
struct Task {
  int64_t image;
  int64_t tile;
};

// Read at every call (a getenv per call is nothing next to the GEMMs), so that tests can run both.
bool sequential_schedule() {
  const char* value = std::getenv("SOLO_FAST_SCORES_SCHEDULE");
  return value != nullptr && std::strcmp(value, "gemm") == 0;
}

// ---------------------------------------------------------------------------------------------
// The op.

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_mask_scores_cpu(
    const at::Tensor& kernels_in, const at::Tensor& mask_feats_in, const at::Tensor& image_in,
    double threshold, bool pack_masks, bool check_index) {
  constexpr const char* kOp = "dynamic_mask_scores";
  check_dynamic_mask_scores_inputs(kernels_in, mask_feats_in, image_in, kOp);
  check_index_ranges(check_index, {{"image", image_in, mask_feats_in.size(0), "N"}}, kOp);
  const int64_t num = kernels_in.size(0);
  const int64_t images = mask_feats_in.size(0);
  const int64_t pixels = mask_feats_in.size(2);
  const int64_t words = ceil_div(pixels, kWordBits);
  at::Tensor area = at::zeros({num}, kernels_in.options().dtype(at::kLong));
  at::Tensor soft_sum = at::zeros({num}, kernels_in.options().dtype(at::kDouble));
  // Every word of a candidate's row is written below (its image's tasks cover every tile).
  at::Tensor packed = at::empty({pack_masks ? num : 0, words},
                                kernels_in.options().dtype(at::kLong));  // (K, Wd) or (0, Wd)
  const at::Tensor image = image_in.contiguous();
  const Groups groups = group_by_image(image, images);
  if (num == 0 || pixels == 0) {
    return {area, soft_sum, packed};
  }
  uint64_t* packed_data = pack_masks ? ptr<uint64_t>(packed) : nullptr;
  // float16 / bfloat16 are multiplied in float32: the kernels are converted here, the features
  // tile by tile while they are packed.
  const auto acc_dtype = at::toOpMathType(mask_feats_in.scalar_type());
  const at::Tensor feats = mask_feats_in.contiguous();  // (N, E, P)
  const at::Tensor order = at::from_blob(const_cast<int64_t*>(groups.members.data()), {num},
                                         image.options());
  const at::Tensor gathered = kernels_in.to(acc_dtype).index_select(0, order).contiguous();
  // gathered: (K, E), image by image
  const int64_t channels = gathered.size(1);

  const int64_t tiles = ceil_div(pixels, kTile);
  std::vector<Task> tasks;
  for (int64_t n = 0; n < images; ++n) {
    if (groups.image_start[n] == groups.image_start[n + 1]) continue;
    for (int64_t tile = 0; tile < tiles; ++tile) tasks.push_back({n, tile});
  }
  // Per (gathered row, tile) partials: (K, tiles) each.
  std::vector<int64_t> partial_area(num * tiles);
  std::vector<double> partial_sum(num * tiles);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mask_feats_in.scalar_type(), kOp,
                                  [&] {
    using prob_t = scalar_t;
    using acc_t = at::opmath_type<prob_t>;
    const acc_t thr = ms::threshold_as<prob_t, acc_t>(threshold);
    const prob_t* feats_data = ptr<const prob_t>(feats);
    const auto options = gathered.options();
    // The task's feature tile, copied into `packed` as a contiguous (E, T) matrix: read in place,
    // its rows lie P floats apart (217 KB at 200 x 272), and MKL ran ~2.8x slower on that view
    // than on the packed copy (256 x 256 x 512 single-precision GEMMs, measured here).
    auto pack = [&](const Task& task, acc_t* packed) {
      const int64_t begin = task.tile * kTile;
      const int64_t count = std::min(pixels - begin, kTile);
      for (int64_t e = 0; e < channels; ++e) {
        const prob_t* source = feats_data + (task.image * channels + e) * pixels + begin;
        std::copy(source, source + count, packed + e * count);
      }
      return count;
    };
    // Logits of rows [first, last) of the gathered kernels on the packed tile: (B, T) in z.
    auto logits = [&](int64_t first, int64_t last, const at::Tensor& packed, int64_t count,
                      const at::Tensor& buffer) {
      const int64_t rows = last - first;
      at::Tensor z = buffer.narrow(0, 0, rows * count).view({rows, count});  // (B, T)
      at::mm_out(z, gathered.narrow(0, first, rows),
                 packed.narrow(0, 0, channels * count).view({channels, count}));  // (B,E)@(E,T)
      return z;
    };
    auto epilogue = [&](const Task& task, int64_t first, const acc_t* z, int64_t count,
                        int64_t row_begin, int64_t row_end) {
      for (int64_t r = row_begin; r < row_end; ++r) {
        const int64_t slot = (first + r) * tiles + task.tile;
        // The candidate's own row of packed (input order), from the tile's first word.
        uint64_t* bits = packed_data == nullptr ? nullptr
            : packed_data + groups.members[first + r] * words + task.tile * kTileWords;
        score_row_any<prob_t>(z + r * count, count, thr, &partial_area[slot], &partial_sum[slot],
                              bits);
      }
    };
    auto blocks = [&](const Task& task, auto&& run_block) {
      for (int64_t first = groups.image_start[task.image];
           first < groups.image_start[task.image + 1]; first += kBlock) {
        run_block(first, std::min(first + kBlock, groups.image_start[task.image + 1]));
      }
    };
    if (sequential_schedule()) {
      const at::Tensor packed = at::empty({channels * kTile}, options);
      const at::Tensor buffer = at::empty({kBlock * kTile}, options);
      for (const Task& task : tasks) {
        const int64_t count = pack(task, ptr<acc_t>(packed));
        blocks(task, [&](int64_t first, int64_t last) {
          const at::Tensor z = logits(first, last, packed, count, buffer);
          const acc_t* z_data = ptr<const acc_t>(z);
          at::parallel_for(0, last - first, 16, [&](int64_t begin, int64_t end) {
            epilogue(task, first, z_data, count, begin, end);
          });
        });
      }
    } else {
      const at::ThreadLocalState caller;
      at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1,
                       [&](int64_t task_begin, int64_t task_end) {
        const GemmTaskScope scope(caller);
        const at::Tensor packed = at::empty({channels * kTile}, options);
        const at::Tensor buffer = at::empty({kBlock * kTile}, options);
        for (int64_t t = task_begin; t < task_end; ++t) {
          const Task& task = tasks[t];
          const int64_t count = pack(task, ptr<acc_t>(packed));
          blocks(task, [&](int64_t first, int64_t last) {
            const at::Tensor z = logits(first, last, packed, count, buffer);
            epilogue(task, first, ptr<const acc_t>(z), count, 0, last - first);
          });
        }
      });
    }
  });

  // Tiles in ascending order, in double: the same sums whatever the thread count.
  int64_t* area_data = ptr<int64_t>(area);
  double* sum_data = ptr<double>(soft_sum);
  for (int64_t m = 0; m < num; ++m) {
    int64_t inside = 0;
    double sum = 0.0;
    for (int64_t tile = 0; tile < tiles; ++tile) {
      inside += partial_area[m * tiles + tile];
      sum += partial_sum[m * tiles + tile];
    }
    area_data[groups.members[m]] = inside;
    sum_data[groups.members[m]] = sum;
  }
  return {area, soft_sum, packed};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CPU, m) {
  m.impl("dynamic_mask_scores", &solo_fast::dynamic_mask_scores_cpu);
}
