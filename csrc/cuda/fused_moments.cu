// Fused per-sample moments on CUDA: one pass over the factors, no per-sample gradient in
// global memory, no atomics (deterministic).
//   moment[g, o, i] += sum_s  g_s[o, i] * h_s[o, i]      (h_s = g_s unless a second pair is given)
//   sum[g, o, i]    += sum_s  g_s[o, i]                  (optional)
//   g_s = sum_t G[s, t, o] X[s, t, i],  h_s = sum_t Gb[s, t, o] Xb[s, t, i]
// X, Xb: [S * groups, T, I]; G, Gb: [S * groups, T, O]; any strides. A block owns an output
// tile of one group (128 x 128 float32, 64 x 64 float64 or cross moments) and walks its share of
// the samples' positions (below); per sample it accumulates g_s (and h_s) in registers, then
// updates the moment / sum registers. Samples are split over gridDim.z only as far as needed to fill the GPU;
// the splits' partials are reduced in a fixed order afterwards.
// Memory: partials [splits, groups, O, I] (<= 64 MiB), none when the tiles alone fill the GPU.
// The same walk also gives per-sample squared norms ||g_s||^2 (fused_squared_norms_cuda): per
// sample, each warp's share of the tile's squares summed, [S, groups, tiles, 8] partials, then
// each sample's partials summed (opt-in, GRADVAR_EXT_FUSED_CUDA=1: slower than cuBLAS on an H100).
// GRADVAR_EXT_FUSED_CUDA=tf32x3 (float32, sm_80+): the same walk on tensor cores, 3xTF32 (below).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <mma.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../outer_product_stats.h"

namespace gradvar {
namespace {

struct Operand {  // a [S * groups, T, F] factor with element strides
  const void* data;
  int64_t s_batch, s_pos, s_feat;
};

// ---- CUDA cores, register-tiled ----
// The block's positions are walked as one sequence over its samples, kStage at a time: a stage is
// fetched into registers while the previous one is multiplied from shared memory (two stages, one
// barrier each). 256 threads as 16 x 16; a thread owns kPer x kPer outputs, rows
// h * 64 + ty * 4 + {0..3} and columns h * 64 + tx * 4 + {0..3} (h < kPer / 4), read from shared
// memory as 4-vectors (conflict-free). After a sample's last position the thread folds its
// gradient tile into the moment / sum registers (m += g * h, s += g) and clears it. kPer = 8
// (128 x 128 tiles) for float32 moments; 4 (64 x 64) for float64 or a cross moment (g, h and m:
// three accumulator sets either way, <= 192 registers of them).
constexpr int kStage = 8, kBlock = 256;

template <typename scalar_t, bool kCross>
struct Tiling {
  static constexpr int kPer = (sizeof(scalar_t) == 4 && !kCross) ? 8 : 4;
  static constexpr int kSide = 16 * kPer;       // output tile: kSide x kSide
  static constexpr int kRow = kSide + 4;        // shared-memory row (one position of one operand)
  static constexpr int kVec = kSide / 32;       // elements a thread fetches per operand and stage
  static constexpr int kOperands = kCross ? 4 : 2;  // G, X (, Gb, Xb)
};

template <typename scalar_t, int kVec>
struct alignas(sizeof(scalar_t) * kVec) Vec {
  scalar_t v[kVec];
};

// One operand's stage for this thread: a fixed row k of the stage (features fastest: k = warp,
// kVec consecutive features; positions fastest: k = lane % 8, features 32 apart), following the
// position that row holds (pointer `row`, position t in its sample) as the walk advances.
template <typename scalar_t, int kVec>
struct StageFetcher {
  const scalar_t* row;      // this thread's first element of the current row
  int64_t s_pos, s_sample;  // element strides: next position, next sample (of the same group)
  int64_t s_elem;           // between this thread's elements of a row
  int t, features_left;     // features_left = F - this thread's first feature (host: T, F < 2^31)
  int k, f, f_step;
  bool vectorised;

