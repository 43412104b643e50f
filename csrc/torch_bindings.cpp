// The gradvar operator library: every schema, with one line on what it computes, and the
// kernels behind each dispatch key. Shapes: input [N, *, in], grad_output [N, *, out];
// a sample's Linear weight gradient is g_n = sum over * of grad_output[n]^T input[n] ([out, in]).
#include <torch/library.h>

#include "outer_product_stats.h"

TORCH_LIBRARY(gradvar, m) {
  // sum_n g_n**2                                   -> [out, in]
  m.def("linear_second_moment(Tensor input, Tensor grad_output) -> Tensor");
  // sum_n g_n**2 / N - (sum_n g_n / N)**2, >= 0     -> [out, in]
  m.def("linear_variance(Tensor input, Tensor grad_output) -> Tensor");
  // (sum_n g_n**2, sum_n g_n) in one pass: the variance's parts, whose backward needs no second pass -> [out, in] x 2
  m.def("linear_moments(Tensor input, Tensor grad_output) -> (Tensor, Tensor)");
  // ||g_n||_F**2 per sample                          -> [N]
  m.def("linear_batch_l2(Tensor input, Tensor grad_output) -> Tensor");
  // sum_n g_n * h_n, h_n from (other_input, other_grad_output) (backward helper) -> [out, in]
  m.def("linear_cross_moment(Tensor input, Tensor grad_output, Tensor other_input, Tensor other_grad_output) -> Tensor");
  // left[n] @ (weight * g_n - center), left [N, *, out], weight, center [out, in] (backward helper) -> [N, *, in]
  m.def("weighted_gradient_product(Tensor left, Tensor input, Tensor grad_output, Tensor weight, Tensor? center=None) -> Tensor");
  // both VJPs from one h_n = weight * g_n - center: (left_grad_output[n] @ h_n, left_input[n] @ h_n^T) (backward helper)
  m.def("weighted_gradient_products(Tensor left_grad_output, Tensor left_input, Tensor input, Tensor grad_output, Tensor weight, Tensor? center) -> (Tensor, Tensor)");

  // Conv2d: input [N, C_in, H, W], grad_output [N, C_out, H_out, W_out]; g_n has the weight's
  // shape [C_out, C_in/groups, kh, kw]; the same statistics as the Linear ops above.
  m.def("conv2d_second_moment(Tensor input, Tensor grad_output, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_variance(Tensor input, Tensor grad_output, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_moments(Tensor input, Tensor grad_output, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor)");
  m.def("conv2d_batch_l2(Tensor input, Tensor grad_output, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  m.def("conv2d_cross_moment(Tensor input, Tensor grad_output, Tensor other_input, Tensor other_grad_output, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) -> Tensor");
  // to_input: fold(left[n] @ h_n), left like grad_output -> like input; else: unfold(left[n]) @ h_n^T,
  // left like input -> like grad_output; h_n = weight * g_n - center (backward helper)
  m.def("conv2d_weighted_gradient_product(Tensor left, Tensor input, Tensor grad_output, Tensor weight, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups, bool to_input, Tensor? center=None) -> Tensor");
  // both of the above from one h_n = weight * g_n - center: (to_input with left_grad_output, to grad_output with left_input)
  m.def("conv2d_weighted_gradient_products(Tensor left_grad_output, Tensor left_input, Tensor input, Tensor grad_output, Tensor weight, Tensor? center, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor)");
}

namespace {
// The kernels are device-agnostic ATen code with device-specific reductions inside, so the
// same functions serve every backend we register.
void register_kernels(torch::Library& m) {
  m.impl("linear_second_moment", &gradvar::linear_second_moment);
  m.impl("linear_variance", &gradvar::linear_variance);
  m.impl("linear_moments", &gradvar::linear_moments);
  m.impl("linear_batch_l2", &gradvar::linear_batch_l2);
  m.impl("linear_cross_moment", &gradvar::linear_cross_moment);
  m.impl("weighted_gradient_product", &gradvar::weighted_gradient_product);
  m.impl("weighted_gradient_products", &gradvar::weighted_gradient_products);
  m.impl("conv2d_second_moment", &gradvar::conv2d_second_moment);
  m.impl("conv2d_variance", &gradvar::conv2d_variance);
  m.impl("conv2d_moments", &gradvar::conv2d_moments);
  m.impl("conv2d_batch_l2", &gradvar::conv2d_batch_l2);
  m.impl("conv2d_cross_moment", &gradvar::conv2d_cross_moment);
  m.impl("conv2d_weighted_gradient_product", &gradvar::conv2d_weighted_gradient_product);
  m.impl("conv2d_weighted_gradient_products", &gradvar::conv2d_weighted_gradient_products);
}
}  // namespace

TORCH_LIBRARY_IMPL(gradvar, CPU, m) { register_kernels(m); }
TORCH_LIBRARY_IMPL(gradvar, CUDA, m) { register_kernels(m); }
