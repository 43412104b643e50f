// The CUDA kernels that are device code alone (csrc/cuda/unfold_kernels.cuh, reduce_kernels.cuh)
// compiled for the CPU: CUDA's built-ins become thread-local host variables and each kernel runs
// its grid block by block. Kernels without shared memory or barriers run thread by thread; the
// one with them (the sliced accumulate) runs each block's threads as OS threads, __shared__
// arrays as the block's statics (blocks run one after another) and __syncthreads as a barrier.
// Built and loaded by tests/test_cuda_kernels_on_cpu.py (ctypes); `grid_cap` > 0 shrinks each
// grid dimension to that many blocks, so that small inputs run the grid-stride loops too.
#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
static thread_local dim3 blockIdx, threadIdx, gridDim, blockDim;
#define __global__
#define __launch_bounds__(threads)
#define __shared__ static

// All threads of the running block wait here until every one has arrived.
class BlockBarrier {
 public:
  explicit BlockBarrier(int threads) : threads_(threads) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const long generation = generation_;
    if (++arrived_ == threads_) {
      arrived_ = 0;
      ++generation_;
      all_arrived_.notify_all();
    } else {
      all_arrived_.wait(lock, [&] { return generation != generation_; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  int threads_, arrived_ = 0;
  long generation_ = 0;
};
static BlockBarrier* block_barrier = nullptr;
inline void __syncthreads() { block_barrier->wait(); }

#include "reduce_kernels.cuh"
#include "unfold_kernels.cuh"

namespace {

using gradvar::unfold::Geometry;
using gradvar::unfold::kThreads;

Geometry geometry(const int64_t* g) { return {g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]}; }

template <typename Kernel>
void run_grid(dim3 grid, int64_t grid_cap, Kernel&& kernel, unsigned threads = kThreads) {
  if (grid_cap > 0) grid = dim3(std::min<unsigned>(grid.x, grid_cap), std::min<unsigned>(grid.y, grid_cap));
  gridDim = grid;
  blockDim = dim3(threads);
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      for (unsigned tx = 0; tx < threads; ++tx) {
        blockIdx = dim3(bx, by);
        threadIdx = dim3(tx);
        kernel();
      }
    }
  }
}

// The same for a kernel with barriers: a block's threads as OS threads, one block at a time.
template <typename Kernel>
void run_grid_with_barriers(dim3 grid, int64_t grid_cap, unsigned threads, Kernel&& kernel) {
  if (grid_cap > 0) grid = dim3(std::min<unsigned>(grid.x, grid_cap), std::min<unsigned>(grid.y, grid_cap));
  for (unsigned by = 0; by < grid.y; ++by) {
    for (unsigned bx = 0; bx < grid.x; ++bx) {
      BlockBarrier barrier(static_cast<int>(threads));
      block_barrier = &barrier;
      std::vector<std::thread> block;
      for (unsigned tx = 0; tx < threads; ++tx) {
        block.emplace_back([&, tx] {
          gridDim = grid;
          blockDim = dim3(threads);
          blockIdx = dim3(bx, by);
          threadIdx = dim3(tx);
          kernel();
        });
      }
      for (auto& thread : block) thread.join();
      block_barrier = nullptr;
    }
  }
}

// kernel: 0 the column kernel, 1 the sliced one, 2 the wide one (the column kernel where it does not fit).
template <typename T>
void accumulate(const T* g, const T* gb, T* moment, T* sum, int64_t rows, int64_t F, int64_t kernel,
                int64_t grid_cap) {
  if (F == 0) return;  // as the host side
  using namespace gradvar::reduce;
  if (kernel == 1) {  // the host side's grids (reduce_kernels.cu)
    run_grid_with_barriers(dim3(accumulate_sliced_blocks(F)), grid_cap, kAccumulateThreads, [&] {
      accumulate_products_sliced_kernel<T, kSlicedColumns, kSlices>(g, gb, moment, sum, rows, F);
    });
  } else if (kernel == 2 && accumulate_wide_fits<T>(g, gb, moment, sum, F)) {
    run_grid(
        dim3(accumulate_wide_blocks<T>(F)), grid_cap,
        [&] {
          if (g == gb) {
            accumulate_products_wide_kernel<T, true>(g, gb, moment, sum, rows, F);
          } else {
            accumulate_products_wide_kernel<T, false>(g, gb, moment, sum, rows, F);
          }
        },
        kAccumulateThreads);
  } else {
    run_grid(
        dim3(accumulate_blocks(F)), grid_cap, [&] { accumulate_products_kernel<T>(g, gb, moment, sum, rows, F); },
        kAccumulateThreads);
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
// moment += sum_k g * gb, sum += sum_k g (sum may be null) over g, gb [rows, F]; kernel: 0 columns,
// 1 sliced, 2 wide (accumulate() above).
void accumulate_f32(const float* g, const float* gb, float* moment, float* sum, int64_t rows, int64_t F,
                    int64_t kernel, int64_t grid_cap) {
  accumulate(g, gb, moment, sum, rows, F, kernel, grid_cap);
}
void accumulate_f64(const double* g, const double* gb, double* moment, double* sum, int64_t rows, int64_t F,
                    int64_t kernel, int64_t grid_cap) {
  accumulate(g, gb, moment, sum, rows, F, kernel, grid_cap);
}
}
