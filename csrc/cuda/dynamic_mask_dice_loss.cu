// CUDA kernels of solo_fast::dynamic_mask_dice_loss_forward / _backward (contract:
// csrc/solo_fast.cpp, solo_fast/ops/dynamic_mask_dice_loss.py). SOLOv2's dynamic 1x1 convolution
// z_k = kernels[k] . mask_feats[pos_image[k]] fused with the dice loss of sigmoid(z_k); the K x P
// logits are never stored. The per-element math comes from dice_loss.h (as the CPU kernel).
//
// All three kernels form logit tiles the same way (logits_tile): a shared-memory tiled GEMM of a
// block of kRows positives of ONE image by a tile of kCols pixels, the E channels walked in chunks
// of kDepth through shared memory, each of the kThreads threads holding 2 x 4 logits in registers.
// Positives come in any order: the host sorts them stably by image with ATen ops and cuts each
// image's run into blocks of kRows (positive_blocks), so a block's rows share one feature map.
//
// Forward: block (positive block, chunk of pixels); the epilogue takes the sigmoid and sums a, b,
// c per row in registers, then over the 16 threads of a row by shuffles, and writes one partial per
// (positive, chunk); cuda_dice::finalize_kernel sums the partials in double in a fixed order.
//
// Backward, mask features: block (image, pixel tile) owns grad_mask_feats[n, :, tile]: it runs over
// ALL the image's positives (ascending k), recomputes their logit tile, puts dL/dz in shared memory
// and adds kernels^T . dL/dz to its tile. Each output element belongs to one thread of one block,
// which reads and writes it in a fixed order: no atomics, no races.
// Backward, kernels: block (positive block, chunk of pixels) adds dL/dz . mask_feats^T of each of
// its tiles to a partial (positive, chunk, E) that only it touches; ATen sums the chunks in double.
//
// float32 and float64 inputs run their own instantiations (float64 accumulates in float64).
// float16 / bfloat16: the forward reads them directly and accumulates in float32; the backward runs
// the float32 kernels on float32 copies (its 16-bit instantiations spilled around the division).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/div.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <tuple>
#include <utility>

#include "cuda/dice_reduce.cuh"
#include "dice_loss.h"
#include "op_checks.h"

// N=images, E=mask-feature channels, P=pixels of the mask map (H*W), K=positives,
// B=blocks of positives (each within one image), C=chunks of pixels

namespace solo_fast {
namespace {

namespace dl = ::solo_fast::dice_loss;

using cuda_dice::ceil_div;
using cuda_dice::kThreads;
using cuda_dice::kWarps;

// The logit tile: kRows positives x kCols pixels; thread (ty, tx) = (tid / 16, tid % 16) holds
// rows ty + 16 i (i < 2) and columns tx + 16 j (j < 4), so a row's 16 threads sit in one half-warp.
constexpr int kRows = 32;
constexpr int kCols = 64;
constexpr int kDepth = 16;      // channels per shared-memory step of the logit GEMM
constexpr int kSlab = 32;       // channels per shared-memory step of the gradient products
constexpr int kRowsPerThread = kRows / 16;
constexpr int kColsPerThread = kCols / 16;
static_assert(kThreads == 256, "the tile layout assumes 16 x 16 threads");
// Below this many pixels per block the per-block setup and partial writes start to dominate.
constexpr int64_t kMinChunk = 1024;
// CUDA limits grid axis y to 65535 blocks.
constexpr int64_t kMaxGridY = 65535;

template <typename acc_t>
struct TileBuffers {
  acc_t w[kDepth][kRows + 1];  // kernels^T chunk; +1: the column-wise fill hits 16 banks
  acc_t f[kDepth][kCols];      // mask-feature chunk
};

// z[i][j] = logit of row ty + 16 i, pixel tile_begin + tx + 16 j. Rows >= count, channels >= e
// and pixels >= p read as 0. positive[r] (shared) is the kernel row of tile row r. Every thread of
// the block must call it (it synchronises).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void logits_tile(
    const scalar_t* __restrict__ kernels, const scalar_t* __restrict__ image_feats,
    const int64_t* positive, int count, int64_t e, int64_t p, int64_t tile_begin,
    TileBuffers<acc_t>& buf, acc_t (&z)[kRowsPerThread][kColsPerThread]) {
  const int tid = threadIdx.x;
  const int ty = tid / 16;
  const int tx = tid % 16;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) z[i][j] = acc_t(0);
  }
  for (int64_t e0 = 0; e0 < e; e0 += kDepth) {
    // Consecutive threads read consecutive channels of one kernel row.
#pragma unroll
    for (int u = 0; u < kDepth * kRows / kThreads; ++u) {
      const int idx = tid + u * kThreads;
      const int d = idx % kDepth;
      const int r = idx / kDepth;
      const int64_t channel = e0 + d;
      buf.w[d][r] = (r < count && channel < e)
                        ? static_cast<acc_t>(kernels[positive[r] * e + channel])
                        : acc_t(0);
    }
    // Consecutive threads read consecutive pixels of one channel.
#pragma unroll
    for (int u = 0; u < kDepth * kCols / kThreads; ++u) {
      const int idx = tid + u * kThreads;
      const int d = idx / kCols;
      const int c = idx % kCols;
      const int64_t channel = e0 + d;
      const int64_t q = tile_begin + c;
      buf.f[d][c] = (channel < e && q < p) ? static_cast<acc_t>(image_feats[channel * p + q])
                                           : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int d = 0; d < kDepth; ++d) {
      acc_t a[kRowsPerThread];
      acc_t b[kColsPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) a[i] = buf.w[d][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) b[j] = buf.f[d][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) z[i][j] += a[i] * b[j];
      }
    }
    __syncthreads();  // the next chunk overwrites the buffers
  }
}

