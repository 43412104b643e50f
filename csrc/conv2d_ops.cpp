// Conv2d front door: a convolution's per-sample weight gradient is the Linear case over
// unfolded patches. Per sample n and group j, with L = H_out * W_out positions,
//   X_n = unfold(input[n])^T       [L, C_in/groups * kh * kw]   (formed a chunk of samples at a time)
//   G_n = grad_output[n]^T         [L, C_out/groups]            (a view)
//   g_n = G_n^T X_n                [C_out/groups, C_in/groups * kh * kw] = the weight's layout,
// so every op checks its arguments, builds these factors and calls the core.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <string>

#include "checks.h"
#include "conv2d_parts.h"
#include "outer_product_stats.h"

namespace gradvar {
using namespace conv;  // NOLINT: the front door's own parts (conv2d_parts.h)
namespace {


void check_pair_param(const char* op, at::IntArrayRef values, const char* name, int64_t minimum) {
  GRADVAR_CHECK(values.size() == 2, op, name, " must have 2 values (height, width), got ", values);
  GRADVAR_CHECK(values[0] >= minimum && values[1] >= minimum, op, name, " must be >= ", minimum, ", got ", values);
}

// input [N, C_in, H, W], grad_output [N, C_out, H_out, W_out] consistent with the hyper-parameters.
ConvGeometry check_conv(const char* op, const at::Tensor& input, const char* input_name,
                        const at::Tensor& grad_output, const char* grad_name, at::IntArrayRef kernel_size,
                        at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_pair_param(op, kernel_size, "kernel_size", 1);
  check_pair_param(op, stride, "stride", 1);
  check_pair_param(op, padding, "padding", 0);
  check_pair_param(op, dilation, "dilation", 1);
  GRADVAR_CHECK(groups >= 1, op, "groups must be >= 1, got ", groups);
  GRADVAR_CHECK(input.dim() == 4, op, input_name, " must have shape [N, C_in, H, W], got shape ", input.sizes());
  GRADVAR_CHECK(grad_output.dim() == 4, op, grad_name, " must have shape [N, C_out, H_out, W_out], got shape ",
                grad_output.sizes());
  check_same_batch(op, input, input_name, grad_output, grad_name);
  GRADVAR_CHECK(input.size(1) % groups == 0, op, input_name, " has ", input.size(1),
                " channels, not divisible by groups = ", groups);
  GRADVAR_CHECK(grad_output.size(1) % groups == 0, op, grad_name, " has ", grad_output.size(1),
                " channels, not divisible by groups = ", groups);
  check_float_like(op, input, input_name, input, input_name);
  check_float_like(op, grad_output, grad_name, input, input_name);
  ConvGeometry c{kernel_size.vec(), stride.vec(), padding.vec(), dilation.vec(), groups, input.size(1),
                 grad_output.size(1), input.size(2), input.size(3), 0, 0};
  int64_t expected[2];
  for (int d = 0; d < 2; ++d) {
    const int64_t span = dilation[d] * (kernel_size[d] - 1) + 1;
    const int64_t padded = input.size(2 + d) + 2 * padding[d];
    GRADVAR_CHECK(padded >= span, op, input_name, " spatial size ", input.sizes().slice(2), " with padding ",
                  padding, " is smaller than the dilated kernel (", kernel_size, ", dilation ", dilation, ")");
    expected[d] = (padded - span) / stride[d] + 1;
  }
  GRADVAR_CHECK(grad_output.size(2) == expected[0] && grad_output.size(3) == expected[1], op, grad_name,
                " has spatial size ", grad_output.sizes().slice(2), " but ", input_name, " ", input.sizes().slice(2),
                " with kernel_size ", kernel_size, ", stride ", stride, ", padding ", padding, ", dilation ", dilation,
                " gives [", expected[0], ", ", expected[1], "]");
  c.out_height = expected[0];
  c.out_width = expected[1];
  return c;
}

// Patches of an image [N, C_in, H, W]: chunk -> [n * groups, L, C_in/groups * kh * kw]. On CUDA
// with `implicit` (GRADVAR_EXT_CONV_ALGORITHM=implicit) the factor also names its image
// (Factors::patches), for the moments' kernel that reads patches in place; every other use
// unfolds chunks.
Factors patch_factors(const at::Tensor& image, const ConvGeometry& c, bool implicit = false) {
  const auto img = image.contiguous();
  const int64_t g = c.groups, f = c.patch(), L = c.positions();
  Factors factors{img.size(0), g, L, f, img.options(), !c.unfold_is_view(),
                  [img, c, g, f, L](int64_t start, int64_t n) {
                    const auto part = img.narrow(0, start, n);
                    if (c.unfold_is_view()) return part.view({n, g, f, L}).transpose(2, 3).reshape({n * g, L, f});
                    if (!unfold_with_im2col(part)) return unfold_strided(part, c);
                    return im2col_columns(part, c, 0, c.out_height);
                  }};
  if (!c.unfold_is_view()) {
    factors.slab = [img, c](int64_t start, int64_t n, int64_t first_row, int64_t rows) {
      const auto part = img.narrow(0, start, n);
      if (part.is_cpu() || !unfold_with_im2col(part)) return unfold_rows(part, c, first_row, rows);
      return im2col_columns(part, c, first_row, rows);
    };
    factors.slab_width = c.out_width;
  }
  if (img.is_cuda() && implicit) {
    factors.patches = std::make_shared<const PatchSource>(
        PatchSource{img, c.in_channels / g, c.kernel[0], c.kernel[1], c.stride[0], c.stride[1], c.padding[0],
                    c.padding[1], c.dilation[0], c.dilation[1], c.out_width});
  }
  return factors;
}

// Positions of a grad_output-like tensor [N, C_out, H_out, W_out]: chunk -> [n * groups, L, C_out/groups], a view.
Factors position_factors(const at::Tensor& grad, const ConvGeometry& c) {
  const auto go = grad.contiguous();
  const int64_t g = c.groups, f = c.out_channels / g, L = c.positions();
  return Factors{go.size(0), g, L, f, go.options(), false, [go, g, f, L](int64_t start, int64_t n) {
                   return go.narrow(0, start, n).view({n, g, f, L}).transpose(2, 3).reshape({n * g, L, f});
                 }};
}

// Ways to form a chunk's per-sample gradients g_n (and to apply W * g_n in the backward):
//   unfold:   the Linear case over unfolded patches (bmm; the patches are formed per chunk);
//   implicit: unfold, but on CUDA the moments read the patches straight from the image
//             (Factors::patches);
//   grouped:  the chunk's n samples become the n * groups groups of one batch-1 convolution, so
//             the backend's convolution kernels (oneDNN / cuDNN) do it without unfolded patches;
//   shifted:  opt-in, a bmm per kernel row over width-unfolded images (conv2d_shifted.cpp).
enum class ConvPath { unfold, implicit, grouped, shifted };

// The path of one op call, from GRADVAR_EXT_CONV_ALGORITHM=auto|unfold|grouped|implicit|shifted
// (read once per call). auto (default) takes grouped for float32 CPU tensors with a kernel larger
// than 1x1 (or a stride / padding) and >= 8 input channels per group, or 1 in each of several
// groups (depthwise): on 2 cores 1.5-9x faster with 16x16 or more output pixels, within 10%
// either way at 8x8 and below; slower for 1-3 input channels in one group (1.6-2.5x, the seed's
// MNIST conv included: its patches are small) and 1x1 kernels (benchmarks/RESULTS.md). Unfold
// elsewhere (CUDA: on an H200 the benchmark CNN ran 1.3x faster with unfold than grouped), except
// the float64 moments on CUDA (moments = true: the second moment, variance and both moments; not
// a 1x1 stride-1 kernel, whose unfolding is a view), which go by shifted kernel rows in chunks of
// up to 128 MiB (shifted_moment_gradients): of bmm's throughput in GPU time, the benchmark CNN's
// 32 -> 64 conv at 32x32 / 64 -> 64 at 16x16 read 0.50 / 0.52 on an H200 (twenty-fourth session)
// and 0.54 / 0.58 on an H100 (twenty-first) where unfold read 0.39 / 0.41 and 0.45 / 0.47;
// float32 and the backward's products keep unfold (shifted products: 463 against 380 us, float64
// 32 -> 64).
ConvPath conv_path(const char* op, const ConvGeometry& c, const at::Tensor& input, bool moments = false) {
  const char* flag = env_choice("GRADVAR_EXT_CONV_ALGORITHM", {"auto", "unfold", "grouped", "implicit", "shifted"},
                                "auto, unfold, grouped, implicit or shifted", op);
  const std::string choice = flag != nullptr ? flag : "auto";
  if (choice == "unfold") return ConvPath::unfold;
  if (choice == "implicit") return ConvPath::implicit;
  if (choice == "grouped") return ConvPath::grouped;
  if (choice == "shifted") return ConvPath::shifted;
  if (moments && input.is_cuda() && input.scalar_type() == at::kDouble && !c.unfold_is_view()) {
    return ConvPath::shifted;  // (a 1x1 stride-1 kernel's patches are the image itself: no copy to save)
  }
  const int64_t per_group = c.in_channels / c.groups;
  const bool grouped = input.is_cpu() && input.scalar_type() == at::kFloat && !c.unfold_is_view() &&
                       (per_group >= 8 || (per_group == 1 && c.groups > 1));
  return grouped ? ConvPath::grouped : ConvPath::unfold;
}

// The moments' shifted_gradients on CUDA in float64 take chunks of up to 128 MiB (conv_path's
// measurements: with the core's GPU rule, 32 MiB here, 0.36 / 0.44 of bmm on an H200; with 64 MiB
// 0.41 / 0.52); elsewhere the core's budget. GRADVAR_EXT_CHUNK_MIB still overrides it.
GradientChunks shifted_moment_gradients(const at::Tensor& input, const at::Tensor& grad_output, const ConvGeometry& c) {
  auto chunks = shifted_gradients(input, grad_output, c);
  if (input.is_cuda() && input.scalar_type() == at::kDouble) chunks.budget_bytes = int64_t(128) << 20;
  return chunks;
}

// Samples per chunk for the grouped path: oneDNN ran best with <= 16 samples and ~2 MiB of
// per-sample gradients per convolution (measured on 2 cores), and with that many rather than
// what the core's CPU budget (4 MiB) allows: its own budget is 16 MiB (the benchmark CNN's
// layers' moments and products 1.05-1.25x faster than with 4 MiB; benchmarks/RESULTS.md). GPUs
// keep the core's budget, and so do the products (grouped_product_gradients).
int64_t grouped_max_chunk(const ConvGeometry& c, const at::Tensor& input) {
  const int64_t bytes = c.out_channels * c.patch() * static_cast<int64_t>(input.element_size());
  return std::clamp<int64_t>((int64_t(2) << 20) / std::max<int64_t>(1, bytes), 1, 16);
}
int64_t grouped_budget_bytes(const at::Tensor& input) { return input.is_cpu() ? int64_t(16) << 20 : 0; }

// n samples' weight-shaped tensors as the weight of one grouped convolution: [n * C_out, C_in/groups, kh, kw].
std::vector<int64_t> grouped_weight_shape(int64_t n, const ConvGeometry& c) {
  return {n * c.out_channels, c.in_channels / c.groups, c.kernel[0], c.kernel[1]};
}

// g_n for samples [start, start + n) as the weight gradient of one grouped convolution:
// input [1, n*C_in, H, W], grad_output [1, n*C_out, H_out, W_out], groups n*groups ->
// [n*C_out, C_in/groups, kh, kw] = [n * groups, C_out/groups, patch].
GradientChunks grouped_gradients(const at::Tensor& input, const at::Tensor& grad_output, const ConvGeometry& c) {
  const auto x = input.contiguous(), go = grad_output.contiguous();
  const int64_t rows = c.out_channels / c.groups;
  const int64_t scratch = 2 * c.out_channels * c.patch() + c.in_channels * c.height * c.width +
                          c.out_channels * c.positions();  // result, weight-shaped argument, backend reorders
  return GradientChunks{x.size(0), c.groups, rows, c.patch(), x.options(), scratch, grouped_max_chunk(c, x),
                        [x, go, c, rows](int64_t start, int64_t n) {
                          const auto image = x.narrow(0, start, n).view({1, n * c.in_channels, c.height, c.width});
                          const auto grad = go.narrow(0, start, n).view(
                              {1, n * c.out_channels, c.out_height, c.out_width});
                          const auto like_weight = at::empty(grouped_weight_shape(n, c), x.options());
                          const auto grads = at::convolution_backward(
                              grad, image, like_weight, std::nullopt, c.stride, c.padding, c.dilation,
                              /*transposed=*/false, /*output_padding=*/{0, 0}, n * c.groups, {false, true, false});
                          return std::get<1>(grads).contiguous().view({n * c.groups, rows, c.patch()});
                        },
                        grouped_budget_bytes(x)};
}

// The products' (the moments' backward) g_n on the grouped path, in chunks of the core's budget
// (at most 4 MiB on the CPU), not the moments' 16 MiB: they run in the double backward, at the job's peak,
// beside their input-sized results, where 16 MiB chunks held ~8 MB of oneDNN's reorders (the
// benchmark CNN's job (b), N = 64: peak 117.9 -> 111.0 MB with the conv node's sliced weight
// gradients, at the same time; benchmarks/RESULTS.md, twenty-fifth session).
GradientChunks grouped_product_gradients(const at::Tensor& input, const at::Tensor& grad_output,
                                         const ConvGeometry& c) {
  auto chunks = grouped_gradients(input, grad_output, c);
  chunks.budget_bytes = 0;
  return chunks;
}

// Takes h_n (weight-shaped) and writes, per sample, the transposed convolution of
// left_grad_output[n] with h_n (the unfold path's fold(G_left_n h_n)) into out [N, C_in, H, W].
WeightedConsumer grouped_to_input(const at::Tensor& left_grad_output, at::Tensor& out, const ConvGeometry& c) {
  const auto left = left_grad_output.contiguous();
  std::vector<int64_t> output_padding(2);
  for (int d = 0; d < 2; ++d) {
    const int64_t reached = (c.out_height * (d == 0) + c.out_width * (d == 1) - 1) * c.stride[d] -
                            2 * c.padding[d] + c.dilation[d] * (c.kernel[d] - 1) + 1;
    output_padding[d] = (d == 0 ? c.height : c.width) - reached;  // rows/cols the strided conv never read
  }
  return WeightedConsumer{c.in_channels * c.height * c.width, [left, &out, c, output_padding](
                                                                   int64_t start, int64_t n, const at::Tensor& h) {
                            const auto weight = h.reshape(grouped_weight_shape(n, c));
                            const auto grad = left.narrow(0, start, n).view(
                                {1, n * c.out_channels, c.out_height, c.out_width});
                            out.narrow(0, start, n)
                                .view({1, n * c.in_channels, c.height, c.width})
                                .copy_(at::conv_transpose2d(grad, weight, {}, c.stride, c.padding, output_padding,
                                                            n * c.groups, c.dilation));
                          }};
}

// Takes h_n and writes, per sample, the convolution of left_input[n] with h_n (the unfold path's
// unfold(X_left_n) h_n^T) into out [N, C_out, H_out, W_out].
WeightedConsumer grouped_to_grad_output(const at::Tensor& left_input, at::Tensor& out, const ConvGeometry& c) {
  const auto left = left_input.contiguous();
  return WeightedConsumer{c.out_channels * c.positions(), [left, &out, c](int64_t start, int64_t n,
                                                                          const at::Tensor& h) {
                            const auto weight = h.reshape(grouped_weight_shape(n, c));
                            const auto image = left.narrow(0, start, n).view(
                                {1, n * c.in_channels, c.height, c.width});
                            out.narrow(0, start, n)
                                .view({1, n * c.out_channels, c.out_height, c.out_width})
                                .copy_(at::conv2d(image, weight, {}, c.stride, c.padding, c.dilation, n * c.groups));
                          }};
}

// The conv weight's shape [C_out, C_in/groups, kh, kw].
std::vector<int64_t> weight_shape(const ConvGeometry& c) {
  return {c.out_channels, c.in_channels / c.groups, c.kernel[0], c.kernel[1]};
}

at::Tensor as_weight(const at::Tensor& per_group, const ConvGeometry& c) { return per_group.reshape(weight_shape(c)); }

}  // namespace

at::Tensor conv2d_second_moment(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef kernel_size,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  const char* op = "conv2d_second_moment";
  const auto c = check_conv(op, input, "input", grad_output, "grad_output", kernel_size, stride, padding, dilation,
                            groups);
  c10::OptionalDeviceGuard guard(input.device());
  const ConvPath path = conv_path(op, c, input, /*moments=*/true);
  if (path == ConvPath::grouped) {
    return as_weight(std::get<0>(reduce_gradients(grouped_gradients(input, grad_output, c), nullptr, false)), c);
  }
  if (path == ConvPath::shifted) {
    const auto moment = std::get<0>(reduce_gradients(shifted_moment_gradients(input, grad_output, c), nullptr, false));
    return as_weight(from_shifted(moment, c), c);
  }
  const auto X = patch_factors(input, c, path == ConvPath::implicit), G = position_factors(grad_output, c);
  return as_weight(std::get<0>(reduce_outer_products(X, G, nullptr, nullptr, /*with_sum=*/false)), c);
}

at::Tensor conv2d_variance(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_variance";
  const auto c = check_conv(op, input, "input", grad_output, "grad_output", kernel_size, stride, padding, dilation,
                            groups);
  c10::OptionalDeviceGuard guard(input.device());
  const ConvPath path = conv_path(op, c, input, /*moments=*/true);
  if (path == ConvPath::grouped) {
    return as_weight(variance_of_gradients(grouped_gradients(input, grad_output, c)), c);
  }
  if (path == ConvPath::shifted) {
    return as_weight(from_shifted(variance_of_gradients(shifted_moment_gradients(input, grad_output, c)), c), c);
  }
  const auto X = patch_factors(input, c, path == ConvPath::implicit), G = position_factors(grad_output, c);
  return as_weight(variance_from_moments(X, G), c);
}

std::tuple<at::Tensor, at::Tensor> conv2d_moments(const at::Tensor& input, const at::Tensor& grad_output,
                                                  at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_moments";
  const auto c = check_conv(op, input, "input", grad_output, "grad_output", kernel_size, stride, padding, dilation,
                            groups);
  c10::OptionalDeviceGuard guard(input.device());
  const ConvPath path = conv_path(op, c, input, /*moments=*/true);
  if (path == ConvPath::shifted) {
    auto [moment, sum] = reduce_gradients(shifted_moment_gradients(input, grad_output, c), nullptr, /*with_sum=*/true);
    return {as_weight(from_shifted(moment, c), c), as_weight(from_shifted(sum, c), c)};
  }
  auto [moment, sum] = path == ConvPath::grouped
                           ? reduce_gradients(grouped_gradients(input, grad_output, c), nullptr, /*with_sum=*/true)
                           : reduce_outer_products(patch_factors(input, c, path == ConvPath::implicit),
                                                   position_factors(grad_output, c), nullptr, nullptr, /*with_sum=*/true);
  return {as_weight(moment, c), as_weight(sum, c)};
}

at::Tensor conv2d_batch_l2(const at::Tensor& input, const at::Tensor& grad_output, at::IntArrayRef kernel_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_batch_l2";
  const auto c = check_conv(op, input, "input", grad_output, "grad_output", kernel_size, stride, padding, dilation,
                            groups);
  c10::OptionalDeviceGuard guard(input.device());
  conv_path(op, c, input);  // checks GRADVAR_EXT_CONV_ALGORITHM; the squared norms always unfold
  return outer_product_squared_norms(patch_factors(input, c), position_factors(grad_output, c));
}

at::Tensor conv2d_cross_moment(const at::Tensor& input, const at::Tensor& grad_output, const at::Tensor& other_input,
                               const at::Tensor& other_grad_output, at::IntArrayRef kernel_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const char* op = "conv2d_cross_moment";
  const auto c = check_conv(op, input, "input", grad_output, "grad_output", kernel_size, stride, padding, dilation,
                            groups);
  check_pair_like(op, other_input, "other_input", other_grad_output, "other_grad_output", input, grad_output);
  c10::OptionalDeviceGuard guard(input.device());
  const ConvPath path = conv_path(op, c, input);
  if (path == ConvPath::grouped) {
    const auto gb = grouped_gradients(other_input, other_grad_output, c);
    return as_weight(std::get<0>(reduce_gradients(grouped_gradients(input, grad_output, c), &gb, false)), c);
  }
  if (path == ConvPath::shifted) {
    const auto gb = shifted_gradients(other_input, other_grad_output, c);
    const auto moment = std::get<0>(reduce_gradients(shifted_gradients(input, grad_output, c), &gb, false));
    return as_weight(from_shifted(moment, c), c);
  }
  const bool implicit = path == ConvPath::implicit;
  const auto X = patch_factors(input, c, implicit), G = position_factors(grad_output, c);
  const auto Xb = patch_factors(other_input, c, implicit), Gb = position_factors(other_grad_output, c);
  return as_weight(std::get<0>(reduce_outer_products(X, G, &Xb, &Gb, /*with_sum=*/false)), c);
}

namespace {

// Sinks for the weighted products, which arrive positions-last: [n*g, f, L] is col2im's layout
// (towards the input); [n*g, C_out/g, L] is grad_output's (towards grad_output).
Sink fold_into(at::Tensor& out, const ConvGeometry& c) {
  return Sink{nullptr, [&out, &c](int64_t start, int64_t n, const at::Tensor& values) {
    const auto cols = values.view({n, c.in_channels * c.kernel[0] * c.kernel[1], c.positions()});
    auto dst = out.narrow(0, start, n);
    if (c.unfold_is_view()) {
      dst.copy_(cols.view(dst.sizes()));
    } else if (unfold_with_im2col(dst)) {
      col2im(cols, dst, c);
    } else if (dst.is_cpu() || n >= c.kernel[0] * c.kernel[1]) {
      fold_strided(cols, dst, c);  // kh * kw + 2 kernels
    } else {  // fewer samples than kernel taps: at::col2im's n + 1 launches are fewer
      dst.copy_(at::col2im(cols, {c.height, c.width}, c.kernel, c.dilation, c.padding, c.stride));
    }
  }};
}

// grad_output-shaped results take the products in place: [n*g, C_out/g, L] is a view of their rows.
Sink write_into(at::Tensor& out, const ConvGeometry& c) {
  return Sink{[&out, &c](int64_t start, int64_t n) {
                return out.narrow(0, start, n).view({n * c.groups, c.out_channels / c.groups, c.positions()});
              },
              nullptr};
}

void check_weight(const char* op, const at::Tensor& weight, const at::Tensor& input, const ConvGeometry& c) {
  const auto shape = weight_shape(c);
  GRADVAR_CHECK(weight.sizes() == at::IntArrayRef(shape), op, "weight must have the conv weight's shape ",
                at::IntArrayRef(shape), ", got ", weight.sizes());
  check_float_like(op, weight, "weight", input, "input");
}

// A defined center, checked like the weight, as [groups, C_out/groups, patch]; else undefined.
at::Tensor checked_center(const char* op, const std::optional<at::Tensor>& center, const at::Tensor& weight,
                          const at::Tensor& input, const ConvGeometry& c) {
  if (!center.has_value() || !center->defined()) return at::Tensor();
  GRADVAR_CHECK(center->sizes() == weight.sizes(), op, "center must have the weight's shape ", weight.sizes(),
                ", got ", center->sizes());
  check_float_like(op, *center, "center", input, "input");
  return center->reshape({c.groups, c.out_channels / c.groups, c.patch()});
}

}  // namespace

// to_input: per sample, fold(G_left_n h_n) -> [N, C_in, H, W], left shaped like grad_output.
// else:     per sample, X_left_n h_n^T -> [N, C_out, H_out, W_out], left shaped like input.
// h_n = W * g_n - center (center, like W, may be undefined).
at::Tensor conv2d_weighted_gradient_product(const at::Tensor& left, const at::Tensor& input,
                                            const at::Tensor& grad_output, const at::Tensor& weight,
                                            at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                            bool to_input, const std::optional<at::Tensor>& center) {
  const char* op = "conv2d_weighted_gradient_product";
  const auto c = check_conv(op, input, "input", grad_output, "grad_output", kernel_size, stride, padding, dilation,
                            groups);
  if (to_input) {
    check_same_shape(op, left, "left (to_input=True)", grad_output, "grad_output");
  } else {
    check_same_shape(op, left, "left (to_input=False)", input, "input");
  }
  check_float_like(op, left, "left", input, "input");
  check_weight(op, weight, input, c);
  const auto C = checked_center(op, center, weight, input, c);
  c10::OptionalDeviceGuard guard(input.device());
  const ConvPath path = conv_path(op, c, input);
  const auto W = weight.reshape({c.groups, c.out_channels / c.groups, c.patch()});
  if (path == ConvPath::grouped) {
    at::Tensor out = at::empty((to_input ? input : grad_output).sizes(), input.options());
    apply_weighted_gradients(grouped_product_gradients(input, grad_output, c), W, C,
                             {to_input ? grouped_to_input(left, out, c) : grouped_to_grad_output(left, out, c)});
    return out;
  }
  if (path == ConvPath::shifted) {
    at::Tensor out = at::empty((to_input ? input : grad_output).sizes(), input.options());
    auto keep = !to_input && left.is_same(input) ? std::make_shared<at::Tensor>() : nullptr;
    apply_weighted_gradients(
        shifted_gradients(input, grad_output, c, keep), to_shifted(W, c), to_shifted(C, c),
        {to_input ? shifted_to_input(left, out, c) : shifted_to_grad_output(left, keep, out, c)});
    return out;
  }
  const auto input_patches = patch_factors(input, c);
  if (to_input) {
    at::Tensor out = at::empty(input.sizes(), input.options());
    weighted_outer_product_apply(position_factors(left, c), input_patches, position_factors(grad_output, c), W, C,
                                 fold_into(out, c), /*positions_last=*/true);
    return out;
  }
  // The variance's backward passes left = input: one Factors object, so the core unfolds it once.
  const bool left_is_input = left.is_same(input);
  const auto other_patches = left_is_input ? Factors{} : patch_factors(left, c);
  at::Tensor out = at::empty(grad_output.sizes(), grad_output.options());
  weighted_outer_product_apply(left_is_input ? input_patches : other_patches, position_factors(grad_output, c),
                               input_patches, W.transpose(1, 2), C.defined() ? C.transpose(1, 2) : C,
                               write_into(out, c), /*positions_last=*/true);
  return out;
}

// Both products from one h_n = W * g_n - center per chunk: (to_input with left_grad_output, to
// grad_output with left_input). The center (the variance's W * mean gradient) replaces two convolutions.
std::tuple<at::Tensor, at::Tensor> conv2d_weighted_gradient_products(
    const at::Tensor& left_grad_output, const at::Tensor& left_input, const at::Tensor& input,
    const at::Tensor& grad_output, const at::Tensor& weight, const std::optional<at::Tensor>& center,
    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups) {
  const char* op = "conv2d_weighted_gradient_products";
  const auto c = check_conv(op, input, "input", grad_output, "grad_output", kernel_size, stride, padding, dilation,
                            groups);
  check_pair_like(op, left_input, "left_input", left_grad_output, "left_grad_output", input, grad_output);
  check_weight(op, weight, input, c);
  const auto C = checked_center(op, center, weight, input, c);
  c10::OptionalDeviceGuard guard(input.device());
  const ConvPath path = conv_path(op, c, input);
  const auto W = weight.reshape({c.groups, c.out_channels / c.groups, c.patch()});
  at::Tensor to_input = at::empty(input.sizes(), input.options());
  at::Tensor to_grad_output = at::empty(grad_output.sizes(), grad_output.options());
  if (path == ConvPath::grouped) {
    apply_weighted_gradients(grouped_product_gradients(input, grad_output, c), W, C,
                             {grouped_to_input(left_grad_output, to_input, c),
                              grouped_to_grad_output(left_input, to_grad_output, c)});
    return {to_input, to_grad_output};
  }
  if (path == ConvPath::shifted) {
    auto keep = left_input.is_same(input) ? std::make_shared<at::Tensor>() : nullptr;
    apply_weighted_gradients(shifted_gradients(input, grad_output, c, keep), to_shifted(W, c), to_shifted(C, c),
                             {shifted_to_input(left_grad_output, to_input, c),
                              shifted_to_grad_output(left_input, keep, to_grad_output, c)});
    return {to_input, to_grad_output};
  }
  const auto input_patches = patch_factors(input, c);
  const bool left_is_input = left_input.is_same(input);
  const auto other_patches = left_is_input ? Factors{} : patch_factors(left_input, c);
  weighted_outer_product_apply_both(position_factors(left_grad_output, c), left_is_input ? input_patches : other_patches,
                                    input_patches, position_factors(grad_output, c), W, C, fold_into(to_input, c),
                                    write_into(to_grad_output, c), /*positions_last=*/true);
  return {to_input, to_grad_output};
}

}  // namespace gradvar