  StageFetcher() = default;
  __device__ StageFetcher(const Operand& o, int64_t first_sample, int64_t T, int64_t groups, int64_t group,
                          int64_t feature0, int64_t F, bool vectorised_) {
    const bool features_fastest = o.s_feat == 1;
    k = features_fastest ? threadIdx.x / 32 : threadIdx.x % kStage;
    f = features_fastest ? (threadIdx.x % 32) * kVec : threadIdx.x / kStage;
    f_step = features_fastest ? 1 : 32;
    vectorised = vectorised_ && features_fastest;
    s_pos = o.s_pos, s_sample = groups * o.s_batch, s_elem = f_step * o.s_feat;
    features_left = static_cast<int>(F - feature0 - f);
    t = static_cast<int>(k % T);
    row = static_cast<const scalar_t*>(o.data) + ((first_sample + k / T) * groups + group) * o.s_batch +
          t * s_pos + (feature0 + f) * o.s_feat;
  }

  // v = the row's elements, zero where the row is past the block's positions (k >= remaining)
  // or the feature is past F.
  __device__ void fetch(scalar_t (&v)[kVec], int64_t remaining) const {
    const bool row_valid = k < remaining;
    if (vectorised) {  // F % kVec == 0 and aligned: the kVec features are all in or all out
      if (row_valid && features_left > 0) {
        const auto w = *reinterpret_cast<const Vec<scalar_t, kVec>*>(row);
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[j] = w.v[j];
      } else {
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[j] = scalar_t(0);
      }
      return;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = (row_valid && j * f_step < features_left) ? row[j * s_elem] : scalar_t(0);
  }

  // tile: [kStage][row_len] (rows padded so that positions-fastest stores spread over the banks)
  __device__ void stash(const scalar_t (&v)[kVec], scalar_t* tile, int row_len) const {
    if (f_step == 1) {
      Vec<scalar_t, kVec> w;
#pragma unroll
      for (int j = 0; j < kVec; ++j) w.v[j] = v[j];
      *reinterpret_cast<Vec<scalar_t, kVec>*>(tile + k * row_len + f) = w;
      return;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) tile[k * row_len + f + j * f_step] = v[j];
  }

  __device__ void advance(int T) {  // kStage positions on
    const int next = t + kStage, samples_on = T >= kStage ? (next >= T) : next / T;
    const int t_new = next - samples_on * T;
    row += samples_on * s_sample + (t_new - t) * s_pos;
    t = t_new;
  }
};

template <typename scalar_t, int kPer>
__device__ void read_fragment(scalar_t (&v)[kPer], const scalar_t* row, int lane16) {
#pragma unroll
  for (int h = 0; h < kPer / 4; ++h) {
    const scalar_t* at = row + h * 64 + lane16 * 4;
    if constexpr (sizeof(scalar_t) == 4) {
      const float4 w = *reinterpret_cast<const float4*>(at);
      v[4 * h] = w.x, v[4 * h + 1] = w.y, v[4 * h + 2] = w.z, v[4 * h + 3] = w.w;
    } else {
      const double2 w0 = *reinterpret_cast<const double2*>(at), w1 = *reinterpret_cast<const double2*>(at + 2);
      v[4 * h] = w0.x, v[4 * h + 1] = w0.y, v[4 * h + 2] = w1.x, v[4 * h + 3] = w1.y;
    }
  }
}

// acc[r][c] += (row r of this thread in g_row) * (column c of this thread in x_row): one position.
template <typename scalar_t, int kPer>
__device__ __forceinline__ void add_outer_product(scalar_t (&acc)[kPer][kPer], const scalar_t* g_row,
                                                  const scalar_t* x_row, int tx, int ty) {
  scalar_t a[kPer], b[kPer];
  read_fragment(a, g_row, ty);
  read_fragment(b, x_row, tx);
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) acc[r][c] += a[r] * b[c];
}

// The walk shared by the CUDA-core kernels: this block's output tile [o0, o0 + kSide) x
// [i0, i0 + kSide) of `group`, over samples [s_begin, s_end). Per sample, g (and h, kCross) =
// its gradient tile, accumulated position by position in registers; at the sample's last
// position (block-uniform) fold(g, h) takes them, and they are cleared for the next sample.
template <typename scalar_t, bool kCross, typename Fold>
__device__ __forceinline__ void walk_sample_tiles(const Operand& X, const Operand& G, const Operand& Xb,
                                                  const Operand& Gb, int64_t s_begin, int64_t s_end, int64_t groups,
                                                  int64_t group, int64_t T, int64_t I, int64_t O, int64_t i0,
                                                  int64_t o0, bool vectorised, Fold&& fold) {
  using Tile = Tiling<scalar_t, kCross>;
  constexpr int kPer = Tile::kPer, kRow = Tile::kRow, kVec = Tile::kVec;
  constexpr int kOps = Tile::kOperands;
  __shared__ __align__(16) scalar_t smem[2][kOps][kStage * kRow];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  using Fetcher = StageFetcher<scalar_t, kVec>;
  Fetcher fetchers[kOps];
  fetchers[0] = Fetcher(G, s_begin, T, groups, group, o0, O, vectorised);
  fetchers[1] = Fetcher(X, s_begin, T, groups, group, i0, I, vectorised);
  if constexpr (kCross) {
    fetchers[2] = Fetcher(Gb, s_begin, T, groups, group, o0, O, vectorised);
    fetchers[3] = Fetcher(Xb, s_begin, T, groups, group, i0, I, vectorised);
  }
  scalar_t g[kPer][kPer] = {}, h[kPer][kPer] = {};
  scalar_t staged[kOps][kVec];
  int64_t remaining = (s_end - s_begin) * T, t0 = 0;  // from the stage's first position (block-uniform)
  if (remaining > 0) {
#pragma unroll
    for (int p = 0; p < kOps; ++p) fetchers[p].fetch(staged[p], remaining), fetchers[p].stash(staged[p], smem[0][p], kRow);
    __syncthreads();
  }
  for (int cur = 0; remaining > 0; cur ^= 1) {
    const bool more = remaining > kStage;
    if (more) {  // in flight while the stage below is multiplied
#pragma unroll
      for (int p = 0; p < kOps; ++p) fetchers[p].advance(static_cast<int>(T)), fetchers[p].fetch(staged[p], remaining - kStage);
    }
    // Positions of this stage that end a sample (bit k), among the block's positions.
    unsigned last = 0;
    for (int64_t k = T - 1 - t0; k < kStage; k += T) last |= 1u << k;
    if (remaining < kStage) last &= (1u << remaining) - 1;
#pragma unroll
    for (int k = 0; k < kStage; ++k) {
      add_outer_product(g, smem[cur][0] + k * kRow, smem[cur][1] + k * kRow, tx, ty);
      if constexpr (kCross) add_outer_product(h, smem[cur][2] + k * kRow, smem[cur][3] + k * kRow, tx, ty);
      if (last & (1u << k)) {  // block-uniform
        fold(g, h);
#pragma unroll
        for (int r = 0; r < kPer; ++r)
#pragma unroll
          for (int c = 0; c < kPer; ++c) {
            g[r][c] = scalar_t(0);
            if (kCross) h[r][c] = scalar_t(0);
          }
      }
    }
    if (more) {
#pragma unroll
      for (int p = 0; p < kOps; ++p) fetchers[p].stash(staged[p], smem[cur ^ 1][p], kRow);
    }
    t0 = (t0 + kStage) % T;
    remaining -= kStage;
    __syncthreads();
  }
}

// moment[o, i] (+)= sum_s g_s * h_s, sum[o, i] (+)= sum_s g_s over the block's samples.
template <typename scalar_t, bool kCross, bool kSum>
__global__ void __launch_bounds__(kBlock)
    fused_moments_kernel(Operand X, Operand G, Operand Xb, Operand Gb, scalar_t* __restrict__ moment_out,
                         scalar_t* __restrict__ sum_out, int64_t samples, int64_t groups, int64_t T, int64_t I,
                         int64_t O, int64_t splits, bool vectorised, bool accumulate) {
  using Tile = Tiling<scalar_t, kCross>;
  constexpr int kPer = Tile::kPer, kSide = Tile::kSide;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t i0 = int64_t(blockIdx.x) * kSide, o0 = int64_t(blockIdx.y) * kSide;
  const int64_t group = blockIdx.z % groups, split = blockIdx.z / groups;
  const int64_t s_begin = samples * split / splits, s_end = samples * (split + 1) / splits;
  scalar_t m[kPer][kPer] = {}, s[kPer][kPer] = {};
  walk_sample_tiles<scalar_t, kCross>(
      X, G, Xb, Gb, s_begin, s_end, groups, group, T, I, O, i0, o0, vectorised,
      [&](const scalar_t (&g)[kPer][kPer], const scalar_t (&h)[kPer][kPer]) {
#pragma unroll
        for (int r = 0; r < kPer; ++r)
#pragma unroll
          for (int c = 0; c < kPer; ++c) {
            m[r][c] += g[r][c] * (kCross ? h[r][c] : g[r][c]);
            if (kSum) s[r][c] += g[r][c];
          }
      });
  // Output layout [splits, groups, O, I]; with splits == 1 this is the result itself (+= when
  // accumulate: a later chunk of samples; else overwritten, so the host need not zero it first).
  const int64_t out_base = (split * groups + group) * O * I;
#pragma unroll
  for (int r = 0; r < kPer; ++r)
#pragma unroll
    for (int c = 0; c < kPer; ++c) {
      const int64_t o = o0 + (r / 4) * 64 + ty * 4 + r % 4, i = i0 + (c / 4) * 64 + tx * 4 + c % 4;
      if (o < O && i < I) {
        const int64_t at = out_base + o * I + i;
        moment_out[at] = (accumulate ? moment_out[at] : scalar_t(0)) + m[r][c];
        if (kSum) sum_out[at] = (accumulate ? sum_out[at] : scalar_t(0)) + s[r][c];
      }
    }
}

// Per-sample squared norms, one partial per (sample, group, tile, warp):
//   partial[s, group, tile, warp] = sum over the warp's outputs of g_s[o, i]**2
// (outputs past O or I are 0: their operands are fetched as zeros). A warp's sum is a fixed
// shuffle tree, written once (no atomics); the host sums each sample's partials: ||g_s||**2.
// Memory: [S, groups, tiles, kBlock / 32] partials, ~1/256 of the per-sample gradients.
constexpr int kWarps = kBlock / 32;

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock)
    fused_squared_norms_kernel(Operand X, Operand G, scalar_t* __restrict__ partial, int64_t samples, int64_t groups,
                               int64_t T, int64_t I, int64_t O, int64_t splits, bool vectorised) {
  using Tile = Tiling<scalar_t, false>;
  constexpr int kPer = Tile::kPer, kSide = Tile::kSide;
  const int64_t i0 = int64_t(blockIdx.x) * kSide, o0 = int64_t(blockIdx.y) * kSide;
  const int64_t group = blockIdx.z % groups, split = blockIdx.z / groups;
  const int64_t s_begin = samples * split / splits, s_end = samples * (split + 1) / splits;
  const int64_t tiles = int64_t(gridDim.x) * gridDim.y, tile = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int64_t sample = s_begin;
  walk_sample_tiles<scalar_t, false>(
      X, G, X, G, s_begin, s_end, groups, group, T, I, O, i0, o0, vectorised,
      [&](const scalar_t (&g)[kPer][kPer], const scalar_t (&)[kPer][kPer]) {
        scalar_t v = scalar_t(0);
#pragma unroll
        for (int r = 0; r < kPer; ++r)
#pragma unroll
          for (int c = 0; c < kPer; ++c) v += g[r][c] * g[r][c];
#pragma unroll
        for (int d = 16; d > 0; d /= 2) v += __shfl_xor_sync(0xffffffffu, v, d);
        if (lane == 0) partial[((sample * groups + group) * tiles + tile) * kWarps + warp] = v;
        ++sample;
      });
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
constexpr int kTile = 64, kSteps = 16;
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
                                int64_t O, int64_t splits, bool accumulate) {
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
  store_tile(smem, m, moment_out + out_base, o0, i0, O, I, wo, wi, accumulate);  // accumulate: splits == 1 only
  if (kSum) store_tile(smem, s, sum_out + out_base, o0, i0, O, I, wo, wi, accumulate);
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

// Whether a factor allows the walk's 128-bit loads of `vec` elements (or is not features-fastest).
bool vector_loads_ok(const at::Tensor& t, int64_t vec) {
  return t.stride(2) != 1 || (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (vec * t.element_size()) == 0 &&
                              t.stride(0) % vec == 0 && t.stride(1) % vec == 0 && t.size(2) % vec == 0);
}

int64_t tiles_over(int64_t extent, int64_t side) { return (extent + side - 1) / side; }

// Device facts and kernel occupancies, asked of the driver once per (device, kernel): the host
// cost of a call matters at the sizes where the fused kernel is the default.
struct DeviceFacts {
  int multiprocessors = 0, major = 0;
};

DeviceFacts device_facts(int device) {
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

template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, int device) {
  static std::mutex lock;
  static std::map<std::pair<const void*, int>, int> known;
  const std::lock_guard<std::mutex> guard(lock);
  const auto key = std::make_pair(reinterpret_cast<const void*>(kernel), device);
  auto found = known.find(key);
  if (found != known.end()) return found->second;
  int resident = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, 0));
  return known[key] = std::max(resident, 1);
}

