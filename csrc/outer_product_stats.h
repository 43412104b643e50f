// Statistics of per-sample outer products g_n = G_n^T X_n, reduced over samples.
// X: [N, T, in], G: [N, T, out] (T = positions: a Linear layer's middle dims, a Conv2d
// layer's unfolded patches). One core; the layer ops are front doors to it.
#pragma once

#include <ATen/core/Tensor.h>
#include <tuple>

namespace gradvar {

// ---- core (device-agnostic ATen; chunked over samples) ----
// moment = sum_n (G_n^T X_n) * (Gb_n^T Xb_n); sum = sum_n G_n^T X_n if with_sum. [out, in] each.
std::tuple<at::Tensor, at::Tensor> reduce_outer_products(const at::Tensor& X, const at::Tensor& G,
                                                         const at::Tensor& Xb, const at::Tensor& Gb,
                                                         bool same_pair, bool with_sum);
// l2[n] = ||G_n^T X_n||_F^2. [N]
at::Tensor outer_product_squared_norms(const at::Tensor& X, const at::Tensor& G);
// out_n = Z_n (W * (Q_n^T P_n)). Z, Q: [N, T, a]; P: [N, T, b]; W: [a, b] -> [N, T, b].
at::Tensor weighted_outer_product_apply(const at::Tensor& Z, const at::Tensor& P, const at::Tensor& Q,
                                        const at::Tensor& W);

// ---- device kernels for the reduction steps (cpu/, cuda/) ----
// moment[j] += sum_k g[k, j] * gb[k, j]; sum[j] += sum_k g[k, j] (sum may be undefined). g, gb: [k, F].
void accumulate_products_cpu(at::Tensor& moment, at::Tensor& sum, const at::Tensor& g, const at::Tensor& gb);
// out[k] = sum_j a[k, j] * b[k, j]. a, b: [k, F]; out: [k] (contiguous view allowed).
void rowwise_dot_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
#ifdef GRADVAR_WITH_CUDA
void accumulate_products_cuda(at::Tensor& moment, at::Tensor& sum, const at::Tensor& g, const at::Tensor& gb);
void rowwise_dot_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
#endif

// ---- Linear front door (the registered ops) ----
at::Tensor linear_second_moment(const at::Tensor& input, const at::Tensor& grad_output);
at::Tensor linear_variance(const at::Tensor& input, const at::Tensor& grad_output);
at::Tensor linear_batch_l2(const at::Tensor& input, const at::Tensor& grad_output);
at::Tensor linear_cross_moment(const at::Tensor& input, const at::Tensor& grad_output,
                               const at::Tensor& other_input, const at::Tensor& other_grad_output);
at::Tensor weighted_gradient_product(const at::Tensor& left, const at::Tensor& input,
                                     const at::Tensor& grad_output, const at::Tensor& weight);

}  // namespace gradvar
