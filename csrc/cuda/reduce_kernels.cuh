// The accumulate kernels of reduce_kernels.cu, as device code alone (no ATen, no CUDA runtime),
// so that tests/cuda_emulation.cpp compiles these very kernels for the CPU and runs their grids
// (the sliced one with a thread per CUDA thread and a real barrier) against torch
// (tests/test_cuda_kernels_on_cpu.py).
#pragma once

#include <algorithm>
#include <cstdint>

namespace gradvar {
namespace reduce {

// Launch shapes, shared by the host side and the emulation: 256 threads a block, one a column
// (accumulate_products_kernel) or kSlices a column over kSlicedColumns columns (the sliced one).
constexpr int kAccumulateThreads = 256;
constexpr int kSlicedColumns = 32, kSlices = kAccumulateThreads / kSlicedColumns;
inline unsigned accumulate_blocks(int64_t F) {
  return static_cast<unsigned>(std::min<int64_t>((F + kAccumulateThreads - 1) / kAccumulateThreads, 65535));
}
inline unsigned accumulate_sliced_blocks(int64_t F) {
  return static_cast<unsigned>(std::min<int64_t>((F + kSlicedColumns - 1) / kSlicedColumns, 65535));
}
// The wide kernel: kAccumulateThreads a block, 16 bytes of adjacent columns a thread.
template <typename scalar_t>
constexpr int kWideColumns = 16 / static_cast<int>(sizeof(scalar_t));
template <typename scalar_t>
inline unsigned accumulate_wide_blocks(int64_t F) {
  return accumulate_blocks(F / kWideColumns<scalar_t>);
}
// Whether the wide kernel applies: whole packs of 16 bytes, every pointer 16-byte aligned (sum may be null).
template <typename scalar_t>
inline bool accumulate_wide_fits(const void* g, const void* gb, const void* moment, const void* sum, int64_t F) {
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return F % kWideColumns<scalar_t> == 0 && aligned(g) && aligned(gb) && aligned(moment) && aligned(sum);
}
// The default: the sliced kernel when the one-thread-a-column grid would have under 512 blocks
// (~4 a multiprocessor on an H100), the wide kernel above (the column kernel where it does not
// fit). On an H100 (twenty-first session) the sliced one was 2-9% faster on every
// conv2d_variance of the benchmark CNN (18 432 and 36 864 columns, 72 and 144 blocks of the
// column kernel); on an H100 (twenty-eighth session) the wide one took 4-13% less GPU time than
// the column kernel on the chunked float64 Linear shapes at every budget from 16 MiB up and
// 1-3% less on float32 32 x 256 x 768 -> 768, while it was 2-5% slower than the sliced one on the
// CNN's convs (hence the sliced one stays below 512 blocks).
constexpr int64_t kSlicedBelowColumns = int64_t(512) * kAccumulateThreads;
inline bool sliced_by_default(int64_t F) { return F < kSlicedBelowColumns; }

// moment[j] += sum_k g[k, j] * gb[k, j]; sum[j] += sum_k g[k, j] (sum may be null).
// g, gb: [rows, F] contiguous. One thread per column j: coalesced loads, no atomics,
// the same summation order on every run.
template <typename scalar_t>
__global__ void accumulate_products_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ gb,
                                           scalar_t* __restrict__ moment, scalar_t* __restrict__ sum,
                                           int64_t rows, int64_t F) {
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < F; j += int64_t(gridDim.x) * blockDim.x) {
    scalar_t m = 0, s = 0;
    for (int64_t k = 0; k < rows; ++k) {
      const scalar_t v = g[k * F + j];
      m += v * gb[k * F + j];
      s += v;
    }
    moment[j] += m;
    if (sum != nullptr) sum[j] += s;
  }
}

