// CPU kernels for the core's elementwise reductions, parallel over columns / rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

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

}  // namespace gradvar
