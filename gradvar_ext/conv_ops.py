"""Conv2d (and Conv1d) statistics: fake kernels, autograd formulas and the documented functions.

The backward formulas mirror the Linear ones (see ``ops.py``) with two conv ops closing the family:

    conv2d_cross_moment(x, go, xb, gob)             = sum_n g_n * h_n
    conv2d_weighted_gradient_product(left, x, go, W, to_input)
        to_input:     fold(left_n (W * g_n))      (left like grad_output; the result like input)
        not to_input: unfold(left)_n (W * g_n)^T  (left like input; the result like grad_output)

with ``g_n`` the per-sample weight gradient from ``(x, go)``. Hyper-parameters in the ops are
explicit ``int[2]``; the public functions also take ints, ``'same'`` / ``'valid'`` and a
``padding_mode``, like ``nn.Conv2d``, and resolve them first (:func:`conv2d_arguments`).
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _checks, ops

_ops = torch.ops.gradvar
IntOrPair = Union[int, tuple[int, int], list[int]]
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(value, name: str, op: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    _checks.fail(op, f"{name} must be an int or a pair of ints, got {value!r}")


# ---------------------------------------------------------------- fake kernels
def _fake_statistic(op: str):
    def fake(input, grad_output, kernel_size, stride, padding, dilation, groups):
        shape = _checks.check_conv(
            op, input, "input", grad_output, "grad_output", kernel_size, stride, padding, dilation, groups
        )
        if op == "conv2d_moments":
            return input.new_empty(shape), input.new_empty(shape)
        return input.new_empty((input.shape[0],) if op == "conv2d_batch_l2" else shape)

    return fake


for _op in ("conv2d_second_moment", "conv2d_variance", "conv2d_moments", "conv2d_batch_l2"):
    torch.library.register_fake(f"gradvar::{_op}")(_fake_statistic(_op))


@torch.library.register_fake("gradvar::conv2d_cross_moment")
def _(input, grad_output, other_input, other_grad_output, *conv):
    shape = _checks.check_conv_cross_moment(
        "conv2d_cross_moment", input, grad_output, other_input, other_grad_output, *conv
    )
    return input.new_empty(shape)


@torch.library.register_fake("gradvar::conv2d_weighted_gradient_product")
def _(left, input, grad_output, weight, kernel_size, stride, padding, dilation, groups, to_input, center=None):
    conv = (kernel_size, stride, padding, dilation, groups)
    _checks.check_conv_weighted_gradient_product(
        "conv2d_weighted_gradient_product", left, input, grad_output, weight, *conv, to_input=to_input, center=center
    )
    return input.new_empty(input.shape if to_input else grad_output.shape)


@torch.library.register_fake("gradvar::conv2d_weighted_gradient_products")
def _(left_grad_output, left_input, input, grad_output, weight, center, *conv):
    _checks.check_conv_weighted_gradient_products(
        "conv2d_weighted_gradient_products", left_grad_output, left_input, input, grad_output, weight, center, *conv
    )
    return input.new_empty(input.shape), input.new_empty(grad_output.shape)


# ---------------------------------------------------------------- autograd
def _saver(n_tensors: int):
    """setup_context for an op whose first n_tensors arguments are tensors (or None), then the conv."""

    def save(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs[:n_tensors])
        ctx.conv = tuple(inputs[n_tensors : n_tensors + 5])  # kernel_size, stride, padding, dilation, groups

    return save


def _save_product(ctx, inputs, output) -> None:
    """setup_context of conv2d_weighted_gradient_product(left, x, go, weight, *conv, to_input, center)."""
    left, x, go, weight, *conv, to_input, center = inputs
    ctx.save_for_backward(left, x, go, weight, center)
    ctx.conv, ctx.to_input = tuple(conv), to_input


def _wgp(left, x, go, weight, conv, to_input, center=None):
    return _ops.conv2d_weighted_gradient_product(left, x, go, weight, *conv, to_input, center)


def _no_grads_for(conv, flags=()):
    return (None,) * (len(conv) + len(flags))


def _both_products(x, go, weight, conv, need, center=None):
    """fold(go_n (W * g_n - C)) and unfold(x)_n (W * g_n - C)^T, as needed: one pass when both are."""
    if need[0] and need[1]:
        return _ops.conv2d_weighted_gradient_products(go, x, x, go, weight, center, *conv)
    to_x = _wgp(go, x, go, weight, conv, True, center) if need[0] else None
    to_go = _wgp(x, x, go, weight, conv, False, center) if need[1] else None
    return to_x, to_go


def _second_moment_backward(ctx, grad):
    x, go = ctx.saved_tensors
    to_x, to_go = _both_products(x, go, ops.scaled(grad, 2), ctx.conv, ctx.needs_input_grad)
    return (to_x, to_go, *_no_grads_for(ctx.conv))


def _variance_backward(ctx, grad):
    # variance = S / N - M^2 with M the mean weight gradient: per sample the upstream weight is
    # (2/N) W * (g_n - M), i.e. the weighted products with center (2/N) W * M.
    x, go = ctx.saved_tensors
    conv = ctx.conv
    n = x.shape[0]
    mean = torch.nn.grad.conv2d_weight(x, grad.shape, go, *conv[1:4], conv[4]) / n
    weight = ops.scaled(grad, 2 / n)  # scale the [C_out, ...] weight, not the input-sized results
    grad_x, grad_go = _both_products(x, go, weight, conv, ctx.needs_input_grad, center=weight * mean)
    return (grad_x, grad_go, *_no_grads_for(conv))


def _moments_backward(ctx, grad_moment, grad_sum):
    # L = <A, sum_n g_n^2> + <B, sum_n g_n>: h_n = 2 A * g_n + B, the products with center -B (no mean pass).
    x, go = ctx.saved_tensors
    conv = ctx.conv
    weight = ops.scaled(grad_moment, 2) if grad_moment is not None else x.new_zeros(_weight_shape(x, go, conv))
    center = None if grad_sum is None else -grad_sum
    to_x, to_go = _both_products(x, go, weight, conv, ctx.needs_input_grad, center=center)
    return (to_x, to_go, *_no_grads_for(conv))


def _weight_shape(x, go, conv):
    return (go.shape[1], x.shape[1] // conv[4], *conv[0])


def _batch_l2_backward(ctx, grad):
    x, go = ctx.saved_tensors
    need, conv = ctx.needs_input_grad, ctx.conv
    ones = x.new_ones(()).expand(_weight_shape(x, go, conv))  # one value: no GEMM with it where T = 1
    w = grad.reshape(-1, 1, 1, 1)
    grad_x = 2 * _wgp(w * go, x, go, ones, conv, True) if need[0] else None
    grad_go = 2 * _wgp(w * x, x, go, ones, conv, False) if need[1] else None
    return (grad_x, grad_go, *_no_grads_for(conv))


def _cross_moment_backward(ctx, grad):
    x, go, xb, gob = ctx.saved_tensors
    need, conv = ctx.needs_input_grad, ctx.conv
    return (
        _wgp(go, xb, gob, grad, conv, True) if need[0] else None,
        _wgp(x, xb, gob, grad, conv, False) if need[1] else None,
        _wgp(gob, x, go, grad, conv, True) if need[2] else None,
        _wgp(xb, x, go, grad, conv, False) if need[3] else None,
        *_no_grads_for(conv),
    )


def _product_vjp(left, x, go, weight, center, conv, to_input, grad, need):
    """Gradients w.r.t. (left, x, go, weight, center) of <grad, conv2d_weighted_gradient_product(left, x,
    go, weight, to_input, center)>, written with the library's conv ops; None where need is False.
    With h_n = W * g_n - C, the center's own gradient is -(the weight gradient of a conv from
    left to grad, or from grad to left)."""
    cross = _ops.conv2d_cross_moment
    to_center = None
    if to_input:  # grad is shaped like x
        if center is not None and need[4]:
            to_center = -torch.nn.grad.conv2d_weight(grad, center.shape, left, *conv[1:4], conv[4])
        return (
            _wgp(grad, x, go, weight, conv, False, center) if need[0] else None,
            _wgp(go, grad, left, weight, conv, True) if need[1] else None,
            _wgp(x, grad, left, weight, conv, False) if need[2] else None,
            cross(grad, left, x, go, *conv) if need[3] else None,
            to_center,
        )
    if center is not None and need[4]:  # grad is shaped like go
        to_center = -torch.nn.grad.conv2d_weight(left, center.shape, grad, *conv[1:4], conv[4])
    return (
        _wgp(grad, x, go, weight, conv, True, center) if need[0] else None,
        _wgp(go, left, grad, weight, conv, True) if need[1] else None,
        _wgp(x, left, grad, weight, conv, False) if need[2] else None,
        cross(left, grad, x, go, *conv) if need[3] else None,
        to_center,
    )


def _weighted_gradient_product_backward(ctx, grad):
    left, x, go, weight, center = ctx.saved_tensors
    grads = _product_vjp(
        left,
        x,
        go,
        weight,
        center,
        ctx.conv,
        ctx.to_input,
        grad,
        ctx.needs_input_grad[:4] + (ctx.needs_input_grad[-1],),
    )
    return (*grads[:4], *_no_grads_for(ctx.conv, (ctx.to_input,)), grads[4])


def _weighted_gradient_products_backward(ctx, grad_to_x, grad_to_go):
    # The two single products' backwards, summed: (to_input with left_grad_output, to grad_output
    # with left_input), both with h_n = W * g_n - C.
    left_go, left_x, x, go, weight, center = ctx.saved_tensors
    need, conv = ctx.needs_input_grad, ctx.conv
    grads = [None] * 6

    def add(indices, values):
        for i, value in zip(indices, values):
            if value is not None:
                grads[i] = value if grads[i] is None else grads[i] + value

    for grad, left, to_input, order in (
        (grad_to_x, left_go, True, (0, 2, 3, 4, 5)),
        (grad_to_go, left_x, False, (1, 2, 3, 4, 5)),
    ):
        if grad is not None:
            add(order, _product_vjp(left, x, go, weight, center, conv, to_input, grad, [need[i] for i in order]))
    return (*grads, *_no_grads_for(conv))


for _name, _backward, _tensor_args in (
    ("conv2d_second_moment", _second_moment_backward, 2),
    ("conv2d_variance", _variance_backward, 2),
    ("conv2d_moments", _moments_backward, 2),
    ("conv2d_batch_l2", _batch_l2_backward, 2),
    ("conv2d_cross_moment", _cross_moment_backward, 4),
    ("conv2d_weighted_gradient_products", _weighted_gradient_products_backward, 6),
):
    torch.library.register_autograd(f"gradvar::{_name}", _backward, setup_context=_saver(_tensor_args))
torch.library.register_autograd(
    "gradvar::conv2d_weighted_gradient_product", _weighted_gradient_product_backward, setup_context=_save_product
)


# ---------------------------------------------------------------- argument resolution
def conv2d_arguments(
    input: Tensor,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair | str = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    op: str = "conv2d_arguments",
) -> tuple[Tensor, tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], int]:
    """Resolve ``nn.Conv2d``-style hyper-parameters into the ops' explicit form.

    Returns ``(input, kernel_size, stride, padding, dilation, groups)``. Where ``nn.Conv2d`` pads
    the input itself (``padding='same'`` with an asymmetric total, or a ``padding_mode`` other than
    ``'zeros'``), the returned input is padded the same way and the returned padding is 0.
    """
    kernel_size, stride, dilation = (
        _pair(v, n, op) for v, n in ((kernel_size, "kernel_size"), (stride, "stride"), (dilation, "dilation"))
    )
    if padding_mode not in _PADDING_MODES:
        _checks.fail(op, f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0), (0, 0)]
        elif padding == "same":
            if stride != (1, 1):
                _checks.fail(op, f"padding='same' needs stride 1 (as in nn.Conv2d), got stride {list(stride)}")
            totals = [dilation[d] * (kernel_size[d] - 1) for d in range(2)]
            pads = [(t // 2, t - t // 2) for t in totals]  # nn.Conv2d puts the odd pixel at the end
        else:
            _checks.fail(op, f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    else:
        pairs = _pair(padding, "padding", op)
        pads = [(p, p) for p in pairs]
    if padding_mode == "zeros" and all(a == b for a, b in pads):
        return input, kernel_size, stride, (pads[0][0], pads[1][0]), dilation, groups
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = F.pad(input, (pads[1][0], pads[1][1], pads[0][0], pads[0][1]), mode=mode)
    return padded, kernel_size, stride, (0, 0), dilation, groups


def conv2d_arguments_of(module: nn.Conv2d) -> dict:
    """The hyper-parameters of an ``nn.Conv2d`` as keyword arguments of the ``conv2d_*`` functions."""
    return {
        "kernel_size": module.kernel_size,
        "stride": module.stride,
        "padding": module.padding,
        "dilation": module.dilation,
        "groups": module.groups,
        "padding_mode": module.padding_mode,
    }


# ---------------------------------------------------------------- public functions
_CONV2D_ARGS = """

    Args:
        input: the layer's input ``[N, C_in, H, W]``.
        grad_output: gradient of the loss w.r.t. the layer's output ``[N, C_out, H_out, W_out]``.
        kernel_size, stride, padding, dilation, groups, padding_mode: as in ``nn.Conv2d``
            (``padding`` may be ``'same'`` or ``'valid'``); ``conv2d_arguments_of(module)`` gives them.

    Differentiable (any order) w.r.t. ``input`` and ``grad_output``.
    """


def _conv2d_function(op: str, summary: str, name: str | None = None, compute=None):
    """One documented function per Conv2d statistic: resolve nn.Conv2d-style arguments, call the op
    (or ``compute(x, grad_output, conv)``; errors are named after ``op`` either way)."""

    def statistic(
        input: Tensor,
        grad_output: Tensor,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair | str = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> Tensor | tuple[Tensor, Tensor]:
        input, grad_output = ops.promoted(input, grad_output)
        x, *conv = conv2d_arguments(input, kernel_size, stride, padding, dilation, groups, padding_mode, op=op)
        return compute(x, grad_output, conv) if compute else getattr(_ops, op)(x, grad_output, *conv)

    statistic.__name__ = statistic.__qualname__ = name or op
    statistic.__doc__ = summary + _CONV2D_ARGS
    return statistic


conv2d_second_moment = _conv2d_function(
    "conv2d_second_moment",
    "Sum over samples of the squared per-sample Conv2d weight gradients, ``[C_out, C_in/groups, kh, kw]``.",
)
conv2d_variance = _conv2d_function(
    "conv2d_variance",
    "Variance over samples of the per-sample Conv2d weight gradients (BackPACK's ``Variance``), "
    "``[C_out, C_in/groups, kh, kw]``, never negative.",
)
conv2d_moments = _conv2d_function(
    "conv2d_moments",
    "``(sum_n g_n**2, sum_n g_n)`` of the per-sample Conv2d weight gradients in one pass, each "
    "``[C_out, C_in/groups, kh, kw]``: the variance's parts (``ops.variance_from_moments``), with a "
    "backward that needs no extra pass for the mean.",
)
conv2d_batch_l2 = _conv2d_function(
    "conv2d_batch_l2", "``||g_n||**2`` of each sample's Conv2d weight gradient, ``[N]``."
)


def _variance_by_moments(x: Tensor, grad_output: Tensor, conv: list) -> Tensor:
    return ops.variance_by_moments(
        x,
        grad_output,
        lambda x, go: _ops.conv2d_moments(x, go, *conv),
        lambda x, go, weight, center, need: _both_products(x, go, weight, conv, need, center=center),
    )


conv2d_variance_by_moments = _conv2d_function(
    "conv2d_variance",
    ":func:`conv2d_variance`'s values through :func:`ops.variance_by_moments`: a single-pass "
    "backward (no pass for the mean) from a single autograd node. For a front end.",
    name="conv2d_variance_by_moments",
    compute=_variance_by_moments,
)


def _conv_bias_function(op: str, linear_bias_statistic, summary: str):
    """The per-sample bias gradient of a conv is grad_output summed over positions: the Linear bias
    statistics of grad_output viewed as [N, H_out * W_out, C_out]."""

    def statistic(grad_output: Tensor) -> Tensor:
        if not isinstance(grad_output, Tensor) or grad_output.dim() != 4:
            shape = list(grad_output.shape) if isinstance(grad_output, Tensor) else type(grad_output).__name__
            _checks.fail(op, f"grad_output must have shape [N, C_out, H_out, W_out], got {shape}")
        return linear_bias_statistic(grad_output.flatten(2).transpose(1, 2))

    statistic.__name__ = statistic.__qualname__ = op
    statistic.__doc__ = summary + " ``b_n = grad_output[n].sum((1, 2))``; ``grad_output`` ``[N, C_out, H_out, W_out]``."
    return statistic


conv2d_bias_second_moment = _conv_bias_function(
    "conv2d_bias_second_moment",
    ops.bias_second_moment,
    "``sum_n b_n**2`` of the per-sample bias gradients, ``[C_out]``:",
)
conv2d_bias_variance = _conv_bias_function(
    "conv2d_bias_variance", ops.bias_variance, "Variance over samples of the per-sample bias gradients, ``[C_out]``:"
)
conv2d_bias_batch_l2 = _conv_bias_function(
    "conv2d_bias_batch_l2", ops.bias_batch_l2, "``||b_n||**2`` per sample of the per-sample bias gradients, ``[N]``:"
)


# ---------------------------------------------------------------- Conv1d: Conv2d with H = 1
def _as_conv2d(op, input, grad_output, kernel_size, stride, padding, dilation):
    if input.dim() != 3 or grad_output.dim() != 3:
        _checks.fail(
            op,
            f"input and grad_output must have shape [N, C, L], got {list(input.shape)} and {list(grad_output.shape)}",
        )
    k, s, d = (
        _single(v, name, op) for v, name in ((kernel_size, "kernel_size"), (stride, "stride"), (dilation, "dilation"))
    )
    pad = padding if isinstance(padding, str) else (0, _single(padding, "padding", op))
    return input.unsqueeze(2), grad_output.unsqueeze(2), (1, k), (1, s), pad, (1, d)


def _single(value, name: str, op: str) -> int:
    """A Conv1d hyper-parameter: an int or a 1-tuple of one (nn.Conv1d stores them so)."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    _checks.fail(op, f"{name} must be an int or a 1-tuple of ints (Conv1d), got {value!r}")


