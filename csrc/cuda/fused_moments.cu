// Fused per-sample moments on CUDA: one pass over the factors, no per-sample gradient in
// global memory, no atomics (deterministic).
//   moment[g, o, i] += sum_s  g_s[o, i] * h_s[o, i]      (h_s = g_s unless a second pair is given)
//   sum[g, o, i]    += sum_s  g_s[o, i]                  (optional)
//   g_s = sum_t G[s, t, o] X[s, t, i],  h_s = sum_t Gb[s, t, o] Xb[s, t, i]
// X, Xb: [S * groups, T, I]; G, Gb: [S * groups, T, O]; any strides. A block owns a 64 x 64
// output tile of one group: 256 threads, 4 x 4 outputs each, strided by 16 so shared-memory
// reads are conflict-free. It walks its share of the samples; per sample it accumulates g_s
// (and h_s) over T in registers, 16 positions at a time through shared memory, then updates
// the moment / sum registers. Samples are split over gridDim.z only as far as needed to fill
// the GPU; the splits' partials are reduced in a fixed order afterwards.
// Memory: partials [splits, groups, O, I] with splits = 1 when the tiles alone fill the GPU.
// GRADVAR_EXT_FUSED_CUDA=tf32x3 (float32, sm_80+): the same walk on tensor cores, 3xTF32 (below).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "../outer_product_stats.h"

namespace gradvar {
namespace {

constexpr int kTile = 64, kSteps = 16, kThreads = 256, kPer = 4;

struct Operand {  // a [S * groups, T, F] factor with element strides
  const void* data;
  int64_t s_batch, s_pos, s_feat;
};

// Loads rows [t0, t0 + kSteps) x features [f0, f0 + kTile) of sample-group `b` into tile[k][f],
// zero-filling outside [T, F). Consecutive threads walk the operand's unit-stride dimension.
template <typename scalar_t, int kBlock = kThreads>
__device__ void load_tile(scalar_t (*tile)[kTile], const Operand& op, int64_t b, int64_t t0, int64_t f0,
                          int64_t T, int64_t F) {
  const auto* base = static_cast<const scalar_t*>(op.data) + b * op.s_batch;
  const bool features_fastest = op.s_feat == 1;
#pragma unroll
  for (int r = 0; r < kSteps * kTile / kBlock; ++r) {
    const int e = threadIdx.x + r * kBlock;
    const int k = features_fastest ? e / kTile : e % kSteps;
    const int f = features_fastest ? e % kTile : e / kSteps;
    const int64_t t = t0 + k, feat = f0 + f;
    tile[k][f] = (t < T && feat < F) ? base[t * op.s_pos + feat * op.s_feat] : scalar_t(0);
  }
}

template <typename scalar_t>
__device__ void accumulate_sample(scalar_t (&acc)[kPer][kPer], scalar_t (*gs)[kTile], scalar_t (*xs)[kTile],
                                  const Operand& G, const Operand& X, int64_t b, int64_t o0, int64_t i0, int64_t T,
                                  int64_t O, int64_t I) {
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
  for (int a = 0; a < kPer; ++a)
#pragma unroll
    for (int c = 0; c < kPer; ++c) acc[a][c] = 0;
  for (int64_t t0 = 0; t0 < T; t0 += kSteps) {
    load_tile(gs, G, b, t0, o0, T, O);
    load_tile(xs, X, b, t0, i0, T, I);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSteps; ++k) {
      scalar_t gv[kPer], xv[kPer];
#pragma unroll
      for (int a = 0; a < kPer; ++a) gv[a] = gs[k][ty + 16 * a];
#pragma unroll
      for (int c = 0; c < kPer; ++c) xv[c] = xs[k][tx + 16 * c];
#pragma unroll
      for (int a = 0; a < kPer; ++a)
#pragma unroll
        for (int c = 0; c < kPer; ++c) acc[a][c] += gv[a] * xv[c];
    }
    __syncthreads();
  }
}

template <typename scalar_t, bool kCross, bool kSum>
__global__ void __launch_bounds__(kThreads)
    fused_moments_kernel(Operand X, Operand G, Operand Xb, Operand Gb, scalar_t* __restrict__ moment_out,
                         scalar_t* __restrict__ sum_out, int64_t samples, int64_t groups, int64_t T, int64_t I,
                         int64_t O, int64_t splits) {
  __shared__ scalar_t gs[kSteps][kTile], xs[kSteps][kTile];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, o0 = int64_t(blockIdx.y) * kTile;
  const int64_t group = blockIdx.z % groups, split = blockIdx.z / groups;
  const int64_t s_begin = samples * split / splits, s_end = samples * (split + 1) / splits;
  scalar_t m[kPer][kPer] = {}, s[kPer][kPer] = {};
  scalar_t g[kPer][kPer], h[kPer][kPer];
  for (int64_t n = s_begin; n < s_end; ++n) {
    const int64_t b = n * groups + group;
    accumulate_sample(g, gs, xs, G, X, b, o0, i0, T, O, I);
    if (kCross) accumulate_sample(h, gs, xs, Gb, Xb, b, o0, i0, T, O, I);
#pragma unroll
    for (int a = 0; a < kPer; ++a)
#pragma unroll
      for (int c = 0; c < kPer; ++c) {
        m[a][c] += g[a][c] * (kCross ? h[a][c] : g[a][c]);
        if (kSum) s[a][c] += g[a][c];
      }
  }
  // Output layout [splits, groups, O, I]; with splits == 1 this is the result itself (+=).
  const int64_t out_base = (split * groups + group) * O * I;
#pragma unroll
  for (int a = 0; a < kPer; ++a)
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t o = o0 + ty + 16 * a, i = i0 + tx + 16 * c;
      if (o < O && i < I) {
        const int64_t at = out_base + o * I + i;
        if (splits == 1) {
          moment_out[at] += m[a][c];
          if (kSum) sum_out[at] += s[a][c];
        } else {
          moment_out[at] = m[a][c];
          if (kSum) sum_out[at] = s[a][c];
        }
      }
    }
}

