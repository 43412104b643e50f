// Linear front door: a Linear layer's per-sample weight gradient is the outer product
// g_n = sum_t grad_output[n, t]^T input[n, t] over its middle dims t, so every op here
// checks its arguments, views them as [N, T, features] and calls the core.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "checks.h"
#include "outer_product_stats.h"

namespace gradvar {
namespace {

// [N, *, F] -> [N, T, F], T = prod(*) (1 when there are no middle dims). Contiguous.
at::Tensor as_samples(const at::Tensor& t) {
  int64_t positions = 1;
  for (int64_t d = 1; d + 1 < t.dim(); ++d) positions *= t.size(d);
  return t.reshape({t.size(0), positions, t.size(-1)}).contiguous();
}

}  // namespace

at::Tensor linear_second_moment(const at::Tensor& input, const at::Tensor& grad_output) {
  check_samples_pair("linear_second_moment", input, "input", grad_output, "grad_output");
  c10::OptionalDeviceGuard guard(input.device());
  const auto X = as_samples(input), G = as_samples(grad_output);
  return std::get<0>(reduce_outer_products(X, G, X, G, /*same_pair=*/true, /*with_sum=*/false));
}

// variance = moment / N - (sum / N)^2, clamped at 0 (rounding can dip below); N = 1 gives 0.
at::Tensor linear_variance(const at::Tensor& input, const at::Tensor& grad_output) {
  check_samples_pair("linear_variance", input, "input", grad_output, "grad_output");
  c10::OptionalDeviceGuard guard(input.device());
  const auto X = as_samples(input), G = as_samples(grad_output);
  const int64_t N = X.size(0);
  if (N == 1) return at::zeros({G.size(2), X.size(2)}, X.options());
  auto [moment, sum] = reduce_outer_products(X, G, X, G, /*same_pair=*/true, /*with_sum=*/true);
  auto mean = sum.div_(N);
  return moment.div_(N).sub_(mean.square_()).clamp_min_(0);
}

at::Tensor linear_batch_l2(const at::Tensor& input, const at::Tensor& grad_output) {
  check_samples_pair("linear_batch_l2", input, "input", grad_output, "grad_output");
  c10::OptionalDeviceGuard guard(input.device());
  return outer_product_squared_norms(as_samples(input), as_samples(grad_output));
}

at::Tensor linear_cross_moment(const at::Tensor& input, const at::Tensor& grad_output,
                               const at::Tensor& other_input, const at::Tensor& other_grad_output) {
  const char* op = "linear_cross_moment";
  check_samples_pair(op, input, "input", grad_output, "grad_output");
  check_same_shape(op, other_input, "other_input", input, "input");
  check_same_shape(op, other_grad_output, "other_grad_output", grad_output, "grad_output");
  check_float_like(op, other_input, "other_input", input, "input");
  check_float_like(op, other_grad_output, "other_grad_output", input, "input");
  c10::OptionalDeviceGuard guard(input.device());
  return std::get<0>(reduce_outer_products(as_samples(input), as_samples(grad_output),
                                           as_samples(other_input), as_samples(other_grad_output),
                                           /*same_pair=*/false, /*with_sum=*/false));
}

at::Tensor weighted_gradient_product(const at::Tensor& left, const at::Tensor& input,
                                     const at::Tensor& grad_output, const at::Tensor& weight) {
  const char* op = "weighted_gradient_product";
  check_samples_pair(op, input, "input", grad_output, "grad_output");
  check_same_shape(op, left, "left", grad_output, "grad_output");
  check_float_like(op, left, "left", input, "input");
  GRADVAR_CHECK(weight.dim() == 2 && weight.size(0) == grad_output.size(-1) && weight.size(1) == input.size(-1),
                op, "weight must have shape [out, in] = [", grad_output.size(-1), ", ", input.size(-1),
                "], got ", weight.sizes());
  check_float_like(op, weight, "weight", input, "input");
  c10::OptionalDeviceGuard guard(input.device());
  return weighted_outer_product_apply(as_samples(left), as_samples(input), as_samples(grad_output),
                                      weight.contiguous())
      .view(input.sizes());
}

}  // namespace gradvar
