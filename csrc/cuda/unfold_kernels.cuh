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

// cols[plane*kh*kw + i*kw + j, p] for plane = n*C + c and the slab's positions p = (y - first_row)*W_out
// + x: one thread per (plane, p) over a flat, grid-strided index, writing all kh*kw taps of its
// position (one pair of divisions per kh*kw elements; a warp's writes coalesced per tap, its reads
// along x for stride 1; the taps re-read neighbouring pixels from cache). 0 where the tap falls in
// the padding. Memory: the columns only. (The first form, a block row per columns row and one
// element a thread, took 132 us on an H100 where the default's strided copy took 75.)
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    im2col_rows_kernel(const scalar_t* __restrict__ image, scalar_t* __restrict__ cols, Geometry g, int64_t planes,
                       int64_t first_row, int64_t positions) {
  const int kh = static_cast<int>(g.kh), kw = static_cast<int>(g.kw), H = static_cast<int>(g.H);
  const int W = static_cast<int>(g.W), Wo = static_cast<int>(g.Wo), sh = static_cast<int>(g.sh);
  const int sw = static_cast<int>(g.sw), dh = static_cast<int>(g.dh), dw = static_cast<int>(g.dw);
  const int row0 = static_cast<int>(first_row * g.sh - g.ph), pw = static_cast<int>(g.pw);
  const int64_t total = planes * positions;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads) {
    const int64_t plane = e / positions;
    const int p = static_cast<int>(e - plane * positions), y = p / Wo, x = p - y * Wo;
    const int yfirst = row0 + y * sh, xfirst = x * sw - pw;
    const scalar_t* src = image + plane * g.H * g.W;
    scalar_t* dst = cols + plane * g.kh * g.kw * positions + p;
    for (int i = 0; i < kh; ++i) {
      const int yin = yfirst + i * dh;
      const bool row_inside = yin >= 0 && yin < H;
      for (int j = 0; j < kw; ++j, dst += positions) {
        const int xin = xfirst + j * dw;
        *dst = (row_inside && xin >= 0 && xin < W) ? src[yin * W + xin] : scalar_t(0);
      }
    }
  }
}

// image[plane, yin, xin] = sum over the taps (i, j) whose output pixel (y, x) reads it of
// cols[plane*kh*kw + i*kw + j, y*W_out + x]: one thread per image pixel, gathering in a fixed
// order (no atomics: deterministic), overwriting the image; 32-bit arithmetic inside a plane.
// Stride 1 (the common case) needs no division per tap: 2 per pixel instead of 4 per tap (36 for
// 3x3), which would cost more issue slots than the columns' reads. Memory: none beyond its arguments.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    col2im_kernel(const scalar_t* __restrict__ cols, scalar_t* __restrict__ image, Geometry g, int64_t pixels,
                  int64_t Ho, int64_t L) {
  const int kh = static_cast<int>(g.kh), kw = static_cast<int>(g.kw);
  const int W = static_cast<int>(g.W), Wo = static_cast<int>(g.Wo), Hout = static_cast<int>(Ho);
  const int sh = static_cast<int>(g.sh), sw = static_cast<int>(g.sw), dh = static_cast<int>(g.dh);
  const int dw = static_cast<int>(g.dw), ph = static_cast<int>(g.ph), pw = static_cast<int>(g.pw);
  const int64_t plane_pixels = g.H * g.W;
  const bool unit_stride = sh == 1 && sw == 1;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < pixels; e += int64_t(gridDim.x) * kThreads) {
    const int64_t plane = e / plane_pixels;
    const int rem = static_cast<int>(e - plane * plane_pixels), yin = rem / W, xin = rem - yin * W;
    const scalar_t* src = cols + plane * kh * kw * L;
    scalar_t acc = 0;
    if (unit_stride) {  // uniform across the grid: no divergence
      for (int i = 0; i < kh; ++i) {
        const int y = yin + ph - i * dh;
        if (y < 0 || y >= Hout) continue;
        for (int j = 0; j < kw; ++j) {
          const int x = xin + pw - j * dw;
          if (x >= 0 && x < Wo) acc += src[(i * kw + j) * L + y * Wo + x];
        }
      }
    } else {
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
    }
    image[e] = acc;
  }
}

// Launch shapes (the host side's, and the emulator's).
inline unsigned im2col_blocks(int64_t planes, int64_t positions) {
  return static_cast<unsigned>(std::min<int64_t>((planes * positions + kThreads - 1) / kThreads, 65535));
}
inline unsigned col2im_blocks(int64_t pixels) {
  return static_cast<unsigned>(std::min<int64_t>((pixels + kThreads - 1) / kThreads, 65535));
}

}  // namespace unfold
}  // namespace gradvar
