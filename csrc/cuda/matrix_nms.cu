// CUDA kernels of solo_fast::matrix_nms_pack / matrix_nms_decay (contract: csrc/solo_fast.cpp,
// solo_fast/ops/matrix_nms.py; per-pair arithmetic: matrix_nms.h, shared with the CPU kernel and
// mirrored operation for operation by kernels/matrix_nms.py).
//
// Pack: a warp turns 64 pixels into one word with two ballots (32 coalesced bytes each).
//
// Decay: only pairs of one segment and one label interact, so the candidates are first put in
// (segment, label) order by two stable sorts, which keep the score order inside each group; a
// group is then a contiguous run of "positions" and the work is the sum of its triangles. Then:
//   1. word ranges: a warp per position finds the first and one-past-last nonzero word of its
//      mask, so that pairs AND only the words where both masks can have pixels;
//   2. IoU: a block owns a 32 x 32 tile of the position x position matrix (upper triangle only;
//      other tiles, and tiles whose columns all start their groups after the tile's last row,
//      return at once). Its 256 threads stage 32 words of the 32 row masks and 32 column masks
//      in shared memory per step; thread (tx, ty) popcounts the ANDs of column tx with rows ty,
//      ty + 8, ty + 16, ty + 24. iou is stored for the pairs i < j of one group; no other entry
//      of the n x n buffer is written or read (n = 500: 1 MB in float32);
//   3. compensation: a block owns 32 columns; its 8 warps walk the rows of the columns' groups
//      (one row per warp per step, 32 coalesced columns), each keeping a max; the 8 partial
//      maxima are combined in shared memory, and f(comp_j) is stored;
//   4. decay: likewise the min of f(iou_ij) / f(comp_i), scattered to the input rows.
// No atomics, and every output element written by one thread; min and max do not depend on the
// order of their operands (a NaN wins either way), so the result is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cummax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/where.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <utility>

#include "matrix_nms.h"
#include "op_checks.h"

// n=candidates of all segments, B=segments (images), P=H*W pixels of a mask,
// Wd=ceil(P / 64) packed words; a "position" indexes the (segment, label)-grouped order

