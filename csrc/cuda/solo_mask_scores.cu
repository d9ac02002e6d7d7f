// CUDA kernel of solo_fast::solo_mask_scores (contract: csrc/solo_fast.cpp,
// solo_fast/ops/solo_mask_scores.py; per-pixel arithmetic: solo_mask_scores.h, shared with the
// C++ kernel). Nothing of size K x H x W is stored.
//
// Block (candidate k, tile of output rows) resizes and scores one tile of k's soft mask. The
// resize is separable (width first, then the two rows: solo_mask_scores.h), so a tile runs in
// three passes through shared memory, each over all the block's threads:
//   1. the band of source samples the tile reads, as probabilities (one sigmoid per sample, not
//      four per output pixel: a x4 level reads each sample for 16 pixels);
//   2. the width interpolation of every band row at the tile's output columns;
//   3. per output pixel, the two interpolated rows combined, rounded, thresholded and summed.
// The source indices and weights of the tile's rows and columns are computed once per tile. The
// host sizes tiles so that a tile's band fits kSmemBudget (whole output rows unless one row's band
// would not fit) and there are enough blocks to fill the GPU. Candidates of one image share its
// maps, which blocks re-read from L2. Each block writes one partial; a second kernel adds a
// candidate's partials in a fixed order (mask_scores_common.cuh): bitwise reproducible.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <tuple>

#include "cuda/dice_reduce.cuh"
#include "cuda/mask_scores_common.cuh"
#include "op_checks.h"
#include "solo_mask_scores.h"

// N=images, Q=channels of the level, K=candidates, h, w=source map, H, W=output map

