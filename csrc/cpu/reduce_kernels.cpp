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

// The moments of layers too small for ATen's per-op cost to pay (small_moments_fit): per row s
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
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int64_t t = 0; t < T; ++t) {
          const acc_t coefficient = gs[t * O + o];
          const scalar_t* __restrict__ xt = xs + t * I;
          for (int64_t i = 0; i < I; ++i) row[i] += coefficient * acc_t(xt[i]);
        }
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

}  // namespace gradvar
