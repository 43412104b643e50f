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
// GRADVAR_EXT_FUSED_CUDA=tensor_cores (sm_80+): the same walk on tensor cores, 3xTF32 for float32 and
// DMMA for float64 (below).
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
#include <iterator>
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
// Pipeline: each thread fetches its share of the next step's operands into registers while the
// warps run the current step's MMAs; shared memory holds two stages (one barrier per step).
// Rows are padded to 72 elements so that fragment loads take the fewest wavefronts. Shared
// memory: one 64 x 72 buffer (18 KiB float, 36 KiB double): 2 stages x {G, X} x 16 positions
// during the walk, then the staging tile through which results reach global memory.
namespace wmma = nvcuda::wmma;
constexpr int kTile = 64, kSteps = 16, kLd = kTile + 8;

struct Tf32x3 {
  using scalar_t = float;
  // Capped at 168 registers for 3 blocks per SM (the sum / cross variants spill ~230 bytes,
  // touched once per sample): on an H200 5-12% faster than 2 blocks per SM with no spills on 4
  // of 5 shapes (8% slower on 64x128x1024->1024), both variants tested there (RESULTS.md).
  static constexpr int kM = 16, kK = 8, kWarpsO = 2, kWarpsI = 2, kMinBlocks = 3;
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
  static constexpr int kM = 8, kK = 4, kWarpsO = 2, kWarpsI = 4, kMinBlocks = 1;
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
};

// This thread's elements of rows [t0, t0 + kSteps) x features [f0, f0 + kTile) of sample-group b
// (zero outside [T, F)); consecutive threads walk the operand's unit-stride dimension.
template <typename scalar_t, int kThreads, int kPer>
__device__ void fetch_tile(scalar_t (&v)[kPer], const Operand& op, int64_t b, int64_t t0, int64_t f0, int64_t T,
                           int64_t F) {
  const scalar_t* base = static_cast<const scalar_t*>(op.data) + b * op.s_batch;
  const bool features_fastest = op.s_feat == 1;
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int e = threadIdx.x + r * kThreads;
    const int64_t t = t0 + (features_fastest ? e / kTile : e % kSteps);
    const int64_t feat = f0 + (features_fastest ? e % kTile : e / kSteps);
    v[r] = (t < T && feat < F) ? base[t * op.s_pos + feat * op.s_feat] : scalar_t(0);
  }
}

template <typename scalar_t, int kThreads, int kPer>
__device__ void stash_tile(const scalar_t (&v)[kPer], scalar_t* tile, bool features_fastest) {  // tile: [kSteps][kLd]
#pragma unroll
  for (int r = 0; r < kPer; ++r) {
    const int e = threadIdx.x + r * kThreads;
    const int k = features_fastest ? e / kTile : e % kSteps, f = features_fastest ? e % kTile : e / kSteps;
    tile[k * kLd + f] = v[r];
  }
}

// X read as patches of an image (GRADVAR_EXT_CONV_ALGORITHM=implicit): the image's element
// strides and the convolution; `data` of the X operand is the image.
struct Patches {
  int64_t s_sample, s_channel, s_row, s_col;
  int channels, height, width, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, out_width;
};

