// The CUDA unfold / fold kernels (csrc/cuda/unfold_kernels.cuh) compiled for the CPU: CUDA's
// built-ins become host variables and each kernel runs its grid block by block, thread by thread.
// Exact for kernels without shared memory, barriers or atomics, as these are. Built and loaded by
// tests/test_cuda_kernels_on_cpu.py (ctypes); `grid_cap` > 0 shrinks each grid dimension to that
// many blocks, so that small inputs run the grid-stride loops too.
#include <algorithm>
#include <cstdint>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
static dim3 blockIdx, threadIdx, gridDim;
#define __global__
#define __launch_bounds__(threads)

#include "unfold_kernels.cuh"

namespace {

using gradvar::unfold::Geometry;
using gradvar::unfold::kThreads;

Geometry geometry(const int64_t* g) { return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]}; }

template <typename Kernel>
void run_grid(dim3 grid, int64_t grid_cap, Kernel&& kernel) {
  if (grid_cap > 0) grid = dim3(std::min<unsigned>(grid.x, grid_cap), std::min<unsigned>(grid.y, grid_cap));
  gridDim = grid;
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      for (unsigned tx = 0; tx < unsigned(kThreads); ++tx) {
        blockIdx = dim3(bx, by);
        threadIdx = dim3(tx);
        kernel();
      }
    }
  }
}

template <typename T>
void im2col_rows(const T* image, T* cols, const int64_t* g, int64_t images, int64_t first_row, int64_t rows,
                 int64_t grid_cap) {
  const Geometry geo = geometry(g);
  const int64_t planes = images * geo.C, positions = rows * geo.Wo;
  if (planes == 0 || positions == 0) return;  // as the host side
  run_grid(dim3(gradvar::unfold::im2col_blocks(planes, positions)), grid_cap, [&] {
    gradvar::unfold::im2col_rows_kernel<T>(image, cols, geo, planes, first_row, positions);
  });
}

template <typename T>
void col2im(const T* cols, T* image, const int64_t* g, int64_t images, int64_t out_height, int64_t grid_cap) {
  const Geometry geo = geometry(g);
  const int64_t pixels = images * geo.C * geo.H * geo.W;
  if (pixels == 0) return;
  run_grid(dim3(gradvar::unfold::col2im_blocks(pixels)), grid_cap, [&] {
    gradvar::unfold::col2im_kernel<T>(cols, image, geo, pixels, out_height, out_height * geo.Wo);
  });
}

}  // namespace

// g: the 12 Geometry fields (C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, W_out).
extern "C" {
void im2col_rows_f32(const float* image, float* cols, const int64_t* g, int64_t images, int64_t first_row,
                     int64_t rows, int64_t grid_cap) {
  im2col_rows(image, cols, g, images, first_row, rows, grid_cap);
}
void im2col_rows_f64(const double* image, double* cols, const int64_t* g, int64_t images, int64_t first_row,
                     int64_t rows, int64_t grid_cap) {
  im2col_rows(image, cols, g, images, first_row, rows, grid_cap);
}
void col2im_f32(const float* cols, float* image, const int64_t* g, int64_t images, int64_t out_height,
                int64_t grid_cap) {
  col2im(cols, image, g, images, out_height, grid_cap);
}
void col2im_f64(const double* cols, double* image, const int64_t* g, int64_t images, int64_t out_height,
                int64_t grid_cap) {
  col2im(cols, image, g, images, out_height, grid_cap);
}
}
