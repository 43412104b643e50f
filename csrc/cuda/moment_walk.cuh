// The host side shared by the fused moment walks, fused_moments.cu (CUDA cores) and
// fused_moments_mma.cu (tensor cores): the factors as kernel operands, the kernel variant a call
// needs, device facts, the grid with its split over samples and the splits' reduction.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include "../checks.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

namespace gradvar {
namespace walk {

struct Operand {  // a [S * groups, T, F] factor with element strides
  const void* data;
  int64_t s_batch, s_pos, s_feat;
};

// Calls f(kCross, kSum) as std::bool_constant arguments for the variant a call needs: a cross
// moment carries no sum; otherwise the sum when it is asked for.
template <typename F>
void with_variant(bool cross, bool with_sum, F&& f) {
  if (cross) {
    f(std::true_type{}, std::false_type{});
  } else if (with_sum) {
    f(std::false_type{}, std::true_type{});
  } else {
    f(std::false_type{}, std::false_type{});
  }
}

inline Operand operand(const at::Tensor& t) { return Operand{t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

inline int64_t tiles_over(int64_t extent, int64_t side) { return (extent + side - 1) / side; }

// Device facts and kernel occupancies, asked of the driver once per (device, kernel): the host
// cost of a call matters at the sizes where the fused kernel is the default.
struct DeviceFacts {
  int multiprocessors = 0, major = 0;
};

inline DeviceFacts device_facts(int device) {
  static std::mutex lock;
  static std::map<int, DeviceFacts> known;
  const std::lock_guard<std::mutex> guard(lock);
  auto found = known.find(device);
  if (found != known.end()) return found->second;
  DeviceFacts facts;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&facts.multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&facts.major, cudaDevAttrComputeCapabilityMajor, device));
  return known[device] = facts;
}

// smem_bytes: the kernel's dynamic shared memory; above the default 48 KiB the kernel is
// allowed it here (once per kernel and device, on the current device: the caller's guard).
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, size_t smem_bytes, int device) {
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, int> known;
  const std::lock_guard<std::mutex> guard(lock);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  auto found = known.find(key);
  if (found != known.end()) return found->second;
  if (smem_bytes > (size_t(48) << 10)) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_bytes)));
  }
  int resident = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, smem_bytes));
  return known[key] = std::max(resident, 1);
}

// The grid of a walk over [groups] x O x I in side x side tiles: samples split over gridDim.z so
// that the tiles fill one wave of resident blocks, at most max_splits and one sample per split.
struct WalkGrid {
  dim3 grid;
  int64_t splits;
};

template <typename Kernel>
WalkGrid walk_grid(Kernel kernel, int threads, size_t smem_bytes, int64_t side, int64_t groups, int64_t I, int64_t O,
                   int64_t samples, int64_t max_splits, int device, const DeviceFacts& facts, const char* what) {
  const int64_t tiles = tiles_over(I, side) * tiles_over(O, side) * groups;
  const int64_t wave = int64_t(resident_blocks(kernel, threads, smem_bytes, device)) * facts.multiprocessors;
  const int64_t splits = std::clamp<int64_t>(std::min(wave / tiles, max_splits), 1, samples);
  TORCH_CHECK(groups * splits <= 65535, "gradvar: the fused CUDA ", what,
              " take at most 65535 groups (set GRADVAR_EXT_FUSED_CUDA=0 for the chunked path)");
  const dim3 grid(static_cast<unsigned>(tiles_over(I, side)), static_cast<unsigned>(tiles_over(O, side)),
                  static_cast<unsigned>(groups * splits));
  return {grid, splits};
}

// The bytes of the factors a walk reads: [S * groups, T, I] and [S * groups, T, O], twice with a
// cross pair (an implicit-patches walk: its patches as if unfolded).
inline int64_t factor_bytes(int64_t samples, int64_t groups, int64_t T, int64_t I, int64_t O, bool cross,
                            int64_t element_size) {
  return samples * groups * T * (I + O) * element_size * (cross ? 2 : 1);
}