namespace solo_fast {
namespace {

namespace mnms = ::solo_fast::matrix_nms;

constexpr int kWarp = 32;
// Pack and word ranges: 8 warps per block.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;
// IoU: kTile x kTile positions per block, kStageWords words of each mask per shared-memory stage;
// a thread owns kTile / kWarps pairs of one column.
constexpr int kTile = 32;
constexpr int kStageWords = 32;
constexpr int kPairsPerThread = kTile / kWarps;
// CUDA limits grid axes y and z to 65535 blocks.
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block (chunk, rows): warp-sized strides over words of rows blockIdx.y, blockIdx.y + gridDim.y,
// ...; lane l holds pixels 64 w + l and 64 w + 32 + l. The loop bounds are uniform per warp, so
// every lane takes part in every ballot.
__global__ void __launch_bounds__(kThreads) pack_kernel(const uint8_t* __restrict__ masks,
                                                        int64_t n, int64_t pixels, int64_t words,
                                                        int64_t* __restrict__ packed) {
  const int lane = threadIdx.x % kWarp;
  const int64_t first_warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp;
  const int64_t warp_stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = blockIdx.y; row < n; row += gridDim.y) {
    const uint8_t* mask = masks + row * pixels;
    for (int64_t w = first_warp; w < words; w += warp_stride) {
      const int64_t low_pixel = w * mnms::kWordBits + lane;
      const int64_t high_pixel = low_pixel + kWarp;
      const unsigned low = __ballot_sync(0xffffffffu, low_pixel < pixels && mask[low_pixel] != 0);
      const unsigned high =
          __ballot_sync(0xffffffffu, high_pixel < pixels && mask[high_pixel] != 0);
      if (lane == 0) {
        packed[row * words + w] =
            static_cast<int64_t>((static_cast<uint64_t>(high) << 32) | static_cast<uint64_t>(low));
      }
    }
  }
}

// A warp per position: first[p] = first nonzero word of its mask (Wd if empty), end[p] = last
// nonzero word + 1 (0 if empty).
__global__ void __launch_bounds__(kThreads) word_range_kernel(
    const uint64_t* __restrict__ packed, const int64_t* __restrict__ order, int64_t n,
    int64_t words, int* __restrict__ first, int* __restrict__ end) {
  const int64_t position = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / kWarp;
  if (position >= n) return;  // uniform per warp: the shuffles below see full warps
  const int lane = threadIdx.x % kWarp;
  const uint64_t* mask = packed + order[position] * words;
  int lo = static_cast<int>(words);
  int hi = 0;
  for (int64_t w = lane; w < words; w += kWarp) {
    if (mask[w] != 0) {
      lo = min(lo, static_cast<int>(w));
      hi = static_cast<int>(w) + 1;  // ascending w: the last one wins
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    lo = min(lo, __shfl_xor_sync(0xffffffffu, lo, offset));
    hi = max(hi, __shfl_xor_sync(0xffffffffu, hi, offset));
  }
  if (lane == 0) {
    first[position] = lo;
    end[position] = hi;
  }
}

// Block (column tile blockIdx.x, row tile blockIdx.y), threads (tx = column, ty = row phase).
template <typename scalar_t>
__global__ void __launch_bounds__(kTile * kWarps) iou_kernel(
    const uint64_t* __restrict__ packed, const int64_t* __restrict__ order,
    const int* __restrict__ group_start, const int* __restrict__ first,
    const int* __restrict__ end, const scalar_t* __restrict__ area, int64_t n, int64_t words,
    scalar_t* __restrict__ iou) {
  // +1 word per row: lanes reading one word of 32 different columns hit different banks.
  __shared__ uint64_t row_words[kTile][kStageWords + 1];
  __shared__ uint64_t col_words[kTile][kStageWords + 1];
  __shared__ int64_t row_base[kTile];
  __shared__ int64_t col_base[kTile];
  __shared__ int word_range[2];

  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t row_last = min(row0 + kTile, n) - 1;
  const int64_t col_last = min(col0 + kTile, n) - 1;
  // Block-uniform exits, before any barrier: a tile below the diagonal, or one whose columns all
  // belong to groups that start after its last row (group_start is non-decreasing).
  if (blockIdx.y > blockIdx.x || group_start[col0] > row_last) return;

  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int tid = ty * kTile + tx;
  if (ty == 0) {
    // Row i takes part in a pair iff j = max(col0, i + 1) is in the tile and in i's group (a
    // later column of another group cannot be in i's); column j iff i = min(row_last, j - 1) is
    // in the tile and in j's group. The word range of the tile is where a used row and a used
    // column can both have pixels.
    const int64_t i = row0 + tx;
    const int64_t j = col0 + tx;
    int row_lo = static_cast<int>(words), row_hi = 0, col_lo = static_cast<int>(words), col_hi = 0;
    if (i <= row_last) {
      const int64_t mate = max(col0, i + 1);
      if (mate <= col_last && group_start[mate] == group_start[i]) {
        row_lo = first[i];
        row_hi = end[i];
      }
      row_base[tx] = order[i] * words;
    } else {
      row_base[tx] = -1;
    }
    if (j <= col_last) {
      const int64_t mate = min(row_last, j - 1);
      if (mate >= row0 && group_start[mate] == group_start[j]) {
        col_lo = first[j];
        col_hi = end[j];
      }
      col_base[tx] = order[j] * words;
    } else {
      col_base[tx] = -1;
    }
#pragma unroll
    for (int offset = kWarp / 2; offset > 0; offset /= 2) {
      row_lo = min(row_lo, __shfl_xor_sync(0xffffffffu, row_lo, offset));
      row_hi = max(row_hi, __shfl_xor_sync(0xffffffffu, row_hi, offset));
      col_lo = min(col_lo, __shfl_xor_sync(0xffffffffu, col_lo, offset));
      col_hi = max(col_hi, __shfl_xor_sync(0xffffffffu, col_hi, offset));
    }
    if (tx == 0) {
      word_range[0] = max(row_lo, col_lo);
      word_range[1] = min(row_hi, col_hi);
    }
  }
  __syncthreads();
  const int lo = word_range[0];
  const int hi = word_range[1];

  int inter[kPairsPerThread] = {};
  for (int stage = lo; stage < hi; stage += kStageWords) {
    // 2 x 32 x 32 words per stage, 8 per thread; a warp reads 32 consecutive words of one mask.
#pragma unroll
    for (int e = 0; e < kTile * kStageWords / (kTile * kWarps); ++e) {
      const int index = tid + e * kTile * kWarps;
      const int r = index / kStageWords;
      const int k = index % kStageWords;
      const int w = stage + k;
      row_words[r][k] = (w < hi && row_base[r] >= 0) ? packed[row_base[r] + w] : 0;
      col_words[r][k] = (w < hi && col_base[r] >= 0) ? packed[col_base[r] + w] : 0;
    }
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kStageWords; ++k) {
      const uint64_t column = col_words[tx][k];
#pragma unroll
      for (int r = 0; r < kPairsPerThread; ++r) {
        inter[r] += __popcll(row_words[ty + r * kWarps][k] & column);
      }
    }
    __syncthreads();
  }

  const int64_t j = col0 + tx;
  if (j > col_last) return;
  const int group = group_start[j];
  const scalar_t area_j = area[j];
#pragma unroll
  for (int r = 0; r < kPairsPerThread; ++r) {
    const int64_t i = row0 + ty + r * kWarps;
    if (i < j && group_start[i] == group) {
      iou[i * n + j] = mnms::iou<scalar_t>(inter[r], area[i], area_j);
    }
  }
}

// Block (column tile), threads (tx = column, ty = row phase): thread (tx, ty) folds rows
// group_start[j] + ty, + kWarps, + 2 kWarps, ... below j of column j = 32 blockIdx.x + tx; the
// row phases are then folded in shared memory. COMPENSATION: comp_j = max(0, iou_ij), stored as
// f(comp_j); otherwise min(1, f(iou_ij) / f(comp_i)), stored at the input row of j.
template <typename scalar_t, bool COMPENSATION>
__global__ void __launch_bounds__(kTile * kWarps) column_kernel(
    const scalar_t* __restrict__ iou, const int* __restrict__ group_start,
    const scalar_t* __restrict__ f_comp_in, const int64_t* __restrict__ order, int64_t n,
    int64_t kernel, scalar_t neg_sigma, scalar_t* __restrict__ out) {
  __shared__ scalar_t partial[kWarps][kTile];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kTile + tx;
  scalar_t value = COMPENSATION ? scalar_t(0) : scalar_t(1);
  if (j < n) {
    for (int64_t i = group_start[j] + ty; i < j; i += kWarps) {
      const scalar_t x = iou[i * n + j];
      if (COMPENSATION) {
        value = mnms::max_nan(value, x);
      } else {
        value = mnms::min_nan(
            value, mnms::ratio(mnms::kernel_value(x, kernel, neg_sigma), f_comp_in[i], kernel));
      }
    }
  }
  partial[ty][tx] = value;
  __syncthreads();
  if (ty != 0 || j >= n) return;
#pragma unroll
  for (int phase = 1; phase < kWarps; ++phase) {
    value = COMPENSATION ? mnms::max_nan(value, partial[phase][tx])
                         : mnms::min_nan(value, partial[phase][tx]);
  }
  if (COMPENSATION) {
    out[j] = mnms::kernel_value(value, kernel, neg_sigma);
  } else {
    out[order[j]] = value;
  }
}

// (order (n,) int64, group_start (n,) int32): order[p] is the input row at position p, positions
// grouped by (segment, label) with ascending rows (descending scores) inside each group;
// group_start[p] is the first position of p's group.
std::pair<at::Tensor, at::Tensor> group_positions(const at::Tensor& labels,
                                                  const at::Tensor& segments) {
  const int64_t n = labels.size(0);
  const at::Tensor positions = at::arange(n, labels.options());  // (n,)
  const at::Tensor segment = at::searchsorted(segments.slice(0, 1).contiguous(), positions,
                                              /*out_int32=*/false, /*right=*/true);  // (n,)
  // Two stable sorts: by label, then by segment.
  const at::Tensor by_label = std::get<1>(at::sort(labels, /*stable=*/true, 0, false));
  const at::Tensor by_segment =
      std::get<1>(at::sort(segment.index_select(0, by_label), /*stable=*/true, 0, false));
  const at::Tensor order = by_label.index_select(0, by_segment).contiguous();  // (n,)
  const at::Tensor sorted_segment = segment.index_select(0, order);
  const at::Tensor sorted_label = labels.index_select(0, order);
  at::Tensor starts = at::ones({n}, labels.options().dtype(at::kBool));  // (n,)
  if (n > 1) {
    starts.slice(0, 1).copy_(sorted_segment.slice(0, 1).ne(sorted_segment.slice(0, 0, n - 1))
                                 .logical_or_(sorted_label.slice(0, 1).ne(
                                     sorted_label.slice(0, 0, n - 1))));
  }
  const at::Tensor group_start =
      std::get<0>(at::cummax(at::where(starts, positions, 0), 0)).to(at::kInt).contiguous();
  return {order, group_start};
}

at::Tensor matrix_nms_pack_cuda(const at::Tensor& masks_in) {
  constexpr const char* kOp = "matrix_nms_pack";
  check_matrix_nms_pack_inputs(masks_in, kOp);
  TORCH_CHECK(masks_in.is_cuda(), kOp, ": masks must be a CUDA tensor, got one on ",
              masks_in.device());
  const c10::cuda::CUDAGuard guard(masks_in.device());
  const at::Tensor masks = masks_in.contiguous();  // (n, H, W)
  const int64_t n = masks.size(0);
  const int64_t pixels = masks.size(1) * masks.size(2);
  const int64_t words = ceil_div(pixels, mnms::kWordBits);
  at::Tensor packed = at::empty({n, words}, masks.options().dtype(at::kLong));  // (n, Wd)
  if (n == 0 || words == 0) return packed;
  // Enough warps for a few thousand blocks in all; a row's words are shared by its blocks.
  const int64_t chunks = std::min<int64_t>(ceil_div(words, kWarps), std::max<int64_t>(
      1, ceil_div(2048, std::min(n, kMaxGridY))));
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(std::min(n, kMaxGridY)));
  // bool and uint8 share one byte layout; a bool byte is 0 or 1.
  pack_kernel<<<grid, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      static_cast<const uint8_t*>(masks.const_data_ptr()), n, pixels, words,
      packed.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return packed;
}

