// CPU kernels for the core's elementwise reductions, parallel over columns / rows.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <vector>

#include "../outer_product_stats.h"

namespace gradvar {

// moment[j] += sum_k g[k, j] * gb[k, j], sum[j] += sum_k g[k, j].  g, gb: [k, F] contiguous.
// Threads split the F columns; each walks the k rows so the inner loop is contiguous.
void accumulate_products_cpu(at::Tensor& moment, at::Tensor& sum, const at::Tensor& g, const at::Tensor& gb) {
  const int64_t rows = g.size(0), F = g.size(1);
  const bool with_sum = sum.defined();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "accumulate_products_cpu", [&] {
    const scalar_t* g_ptr = g.const_data_ptr<scalar_t>();
    const scalar_t* gb_ptr = gb.const_data_ptr<scalar_t>();
    scalar_t* m_ptr = moment.mutable_data_ptr<scalar_t>();
    scalar_t* s_ptr = with_sum ? sum.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, F, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t k = 0; k < rows; ++k) {
        const scalar_t* __restrict__ gk = g_ptr + k * F;
        const scalar_t* __restrict__ gbk = gb_ptr + k * F;
        for (int64_t j = begin; j < end; ++j) m_ptr[j] += gk[j] * gbk[j];
        if (with_sum) {
          for (int64_t j = begin; j < end; ++j) s_ptr[j] += gk[j];
        }
      }
    });
  });
}

// out[k] = sum_j a[k, j] * b[k, j].  a, b: [k, F] contiguous; threads split the rows.
void rowwise_dot_cpu(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t rows = a.size(0), F = a.size(1);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "rowwise_dot_cpu", [&] {
    using Vec = at::vec::Vectorized<scalar_t>;
    const scalar_t* a_ptr = a.const_data_ptr<scalar_t>();
    const scalar_t* b_ptr = b.const_data_ptr<scalar_t>();
    scalar_t* o_ptr = out.mutable_data_ptr<scalar_t>();
    const int64_t o_stride = out.stride(0);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        o_ptr[k * o_stride] = at::vec::map2_reduce_all<scalar_t>(
            [](Vec x, Vec y) { return x * y; }, [](Vec x, Vec y) { return x + y; },
            a_ptr + k * F, b_ptr + k * F, F);
      }
    });
  });
}

// Row o of one per-sample gradient, g_s[o, :] = sum_t G_s[t, o] X_s[t, :], into row [I]: X_s [T, I],
// G_s [T, O] contiguous; the inner loop runs along X's contiguous rows.
template <typename scalar_t, typename acc_t>
static void gradient_row(std::vector<acc_t>& row, const scalar_t* xs, const scalar_t* gs, int64_t T, int64_t I,
                         int64_t O, int64_t o) {
  std::fill(row.begin(), row.end(), acc_t(0));
  for (int64_t t = 0; t < T; ++t) {
    const acc_t coefficient = gs[t * O + o];
    const scalar_t* __restrict__ xt = xs + t * I;
    for (int64_t i = 0; i < I; ++i) row[i] += coefficient * acc_t(xt[i]);
  }
}