// The grid of a walk over [groups] x O x I in side x side tiles: samples split over gridDim.z so
// that the tiles fill one wave of resident blocks, at most max_splits and one sample per split.
struct WalkGrid {
  dim3 grid;
  int64_t splits;
};

template <typename Kernel>
WalkGrid walk_grid(Kernel kernel, int threads, int64_t side, int64_t groups, int64_t I, int64_t O, int64_t samples,
                   int64_t max_splits, int device, const DeviceFacts& facts, const char* what) {
  const int64_t tiles = tiles_over(I, side) * tiles_over(O, side) * groups;
  const int64_t wave = int64_t(resident_blocks(kernel, threads, device)) * facts.multiprocessors;
  const int64_t splits = std::clamp<int64_t>(std::min(wave / tiles, max_splits), 1, samples);
  TORCH_CHECK(groups * splits <= 65535, "gradvar: the fused CUDA ", what,
              " take at most 65535 groups (set GRADVAR_EXT_FUSED_CUDA=0 for the chunked path)");
  const dim3 grid(static_cast<unsigned>(tiles_over(I, side)), static_cast<unsigned>(tiles_over(O, side)),
                  static_cast<unsigned>(groups * splits));
  return {grid, splits};
}

}  // namespace

void fused_moments_cuda(at::Tensor& moment, at::Tensor& sum, const at::Tensor& X, const at::Tensor& G,
                        const at::Tensor* Xb, const at::Tensor* Gb, int64_t groups, bool accumulate) {
  const c10::cuda::CUDAGuard guard(X.device());
  const int64_t samples = X.size(0) / groups, T = X.size(1), I = X.size(2), O = G.size(2);
  if (samples == 0 || T == 0 || I == 0 || O == 0) {  // nothing to add: the sums of no terms
    if (!accumulate) {
      moment.zero_();
      if (sum.defined()) sum.zero_();
    }
    return;
  }
  TORCH_CHECK(T <= INT32_MAX && I <= INT32_MAX && O <= INT32_MAX,
              "gradvar: the fused CUDA moments take fewer than 2^31 positions and features per sample "
              "(set GRADVAR_EXT_FUSED_CUDA=0 for the chunked path)");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool cross = Xb != nullptr;
  const Operand x = operand(X), g = operand(G), xb = cross ? operand(*Xb) : x, gb = cross ? operand(*Gb) : g;
  const int device = X.get_device();
  const DeviceFacts facts = device_facts(device);
  // Samples are split over gridDim.z so that the tiles fill one wave of resident blocks (partials
  // [splits, groups, O, I], at most 64 MiB); the partials are then reduced in a fixed order,
  // straight into the result (at::sum_out) unless an earlier chunk's values are there to add to.
  auto run = [&](auto kernel, int threads, int side, auto start) {
    const int64_t per_split_bytes = groups * O * I * int64_t(X.element_size()) * (sum.defined() ? 2 : 1);
    const auto [grid, splits] = walk_grid(kernel, threads, side, groups, I, O, samples,
                                          (int64_t(64) << 20) / std::max<int64_t>(per_split_bytes, 1), device,
                                          facts, "moments");
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
  };
  if (X.scalar_type() == at::kFloat && facts.major >= 8 && tensor_cores_requested()) {
    with_variant(cross, sum.defined(), [&](auto kCross, auto kSum) {
      const auto kernel = fused_moments_tf32x3_kernel<decltype(kCross)::value, decltype(kSum)::value>;
      run(kernel, kTcThreads, kTile, [&](dim3 grid, at::Tensor& m_out, at::Tensor& s_out, int64_t splits, bool add) {
        float* s_ptr = sum.defined() ? s_out.mutable_data_ptr<float>() : nullptr;
        kernel<<<grid, kTcThreads, 0, stream>>>(x, g, xb, gb, m_out.mutable_data_ptr<float>(), s_ptr, samples,
                                                groups, T, I, O, splits, add);
      });
    });
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "fused_moments_cuda", [&] {
    with_variant(cross, sum.defined(), [&](auto kCross, auto kSum) {
      using Tile = Tiling<scalar_t, decltype(kCross)::value>;
      auto vector_ok = [](const at::Tensor& t) { return vector_loads_ok(t, Tile::kVec); };
      const bool vectorised = vector_ok(X) && vector_ok(G) && (!cross || (vector_ok(*Xb) && vector_ok(*Gb)));
      const auto kernel = fused_moments_kernel<scalar_t, decltype(kCross)::value, decltype(kSum)::value>;
      run(kernel, kBlock, Tile::kSide, [&](dim3 grid, at::Tensor& m_out, at::Tensor& s_out, int64_t splits, bool add) {
        scalar_t* s_ptr = sum.defined() ? s_out.mutable_data_ptr<scalar_t>() : nullptr;
        kernel<<<grid, kBlock, 0, stream>>>(x, g, xb, gb, m_out.mutable_data_ptr<scalar_t>(), s_ptr, samples,
                                            groups, T, I, O, splits, vectorised, add);
      });
    });
  });
}