def _conv1d_function(op: str, conv2d_statistic):
    def statistic(
        input: Tensor,
        grad_output: Tensor,
        kernel_size: int | tuple[int],
        stride: int | tuple[int] = 1,
        padding: int | tuple[int] | str = 0,
        dilation: int | tuple[int] = 1,
        groups: int = 1,
        padding_mode: str = "zeros",
    ) -> Tensor:
        x, go, *conv = _as_conv2d(op, input, grad_output, kernel_size, stride, padding, dilation)
        result = conv2d_statistic(x, go, *conv, groups, padding_mode)
        return result if op.endswith("batch_l2") else result.squeeze(2)

    statistic.__name__ = statistic.__qualname__ = op
    statistic.__doc__ = (
        f"Conv1d version of :func:`{conv2d_statistic.__name__}`: ``input`` ``[N, C_in, L]``, ``grad_output`` "
        "``[N, C_out, L_out]``, arguments as in ``nn.Conv1d``; weight-shaped results are ``[C_out, C_in/groups, k]``."
    )
    return statistic


conv1d_second_moment = _conv1d_function("conv1d_second_moment", conv2d_second_moment)
conv1d_variance = _conv1d_function("conv1d_variance", conv2d_variance)
conv1d_batch_l2 = _conv1d_function("conv1d_batch_l2", conv2d_batch_l2)
