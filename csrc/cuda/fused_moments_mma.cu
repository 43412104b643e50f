// Fused per-sample moments on tensor cores (sm_80+): the walk of fused_moments.cu with warp MMAs,
// 3xTF32 for float32 and DMMA for float64 (the default walk for T > 1 without a cross pair;
// GRADVAR_EXT_FUSED_CUDA=tensor_cores for every shape), and the conv moments reading patches
// straight from the image (GRADVAR_EXT_CONV_ALGORITHM=implicit).
//   moment[g, o, i] (+)= sum_s g_s[o, i] * h_s[o, i],  sum[g, o, i] (+)= sum_s g_s[o, i]
// with g_s = G_s^T X_s (h_s from a second pair, or g_s), X_s unfolded patches when implicit.
// Memory: as the CUDA-core walk, partials [splits, groups, O, I] (<= 64 MiB) at most.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <iterator>

#include "../outer_product_stats.h"
#include "moment_walk.cuh"

namespace gradvar {
namespace {

using walk::Operand;

// ---- tensor cores (sm_80+): 3xTF32 for float32, DMMA for float64 ----
// Same walk over (sample, 16 positions) steps, a 64 x 64 output tile per block, each warp owning
// a kFragsO x kFragsI grid of wmma accumulators. Per k-step of the MMA shape (8 positions for
// TF32, 4 for FP64), A = G^T (o x t, column-major in gs[t][o]) and B = X (t x i, row-major in
// xs[t][i]). Accumulator fragments of one shape share their element layout, so the moment / sum
// updates are elementwise on fragments.
// - Tf32x3 (float32 inputs and accumulation, ~float32 accuracy): 4 warps, each a 32 x 32
//   quarter as 2 x 2 accumulators of 16 x 16 x 8; each operand is split v = big + small (tf32
//   parts) and g += a_small b_big + a_big b_small + a_big b_big (the dropped small * small term
//   is ~2^-22 relative).
// - Dmma (float64: IEEE double products and sums, as on CUDA cores up to their order): 8 warps,
//   each 32 x 16 as 4 x 2 accumulators of 8 x 8 x 4 (2 doubles a thread each: g, m and s or h
//   take 96 registers).
// Pipeline: kStages stages of {G, X} x 16 positions in shared memory, filled by asynchronous
// copies (cp.async: 16 bytes at a time from aligned contiguous rows, else element by element,
// any strides; zero-filled past the edges) kStages - 1 steps ahead of the step whose MMAs run;
// one barrier per step. Rows are padded to 72 elements so that fragment loads take the fewest
// wavefronts. Shared memory (dynamic): 4 stages, 36 KiB of float (Tf32x3, 3 blocks per SM) or
// 72 KiB of double (Dmma, 1 block per SM), then the 64 x 72 staging tile through which results
// reach global memory. (Until 335b5f6 the next step came through registers, one step ahead:
// 2 stages.)
namespace wmma = nvcuda::wmma;
constexpr int kTile = 64, kSteps = 16, kLd = kTile + 8;

struct Tf32x3 {
  using scalar_t = float;
  // Capped at 168 registers for 3 blocks per SM: with the register pipeline (the sum / cross
  // variants spilled ~230 bytes, touched once per sample) on an H200 5-12% faster than 2 blocks
  // per SM with no spills on 4 of 5 shapes (8% slower on 64x128x1024->1024; RESULTS.md). With
  // cp.async the spills are 0-16 bytes.
  static constexpr int kM = 16, kK = 8, kWarpsO = 2, kWarpsI = 2, kMinBlocks = 3, kStages = 4;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  template <typename Frag>
  struct Split {
    Frag big, small;
  };
  using A = Split<wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>>;
  using B = Split<wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>>;

  template <typename Frag>
  static __device__ void load(Split<Frag>& f, const float* at) {
    wmma::load_matrix_sync(f.big, at, kLd);
#pragma unroll
    for (int e = 0; e < f.big.num_elements; ++e) {
      const float v = f.big.x[e];
      const float hi = wmma::__float_to_tf32(v);
      f.big.x[e] = hi;
      f.small.x[e] = wmma::__float_to_tf32(v - hi);
    }
  }
  static __device__ void mma(FragC& acc, const A& a, const B& b) {
    wmma::mma_sync(acc, a.small, b.big, acc);
    wmma::mma_sync(acc, a.big, b.small, acc);
    wmma::mma_sync(acc, a.big, b.big, acc);
  }
};

struct Dmma {
  using scalar_t = double;
  static constexpr int kM = 8, kK = 4, kWarpsO = 2, kWarpsI = 4, kMinBlocks = 1, kStages = 4;
  using FragC = wmma::fragment<wmma::accumulator, 8, 8, 4, double>;
  using A = wmma::fragment<wmma::matrix_a, 8, 8, 4, double, wmma::col_major>;
  using B = wmma::fragment<wmma::matrix_b, 8, 8, 4, double, wmma::row_major>;

