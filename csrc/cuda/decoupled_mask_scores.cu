// CUDA kernel of solo_fast::decoupled_mask_scores (contract: csrc/solo_fast.cpp,
// solo_fast/ops/decoupled_mask_scores.py; per-pixel arithmetic: decoupled_mask_scores.h, shared
// with the C++ kernel). Nothing of size K x P is stored.
//
// Block (candidate k, chunk of pixels) reads one row of Y (its grid row) and one of X (its grid
// column) and reduces the chunk's area and soft sum of s = y * x > threshold. Candidates share
// rows and columns, which are then re-read from L2 (both branches of one image are 56 MB at
// 128 channels of 200 x 272) rather than DRAM. Each block writes one partial; a second kernel adds
// a candidate's partials in a fixed order (double; mask_scores_common.cuh, shared with
// solo_mask_scores.cu): no atomics, bitwise reproducible on a given GPU.
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
#include <cstdint>
#include <tuple>

#include "cuda/dice_reduce.cuh"
#include "cuda/mask_scores_common.cuh"
#include "decoupled_mask_scores.h"
#include "op_checks.h"

// N=images, C=channels of each branch (all levels), K=candidates, P=pixels of a mask map

namespace solo_fast {
namespace {

namespace ms = ::solo_fast::mask_scores;

using cuda_dice::ceil_div;
using cuda_dice::kThreads;

// Below a few thousand pixels per block the partial write and block reduction start to dominate.
constexpr int64_t kMinChunk = 4096;
// CUDA limits grid axis y to 65535 blocks.
constexpr int64_t kMaxGridY = 65535;

// Block (k, chunk) reduces pixels [chunk * chunk_size, min(p, (chunk + 1) * chunk_size)) of
// candidate k into partial_area / partial_soft[k][chunk].
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) scores_partials_kernel(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ y,
    const int64_t* __restrict__ image, const int64_t* __restrict__ row,
    const int64_t* __restrict__ col, int64_t channels, int64_t p, int64_t chunk_size,
    acc_t threshold, int64_t* __restrict__ partial_area, double* __restrict__ partial_soft) {
  const int64_t k = blockIdx.x;
  const int64_t begin = blockIdx.y * chunk_size;
  const int64_t end = begin + chunk_size < p ? begin + chunk_size : p;
  const scalar_t* x_row = x + (image[k] * channels + col[k]) * p;
  const scalar_t* y_row = y + (image[k] * channels + row[k]) * p;
  long long inside = 0;
  double sum = 0.0;
  // Two pixels in flight per thread: their four loads overlap.
#pragma unroll 2
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    const acc_t s = ms::decoupled_soft<scalar_t>(static_cast<acc_t>(y_row[i]),
                                                 static_cast<acc_t>(x_row[i]));
    inside += ms::in_mask(s, threshold) ? 1 : 0;
    sum += static_cast<double>(ms::masked_value(s, threshold));
  }

  cuda_scores::store_block_partial(inside, sum, k * gridDim.y + blockIdx.y, partial_area,
                                   partial_soft);
}

std::tuple<at::Tensor, at::Tensor> decoupled_mask_scores_cuda(
    const at::Tensor& x_in, const at::Tensor& y_in, const at::Tensor& image_in,
    const at::Tensor& row_in, const at::Tensor& col_in, double threshold, bool check_index) {
  constexpr const char* kOp = "decoupled_mask_scores";
  TORCH_CHECK(x_in.is_cuda(), kOp, ": x_probs must be a CUDA tensor, got one on ",
              x_in.device());
  check_decoupled_mask_scores_inputs(x_in, y_in, image_in, row_in, col_in, check_index, kOp);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t candidates = image_in.size(0);
  const int64_t channels = x_in.size(1);
  const int64_t p = x_in.size(2);
  TORCH_CHECK(candidates <= INT_MAX, kOp, ": at most ", INT_MAX, " candidates, got ",
              candidates);
  at::Tensor area = at::zeros({candidates}, image_in.options());
  at::Tensor soft_sum = at::zeros({candidates}, image_in.options().dtype(at::kDouble));
  if (candidates == 0) return {area, soft_sum};
  if (p == 0) return {area, soft_sum};
  const at::Tensor x = x_in.contiguous();  // (N, C, P)
  const at::Tensor y = y_in.contiguous();  // (N, C, P)
  const at::Tensor image = image_in.contiguous();
  const at::Tensor row = row_in.contiguous();
  const at::Tensor col = col_in.contiguous();

  // Enough blocks to fill the GPU several times over, but never chunks under kMinChunk pixels.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  int64_t chunks = std::min(ceil_div(4 * sms, candidates), ceil_div(p, kMinChunk));
  chunks = std::max<int64_t>(1, std::min<int64_t>(chunks, kMaxGridY));
  // Whole multiples of the block size keep every chunk start aligned the same way as its row.
  const int64_t chunk_size = ceil_div(ceil_div(p, chunks), kThreads) * kThreads;
  chunks = ceil_div(p, chunk_size);

  at::Tensor partial_area = at::empty({candidates, chunks}, image.options());  // (K, chunks)
  at::Tensor partial_soft =  // (K, chunks)
      at::empty({candidates, chunks}, image.options().dtype(at::kDouble));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                  "decoupled_mask_scores_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>(candidates), static_cast<unsigned>(chunks));
    scores_partials_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
        image.const_data_ptr<int64_t>(), row.const_data_ptr<int64_t>(),
        col.const_data_ptr<int64_t>(), channels, p, chunk_size,
        ms::threshold_as<scalar_t, acc_t>(threshold), partial_area.mutable_data_ptr<int64_t>(),
        partial_soft.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  cuda_scores::finalize_scores<int64_t>(partial_area, partial_soft, nullptr, area, soft_sum,
                                          stream);
  return {area, soft_sum};
}

}  // namespace
}  // namespace solo_fast

TORCH_LIBRARY_IMPL(solo_fast, CUDA, m) {
  m.impl("decoupled_mask_scores", &solo_fast::decoupled_mask_scores_cuda);
}