// This thread's share of a step's patches: element r is position t0 + threadIdx.x % kSteps and
// feature f0 + threadIdx.x / kSteps + r * (kThreads / kSteps), the layout stash_tile gives for
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

  // v = the patches of sample-group (n, group) at positions [t0, t0 + kSteps) (0 past T).
  template <typename scalar_t>
  __device__ void fetch(scalar_t (&v)[kPer], const Operand& image, const Patches& p, int64_t n, int64_t group,
                        int64_t t0, int64_t T) const {
    const scalar_t* base = static_cast<const scalar_t*>(image.data) + n * p.s_sample +
                           group * p.channels * p.s_channel;
    const int64_t t = t0 + threadIdx.x % kSteps;
    const int oh = static_cast<int>(t / p.out_width), ow = static_cast<int>(t % p.out_width);
    const int top = t < T ? oh * p.stride_h : INT32_MIN / 2, left = ow * p.stride_w;
#pragma unroll
    for (int r = 0; r < kPer; ++r) {
      const int y = top + row[r], x = left + col[r];
      const bool inside = static_cast<unsigned>(y) < static_cast<unsigned>(p.height) &&
                          static_cast<unsigned>(x) < static_cast<unsigned>(p.width);
      v[r] = inside ? base[offset[r] + y * p.s_row + x * p.s_col] : scalar_t(0);
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
  __shared__ __align__(128) scalar_t smem[kTile * kLd];  // stage s, operand p: rows [(2 s + p) kSteps, +kSteps)
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
  scalar_t reg_g[kPer], reg_x[kPer];
  PatchTaps<kThreads, kPer> taps;
  if constexpr (kPatches) taps = PatchTaps<kThreads, kPer>(geo, i0, I);
  auto fetch = [&](const Step& at) {
    const int64_t b = at.n * groups + group;
    fetch_tile<scalar_t, kThreads>(reg_g, pick(kCross && at.pass, G, Gb), b, at.t0, o0, T, O);
    if constexpr (kPatches) {
      taps.fetch(reg_x, X, geo, at.n, group, at.t0, T);
    } else {
      fetch_tile<scalar_t, kThreads>(reg_x, pick(kCross && at.pass, X, Xb), b, at.t0, i0, T, I);
    }
  };
  const bool x_features_fastest = !kPatches && X.s_feat == 1;  // patches: positions fastest
  Step at{s_begin, 0, 0};
  if (at.n < s_end && T > 0) fetch(at);
  for (int stage = 0; at.n < s_end && T > 0; stage ^= 1) {
    scalar_t* gs = smem + (2 * stage) * kSteps * kLd;
    scalar_t* xs = gs + kSteps * kLd;
    stash_tile<scalar_t, kThreads>(reg_g, gs, pick(kCross && at.pass, G, Gb).s_feat == 1);
    stash_tile<scalar_t, kThreads>(reg_x, xs, kCross && at.pass ? Xb.s_feat == 1 : x_features_fastest);
    __syncthreads();
    const Step next = next_step<kCross>(at, T);
    if (next.n < s_end) fetch(next);  // in flight while the MMAs below run
    if (kCross && at.pass) {
      mma_step<Mma>(h, gs, xs, T - at.t0, wo, wi);
    } else {
      mma_step<Mma>(g, gs, xs, T - at.t0, wo, wi);
    }
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
  __syncthreads();  // the operand stages become the staging tile
  const int64_t out_base = (split * groups + group) * O * I;  // [splits, groups, O, I]
  store_tile<Mma>(smem, m, moment_out + out_base, o0, i0, O, I, wo, wi, accumulate);  // accumulate: splits == 1 only
  if (kSum) store_tile<Mma>(smem, s, sum_out + out_base, o0, i0, O, I, wo, wi, accumulate);
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

// GRADVAR_EXT_FUSED_CUDA=tensor_cores (or its first name, tf32x3, once float32 only).
bool tensor_cores_requested() {
  const char* flag = std::getenv("GRADVAR_EXT_FUSED_CUDA");
  return flag != nullptr && (std::strcmp(flag, "tensor_cores") == 0 || std::strcmp(flag, "tf32x3") == 0);
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

namespace {

// Launches a moments walk over [groups] x O x I (start(grid, moment_out, sum_out, splits, add)
// launches the kernel). Samples are split over gridDim.z so that the tiles fill one wave of
// resident blocks (partials [splits, groups, O, I], at most 64 MiB); the partials are then
// reduced in a fixed order, straight into the result (at::sum_out) unless an earlier chunk's
// values are there to add to (accumulate).
template <typename Kernel, typename Start>
void run_moments_walk(Kernel kernel, int threads, int side, at::Tensor& moment, at::Tensor& sum, int64_t samples,
                      int64_t groups, int64_t I, int64_t O, bool accumulate, int device, const DeviceFacts& facts,
                      Start&& start) {
  const int64_t per_split_bytes = groups * O * I * int64_t(moment.element_size()) * (sum.defined() ? 2 : 1);
  const auto [grid, splits] = walk_grid(kernel, threads, side, groups, I, O, samples,
                                        (int64_t(64) << 20) / std::max<int64_t>(per_split_bytes, 1), device, facts,
                                        "moments");
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

// f(policy) with the tensor-core policy of a dtype: Tf32x3 for float32, Dmma for float64.
template <typename F>
void with_mma_policy(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) return f(Tf32x3{});
  TORCH_CHECK(dtype == at::kDouble, "gradvar: the tensor-core moments take float32 or float64, got ", dtype);
  f(Dmma{});
}

// Sizes the fused walks index with 32-bit integers.
void check_walk_extents(int64_t T, int64_t I, int64_t O, const char* what) {
  TORCH_CHECK(T <= INT32_MAX && I <= INT32_MAX && O <= INT32_MAX, "gradvar: the fused CUDA ", what,
              " take fewer than 2^31 positions and features per sample (set GRADVAR_EXT_FUSED_CUDA=0 and "
              "GRADVAR_EXT_CONV_ALGORITHM=auto for the chunked path)");
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
  check_walk_extents(T, I, O, "moments");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool cross = Xb != nullptr;
  const Operand x = operand(X), g = operand(G), xb = cross ? operand(*Xb) : x, gb = cross ? operand(*Gb) : g;
  const int device = X.get_device();
  const DeviceFacts facts = device_facts(device);
  auto run = [&](auto kernel, int threads, int side, auto start) {
    run_moments_walk(kernel, threads, side, moment, sum, samples, groups, I, O, accumulate, device, facts, start);
  };
  if (facts.major >= 8 && tensor_cores_requested()) {  // 3xTF32 for float32, DMMA for float64
    return with_mma_policy(X.scalar_type(), [&](auto policy) {
      using Mma = decltype(policy);
      using scalar_t = typename Mma::scalar_t;
      constexpr int threads = MmaTiling<Mma>::kThreads;
      with_variant(cross, sum.defined(), [&](auto kCross, auto kSum) {
        const auto kernel = fused_moments_mma_kernel<Mma, decltype(kCross)::value, decltype(kSum)::value>;
        run(kernel, threads, kTile, [&](dim3 grid, at::Tensor& m_out, at::Tensor& s_out, int64_t splits, bool add) {
          scalar_t* s_ptr = sum.defined() ? s_out.mutable_data_ptr<scalar_t>() : nullptr;
          kernel<<<grid, threads, 0, stream>>>(x, g, xb, gb, m_out.mutable_data_ptr<scalar_t>(), s_ptr, samples,
                                               groups, T, I, O, splits, add, Patches{});
        });
      });
    });
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
  auto stream = c10::cuda::getCurrentCUDAStream();
  with_mma_policy(image.scalar_type(), [&](auto policy) {
    using Mma = decltype(policy);
    using scalar_t = typename Mma::scalar_t;
    constexpr int threads = MmaTiling<Mma>::kThreads;
    with_variant(false, sum.defined(), [&](auto, auto kSum) {
      const auto kernel = fused_moments_mma_kernel<Mma, false, decltype(kSum)::value, true>;
      run_moments_walk(kernel, threads, kTile, moment, sum, samples, groups, I, O, /*accumulate=*/false, device, facts,
                       [&](dim3 grid, at::Tensor& m_out, at::Tensor& s_out, int64_t splits, bool add) {
                         scalar_t* s_ptr = sum.defined() ? s_out.mutable_data_ptr<scalar_t>() : nullptr;
                         kernel<<<grid, threads, 0, stream>>>(x, g, x, g, m_out.mutable_data_ptr<scalar_t>(), s_ptr,
                                                              samples, groups, T, I, O, splits, add, geo);
                       });
    });
  });
  return true;
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