  template <typename Frag>
  static __device__ void load(Frag& f, const double* at) {
    wmma::load_matrix_sync(f, at, kLd);
  }
  static __device__ void mma(FragC& acc, const A& a, const B& b) { wmma::mma_sync(acc, a, b, acc); }
};

template <typename Mma>
struct MmaTiling {
  static constexpr int kThreads = 32 * Mma::kWarpsO * Mma::kWarpsI;
  static constexpr int kFragsO = kTile / (Mma::kWarpsO * Mma::kM), kFragsI = kTile / (Mma::kWarpsI * Mma::kM);
  static constexpr int kPerThread = kSteps * kTile / kThreads;  // elements of one operand a thread fetches per step
  static constexpr int kSmemRows = std::max(2 * Mma::kStages * kSteps, kTile);  // the stages, later the staging tile
  static constexpr size_t kSmemBytes = size_t(kSmemRows) * kLd * sizeof(typename Mma::scalar_t);
};

// One element, global -> shared, asynchronously (cp.async, sm_80+); when !inside the source
// size is 0: nothing is read and the element becomes 0. commit_copies closes this thread's group
// of copies; wait_copies<k> returns once at most k of its groups are still in flight.
template <typename scalar_t>
__device__ void copy_element_async(scalar_t* to, const scalar_t* from, bool inside) {
  const auto shared = static_cast<unsigned>(__cvta_generic_to_shared(to));
  constexpr int kBytes = sizeof(scalar_t);
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(shared), "l"(from), "n"(kBytes),
               "r"(inside ? kBytes : 0)
               : "memory");
}
// 16 bytes (both addresses 16-byte aligned); zeros when !inside.
__device__ void copy_16_bytes_async(void* to, const void* from, bool inside) {
  const auto shared = static_cast<unsigned>(__cvta_generic_to_shared(to));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared), "l"(from), "r"(inside ? 16 : 0)
               : "memory");
}
__device__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kInFlight>
__device__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kInFlight) : "memory");
}

// Starts copying rows [t0, t0 + kSteps) x features [f0, f0 + kTile) of sample-group b into
// tile[k][f] ([kSteps][kLd]; zero outside [T, F)); consecutive threads walk the operand's
// unit-stride dimension (features, else positions).
// Rows of contiguous features, 16-byte aligned and a whole number of 16 bytes long, go 16 bytes
// per copy (tile columns f0 are multiples of 64: every copy is inside or past F as a whole).
template <typename scalar_t, int kThreads, int kPer>
__device__ void copy_tile_async(scalar_t* tile, const Operand& op, int64_t b, int64_t t0, int64_t f0, int64_t T,
                                int64_t F) {
  const scalar_t* base = static_cast<const scalar_t*>(op.data) + b * op.s_batch;
  const bool features_fastest = op.s_feat == 1;
  constexpr int kV = 16 / sizeof(scalar_t);  // elements per 16 bytes
  static_assert(kPer % kV == 0 && kTile % kV == 0, "whole 16-byte copies per thread and row");
  if (features_fastest && F % kV == 0 && op.s_pos % kV == 0 && op.s_batch % kV == 0 &&
      reinterpret_cast<uintptr_t>(op.data) % 16 == 0) {  // the same for every thread: uniform
#pragma unroll
    for (int r = 0; r < kPer / kV; ++r) {
      const int e = threadIdx.x + r * kThreads;
      const int k = e / (kTile / kV), f = (e % (kTile / kV)) * kV;
      const int64_t t = t0 + k, feat = f0 + f;
      const bool inside = t < T && feat < F;
      copy_16_bytes_async(tile + k * kLd + f, inside ? base + t * op.s_pos + feat : base, inside);
    }
    return;
  }
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int e = threadIdx.x + r * kThreads;
    const int k = features_fastest ? e / kTile : e % kSteps, f = features_fastest ? e % kTile : e / kSteps;
    const int64_t t = t0 + k, feat = f0 + f;
    const bool inside = t < T && feat < F;
    copy_element_async(tile + k * kLd + f, inside ? base + t * op.s_pos + feat * op.s_feat : base, inside);
  }
}

