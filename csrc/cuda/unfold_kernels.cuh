// The unfold / fold kernels of unfold_kernels.cu, as device code alone (no ATen, no CUDA
// runtime), so that tests/cuda_emulation.cpp compiles these very kernels for the CPU and runs
// their grids thread by thread against F.unfold / F.fold (tests/test_cuda_kernels_on_cpu.py):
// the index arithmetic, the bounds and the grid-stride loops are checked without a GPU.
// Layouts as at::im2col / at::col2im: image [N, C, H, W] contiguous, columns
// [N, C*kh*kw, rows*W_out] contiguous, row r = (c*kh + i)*kw + j holding
// image[c][y*sh - ph + i*dh][x*sw - pw + j*dw] at column (y - first_row)*W_out + x.
#pragma once

#include <algorithm>
#include <cstdint>

namespace gradvar {
namespace unfold {

struct Geometry {
  int64_t C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, Wo;
};

constexpr int kThreads = 256;

// cols[r, p] for one columns row r = (n*C + c)*kh*kw + i*kw + j per blockIdx.y (grid-strided
// over rows past 65535), the row's rows*W_out positions p over blockIdx.x and the threads: one
// 32-bit division per element (p -> y, x; a plane's sizes are < 2^31), writes coalesced, reads
// coalesced along x for stride 1. Memory: the columns only. 0 where the tap falls in the padding.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    im2col_rows_kernel(const scalar_t* __restrict__ image, scalar_t* __restrict__ cols, Geometry g, int64_t rows_total,
                       int64_t first_row, int64_t positions) {
  const int kk = static_cast<int>(g.kh * g.kw), kw = static_cast<int>(g.kw), H = static_cast<int>(g.H);
  const int W = static_cast<int>(g.W), Wo = static_cast<int>(g.Wo), count = static_cast<int>(positions);
  for (int64_t r = blockIdx.y; r < rows_total; r += gridDim.y) {
    const int64_t plane = r / kk;  // n * C + c
    const int tap = static_cast<int>(r - plane * kk), i = tap / kw, j = tap - i * kw;
    const int y0 = static_cast<int>(first_row * g.sh - g.ph) + i * static_cast<int>(g.dh);  // input row of p's y = 0
    const int x0 = j * static_cast<int>(g.dw) - static_cast<int>(g.pw);
    const scalar_t* src = image + plane * g.H * g.W;
    scalar_t* dst = cols + r * positions;
    for (int p = blockIdx.x * kThreads + threadIdx.x; p < count; p += gridDim.x * kThreads) {
      const int y = p / Wo, x = p - y * Wo;
      const int yin = y0 + y * static_cast<int>(g.sh), xin = x0 + x * static_cast<int>(g.sw);
      dst[p] = (yin >= 0 && yin < H && xin >= 0 && xin < W) ? src[yin * W + xin] : scalar_t(0);
    }
  }
}

// image[plane, yin, xin] = sum over the taps (i, j) whose output pixel (y, x) reads it of
// cols[plane*kh*kw + i*kw + j, y*W_out + x]: one thread per image pixel, gathering in a fixed
// order (no atomics: deterministic), overwriting the image; 32-bit arithmetic inside a plane.
// Memory: none beyond its arguments.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    col2im_kernel(const scalar_t* __restrict__ cols, scalar_t* __restrict__ image, Geometry g, int64_t pixels,
                  int64_t Ho, int64_t L) {
  const int kh = static_cast<int>(g.kh), kw = static_cast<int>(g.kw);
  const int W = static_cast<int>(g.W), Wo = static_cast<int>(g.Wo), Hout = static_cast<int>(Ho);
  const int sh = static_cast<int>(g.sh), sw = static_cast<int>(g.sw), dh = static_cast<int>(g.dh);
  const int dw = static_cast<int>(g.dw), ph = static_cast<int>(g.ph), pw = static_cast<int>(g.pw);
  const int64_t plane_pixels = g.H * g.W;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < pixels; e += int64_t(gridDim.x) * kThreads) {
    const int64_t plane = e / plane_pixels;
    const int rem = static_cast<int>(e - plane * plane_pixels), yin = rem / W, xin = rem - yin * W;
    const scalar_t* src = cols + plane * kh * kw * L;
    scalar_t acc = 0;
    for (int i = 0; i < kh; ++i) {
      const int ys = yin + ph - i * dh;  // = y * sh
      if (ys < 0 || ys % sh != 0 || ys / sh >= Hout) continue;
      const int y = ys / sh;
      for (int j = 0; j < kw; ++j) {
        const int xs = xin + pw - j * dw;  // = x * sw
        if (xs < 0 || xs % sw != 0 || xs / sw >= Wo) continue;
        acc += src[(i * kw + j) * L + y * Wo + xs / sw];
      }
    }
    image[e] = acc;
  }
}

// Launch shapes (the host side's, and the emulator's).
inline dim3 im2col_grid(int64_t rows_total, int64_t positions) {
  return dim3(static_cast<unsigned>(std::min<int64_t>((positions + kThreads - 1) / kThreads, 1024)),
              static_cast<unsigned>(std::min<int64_t>(rows_total, 65535)));
}
inline unsigned col2im_blocks(int64_t pixels) {
  return static_cast<unsigned>(std::min<int64_t>((pixels + kThreads - 1) / kThreads, 65535));
}

}  // namespace unfold
}  // namespace gradvar
