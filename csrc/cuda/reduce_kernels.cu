// CUDA kernels for the core's elementwise reductions (the GEMMs run in cuBLAS via at::bmm).
// Lean includes on purpose: no ATen/ATen.h, no CUDAContext.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "../checks.h"
#include "../outer_product_stats.h"
#include "reduce_kernels.cuh"

namespace gradvar {
namespace {

// Which accumulate kernel for F columns: GRADVAR_EXT_ACCUMULATE=sliced, columns (one thread a
// column) or wide (16 bytes of columns a thread, where it fits) forces one; unset, the sliced
// kernel for few columns (reduce::sliced_by_default), else the wide one.
enum class Accumulate { columns, sliced, wide };
Accumulate accumulate_kernel(int64_t F) {
  const char* flag = env_choice("GRADVAR_EXT_ACCUMULATE", {"columns", "sliced", "wide"}, "columns, sliced or wide");
  if (flag == nullptr) return reduce::sliced_by_default(F) ? Accumulate::sliced : Accumulate::wide;
  return std::strcmp(flag, "sliced") == 0 ? Accumulate::sliced
         : std::strcmp(flag, "wide") == 0 ? Accumulate::wide
                                          : Accumulate::columns;
}

// out[k * out_stride] = sum_j a[k, j] * b[k, j]. One block per row k, tree reduction in shared memory.
template <typename scalar_t, int kThreads>
__global__ void rowwise_dot_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                   scalar_t* __restrict__ out, int64_t out_stride, int64_t F) {
  __shared__ scalar_t partial[kThreads];
  const int64_t row = blockIdx.x;
  scalar_t acc = 0;
  for (int64_t j = threadIdx.x; j < F; j += kThreads) acc += a[row * F + j] * b[row * F + j];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[row * out_stride] = partial[0];
}

}  // namespace

void accumulate_products_cuda(at::Tensor& moment, at::Tensor& sum, const at::Tensor& g, const at::Tensor& gb) {
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t rows = g.size(0), F = g.size(1);
  if (F == 0) return;
  using reduce::kAccumulateThreads;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const Accumulate kernel = accumulate_kernel(F);
  if (kernel == Accumulate::sliced) {
    const unsigned blocks = reduce::accumulate_sliced_blocks(F);
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "accumulate_products_cuda", [&] {
      reduce::accumulate_products_sliced_kernel<scalar_t, reduce::kSlicedColumns, reduce::kSlices>
          <<<blocks, kAccumulateThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), gb.const_data_ptr<scalar_t>(), moment.mutable_data_ptr<scalar_t>(),
          sum.defined() ? sum.mutable_data_ptr<scalar_t>() : nullptr, rows, F);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "accumulate_products_cuda", [&] {
    const scalar_t *g_data = g.const_data_ptr<scalar_t>(), *gb_data = gb.const_data_ptr<scalar_t>();
    scalar_t* moment_data = moment.mutable_data_ptr<scalar_t>();
    scalar_t* sum_data = sum.defined() ? sum.mutable_data_ptr<scalar_t>() : nullptr;
    if (kernel == Accumulate::wide && reduce::accumulate_wide_fits<scalar_t>(g_data, gb_data, moment_data, sum_data, F)) {
      const unsigned blocks = reduce::accumulate_wide_blocks<scalar_t>(F);
      const auto launch = [&](auto same) {  // g read once (same: gb is g) or both read
        reduce::accumulate_products_wide_kernel<scalar_t, decltype(same)::value>
            <<<blocks, kAccumulateThreads, 0, stream>>>(g_data, gb_data, moment_data, sum_data, rows, F);
      };
      gb_data == g_data ? launch(std::true_type{}) : launch(std::false_type{});
    } else {
      reduce::accumulate_products_kernel<scalar_t><<<reduce::accumulate_blocks(F), kAccumulateThreads, 0, stream>>>(
          g_data, gb_data, moment_data, sum_data, rows, F);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void rowwise_dot_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t rows = a.size(0), F = a.size(1);
  if (rows == 0) return;
  constexpr int kThreads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rowwise_dot_cuda", [&] {
    rowwise_dot_kernel<scalar_t, kThreads><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        out.stride(0), F);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gradvar