// X read as patches of an image (GRADVAR_EXT_CONV_ALGORITHM=implicit): the image's element
// strides and the convolution; `data` of the X operand is the image.
struct Patches {
  int64_t s_sample, s_channel, s_row, s_col;
  int channels, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out_width;
};

// This thread's share of a step's patches: element r is position t0 + threadIdx.x % kSteps and
// feature f0 + threadIdx.x / kSteps + r * (kThreads / kSteps), copy_tile_async's layout for
// positions fastest (16 threads read 16 neighbouring output pixels of one tap: coalesced for stride 1).
// A thread's features stay fixed over the walk, so their taps are worked out once:
// offset = c * s_channel, (row, col) = the tap's shift (i * dil_h - pad_h, j * dil_w - pad_w); a
// feature past F gets a row that no output row brings inside the image.
template <int kThreads, int kPer>
struct PatchTaps {
  int64_t offset[kPer];
  int row[kPer], col[kPer];

  PatchTaps() = default;
  __device__ PatchTaps(const Patches& p, int64_t f0, int64_t F) {
    const int taps = p.kernel_h * p.kernel_w;
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int64_t feature = f0 + threadIdx.x / kSteps + r * (kThreads / kSteps);
      const int c = static_cast<int>(feature / taps), tap = static_cast<int>(feature % taps);
      const int i = tap / p.kernel_w, j = tap % p.kernel_w;
      offset[r] = c * p.s_channel;
      row[r] = feature < F ? i * p.dil_h - p.pad_h : INT32_MIN / 2;
      col[r] = j * p.dil_w - p.pad_w;
    }
  }

  // Starts copying the patches of sample-group (n, group) at positions [t0, t0 + kSteps) into
  // tile[k][f] ([kSteps][kLd]; 0 past T and F).
  template <typename scalar_t>
  __device__ void copy_async(scalar_t* tile, const Operand& image, const Patches& p, int64_t n, int64_t group,
                             int64_t t0, int64_t T) const {
    const scalar_t* base = static_cast<const scalar_t*>(image.data) + n * p.s_sample +
                           group * p.channels * p.s_channel;
    const int k = threadIdx.x % kSteps;
    const int64_t t = t0 + k;
    const int oh = static_cast<int>(t / p.out_width), ow = static_cast<int>(t % p.out_width);
    const int top = t < T ? oh * p.stride_h : INT32_MIN / 2, left = ow * p.stride_w;
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int y = top + row[r], x = left + col[r];
      const bool inside = static_cast<unsigned>(y) < static_cast<unsigned>(p.height) &&
                          static_cast<unsigned>(x) < static_cast<unsigned>(p.width);
      const int f = threadIdx.x / kSteps + r * (kThreads / kSteps);
      copy_element_async(tile + k * kLd + f, inside ? base + offset[r] + y * p.s_row + x * p.s_col : base, inside);
    }
  }
};

// acc += G^T X over the stage's first `valid` positions (gs, xs: [kSteps][kLd]); this warp's
// fragments start at row wo, column wi of the tile.
template <typename Mma, int kFO, int kFI>
__device__ void mma_step(typename Mma::FragC (&acc)[kFO][kFI], const typename Mma::scalar_t* gs,
                         const typename Mma::scalar_t* xs, int64_t valid, int wo, int wi) {
#pragma unroll
  for (int k0 = 0; k0 < kSteps; k0 += Mma::kK) {
    if (k0 >= valid) break;  // uniform: short sequences skip the all-zero rest
    typename Mma::A a[kFO];
    typename Mma::B b[kFI];
#pragma unroll
    for (int r = 0; r < kFO; ++r) Mma::load(a[r], gs + k0 * kLd + wo + Mma::kM * r);
#pragma unroll
    for (int c = 0; c < kFI; ++c) Mma::load(b[c], xs + k0 * kLd + wi + Mma::kM * c);
#pragma unroll
    for (int r = 0; r < kFO; ++r)
#pragma unroll
      for (int c = 0; c < kFI; ++c) Mma::mma(acc[r][c], a[r], b[c]);
  }
}

