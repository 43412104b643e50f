// Conv2d per-sample gradients and the backward's products by shifted kernel rows
// (GRADVAR_EXT_CONV_ALGORITHM=shifted, opt-in; conv2d_ops.cpp, conv_path): the front door's
// third way, beside unfold and grouped.
//
// The kernel's rows as shifted GEMMs over images unfolded along their width only. With
//   X1_n = the (1 x kw) patches of the height-padded image, positions fastest: [C_in/g * kw, Hp * W_out]
// (Hp = H + 2 pad_h rows, the layer's width stride, padding and dilation), output pixel (oh, ow) of
// kernel row i reads X1_n's position (oh * s + i * dil_h) * W_out + ow (s = stride_h). For s = 1,
// all pixels at once read X1_n's positions [i * dil_h * W_out, + H_out * W_out): a strided view.
// For s > 1, X1_n's rows are stored phase-major (padded row h = r * s + p at phase p, row r: s
// blocks of R = ceil(Hp / s) rows), so that kernel row i reads phase p = (i * dil_h) % s from row
// q = (i * dil_h) / s on: again H_out * W_out consecutive positions. So
//   g_n[:, (c, i, j)] = G_n^T X1_n[from shift(i)]   one bmm per kernel row,
// the same FLOPs as the unfolded path, with kw (not kh * kw) copies of the image formed. A chunk's
// gradients come kernel-row-major, [n * groups, kh, C_out/g, C_in/g * kw]: statistics reduced over
// samples are elementwise, so the core reduces them in that order and from_shifted() restores
// the weight's (c, i, j) order once; the backward's products take W and the center in that order
// (to_shifted) and go kernel row by kernel row too (shifted_to_grad_output, shifted_to_input).
// Extra memory per chunk (the core's budget): its X1, the zero-padded images X1 is copied from by
// strided views, the gradients, and on the CPU one kernel row's product at a time (CPU bmm into a
// strided result loops over the batch, one GEMM per sample: a contiguous product, then a copy;
// cuBLAS writes the strided rows in place).
#include <ATen/ATen.h>

#include <memory>

#include "conv2d_parts.h"

