// Input checks shared by every gradvar kernel. Each message starts with
// "gradvar.<op>: " and names the offending argument, so a user sees which call and
// which tensor is wrong. Shape problems raise ValueError, dtype problems TypeError.
// The library's knobs (environment variables) are checked here too: env_choice.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>

#define GRADVAR_CHECK(cond, op, ...) TORCH_CHECK_VALUE(cond, "gradvar.", op, ": ", __VA_ARGS__)
#define GRADVAR_CHECK_TYPE(cond, op, ...) TORCH_CHECK_TYPE(cond, "gradvar.", op, ": ", __VA_ARGS__)

namespace gradvar {

// A knob's value: environment variable `name` when set and not empty (else nullptr), which must
// be one of `allowed`: else a ValueError "gradvar: <name> must be <allowed_text>, got '<value>'"
// ("gradvar.<op>: ..." when the op reading it is given).
inline const char* env_choice(const char* name, std::initializer_list<const char*> allowed, const char* allowed_text,
                              const char* op = nullptr) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return nullptr;
  const bool known =
      std::any_of(allowed.begin(), allowed.end(), [value](const char* a) { return std::strcmp(value, a) == 0; });
  TORCH_CHECK_VALUE(known, "gradvar", op != nullptr ? "." : "", op != nullptr ? op : "", ": ", name, " must be ",
                    allowed_text, ", got '", value, "'");
  return value;
}

// A knob in MiB: environment variable `name` as bytes, 0 when unset or empty; else a whole number
// of MiB from 1 to 2^20, or a ValueError "gradvar: <name> must be a whole number of MiB from 1 to
// 1048576<more>, got '<value>'" (`more`: the other values the caller takes, which it reads first).
inline int64_t env_mib(const char* name, const char* more = "") {
  const char* flag = std::getenv(name);
  if (flag == nullptr || *flag == '\0') return 0;
  char* end = nullptr;
  const long long mib = std::strtoll(flag, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && mib > 0 && mib <= (1LL << 20), "gradvar: ", name,
                    " must be a whole number of MiB from 1 to 1048576", more, ", got '", flag, "'");
  return static_cast<int64_t>(mib) << 20;
}

// float32 / float64 only (the Python layer promotes half precision), same dtype and device as `like`.
inline void check_float_like(const char* op, const at::Tensor& t, const char* name,
                             const at::Tensor& like, const char* like_name) {
  const bool half = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
  GRADVAR_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, name,
                     " must be float32 or float64, got ", t.scalar_type(),
                     half ? " (the gradvar_ext.* functions and the front end promote it to float32)" : "");
  GRADVAR_CHECK_TYPE(t.scalar_type() == like.scalar_type(), op, name, " has dtype ",
                     t.scalar_type(), " but ", like_name, " has dtype ", like.scalar_type());
  GRADVAR_CHECK(t.device() == like.device(), op, name, " is on ", t.device(), " but ",
                like_name, " is on ", like.device());
}

// The same number of samples N > 0 in dim 0.
inline void check_same_batch(const char* op, const at::Tensor& input, const char* input_name,
                             const at::Tensor& grad_output, const char* grad_name) {
  GRADVAR_CHECK(grad_output.size(0) == input.size(0), op, "batch size (dim 0) of ", grad_name, " (",
                grad_output.size(0), ") does not match ", input_name, " (", input.size(0), ")");
  GRADVAR_CHECK(input.size(0) > 0, op, input_name, " has an empty batch (N = 0)");
}

// input [N, *, in] and grad_output [N, *, out]: same rank >= 2, same N > 0, same middle dims.
inline void check_samples_pair(const char* op, const at::Tensor& input, const char* input_name,
                               const at::Tensor& grad_output, const char* grad_name) {
  GRADVAR_CHECK(input.dim() >= 2, op, input_name,
                " must have shape [N, *, features] (at least 2 dims), got shape ", input.sizes());
  GRADVAR_CHECK(grad_output.dim() == input.dim(), op, grad_name, " must have the same number of dims as ",
                input_name, " ([N, *, features]), got shapes ", grad_output.sizes(), " and ", input.sizes());
  check_same_batch(op, input, input_name, grad_output, grad_name);
  for (int64_t d = 1; d + 1 < input.dim(); ++d) {
    GRADVAR_CHECK(grad_output.size(d) == input.size(d), op, "middle dims of ", grad_name, " ",
                  grad_output.sizes(), " do not match those of ", input_name, " ", input.sizes());
  }
  check_float_like(op, input, input_name, input, input_name);
  check_float_like(op, grad_output, grad_name, input, input_name);
}

inline void check_same_shape(const char* op, const at::Tensor& t, const char* name,
                             const at::Tensor& like, const char* like_name) {
  GRADVAR_CHECK(t.sizes() == like.sizes(), op, name, " must have the shape of ", like_name, " ",
                like.sizes(), ", got ", t.sizes());
}

// A second (input, grad_output) pair of an op: shaped like input / grad_output, float like input.
inline void check_pair_like(const char* op, const at::Tensor& x, const char* x_name, const at::Tensor& g,
                            const char* g_name, const at::Tensor& input, const at::Tensor& grad_output) {
  check_same_shape(op, x, x_name, input, "input");
  check_same_shape(op, g, g_name, grad_output, "grad_output");
  check_float_like(op, x, x_name, input, "input");
  check_float_like(op, g, g_name, input, "input");
}

}  // namespace gradvar
