// CUDA unfolding for the Conv2d front door, the default (GRADVAR_EXT_UNFOLD=strided opts out:
// strided views and copies): the host side. On an H100 in the twenty-first session it passed
// the CUDA tests and compute-sanitizer and took conv2d_variance from 196 to 152 us (32 -> 64
// channels, 32x32) and its backward's products from 569 to 436 us (benchmarks/RESULTS.md).
// The kernels and their layouts (at::im2col's / at::col2im's, as in cpu/unfold_kernels.cpp)
// are in unfold_kernels.cuh, which the tests also compile for the CPU and run thread by thread
// (tests/cuda_emulation.cpp).
// Why: on an H100 the default's unfolding (zero padding, then one generic strided copy of a
// 7-d view) took 75-84 us of a 194-243 us conv2d_variance (benchmarks/RESULTS.md, fifteenth
// session), and the backward's fold took kh*kw strided additions per chunk (85 launches in the
// CNN's job (b)): each is one launch here, reading the image in place (no padded copy).
// Lean includes on purpose: no ATen/ATen.h, no CUDAContext.h.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../outer_product_stats.h"
#include "unfold_kernels.cuh"

namespace gradvar {
namespace {

unfold::Geometry geometry(const at::Tensor& image, at::IntArrayRef kernel, at::IntArrayRef stride,
                          at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_width) {
  return {image.size(1), image.size(2), image.size(3), kernel[0], kernel[1], stride[0], stride[1],
          padding[0],    padding[1],    dilation[0],   dilation[1], out_width};
}

}  // namespace

void im2col_rows_cuda(const at::Tensor& image, at::Tensor& cols, at::IntArrayRef kernel, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_width, int64_t first_row,
                      int64_t rows) {
  const c10::cuda::CUDAGuard guard(image.device());
  const unfold::Geometry g = geometry(image, kernel, stride, padding, dilation, out_width);
  const int64_t planes = image.size(0) * g.C, positions = rows * out_width;
  if (planes == 0 || positions == 0) return;
  const unsigned blocks = unfold::im2col_blocks(planes, positions);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "im2col_rows_cuda", [&] {
    unfold::im2col_rows_kernel<scalar_t><<<blocks, unfold::kThreads, 0, stream>>>(
        image.const_data_ptr<scalar_t>(), cols.mutable_data_ptr<scalar_t>(), g, planes, first_row, positions);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void col2im_cuda(const at::Tensor& cols, at::Tensor& image, at::IntArrayRef kernel, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_height, int64_t out_width) {
  const c10::cuda::CUDAGuard guard(image.device());
  const unfold::Geometry g = geometry(image, kernel, stride, padding, dilation, out_width);
  const int64_t pixels = image.numel();
  if (pixels == 0) return;
  const unsigned blocks = unfold::col2im_blocks(pixels);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "col2im_cuda", [&] {
    unfold::col2im_kernel<scalar_t><<<blocks, unfold::kThreads, 0, stream>>>(
        cols.const_data_ptr<scalar_t>(), image.mutable_data_ptr<scalar_t>(), g, pixels, out_height, cols.size(2));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace gradvar