// positive[r] = member[first + r] for r < count (0 beyond), in shared memory; synchronises.
__device__ __forceinline__ void load_positives(const int64_t* __restrict__ member, int64_t first,
                                               int count, int64_t* positive) {
  if (threadIdx.x < kRows) {
    positive[threadIdx.x] = static_cast<int>(threadIdx.x) < count ? member[first + threadIdx.x]
                                                                  : int64_t(0);
  }
  __syncthreads();
}

// Block (b, chunk): positives member[block_first[b] ...][: block_count[b]] of image
// block_image[b], pixels [chunk * chunk_size, min(p, (chunk + 1) * chunk_size)); writes
// partials[k][chunk][0..2] = a, b, c of each of its positives k.
template <typename scalar_t, typename acc_t, typename target_t>
__global__ void __launch_bounds__(kThreads) dmd_forward_kernel(
    const scalar_t* __restrict__ kernels, const scalar_t* __restrict__ feats,
    const int64_t* __restrict__ member, const int64_t* __restrict__ block_first,
    const int64_t* __restrict__ block_count, const int64_t* __restrict__ block_image,
    const target_t* __restrict__ target, int64_t e, int64_t p, int64_t chunk_size,
    acc_t* __restrict__ partials) {
  const int count = static_cast<int>(block_count[blockIdx.x]);
  if (count == 0) return;  // a spare block of the grid's bound; uniform over the block
  __shared__ int64_t positive[kRows];
  __shared__ TileBuffers<acc_t> buf;
  load_positives(member, block_first[blockIdx.x], count, positive);
  const scalar_t* image_feats = feats + block_image[blockIdx.x] * e * p;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk_size;
  const int64_t end = begin + chunk_size < p ? begin + chunk_size : p;
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;

  acc_t v[kRowsPerThread][3] = {};  // a, b, c of each of the thread's rows
  for (int64_t tile = begin; tile < end; tile += kCols) {
    acc_t z[kRowsPerThread][kColsPerThread];
    logits_tile(kernels, image_feats, positive, count, e, p, tile, buf, z);
#pragma unroll
    for (int i = 0; i < kRowsPerThread; ++i) {
      const int r = ty + 16 * i;
      if (r >= count) continue;
      const target_t* target_row = target + positive[r] * p;
#pragma unroll
      for (int j = 0; j < kColsPerThread; ++j) {
        const int64_t q = tile + tx + 16 * j;  // chunk_size is whole tiles: q < p means q < end
        if (q < p) {
          dl::accumulate(dl::probability(z[i][j], true), static_cast<acc_t>(target_row[q]),
                         v[i][0], v[i][1], v[i][2]);
        }
      }
    }
  }
  // A row's 16 threads are lanes (ty % 2) * 16 + 0..15 of one warp: a fixed butterfly.
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int m = 0; m < 3; ++m) {
#pragma unroll
      for (int offset = 8; offset > 0; offset /= 2) {
        v[i][m] += __shfl_xor_sync(0xffffffffu, v[i][m], offset);
      }
    }
    const int r = ty + 16 * i;
    if (tx == 0 && r < count) {
      acc_t* out = partials + (positive[r] * gridDim.y + blockIdx.y) * 3;
      out[0] = v[i][0];
      out[1] = v[i][1];
      out[2] = v[i][2];
    }
  }
}