// ---- tensor cores: 3xTF32 (float32 inputs, float32 accumulation, ~float32 accuracy) ----
// Same walk over (sample, 16 positions) steps; 4 warps, each owning a 32 x 32 quarter of the
// 64 x 64 tile as 2 x 2 wmma 16 x 16 accumulators. Per 8 positions, A = G^T (16 o x 8 t,
// column-major in gs[t][o]) and B = X (8 t x 16 i, row-major in xs[t][i]); each operand is split
// v = big + small (tf32 parts) and g += a_small b_big + a_big b_small + a_big b_big (3xTF32: the
// dropped small * small term is ~2^-22 relative). Accumulator fragments of one shape share their
// element layout, so the moment / sum updates are elementwise on fragments.
// Pipeline: each thread fetches its share of the next step's operands into registers while the
// warps run the current step's MMAs; shared memory holds two stages (one barrier per step).
// Rows are padded to 72 floats so fragment loads are free of bank conflicts. Shared memory: one
// 64 x 72 float buffer (18 KiB): 2 stages x {G, X} x 16 positions during the walk, then the
// staging tile through which results reach global memory (bounds-checked).
namespace wmma = nvcuda::wmma;
constexpr int kTcThreads = 128, kLd = kTile + 8, kPerThread = kSteps * kTile / kTcThreads;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;

// This thread's elements of rows [t0, t0 + kSteps) x features [f0, f0 + kTile) of sample-group b
// (zero outside [T, F)); consecutive threads walk the operand's unit-stride dimension.
__device__ void fetch_tile(float (&v)[kPerThread], const Operand& op, int64_t b, int64_t t0, int64_t f0, int64_t T,
                           int64_t F) {
  const float* base = static_cast<const float*>(op.data) + b * op.s_batch;
  const bool features_fastest = op.s_feat == 1;
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int e = threadIdx.x + r * kTcThreads;
    const int64_t t = t0 + (features_fastest ? e / kTile : e % kSteps);
    const int64_t feat = f0 + (features_fastest ? e % kTile : e / kSteps);
    v[r] = (t < T && feat < F) ? base[t * op.s_pos + feat * op.s_feat] : 0.0f;
  }
}

__device__ void stash_tile(const float (&v)[kPerThread], float* tile, bool features_fastest) {  // tile: [kSteps][kLd]
#pragma unroll
  for (int r = 0; r < kPerThread; ++r) {
    const int e = threadIdx.x + r * kTcThreads;
    const int k = features_fastest ? e / kTile : e % kSteps, f = features_fastest ? e % kTile : e / kSteps;
    tile[k * kLd + f] = v[r];
  }
}

template <typename Frag>
__device__ void split_tf32(Frag& big, Frag& small) {
#pragma unroll
  for (int e = 0; e < big.num_elements; ++e) {
    const float v = big.x[e];
    const float hi = wmma::__float_to_tf32(v);
    big.x[e] = hi;
    small.x[e] = wmma::__float_to_tf32(v - hi);
  }
}

