// The one core: statistics of per-sample outer products g_n = G_n^T X_n, reduced over
// samples, without holding all N of them. Device-agnostic ATen (cuBLAS / CPU BLAS via
// at::bmm); the elementwise reductions go to the cpu/ and cuda/ kernels.
// Shapes: per sample and group, X_n [T, I], G_n [T, O], g_n [O, I]; results [groups, O, I].
#include "outer_product_stats.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "checks.h"

namespace gradvar {
namespace {

// Scratch budget (kChunkBytes) for everything formed per chunk of samples (per-sample gradients,
// Gram matrices, unfolded patches, weighted products). Extra memory stays under it whatever N
// is. CPU at most 4 MiB (on 2 cores as fast as 8 MiB on the benchmark jobs, 10-45% faster than
// 32 MiB; the sequence layer's job (b) peaks 4 MB lower), GPU up to 32 MiB (larger batched GEMMs fill
// the device; the size validated on an H200), but no more than half of what the whole batch
// would form (at least 1 MiB): a batch whose scratch fits the budget at once would otherwise
// hold all its per-sample gradients, as much as the methods that materialise them (the sequence
// layer's job (b) on an H100: 25.0 MB against torch.func's 24.8; 21 MB with the half, the same
// peak as with the CPU's 4 MiB, measured on the CPU with its budget raised to 32 MiB).
// On a GPU a chunk also holds at least 16 samples where one forms more than 2 MiB (up to 128 MiB,
// and still at most half the batch): batched GEMMs of fewer, large products underfill the device.
// Chunked / bmm throughput in GPU time (benchmarks/RESULTS.md, fourteenth and fifteenth sessions),
// float64 64x128x1024->1024 (8 MiB a sample): H200 0.47-0.48 with 4 samples a chunk (32 MiB),
// 0.53-0.54 with 8, 0.57-0.58 with 16; H100 0.44 / 0.49 / 0.54 (16 samples: 144 MB peak, 80 with
// 8); float32 32x256x768->768 0.42 with 3 samples, 0.85-0.86 with 6 or 13.
// GRADVAR_EXT_CHUNK_MIB=n sets every chunk's budget to n MiB instead (the grouped conv path's
// included): a knob for tuning and for tight memory (more samples per chunk: fewer launches,
// more scratch); =gpu applies the GPU's rule below on any device to chunks without a budget of
// their own (the CPU's grouped conv path keeps its 16 MiB): the CPU tests check the rule.
// The 1 MiB floor: the seed's MNIST CNN (N = 32, 1.8 MB of unfolded patches) peaked in job (a)
// on the CPU at 2.2 MB in one chunk against BackPACK's 1.6, at 1.5 in two, with the same time
// (thirtieth session). A GPU's floor was 4 MiB until the thirty-first session, which held the
// batch's patches in one chunk there (its job (b) peaked at 3.2 MB on an H100, BackPACK 2.7; 2.4
// in two chunks by the rule run on the CPU, GRADVAR_EXT_CHUNK_MIB=gpu). Batches that form more
// than 8 MiB keep their chunks; smaller ones go in two (a few more launches).
constexpr int64_t kLeastChunkBytes = int64_t(1) << 20, kCpuChunkBytes = int64_t(4) << 20;
constexpr int64_t kGpuChunkBytes = int64_t(32) << 20, kGpuMostChunkBytes = int64_t(128) << 20;
constexpr int64_t kGpuFewestChunkSamples = 16;
constexpr int64_t kGpuChunkRule = -1;  // forced_chunk_bytes() for GRADVAR_EXT_CHUNK_MIB=gpu

// Half of what the whole batch would form (batch_bytes), within kLeastChunkBytes and `most`.
int64_t half_the_batch(int64_t batch_bytes, int64_t most) {
  return std::clamp<int64_t>(batch_bytes / 2, kLeastChunkBytes, most);
}

int64_t chunk_bytes(const at::TensorOptions& options, int64_t sample_bytes, int64_t samples, bool gpu_rule) {
  const int64_t batch_bytes = sample_bytes * samples;
  if (options.device().is_cpu() && !gpu_rule) return half_the_batch(batch_bytes, kCpuChunkBytes);
  const int64_t several_samples =
      std::min({kGpuFewestChunkSamples * sample_bytes, kGpuMostChunkBytes, batch_bytes / 2});
  return std::max(half_the_batch(batch_bytes, kGpuChunkBytes), several_samples);
}

int64_t forced_chunk_bytes() {  // GRADVAR_EXT_CHUNK_MIB in bytes, 0 when unset, kGpuChunkRule for "gpu"
  const char* flag = std::getenv("GRADVAR_EXT_CHUNK_MIB");
  if (flag != nullptr && std::strcmp(flag, "gpu") == 0) return kGpuChunkRule;
  return env_mib("GRADVAR_EXT_CHUNK_MIB", " or gpu");
}

int64_t chunk_samples(int64_t elems_per_sample, const at::TensorOptions& options, int64_t samples,
                      int64_t max_chunk, int64_t budget = 0) {
  const int64_t element_size = static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  const int64_t bytes = std::max<int64_t>(1, elems_per_sample * element_size);
  const int64_t forced = forced_chunk_bytes();
  const int64_t budget_bytes =
      forced > 0 ? forced : budget > 0 ? budget : chunk_bytes(options, bytes, samples, forced == kGpuChunkRule);
  return std::clamp<int64_t>(budget_bytes / bytes, 1, std::max<int64_t>(1, std::min(samples, max_chunk)));
}

int64_t chunk_samples(int64_t elems_per_sample, const Factors& like) {
  return chunk_samples(elems_per_sample, like.options, like.samples, like.samples);
}

// Elements that chunk() allocates per sample (0 when it returns views).
int64_t formed(const Factors& f) { return f.materialises ? f.groups * f.positions * f.features : 0; }

// All samples at once with one position each: [groups, N, features].
at::Tensor by_group(const Factors& f) {
  const auto all = f.chunk(0, f.samples);  // [N * groups, 1, features]
  if (f.groups == 1) return all.view({1, f.samples, f.features});  // one view op (tiny layers: host-bound)
  return all.reshape({f.samples, f.groups, f.features}).transpose(0, 1);
}

void accumulate_products(at::Tensor& moment, at::Tensor& sum, const at::Tensor& g, const at::Tensor& gb) {
#ifdef GRADVAR_WITH_CUDA
  if (g.is_cuda()) return accumulate_products_cuda(moment, sum, g, gb);
#endif
  if (g.is_cpu()) return accumulate_products_cpu(moment, sum, g, gb);
  moment.add_((g * gb).sum(0).view_as(moment));
  if (sum.defined()) sum.add_(g.sum(0).view_as(sum));
}

void rowwise_dot(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
#ifdef GRADVAR_WITH_CUDA
  if (a.is_cuda()) return rowwise_dot_cuda(out, a, b);
#endif
  if (a.is_cpu()) return rowwise_dot_cpu(out, a, b);
  out.copy_((a * b).sum(1));
}

// A chunk's [count, O, I] gradients in a buffer kept across chunks (the first chunk is the largest).
at::Tensor gradient_buffer(at::Tensor& buf, int64_t count, int64_t O, int64_t I, const at::TensorOptions& options) {
  if (!buf.defined() || buf.size(0) < count) buf = at::empty({count, O, I}, options);
  return buf.narrow(0, 0, count);
}

// G_n^T X_n for a chunk, into gradient_buffer.
// x_chunk / g_chunk, when given, receive the factors' chunks (for callers that reuse them); the
// previous chunk's are let go before the next is formed, so that formed factors (unfolded conv
// patches) take one chunk's memory, not two (the benchmark CNN's job (b) products held two
// chunks of 16 samples' patches, 18 MB each, at its peak until the thirty-first session).
GradientChunks outer_products(const Factors& X, const Factors& G, at::Tensor* x_chunk, at::Tensor* g_chunk) {
  const int64_t groups = X.groups, O = G.features, I = X.features;
  auto buf = std::make_shared<at::Tensor>();
  return GradientChunks{
      X.samples, groups, O, I, X.options, groups * O * I + formed(X) + formed(G), X.samples,
      [X, G, groups, O, I, buf, x_chunk, g_chunk](int64_t start, int64_t n) {
        if (x_chunk != nullptr) x_chunk->reset();
        if (g_chunk != nullptr) g_chunk->reset();
        auto g = gradient_buffer(*buf, n * groups, O, I, X.options);
        const auto Xc = X.chunk(start, n), Gc = G.chunk(start, n);
        at::bmm_out(g, Gc.transpose(1, 2), Xc);
        if (x_chunk != nullptr) *x_chunk = Xc;
        if (g_chunk != nullptr) *g_chunk = Gc;
        return g;
      }};
}

// Per-sample gradients from conv patches a slab of output rows at a time (Factors::slab), where
// the patches outweigh the gradients: a chunk's g_n = sum over slabs of G_n,s^T X_n,s (bmm, then
// baddbmm into the same [n * groups, O, I]), so that one chunk holds the whole batch and one slab
// of its patches. Chunking samples alone, a 32 MiB chunk held 27 of the benchmark CNN's 64
// samples at its 32 -> 64 channel conv (1.2 MB of patches each, 74 KB of gradient): three
// batched GEMMs of a wave or less, 135 us against 98 us in slabs (cuBLAS on all 64 at once from
// patches unfolded beforehand: 89 us); GPU time of the whole call 0.36 -> 0.45-0.46 of that
// bmm's throughput on an H100 (benchmarks/RESULTS.md, fifteenth session). But short slabs lose:
// each baddbmm reads and writes the accumulated [n, O, I] (2 O I per sample) besides its K
// positions of factors (K (O + I)), and slabs of K = 64-224 ran 1.05-1.5x slower than chunks of
// samples (64 -> 64 channels at 16x16, float32 and float64; float64 32 -> 64: K = 160, level).
// Plan: the budget the GPU's 32 MiB, at most half of what the whole batch's gradients and
// patches take, at least 1 MiB (the half since the thirty-first session: the seed's MNIST CNN's
// moments on a GPU held all 1.8 MB of its patches in one slab); samples per chunk such that
// their gradients take at most half of it, then as many rows per slab as the rest holds. Used
// on CUDA, for the moments of one pair (not cross moments), where a sample's patches are at
// least twice its gradient, the chunk holds the whole batch and a slab's positions
// K >= 6 O I / (O + I) (factor traffic >= 3x the accumulator's).
// GRADVAR_EXT_CONV_SLABS=k (k >= 1) forces slabs of at most k rows on any device (the CPU tests
// run it), =0 turns them off, =auto applies CUDA's rule on any device (the CPU tests check it).
struct SlabPlan {
  int64_t samples = 0, rows = 0, budget = 0;  // samples 0: no slabs
};

constexpr int64_t kSlabsUnset = -1, kSlabsAuto = -2;

int64_t forced_slab_rows() {  // GRADVAR_EXT_CONV_SLABS: kSlabsUnset, kSlabsAuto, 0 off, k > 0 forced
  const char* flag = std::getenv("GRADVAR_EXT_CONV_SLABS");
  if (flag == nullptr || *flag == '\0') return kSlabsUnset;
  if (std::strcmp(flag, "auto") == 0) return kSlabsAuto;
  char* end = nullptr;
  const long long rows = std::strtoll(flag, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && rows >= 0, "gradvar: GRADVAR_EXT_CONV_SLABS must be 0 (off), auto or a number "
                    "of rows per slab, got '", flag, "'");
  return static_cast<int64_t>(rows);
}

SlabPlan slab_plan(const Factors& X, const Factors& G) {
  const int64_t forced_rows = forced_slab_rows();
  const bool forced = forced_rows > 0;
  if (!X.slab || X.slab_width <= 0 || G.materialises || forced_rows == 0) return {};
  if (!forced && forced_rows != kSlabsAuto && !X.options.device().is_cuda()) return {};
  const int64_t element_size = static_cast<int64_t>(c10::elementSize(X.options.dtype().toScalarType()));
  const int64_t gradient = X.groups * G.features * X.features * element_size;  // one sample's
  const int64_t row = X.groups * X.slab_width * X.features * element_size;     // one sample's row of patches
  const int64_t rows_total = X.positions / X.slab_width;
  if (!forced && rows_total * row < 2 * gradient) return {};
  const int64_t forced_budget = forced_chunk_bytes();
  const int64_t whole_batch = X.samples * (gradient + rows_total * row);  // all gradients and patches at once
  const int64_t budget = forced_budget > 0 ? forced_budget : half_the_batch(whole_batch, kGpuChunkBytes);
  const int64_t samples = std::clamp<int64_t>(budget / 2 / gradient, 1, X.samples);
  const int64_t rows = std::clamp<int64_t>((budget - samples * gradient) / (samples * row), 1, rows_total);
  if (forced) return {samples, std::min(forced_rows, rows_total), budget};
  const int64_t O = G.features, I = X.features, K = rows * X.slab_width;
  if (samples < X.samples || K * (O + I) < 6 * O * I) return {};
  return {samples, rows, budget};
}

GradientChunks outer_products_by_rows(const Factors& X, const Factors& G, const SlabPlan& plan) {
  const int64_t groups = X.groups, O = G.features, I = X.features, width = X.slab_width;
  const int64_t rows_total = X.positions / width, rows = plan.rows;
  auto buf = std::make_shared<at::Tensor>();
  return GradientChunks{X.samples, groups, O, I, X.options, groups * (O * I + rows * width * I), plan.samples,
                        [X, G, groups, O, I, width, rows_total, rows, buf](int64_t start, int64_t n) {
                          auto g = gradient_buffer(*buf, n * groups, O, I, X.options);
                          const auto Gt = G.chunk(start, n).transpose(1, 2);  // [n * groups, O, T]
                          for (int64_t first = 0; first < rows_total; first += rows) {
                            const int64_t count = std::min(rows, rows_total - first);
                            const auto Xs = X.slab(start, n, first, count);
                            const auto Gs = Gt.narrow(2, first * width, count * width);
                            if (first == 0) {
                              at::bmm_out(g, Gs, Xs);
                            } else {
                              g.baddbmm_(Gs, Xs);
                            }
                          }
                          return g;
                        },
                        plan.budget};
}

}  // namespace

#ifdef GRADVAR_WITH_CUDA
// GRADVAR_EXT_FUSED_CUDA (0, 1, tensor_cores or its older name tf32x3), or nullptr when it is
// unset or empty (the defaults below).
static const char* fused_cuda_flag() {
  return env_choice("GRADVAR_EXT_FUSED_CUDA", {"0", "1", "tensor_cores", "tf32x3"}, "0, 1 or tensor_cores");
}

bool use_fused_cuda(const Factors& X, const Factors& G, bool cross) {
  if (const char* flag = fused_cuda_flag()) return std::strcmp(flag, "0") != 0;
  // T = 1: the one-pass kernel (both GEMMs, no squared copies) while the product is small,
  // N * groups * I * O <= 2^26, where a step is bound by launches rather than by the GEMM.
  // Measured on an H100 (benchmarks/RESULTS.md, eighth session), per call: 0.10 vs 0.14 ms at
  // 128 x 784 -> 512 (51M) and 128 x 512 -> 512, job (b) 1.45x (MLP) and 1.65x (MNIST linear)
  // faster as a whole; level at 268M, 1.5-3x slower at 1G (its GPU time is 2-4x cuBLAS's).
  if (X.positions == 1) return X.samples * X.groups * X.features * G.features <= (int64_t{1} << 26);
  // T > 1: fused where writing a chunk's per-sample gradients [c, O, I] costs more than the
  // fused kernel's slower GEMM, i.e. few positions per sample. Measured on an H200
  // (benchmarks/RESULTS.md), GPU time: float32 fused 1.2-2.7x faster at T = 8-16, 1.3x slower
  // at T = 64 (faster in another run), 1.4-2.0x slower at T >= 128; float64 1.4-4x faster at
  // T = 8-16, 2.3x slower at T = 64 on CUDA cores. On an H100 (fifteenth session) the float64
  // walk on tensor cores (DMMA, the default on sm_80+) took 0.150 ms at 128 x 32 x 512 -> 512
  // against chunked cuBLAS's 0.316 (CUDA cores: 0.315, level), so float64's limit is 32 too.
  // On an H100 (twenty-first session, two runs, GPU time against bmm's) float64's DMMA walk
  // reached 0.55 of bmm's throughput at T = 64 (128 x 64 x 512 -> 512) against chunked
  // cuBLAS's 0.49, and 0.37 against 0.53-0.54 at T = 128: float64 on tensor cores goes to 64.
  // float32 was level at T = 64 (0.65-0.66 against 0.67): 32.
  const bool dmma = X.options.dtype() == at::kDouble && fused_cuda_on_tensor_cores(X.positions, cross) &&
                    cuda_has_tensor_cores(X.options.device().index());
  return X.positions <= (dmma ? 64 : 32);
}

// Tensor cores by default for T > 1 positions without a cross pair. Measured on an H200
// (benchmarks/RESULTS.md, fourteenth session), GPU time against the CUDA-core walk at T = 8-16:
// float32 0.74-0.76x, float64 0.51-0.68x. T = 1 and cross moments were not timed there: CUDA cores.
bool fused_cuda_on_tensor_cores(int64_t positions, bool cross) {
  const char* flag = fused_cuda_flag();
  if (flag == nullptr) return positions > 1 && !cross;
  return std::strcmp(flag, "tensor_cores") == 0 || std::strcmp(flag, "tf32x3") == 0;
}

// The fused squared norms and products ran and passed on an H100 but were slower there than
// cuBLAS (benchmarks/RESULTS.md), so they are opt-in only: GRADVAR_EXT_FUSED_CUDA=1 and
// GRADVAR_EXT_FUSED_BACKWARD_CUDA=1 (0 or unset: off).
bool use_fused_norms_cuda(const Factors&) {
  const char* flag = fused_cuda_flag();
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

bool use_fused_products_cuda(const Factors& P) {
  const char* flag = env_choice("GRADVAR_EXT_FUSED_BACKWARD_CUDA", {"0", "1"}, "0 or 1");
  return flag != nullptr && std::strcmp(flag, "1") == 0 && P.positions <= fused_products_max_positions() &&
         P.samples <= 65535;
}
#endif

// CPU layers of at most kSmallWork multiply-adds a call (samples x groups x positions x in x
// out; the seed's Linear(2, 1) on 3 samples: 6) take small_moments_cpu: one serial pass, one
// allocation a result, where the ATen path below runs ~10 ops (views, squares, two bmm, the
// variance's three in-place passes) whose dispatch costs more than their arithmetic:
// linear_variance on [3, 2] x [3, 1] 19.9 -> 6.7 us a call (tight loop, the two alternated), the
// seed's job (a) 8% faster; at 2^12 (several shapes) 9-26 us against the ATen path's 21-46; at
// 2^14 no faster than it (benchmarks/RESULTS.md, thirty-fourth session). Their weighted
// products (the backward's, apply_weighted) and squared norms likewise take
// small_weighted_products_cpu and small_squared_norms_cpu: 1.2-1.8x and 1.6-1.9x faster than
// the ATen ops at the shapes tried (thirty-fifth session).
constexpr int64_t kSmallWork = int64_t(1) << 12;
// ... and of at most kSmallRows samples x groups: the loops' cost a sample (~20 ns) outweighs
// ATen's dispatch beyond (paired, float32: linear_variance on [4096, 1] x [4096, 1] 92 us
// against 63, [256, 4] x [256, 4] 28 against 47; the products likewise; thirty-fifth session).
constexpr int64_t kSmallRows = 512;

static bool small_layer_fits(const Factors& X, const Factors& G) {
  if (!X.options.device().is_cpu()) return false;
  forced_chunk_bytes();  // a bad GRADVAR_EXT_CHUNK_MIB is named whatever the layer's size
  int64_t work = 1;
  for (const int64_t size : {X.samples, X.groups, X.positions, X.features, G.features}) {
    if (size > kSmallWork) return false;  // and no overflow below
    work *= std::max<int64_t>(size, 1);   // an empty side: the other's elements still bounded
    if (work > kSmallWork) return false;
  }
  return X.samples * X.groups <= kSmallRows;
}

// moment = sum_n (G_n^T X_n) * (Gb_n^T Xb_n), sum = sum_n G_n^T X_n.
// T == 1: batched GEMMs over all samples, (G*Gb)^T (X*Xb) and G^T X; extra memory O(N (I + O)).
// T > 1: per chunk of c samples, bmm -> [c*groups, O, I] (twice if the pairs differ), then a
//        fused multiply-accumulate; extra memory <= kChunkBytes + O(groups O I). On CUDA with
//        few positions, the fused kernel instead (use_fused_cuda): no [c, O, I] at all; for
//        T == 1 while small, both GEMMs in one pass over the factors. Conv patches with a
//        PatchSource (GRADVAR_EXT_CONV_ALGORITHM=implicit, CUDA, sm_80+): the tensor-core kernel
//        reads them from the image, no unfolding at all. Tiny CPU layers (small_layer_fits): one
//        serial loop, small_moments_cpu.
std::tuple<at::Tensor, at::Tensor> reduce_outer_products(const Factors& X, const Factors& G, const Factors* Xb,
                                                         const Factors* Gb, bool with_sum) {
  const bool same = Xb == nullptr;
  if (same && small_layer_fits(X, G)) {
    return small_moments_cpu(X.chunk(0, X.samples), G.chunk(0, G.samples), X.groups, with_sum, 0);
  }
#ifdef GRADVAR_WITH_CUDA
  // GRADVAR_EXT_CONV_ALGORITHM=implicit on sm_80+ (below: as unfold)
  if (same && X.patches != nullptr && X.options.device().is_cuda() &&
      cuda_has_tensor_cores(X.options.device().index())) {
    at::Tensor moment = at::empty({X.groups, G.features, X.features}, X.options);
    at::Tensor sum = with_sum ? at::empty({X.groups, G.features, X.features}, X.options) : at::Tensor();
    const bool ran = fused_patch_moments_cuda(moment, sum, *X.patches, G.chunk(0, G.samples), X.groups);
    TORCH_INTERNAL_ASSERT(ran, "gradvar: the implicit patches' kernel declined on sm_80+");
    return {moment, sum};
  }
  const bool fused = X.options.device().is_cuda() && use_fused_cuda(X, G, /*cross=*/!same);
#else
  const bool fused = false;
#endif
  if (X.positions == 1 && !fused) {
    const auto x = by_group(X), g = by_group(G);
    at::Tensor moment = same ? at::bmm(g.square().transpose(1, 2), x.square())
                             : at::bmm((g * by_group(*Gb)).transpose(1, 2), x * by_group(*Xb));
    at::Tensor sum = with_sum ? at::bmm(g.transpose(1, 2), x) : at::Tensor();
    return {moment, sum};
  }
#ifdef GRADVAR_WITH_CUDA
  if (fused) {  // no [c, O, I] scratch: chunk only unfolding
    const int64_t N = X.samples, groups = X.groups, I = X.features, O = G.features;
    at::Tensor moment = at::empty({groups, O, I}, X.options);  // the first chunk overwrites (N >= 1: checked)
    at::Tensor sum = with_sum ? at::empty({groups, O, I}, X.options) : at::Tensor();
    const int64_t chunk = chunk_samples(std::max<int64_t>(1, formed(X) + formed(G) + (same ? 0 : formed(*Xb) + formed(*Gb))), X);
    for (int64_t start = 0; start < N; start += chunk) {
      const int64_t n = std::min(chunk, N - start);
      const auto Xc = X.chunk(start, n), Gc = G.chunk(start, n);
      if (same) {
        fused_moments_cuda(moment, sum, Xc, Gc, nullptr, nullptr, groups, /*accumulate=*/start > 0);
      } else {
        const auto Xbc = Xb->chunk(start, n), Gbc = Gb->chunk(start, n);
        fused_moments_cuda(moment, sum, Xc, Gc, &Xbc, &Gbc, groups, /*accumulate=*/start > 0);
      }
    }
    return {moment, sum};
  }
#endif
  if (same) {
    const SlabPlan plan = slab_plan(X, G);  // none but for conv patches (Factors::slab)
    return reduce_gradients(plan.samples > 0 ? outer_products_by_rows(X, G, plan) : outer_products(X, G), nullptr,
                            with_sum);
  }
  const auto gb = outer_products(*Xb, *Gb);
  return reduce_gradients(outer_products(X, G), &gb, with_sum);
}

GradientChunks outer_products(const Factors& X, const Factors& G) { return outer_products(X, G, nullptr, nullptr); }

// moment = sum_n g_n * gb_n, sum = sum_n g_n, a chunk of samples at a time through the
// device's fused multiply-accumulate; extra memory <= kChunkBytes + O(groups rows cols).
std::tuple<at::Tensor, at::Tensor> reduce_gradients(const GradientChunks& g, const GradientChunks* gb, bool with_sum) {
  at::Tensor moment = at::zeros({g.groups, g.rows, g.cols}, g.options);
  at::Tensor sum = with_sum ? at::zeros({g.groups, g.rows, g.cols}, g.options) : at::Tensor();
  const int64_t chunk =
      chunk_samples(g.scratch_per_sample + (gb != nullptr ? gb->scratch_per_sample : 0), g.options, g.samples,
                    gb != nullptr ? std::min(g.max_chunk, gb->max_chunk) : g.max_chunk, g.budget_bytes);
  const int64_t per_sample = g.groups * g.rows * g.cols;
  for (int64_t start = 0; start < g.samples; start += chunk) {
    const int64_t n = std::min(chunk, g.samples - start);
    const auto gc = g.chunk(start, n);
    const auto gbc = gb != nullptr ? gb->chunk(start, n) : gc;
    accumulate_products(moment, sum, gc.view({n, per_sample}), gbc.view({n, per_sample}));
  }
  return {moment, sum};
}

// moment / N - (sum / N)^2, clamped at 0 (rounding can dip below it), in place: three passes.
static at::Tensor variance_from(at::Tensor moment, const at::Tensor& sum, int64_t N) {
  const double n = static_cast<double>(N);
  return moment.div_(n).addcmul_(sum, sum, -1.0 / (n * n)).clamp_min_(0);
}

at::Tensor variance_from_moments(const Factors& X, const Factors& G) {
  const int64_t N = X.samples;
  if (N == 1) return at::zeros({X.groups, G.features, X.features}, X.options);
  if (small_layer_fits(X, G)) {
    return std::get<0>(small_moments_cpu(X.chunk(0, N), G.chunk(0, N), X.groups, /*with_sum=*/false, N));
  }
  auto [moment, sum] = reduce_outer_products(X, G, nullptr, nullptr, /*with_sum=*/true);
  return variance_from(moment, sum, N);
}

at::Tensor variance_of_gradients(const GradientChunks& g) {
  if (g.samples == 1) return at::zeros({g.groups, g.rows, g.cols}, g.options);
  auto [moment, sum] = reduce_gradients(g, nullptr, /*with_sum=*/true);
  return variance_from(moment, sum, g.samples);
}

// l2[n] = sum over groups of ||G_n^T X_n||_F^2.
// T == 1: ||x_n||^2 ||g_n||^2 per group. T > 1: whichever is cheaper per sample, the ghost norm
// <X_n X_n^T, G_n G_n^T> (T^2 (I + O) flops, [T, T] scratch) or the direct ||G_n^T X_n||^2
// (T I O flops, [O, I] scratch; on CUDA on request the fused kernel: no [O, I] at all); chunked
// so scratch <= kChunkBytes. Tiny CPU layers (small_layer_fits): one serial loop, small_squared_norms_cpu.
at::Tensor outer_product_squared_norms(const Factors& X, const Factors& G) {
  const int64_t N = X.samples, groups = X.groups, T = X.positions, I = X.features, O = G.features;
  if (small_layer_fits(X, G)) {
    return small_squared_norms_cpu(X.chunk(0, N), G.chunk(0, N), groups);
  }
  if (T == 1) {
    return (by_group(X).square().sum(2) * by_group(G).square().sum(2)).sum(0);
  }
  at::Tensor out = at::empty({N}, X.options);
  const bool ghost = T * (I + O) < I * O;
#ifdef GRADVAR_WITH_CUDA
  if (!ghost && X.options.device().is_cuda() && use_fused_norms_cuda(X)) {  // no [c, O, I]: chunk partials, unfolding
    const auto partials = fused_squared_norms_partials(groups, I, O, X.options.dtype().toScalarType());
    const int64_t chunk = chunk_samples(partials + formed(X) + formed(G), X);
    for (int64_t start = 0; start < N; start += chunk) {
      const int64_t n = std::min(chunk, N - start);
      auto out_c = out.narrow(0, start, n);
      fused_squared_norms_cuda(out_c, X.chunk(start, n), G.chunk(start, n), groups);
    }
    return out;
  }
#endif
  const int64_t per_group = ghost ? T * T : O * I;
  const int64_t chunk = chunk_samples(groups * per_group * (ghost ? 2 : 1) + formed(X) + formed(G), X);
  at::Tensor buf = at::empty({chunk, groups * per_group}, X.options);
  at::Tensor buf_b = ghost ? at::empty({chunk, groups * per_group}, X.options) : buf;
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t n = std::min(chunk, N - start);
    const auto Xc = X.chunk(start, n), Gc = G.chunk(start, n);
    auto a = buf.narrow(0, 0, n), b = buf_b.narrow(0, 0, n);
    if (ghost) {
      auto kx = a.view({n * groups, T, T}), kg = b.view({n * groups, T, T});
      at::bmm_out(kx, Xc, Xc.transpose(1, 2));
      at::bmm_out(kg, Gc, Gc.transpose(1, 2));
    } else {
      auto g = a.view({n * groups, O, I});
      at::bmm_out(g, Gc.transpose(1, 2), Xc);
    }
    auto out_c = out.narrow(0, start, n);
    rowwise_dot(out_c, a, b);
  }
  return out;
}

void apply_weighted_gradients(const GradientChunks& g, const at::Tensor& W, const at::Tensor& center,
                              const std::vector<WeightedConsumer>& consumers) {
  int64_t per_sample = g.scratch_per_sample;
  for (const auto& consumer : consumers) per_sample += consumer.scratch_per_sample;
  const int64_t chunk = chunk_samples(per_sample, g.options, g.samples, g.max_chunk, g.budget_bytes);
  const at::Tensor minus_center = center.defined() ? center.neg() : at::Tensor();
  for (int64_t start = 0; start < g.samples; start += chunk) {
    const int64_t n = std::min(chunk, g.samples - start);
    const auto h = g.chunk(start, n);
    auto by_sample = h.view({n, g.groups, g.rows, g.cols});
    if (center.defined()) {
      at::addcmul_out(by_sample, minus_center, by_sample, W);  // h = W * g - center: one pass (a launch a chunk)
    } else {
      by_sample.mul_(W);
    }
    for (const auto& consumer : consumers) consumer.take(start, n, h);
  }
}

// out_n = Z_n h_n (transposed: Z_n h_n^T) -> sink as [n * groups, T, features], or positions last
// [n * groups, features, T]; `reuse`, when given, already holds Z's chunk. Written straight into
// the sink's view when it has one, else into a buffer of the chunk's own, let go once the sink
// has it (so that it can take the memory of the factors' chunk let go before it: apply_weighted).
static WeightedConsumer multiply_by_factors(const Factors& Z, const at::Tensor* reuse, const Sink& sink,
                                            bool transposed, int64_t features, bool positions_last) {
  const int64_t groups = Z.groups, T = Z.positions;
  return WeightedConsumer{
      (sink.into ? 0 : groups * T * features) + (reuse != nullptr ? 0 : formed(Z)),
      [Z, reuse, &sink, transposed, features, positions_last, groups, T](int64_t start, int64_t n,
                                                                         const at::Tensor& h) {
        const std::vector<int64_t> shape = positions_last ? std::vector<int64_t>{n * groups, features, T}
                                                          : std::vector<int64_t>{n * groups, T, features};
        at::Tensor out = sink.into ? sink.into(start, n) : at::empty(shape, Z.options);
        const auto Zc = reuse != nullptr ? *reuse : Z.chunk(start, n);
        const auto hz = transposed ? h.transpose(1, 2) : h;  // [.., Z's features, features]
        if (positions_last) {
          at::bmm_out(out, hz.transpose(1, 2), Zc.transpose(1, 2));  // (Z_n hz)^T = hz^T Z_n^T
        } else {
          at::bmm_out(out, Zc, hz);
        }
        if (!sink.into) sink.take(start, n, out);
      }};
}

// Per sample and group, out_n = Z_n (W * (Q_n^T P_n)): Z, Q [T, a]; P [T, b]; W [groups, a, b].
// Pass the same Factors object as Z and Q when they are the same tensor: it is formed once.
// T == 1: out = P * ((Z * Q) W), one batched GEMM (a row sum for a uniform W). T > 1: per chunk h = Q_c^T P_c
// ([c*groups, a, b]), h *= W, out_c = Z_c h ([c*groups, T, b]) to the sink; scratch <= kChunkBytes.
// With Z2 ([T, b]), also out2_n = Z2_n h_n^T ([T, a]) from the same h: both vector-Jacobian
// products of a statistic for one pass over Q^T P (T == 1: out2 = Q * ((Z2 * P) W^T)). A defined
// center [groups, a, b] is subtracted from every h_n (the variance's mean term). Tiny CPU layers
// (small_layer_fits): one serial loop, small_weighted_products_cpu.
static void apply_weighted(const Factors& Z, const Factors* Z2, const Factors& P, const Factors& Q,
                           const at::Tensor& W, const at::Tensor& center, const Sink& sink, const Sink* sink2,
                           bool positions_last) {
  const int64_t N = P.samples, groups = P.groups, T = P.positions, a = Q.features, b = P.features;
  if (small_layer_fits(P, Q)) {  // tiny CPU layers: one serial loop, no chunks (small_weighted_products_cpu)
    const auto p = P.chunk(0, N), q = Q.chunk(0, N);
    // Written in place into a Linear layer's result, else formed (positions last: transposed) and delivered.
    auto in_place = [&](const Sink& to) { return to.into && !positions_last; };
    auto target = [&](const Sink& to, int64_t features) {
      if (in_place(to)) return to.into(0, N);
      return positions_last ? at::empty({N * groups, features, T}, P.options).transpose(1, 2)
                            : at::empty({N * groups, T, features}, P.options);
    };
    auto deliver = [&](const Sink& to, const at::Tensor& values) {
      if (!in_place(to)) to.deliver(0, N, positions_last ? values.transpose(1, 2) : values);
    };
    const at::Tensor out = target(sink, b), out2 = Z2 != nullptr ? target(*sink2, a) : at::Tensor();
    small_weighted_products_cpu(out, out2, &Z == &Q ? q : Z.chunk(0, N),
                                Z2 == nullptr ? at::Tensor() : (Z2 == &P ? p : Z2->chunk(0, N)), p, q, W, center,
                                groups);
    deliver(sink, out);
    if (Z2 != nullptr) deliver(*sink2, out2);
    return;
  }
  if (T == 1) {
    // out = P * ((Z * Q) W) - Z center, [groups, N, b]: a GEMM, then the center's GEMM (alpha = -1)
    // and the product with P accumulated into the result (4 kernels). Written straight into the
    // sink's rows for one group (a Linear layer), else formed and delivered.
    auto product = [&](const at::Tensor& z, const at::Tensor& q, const at::Tensor& p, const at::Tensor& w,
                       const at::Tensor& c, const Sink& to, int64_t features) {
      const bool direct = groups == 1 && to.into && !positions_last;
      at::Tensor out = direct ? to.into(0, N).view({1, N, features}) : at::empty({groups, N, features}, p.options());
      // A weight uniform within each group (stride 0: an expanded scalar, what the gradient of
      // variance.sum() is): (Z * Q) W is that value times the row sums of Z * Q, [groups, N, 1],
      // no GEMM (the MLP's job (b) on 2 CPU cores: 25 GEMMs, not 30; 13.9 -> 12.1 ms).
      const bool uniform = w.numel() > 0 && w.stride(1) == 0 && w.stride(2) == 0;
      const auto scaled = uniform ? (z * q).sum(2, /*keepdim=*/true).mul_(w.narrow(1, 0, 1).narrow(2, 0, 1))
                                  : at::bmm(z * q, w);
      if (c.defined()) {
        out.baddbmm_(z, c, /*beta=*/0, /*alpha=*/-1);  // beta = 0: out's old contents are ignored
        out.addcmul_(p, scaled);
      } else {
        at::mul_out(out, p, scaled);
      }
      if (!direct) {
        const auto rows = out.transpose(0, 1).reshape({N * groups, 1, features});
        to.deliver(0, N, positions_last ? rows.view({N * groups, features, 1}) : rows);
      }
    };
    const auto z = by_group(Z), q = by_group(Q), p = by_group(P);
    product(z, q, p, W, center, sink, b);
    if (Z2 != nullptr) {
      product(by_group(*Z2), p, q, W.transpose(1, 2), center.defined() ? center.transpose(1, 2) : center, *sink2, a);
    }
    return;
  }
#ifdef GRADVAR_WITH_CUDA
  // One group written in place (a Linear layer), on request: the fused kernel, h_n never in global memory.
  // (The flag first: a misspelt value raises whatever the shapes.)
  if (P.options.device().is_cuda() && use_fused_products_cuda(P) && groups == 1 && !positions_last && sink.into &&
      (Z2 == nullptr || sink2->into)) {
    const auto p = P.chunk(0, N), q = Q.chunk(0, N);
    const auto w = W.select(0, 0), c = center.defined() ? center.select(0, 0) : at::Tensor();
    auto out = sink.into(0, N);
    fused_weighted_product_cuda(out, &Z == &Q ? q : Z.chunk(0, N), q, p, w, c);
    if (Z2 != nullptr) {
      auto out2 = sink2->into(0, N);
      fused_weighted_product_cuda(out2, Z2 == &P ? p : Z2->chunk(0, N), p, q, w.t(), c.defined() ? c.t() : c);
    }
    return;
  }
#endif
  // T > 1: h_n = Q_n^T P_n by bmm; the chunks of Q and P are kept for Z and Z2 when they are the
  // same factors (formed once); then one bmm per product. The products that read a kept chunk go
  // first, then the chunk is let go, then the others, whose buffers (col2im's columns) can take
  // its memory: a conv's unfolded patches and the columns of its product towards the input are
  // the same size. Until the thirty-first session both were alive at once, and the previous
  // chunk's patches too (outer_products): 3 x 18 MB at the benchmark CNN's job (b) peak under the
  // GPU's rule (chunks of 16 samples), now one.
  at::Tensor p_chunk, q_chunk;
  const bool z_reuses = &Z == &Q, z2_reuses = Z2 != nullptr && Z2 == &P;
  const auto h = outer_products(P, Q, z2_reuses ? &p_chunk : nullptr, z_reuses ? &q_chunk : nullptr);
  std::vector<WeightedConsumer> reading, others;
  (z_reuses ? reading : others)
      .push_back(multiply_by_factors(Z, z_reuses ? &q_chunk : nullptr, sink, /*transposed=*/false, b, positions_last));
  if (Z2 != nullptr) {
    (z2_reuses ? reading : others)
        .push_back(
            multiply_by_factors(*Z2, z2_reuses ? &p_chunk : nullptr, *sink2, /*transposed=*/true, a, positions_last));
  }
  const WeightedConsumer let_go{0, [&p_chunk, &q_chunk](int64_t, int64_t, const at::Tensor&) {
                                  p_chunk.reset();
                                  q_chunk.reset();
                                }};
  reading.push_back(let_go);
  reading.insert(reading.end(), others.begin(), others.end());
  apply_weighted_gradients(h, W, center, reading);
}

void weighted_outer_product_apply(const Factors& Z, const Factors& P, const Factors& Q, const at::Tensor& W,
                                  const at::Tensor& center, const Sink& sink, bool positions_last) {
  apply_weighted(Z, nullptr, P, Q, W, center, sink, nullptr, positions_last);
}

void weighted_outer_product_apply_both(const Factors& Z, const Factors& Z2, const Factors& P, const Factors& Q,
                                       const at::Tensor& W, const at::Tensor& center, const Sink& sink,
                                       const Sink& sink2, bool positions_last) {
  apply_weighted(Z, &Z2, P, Q, W, center, sink, &sink2, positions_last);
}

}  // namespace gradvar