// dL/dz of the thread's logit tile into grad_z (shared), 0 outside rows < count and pixels < p.
// The logits go to shared memory first and the gradient is formed in place by a loop that is not
// unrolled: few registers stay live across double's division subroutine, which otherwise spills.
template <typename acc_t, typename target_t>
__device__ __forceinline__ void store_grad_logits(
    const acc_t (&z)[kRowsPerThread][kColsPerThread], const int64_t* positive, int count,
    const target_t* __restrict__ target, const double* __restrict__ coef, int64_t p,
    int64_t tile_begin, acc_t (&grad_z)[kRows][kCols]) {
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kColsPerThread; ++j) grad_z[ty + 16 * i][tx + 16 * j] = z[i][j];
  }
  // Each thread rewrites only the elements it wrote: no barrier needed in between.
#pragma unroll 1
  for (int u = 0; u < kRowsPerThread * kColsPerThread; ++u) {
    const int r = ty + 16 * (u / kColsPerThread);
    const int c = tx + 16 * (u % kColsPerThread);
    const int64_t q = tile_begin + c;
    acc_t g = acc_t(0);
    if (r < count && q < p) {
      const int64_t k = positive[r];
      dl::GradCoefficients<acc_t> coefficients;
      coefficients.coef_p = static_cast<acc_t>(coef[2 * k]);
      coefficients.coef_t = static_cast<acc_t>(coef[2 * k + 1]);
      g = dl::grad_element(grad_z[r][c], static_cast<acc_t>(target[k * p + q]), coefficients,
                           true);
    }
    grad_z[r][c] = g;
  }
}

// Block image * tiles + tile: grad_feats[image, :, tile * kCols + 0..kCols) = sum over the image's
// positives k (ascending) of kernels[k] (x) dL_k/dz. Thread (ty, tx) owns channels
// slab + ty + 16 i (i < 2) x pixels tx + 16 j (j < 4) of each slab.
template <typename scalar_t, typename acc_t, typename target_t>
__global__ void __launch_bounds__(kThreads) dmd_backward_feats_kernel(
    const scalar_t* __restrict__ kernels, const scalar_t* __restrict__ feats,
    const int64_t* __restrict__ member, const int64_t* __restrict__ group_start,
    const target_t* __restrict__ target, const double* __restrict__ coef, int64_t tiles,
    int64_t e, int64_t p, acc_t* __restrict__ grad_feats) {
  __shared__ int64_t positive[kRows];
  __shared__ TileBuffers<acc_t> buf;
  __shared__ acc_t grad_z[kRows][kCols];
  __shared__ acc_t w_slab[kRows][kSlab];
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;
  const int64_t image = blockIdx.x / tiles;
  const int64_t tile = (blockIdx.x % tiles) * kCols;
  const int64_t first = group_start[image];
  const int64_t last = group_start[image + 1];
  if (first == last) {
    // No positive: exactly 0, without reading anything.
    acc_t* image_grad = grad_feats + image * e * p;
    for (int64_t idx = threadIdx.x; idx < e * kCols; idx += kThreads) {
      const int64_t q = tile + idx % kCols;
      if (q < p) image_grad[(idx / kCols) * p + q] = acc_t(0);
    }
    return;
  }
  for (int64_t block_begin = first; block_begin < last; block_begin += kRows) {
    const int count = static_cast<int>(last - block_begin < kRows ? last - block_begin : kRows);
    __syncthreads();  // the previous block's readers of positive and grad_z are done
    load_positives(member, block_begin, count, positive);
    acc_t z[kRowsPerThread][kColsPerThread];
    logits_tile(kernels, feats + image * e * p, positive, count, e, p, tile, buf, z);
    store_grad_logits(z, positive, count, target, coef, p, tile, grad_z);
    for (int64_t slab = 0; slab < e; slab += kSlab) {
      // Consecutive threads read consecutive channels of one kernel row.
#pragma unroll
      for (int u = 0; u < kRows * kSlab / kThreads; ++u) {
        const int idx = threadIdx.x + u * kThreads;
        const int r = idx / kSlab;
        const int64_t channel = slab + idx % kSlab;
        w_slab[r][idx % kSlab] = (r < count && channel < e)
                                     ? static_cast<acc_t>(kernels[positive[r] * e + channel])
                                     : acc_t(0);
      }
      __syncthreads();  // also publishes grad_z before its first use
#pragma unroll
      for (int i = 0; i < kSlab / 16; ++i) {
        const int64_t channel = slab + ty + 16 * i;
        acc_t sum[kColsPerThread] = {};
        for (int r = 0; r < count; ++r) {
          const acc_t w = w_slab[r][ty + 16 * i];
#pragma unroll
          for (int j = 0; j < kColsPerThread; ++j) sum[j] += w * grad_z[r][tx + 16 * j];
        }
#pragma unroll
        for (int j = 0; j < kColsPerThread; ++j) {
          const int64_t q = tile + tx + 16 * j;
          if (channel < e && q < p) {
            // Only this thread ever touches this element: read-modify-write in a fixed order.
            acc_t* out = grad_feats + (image * e + channel) * p + q;
            *out = (block_begin == first ? acc_t(0) : *out) + sum[j];
          }
        }
      }
      __syncthreads();  // the next slab overwrites w_slab
    }
  }
}

