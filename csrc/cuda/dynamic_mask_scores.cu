// CUDA kernel of solo_fast::dynamic_mask_scores (contract: csrc/solo_fast.cpp,
// solo_fast/ops/dynamic_mask_scores.py; per-pixel arithmetic: dynamic_mask_scores.h, shared with
// the C++ kernel). Nothing of size K x P is stored.
//
// The candidates are sorted stably by image (ATen, on the device) and their kernels gathered in
// that order, so that kBlockM consecutive sorted candidates of one image form a candidate tile.
// Block (candidate tile, pixel tile) is a shared-memory tiled float GEMM
// z = kernels_tile (kBlockM x E) @ mask_feats[image][:, pixels] (E x kBlockN), E walked kBlockK
// channels at a time through shared memory, each thread holding a kThreadM x kThreadN block of
// z in registers. The epilogue turns z into s, thresholds it and reduces per candidate: each
// thread over its kThreadN pixels, then a butterfly over the 16 lanes that share a row. Every
// (candidate, pixel tile) pair writes its own partial; a second kernel (mask_scores_common.cuh)
// adds a candidate's partials in a fixed order (double) and scatters the sums back to the
// callers' order. No atomics: bitwise reproducible on a given GPU.
//
// With pack_masks the same epilogue also writes the binary masks, bit-packed as matrix_nms_pack
// packs them (bit b of word w = pixel 64 w + b). A half-warp holds one row's 128 pixels of the tile
// as lane tx, pixel tx + 16 j; __ballot_sync over column j gives 16 consecutive bits of the row for
// each half-warp, so four ballots make a 64-bit word and the tile's two words are word-aligned
// (kBlockN = 128 pixels from a multiple of 128). Every word belongs to one (candidate tile, pixel
// tile) pair, so to one block, and one lane of the half-warp stores it (at the candidate's
// original row): no atomics, no zero-fill, and the bits are the counted pixels, so the popcount
// of a row is its area.
//
// Grid axis x walks the candidate tiles fastest, so the blocks resident at one time read the same
// pixel tile of mask_feats (from L2; one image's features are 56 MB at E = 256, 200 x 272) while
// the gathered kernels (1 MB for 1,000 candidates) stay in L2 throughout.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/repeat_interleave.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>

#include "cuda/dice_reduce.cuh"
#include "cuda/mask_scores_common.cuh"
#include "dynamic_mask_scores.h"
#include "op_checks.h"

// N=images, E=mask-feature channels, K=candidates, P=pixels of a mask map, T=candidate tiles,
// Wd=ceil(P / 64) words of a packed mask

