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
// On sm_80+ the same walk on tensor cores, 3xTF32 for float32 and DMMA for float64
// (fused_moments_mma.cu): by default for T > 1 without a cross pair, GRADVAR_EXT_FUSED_CUDA=tensor_cores
// always (fused_cuda_on_tensor_cores).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../outer_product_stats.h"
#include "moment_walk.cuh"

namespace gradvar {
namespace {

using walk::Operand;

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

// Whether a factor allows the walk's 128-bit loads of `vec` elements (or is not features-fastest).
bool vector_loads_ok(const at::Tensor& t, int64_t vec) {
  return t.stride(2) != 1 || (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % (vec * t.element_size()) == 0 &&
                              t.stride(0) % vec == 0 && t.stride(1) % vec == 0 && t.size(2) % vec == 0);
}

}  // namespace

using namespace walk;  // the shared host side (moment_walk.cuh)

bool cuda_has_tensor_cores(int device) { return device_facts(device).major >= 8; }

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
    run_moments_walk(kernel, threads, /*smem_bytes=*/0, side, moment, sum, samples, groups, I, O,
                     factor_bytes(samples, groups, T, I, O, cross, X.element_size()), accumulate, device, facts, start);
  };
  if (facts.major >= 8 && fused_cuda_on_tensor_cores(T, cross)) {  // 3xTF32 for float32, DMMA for float64
    return walk::fused_moments_mma_cuda(moment, sum, x, g, xb, gb, cross, samples, groups, T, I, O, accumulate,
                                        X.scalar_type(), device, facts);
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
  check_walk_extents(T, I, O, "squared norms");
  const int device = X.get_device();
  const DeviceFacts facts = device_facts(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "fused_squared_norms_cuda", [&] {
    using Tile = Tiling<scalar_t, false>;
    const auto kernel = fused_squared_norms_kernel<scalar_t>;
    const bool vectorised = vector_loads_ok(X, Tile::kVec) && vector_loads_ok(G, Tile::kVec);
    // A split changes only which block walks a sample, never the partials' values or their order.
    const auto [grid, splits] =
        walk_grid(kernel, kBlock, /*smem_bytes=*/0, Tile::kSide, groups, I, O, samples, samples, device, facts,
                  "squared norms");
    at::Tensor partial = at::empty({samples, fused_squared_norms_partials(groups, I, O, X.scalar_type())}, X.options());
    kernel<<<grid, kBlock, 0, stream>>>(operand(X), operand(G), partial.mutable_data_ptr<scalar_t>(), samples, groups,
                                        T, I, O, splits, vectorised);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t over_partials[] = {1};
    at::sum_out(out, partial, over_partials);
  });
}

}  // namespace gradvar