// The moments of layers too small for ATen's per-op cost to pay (small_layer_fits): per row s
// of X [S, T, I] and G [S, T, O] (S = samples * groups, group s % groups), each row of
// g_s[o, :] = sum_t G[s, t, o] X[s, t, :] formed in a buffer of I and reduced at once:
// moment = sum g_s**2, sum = sum g_s over each group's rows, accumulated in double for float
// input in two [groups, O, I] buffers; serial (the work is at most a few thousand multiply-adds).
// variance_samples > 0: the first result is moment / N - (sum / N)**2 clamped at 0 instead
// (variance_from's formula in outer_product_stats.cpp, here in the loop: not its three ATen passes).
std::tuple<at::Tensor, at::Tensor> small_moments_cpu(const at::Tensor& X_any, const at::Tensor& G_any,
                                                     int64_t groups, bool with_sum, int64_t variance_samples) {
  const auto X = X_any.contiguous(), G = G_any.contiguous();
  const int64_t rows = X.size(0), T = X.size(1), I = X.size(2), O = G.size(2);
  at::Tensor first = at::empty({groups, O, I}, X.options());
  at::Tensor sum = with_sum ? at::empty({groups, O, I}, X.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "small_moments_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* x = X.const_data_ptr<scalar_t>();
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    std::vector<acc_t> moment_acc(groups * O * I, acc_t(0)), sum_acc(groups * O * I, acc_t(0)), row(I);
    for (int64_t s = 0; s < rows; ++s) {
      const scalar_t* xs = x + s * T * I;
      const scalar_t* gs = g + s * T * O;
      for (int64_t o = 0; o < O; ++o) {
        gradient_row(row, xs, gs, T, I, O, o);
        acc_t* __restrict__ m = moment_acc.data() + ((s % groups) * O + o) * I;
        acc_t* __restrict__ total = sum_acc.data() + ((s % groups) * O + o) * I;
        for (int64_t i = 0; i < I; ++i) {
          m[i] += row[i] * row[i];
          total[i] += row[i];
        }
      }
    }
    scalar_t* first_ptr = first.mutable_data_ptr<scalar_t>();
    scalar_t* sum_ptr = with_sum ? sum.mutable_data_ptr<scalar_t>() : nullptr;
    const acc_t n = acc_t(variance_samples);
    for (size_t j = 0; j < moment_acc.size(); ++j) {
      if (variance_samples > 0) {
        const acc_t mean = sum_acc[j] / n;
        first_ptr[j] = scalar_t(std::max(moment_acc[j] / n - mean * mean, acc_t(0)));
      } else {
        first_ptr[j] = scalar_t(moment_acc[j]);
      }
      if (with_sum) sum_ptr[j] = scalar_t(sum_acc[j]);
    }
  });
  return {first, sum};
}

// sum_k x[k * dx] * y[k * dy] in four partial sums: no loop-carried chain through one accumulator
// (a tiny layer's products are latency-bound: with one sum, [32, 128] x [32, 1] took twice the ATen path).
template <typename acc_t, typename X, typename Y>
static acc_t dot_of(const X* __restrict__ x, int64_t dx, const Y* __restrict__ y, int64_t dy, int64_t n) {
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += acc_t(x[k * dx]) * acc_t(y[k * dy]);
    s1 += acc_t(x[(k + 1) * dx]) * acc_t(y[(k + 1) * dy]);
    s2 += acc_t(x[(k + 2) * dx]) * acc_t(y[(k + 2) * dy]);
    s3 += acc_t(x[(k + 3) * dx]) * acc_t(y[(k + 3) * dy]);
  }
  for (; k < n; ++k) s0 += acc_t(x[k * dx]) * acc_t(y[k * dy]);
  return (s0 + s1) + (s2 + s3);
}

// The squared norms of tiny CPU layers' per-sample gradients (small_layer_fits), one serial pass:
// l2[n] = sum over groups of ||G_s^T X_s||^2 for rows s = n * groups + group of X [S, T, I] and
// G [S, T, O] (any strides); T == 1: ||x_s||^2 ||g_s||^2, else each row of g_s formed in a buffer
// of I, as small_moments_cpu. Double accumulators for float input. The ATen path runs 5-8 ops.
at::Tensor small_squared_norms_cpu(const at::Tensor& X_any, const at::Tensor& G_any, int64_t groups) {
  const auto X = X_any.contiguous(), G = G_any.contiguous();
  const int64_t rows = X.size(0), T = X.size(1), I = X.size(2), O = G.size(2);
  at::Tensor out = at::empty({rows / groups}, X.options());
  AT_DISPATCH_FLOATING_TYPES(X.scalar_type(), "small_squared_norms_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* x = X.const_data_ptr<scalar_t>();
    const scalar_t* g = G.const_data_ptr<scalar_t>();
    scalar_t* l2 = out.mutable_data_ptr<scalar_t>();
    std::vector<acc_t> row(I);
    for (int64_t n = 0; n < rows / groups; ++n) {
      acc_t total = 0;
      for (int64_t s = n * groups; s < (n + 1) * groups; ++s) {
        const scalar_t* xs = x + s * T * I;
        const scalar_t* gs = g + s * T * O;
        if (T == 1) {
          total += dot_of<acc_t>(xs, 1, xs, 1, I) * dot_of<acc_t>(gs, 1, gs, 1, O);
          continue;
        }
        for (int64_t o = 0; o < O; ++o) {
          gradient_row(row, xs, gs, T, I, O, o);
          total += dot_of<acc_t>(row.data(), 1, row.data(), 1, I);
        }
      }
      l2[n] = scalar_t(total);
    }
  });
  return out;
}