// Block (b, chunk) as the forward's: partials[k][chunk][0..e) = sum over the chunk's pixels of
// dL_k/dz * feats[image, :, pixel] for each of its positives k. Thread (ty, tx) owns rows
// ty + 16 i (i < 2) x channels slab + tx + 16 j (j < 2) of each slab.
template <typename scalar_t, typename acc_t, typename target_t>
__global__ void __launch_bounds__(kThreads) dmd_backward_kernels_kernel(
    const scalar_t* __restrict__ kernels, const scalar_t* __restrict__ feats,
    const int64_t* __restrict__ member, const int64_t* __restrict__ block_first,
    const int64_t* __restrict__ block_count, const int64_t* __restrict__ block_image,
    const target_t* __restrict__ target, const double* __restrict__ coef, int64_t e, int64_t p,
    int64_t chunk_size, acc_t* __restrict__ partials) {
  const int count = static_cast<int>(block_count[blockIdx.x]);
  if (count == 0) return;  // a spare block of the grid's bound; uniform over the block
  __shared__ int64_t positive[kRows];
  __shared__ TileBuffers<acc_t> buf;
  __shared__ acc_t grad_z[kRows][kCols];
  __shared__ acc_t f_slab[kSlab][kCols + 1];  // +1: threads of a warp read 16 different rows
  load_positives(member, block_first[blockIdx.x], count, positive);
  const scalar_t* image_feats = feats + block_image[blockIdx.x] * e * p;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * chunk_size;
  const int64_t end = begin + chunk_size < p ? begin + chunk_size : p;
  const int ty = threadIdx.x / 16;
  const int tx = threadIdx.x % 16;

  for (int64_t tile = begin; tile < end; tile += kCols) {
    acc_t z[kRowsPerThread][kColsPerThread];
    logits_tile(kernels, image_feats, positive, count, e, p, tile, buf, z);
    store_grad_logits(z, positive, count, target, coef, p, tile, grad_z);
    for (int64_t slab = 0; slab < e; slab += kSlab) {
      // Consecutive threads read consecutive pixels of one channel.
#pragma unroll
      for (int u = 0; u < kSlab * kCols / kThreads; ++u) {
        const int idx = threadIdx.x + u * kThreads;
        const int64_t channel = slab + idx / kCols;
        const int64_t q = tile + idx % kCols;
        f_slab[idx / kCols][idx % kCols] =
            (channel < e && q < p) ? static_cast<acc_t>(image_feats[channel * p + q]) : acc_t(0);
      }
      __syncthreads();  // also publishes grad_z before its first use
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
        const int r = ty + 16 * i;
        acc_t sum[kSlab / 16] = {};
        for (int c = 0; c < kCols; ++c) {
          const acc_t g = grad_z[r][c];
#pragma unroll
          for (int j = 0; j < kSlab / 16; ++j) sum[j] += g * f_slab[tx + 16 * j][c];
        }
        if (r < count) {
          acc_t* out = partials + (positive[r] * gridDim.y + blockIdx.y) * e;
#pragma unroll
          for (int j = 0; j < kSlab / 16; ++j) {
            const int64_t channel = slab + tx + 16 * j;
            // Only this thread ever touches this element: read-modify-write in a fixed order.
            if (channel < e) out[channel] = (tile == begin ? acc_t(0) : out[channel]) + sum[j];
          }
        }
      }
      __syncthreads();  // the next slab overwrites f_slab; the next tile grad_z
    }
  }
}

