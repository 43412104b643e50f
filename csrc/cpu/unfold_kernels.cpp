// CPU unfolding for the Conv2d front door (ATen's CPU im2col runs at ~1.5 GB/s on one thread).
// Layouts as at::im2col / at::col2im: image [N, C, H, W], columns [N, C*kh*kw, H_out*W_out],
// row r = (c*kh + i)*kw + j holds image[c][y*sh - ph + i*dh][x*sw - pw + j*dw] at column y*W_out + x.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstring>

#include "../outer_product_stats.h"

namespace gradvar {
namespace {

struct Geometry {
  int64_t C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
};

Geometry geometry(const at::Tensor& image, at::IntArrayRef kernel, at::IntArrayRef stride, at::IntArrayRef padding,
                  at::IntArrayRef dilation, int64_t Ho, int64_t Wo) {
  return {image.size(1), image.size(2), image.size(3), kernel[0], kernel[1], stride[0], stride[1],
          padding[0],    padding[1],    dilation[0],   dilation[1], Ho,       Wo};
}

// Output columns x in [x0, x1) read inside the image row for kernel column j.
void valid_columns(const Geometry& g, int64_t j, int64_t& x0, int64_t& x1) {
  const int64_t first = g.pw - j * g.dw;  // x * sw >= first
  x0 = first <= 0 ? 0 : (first + g.sw - 1) / g.sw;
  const int64_t last = g.W - 1 + g.pw - j * g.dw;  // x * sw <= last
  x1 = last < 0 ? 0 : last / g.sw + 1;
  x0 = std::min(x0, g.Wo);
  x1 = std::clamp(x1, x0, g.Wo);
}

}  // namespace

// cols = unfold(image). Threads split the N * C * kh * kw rows; stride-1 rows are plain copies.
void im2col_cpu(const at::Tensor& image, at::Tensor& cols, at::IntArrayRef kernel, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_height, int64_t out_width) {
  const int64_t N = image.size(0), L = cols.size(2);
  const Geometry g = geometry(image, kernel, stride, padding, dilation, out_height, out_width);
  const int64_t kk = g.kh * g.kw;
  AT_DISPATCH_FLOATING_TYPES(image.scalar_type(), "im2col_cpu", [&] {
    const scalar_t* src_all = image.const_data_ptr<scalar_t>();
    scalar_t* dst_all = cols.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * g.C * kk, 8, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t plane = r / kk, i = (r % kk) / g.kw, j = r % g.kw;  // plane = n * C + c
        const scalar_t* src = src_all + plane * g.H * g.W;
        scalar_t* dst = dst_all + r * L;
        int64_t x0, x1;
        valid_columns(g, j, x0, x1);
        for (int64_t y = 0; y < g.Ho; ++y) {
          scalar_t* out = dst + y * g.Wo;
          const int64_t yin = y * g.sh - g.ph + i * g.dh;
          if (yin < 0 || yin >= g.H) {
            std::fill(out, out + g.Wo, scalar_t(0));
            continue;
          }
          const scalar_t* row = src + yin * g.W;
          const int64_t shift = j * g.dw - g.pw;  // input column of output column x: x * sw + shift
          std::fill(out, out + x0, scalar_t(0));
          if (g.sw == 1) {
            if (x1 > x0) std::memcpy(out + x0, row + x0 + shift, sizeof(scalar_t) * (x1 - x0));
          } else {
            for (int64_t x = x0; x < x1; ++x) out[x] = row[x * g.sw + shift];
          }
          std::fill(out + x1, out + g.Wo, scalar_t(0));
        }
      }
    });
  });
}

// image = fold(cols) (sums overlapping patches). Threads split the N * C image planes, so each
// output pixel is written by one thread in a fixed order: no atomics, deterministic.
void col2im_cpu(const at::Tensor& cols, at::Tensor& image, at::IntArrayRef kernel, at::IntArrayRef stride,
                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t out_height, int64_t out_width) {
  const int64_t N = image.size(0), L = cols.size(2);
  const Geometry g = geometry(image, kernel, stride, padding, dilation, out_height, out_width);
  const int64_t kk = g.kh * g.kw;
  AT_DISPATCH_FLOATING_TYPES(cols.scalar_type(), "col2im_cpu", [&] {
    const scalar_t* src_all = cols.const_data_ptr<scalar_t>();
    scalar_t* dst_all = image.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * g.C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        scalar_t* dst = dst_all + plane * g.H * g.W;
        std::fill(dst, dst + g.H * g.W, scalar_t(0));
        for (int64_t i = 0; i < g.kh; ++i) {
          for (int64_t j = 0; j < g.kw; ++j) {
            const scalar_t* src = src_all + (plane * kk + i * g.kw + j) * L;
            int64_t x0, x1;
            valid_columns(g, j, x0, x1);
            for (int64_t y = 0; y < g.Ho; ++y) {
              const int64_t yin = y * g.sh - g.ph + i * g.dh;
              if (yin < 0 || yin >= g.H) continue;
              scalar_t* row = dst + yin * g.W;
              const int64_t shift = j * g.dw - g.pw;
              const scalar_t* in = src + y * g.Wo;
              for (int64_t x = x0; x < x1; ++x) row[x * g.sw + shift] += in[x];
            }
          }
        }
      }
    });
  });
}

}  // namespace gradvar