// acc += G^T X over the stage's first `valid` positions (gs, xs: [kSteps][kLd]).
__device__ void mma_step(FragC (&acc)[2][2], const float* gs, const float* xs, int64_t valid, int wo, int wi) {
#pragma unroll
  for (int k0 = 0; k0 < kSteps; k0 += 8) {
    if (k0 >= valid) break;  // uniform: short sequences skip the all-zero half
    FragA a_big[2], a_small[2];
    FragB b_big[2], b_small[2];
#pragma unroll
    for (int a = 0; a < 2; ++a) {
      wmma::load_matrix_sync(a_big[a], gs + k0 * kLd + wo + 16 * a, kLd);
      split_tf32(a_big[a], a_small[a]);
    }
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      wmma::load_matrix_sync(b_big[c], xs + k0 * kLd + wi + 16 * c, kLd);
      split_tf32(b_big[c], b_small[c]);
    }
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        wmma::mma_sync(acc[a][c], a_small[a], b_big[c], acc[a][c]);
        wmma::mma_sync(acc[a][c], a_big[a], b_small[c], acc[a][c]);
        wmma::mma_sync(acc[a][c], a_big[a], b_big[c], acc[a][c]);
      }
  }
}

__device__ void zero(FragC (&frags)[2][2]) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c) wmma::fill_fragment(frags[a][c], 0.0f);
}

// Writes a block's 64 x 64 result (2 x 2 fragments per warp) to out[o, i] (+= when accumulate).
__device__ void store_tile(float* staging, FragC (&frags)[2][2], float* out, int64_t o0, int64_t i0, int64_t O,
                           int64_t I, int wo, int wi, bool accumulate) {
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int c = 0; c < 2; ++c)
      wmma::store_matrix_sync(staging + (wo + 16 * a) * kLd + wi + 16 * c, frags[a][c], kLd, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < kTile * kTile; e += kTcThreads) {
    const int64_t o = o0 + e / kTile, i = i0 + e % kTile;
    if (o < O && i < I) {
      const float v = staging[(e / kTile) * kLd + e % kTile];
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

// Capped at 168 registers for 3 blocks per SM (the sum / cross variants spill ~230 bytes, touched
// once per sample): on an H200 5-12% faster than 2 blocks per SM with no spills on 4 of 5 shapes
// (8% slower on 64x128x1024->1024), both variants tested there (benchmarks/RESULTS.md).
template <bool kCross, bool kSum>
__global__ void __launch_bounds__(kTcThreads, 3)
    fused_moments_tf32x3_kernel(Operand X, Operand G, Operand Xb, Operand Gb, float* __restrict__ moment_out,
                                float* __restrict__ sum_out, int64_t samples, int64_t groups, int64_t T, int64_t I,
                                int64_t O, int64_t splits) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  __shared__ __align__(128) float smem[kTile * kLd];  // stage s, operand p: rows [(2 s + p) kSteps, +kSteps)
  const int warp = threadIdx.x / 32, wo = (warp / 2) * 32, wi = (warp % 2) * 32;
  const int64_t i0 = int64_t(blockIdx.x) * kTile, o0 = int64_t(blockIdx.y) * kTile;
  const int64_t group = blockIdx.z % groups, split = blockIdx.z / groups;
  const int64_t s_begin = samples * split / splits, s_end = samples * (split + 1) / splits;
  FragC m[2][2], s[2][2], g[2][2], h[2][2];
  zero(m);
  zero(s);
  zero(g);
  if (kCross) zero(h);
  float reg_g[kPerThread], reg_x[kPerThread];
  auto fetch = [&](const Step& at) {
    const int64_t b = at.n * groups + group;
    fetch_tile(reg_g, pick(kCross && at.pass, G, Gb), b, at.t0, o0, T, O);
    fetch_tile(reg_x, pick(kCross && at.pass, X, Xb), b, at.t0, i0, T, I);
  };
  Step at{s_begin, 0, 0};
  if (at.n < s_end && T > 0) fetch(at);
  for (int stage = 0; at.n < s_end && T > 0; stage ^= 1) {
    float* gs = smem + (2 * stage) * kSteps * kLd;
    float* xs = gs + kSteps * kLd;
    stash_tile(reg_g, gs, pick(kCross && at.pass, G, Gb).s_feat == 1);
    stash_tile(reg_x, xs, pick(kCross && at.pass, X, Xb).s_feat == 1);
    __syncthreads();
    const Step next = next_step<kCross>(at, T);
    if (next.n < s_end) fetch(next);  // in flight while the MMAs below run
    if (kCross && at.pass) {
      mma_step(h, gs, xs, T - at.t0, wo, wi);
    } else {
      mma_step(g, gs, xs, T - at.t0, wo, wi);
    }
    if (next.n != at.n) {  // the sample's gradient tile is complete
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int c = 0; c < 2; ++c)
#pragma unroll
          for (int e = 0; e < m[a][c].num_elements; ++e) {
            m[a][c].x[e] += g[a][c].x[e] * (kCross ? h[a][c].x[e] : g[a][c].x[e]);
            if (kSum) s[a][c].x[e] += g[a][c].x[e];
          }
      zero(g);
      if (kCross) zero(h);
    }
    at = next;
  }
  __syncthreads();  // the operand stages become the staging tile
  const int64_t out_base = (split * groups + group) * O * I;  // [splits, groups, O, I]
  store_tile(smem, m, moment_out + out_base, o0, i0, O, I, wo, wi, splits == 1);
  if (kSum) store_tile(smem, s, sum_out + out_base, o0, i0, O, I, wo, wi, splits == 1);
#else
  __trap();  // the host launches this only on sm_80+
#endif
}

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