// The partials fused_squared_norms_kernel writes per sample: groups x tiles x warps.
int64_t fused_squared_norms_partials(int64_t groups, int64_t I, int64_t O, at::ScalarType dtype) {
  const int64_t side = dtype == at::kDouble ? Tiling<double, false>::kSide : Tiling<float, false>::kSide;
  return groups * tiles_over(I, side) * tiles_over(O, side) * kWarps;
}

void fused_squared_norms_cuda(at::Tensor& out, const at::Tensor& X, const at::Tensor& G, int64_t groups) {
  const c10::cuda::CUDAGuard guard(X.device());
  const int64_t samples = X.size(0) / groups, T = X.size(1), I = X.size(2), O = G.size(2);
  if (samples == 0) return;
  if (T == 0 || I == 0 || O == 0) {  // every g_s is empty or zero
    out.zero_();
    return;
  }
  TORCH_CHECK(T <= INT32_MAX && I <= INT32_MAX && O <= INT32_MAX,
              "gradvar: the fused CUDA squared norms take fewer than 2^31 positions and features per sample "
              "(set GRADVAR_EXT_FUSED_CUDA=0 for the chunked path)");
  const int device = X.get_device();
  const DeviceFacts facts = device_facts(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "fused_squared_norms_cuda", [&] {
    using Tile = Tiling<scalar_t, false>;
    const auto kernel = fused_squared_norms_kernel<scalar_t>;
    const bool vectorised = vector_loads_ok(X, Tile::kVec) && vector_loads_ok(G, Tile::kVec);
    // A split changes only which block walks a sample, never the partials' values or their order.
    const auto [grid, splits] =
        walk_grid(kernel, kBlock, Tile::kSide, groups, I, O, samples, samples, device, facts, "squared norms");
    at::Tensor partial = at::empty({samples, fused_squared_norms_partials(groups, I, O, X.scalar_type())}, X.options());
    kernel<<<grid, kBlock, 0, stream>>>(operand(X), operand(G), partial.mutable_data_ptr<scalar_t>(), samples, groups,
                                        T, I, O, splits, vectorised);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t over_partials[] = {1};
    at::sum_out(out, partial, over_partials);
  });
}

}  // namespace gradvar