// The weighted products of tiny CPU layers (small_layer_fits), one serial pass: per row s of
// Q, Z [S, T, a], P, Z2 [S, T, b] (S = samples * groups, group s % groups), with
// h_s = W[g] * (Q_s^T P_s) - C[g]: out[s] = Z_s h_s [T, b] and out2[s] = Z2_s h_s^T [T, a].
// T == 1 (rank one, no h_s): out_j = p_j sum_i (z_i q_i) W_ij - sum_i z_i C_ij, likewise out2;
// T > 1: h_s and its transpose in [a, b] buffers, each result element a contiguous dot product.
// Double accumulators for float input. out, out2 any strides (out2, Z2, C may be undefined);
// W, C [groups, a, b] any strides (an expanded W reads in place). The ATen path (apply_weighted)
// runs 4-8 ops and chunks for this.
void small_weighted_products_cpu(const at::Tensor& out, const at::Tensor& out2, const at::Tensor& Z_any,
                                 const at::Tensor& Z2_any, const at::Tensor& P_any, const at::Tensor& Q_any,
                                 const at::Tensor& W, const at::Tensor& C, int64_t groups) {
  const auto Z = Z_any.contiguous(), P = P_any.contiguous(), Q = Q_any.contiguous();
  const bool both = out2.defined(), centered = C.defined();
  const auto Z2 = both ? Z2_any.contiguous() : at::Tensor();
  const int64_t rows = P.size(0), T = P.size(1), b = P.size(2), a = Q.size(2);
  AT_DISPATCH_FLOATING_TYPES(P.scalar_type(), "small_weighted_products_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;
    const scalar_t* z = Z.const_data_ptr<scalar_t>();
    const scalar_t* p = P.const_data_ptr<scalar_t>();
    const scalar_t* q = Q.const_data_ptr<scalar_t>();
    const scalar_t* z2 = both ? Z2.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* w = W.const_data_ptr<scalar_t>();
    const scalar_t* c = centered ? C.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    scalar_t* o2 = both ? out2.mutable_data_ptr<scalar_t>() : nullptr;
    const int64_t w0 = W.stride(0), w1 = W.stride(1), w2 = W.stride(2);  // (strides hoisted: a call each)
    const int64_t c0 = centered ? C.stride(0) : 0, c1 = centered ? C.stride(1) : 0, c2 = centered ? C.stride(2) : 0;
    const int64_t o0 = out.stride(0), o1 = out.stride(1), o2s = out.stride(2);
    const int64_t p0 = both ? out2.stride(0) : 0, p1 = both ? out2.stride(1) : 0, p2 = both ? out2.stride(2) : 0;
    if (T == 1) {
      // sum_k x[k] M[k, :] (M's rows k at step dk, its columns at dm) into u [m], when the
      // contraction is the short side (inner loops along the long one), else a dot product each.
      std::vector<acc_t> zq(a), z2p(b), u(std::max(a, b)), v(std::max(a, b));
      auto contract = [&](const acc_t* x, const scalar_t* x_plain, const scalar_t* M, int64_t dk, int64_t dm,
                          const scalar_t* N_, int64_t nk, int64_t nm, int64_t k_len, int64_t m_len) {
        if (k_len >= m_len) {
          for (int64_t m = 0; m < m_len; ++m) {
            u[m] = dot_of<acc_t>(x, 1, M + m * dm, dk, k_len);
            v[m] = N_ != nullptr ? dot_of<acc_t>(x_plain, 1, N_ + m * nm, nk, k_len) : acc_t(0);
          }
          return;
        }
        std::fill(u.begin(), u.begin() + m_len, acc_t(0));
        std::fill(v.begin(), v.begin() + m_len, acc_t(0));
        for (int64_t k = 0; k < k_len; ++k) {
          const acc_t xk = x[k], plain = acc_t(x_plain[k]);
          const scalar_t* Mk = M + k * dk;
          for (int64_t m = 0; m < m_len; ++m) u[m] += xk * acc_t(Mk[m * dm]);
          if (N_ == nullptr) continue;
          const scalar_t* Nk = N_ + k * nk;
          for (int64_t m = 0; m < m_len; ++m) v[m] += plain * acc_t(Nk[m * nm]);
        }
      };
      for (int64_t s = 0; s < rows; ++s) {
        const scalar_t *zs = z + s * a, *qs = q + s * a, *ps = p + s * b;
        const scalar_t *ws = w + (s % groups) * w0, *cs = centered ? c + (s % groups) * c0 : nullptr;
        for (int64_t i = 0; i < a; ++i) zq[i] = acc_t(zs[i]) * acc_t(qs[i]);
        contract(zq.data(), zs, ws, w1, w2, cs, c1, c2, a, b);  // u = (z * q) W, v = z C
        for (int64_t j = 0; j < b; ++j) o[s * o0 + j * o2s] = scalar_t(acc_t(ps[j]) * u[j] - v[j]);
        if (!both) continue;
        const scalar_t* z2s = z2 + s * b;
        for (int64_t j = 0; j < b; ++j) z2p[j] = acc_t(z2s[j]) * acc_t(ps[j]);
        contract(z2p.data(), z2s, ws, w2, w1, cs, c2, c1, b, a);  // u = W (z2 * p), v = C z2
        for (int64_t i = 0; i < a; ++i) o2[s * p0 + i * p2] = scalar_t(acc_t(qs[i]) * u[i] - v[i]);
      }
      return;
    }
    std::vector<acc_t> h(a * b), h_t(b * a);  // h_s [a, b] and h_s^T [b, a]
    for (int64_t s = 0; s < rows; ++s) {
      const int64_t group = s % groups;
      std::fill(h.begin(), h.end(), acc_t(0));
      for (int64_t t = 0; t < T; ++t) {  // Q_s^T P_s, a row of P at a time (contiguous inner loop)
        const scalar_t* __restrict__ pt = p + (s * T + t) * b;
        for (int64_t i = 0; i < a; ++i) {
          const acc_t coefficient = q[(s * T + t) * a + i];
          acc_t* __restrict__ hi = h.data() + i * b;
          for (int64_t j = 0; j < b; ++j) hi[j] += coefficient * acc_t(pt[j]);
        }
      }
      for (int64_t i = 0; i < a; ++i) {
        for (int64_t j = 0; j < b; ++j) {
          const acc_t value = acc_t(w[group * w0 + i * w1 + j * w2]) * h[i * b + j] -
                              (centered ? acc_t(c[group * c0 + i * c1 + j * c2]) : acc_t(0));
          h[i * b + j] = value;
          h_t[j * a + i] = value;
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const scalar_t* zt = z + (s * T + t) * a;
        for (int64_t j = 0; j < b; ++j) {
          o[s * o0 + t * o1 + j * o2s] = scalar_t(dot_of<acc_t>(zt, 1, h_t.data() + j * a, 1, a));
        }
        if (!both) continue;
        const scalar_t* z2t = z2 + (s * T + t) * b;
        for (int64_t i = 0; i < a; ++i) {
          o2[s * p0 + t * p1 + i * p2] = scalar_t(dot_of<acc_t>(z2t, 1, h.data() + i * b, 1, b));
        }
      }
    }
  });
}

}  // namespace gradvar