template <typename FragC, int kFO, int kFI>
__device__ void zero(FragC (&frags)[kFO][kFI]) {
#pragma unroll
  for (int r = 0; r < kFO; ++r)
#pragma unroll
    for (int c = 0; c < kFI; ++c) wmma::fill_fragment(frags[r][c], 0);
}

// Writes a block's 64 x 64 result (this warp's fragments at (wo, wi)) to out[o, i] (+= when accumulate).
template <typename Mma, int kFO, int kFI>
__device__ void store_tile(typename Mma::scalar_t* staging, typename Mma::FragC (&frags)[kFO][kFI],
                           typename Mma::scalar_t* out, int64_t o0, int64_t i0, int64_t O, int64_t I, int wo, int wi,
                           bool accumulate) {
#pragma unroll
  for (int r = 0; r < kFO; ++r)
#pragma unroll
    for (int c = 0; c < kFI; ++c)
      wmma::store_matrix_sync(staging + (wo + Mma::kM * r) * kLd + wi + Mma::kM * c, frags[r][c], kLd,
                              wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < kTile * kTile; e += MmaTiling<Mma>::kThreads) {
    const int64_t o = o0 + e / kTile, i = i0 + e % kTile;
    if (o < O && i < I) {
      const auto v = staging[(e / kTile) * kLd + e % kTile];
      out[o * I + i] = accumulate ? out[o * I + i] + v : v;
    }
  }
  __syncthreads();
}

// a or b by value, field by field (a ternary on the kernel's parameters themselves puts them on the stack)
__device__ Operand pick(bool second, const Operand& a, const Operand& b) {
  return Operand{second ? b.data : a.data, second ? b.s_batch : a.s_batch, second ? b.s_pos : a.s_pos,
                 second ? b.s_feat : a.s_feat};
}

struct Step {  // where the walk is: sample n, pass (0: g from (G, X); 1: h from (Gb, Xb)), position t0
  int64_t n, t0;
  int pass;
};

template <bool kCross>
__device__ Step next_step(Step s, int64_t T) {
  s.t0 += kSteps;
  if (s.t0 < T) return s;
  s.t0 = 0;
  if (kCross && s.pass == 0) {
    s.pass = 1;
  } else {
    s.pass = 0;
    ++s.n;
  }
  return s;
}