namespace solo_fast {
namespace {

namespace ms = ::solo_fast::mask_scores;

using cuda_dice::ceil_div;
using cuda_dice::kThreads;

// Shared memory per block: 8 blocks of 256 threads (a full H100 SM) take 192 KB of its 228 KB;
// an A100 (164 KB) runs 6.
constexpr size_t kSmemBudget = 24 * 1024;
// Below a few thousand pixels per tile the taps, the band's edges, the barriers and the partial
// write start to dominate.
constexpr int64_t kMinTilePixels = 4096;
// CUDA limits grid axis y to 65535 blocks; more tiles are walked grid-stride.
constexpr int64_t kMaxGridY = 65535;

template <typename acc_t>
using Tap = ms::BilinearTap<acc_t>;

// Where the tiles lie and how much shared memory a tile's band may take (host-chosen).
struct Tiling {
  int tile_h;    // output rows per tile
  int tile_w;    // output columns per tile (W unless a row's band would not fit)
  int band_h;    // the most source rows any tile reads
  int band_w;    // the most source columns any tile reads
  int tiles_x;   // tiles across a row of the output
  int64_t tiles; // tiles per candidate
};

// Thread t's walk over the elements t, t + kThreads, ... of a block of rows of `width` elements,
// as (row, col): one division at the start, none per step.
struct Walk {
  int row;
  int col;
  int step_rows;
  int step_cols;
  int width;
  __device__ explicit Walk(int w)
      : row(static_cast<int>(threadIdx.x) / w), col(static_cast<int>(threadIdx.x) % w),
        step_rows(kThreads / w), step_cols(kThreads % w), width(w) {}
  __device__ void next() {
    row += step_rows;
    col += step_cols;
    if (col >= width) {
      col -= width;
      ++row;
    }
  }
};

template <typename acc_t>
size_t tile_smem_bytes(int tile_h, int tile_w, int band_h, int band_w) {
  return sizeof(Tap<acc_t>) * (static_cast<size_t>(tile_h) + tile_w) +
         sizeof(acc_t) * static_cast<size_t>(band_h) * (static_cast<size_t>(band_w) + tile_w);
}

// Block (k, j) scores tiles j, j + gridDim.y, ... of candidate k into partial_*[k][j].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) solo_scores_partials_kernel(
    const scalar_t* __restrict__ preds, const int64_t* __restrict__ image,
    const int64_t* __restrict__ channel, int64_t channels, int in_h, int in_w, int out_h,
    int out_w, Tiling tiling, acc_t threshold, bool logits, int64_t* __restrict__ partial_area,
    double* __restrict__ partial_soft) {
  // Carved as: row taps [tile_h], column taps [tile_w], band [band_h][band_w] (probabilities),
  // rows [band_h][tile_w] (the band's rows interpolated at the tile's columns).
  extern __shared__ __align__(16) unsigned char smem[];
  Tap<acc_t>* taps_y = reinterpret_cast<Tap<acc_t>*>(smem);
  Tap<acc_t>* taps_x = taps_y + tiling.tile_h;
  acc_t* band = reinterpret_cast<acc_t*>(taps_x + tiling.tile_w);
  acc_t* rows = band + static_cast<int64_t>(tiling.band_h) * tiling.band_w;

  const int64_t k = blockIdx.x;
  const scalar_t* map = preds + (image[k] * channels + channel[k]) * in_h * in_w;  // (h, w)
  long long inside = 0;
  double sum = 0.0;
  for (int64_t t = blockIdx.y; t < tiling.tiles; t += gridDim.y) {
    const int y0 = static_cast<int>(t / tiling.tiles_x) * tiling.tile_h;
    const int x0 = static_cast<int>(t % tiling.tiles_x) * tiling.tile_w;
    const int th = min(tiling.tile_h, out_h - y0);
    const int tw = min(tiling.tile_w, out_w - x0);
    for (int i = threadIdx.x; i < th + tw; i += kThreads) {
      if (i < th) {
        taps_y[i] = ms::bilinear_tap<scalar_t, acc_t>(in_h, out_h, y0 + i);
      } else {
        taps_x[i - th] = ms::bilinear_tap<scalar_t, acc_t>(in_w, out_w, x0 + i - th);
      }
    }
    __syncthreads();
    // Source indices grow with the output coordinate: the band runs from the first tap's i0 to
    // the last one's i1 (at most band_h x band_w: the host measured every tile).
    const int row0 = taps_y[0].i0;
    const int col0 = taps_x[0].i0;
    const int bh = taps_y[th - 1].i1 - row0 + 1;
    const int bw = taps_x[tw - 1].i1 - col0 + 1;
    for (Walk e(bw); e.row < bh; e.next()) {
      const acc_t v = static_cast<acc_t>(map[static_cast<int64_t>(row0 + e.row) * in_w + col0 +
                                             e.col]);
      band[e.row * bw + e.col] = ms::source_prob<scalar_t>(v, logits);
    }
    __syncthreads();
    for (Walk e(tw); e.row < bh; e.next()) {
      const Tap<acc_t> x = taps_x[e.col];
      const acc_t* source_row = band + e.row * bw;
      rows[e.row * tw + e.col] =
          ms::lerp(source_row[x.i0 - col0], x.l0, source_row[x.i1 - col0], x.l1);
    }
    __syncthreads();
    for (Walk e(tw); e.row < th; e.next()) {
      const Tap<acc_t> y = taps_y[e.row];
      const acc_t s = ms::round_to<scalar_t>(ms::lerp(rows[(y.i0 - row0) * tw + e.col], y.l0,
                                                      rows[(y.i1 - row0) * tw + e.col], y.l1));
      inside += ms::in_mask(s, threshold) ? 1 : 0;
      sum += static_cast<double>(ms::masked_value(s, threshold));
    }
    __syncthreads();  // the next tile overwrites the taps and the band
  }
  cuda_scores::store_block_partial(inside, sum, k * gridDim.y + blockIdx.y, partial_area,
                                   partial_soft);
}

// The most source samples, along one axis resized from `in` to `out`, that a tile of `tile`
// output samples reads: the taps are exactly the kernel's (the shared math runs on the host too).
template <typename scalar_t, typename acc_t>
int band_extent(int in, int out, int tile) {
  int widest = 0;
  for (int64_t first = 0; first < out; first += tile) {
    const int last = static_cast<int>(std::min<int64_t>(first + tile, out)) - 1;
    widest = std::max(widest, ms::bilinear_tap<scalar_t, acc_t>(in, out, last).i1 -
                                  ms::bilinear_tap<scalar_t, acc_t>(in, out, first).i0 + 1);
  }
  return widest;
}

template <typename scalar_t, typename acc_t>
Tiling choose_tiling(int in_h, int in_w, int out_h, int out_w, int64_t candidates, int64_t sms) {
  Tiling t{};
  const int single_row_band = band_extent<scalar_t, acc_t>(in_h, out_h, 1);
  t.tile_w = out_w;
  t.band_w = band_extent<scalar_t, acc_t>(in_w, out_w, t.tile_w);
  while (t.tile_w > 1 &&
         tile_smem_bytes<acc_t>(1, t.tile_w, single_row_band, t.band_w) > kSmemBudget) {
    t.tile_w = (t.tile_w + 1) / 2;
    t.band_w = band_extent<scalar_t, acc_t>(in_w, out_w, t.tile_w);
  }
  t.tiles_x = static_cast<int>(ceil_div(out_w, t.tile_w));
  // Four blocks per SM when there are few candidates, but never tiles under kMinTilePixels.
  const int64_t row_tiles_wanted = ceil_div(ceil_div(4 * sms, candidates), t.tiles_x);
  int64_t tile_h = std::max(ceil_div(out_h, row_tiles_wanted), ceil_div(kMinTilePixels, t.tile_w));
  t.tile_h = static_cast<int>(std::min<int64_t>(tile_h, out_h));
  t.band_h = band_extent<scalar_t, acc_t>(in_h, out_h, t.tile_h);
  while (t.tile_h > 1 &&
         tile_smem_bytes<acc_t>(t.tile_h, t.tile_w, t.band_h, t.band_w) > kSmemBudget) {
    t.tile_h -= std::max(1, t.tile_h / 16);
    t.band_h = band_extent<scalar_t, acc_t>(in_h, out_h, t.tile_h);
  }
  t.tiles = ceil_div(out_h, t.tile_h) * t.tiles_x;
  return t;
}

std::tuple<at::Tensor, at::Tensor> solo_mask_scores_cuda(
    const at::Tensor& preds_in, const at::Tensor& image_in, const at::Tensor& channel_in,
    int64_t out_height, int64_t out_width, double threshold, bool logits, bool check_index) {
  constexpr const char* kOp = "solo_mask_scores";
  TORCH_CHECK(preds_in.is_cuda(), kOp, ": mask_preds must be a CUDA tensor, got one on ",
              preds_in.device());
  check_solo_mask_scores_inputs(preds_in, image_in, channel_in, out_height, out_width,
                                check_index, kOp);
  const c10::cuda::CUDAGuard guard(preds_in.device());
  const int64_t candidates = image_in.size(0);
  TORCH_CHECK(candidates <= INT_MAX, kOp, ": at most ", INT_MAX, " candidates, got ",
              candidates);
  at::Tensor area = at::zeros({candidates}, image_in.options());
  at::Tensor soft_sum = at::zeros({candidates}, image_in.options().dtype(at::kDouble));
  if (candidates == 0) return {area, soft_sum};
  const int64_t channels = preds_in.size(1);
  const at::Tensor preds = preds_in.contiguous();  // (N, Q, h, w)
  const at::Tensor image = image_in.contiguous();
  const at::Tensor channel = channel_in.contiguous();
  // The checks above bound every size by INT_MAX.
  const int in_h = static_cast<int>(preds.size(2));
  const int in_w = static_cast<int>(preds.size(3));
  const int out_h = static_cast<int>(out_height);
  const int out_w = static_cast<int>(out_width);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor partial_area;
  at::Tensor partial_soft;
  int64_t chunks = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, preds.scalar_type(),
                                  "solo_mask_scores_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tiling tiling =
        choose_tiling<scalar_t, acc_t>(in_h, in_w, out_h, out_w, candidates, sms);
    const size_t smem =
        tile_smem_bytes<acc_t>(tiling.tile_h, tiling.tile_w, tiling.band_h, tiling.band_w);
    chunks = std::min(tiling.tiles, kMaxGridY);
    partial_area = at::empty({candidates, chunks}, image.options());  // (K, chunks)
    partial_soft = at::empty({candidates, chunks}, image.options().dtype(at::kDouble));
    const dim3 grid(static_cast<unsigned>(candidates), static_cast<unsigned>(chunks));
    solo_scores_partials_kernel<scalar_t, acc_t><<<grid, kThreads, smem, stream>>>(
        preds.const_data_ptr<scalar_t>(), image.const_data_ptr<int64_t>(),
        channel.const_data_ptr<int64_t>(), channels, in_h, in_w, out_h, out_w, tiling,
        ms::threshold_as<scalar_t, acc_t>(threshold), logits,
        partial_area.mutable_data_ptr<int64_t>(), partial_soft.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  cuda_scores::finalize_scores<int64_t>(partial_area, partial_soft, nullptr, area, soft_sum,
                                          stream);
  return {area, soft_sum};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CUDA, m) {
  m.impl("solo_mask_scores", &solo_fast::solo_mask_scores_cuda);
}
