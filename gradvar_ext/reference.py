"""Pure-torch reference implementations of every ``gradvar`` op.

They materialise the per-sample gradients ``[N, out, in]`` with plain, differentiable torch
ops: simple enough to be right by inspection, which is why the tests compare the kernels with
them. They also serve as the kernels when the compiled extension cannot be loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _checks


def _as_samples(t: torch.Tensor) -> torch.Tensor:
    """[N, *, F] -> [N, T, F] with T the product of the middle dims (1 if none)."""
    positions = 1
    for size in t.shape[1:-1]:
        positions *= size
    return t.reshape(t.shape[0], positions, t.shape[-1])


def per_sample_gradients(input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Per-sample Linear weight gradients ``g_n = sum_t grad_output[n, t]^T input[n, t]``: [N, out, in]."""
    return torch.einsum("nto,nti->noi", _as_samples(grad_output), _as_samples(input))


def linear_second_moment(input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    _checks.check_samples_pair("linear_second_moment", input, "input", grad_output, "grad_output")
    return per_sample_gradients(input, grad_output).square().sum(0)


def linear_variance(input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    _checks.check_samples_pair("linear_variance", input, "input", grad_output, "grad_output")
    return per_sample_gradients(input, grad_output).var(dim=0, unbiased=False)


def linear_batch_l2(input: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    _checks.check_samples_pair("linear_batch_l2", input, "input", grad_output, "grad_output")
    return per_sample_gradients(input, grad_output).square().sum((1, 2))


def linear_moments(input: torch.Tensor, grad_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.check_samples_pair("linear_moments", input, "input", grad_output, "grad_output")
    g = per_sample_gradients(input, grad_output)
    return g.square().sum(0), g.sum(0)


def linear_cross_moment(
    input: torch.Tensor, grad_output: torch.Tensor, other_input: torch.Tensor, other_grad_output: torch.Tensor
) -> torch.Tensor:
    _checks.check_cross_moment("linear_cross_moment", input, grad_output, other_input, other_grad_output)
    g = per_sample_gradients(input, grad_output)
    return (g * per_sample_gradients(other_input, other_grad_output)).sum(0)


def weighted_gradient_product(
    left: torch.Tensor,
    input: torch.Tensor,
    grad_output: torch.Tensor,
    weight: torch.Tensor,
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    _checks.check_weighted_gradient_product("weighted_gradient_product", left, input, grad_output, weight, center)
    h = weight * per_sample_gradients(input, grad_output)
    if center is not None:
        h = h - center
    return torch.einsum("nto,noi->nti", _as_samples(left), h).reshape(input.shape)


def weighted_gradient_products(left_grad_output, left_input, input, grad_output, weight, center):
    _checks.check_weighted_gradient_products(
        "weighted_gradient_products", left_grad_output, left_input, input, grad_output, weight, center
    )
    h = weight * per_sample_gradients(input, grad_output)
    if center is not None:
        h = h - center
    return (
        torch.einsum("nto,noi->nti", _as_samples(left_grad_output), h).reshape(input.shape),
        torch.einsum("nti,noi->nto", _as_samples(left_input), h).reshape(grad_output.shape),
    )


# Bias statistics: the per-sample bias gradient is grad_output[n] summed over the middle dims.
def per_sample_bias_gradients(grad_output: torch.Tensor) -> torch.Tensor:
    """Per-sample bias gradients: [N, out] (a view, no sum, when there is one position: a reshape,
    whose backward is a view too, where indexing's would zero-fill and copy)."""
    samples = _as_samples(grad_output)
    return samples.reshape(samples.shape[0], samples.shape[2]) if samples.shape[1] == 1 else samples.sum(1)


def bias_second_moment(grad_output: torch.Tensor) -> torch.Tensor:
    return per_sample_bias_gradients(grad_output).square().sum(0)


def bias_variance(grad_output: torch.Tensor) -> torch.Tensor:
    per_sample = per_sample_bias_gradients(grad_output)
    if per_sample.is_cuda or per_sample.shape[1] <= 32:  # one op
        return per_sample.var(dim=0, unbiased=False)
    # on the CPU torch.var over dim 0 slows with the columns: ~6x slower than its two passes in
    # plain ops for [128, 512] (214 vs 39 us, 2 cores), level at 64 columns; with up to 32 its one
    # op is the cheaper (host-bound tiny layers: [3, 1] 27 vs 44 us, [32, 10] 28 vs 46, forward
    # and backward with a graph, 1 thread). Exactly 0 for one sample, as torch.var.
    return (per_sample - per_sample.mean(0)).square().mean(0)


def bias_batch_l2(grad_output: torch.Tensor) -> torch.Tensor:
    return per_sample_bias_gradients(grad_output).square().sum(1)


# Conv2d: per-sample gradients from unfolded patches. conv = (kernel_size, stride, padding, dilation, groups).
def _conv_factors(input, grad_output, kernel_size, stride, padding, dilation, groups):
    """Unfolded input [N, groups, C_in/groups*kh*kw, L] and grad_output [N, groups, C_out/groups, L]."""
    n, c_out = grad_output.shape[:2]
    cols = F.unfold(input, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.reshape(n, groups, -1, cols.shape[-1]), grad_output.reshape(n, groups, c_out // groups, -1)


def conv2d_per_sample_gradients(input, grad_output, kernel_size, stride, padding, dilation, groups) -> torch.Tensor:
    """Per-sample Conv2d weight gradients: [N, C_out, C_in/groups, kh, kw]."""
    cols, go = _conv_factors(input, grad_output, kernel_size, stride, padding, dilation, groups)
    g = torch.einsum("ngol,ngfl->ngof", go, cols)
    return g.reshape(input.shape[0], grad_output.shape[1], input.shape[1] // groups, *kernel_size)


def conv2d_second_moment(input, grad_output, *conv):
    _checks.check_conv("conv2d_second_moment", input, "input", grad_output, "grad_output", *conv)
    return conv2d_per_sample_gradients(input, grad_output, *conv).square().sum(0)


def conv2d_variance(input, grad_output, *conv):
    _checks.check_conv("conv2d_variance", input, "input", grad_output, "grad_output", *conv)
    return conv2d_per_sample_gradients(input, grad_output, *conv).var(dim=0, unbiased=False)


def conv2d_moments(input, grad_output, *conv):
    _checks.check_conv("conv2d_moments", input, "input", grad_output, "grad_output", *conv)
    g = conv2d_per_sample_gradients(input, grad_output, *conv)
    return g.square().sum(0), g.sum(0)


def conv2d_batch_l2(input, grad_output, *conv):
    _checks.check_conv("conv2d_batch_l2", input, "input", grad_output, "grad_output", *conv)
    return conv2d_per_sample_gradients(input, grad_output, *conv).square().sum((1, 2, 3, 4))


def conv2d_cross_moment(input, grad_output, other_input, other_grad_output, *conv):
    _checks.check_conv_cross_moment("conv2d_cross_moment", input, grad_output, other_input, other_grad_output, *conv)
    g = conv2d_per_sample_gradients(input, grad_output, *conv)
    return (g * conv2d_per_sample_gradients(other_input, other_grad_output, *conv)).sum(0)


def _apply_weighted(left, input, grad_output, h, conv, to_input):
    """Per sample: fold(left_n h_n) (to_input; left like grad_output) or unfold(left)_n h_n^T."""
    kernel_size, stride, padding, dilation, groups = conv
    n = input.shape[0]
    h = h.reshape(n, groups, h.shape[1] // groups, -1)
    if to_input:
        go = left.reshape(n, groups, left.shape[1] // groups, -1)
        cols = torch.einsum("ngol,ngof->ngfl", go, h).reshape(n, -1, go.shape[-1])
        return F.fold(cols, input.shape[2:], kernel_size, dilation=dilation, padding=padding, stride=stride)
    cols, _ = _conv_factors(left, grad_output, *conv)
    return torch.einsum("ngfl,ngof->ngol", cols, h).reshape(grad_output.shape)


def conv2d_weighted_gradient_product(
    left, input, grad_output, weight, kernel_size, stride, padding, dilation, groups, to_input, center=None
):
    conv = (kernel_size, stride, padding, dilation, groups)
    _checks.check_conv_weighted_gradient_product(
        "conv2d_weighted_gradient_product", left, input, grad_output, weight, *conv, to_input=to_input, center=center
    )
    h = weight * conv2d_per_sample_gradients(input, grad_output, *conv)
    if center is not None:
        h = h - center
    return _apply_weighted(left, input, grad_output, h, conv, to_input)


def conv2d_weighted_gradient_products(left_grad_output, left_input, input, grad_output, weight, center, *conv):
    op = "conv2d_weighted_gradient_products"
    _checks.check_conv_weighted_gradient_products(
        op, left_grad_output, left_input, input, grad_output, weight, center, *conv
    )
    h = weight * conv2d_per_sample_gradients(input, grad_output, *conv)
    if center is not None:
        h = h - center
    return (
        _apply_weighted(left_grad_output, input, grad_output, h, conv, True),
        _apply_weighted(left_input, input, grad_output, h, conv, False),
    )


# The ops the compiled extension provides, by name; the fallback registers these as kernels.
OPS = {
    "linear_second_moment": linear_second_moment,
    "linear_variance": linear_variance,
    "linear_batch_l2": linear_batch_l2,
    "linear_cross_moment": linear_cross_moment,
    "linear_moments": linear_moments,
    "weighted_gradient_product": weighted_gradient_product,
    "weighted_gradient_products": weighted_gradient_products,
    "conv2d_second_moment": conv2d_second_moment,
    "conv2d_variance": conv2d_variance,
    "conv2d_moments": conv2d_moments,
    "conv2d_batch_l2": conv2d_batch_l2,
    "conv2d_cross_moment": conv2d_cross_moment,
    "conv2d_weighted_gradient_product": conv2d_weighted_gradient_product,
    "conv2d_weighted_gradient_products": conv2d_weighted_gradient_products,
}