void check_inputs(const at::Tensor& kernels, const at::Tensor& feats, const at::Tensor& pos_image,
                  const at::Tensor& target, bool check_index, const char* op) {
  TORCH_CHECK(kernels.is_cuda(), op, ": kernels must be a CUDA tensor, got one on ",
              kernels.device());
  check_dynamic_mask_inputs(kernels, feats, pos_image, target, check_index, op);
}

// The positives grouped by image and cut into blocks of at most kRows, all on the device (as
// kernels/dynamic_mask_dice_loss.py's _positive_blocks): image n holds
// member[group_start[n] .. group_start[n + 1]) in ascending k (a stable sort); block b holds
// member[block_first[b] .. + block_count[b]), all of image block_image[b]. The grid bound
// B = ceil(K / kRows) + min(N, K) needs no device-to-host copy; spare blocks have count 0.
struct PositiveBlocks {
  at::Tensor member;       // (K,)
  at::Tensor group_start;  // (N + 1,)
  at::Tensor block_first;  // (B,)
  at::Tensor block_count;  // (B,)
  at::Tensor block_image;  // (B,)
};

PositiveBlocks positive_blocks(const at::Tensor& pos_image, int64_t images) {
  const int64_t positives = pos_image.size(0);
  const auto options = pos_image.options();
  auto [sorted_images, member] =
      at::sort(pos_image, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const at::Tensor group_start =
      at::searchsorted(sorted_images, at::arange(images + 1, options));  // (N + 1,)
  const at::Tensor blocks_per_image =  // (N,): ceil(count / kRows)
      at::div(group_start.slice(0, 1).sub(group_start.slice(0, 0, images)).add(kRows - 1),
              kRows, "floor");
  const at::Tensor block_end = at::cumsum(blocks_per_image, 0);  // (N,)
  const int64_t bound = ceil_div(positives, kRows) + std::min(images, positives);
  const at::Tensor blocks = at::arange(bound, options);  // (B,)
  // The image of block b is the first whose blocks end after b (N for the spare blocks).
  const at::Tensor image =
      at::searchsorted(block_end, blocks, /*out_int32=*/false, /*right=*/true);  // (B,)
  const at::Tensor real = image.lt(images);
  const at::Tensor block_image = image.clamp_max(images - 1);
  const at::Tensor image_first_block =
      block_end.index_select(0, block_image).sub(blocks_per_image.index_select(0, block_image));
  const at::Tensor first =
      group_start.index_select(0, block_image).add(blocks.sub(image_first_block).mul(kRows));
  const at::Tensor count =
      group_start.index_select(0, block_image.add(1)).sub(first).clamp_max(kRows);
  return {member.contiguous(), group_start.contiguous(), first.mul(real).contiguous(),
          count.mul(real).contiguous(), block_image.contiguous()};
}

// Pixel chunks per positive block: enough blocks to fill the GPU several times over, but never
// under kMinChunk pixels. Returns (chunk_size (whole tiles), chunks).
std::pair<int64_t, int64_t> chunk_layout(int64_t p, int64_t blocks) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t chunks = std::min(ceil_div(4 * sms, blocks), ceil_div(p, kMinChunk));
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, kMaxGridY));
  const int64_t chunk_size = ceil_div(ceil_div(p, chunks), kCols) * kCols;
  return {chunk_size, ceil_div(p, chunk_size)};
}

