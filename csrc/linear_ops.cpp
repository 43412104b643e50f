// Linear front door: a Linear layer's per-sample weight gradient is the outer product
// g_n = sum_t grad_output[n, t]^T input[n, t] over its middle dims t (one group), so every
// op here checks its arguments, views them as [N, T, features] factors and calls the core.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include "checks.h"
#include "outer_product_stats.h"

namespace gradvar {
namespace {

// [N, *, F] -> factors [N, T, F], T = prod(*) (1 when there are no middle dims); chunks are views.
Factors linear_factors(const at::Tensor& t) {
  int64_t positions = 1;
  for (int64_t d = 1; d + 1 < t.dim(); ++d) positions *= t.size(d);
  const auto samples = t.reshape({t.size(0), positions, t.size(-1)}).contiguous();
  return Factors{t.size(0), 1, positions, t.size(-1), t.options(), false,
                 [samples](int64_t start, int64_t n) {
                   return n == samples.size(0) ? samples : samples.narrow(0, start, n);  // all: no view op
                 }};
}

at::Tensor weight_of_group(const at::Tensor& moment) { return moment.squeeze(0); }

// A [N, T, F] result whose sample rows the core writes in place.
Sink rows_of(at::Tensor& out) {
  return Sink{[&out](int64_t start, int64_t n) { return out.narrow(0, start, n); }, nullptr};
}

// A weight-shaped argument: [out, in], float like input.
void check_linear_weight(const char* op, const at::Tensor& weight, const char* name, const at::Tensor& input,
                         const at::Tensor& grad_output) {
  GRADVAR_CHECK(weight.dim() == 2 && weight.size(0) == grad_output.size(-1) && weight.size(1) == input.size(-1),
                op, name, " must have shape [out, in] = [", grad_output.size(-1), ", ", input.size(-1), "], got ",
                weight.sizes());
  check_float_like(op, weight, name, input, "input");
}

}  // namespace

at::Tensor linear_second_moment(const at::Tensor& input, const at::Tensor& grad_output) {
  check_samples_pair("linear_second_moment", input, "input", grad_output, "grad_output");
  c10::OptionalDeviceGuard guard(input.device());
  const auto X = linear_factors(input), G = linear_factors(grad_output);
  return weight_of_group(std::get<0>(reduce_outer_products(X, G, nullptr, nullptr, /*with_sum=*/false)));
}

at::Tensor linear_variance(const at::Tensor& input, const at::Tensor& grad_output) {
  check_samples_pair("linear_variance", input, "input", grad_output, "grad_output");
  c10::OptionalDeviceGuard guard(input.device());
  const auto X = linear_factors(input), G = linear_factors(grad_output);
  return weight_of_group(variance_from_moments(X, G));
}

std::tuple<at::Tensor, at::Tensor> linear_moments(const at::Tensor& input, const at::Tensor& grad_output) {
  check_samples_pair("linear_moments", input, "input", grad_output, "grad_output");
  c10::OptionalDeviceGuard guard(input.device());
  auto [moment, sum] = reduce_outer_products(linear_factors(input), linear_factors(grad_output), nullptr, nullptr,
                                             /*with_sum=*/true);
  return {weight_of_group(moment), weight_of_group(sum)};
}

at::Tensor linear_batch_l2(const at::Tensor& input, const at::Tensor& grad_output) {
  check_samples_pair("linear_batch_l2", input, "input", grad_output, "grad_output");
  c10::OptionalDeviceGuard guard(input.device());
  return outer_product_squared_norms(linear_factors(input), linear_factors(grad_output));
}

at::Tensor linear_cross_moment(const at::Tensor& input, const at::Tensor& grad_output,
                               const at::Tensor& other_input, const at::Tensor& other_grad_output) {
  const char* op = "linear_cross_moment";
  check_samples_pair(op, input, "input", grad_output, "grad_output");
  check_pair_like(op, other_input, "other_input", other_grad_output, "other_grad_output", input, grad_output);
  c10::OptionalDeviceGuard guard(input.device());
  const auto Xb = linear_factors(other_input), Gb = linear_factors(other_grad_output);
  return weight_of_group(std::get<0>(
      reduce_outer_products(linear_factors(input), linear_factors(grad_output), &Xb, &Gb, /*with_sum=*/false)));
}

at::Tensor weighted_gradient_product(const at::Tensor& left, const at::Tensor& input,
                                     const at::Tensor& grad_output, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& center) {
  const char* op = "weighted_gradient_product";
  check_samples_pair(op, input, "input", grad_output, "grad_output");
  check_same_shape(op, left, "left", grad_output, "grad_output");
  check_float_like(op, left, "left", input, "input");
  check_linear_weight(op, weight, "weight", input, grad_output);
  const bool centered = center.has_value() && center->defined();
  if (centered) check_linear_weight(op, *center, "center", input, grad_output);
  c10::OptionalDeviceGuard guard(input.device());
  const auto P = linear_factors(input);
  at::Tensor out = at::empty({P.samples, P.positions, P.features}, input.options());
  weighted_outer_product_apply(linear_factors(left), P, linear_factors(grad_output), weight.unsqueeze(0),
                               centered ? center->unsqueeze(0) : at::Tensor(), rows_of(out));
  return out.view(input.sizes());
}

// Both products from one h_n = W * g_n - center per chunk: left_grad_output[n] h_n (like input)
// and left_input[n] h_n^T (like grad_output). The variance's backward: one pass over g_n, not two.
std::tuple<at::Tensor, at::Tensor> weighted_gradient_products(const at::Tensor& left_grad_output,
                                                              const at::Tensor& left_input, const at::Tensor& input,
                                                              const at::Tensor& grad_output, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& center) {
  const char* op = "weighted_gradient_products";
  check_samples_pair(op, input, "input", grad_output, "grad_output");
  check_pair_like(op, left_input, "left_input", left_grad_output, "left_grad_output", input, grad_output);
  check_linear_weight(op, weight, "weight", input, grad_output);
  const bool centered = center.has_value() && center->defined();
  if (centered) check_linear_weight(op, *center, "center", input, grad_output);
  c10::OptionalDeviceGuard guard(input.device());
  const auto P = linear_factors(input), Q = linear_factors(grad_output);
  const bool z_is_q = left_grad_output.is_same(grad_output), z2_is_p = left_input.is_same(input);
  const auto Z = z_is_q ? Factors{} : linear_factors(left_grad_output);
  const auto Z2 = z2_is_p ? Factors{} : linear_factors(left_input);
  at::Tensor to_input = at::empty({P.samples, P.positions, P.features}, input.options());
  at::Tensor to_grad_output = at::empty({Q.samples, Q.positions, Q.features}, input.options());
  weighted_outer_product_apply_both(
      z_is_q ? Q : Z, z2_is_p ? P : Z2, P, Q, weight.unsqueeze(0),
      centered ? center->unsqueeze(0) : at::Tensor(), rows_of(to_input), rows_of(to_grad_output),
      /*positions_last=*/false);
  return {to_input.view(input.sizes()), to_grad_output.view(grad_output.sizes())};
}

}  // namespace gradvar