namespace solo_fast {
namespace {

namespace ms = ::solo_fast::mask_scores;

using cuda_dice::ceil_div;
using cuda_dice::kThreads;

// 64 candidates x 128 pixels per block, 256 threads of 4 x 8 outputs: 32 accumulators per thread
// (64 registers in double), 16 operand loads from shared memory for 32 FMAs. The shared tiles of
// one E step are 16 x (64 + 128) values: 12 KB in float, 24 KB in double.
constexpr int kBlockM = 64;
constexpr int kBlockN = 128;
constexpr int kBlockK = 16;
constexpr int kThreadM = 4;
constexpr int kThreadN = 8;
// Threads along a row of the tile: the 16 lanes of one half-warp, so a row's reduction is a
// butterfly inside the half-warp.
constexpr int kLanesN = kBlockN / kThreadN;
static_assert(kLanesN == 16, "a row's threads must be one half-warp");
static_assert((kBlockM / kThreadM) * kLanesN == kThreads, "one output block per thread");
static_assert((kBlockM * kBlockK) % kThreads == 0 && (kBlockK * kBlockN) % kThreads == 0,
              "whole shared-tile loads per thread");
// A packed word: 64 pixels, the columns j of 64 / kLanesN ballots, kBlockN / 64 words a tile.
constexpr int kWordBits = 64;
constexpr int kBallotsPerWord = kWordBits / kLanesN;
constexpr int kWordsPerTile = kBlockN / kWordBits;
static_assert(kBlockN % kWordBits == 0, "pixel tiles must start and end on word boundaries");
static_assert(kBallotsPerWord == 4 && kThreadN == kWordsPerTile * kBallotsPerWord,
              "a thread's kThreadN pixels are the tile's words' ballot columns");
static_assert(kWordsPerTile <= kLanesN, "one storing lane per word");
// CUDA limits grid axis y to 65535 blocks; more pixel tiles are taken by a grid-stride loop.
constexpr int64_t kMaxGridY = 65535;

// Block (t, pixel tiles blockIdx.y, blockIdx.y + gridDim.y, ...): rows [tile_begin[t],
// tile_end[t]) of the gathered kernels (at most kBlockM, all of image tile_image[t]) against
// pixels [tile * kBlockN, (tile + 1) * kBlockN) of that image's features. Writes
// partial_area / partial_soft[row][tile] for each of its rows and, unless packed is null, the
// tile's words of packed[order[row]].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) scores_partials_kernel(
    const scalar_t* __restrict__ kernels, const scalar_t* __restrict__ feats,
    const int64_t* __restrict__ tile_image, const int64_t* __restrict__ tile_begin,
    const int64_t* __restrict__ tile_end, const int64_t* __restrict__ order, int64_t channels,
    int64_t pixels, int64_t pixel_tiles, int64_t words, acc_t threshold,
    int32_t* __restrict__ partial_area, double* __restrict__ partial_soft,
    int64_t* __restrict__ packed) {
  // Kernels transposed (a row of z per column). The stores run along kk, a stride of kBlockM + 1
  // words: 2-way bank conflicts instead of 16-way at a stride of kBlockM.
  __shared__ acc_t a_tile[kBlockK][kBlockM + 1];
  __shared__ acc_t b_tile[kBlockK][kBlockN];
  const int tid = threadIdx.x;
  const int tx = tid % kLanesN;  // pixels tx, tx + 16, ... of the tile
  const int ty = tid / kLanesN;  // rows ty * kThreadM + i of the tile
  const int64_t first = tile_begin[blockIdx.x];
  // The image's segment may run on past this tile.
  const int rows = static_cast<int>(min(tile_end[blockIdx.x] - first, int64_t{kBlockM}));
  const scalar_t* kernels_tile = kernels + first * channels;
  const scalar_t* feats_image = feats + tile_image[blockIdx.x] * channels * pixels;

  for (int64_t tile = blockIdx.y; tile < pixel_tiles; tile += gridDim.y) {
    const int64_t pixel0 = tile * kBlockN;
    acc_t acc[kThreadM][kThreadN];
#pragma unroll
    for (int i = 0; i < kThreadM; ++i) {
#pragma unroll
      for (int j = 0; j < kThreadN; ++j) acc[i][j] = acc_t(0);
    }
    for (int64_t k0 = 0; k0 < channels; k0 += kBlockK) {
      // Rows and channels past the ends load 0, which adds nothing to z.
#pragma unroll
      for (int r = 0; r < kBlockM * kBlockK / kThreads; ++r) {
        const int index = tid + r * kThreads;
        const int m = index / kBlockK;
        const int kk = index % kBlockK;
        const bool inside = m < rows && k0 + kk < channels;
        a_tile[kk][m] = inside ? static_cast<acc_t>(kernels_tile[m * channels + k0 + kk])
                               : acc_t(0);
      }
#pragma unroll
      for (int r = 0; r < kBlockK * kBlockN / kThreads; ++r) {
        const int index = tid + r * kThreads;
        const int kk = index / kBlockN;
        const int n = index % kBlockN;  // consecutive threads, consecutive pixels: coalesced
        const bool inside = k0 + kk < channels && pixel0 + n < pixels;
        b_tile[kk][n] = inside ? static_cast<acc_t>(feats_image[(k0 + kk) * pixels + pixel0 + n])
                               : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBlockK; ++kk) {
        acc_t a[kThreadM];
        acc_t b[kThreadN];
#pragma unroll
        for (int i = 0; i < kThreadM; ++i) a[i] = a_tile[kk][ty * kThreadM + i];
#pragma unroll
        for (int j = 0; j < kThreadN; ++j) b[j] = b_tile[kk][tx + j * kLanesN];
#pragma unroll
        for (int i = 0; i < kThreadM; ++i) {
#pragma unroll
          for (int j = 0; j < kThreadN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
      }
      __syncthreads();  // the next step overwrites the tiles
    }

    // Epilogue: every lane runs the shuffles (full mask), masked rows and pixels add nothing.
#pragma unroll
    for (int i = 0; i < kThreadM; ++i) {
      const int row = ty * kThreadM + i;
      int32_t inside = 0;
      double sum = 0.0;
      uint32_t counted_bits = 0;  // bit j: pixel tx + j * kLanesN counted; one register
#pragma unroll
      for (int j = 0; j < kThreadN; ++j) {
        const acc_t s = ms::soft_from_logit<scalar_t>(acc[i][j]);
        const bool counted = row < rows && pixel0 + tx + j * kLanesN < pixels &&
                             ms::in_mask(s, threshold);
        inside += counted ? 1 : 0;
        sum += counted ? static_cast<double>(s) : 0.0;
        counted_bits |= counted ? 1u << j : 0u;
      }
      if (packed != nullptr) {  // uniform: every lane takes the ballots
        // Ballot bits 0-15 are the even half-warp's row, 16-31 the odd one's: prmt takes this
        // half-warp's 16 bits of two ballots as one 32-bit half of the word.
        const unsigned halves = (ty & 1) != 0 ? 0x7632u : 0x5410u;
#pragma unroll
        for (int w = 0; w < kWordsPerTile; ++w) {
          uint32_t ballot[kBallotsPerWord];
#pragma unroll
          for (int c = 0; c < kBallotsPerWord; ++c) {
            ballot[c] = __ballot_sync(0xffffffffu,
                                      (counted_bits >> (w * kBallotsPerWord + c)) & 1u);
          }
          const uint64_t word =
              static_cast<uint64_t>(__byte_perm(ballot[2], ballot[3], halves)) << 32 |
              __byte_perm(ballot[0], ballot[1], halves);
          const int64_t word_index = tile * kWordsPerTile + w;
          if (tx == w && row < rows && word_index < words) {
            packed[order[first + row] * words + word_index] = static_cast<int64_t>(word);
          }
        }
      }
#pragma unroll
      for (int offset = kLanesN / 2; offset > 0; offset /= 2) {
        inside += __shfl_xor_sync(0xffffffffu, inside, offset);
        sum += __shfl_xor_sync(0xffffffffu, sum, offset);
      }
      if (tx == 0 && row < rows) {
        const int64_t out = (first + row) * pixel_tiles + tile;
        partial_area[out] = inside;
        partial_soft[out] = sum;
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_mask_scores_cuda(
    const at::Tensor& kernels_in, const at::Tensor& mask_feats_in, const at::Tensor& image_in,
    double threshold, bool pack_masks, bool check_index) {
  constexpr const char* kOp = "dynamic_mask_scores";
  TORCH_CHECK(mask_feats_in.is_cuda(), kOp, ": mask_feats must be a CUDA tensor, got one on ",
              mask_feats_in.device());
  check_dynamic_mask_scores_inputs(kernels_in, mask_feats_in, image_in, kOp);
  const c10::cuda::CUDAGuard guard(mask_feats_in.device());
  const int64_t candidates = kernels_in.size(0);
  const int64_t channels = kernels_in.size(1);
  const int64_t images = mask_feats_in.size(0);
  const int64_t pixels = mask_feats_in.size(2);
  TORCH_CHECK(candidates <= INT_MAX, kOp, ": at most ", INT_MAX, " candidates, got ",
              candidates);
  at::Tensor area = at::zeros({candidates}, image_in.options());
  at::Tensor soft_sum = at::zeros({candidates}, image_in.options().dtype(at::kDouble));
  // Not zero-filled: the kernel writes every word of every row (see the top of the file).
  const int64_t words = ceil_div(pixels, kWordBits);
  at::Tensor packed =  // (K, Wd), or (0, Wd) without pack_masks
      at::empty({pack_masks ? candidates : 0, words}, mask_feats_in.options().dtype(at::kLong));
  if (candidates == 0) return {area, soft_sum, packed};

  // Candidate tiles: the sorted candidates of image n are [segment[n], segment[n + 1]), taken
  // kBlockM at a time. Stable, so a tile's rows are in ascending k (as the C++ kernel's).
  const at::Tensor image = image_in.contiguous();
  auto [sorted_image, order] = at::sort(image, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor boundaries = at::arange(images + 1, image.options());  // (N + 1,)
  const at::Tensor segment = at::searchsorted(sorted_image, boundaries);  // (N + 1,)
  const at::Tensor tiles =  // (N,)
      segment.narrow(0, 1, images).sub(segment.narrow(0, 0, images)).add(kBlockM - 1)
          .div(kBlockM, "floor");
  // One device-to-host copy: the index bounds (no block may read out of bounds) and the number
  // of candidate tiles (the grid).
  const int64_t num_tiles =
      check_index_ranges(check_index, {{"image", image, images, "N"}}, kOp, {tiles.sum()})[0];
  if (pixels == 0) return {area, soft_sum, packed};
  TORCH_CHECK(num_tiles <= INT_MAX, kOp, ": too many candidate tiles (", num_tiles, ")");

  const at::Tensor tile_image =  // (T,)
      at::repeat_interleave(at::arange(images, image.options()), tiles, /*dim=*/0,
                            /*output_size=*/num_tiles);
  const at::Tensor first_tile = tiles.cumsum(0).sub(tiles);  // (N,)
  const at::Tensor local = at::arange(num_tiles, image.options())
                               .sub(first_tile.index_select(0, tile_image));  // (T,)
  const at::Tensor tile_begin =
      segment.index_select(0, tile_image).add(local.mul(kBlockM)).contiguous();  // (T,)
  const at::Tensor tile_end = segment.index_select(0, tile_image.add(1)).contiguous();  // (T,)
  const at::Tensor gathered = kernels_in.index_select(0, order).contiguous();  // (K, E)
  const at::Tensor feats = mask_feats_in.contiguous();  // (N, E, P)
  const at::Tensor order_contiguous = order.contiguous();  // (K,) sorted position -> candidate

  const int64_t pixel_tiles = ceil_div(pixels, kBlockN);
  at::Tensor partial_area =  // (K, pixel tiles)
      at::empty({candidates, pixel_tiles}, image.options().dtype(at::kInt));
  at::Tensor partial_soft =  // (K, pixel tiles)
      at::empty({candidates, pixel_tiles}, image.options().dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(),
                                  "dynamic_mask_scores_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(num_tiles),
                    static_cast<unsigned>(std::min(pixel_tiles, kMaxGridY)));
    scores_partials_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        gathered.const_data_ptr<scalar_t>(), feats.const_data_ptr<scalar_t>(),
        tile_image.const_data_ptr<int64_t>(), tile_begin.const_data_ptr<int64_t>(),
        tile_end.const_data_ptr<int64_t>(), order_contiguous.const_data_ptr<int64_t>(), channels,
        pixels, pixel_tiles, words, ms::threshold_as<scalar_t, acc_t>(threshold),
        partial_area.mutable_data_ptr<int32_t>(), partial_soft.mutable_data_ptr<double>(),
        pack_masks ? packed.mutable_data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Sums scattered back to the callers' order.
  cuda_scores::finalize_scores<int32_t>(partial_area, partial_soft,
                                        order_contiguous.const_data_ptr<int64_t>(), area,
                                        soft_sum, stream);
  return {area, soft_sum, packed};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CUDA, m) {
  m.impl("dynamic_mask_scores", &solo_fast::dynamic_mask_scores_cuda);
}