// Calls launch(target pointer): bool and uint8 masks are both read as bytes (bool storage is 0/1).
template <typename scalar_t, typename Launch>
void with_target(const at::Tensor& target, const Launch& launch) {
  if (target.scalar_type() == at::kByte || target.scalar_type() == at::kBool) {
    launch(static_cast<const uint8_t*>(target.const_data_ptr()));
  } else {
    launch(target.const_data_ptr<scalar_t>());
  }
}

std::tuple<at::Tensor, at::Tensor> dynamic_mask_dice_loss_forward_cuda(
    const at::Tensor& kernels_in, const at::Tensor& feats_in, const at::Tensor& pos_image_in,
    const at::Tensor& target_in, double eps, bool check_index) {
  constexpr const char* kOp = "dynamic_mask_dice_loss_forward";
  check_inputs(kernels_in, feats_in, pos_image_in, target_in, check_index, kOp);
  const c10::cuda::CUDAGuard guard(kernels_in.device());
  const int64_t positives = kernels_in.size(0);
  const int64_t images = feats_in.size(0);
  const int64_t e = feats_in.size(1);
  const int64_t p = feats_in.size(2);
  const auto sums_options = kernels_in.options().dtype(at::kDouble);
  if (positives == 0 || p == 0) {
    const double empty_loss = dl::loss_from_sums(0.0, 0.0, 0.0, eps);
    return {at::full({positives}, empty_loss, kernels_in.options()),
            at::zeros({positives, 3}, sums_options)};
  }
  const at::Tensor kernels = kernels_in.contiguous();  // (K, E)
  const at::Tensor feats = feats_in.contiguous();      // (N, E, P)
  const at::Tensor target = target_in.contiguous();    // (K, P)
  const PositiveBlocks blocks = positive_blocks(pos_image_in.contiguous(), images);
  const int64_t num_blocks = blocks.block_count.size(0);
  const auto [chunk_size, chunks] = chunk_layout(p, num_blocks);

  at::Tensor loss = at::empty({positives}, kernels.options());
  at::Tensor sums = at::empty({positives, 3}, sums_options);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, kernels.scalar_type(),
                                  "dynamic_mask_dice_loss_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor partials = at::empty(  // (K, C, 3)
        {positives, chunks, 3}, kernels.options().dtype(at::toOpMathType(kernels.scalar_type())));
    const dim3 grid(static_cast<unsigned>(num_blocks), static_cast<unsigned>(chunks));
    with_target<scalar_t>(target, [&](auto target_ptr) {
      dmd_forward_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
          kernels.const_data_ptr<scalar_t>(), feats.const_data_ptr<scalar_t>(),
          blocks.member.const_data_ptr<int64_t>(), blocks.block_first.const_data_ptr<int64_t>(),
          blocks.block_count.const_data_ptr<int64_t>(),
          blocks.block_image.const_data_ptr<int64_t>(), target_ptr, e, p, chunk_size,
          partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const unsigned finalize_blocks = static_cast<unsigned>(ceil_div(positives, kWarps));
    cuda_dice::finalize_kernel<scalar_t, acc_t><<<finalize_blocks, kThreads, 0, stream>>>(
        partials.const_data_ptr<acc_t>(), positives, chunks, eps,
        sums.mutable_data_ptr<double>(), loss.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, sums};
}

std::tuple<at::Tensor, at::Tensor> dynamic_mask_dice_loss_backward_cuda(
    const at::Tensor& grad_loss_in, const at::Tensor& kernels_in, const at::Tensor& feats_in,
    const at::Tensor& pos_image_in, const at::Tensor& target_in, const at::Tensor& sums_in,
    double eps, bool check_index) {
  constexpr const char* kOp = "dynamic_mask_dice_loss_backward";
  check_inputs(kernels_in, feats_in, pos_image_in, target_in, check_index, kOp);
  const int64_t positives = kernels_in.size(0);
  check_grad_and_sums(grad_loss_in, sums_in, positives, kernels_in, kOp,
                      "dynamic_mask_dice_loss_forward");
  const c10::cuda::CUDAGuard guard(kernels_in.device());
  const int64_t images = feats_in.size(0);
  const int64_t e = feats_in.size(1);
  const int64_t p = feats_in.size(2);
  if (positives == 0 || p == 0 || e == 0) {
    return {at::zeros_like(kernels_in), at::zeros_like(feats_in)};
  }
  // 16-bit inputs run the float32 kernels on float32 copies: their own instantiations spill.
  const auto acc_type = at::toOpMathType(kernels_in.scalar_type());
  const at::Tensor kernels = kernels_in.to(acc_type).contiguous();  // (K, E)
  const at::Tensor feats = feats_in.to(acc_type).contiguous();      // (N, E, P)
  const at::Tensor target =                                         // (K, P)
      at::isFloatingType(target_in.scalar_type()) ? target_in.to(acc_type).contiguous()
                                                  : target_in.contiguous();
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const at::Tensor sums = sums_in.to(at::kDouble).contiguous();
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  at::Tensor coef = at::empty({positives, 2}, sums.options());  // (K, 2)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_loss.scalar_type(),
                                  "dynamic_mask_dice_loss_backward_cuda", [&] {
    const unsigned coef_blocks = static_cast<unsigned>(ceil_div(positives, kThreads));
    cuda_dice::coefficients_kernel<scalar_t><<<coef_blocks, kThreads, 0, stream>>>(
        grad_loss.const_data_ptr<scalar_t>(), sums.const_data_ptr<double>(), positives, eps,
        coef.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });

  const PositiveBlocks blocks = positive_blocks(pos_image_in.contiguous(), images);
  const int64_t num_blocks = blocks.block_count.size(0);
  const auto [chunk_size, chunks] = chunk_layout(p, num_blocks);
  const int64_t tiles = ceil_div(p, kCols);
  TORCH_CHECK(images * tiles <= INT_MAX, kOp, ": at most ", INT_MAX,
              " pixel tiles of 64 in all images, got ", images * tiles);
  const unsigned feats_blocks = static_cast<unsigned>(images * tiles);
  at::Tensor grad_feats = at::empty(feats.sizes(), feats.options());             // (N, E, P)
  at::Tensor partials = at::empty({positives, chunks, e}, kernels.options());  // (K, C, E)
  AT_DISPATCH_FLOATING_TYPES(kernels.scalar_type(), "dynamic_mask_dice_loss_backward_cuda", [&] {
    using acc_t = scalar_t;
    with_target<scalar_t>(target, [&](auto target_ptr) {
      dmd_backward_feats_kernel<scalar_t, acc_t><<<feats_blocks, kThreads, 0, stream>>>(
          kernels.const_data_ptr<scalar_t>(), feats.const_data_ptr<scalar_t>(),
          blocks.member.const_data_ptr<int64_t>(), blocks.group_start.const_data_ptr<int64_t>(),
          target_ptr, coef.const_data_ptr<double>(), tiles, e, p,
          grad_feats.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const dim3 kernels_grid(static_cast<unsigned>(num_blocks), static_cast<unsigned>(chunks));
      dmd_backward_kernels_kernel<scalar_t, acc_t><<<kernels_grid, kThreads, 0, stream>>>(
          kernels.const_data_ptr<scalar_t>(), feats.const_data_ptr<scalar_t>(),
          blocks.member.const_data_ptr<int64_t>(), blocks.block_first.const_data_ptr<int64_t>(),
          blocks.block_count.const_data_ptr<int64_t>(),
          blocks.block_image.const_data_ptr<int64_t>(), target_ptr,
          coef.const_data_ptr<double>(), e, p, chunk_size, partials.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  // A fixed-order sum over the chunks in double (an ATen reduction, no atomics).
  at::Tensor grad_kernels = partials.to(at::kDouble).sum(1).to(kernels_in.scalar_type());  // (K, E)
  return {grad_kernels, grad_feats.to(feats_in.scalar_type())};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CUDA, m) {
  m.impl("dynamic_mask_dice_loss_forward", &solo_fast::dynamic_mask_dice_loss_forward_cuda);
  m.impl("dynamic_mask_dice_loss_backward", &solo_fast::dynamic_mask_dice_loss_backward_cuda);
}