// The column kernel with 16 bytes of adjacent columns a thread (2 float64 / 4 float32: one
// vector load per row), rows unrolled by 4 (more loads in flight), and g read once where gb is g
// (kSame: the second moment and the variance; the cross moment reads both). Each column's rows
// are summed in the column kernel's order, so the results are its bits. Why: at float64 N = 128,
// T = 64, 512 -> 512 (2 MiB of gradients a sample) the column kernel read its chunks at ~2.2
// TB/s on an H200 (0.152 of the chunked path's 0.268 ms; bmm alone 0.132), which left that
// shape at 0.48-0.49 of bmm; with this kernel 0.56 at 128 MiB on an H100 (0.48 with the column
// kernel in the same run). The default for many columns; where it does not fit
// (accumulate_wide_fits) the column kernel runs.
template <typename scalar_t, int kWidth>
struct alignas(sizeof(scalar_t) * kWidth) Pack {
  scalar_t v[kWidth];
};

template <typename scalar_t, bool kSame>
__global__ void accumulate_products_wide_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ gb,
                                                scalar_t* __restrict__ moment, scalar_t* __restrict__ sum,
                                                int64_t rows, int64_t F) {
  constexpr int kWidth = kWideColumns<scalar_t>;
  using P = Pack<scalar_t, kWidth>;
  const int64_t packs = F / kWidth;
  const P* g_packs = reinterpret_cast<const P*>(g);
  const P* gb_packs = reinterpret_cast<const P*>(gb);
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < packs; p += int64_t(gridDim.x) * blockDim.x) {
    scalar_t m[kWidth], s[kWidth];
    for (int c = 0; c < kWidth; ++c) m[c] = s[c] = 0;
#pragma unroll 4
    for (int64_t k = 0; k < rows; ++k) {
      const P v = g_packs[k * packs + p];
      const P w = kSame ? v : gb_packs[k * packs + p];
      for (int c = 0; c < kWidth; ++c) {
        m[c] += v.v[c] * w.v[c];
        s[c] += v.v[c];
      }
    }
    P out = reinterpret_cast<const P*>(moment)[p];
    for (int c = 0; c < kWidth; ++c) out.v[c] += m[c];
    reinterpret_cast<P*>(moment)[p] = out;
    if (sum != nullptr) {
      out = reinterpret_cast<const P*>(sum)[p];
      for (int c = 0; c < kWidth; ++c) out.v[c] += s[c];
      reinterpret_cast<P*>(sum)[p] = out;
    }
  }
}

// The same with kSlices threads a column, for few columns: a conv layer's chunk (18 432 columns of
// 64 samples for the benchmark CNN's 32 -> 64 conv) gives the kernel above 72 blocks of one
// thread a column, too few loads in flight to stream from memory (on an H100 9 us float32, 21 us
// float64: ~0.5 TB/s). Slice t sums rows t, t + kSlices, ... of kCols adjacent columns (coalesced
// rows of kCols); the slices' partial sums are then added in slice order through shared memory:
// a fixed order, the same every run (not the kernel above's, so not bit-identical to it).
template <typename scalar_t, int kCols, int kSlices>
__global__ void __launch_bounds__(kCols * kSlices)
    accumulate_products_sliced_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ gb,
                                      scalar_t* __restrict__ moment, scalar_t* __restrict__ sum, int64_t rows,
                                      int64_t F) {
  __shared__ scalar_t partial_moment[kSlices][kCols], partial_sum[kSlices][kCols];
  const int column = threadIdx.x % kCols, slice = threadIdx.x / kCols;
  // Block-uniform loop (the barriers): a tile of kCols columns per pass.
  for (int64_t tile = blockIdx.x * int64_t(kCols); tile < F; tile += int64_t(gridDim.x) * kCols) {
    const int64_t j = tile + column;
    scalar_t m = 0, s = 0;
    if (j < F) {
      for (int64_t k = slice; k < rows; k += kSlices) {
        const scalar_t v = g[k * F + j];
        m += v * gb[k * F + j];
        s += v;
      }
    }
    partial_moment[slice][column] = m;
    partial_sum[slice][column] = s;
    __syncthreads();
    if (slice == 0 && j < F) {
      for (int t = 1; t < kSlices; ++t) {
        m += partial_moment[t][column];
        s += partial_sum[t][column];
      }
      moment[j] += m;
      if (sum != nullptr) sum[j] += s;
    }
    __syncthreads();  // the partials are free for the next tile
  }
}

}  // namespace reduce
}  // namespace gradvar
