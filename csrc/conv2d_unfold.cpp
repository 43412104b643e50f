// How a conv's patches are unfolded and products folded back: strided views of the image
// (any device) or the im2col / col2im kernels (cpu/, cuda/), chosen by GRADVAR_EXT_UNFOLD.
#include <ATen/ATen.h>

#include <algorithm>
#include <string>

#include "checks.h"
#include "conv2d_parts.h"

namespace gradvar {
namespace conv {

// Patches of images [n, C_in, H, W] as strided views of the zero-padded images, copied once into
// [n * groups, L, C_in/groups * kh * kw] (features fastest; im2col's feature order c, i, j): one
// copy kernel, where at::im2col on CUDA launches one kernel per sample (0.25 ms of GPU time for
// 64 samples of 64 channels at 16x16 on an H200, benchmarks/RESULTS.md).
at::Tensor unfold_strided(const at::Tensor& images, const ConvGeometry& c) {
  const int64_t n = images.size(0), per_group = c.in_channels / c.groups;
  const auto image =
      c.padded() ? at::constant_pad_nd(images, {c.padding[1], c.padding[1], c.padding[0], c.padding[0]}, 0) : images;
  const int64_t span_h = c.dilation[0] * (c.kernel[0] - 1) + 1, span_w = c.dilation[1] * (c.kernel[1] - 1) + 1;
  const auto taps = image.unfold(2, span_h, c.stride[0])
                        .unfold(3, span_w, c.stride[1])  // [n, C, H_out, W_out, span_h, span_w]
                        .slice(4, 0, span_h, c.dilation[0])
                        .slice(5, 0, span_w, c.dilation[1]);  // [n, C, H_out, W_out, kh, kw]
  return taps.unflatten(1, {c.groups, per_group})
      .permute({0, 1, 3, 4, 2, 5, 6})  // [n, groups, H_out, W_out, C/groups, kh, kw]
      .reshape({n * c.groups, c.positions(), c.patch()});
}

// Patches of output rows [first_row, first_row + rows) of images [n, C_in, H, W], positions fastest:
// [n * groups, C_in/groups * kh * kw, rows * W_out] copied from strided views of the input rows
// those outputs read (zero-padded for them alone), returned transposed to [n * groups, rows * W_out,
// C_in/groups * kh * kw]. Positions fastest, the copy reads and writes along image rows (coalesced
// on a GPU), and bmm takes the transposed view as it is.
at::Tensor unfold_rows(const at::Tensor& images, const ConvGeometry& c, int64_t first_row, int64_t rows) {
  const int64_t n = images.size(0), per_group = c.in_channels / c.groups;
  const int64_t span_h = c.dilation[0] * (c.kernel[0] - 1) + 1, span_w = c.dilation[1] * (c.kernel[1] - 1) + 1;
  const int64_t top = first_row * c.stride[0] - c.padding[0];  // padded-image rows [top, bottom) in input rows
  const int64_t bottom = top + (rows - 1) * c.stride[0] + span_h;
  const int64_t lo = std::max<int64_t>(top, 0), hi = std::min<int64_t>(bottom, c.height);  // rows inside the image
  at::Tensor piece;
  if (hi <= lo) {  // the slab's taps all fall in the padding
    piece = at::zeros({n, c.in_channels, bottom - top, c.width + 2 * c.padding[1]}, images.options());
  } else {
    piece = images.narrow(2, lo, hi - lo);
    if (lo - top != 0 || bottom - hi != 0 || c.padding[1] != 0) {
      piece = at::constant_pad_nd(piece, {c.padding[1], c.padding[1], lo - top, bottom - hi}, 0);
    }
  }
  const auto taps = piece.unfold(2, span_h, c.stride[0])
                        .unfold(3, span_w, c.stride[1])  // [n, C, rows, W_out, span_h, span_w]
                        .slice(4, 0, span_h, c.dilation[0])
                        .slice(5, 0, span_w, c.dilation[1]);  // [n, C, rows, W_out, kh, kw]
  return taps.unflatten(1, {c.groups, per_group})
      .permute({0, 1, 2, 5, 6, 3, 4})  // [n, groups, C/groups, kh, kw, rows, W_out]
      .reshape({n * c.groups, c.patch(), rows * c.out_width})
      .transpose(1, 2);
}

// The inverse, fold (col2im): columns [n, C * kh * kw, L] summed into images [n, C, H, W] (out,
// overwritten) by kh * kw strided-view additions into the zero-padded images, one per kernel tap,
// then the crop: where at::col2im on CUDA launches one kernel per sample.
void fold_strided(const at::Tensor& cols, at::Tensor& out, const ConvGeometry& c) {
  const int64_t n = cols.size(0);
  const std::vector<int64_t> padded_shape{n, c.in_channels, c.height + 2 * c.padding[0], c.width + 2 * c.padding[1]};
  at::Tensor image = c.padded() ? at::zeros(padded_shape, cols.options()) : out.zero_();
  const auto taps = cols.view({n, c.in_channels, c.kernel[0], c.kernel[1], c.out_height, c.out_width});
  for (int64_t i = 0; i < c.kernel[0]; ++i) {
    for (int64_t j = 0; j < c.kernel[1]; ++j) {
      const int64_t top = i * c.dilation[0], left = j * c.dilation[1];
      image.slice(2, top, top + c.stride[0] * (c.out_height - 1) + 1, c.stride[0])
          .slice(3, left, left + c.stride[1] * (c.out_width - 1) + 1, c.stride[1])
          .add_(taps.select(2, i).select(2, j));
    }
  }
  if (c.padded()) {
    out.copy_(image.slice(2, c.padding[0], c.padding[0] + c.height).slice(3, c.padding[1], c.padding[1] + c.width));
  }
}

// How a chunk's patches are unfolded (and products folded back): our im2col / col2im kernels, or
// strided views of the image. CPU and CUDA: the kernels (cpu/, cuda/unfold_kernels.*) unless
// GRADVAR_EXT_UNFOLD=strided (the tests run both). CUDA's default since the twenty-first session
// (H100: its tests and compute-sanitizer clean; conv2d_variance float32 152 vs 196 us, 84 vs
// 109 us on the benchmark CNN's convs). Other devices: the views.
bool unfold_with_im2col(const at::Tensor& images) {
  const char* flag = env_choice("GRADVAR_EXT_UNFOLD", {"im2col", "strided"}, "im2col or strided", "conv2d");
  const std::string choice = flag != nullptr ? flag : "im2col";
#ifdef GRADVAR_WITH_CUDA
  if (images.is_cuda()) return choice != "strided";
#endif
  return images.is_cpu() && choice != "strided";
}

namespace {
// cols [n, C_in * kh * kw, rows * W_out] = the columns of output rows [first_row, +rows) of
// images [n, C_in, H, W] (contiguous), by the device's im2col kernel.
void im2col_rows(const at::Tensor& images, at::Tensor& cols, const ConvGeometry& c, int64_t first_row, int64_t rows) {
  TORCH_INTERNAL_ASSERT(images.is_contiguous() && cols.is_contiguous(), "gradvar: im2col takes dense tensors");
#ifdef GRADVAR_WITH_CUDA
  if (images.is_cuda()) {
    return im2col_rows_cuda(images, cols, c.kernel, c.stride, c.padding, c.dilation, c.out_width, first_row, rows);
  }
#endif
  TORCH_INTERNAL_ASSERT(first_row == 0 && rows == c.out_height, "gradvar: the CPU im2col unfolds all rows");
  im2col_cpu(images, cols, c.kernel, c.stride, c.padding, c.dilation, c.out_height, c.out_width);
}
}  // namespace

// The same columns as [n * groups, rows * W_out, C_in/groups * kh * kw]: a transposed view, as
// bmm takes it.
at::Tensor im2col_columns(const at::Tensor& images, const ConvGeometry& c, int64_t first_row, int64_t rows) {
  const int64_t n = images.size(0);
  at::Tensor cols = at::empty({n, c.groups * c.patch(), rows * c.out_width}, images.options());
  im2col_rows(images, cols, c, first_row, rows);
  return cols.view({n * c.groups, c.patch(), rows * c.out_width}).transpose(1, 2);
}

void col2im(const at::Tensor& cols, at::Tensor& images, const ConvGeometry& c) {
  TORCH_INTERNAL_ASSERT(images.is_contiguous() && cols.is_contiguous(), "gradvar: col2im takes dense tensors");
#ifdef GRADVAR_WITH_CUDA
  if (images.is_cuda()) {
    return col2im_cuda(cols, images, c.kernel, c.stride, c.padding, c.dilation, c.out_height, c.out_width);
  }
#endif
  col2im_cpu(cols, images, c.kernel, c.stride, c.padding, c.dilation, c.out_height, c.out_width);
}

}  // namespace conv
}  // namespace gradvar