bool tensor_cores_requested() {
  const char* flag = std::getenv("GRADVAR_EXT_FUSED_CUDA");
  return flag != nullptr && std::strcmp(flag, "tf32x3") == 0;
}

Operand operand(const at::Tensor& t) { return Operand{t.const_data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

int multiprocessors(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

}  // namespace

void fused_moments_cuda(at::Tensor& moment, at::Tensor& sum, const at::Tensor& X, const at::Tensor& G,
                        const at::Tensor* Xb, const at::Tensor* Gb, int64_t groups) {
  const c10::cuda::CUDAGuard guard(X.device());
  const int64_t samples = X.size(0) / groups, T = X.size(1), I = X.size(2), O = G.size(2);
  if (samples == 0 || I == 0 || O == 0) return;
  const int64_t tiles = ((I + kTile - 1) / kTile) * ((O + kTile - 1) / kTile) * groups;
  // Enough blocks for two waves; partials capped at 64 MiB (and 64 splits).
  const int64_t per_split_bytes = groups * O * I * int64_t(X.element_size()) * (sum.defined() ? 2 : 1);
  int64_t splits = std::max<int64_t>(1, (2 * multiprocessors(X.get_device()) + tiles - 1) / tiles);
  splits = std::clamp<int64_t>(std::min(splits, (int64_t(64) << 20) / std::max<int64_t>(per_split_bytes, 1)), 1,
                               std::min<int64_t>(samples, 64));
  at::Tensor moment_out = moment, sum_out = sum;
  if (splits > 1) {
    moment_out = at::empty({splits, groups, O, I}, moment.options());
    if (sum.defined()) sum_out = at::empty({splits, groups, O, I}, moment.options());
  }
  const dim3 grid(static_cast<unsigned>((I + kTile - 1) / kTile), static_cast<unsigned>((O + kTile - 1) / kTile),
                  static_cast<unsigned>(groups * splits));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool cross = Xb != nullptr;
  const Operand x = operand(X), g = operand(G), xb = cross ? operand(*Xb) : x, gb = cross ? operand(*Gb) : g;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, X.get_device()));
  if (X.scalar_type() == at::kFloat && major >= 8 && tensor_cores_requested()) {
    float* m_ptr = moment_out.mutable_data_ptr<float>();
    float* s_ptr = sum.defined() ? sum_out.mutable_data_ptr<float>() : nullptr;
    auto launch = [&](auto kernel) {
      kernel<<<grid, kTcThreads, 0, stream>>>(x, g, xb, gb, m_ptr, s_ptr, samples, groups, T, I, O, splits);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    with_variant(cross, sum.defined(), [&](auto kCross, auto kSum) {
      launch(fused_moments_tf32x3_kernel<decltype(kCross)::value, decltype(kSum)::value>);
    });
  } else {
    AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "fused_moments_cuda", [&] {
      auto* m_ptr = moment_out.mutable_data_ptr<scalar_t>();
      auto* s_ptr = sum.defined() ? sum_out.mutable_data_ptr<scalar_t>() : nullptr;
      auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(x, g, xb, gb, m_ptr, s_ptr, samples, groups, T, I, O, splits);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      with_variant(cross, sum.defined(), [&](auto kCross, auto kSum) {
        launch(fused_moments_kernel<scalar_t, decltype(kCross)::value, decltype(kSum)::value>);
      });
    });
  }
  if (splits > 1) {  // fixed-order reduction of the partials: deterministic
    moment.add_(moment_out.sum(0));
    if (sum.defined()) sum.add_(sum_out.sum(0));
  }
}

}  // namespace gradvar