namespace gradvar {
namespace conv {
namespace {

// Where kernel row i's patches start among X1's positions; the (1 x kw) unfolding's geometry.
struct RowShifts {
  ConvGeometry width;  // the (1 x kw) unfolding: out_height = Hp rows
  int64_t phase_rows;  // R = ceil(Hp / s) (Hp for s = 1)
  int64_t shift(int64_t i, const ConvGeometry& c) const {
    const int64_t offset = i * c.dilation[0], s = c.stride[0];
    return ((offset % s) * phase_rows + offset / s) * c.out_width;
  }
};

RowShifts row_shifts(const ConvGeometry& c) {
  ConvGeometry w = c;
  w.kernel = {1, c.kernel[1]};
  w.stride = {1, c.stride[1]};
  w.dilation = {1, c.dilation[1]};
  w.out_height = c.height + 2 * c.padding[0];  // every padded row; out_width is the layer's
  return {w, (w.out_height + c.stride[0] - 1) / c.stride[0]};
}

// X1 of images [n, C_in, H, W] as [n * groups, s * R * W_out, C_in/g * kw] (a transposed view of
// positions-fastest columns). s = 1: the device's unfolding of the (1 x kw) geometry; s > 1: the
// phase-major rows by strided views of the zero-padded images, one copy.
at::Tensor width_columns(const at::Tensor& images, const ConvGeometry& c, const RowShifts& r) {
  const auto& w = r.width;
  if (c.stride[0] == 1) {
    if (unfold_with_im2col(images)) return im2col_columns(images, w, 0, w.out_height);
    return unfold_rows(images, w, 0, w.out_height);
  }
  const int64_t n = images.size(0), s = c.stride[0], rows = r.phase_rows * s;
  const int64_t span_w = c.dilation[1] * (c.kernel[1] - 1) + 1;
  const auto padded = at::constant_pad_nd(
      images, {c.padding[1], c.padding[1], c.padding[0], c.padding[0] + rows - w.out_height}, 0);  // [n, C, R*s, Wp]
  return padded.unfold(3, span_w, c.stride[1])
      .slice(4, 0, span_w, c.dilation[1])                      // [n, C, R*s, W_out, kw]
      .unflatten(2, {r.phase_rows, s})                         // [n, C, R, s, W_out, kw]
      .unflatten(1, {c.groups, c.in_channels / c.groups})      // [n, g, C/g, R, s, W_out, kw]
      .permute({0, 1, 2, 6, 4, 3, 5})                          // [n, g, C/g, kw, s, R, W_out]
      .reshape({n * c.groups, w.patch(), rows * c.out_width})  // the copy
      .transpose(1, 2);
}

// Elements width_columns forms per sample: X1, and the zero-padded images it is copied from by
// strided views (none for s = 1 without padding, or with the im2col kernel; counted anyway).
int64_t width_columns_scratch(const ConvGeometry& c, const RowShifts& r) {
  const int64_t rows = r.phase_rows * c.stride[0];
  return c.groups * r.width.patch() * rows * c.out_width + c.in_channels * rows * (c.width + 2 * c.padding[1]);
}

// out = a @ b (add: out += a @ b) for out a strided view (a kernel row of a contiguous buffer):
// cuBLAS writes the strided rows in place; CPU bmm into a strided result loops over the batch, one
// GEMM per sample, so there a contiguous product, then the copy / the addition.
void bmm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool add) {
  if (out.is_cuda() && add) {
    out.baddbmm_(a, b);
  } else if (out.is_cuda()) {
    at::bmm_out(out, a, b);
  } else if (add) {
    out.add_(at::bmm(a, b));
  } else {
    out.copy_(at::bmm(a, b));
  }
}

}  // namespace

// keep, when given, receives each chunk's X1 (for the products towards grad_output when their left
// factor is the input itself: the variance's backward).
GradientChunks shifted_gradients(const at::Tensor& input, const at::Tensor& grad_output, const ConvGeometry& c,
                                 std::shared_ptr<at::Tensor> keep) {
  const auto x = input.contiguous(), go = grad_output.contiguous();
  const auto r = row_shifts(c);
  const int64_t g = c.groups, rows = c.out_channels / g, f1 = r.width.patch(), L = c.positions(), kh = c.kernel[0];
  const int64_t gradient_rows = kh + (x.is_cpu() ? 1 : 0);  // the CPU's contiguous kernel-row product
  auto buf = std::make_shared<at::Tensor>();
  return GradientChunks{
      x.size(0), g, rows, c.patch(), x.options(), width_columns_scratch(c, r) + g * gradient_rows * rows * f1,
      x.size(0),
      [x, go, c, r, g, rows, f1, L, kh, buf, keep](int64_t start, int64_t n) {
        const auto X1 = width_columns(x.narrow(0, start, n), c, r);  // [n*g, s*R*W_out, f1]
        if (keep) *keep = X1;
        const auto Gt = go.narrow(0, start, n).view({n * g, rows, L});  // G_n^T
        if (!buf->defined() || buf->size(0) < n * g) *buf = at::empty({n * g, kh, rows, f1}, x.options());
        auto out = buf->narrow(0, 0, n * g);
        for (int64_t i = 0; i < kh; ++i) bmm_into(out.select(1, i), Gt, X1.narrow(1, r.shift(i, c), L), false);
        return out.view({n * g, rows, kh * f1});  // kernel-row-major (see above), not [rows, (c, i, j)]
      }};
}

// A reduced [groups, C_out/g, patch] of shifted_gradients' chunks, back in the weight's (c, i, j) order.
at::Tensor from_shifted(const at::Tensor& reduced, const ConvGeometry& c) {
  const int64_t g = c.groups, rows = c.out_channels / g;
  return reduced.view({g, c.kernel[0], rows, c.in_channels / g, c.kernel[1]})
      .permute({0, 2, 3, 1, 4})
      .reshape({g, rows, c.patch()});
}

// The inverse for weight-shaped [groups, C_out/g, patch] factors of the products (W, center):
// in the shifted chunks' order (undefined stays undefined).
at::Tensor to_shifted(const at::Tensor& per_group, const ConvGeometry& c) {
  if (!per_group.defined()) return per_group;
  const int64_t g = c.groups, rows = c.out_channels / g;
  return per_group.reshape({g, rows, c.in_channels / g, c.kernel[0], c.kernel[1]})
      .permute({0, 3, 1, 2, 4})
      .reshape({g, rows, c.patch()});
}

// The products of h_n = W * g_n - center in the shifted order ([n * groups, kh, C_out/g, f1]),
// kernel row by kernel row, as shifted_gradients forms g_n:
//   towards grad_output: out_n = sum_i h_n,i X1_left,n[from shift(i)]^T      [C_out/g, L]
//   towards the input:   dX1_n[from shift(i)] += h_n,i^T G_left,n, i = 0 .. kh-1, then dX1_n
//                        folded back along the width (kw taps) and cropped    [C_in, H, W]
// (the unfolded path's X_left h^T and fold(G_left h) with kw copies of the image, not kh * kw).
WeightedConsumer shifted_to_grad_output(const at::Tensor& left_input, std::shared_ptr<at::Tensor> reuse,
                                        at::Tensor& out, const ConvGeometry& c) {
  const auto left = left_input.contiguous();
  const auto r = row_shifts(c);
  const int64_t g = c.groups, rows = c.out_channels / g, f1 = r.width.patch(), L = c.positions(), kh = c.kernel[0];
  return WeightedConsumer{reuse ? 0 : width_columns_scratch(c, r), [left, reuse, &out, c, r, g, rows, f1, L, kh](
                                                                       int64_t start, int64_t n, const at::Tensor& h) {
                            const auto X1 = reuse ? *reuse : width_columns(left.narrow(0, start, n), c, r);
                            const auto hv = h.view({n * g, kh, rows, f1});
                            auto dst = out.narrow(0, start, n).view({n * g, rows, L});
                            for (int64_t i = 0; i < kh; ++i) {
                              const auto patches = X1.narrow(1, r.shift(i, c), L).transpose(1, 2);  // [n*g, f1, L]
                              if (i == 0) {
                                at::bmm_out(dst, hv.select(1, 0), patches);
                              } else {
                                dst.baddbmm_(hv.select(1, i), patches);
                              }
                            }
                          }};
}

namespace {

// dX1 [n * groups, f1, s * R * W_out] (positions fastest, rows phase-major for s > 1) folded into
// images [n, C_in, H, W] (overwritten) as a (1 x kw) convolution's columns, by the device's col2im
// or strided views: s = 1 straight into the images (the fold drops the padded rows); s > 1 into
// the padded rows in phase-major order ([n, C_in, s, R, W]: phase p, row q is padded row
// q * s + p), then each phase's rows inside the image copied to their places.
void fold_width(const at::Tensor& cols, at::Tensor images, const ConvGeometry& c, const RowShifts& r) {
  const int64_t n = images.size(0), s = c.stride[0], R = r.phase_rows;
  ConvGeometry w = r.width;
  at::Tensor phases = images;
  if (s > 1) {  // the phase-major rows as the image of a (1 x kw) convolution without height padding
    w.height = w.out_height = s * R;
    w.padding = {0, c.padding[1]};
    phases = at::empty({n, c.in_channels, s * R, c.width}, cols.options());
  }
  const auto values = cols.view({n, c.in_channels * c.kernel[1], w.positions()});
  if (unfold_with_im2col(images)) {
    col2im(values, phases, w);
  } else {
    fold_strided(values, phases, w);
  }
  if (s == 1) return;
  const auto by_phase = phases.view({n, c.in_channels, s, R, c.width});
  for (int64_t p = 0; p < s; ++p) {  // image row h = q * s + p - pad_h, from the first q with h >= 0
    const int64_t q0 = (c.padding[0] - p + s - 1) / s, h0 = q0 * s + p - c.padding[0];
    if (h0 >= c.height) continue;
    images.slice(2, h0, c.height, s).copy_(by_phase.select(2, p).narrow(2, q0, (c.height - h0 + s - 1) / s));
  }
}

}  // namespace

WeightedConsumer shifted_to_input(const at::Tensor& left_grad_output, at::Tensor& out, const ConvGeometry& c) {
  const auto left = left_grad_output.contiguous();
  const auto r = row_shifts(c);
  const int64_t g = c.groups, rows = c.out_channels / g, f1 = r.width.patch(), L = c.positions(), kh = c.kernel[0];
  const int64_t L1 = r.phase_rows * c.stride[0] * c.out_width;
  auto buf = std::make_shared<at::Tensor>();
  const int64_t cpu_row = left.is_cpu() ? g * f1 * L : 0;  // the CPU's contiguous kernel-row product
  return WeightedConsumer{width_columns_scratch(c, r) + cpu_row, [left, &out, c, r, g, rows, f1, L, L1, kh, buf](
                                                           int64_t start, int64_t n, const at::Tensor& h) {
                            if (!buf->defined() || buf->size(0) < n * g) {
                              *buf = at::empty({n * g, f1, L1}, left.options());
                            }
                            auto cols = buf->narrow(0, 0, n * g).zero_();
                            const auto hv = h.view({n * g, kh, rows, f1});
                            const auto G = left.narrow(0, start, n).view({n * g, rows, L});
                            for (int64_t i = 0; i < kh; ++i) {
                              bmm_into(cols.narrow(2, r.shift(i, c), L), hv.select(1, i).transpose(1, 2), G, true);
                            }
                            fold_width(cols, out.narrow(0, start, n), c, r);
                          }};
}

}  // namespace conv
}  // namespace gradvar
