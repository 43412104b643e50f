// The one core: statistics of per-sample outer products g_n = G_n^T X_n, reduced over
// samples, without holding all N of them. Device-agnostic ATen (cuBLAS / CPU BLAS via
// at::mm and at::bmm); the elementwise reductions go to the cpu/ and cuda/ kernels.
#include "outer_product_stats.h"

#include <ATen/ATen.h>

#include <algorithm>

namespace gradvar {
namespace {

// Scratch budget for the per-chunk tensors ([chunk, out, in] gradients, [chunk, T, T] Gram
// matrices). Extra memory of every op is bounded by this, whatever N is.
constexpr int64_t kChunkBytes = int64_t(32) << 20;

int64_t samples_per_chunk(int64_t elems_per_sample, int64_t copies, const at::Tensor& like) {
  const int64_t bytes = std::max<int64_t>(1, elems_per_sample * copies * like.element_size());
  return std::max<int64_t>(1, kChunkBytes / bytes);
}

void accumulate_products(at::Tensor& moment, at::Tensor& sum, const at::Tensor& g, const at::Tensor& gb) {
#ifdef GRADVAR_WITH_CUDA
  if (g.is_cuda()) return accumulate_products_cuda(moment, sum, g, gb);
#endif
  if (g.is_cpu()) return accumulate_products_cpu(moment, sum, g, gb);
  moment.add_((g * gb).sum(0));
  if (sum.defined()) sum.add_(g.sum(0));
}

void rowwise_dot(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
#ifdef GRADVAR_WITH_CUDA
  if (a.is_cuda()) return rowwise_dot_cuda(out, a, b);
#endif
  if (a.is_cpu()) return rowwise_dot_cpu(out, a, b);
  out.copy_((a * b).sum(1));
}

}  // namespace

// moment = sum_n (G_n^T X_n) * (Gb_n^T Xb_n), sum = sum_n G_n^T X_n.   X, Xb [N,T,I]; G, Gb [N,T,O].
// T == 1: two GEMMs over the batch, (G*Gb)^T (X*Xb) and G^T X; extra memory O(N (I + O)).
// T > 1: per chunk of c samples, bmm -> [c, O, I] (twice if the pairs differ), then a fused
//        multiply-accumulate; extra memory <= kChunkBytes + O(O I).
std::tuple<at::Tensor, at::Tensor> reduce_outer_products(const at::Tensor& X, const at::Tensor& G,
                                                         const at::Tensor& Xb, const at::Tensor& Gb,
                                                         bool same_pair, bool with_sum) {
  const int64_t N = X.size(0), T = X.size(1), I = X.size(2), O = G.size(2);
  if (T == 1) {
    const auto x = X.view({N, I}), g = G.view({N, O});
    at::Tensor moment = same_pair ? at::mm(g.square().t(), x.square())
                                  : at::mm((g * Gb.view({N, O})).t(), x * Xb.view({N, I}));
    at::Tensor sum = with_sum ? at::mm(g.t(), x) : at::Tensor();
    return {moment, sum};
  }
  at::Tensor moment = at::zeros({O, I}, X.options());
  at::Tensor sum = with_sum ? at::zeros({O, I}, X.options()) : at::Tensor();
  const int64_t chunk = std::min(N, samples_per_chunk(O * I, same_pair ? 1 : 2, X));
  at::Tensor buf = at::empty({chunk, O, I}, X.options());
  at::Tensor buf_b = same_pair ? buf : at::empty({chunk, O, I}, X.options());
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t n = std::min(chunk, N - start);
    auto g = buf.narrow(0, 0, n);
    at::bmm_out(g, G.narrow(0, start, n).transpose(1, 2), X.narrow(0, start, n));
    auto gb = g;
    if (!same_pair) {
      gb = buf_b.narrow(0, 0, n);
      at::bmm_out(gb, Gb.narrow(0, start, n).transpose(1, 2), Xb.narrow(0, start, n));
    }
    accumulate_products(moment, sum, g.view({n, O * I}), gb.view({n, O * I}));
  }
  return {moment, sum};
}

// l2[n] = ||G_n^T X_n||_F^2.   X [N,T,I], G [N,T,O] -> [N].
// T == 1: ||x_n||^2 ||g_n||^2. T > 1: whichever is cheaper per sample, the ghost norm
// <X_n X_n^T, G_n G_n^T> (T^2 (I + O) flops, [c, T, T] scratch) or the direct ||G_n^T X_n||^2
// (T I O flops, [c, O, I] scratch); chunked so scratch <= kChunkBytes.
at::Tensor outer_product_squared_norms(const at::Tensor& X, const at::Tensor& G) {
  const int64_t N = X.size(0), T = X.size(1), I = X.size(2), O = G.size(2);
  if (T == 1) return X.view({N, I}).square().sum(1) * G.view({N, O}).square().sum(1);
  at::Tensor out = at::empty({N}, X.options());
  const bool ghost = T * (I + O) < I * O;
  const int64_t per_sample = ghost ? T * T : O * I;
  const int64_t chunk = std::min(N, samples_per_chunk(per_sample, ghost ? 2 : 1, X));
  at::Tensor buf = at::empty({chunk, per_sample}, X.options());
  at::Tensor buf_b = ghost ? at::empty({chunk, per_sample}, X.options()) : buf;
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t n = std::min(chunk, N - start);
    auto Xc = X.narrow(0, start, n), Gc = G.narrow(0, start, n);
    auto a = buf.narrow(0, 0, n), b = buf_b.narrow(0, 0, n);
    if (ghost) {
      auto kx = a.view({n, T, T}), kg = b.view({n, T, T});
      at::bmm_out(kx, Xc, Xc.transpose(1, 2));
      at::bmm_out(kg, Gc, Gc.transpose(1, 2));
    } else {
      auto g = a.view({n, O, I});
      at::bmm_out(g, Gc.transpose(1, 2), Xc);
    }
    auto out_c = out.narrow(0, start, n);
    rowwise_dot(out_c, a, b);
  }
  return out;
}

// out_n = Z_n (W * (Q_n^T P_n)).   Z, Q [N,T,a]; P [N,T,b]; W [a,b] -> [N,T,b].
// T == 1: out = P * ((Z * Q) W), one GEMM. T > 1: per chunk h = Q_c^T P_c ([c, a, b]),
// h *= W, out_c = Z_c h; extra memory <= kChunkBytes.
at::Tensor weighted_outer_product_apply(const at::Tensor& Z, const at::Tensor& P, const at::Tensor& Q,
                                        const at::Tensor& W) {
  const int64_t N = P.size(0), T = P.size(1), a = Q.size(2), b = P.size(2);
  if (T == 1) return (P.view({N, b}) * at::mm(Z.view({N, a}) * Q.view({N, a}), W)).view({N, 1, b});
  at::Tensor out = at::empty({N, T, b}, P.options());
  const int64_t chunk = std::min(N, samples_per_chunk(a * b, 1, P));
  at::Tensor buf = at::empty({chunk, a, b}, P.options());
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t n = std::min(chunk, N - start);
    auto h = buf.narrow(0, 0, n);
    at::bmm_out(h, Q.narrow(0, start, n).transpose(1, 2), P.narrow(0, start, n));
    h.mul_(W);
    auto out_c = out.narrow(0, start, n);
    at::bmm_out(out_c, Z.narrow(0, start, n), h);
  }
  return out;
}

}  // namespace gradvar
