"""Fake (meta) kernels, autograd formulas and the documented Python entry points of the ops.

Every backward is written with ops of the same library,

    linear_cross_moment(X, G, Xb, Gb)      = sum_n (G_n^T X_n) * (Gb_n^T Xb_n)
    weighted_gradient_product(Z, P, Q, W, C) = Z_n (W * (Q_n^T P_n) - C)    (per sample n; C optional)
    weighted_gradient_products(Z, Z2, X, G, W, C) = both Z_n h_n and Z2_n h_n^T, h_n = W * g_n - C

(the last one: the statistics' backward in one pass over g_n), and the backward of each of
those is again written with them, so gradients of any order stay inside the kernels and never
materialise per-sample gradients.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import _checks, _loader, reference

_ops = torch.ops.gradvar
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def promoted(*tensors: Tensor | None) -> tuple:
    """The arguments, float16 / bfloat16 tensors cast to float32 (others as they are).

    The documented functions and the front end call the ops through this: statistics of
    half-precision gradients are accumulated and returned in float32 (squared gradients underflow
    in half precision; mixed precision hands a layer bfloat16 grad_outputs with float32 inputs).
    The cast is differentiable: gradients flow back in the arguments' own dtypes. The raw
    ``torch.ops.gradvar`` ops take float32 / float64 only.
    """
    return tuple(t.float() if isinstance(t, Tensor) and t.dtype in _LOW_PRECISION else t for t in tensors)


def scaled(t: Tensor, factor: float) -> Tensor:
    """``t * factor``. An upstream gradient is often a broadcast view (``variance.sum()``'s is
    one expanded scalar), and on the CPU multiplying a stride-0 tensor by a scalar is ~8x slower
    than making it dense and scaling that in place (217 vs 54 us for [512, 784], 2 cores). One
    value expanded (all strides 0) stays one, scaled: where the per-sample gradients are rank one
    (a Linear layer without middle dims), the products' ``(Z * Q) W`` is then a row sum, not a GEMM
    (the MLP's job (b) on 2 CPU cores: 13.9 -> 12.1 ms, peak 10.6 -> 8.8 MB). On CUDA one kernel
    either way, and up to ~1000 elements one op beats two (2.8 vs 4.2 us for [1, 2]): as it is
    (dense: the expanded form is not measured on a GPU yet)."""
    if t.is_contiguous() or t.is_cuda or t.numel() <= 1024:
        return t * factor
    if not any(t.stride()):
        return (t.reshape(-1)[0] * factor).expand(t.shape)
    return t.contiguous().mul_(factor)  # a copy: ours to change


def _flat(t: Tensor) -> Tensor:
    """[N, *, F] -> [N * T, F]: all positions of all samples as rows."""
    return t.reshape(-1, t.shape[-1])


def _per_sample(weights: Tensor, like: Tensor) -> Tensor:
    """A [N] vector shaped to broadcast over a [N, *, F] tensor."""
    return weights.reshape((-1,) + (1,) * (like.dim() - 1))


# ---------------------------------------------------------------- fake kernels
@torch.library.register_fake("gradvar::linear_second_moment")
def _(input: Tensor, grad_output: Tensor) -> Tensor:
    _checks.check_samples_pair("linear_second_moment", input, "input", grad_output, "grad_output")
    return input.new_empty((grad_output.shape[-1], input.shape[-1]))


@torch.library.register_fake("gradvar::linear_variance")
def _(input: Tensor, grad_output: Tensor) -> Tensor:
    _checks.check_samples_pair("linear_variance", input, "input", grad_output, "grad_output")
    return input.new_empty((grad_output.shape[-1], input.shape[-1]))


@torch.library.register_fake("gradvar::linear_moments")
def _(input: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    _checks.check_samples_pair("linear_moments", input, "input", grad_output, "grad_output")
    shape = (grad_output.shape[-1], input.shape[-1])
    return input.new_empty(shape), input.new_empty(shape)


@torch.library.register_fake("gradvar::linear_batch_l2")
def _(input: Tensor, grad_output: Tensor) -> Tensor:
    _checks.check_samples_pair("linear_batch_l2", input, "input", grad_output, "grad_output")
    return input.new_empty((input.shape[0],))


@torch.library.register_fake("gradvar::linear_cross_moment")
def _(input: Tensor, grad_output: Tensor, other_input: Tensor, other_grad_output: Tensor) -> Tensor:
    _checks.check_cross_moment("linear_cross_moment", input, grad_output, other_input, other_grad_output)
    return input.new_empty((grad_output.shape[-1], input.shape[-1]))


@torch.library.register_fake("gradvar::weighted_gradient_product")
def _(left: Tensor, input: Tensor, grad_output: Tensor, weight: Tensor, center: Tensor | None = None) -> Tensor:
    _checks.check_weighted_gradient_product("weighted_gradient_product", left, input, grad_output, weight, center)
    return input.new_empty(input.shape)


@torch.library.register_fake("gradvar::weighted_gradient_products")
def _(left_grad_output, left_input, input, grad_output, weight, center) -> tuple[Tensor, Tensor]:
    _checks.check_weighted_gradient_products(
        "weighted_gradient_products", left_grad_output, left_input, input, grad_output, weight, center
    )
    return input.new_empty(input.shape), grad_output.new_empty(grad_output.shape)


# ---------------------------------------------------------------- autograd
def _save_inputs(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _both_products(x: Tensor, g: Tensor, weight: Tensor, center: Tensor | None, need) -> tuple:
    """(G_n h_n, X_n h_n^T) per sample with h_n = weight * g_n - center: the gradients w.r.t. (x, g)
    of sum_n <weight, g_n^2> / 2 - <center, g_n>. One pass over g_n when both are needed."""
    if not torch.is_grad_enabled():  # a backward without create_graph: skip the ops' autograd wrappers
        with torch._C._AutoDispatchBelowAutograd():
            return _products(x, g, weight, center, need)
    return _products(x, g, weight, center, need)


def _products(x: Tensor, g: Tensor, weight: Tensor, center: Tensor | None, need) -> tuple:
    if need[0] and need[1]:
        return _ops.weighted_gradient_products(g, x, x, g, weight, center)
    grad_x = _ops.weighted_gradient_product(g, x, g, weight, center) if need[0] else None
    grad_g = _ops.weighted_gradient_product(x, g, x, weight.t(), _t(center)) if need[1] else None
    return grad_x, grad_g


def _t(matrix: Tensor | None) -> Tensor | None:
    return None if matrix is None else matrix.t()


def _second_moment_backward(ctx, grad: Tensor):
    # d/dX_n <W, sum_n g_n^2> = 2 G_n (W * g_n);  d/dG_n = 2 X_n (W * g_n)^T
    x, g = ctx.saved_tensors
    return _both_products(x, g, scaled(grad, 2), None, ctx.needs_input_grad)


def _variance_backward(ctx, grad: Tensor):
    # variance = S / N - M^2 with M = sum_n g_n / N = G_flat^T X_flat / N, so
    # d/dX_n = (2 / N) G_n (W * (g_n - M)), likewise for G with the transpose.
    x, g = ctx.saved_tensors
    n = x.shape[0]
    weight = scaled(grad, 2 / n)  # scale the [out, in] weight, not the input-sized results
    weighted_mean = weight * (_flat(g).t() @ _flat(x)) / n  # (2/N) W * M, differentiable torch ops
    return _both_products(x, g, weight, weighted_mean, ctx.needs_input_grad)


def _moments_backward(ctx, grad_moment: Tensor | None, grad_sum: Tensor | None):
    # L = <A, sum_n g_n^2> + <B, sum_n g_n>: h_n = 2 A * g_n + B, the products with center -B.
    # No pass for the mean: that is what sets these apart from the variance op's backward.
    x, g = ctx.saved_tensors
    weight = scaled(grad_moment, 2) if grad_moment is not None else x.new_zeros((g.shape[-1], x.shape[-1]))
    return _both_products(x, g, weight, None if grad_sum is None else -grad_sum, ctx.needs_input_grad)


def _batch_l2_backward(ctx, grad: Tensor):
    # d/dX_n sum_n w_n ||g_n||^2 = 2 w_n G_n g_n;  d/dG_n = 2 w_n X_n g_n^T  (a weight of ones,
    # expanded: no GEMM with it where T = 1)
    x, g = ctx.saved_tensors
    grad_x = grad_g = None
    if ctx.needs_input_grad[0]:
        ones = x.new_ones(()).expand(g.shape[-1], x.shape[-1])
        grad_x = 2 * _ops.weighted_gradient_product(_per_sample(grad, g) * g, x, g, ones)
    if ctx.needs_input_grad[1]:
        ones = x.new_ones(()).expand(x.shape[-1], g.shape[-1])
        grad_g = 2 * _ops.weighted_gradient_product(_per_sample(grad, x) * x, g, x, ones)
    return grad_x, grad_g


def _cross_moment_backward(ctx, grad: Tensor):
    # L = sum_n <W * g_n, h_n>, g_n = G_n^T X_n, h_n = Gb_n^T Xb_n
    x, g, xb, gb = ctx.saved_tensors
    need = ctx.needs_input_grad
    wgp = _ops.weighted_gradient_product
    return (
        wgp(g, xb, gb, grad) if need[0] else None,
        wgp(x, gb, xb, grad.t()) if need[1] else None,
        wgp(gb, x, g, grad) if need[2] else None,
        wgp(xb, g, x, grad.t()) if need[3] else None,
    )


def _weighted_gradient_product_backward(ctx, grad: Tensor):
    z, p, q, w, c = ctx.saved_tensors
    return _product_vjp(z, p, q, w, c, grad, ctx.needs_input_grad)


def _weighted_gradient_products_backward(ctx, grad_to_x: Tensor | None, grad_to_go: Tensor | None):
    # The two single products' backwards, summed:
    # out1 = weighted_gradient_product(left_go, x, go, W, C), out2 = weighted_gradient_product(left_x, go, x, W^T, C^T)
    left_go, left_x, x, go, weight, center = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads: list = [None] * 6

    def add(indices, values):
        for i, value in zip(indices, values):
            if value is not None:
                grads[i] = value if grads[i] is None else grads[i] + value

    if grad_to_x is not None:  # shaped like x
        order = (0, 2, 3, 4, 5)
        add(order, _product_vjp(left_go, x, go, weight, center, grad_to_x, [need[i] for i in order]))
    if grad_to_go is not None:  # shaped like go
        order = (1, 3, 2, 4, 5)
        to_left, to_go, to_x, to_wt, to_ct = _product_vjp(
            left_x, go, x, weight.t(), _t(center), grad_to_go, [need[i] for i in order]
        )
        add(order, (to_left, to_go, to_x, _t(to_wt), _t(to_ct)))
    return tuple(grads)


def _product_vjp(z: Tensor, p: Tensor, q: Tensor, w: Tensor, c: Tensor | None, grad: Tensor, need) -> tuple:
    """Gradients w.r.t. (z, p, q, w, c) of <grad, weighted_gradient_product(z, p, q, w, c)>, None where
    need is False. out_n = Z_n (W * Q_n^T P_n - C); L = sum_n <W * (Z_n^T U_n), Q_n^T P_n> - <C, sum_n Z_n^T U_n>."""
    wgp = _ops.weighted_gradient_product
    return (
        wgp(grad, q, p, w.t(), _t(c)) if need[0] else None,  # U_n (W * Q_n^T P_n - C)^T
        wgp(q, grad, z, w) if need[1] else None,  # Q_n (W * Z_n^T U_n)
        wgp(p, z, grad, w.t()) if need[2] else None,  # P_n (W * Z_n^T U_n)^T
        _ops.linear_cross_moment(grad, z, p, q) if need[3] else None,  # sum_n (Z_n^T U_n) * (Q_n^T P_n)
        -(_flat(z).t() @ _flat(grad)) if c is not None and need[4] else None,  # -sum_n Z_n^T U_n
    )


for _name, _backward in (
    ("linear_second_moment", _second_moment_backward),
    ("linear_variance", _variance_backward),
    ("linear_moments", _moments_backward),
    ("linear_batch_l2", _batch_l2_backward),
    ("linear_cross_moment", _cross_moment_backward),
    ("weighted_gradient_product", _weighted_gradient_product_backward),
    ("weighted_gradient_products", _weighted_gradient_products_backward),
):
    torch.library.register_autograd(f"gradvar::{_name}", _backward, setup_context=_save_inputs)


# Inside torch.autocast the ops run with autocast off and float16 / bfloat16 arguments cast to
# float32 (float64 is left alone): statistics of squared gradients need float32, and the kernels'
# own matrix products must not be downcast by autocast either.
for _name in _loader.SCHEMAS:
    for _device in ("cpu", "cuda"):
        if torch.amp.is_autocast_available(_device):
            torch.library.register_autocast(f"gradvar::{_name}", _device, torch.float32)


# ---------------------------------------------------------------- public functions
def linear_second_moment(input: Tensor, grad_output: Tensor) -> Tensor:
    """Sum over samples of the squared per-sample weight gradients of a Linear layer.

    Args:
        input: the layer's input, ``[N, *, in_features]``.
        grad_output: the gradient of the loss w.r.t. the layer's output, ``[N, *, out_features]``
            (same ``*``). Sample n's weight gradient is ``g_n = sum_* grad_output[n]^T input[n]``.

    Returns:
        ``sum_n g_n ** 2``, shaped like the weight ``[out_features, in_features]``. Differentiable
        (any order) w.r.t. both arguments. BackPACK's ``SumGradSquared``. float16 / bfloat16
        arguments are computed and returned in float32 (:func:`promoted`), as by every function here.
    """
    return _ops.linear_second_moment(*promoted(input, grad_output))


def linear_variance(input: Tensor, grad_output: Tensor) -> Tensor:
    """Variance over samples of the per-sample weight gradients of a Linear layer.

    ``sum_n g_n**2 / N - (sum_n g_n / N) ** 2`` (BackPACK's ``Variance``; equal to
    ``torch.var(per_sample_grads, dim=0, unbiased=False)``), ``[out_features, in_features]``,
    never negative, exactly 0 for N = 1. Arguments as in :func:`linear_second_moment`.
    """
    return _ops.linear_variance(*promoted(input, grad_output))


def linear_moments(input: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    """``(sum_n g_n ** 2, sum_n g_n)`` of a Linear layer's per-sample weight gradients in one pass,
    each ``[out_features, in_features]``. Arguments as in :func:`linear_second_moment`.

    The parts of the variance (``moment / N - (sum / N) ** 2``); differentiable (any order), and
    its backward, unlike :func:`linear_variance`'s, needs no extra pass for the mean. The front end
    builds ``Variance`` from it.
    """
    return _ops.linear_moments(*promoted(input, grad_output))


def _variance_of(moment: Tensor, total: Tensor, n: int, overwrite: bool = False) -> Tensor:
    """moment / n - (total / n)**2 clamped at 0 in one fresh buffer (overwrite: in moment's own,
    for a moment nobody else holds); exactly 0 for n = 1."""
    if n == 1:  # as the variance ops
        return moment.zero_() if overwrite else torch.zeros_like(moment)
    start = (
        moment.addcmul_(total, total, value=-1 / n) if overwrite else torch.addcmul(moment, total, total, value=-1 / n)
    )
    return start.mul_(1 / n).clamp_min_(0)


class _VarianceFromMoments(torch.autograd.Function):
    """moment / n - (total / n)**2 clamped at 0, saving only ``total`` (the op's output, alive anyway);
    like the variance ops, the backward ignores the clamp (it only removes rounding below 0)."""

    @staticmethod
    def forward(ctx, moment: Tensor, total: Tensor, n: int) -> Tensor:
        ctx.save_for_backward(total)
        ctx.n = n
        return _variance_of(moment, total, n)  # n = 1: the gradients below cancel to 0 as well

    @staticmethod
    def backward(ctx, grad: Tensor):
        (total,) = ctx.saved_tensors  # differentiable again: torch ops on saved inputs
        n = ctx.n
        return grad * (1 / n), torch.mul(grad, total).mul_(-2 / n**2), None


def variance_from_moments(moment: Tensor, sum: Tensor, n: int) -> Tensor:
    """``moment / n - (sum / n) ** 2``, clamped at 0 (rounding can dip below it); exactly 0 for n = 1,
    like the variance ops. ``(moment, sum)`` as :func:`linear_moments` returns them; differentiable
    (any order)."""
    return _VarianceFromMoments.apply(moment, sum, n)


Moments = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x, go) -> (sum_n g_n**2, sum_n g_n)
Products = Callable[..., tuple]  # (x, go, weight, center, need) -> (grad_x or None, grad_go or None)


class _VarianceByMoments(torch.autograd.Function):
    """The variance from a moments op as one autograd node, for a front end that differentiates it.

    Forward: ``moments(x, go)`` -> (moment, total), the variance as :func:`variance_from_moments`.
    Backward: the weighted products straight away, ``products(x, go, W, C, need)`` with
    h_n = W * g_n - C, W = (2/n) grad, C = (2/n**2) grad * total (less total's own gradient, if
    any): three weight-sized kernels in one autograd node, where variance_from_moments' backward
    followed by the moments op's takes five in two. ``total`` is a second output so that, saved,
    it stays differentiable: gradients of any order.
    """

    @staticmethod
    def forward(ctx, x: Tensor, go: Tensor, moments: Moments, products: Products) -> tuple[Tensor, Tensor]:
        with torch._C._AutoDispatchBelowAutograd():  # no grad here: skip the op's autograd wrapper (~4 us)
            moment, total = moments(x, go)
        ctx.save_for_backward(x, go, total)
        ctx.products = products
        ctx.set_materialize_grads(False)  # no gradient for total (the usual case): None, not zeros
        return _variance_of(moment, total, x.shape[0], overwrite=True), total  # moment: the op's, ours alone

    @staticmethod
    def backward(ctx, grad: Tensor | None, grad_total: Tensor | None):
        x, go, total = ctx.saved_tensors
        n = x.shape[0]
        need = ctx.needs_input_grad[:2]
        if grad is None or n == 1:  # the variance is exactly 0 for one sample: so are its gradients
            if grad_total is None:
                return tuple(torch.zeros_like(t) if k else None for t, k in zip((x, go), need)) + (None, None)
            weight, center = torch.zeros_like(total), -grad_total
        else:
            weight = scaled(grad, 2 / n)
            center = torch.mul(grad, total).mul_(2 / n**2)
            if grad_total is not None:
                center = center - grad_total
        to_x, to_go = ctx.products(x, go, weight, center, need)
        return to_x, to_go, None, None


def variance_by_moments(input: Tensor, grad_output: Tensor, moments: Moments, products: Products) -> Tensor:
    """The variance of the per-sample gradients through ``moments`` (a moments op, ``(x, go) ->
    (sum_n g_n**2, sum_n g_n)``) and ``products`` (its weighted products, ``(x, go, W, C, need) ->
    (grad_x, grad_go)``), one autograd node (:class:`_VarianceByMoments`): what the front end
    uses when a backward will follow."""
    return _VarianceByMoments.apply(input, grad_output, moments, products)[0]


def linear_variance_by_moments(input: Tensor, grad_output: Tensor) -> Tensor:
    """:func:`linear_variance`'s values through :func:`variance_by_moments`: a single-pass
    backward (no pass for the mean) from a single autograd node. For a front end."""
    return variance_by_moments(*promoted(input, grad_output), _ops.linear_moments, _both_products)


def linear_batch_l2(input: Tensor, grad_output: Tensor) -> Tensor:
    """Squared Frobenius norm ``||g_n||**2`` of each sample's weight gradient, ``[N]`` (BackPACK's ``BatchL2Grad``).

    Arguments as in :func:`linear_second_moment`.
    """
    return _ops.linear_batch_l2(*promoted(input, grad_output))


def linear_cross_moment(input: Tensor, grad_output: Tensor, other_input: Tensor, other_grad_output: Tensor) -> Tensor:
    """``sum_n g_n * h_n`` for two per-sample gradients ``g_n`` (from ``input, grad_output``) and
    ``h_n`` (from ``other_input, other_grad_output``, same shapes). ``[out, in]``. Used by backward formulas."""
    return _ops.linear_cross_moment(*promoted(input, grad_output, other_input, other_grad_output))


def weighted_gradient_product(
    left: Tensor, input: Tensor, grad_output: Tensor, weight: Tensor, center: Tensor | None = None
) -> Tensor:
    """Per sample, ``left[n] @ (weight * g_n - center)``: ``left`` ``[N, *, out]``, ``weight`` and
    ``center`` (optional) ``[out, in]``, result shaped like ``input`` ``[N, *, in]``. The
    vector-Jacobian product of the statistics."""
    return _ops.weighted_gradient_product(*promoted(left, input, grad_output, weight, center))


# The per-sample bias gradients b_n = sum_* grad_output[n] are [N, out]: a sum, not an outer
# product, small enough to hold; their statistics are plain differentiable torch reductions (the
# reference's), a few kernels where the outer-product ops with an input of ones took a dozen.
def _checked_bias_input(op: str, grad_output: Tensor) -> Tensor:
    (grad_output,) = promoted(grad_output)
    _checks.check_samples_pair(op, grad_output, "grad_output", grad_output, "grad_output")
    return grad_output


def bias_second_moment(grad_output: Tensor) -> Tensor:
    """``sum_n b_n ** 2`` for the per-sample bias gradients ``b_n = sum_* grad_output[n]``: ``[out_features]``."""
    return reference.bias_second_moment(_checked_bias_input("bias_second_moment", grad_output))


def bias_variance(grad_output: Tensor) -> Tensor:
    """Variance over samples of the per-sample bias gradients: ``[out_features]``, never negative."""
    return reference.bias_variance(_checked_bias_input("bias_variance", grad_output))


def bias_batch_l2(grad_output: Tensor) -> Tensor:
    """``||b_n||**2`` per sample for the per-sample bias gradients: ``[N]``."""
    return reference.bias_batch_l2(_checked_bias_input("bias_batch_l2", grad_output))