// kPatches (not with kCross): X is an image whose patches (geo) are the factor; its per-thread
// tap table (PatchTaps) takes ~30 registers more, so at most 2 blocks per SM are asked for.
template <typename Mma, bool kCross, bool kSum, bool kPatches = false>
__global__ void __launch_bounds__(MmaTiling<Mma>::kThreads, kPatches ? std::min(Mma::kMinBlocks, 2) : Mma::kMinBlocks)
    fused_moments_mma_kernel(Operand X, Operand G, Operand Xb, Operand Gb,
                             typename Mma::scalar_t* __restrict__ moment_out,
                             typename Mma::scalar_t* __restrict__ sum_out, int64_t samples, int64_t groups, int64_t T,
                             int64_t I, int64_t O, int64_t splits, bool accumulate, Patches geo) {
  static_assert(!(kPatches && kCross), "patches are read for the (G, X) pair only");
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using scalar_t = typename Mma::scalar_t;
  using Tile = MmaTiling<Mma>;
  constexpr int kFO = Tile::kFragsO, kFI = Tile::kFragsI, kThreads = Tile::kThreads, kPer = Tile::kPerThread;
  constexpr int kStages = Mma::kStages;
  extern __shared__ __align__(128) unsigned char smem_bytes[];  // Tile::kSmemBytes
  scalar_t* smem = reinterpret_cast<scalar_t*>(smem_bytes);  // stage s, operand p: rows [(2 s + p) kSteps, +kSteps)
  const int warp = threadIdx.x / 32;
  const int wo = (warp / Mma::kWarpsI) * kFO * Mma::kM, wi = (warp % Mma::kWarpsI) * kFI * Mma::kM;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, o0 = int64_t(blockIdx.y) * kTile;
  const int64_t group = blockIdx.z % groups, split = blockIdx.z / groups;
  const int64_t s_begin = samples * split / splits, s_end = samples * (split + 1) / splits;
  typename Mma::FragC m[kFO][kFI], s[kFO][kFI], g[kFO][kFI], h[kFO][kFI];
  zero(m);
  if (kSum) zero(s);
  zero(g);
  if (kCross) zero(h);
  PatchTaps<kThreads, kPer> taps;
  if constexpr (kPatches) taps = PatchTaps<kThreads, kPer>(geo, i0, I);
  // Starts the copies of a step's operands into a stage: G^T's rows, then X's.
  auto copy_step = [&](const Step& at, int stage) {
    scalar_t* gs = smem + (2 * stage) * kSteps * kLd;
    const int64_t b = at.n * groups + group;
    copy_tile_async<scalar_t, kThreads, kPer>(gs, pick(kCross && at.pass, G, Gb), b, at.t0, o0, T, O);
    if constexpr (kPatches) {
      taps.copy_async(gs + kSteps * kLd, X, geo, at.n, group, at.t0, T);
    } else {
      copy_tile_async<scalar_t, kThreads, kPer>(gs + kSteps * kLd, pick(kCross && at.pass, X, Xb), b, at.t0, i0, T,
                                                I);
    }
  };
  // Step i's copies are commit group i (one group per step, empty ones past the end, so that the
  // count stays aligned); `ahead` runs kStages - 1 steps in front of `at`. Every thread takes
  // the same steps: the barriers are uniform.
  Step at{s_begin, 0, 0}, ahead = at;
  const bool walk = at.n < s_end && T > 0;
  if (walk) {
#pragma unroll
    for (int k = 0; k < kStages - 1; ++k) {
      if (ahead.n < s_end) {
        copy_step(ahead, k);
        ahead = next_step<kCross>(ahead, T);
      }
      commit_copies();
    }
  }
  for (int stage = 0; walk && at.n < s_end; stage = (stage + 1) % kStages) {
    wait_copies<kStages - 2>();  // this thread's copies of step `at` have landed
    __syncthreads();  // everyone's; and the stage refilled below, read one step ago, is free
    if (ahead.n < s_end) {
      copy_step(ahead, (stage + kStages - 1) % kStages);
      ahead = next_step<kCross>(ahead, T);
    }
    commit_copies();
    const scalar_t* gs = smem + (2 * stage) * kSteps * kLd;
    const scalar_t* xs = gs + kSteps * kLd;
    if (kCross && at.pass) {
      mma_step<Mma>(h, gs, xs, T - at.t0, wo, wi);
    } else {
      mma_step<Mma>(g, gs, xs, T - at.t0, wo, wi);
    }
    const Step next = next_step<kCross>(at, T);
    if (next.n != at.n) {  // the sample's gradient tile is complete
#pragma unroll
      for (int r = 0; r < kFO; ++r)
#pragma unroll
        for (int c = 0; c < kFI; ++c)
#pragma unroll
          for (int e = 0; e < m[r][c].num_elements; ++e) {
            m[r][c].x[e] += g[r][c].x[e] * (kCross ? h[r][c].x[e] : g[r][c].x[e]);
            if (kSum) s[r][c].x[e] += g[r][c].x[e];
          }
      zero(g);
      if (kCross) zero(h);
    }
    at = next;
  }
  wait_copies<0>();  // none is left (ahead stops at s_end), but the staging tile reuses the stages
  __syncthreads();  // the operand stages become the staging tile
  const int64_t out_base = (split * groups + group) * O * I;  // [splits, groups, O, I]
  store_tile<Mma>(smem, m, moment_out + out_base, o0, i0, O, I, wo, wi, accumulate);  // accumulate: splits == 1 only
  if (kSum) store_tile<Mma>(smem, s, sum_out + out_base, o0, i0, O, I, wo, wi, accumulate);
#else
  __trap();  // the host launches this only on sm_80+
#endif
}

// f(policy) with the tensor-core policy of a dtype: Tf32x3 for float32, Dmma for float64.
template <typename F>
void with_mma_policy(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) return f(Tf32x3{});
  TORCH_CHECK(dtype == at::kDouble, "gradvar: the tensor-core moments take float32 or float64, got ", dtype);
  f(Dmma{});
}

}  // namespace

using namespace walk;  // the shared host side (moment_walk.cuh)