// The splits' partials [splits, groups, O, I] (and the sum's) may take at most the bytes of the
// factors the walk reads, or GRADVAR_EXT_FUSED_PARTIALS_MIB: a layer's statistics then hold at
// most its (input, grad_output) once more. Until the thirty-first session they filled the GPU
// up to 64 MiB, which by our count set the peak of the jobs where the fused walk is the default
// (one position, N x I x O <= 2^26): on an H100 (132 SMs, one block each) the MLP's 512 x 512
// layer walked in 8 splits, 16.8 MB of partials beside its 2.1 MB result, where job (b) peaked
// at 18.8 MB (BackPACK 14.1); the seed's Linear(784, 10) at N = 32 in 18 splits, 1.1 MB, its
// job's peak (BackPACK 0.3). Both now walk unsplit (their factors take 0.5 and 0.1 MB): more GPU
// time, in jobs bound by the host.
inline int64_t partials_budget(int64_t bytes_read) {
  const int64_t forced = env_mib("GRADVAR_EXT_FUSED_PARTIALS_MIB");
  return forced > 0 ? forced : bytes_read;
}

// Launches a moments walk over [groups] x O x I (start(grid, moment_out, sum_out, splits, add)
// launches the kernel, with smem_bytes of dynamic shared memory). Samples are split over
// gridDim.z so that the tiles fill one wave of resident blocks, as far as the partials
// [splits, groups, O, I] stay within partials_budget(bytes_read); they are then reduced in a
// fixed order, straight into the result (at::sum_out) unless an earlier chunk's values are there
// to add to (accumulate).
template <typename Kernel, typename Start>
void run_moments_walk(Kernel kernel, int threads, size_t smem_bytes, int side, at::Tensor& moment, at::Tensor& sum,
                      int64_t samples, int64_t groups, int64_t I, int64_t O, int64_t bytes_read, bool accumulate,
                      int device, const DeviceFacts& facts, Start&& start) {
  const int64_t per_split_bytes = groups * O * I * int64_t(moment.element_size()) * (sum.defined() ? 2 : 1);
  const auto [grid, splits] =
      walk_grid(kernel, threads, smem_bytes, side, groups, I, O, samples,
                partials_budget(bytes_read) / std::max<int64_t>(per_split_bytes, 1), device, facts, "moments");
  at::Tensor moment_out = moment, sum_out = sum;
  if (splits > 1) {
    moment_out = at::empty({splits, groups, O, I}, moment.options());
    if (sum.defined()) sum_out = at::empty({splits, groups, O, I}, moment.options());
  }
  start(grid, moment_out, sum_out, splits, accumulate && splits == 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1 && accumulate) {
    moment.add_(moment_out.sum(0));
    if (sum.defined()) sum.add_(sum_out.sum(0));
  } else if (splits > 1) {
    const int64_t over_splits[] = {0};
    at::sum_out(moment, moment_out, over_splits);
    if (sum.defined()) at::sum_out(sum, sum_out, over_splits);
  }
}

// Sizes the fused walks index with 32-bit integers.
inline void check_walk_extents(int64_t T, int64_t I, int64_t O, const char* what) {
  TORCH_CHECK(T <= INT32_MAX && I <= INT32_MAX && O <= INT32_MAX, "gradvar: the fused CUDA ", what,
              " take fewer than 2^31 positions and features per sample (GRADVAR_EXT_FUSED_CUDA=0, and "
              "GRADVAR_EXT_CONV_ALGORITHM=auto for a conv, take the chunked path)");
}

// The moments on tensor cores (fused_moments_mma.cu; sm_80+, float32 or float64): the same
// contract as fused_moments_cuda, on operands already checked by it.
void fused_moments_mma_cuda(at::Tensor& moment, at::Tensor& sum, const Operand& x, const Operand& g,
                            const Operand& xb, const Operand& gb, bool cross, int64_t samples, int64_t groups,
                            int64_t T, int64_t I, int64_t O, bool accumulate, at::ScalarType dtype, int device,
                            const DeviceFacts& facts);

}  // namespace walk
}  // namespace gradvar
