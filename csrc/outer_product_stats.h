// Statistics of per-sample outer products g_n = G_n^T X_n, reduced over samples.
// A layer describes its per-sample factors X_n [T, in] and G_n [T, out] (T = positions: a
// Linear layer's middle dims, a Conv2d layer's output pixels with X_n its unfolded patches),
// split into `groups` independent blocks, and hands them to the core a chunk of samples at a
// time. One core; the layer ops (linear_ops.cpp, conv2d_ops.cpp) are front doors to it.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

namespace gradvar {

// Where a conv's unfolded patches come from, for a kernel that reads them from the image itself
// (GRADVAR_EXT_CONV_ALGORITHM=implicit): image [N, groups * channels, height, width], any strides;
// patch feature (c, i, j) of output pixel (oh, ow) is image[n, group * channels + c,
// oh * stride_h - pad_h + i * dil_h, ow * stride_w - pad_w + j * dil_w] (0 outside the image).
struct PatchSource {
  at::Tensor image;
  int64_t channels, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out_width;
};

// One factor of the per-sample gradients, materialised a chunk of samples at a time:
// chunk(start, n) -> [n * groups, positions, features] (any strides: bmm reads views in place).
struct Factors {
  int64_t samples, groups, positions, features;
  at::TensorOptions options;
  bool materialises;  // chunk() allocates (unfolding): counted against the memory budget
  std::function<at::Tensor(int64_t start, int64_t n)> chunk;
  std::shared_ptr<const PatchSource> patches = nullptr;  // set: the same factor, unfolded implicitly
  // Set for conv patches: slab(start, n, first_row, rows) -> [n * groups, rows * slab_width, features],
  // the chunk's positions [first_row * slab_width, +rows * slab_width) only (whole rows of output
  // pixels, slab_width = W_out), formed positions-fastest; the moments' core may form per-sample
  // gradients slab by slab (outer_product_stats.cpp, slab_plan) instead of unfolding all positions.
  std::function<at::Tensor(int64_t start, int64_t n, int64_t first_row, int64_t rows)> slab = nullptr;
  int64_t slab_width = 0;
};

// The per-sample gradients themselves, a chunk of samples at a time: chunk(start, n) ->
// [n * groups, rows, cols], a tensor the caller may overwrite (it is the producer's scratch).
// outer_products() forms them as G_n^T X_n with bmm; a layer may bring its own producer
// (conv2d_ops.cpp: one grouped convolution per chunk, no unfolded patches).
struct GradientChunks {
  int64_t samples, groups, rows, cols;
  at::TensorOptions options;
  int64_t scratch_per_sample;  // elements chunk() allocates per sample, its result included
  int64_t max_chunk;           // the most samples per chunk this producer runs well with
  std::function<at::Tensor(int64_t start, int64_t n)> chunk;
  int64_t budget_bytes = 0;  // the chunk's scratch budget when the producer needs its own (0: the core's)
};

// Takes h_n = W * g_n - center for samples [start, start + n): h [n * groups, rows, cols].
struct WeightedConsumer {
  int64_t scratch_per_sample;  // elements take() allocates per sample
  std::function<void(int64_t start, int64_t n, const at::Tensor& h)> take;
};

// Where the weighted product for samples [start, start + n) goes, shaped [n * groups, positions,
// features] ([n * groups, features, positions] when positions last): `into(start, n)` is a view
// of the result to write it to directly (no scratch); or, for a result that needs a
// transformation (col2im), `take(start, n, values)` receives it from scratch.
struct Sink {
  std::function<at::Tensor(int64_t start, int64_t n)> into;
  std::function<void(int64_t start, int64_t n, const at::Tensor& values)> take;
  void deliver(int64_t start, int64_t n, const at::Tensor& values) const {
    if (take) {
      take(start, n, values);
    } else {
      into(start, n).copy_(values);
    }
  }
};

// ---- core (device-agnostic ATen; chunked over samples; extra memory <= a fixed budget) ----
// moment = sum_n (G_n^T X_n) * (Gb_n^T Xb_n) (Xb, Gb null: the same pair); sum = sum_n G_n^T X_n
// if with_sum. Both [groups, out, in].
std::tuple<at::Tensor, at::Tensor> reduce_outer_products(const Factors& X, const Factors& G, const Factors* Xb,
                                                         const Factors* Gb, bool with_sum);
// The same from any producer of per-sample gradients (gb null: the same one). [groups, rows, cols]
std::tuple<at::Tensor, at::Tensor> reduce_gradients(const GradientChunks& g, const GradientChunks* gb, bool with_sum);
// Per-sample gradients as outer products G_n^T X_n, by bmm a chunk at a time.
GradientChunks outer_products(const Factors& X, const Factors& G);
// The variance over samples, moment / N - (sum / N)^2, clamped at 0 (rounding can dip
// below it); exactly 0 for N = 1. [groups, out, in]
at::Tensor variance_from_moments(const Factors& X, const Factors& G);
at::Tensor variance_of_gradients(const GradientChunks& g);
// l2[n] = ||G_n^T X_n||_F^2 summed over groups. [N]
at::Tensor outer_product_squared_norms(const Factors& X, const Factors& G);
// Per sample and group, Z_n (W * (Q_n^T P_n) - center): Z, Q [T, a]; P [T, b]; W, center [groups, a, b]
// (center may be undefined); sent to sink as [.., T, b], or as its transpose [.., b, T]
// (positions_last: the layout col2im reads).
void weighted_outer_product_apply(const Factors& Z, const Factors& P, const Factors& Q, const at::Tensor& W,
                                  const at::Tensor& center, const Sink& sink, bool positions_last = false);
// Both vector-Jacobian products from one h_n = W * (Q_n^T P_n) - center per chunk (center [groups, a, b],
// may be undefined): Z_n h_n -> sink ([.., T, b]) and Z2_n h_n^T -> sink2 ([.., T, a]), Z2 [T, b]
// (each transposed when positions_last).
void weighted_outer_product_apply_both(const Factors& Z, const Factors& Z2, const Factors& P, const Factors& Q,
                                       const at::Tensor& W, const at::Tensor& center, const Sink& sink,
                                       const Sink& sink2, bool positions_last);

// For every chunk of samples, h = W * g - center (W, center [groups, rows, cols]; center may be
// undefined), handed to each consumer in turn; scratch <= the chunk budget (kChunkBytes, see .cpp).
void apply_weighted_gradients(const GradientChunks& g, const at::Tensor& W, const at::Tensor& center,
                              const std::vector<WeightedConsumer>& consumers);

// ---- device kernels for the reduction steps (cpu/, cuda/) ----
// moment[j] += sum_k g[k, j] * gb[k, j]; sum[j] += sum_k g[k, j] (sum may be undefined). g, gb: [k, F].
void accumulate_products_cpu(at::Tensor& moment, at::Tensor& sum, const at::Tensor& g, const at::Tensor& gb);
// The moments of tiny CPU layers in one serial pass (small_layer_fits in outer_product_stats.cpp):
// X [S * groups, T, I], G [S * groups, T, O] (any strides) -> (moment, sum) [groups, O, I], sum
// undefined unless with_sum; variance_samples > 0: the variance over that many samples in place of
// the moment.
std::tuple<at::Tensor, at::Tensor> small_moments_cpu(const at::Tensor& X, const at::Tensor& G, int64_t groups,
                                                     bool with_sum, int64_t variance_samples);
// ||G_s^T X_s||^2 summed over each sample's groups for tiny CPU layers, one serial pass: X [S * groups,
// T, I], G [S * groups, T, O] (any strides) -> [S].
at::Tensor small_squared_norms_cpu(const at::Tensor& X, const at::Tensor& G, int64_t groups);
// The weighted products of tiny CPU layers in one serial pass (apply_weighted's small case):
// out[s] = Z_s (W[g] * (Q_s^T P_s) - C[g]) and out2[s] = Z2_s (...)^T for each row s of Z, Q
// [S * groups, T, a] and P, Z2 [S * groups, T, b]; out [.., T, b], out2 [.., T, a] written in place
// (any strides); out2 / Z2 and C may be undefined.
void small_weighted_products_cpu(const at::Tensor& out, const at::Tensor& out2, const at::Tensor& Z,
                                 const at::Tensor& Z2, const at::Tensor& P, const at::Tensor& Q, const at::Tensor& W,
                                 const at::Tensor& C, int64_t groups);
// out[k] = sum_j a[k, j] * b[k, j]. a, b: [k, F]; out: [k] (contiguous view allowed).
void rowwise_dot_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
// cols [N, C*kh*kw, out_height*out_width] = unfold(image [N, C, H, W]), as at::im2col, parallel
// (cpu/unfold_kernels.cpp).
void im2col_cpu(const at::Tensor& image, at::Tensor& cols, at::IntArrayRef kernel, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_height, int64_t out_width);
// image [N, C, H, W] = fold(cols [N, C*kh*kw, out_height*out_width]), as at::col2im; overwrites image.
void col2im_cpu(const at::Tensor& cols, at::Tensor& image, at::IntArrayRef kernel, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_height, int64_t out_width);
#ifdef GRADVAR_WITH_CUDA
// Whether the moments of CUDA factors (a cross moment: cross) use the fused kernel
// (cuda/fused_moments.cu) rather than chunked bmm + accumulate (T > 1) or two GEMMs (T = 1): by
// default for 1 < T <= 32 positions (float64 on tensor cores: 64), and for T = 1 while
// N * groups * I * O <= 2^26 (one pass for both GEMMs), where it is faster (for T > 1 on sm_80+
// on tensor cores unless a cross moment: 3xTF32 for float32, DMMA for float64);
// GRADVAR_EXT_FUSED_CUDA=1 always, on CUDA cores, =0 never,
// =tensor_cores (or tf32x3) always, on tensor cores (sm_80+).
bool use_fused_cuda(const Factors& X, const Factors& G, bool cross);
// Whether CUDA device `device` has the tensor cores of the fused walk (sm_80+).
bool cuda_has_tensor_cores(int device);
// Whether that fused walk (on sm_80+) runs on tensor cores: =tensor_cores (or its first name,
// tf32x3, once float32 only) always, =1 never (CUDA cores); unset, for T > 1 without a cross pair.
bool fused_cuda_on_tensor_cores(int64_t positions, bool cross);
// moment = sum_s g_s * h_s, sum = sum_s g_s over one chunk (+= when accumulate: a later chunk;
// else moment and sum need no zeroing); X, G (Xb, Gb): [S * groups, T, F].
void fused_moments_cuda(at::Tensor& moment, at::Tensor& sum, const at::Tensor& X, const at::Tensor& G,
                        const at::Tensor* Xb, const at::Tensor* Gb, int64_t groups, bool accumulate);
// Whether the per-sample squared norms of CUDA factors, where their direct form ||G_n^T X_n||^2 is
// the cheaper one, use the fused kernel (cuda/fused_moments.cu): only on request,
// GRADVAR_EXT_FUSED_CUDA=1 (0.3-0.7x cuBLAS's speed on an H100); else chunked bmm + row-wise dot.
bool use_fused_norms_cuda(const Factors& X);
// out[s] = sum over groups of ||G_s^T X_s||_F^2 for one chunk: X, G [S * groups, T, F]; out [S]
// (a contiguous view allowed). Allocates fused_squared_norms_partials(...) elements per sample.
void fused_squared_norms_cuda(at::Tensor& out, const at::Tensor& X, const at::Tensor& G, int64_t groups);
int64_t fused_squared_norms_partials(int64_t groups, int64_t I, int64_t O, at::ScalarType dtype);
// moment = sum_s g_s**2 and sum = sum_s g_s (sum may be undefined) with g_s = G_s^T X_s, X_s the
// patches of patches.image read in place by the tensor-core kernel (no unfolded copy): G
// [S * groups, T, O]; moment, sum [groups, O, I] (overwritten). False (nothing done) below sm_80.
bool fused_patch_moments_cuda(at::Tensor& moment, at::Tensor& sum, const PatchSource& patches, const at::Tensor& G,
                              int64_t groups);
// Whether the weighted products of CUDA factors with 1 < T <= fused_products_max_positions() use
// the fused kernel (cuda/fused_products.cu): only on request, GRADVAR_EXT_FUSED_BACKWARD_CUDA=1
// (2.5-2.9x slower than chunked bmm on an H100); else chunked bmm.
bool use_fused_products_cuda(const Factors& P);
int64_t fused_products_max_positions();
// out[n] = Z_n (W * (A_n^T B_n) - C) per sample: Z, A [N, T, R]; B, out [N, T, K]; W, C [R, K] (C may
// be undefined); any strides; T <= fused_products_max_positions().
void fused_weighted_product_cuda(at::Tensor& out, const at::Tensor& Z, const at::Tensor& A, const at::Tensor& B,
                                 const at::Tensor& W, const at::Tensor& C);
// cols [N, C*kh*kw, rows*out_width] = the columns of output rows [first_row, first_row + rows) of
// unfold(image [N, C, H, W]), as im2col_cpu's; image = fold(cols [N, C*kh*kw, out_height*out_width]),
// overwritten, as col2im_cpu's (cuda/unfold_kernels.cu; contiguous; GRADVAR_EXT_UNFOLD=im2col).
void im2col_rows_cuda(const at::Tensor& image, at::Tensor& cols, at::IntArrayRef kernel, at::IntArrayRef stride,
                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_width, int64_t first_row,
                      int64_t rows);
void col2im_cuda(const at::Tensor& cols, at::Tensor& image, at::IntArrayRef kernel, at::IntArrayRef stride,
                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_height, int64_t out_width);
void accumulate_products_cuda(at::Tensor& moment, at::Tensor& sum, const at::Tensor& g, const at::Tensor& gb);
void rowwise_dot_cuda(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);
#endif

// ---- Linear front door (registered ops) ----
at::Tensor linear_second_moment(const at::Tensor& input, const at::Tensor& grad_output);
at::Tensor linear_variance(const at::Tensor& input, const at::Tensor& grad_output);
at::Tensor linear_batch_l2(const at::Tensor& input, const at::Tensor& grad_output);
std::tuple<at::Tensor, at::Tensor> linear_moments(const at::Tensor& input, const at::Tensor& grad_output);
at::Tensor linear_cross_moment(const at::Tensor& input, const at::Tensor& grad_output,
                               const at::Tensor& other_input, const at::Tensor& other_grad_output);
at::Tensor weighted_gradient_product(const at::Tensor& left, const at::Tensor& input,
                                     const at::Tensor& grad_output, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& center);
std::tuple<at::Tensor, at::Tensor> weighted_gradient_products(const at::Tensor& left_grad_output,
                                                              const at::Tensor& left_input, const at::Tensor& input,
                                                              const at::Tensor& grad_output, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& center);

// ---- Conv2d front door (registered ops); conv = (kernel_size, stride, padding, dilation) ----
at::Tensor conv2d_second_moment(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups);
at::Tensor conv2d_variance(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
std::tuple<at::Tensor, at::Tensor> conv2d_moments(const at::Tensor& input, const at::Tensor& grad_output,
                                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
at::Tensor conv2d_batch_l2(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
at::Tensor conv2d_cross_moment(const at::Tensor& input, const at::Tensor& grad_output, const at::Tensor& other_input,
                               const at::Tensor& other_grad_output, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups);
at::Tensor conv2d_weighted_gradient_product(const at::Tensor& left, const at::Tensor& input,
                                            const at::Tensor& grad_output, const at::Tensor& weight,
                                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                            bool to_input, const std::optional<at::Tensor>& center);
std::tuple<at::Tensor, at::Tensor> conv2d_weighted_gradient_products(
    const at::Tensor& left_grad_output, const at::Tensor& left_input, const at::Tensor& input,
    const at::Tensor& grad_output, const at::Tensor& weight, const std::optional<at::Tensor>& center,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups);

}  // namespace gradvar