namespace {

// The tensor-core walk for a call's variant: X an unfolded factor, or (kPatches) an image whose
// patches geo describes (the (G, X) pair alone: no cross moment).
template <bool kPatches>
void run_on_tensor_cores(at::Tensor& moment, at::Tensor& sum, const Operand& x, const Operand& g, const Operand& xb,
                         const Operand& gb, bool cross, int64_t samples, int64_t groups, int64_t T, int64_t I,
                         int64_t O, bool accumulate, at::ScalarType dtype, int device, const DeviceFacts& facts,
                         const Patches& geo) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_mma_policy(dtype, [&](auto policy) {
    using Mma = decltype(policy);
    using scalar_t = typename Mma::scalar_t;
    constexpr int threads = MmaTiling<Mma>::kThreads;
    constexpr size_t smem = MmaTiling<Mma>::kSmemBytes;
    with_variant(cross, sum.defined(), [&](auto kCross, auto kSum) {
      if constexpr (!(kPatches && decltype(kCross)::value)) {
        const auto kernel = fused_moments_mma_kernel<Mma, decltype(kCross)::value, decltype(kSum)::value, kPatches>;
        run_moments_walk(kernel, threads, smem, kTile, moment, sum, samples, groups, I, O,
                         factor_bytes(samples, groups, T, I, O, cross, sizeof(scalar_t)), accumulate, device, facts,
                         [&](dim3 grid, at::Tensor& m_out, at::Tensor& s_out, int64_t splits, bool add) {
                           scalar_t* s_ptr = sum.defined() ? s_out.mutable_data_ptr<scalar_t>() : nullptr;
                           kernel<<<grid, threads, smem, stream>>>(x, g, xb, gb, m_out.mutable_data_ptr<scalar_t>(),
                                                                   s_ptr, samples, groups, T, I, O, splits, add, geo);
                         });
      }
    });
  });
}

}  // namespace

void walk::fused_moments_mma_cuda(at::Tensor& moment, at::Tensor& sum, const Operand& x, const Operand& g,
                                  const Operand& xb, const Operand& gb, bool cross, int64_t samples, int64_t groups,
                                  int64_t T, int64_t I, int64_t O, bool accumulate, at::ScalarType dtype, int device,
                                  const DeviceFacts& facts) {
  run_on_tensor_cores<false>(moment, sum, x, g, xb, gb, cross, samples, groups, T, I, O, accumulate, dtype, device,
                             facts, Patches{});
}

bool fused_patch_moments_cuda(at::Tensor& moment, at::Tensor& sum, const PatchSource& patches, const at::Tensor& G,
                              int64_t groups) {
  const at::Tensor& image = patches.image;
  const c10::cuda::CUDAGuard guard(image.device());
  const int device = image.get_device();
  const DeviceFacts facts = device_facts(device);
  if (facts.major < 8) return false;  // the tensor-core kernel only
  const int64_t samples = G.size(0) / groups, T = G.size(1), O = G.size(2);
  const int64_t I = patches.channels * patches.kernel_h * patches.kernel_w;
  if (samples == 0 || T == 0 || I == 0 || O == 0) {
    moment.zero_();
    if (sum.defined()) sum.zero_();
    return true;
  }
  check_walk_extents(T, I, O, "moments");
  // Rows and columns are walked as 32-bit ints with a sentinel at -2^30: every extent below 2^29.
  const int64_t extents[] = {image.size(2) + 2 * patches.pad_h,
                             image.size(3) + 2 * patches.pad_w,
                             patches.channels,
                             patches.dil_h * patches.kernel_h,
                             patches.dil_w * patches.kernel_w,
                             patches.stride_h,
                             patches.stride_w};
  TORCH_CHECK(*std::max_element(std::begin(extents), std::end(extents)) < (int64_t(1) << 29),
              "gradvar: GRADVAR_EXT_CONV_ALGORITHM=implicit takes images, kernels and strides of fewer than 2^29 "
              "rows, columns and channels (set GRADVAR_EXT_CONV_ALGORITHM=auto)");
  auto narrow = [](int64_t v) { return static_cast<int>(v); };
  const Patches geo{image.stride(0), image.stride(1), image.stride(2), image.stride(3), narrow(patches.channels),
                    narrow(image.size(2)), narrow(image.size(3)), narrow(patches.kernel_h),
                    narrow(patches.kernel_w), narrow(patches.stride_h), narrow(patches.stride_w),
                    narrow(patches.pad_h), narrow(patches.pad_w), narrow(patches.dil_h), narrow(patches.dil_w),
                    narrow(patches.out_width)};
  const Operand x{image.const_data_ptr(), 0, 0, 0}, g = operand(G);
  run_on_tensor_cores<true>(moment, sum, x, g, x, g, /*cross=*/false, samples, groups, T, I, O, /*accumulate=*/false,
                            image.scalar_type(), device, facts, geo);
  return true;
}

}  // namespace gradvar
