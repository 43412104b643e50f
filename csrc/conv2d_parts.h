// The Conv2d front door's shared parts (conv2d_ops.cpp: checks, factors, the ops): the
// geometry of a call, how patches are unfolded and folded back (conv2d_unfold.cpp), and the
// shifted kernel rows (conv2d_shifted.cpp, GRADVAR_EXT_CONV_ALGORITHM=shifted).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "outer_product_stats.h"

namespace gradvar {
namespace conv {

// A checked convolution: hyper-parameters and sizes (conv2d_ops.cpp, check_conv).
struct ConvGeometry {
  std::vector<int64_t> kernel, stride, padding, dilation;
  int64_t groups, in_channels, out_channels, height, width, out_height, out_width;
  int64_t positions() const { return out_height * out_width; }
  int64_t patch() const { return in_channels / groups * kernel[0] * kernel[1]; }
  bool padded() const { return padding[0] != 0 || padding[1] != 0; }
  bool unfold_is_view() const {
    return kernel[0] == 1 && kernel[1] == 1 && stride[0] == 1 && stride[1] == 1 && !padded();
  }
};

// ---- unfolding and folding (conv2d_unfold.cpp)
// Patches [n * groups, L, C_in/groups * kh * kw] of images [n, C_in, H, W], features fastest.
at::Tensor unfold_strided(const at::Tensor& images, const ConvGeometry& c);
// Patches of output rows [first_row, +rows), positions fastest, as a transposed view
// [n * groups, rows * W_out, C_in/groups * kh * kw].
at::Tensor unfold_rows(const at::Tensor& images, const ConvGeometry& c, int64_t first_row, int64_t rows);
// The same by the device's im2col kernel (images contiguous).
at::Tensor im2col_columns(const at::Tensor& images, const ConvGeometry& c, int64_t first_row, int64_t rows);
// Whether a chunk's patches are unfolded (and folded back) by the im2col / col2im kernels.
bool unfold_with_im2col(const at::Tensor& images);
// fold: columns [n, C_in * kh * kw, L] summed into images [n, C_in, H, W] (overwritten), by
// strided views / by the device's col2im kernel (both contiguous).
void fold_strided(const at::Tensor& cols, at::Tensor& out, const ConvGeometry& c);
void col2im(const at::Tensor& cols, at::Tensor& images, const ConvGeometry& c);

// ---- the shifted kernel rows (conv2d_shifted.cpp)
// Per-sample gradients a chunk at a time, kernel-row-major: [n * groups, C_out/g, patch] holding
// [kh, C_out/g, C_in/g * kw] per sample and group; keep, when given, receives each chunk's
// width-unfolded images (for shifted_to_grad_output's reuse).
GradientChunks shifted_gradients(const at::Tensor& input, const at::Tensor& grad_output, const ConvGeometry& c,
                                 std::shared_ptr<at::Tensor> keep = nullptr);
// [groups, C_out/g, patch] from that order to the weight's (c, i, j) order, and back.
at::Tensor from_shifted(const at::Tensor& reduced, const ConvGeometry& c);
at::Tensor to_shifted(const at::Tensor& per_group, const ConvGeometry& c);
// The backward's products of h_n (in that order) towards grad_output (out [N, C_out, H_out, W_out],
// left [N, C_in, H, W]; reuse: the chunk's width-unfolded left, when left is the input) and
// towards the input (out [N, C_in, H, W], left [N, C_out, H_out, W_out]).
WeightedConsumer shifted_to_grad_output(const at::Tensor& left_input, std::shared_ptr<at::Tensor> reuse,
                                        at::Tensor& out, const ConvGeometry& c);
WeightedConsumer shifted_to_input(const at::Tensor& left_grad_output, at::Tensor& out, const ConvGeometry& c);

}  // namespace conv
}  // namespace gradvar