at::Tensor matrix_nms_decay_cuda(const at::Tensor& packed_in, const at::Tensor& labels_in,
                                 const at::Tensor& areas_in, const at::Tensor& segments_in,
                                 int64_t kernel, double sigma) {
  constexpr const char* kOp = "matrix_nms_decay";
  check_matrix_nms_decay_inputs(packed_in, labels_in, areas_in, segments_in, kernel, kOp);
  TORCH_CHECK(packed_in.is_cuda(), kOp, ": packed must be a CUDA tensor, got one on ",
              packed_in.device());
  const c10::cuda::CUDAGuard guard(packed_in.device());
  const int64_t n = packed_in.size(0);
  const int64_t words = packed_in.size(1);
  // Segment offsets are not read on the host (a synchronisation): offsets that do not partition
  // [0, n) give a wrong grouping, but searchsorted keeps every index in range.
  at::Tensor decay = at::empty({n}, areas_in.options());  // (n,)
  if (n == 0) return decay;
  TORCH_CHECK(n <= kMaxGridY * kTile, kOp, ": at most ", kMaxGridY * kTile,
              " candidates per call, got ", n);
  TORCH_CHECK(words <= INT_MAX, kOp, ": at most ", INT_MAX, " words per mask, got ", words);
  const at::Tensor packed = packed_in.contiguous();  // (n, Wd)
  const std::pair<at::Tensor, at::Tensor> groups =
      group_positions(labels_in.contiguous(), segments_in);
  const at::Tensor& order = groups.first;         // (n,) int64
  const at::Tensor& group_start = groups.second;  // (n,) int32
  const at::Tensor area = areas_in.index_select(0, order).contiguous();  // (n,) per position
  const auto int_options = packed.options().dtype(at::kInt);
  at::Tensor first = at::empty({n}, int_options);  // (n,)
  at::Tensor end = at::empty({n}, int_options);    // (n,)
  // Only the entries of pairs i < j of one group are written, and only those are read.
  at::Tensor iou = at::empty({n, n}, areas_in.options());  // (n, n)
  at::Tensor f_comp = at::empty({n}, areas_in.options());  // (n,)
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const uint64_t* packed_words = static_cast<const uint64_t*>(packed.const_data_ptr());

  word_range_kernel<<<static_cast<unsigned>(ceil_div(n, kWarps)), kThreads, 0, stream>>>(
      packed_words, order.const_data_ptr<int64_t>(), n, words, first.mutable_data_ptr<int>(),
      end.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const unsigned tiles = static_cast<unsigned>(ceil_div(n, kTile));
  const dim3 block(kTile, kWarps);
  AT_DISPATCH_FLOATING_TYPES(areas_in.scalar_type(), "matrix_nms_decay_cuda", [&] {
    // -sigma rounded to the compute dtype, as torch rounds the reference's Python scalar.
    const scalar_t neg_sigma = static_cast<scalar_t>(-sigma);
    iou_kernel<scalar_t><<<dim3(tiles, tiles), block, 0, stream>>>(
        packed_words, order.const_data_ptr<int64_t>(), group_start.const_data_ptr<int>(),
        first.const_data_ptr<int>(), end.const_data_ptr<int>(), area.const_data_ptr<scalar_t>(),
        n, words, iou.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_kernel<scalar_t, true><<<tiles, block, 0, stream>>>(
        iou.const_data_ptr<scalar_t>(), group_start.const_data_ptr<int>(), nullptr, nullptr, n,
        kernel, neg_sigma, f_comp.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    column_kernel<scalar_t, false><<<tiles, block, 0, stream>>>(
        iou.const_data_ptr<scalar_t>(), group_start.const_data_ptr<int>(),
        f_comp.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), n, kernel, neg_sigma,
        decay.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return decay;
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CUDA, m) {
  m.impl("matrix_nms_pack", &solo_fast::matrix_nms_pack_cuda);
  m.impl("matrix_nms_decay", &solo_fast::matrix_nms_decay_cuda);
}
