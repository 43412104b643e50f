"""Argument checks for the Python paths (fake kernels, reference kernels, package functions).

Mirrors ``csrc/checks.h``: messages start with ``gradvar.<op>: `` and name the argument;
shape problems raise ValueError, dtype problems TypeError.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def fail(op: str, message: str, kind: type[Exception] = ValueError) -> None:
    raise kind(f"gradvar.{op}: {message}")


def check_float_like(op: str, t: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    if t.dtype not in FLOAT_DTYPES:
        hint = " (the gradvar_ext.* functions and the front end promote it to float32)"
        low = t.dtype in (torch.float16, torch.bfloat16)
        fail(op, f"{name} must be float32 or float64, got {t.dtype}{hint if low else ''}", TypeError)
    if t.dtype != like.dtype:
        fail(op, f"{name} has dtype {t.dtype} but {like_name} has dtype {like.dtype}", TypeError)
    if t.device != like.device:
        fail(op, f"{name} is on {t.device} but {like_name} is on {like.device}")


def check_same_batch(op: str, input: torch.Tensor, input_name: str, grad_output: torch.Tensor, grad_name: str) -> None:
    """The same number of samples N > 0 in dim 0."""
    if grad_output.shape[0] != input.shape[0]:
        fail(
            op,
            f"batch size (dim 0) of {grad_name} ({grad_output.shape[0]}) "
            f"does not match {input_name} ({input.shape[0]})",
        )
    if input.shape[0] == 0:
        fail(op, f"{input_name} has an empty batch (N = 0)")


def check_samples_pair(
    op: str, input: torch.Tensor, input_name: str, grad_output: torch.Tensor, grad_name: str
) -> None:
    """``input`` [N, *, in] and ``grad_output`` [N, *, out]: same rank >= 2, same N > 0, same middle dims."""
    if input.dim() < 2:
        fail(op, f"{input_name} must have shape [N, *, features] (at least 2 dims), got shape {list(input.shape)}")
    if grad_output.dim() != input.dim():
        fail(
            op,
            f"{grad_name} must have the same number of dims as {input_name} ([N, *, features]), "
            f"got shapes {list(grad_output.shape)} and {list(input.shape)}",
        )
    check_same_batch(op, input, input_name, grad_output, grad_name)
    if grad_output.shape[1:-1] != input.shape[1:-1]:
        fail(
            op,
            f"middle dims of {grad_name} {list(grad_output.shape)} "
            f"do not match those of {input_name} {list(input.shape)}",
        )
    check_float_like(op, input, input_name, input, input_name)
    check_float_like(op, grad_output, grad_name, input, input_name)


def check_same_shape(op: str, t: torch.Tensor, name: str, like: torch.Tensor, like_name: str) -> None:
    if t.shape != like.shape:
        fail(op, f"{name} must have the shape of {like_name} {list(like.shape)}, got {list(t.shape)}")


def check_pair_like(op: str, x, x_name: str, g, g_name: str, input, grad_output) -> None:
    """A second (input, grad_output) pair of an op: shaped like input / grad_output, float like input."""
    check_same_shape(op, x, x_name, input, "input")
    check_same_shape(op, g, g_name, grad_output, "grad_output")
    check_float_like(op, x, x_name, input, "input")
    check_float_like(op, g, g_name, input, "input")


def check_cross_moment(op: str, input, grad_output, other_input, other_grad_output) -> None:
    check_samples_pair(op, input, "input", grad_output, "grad_output")
    check_pair_like(op, other_input, "other_input", other_grad_output, "other_grad_output", input, grad_output)


def check_weighted_gradient_product(op: str, left, input, grad_output, weight, center=None) -> None:
    check_samples_pair(op, input, "input", grad_output, "grad_output")
    check_same_shape(op, left, "left", grad_output, "grad_output")
    check_float_like(op, left, "left", input, "input")
    _check_linear_weights(op, input, grad_output, weight, center)


def _check_linear_weights(op: str, input, grad_output, weight, center) -> None:
    expected = [grad_output.shape[-1], input.shape[-1]]
    for t, name in ((weight, "weight"), (center, "center")):
        if t is None:
            continue
        if t.dim() != 2 or list(t.shape) != expected:
            fail(op, f"{name} must have shape [out, in] = {expected}, got {list(t.shape)}")
        check_float_like(op, t, name, input, "input")


def check_weighted_gradient_products(op: str, left_grad_output, left_input, input, grad_output, weight, center):
    check_samples_pair(op, input, "input", grad_output, "grad_output")
    check_pair_like(op, left_input, "left_input", left_grad_output, "left_grad_output", input, grad_output)
    _check_linear_weights(op, input, grad_output, weight, center)


def check_conv(op: str, input, input_name, grad_output, grad_name, kernel_size, stride, padding, dilation, groups):
    """Mirror of csrc/conv2d_ops.cpp's check_conv; returns the weight shape [C_out, C_in/groups, kh, kw]."""
    for values, name, minimum in (
        (kernel_size, "kernel_size", 1),
        (stride, "stride", 1),
        (padding, "padding", 0),
        (dilation, "dilation", 1),
    ):
        if len(values) != 2:
            fail(op, f"{name} must have 2 values (height, width), got {list(values)}")
        if min(values) < minimum:
            fail(op, f"{name} must be >= {minimum}, got {list(values)}")
    if groups < 1:
        fail(op, f"groups must be >= 1, got {groups}")
    if input.dim() != 4:
        fail(op, f"{input_name} must have shape [N, C_in, H, W], got shape {list(input.shape)}")
    if grad_output.dim() != 4:
        fail(op, f"{grad_name} must have shape [N, C_out, H_out, W_out], got shape {list(grad_output.shape)}")
    check_same_batch(op, input, input_name, grad_output, grad_name)
    for t, name in ((input, input_name), (grad_output, grad_name)):
        if t.shape[1] % groups:
            fail(op, f"{name} has {t.shape[1]} channels, not divisible by groups = {groups}")
    check_float_like(op, input, input_name, input, input_name)
    check_float_like(op, grad_output, grad_name, input, input_name)
    expected = []
    for d in range(2):
        span = dilation[d] * (kernel_size[d] - 1) + 1
        padded = input.shape[2 + d] + 2 * padding[d]
        if padded < span:
            fail(
                op,
                f"{input_name} spatial size {list(input.shape[2:])} with padding {list(padding)} is smaller than "
                f"the dilated kernel ({list(kernel_size)}, dilation {list(dilation)})",
            )
        expected.append((padded - span) // stride[d] + 1)
    if list(grad_output.shape[2:]) != expected:
        fail(
            op,
            f"{grad_name} has spatial size {list(grad_output.shape[2:])} but {input_name} {list(input.shape[2:])} "
            f"with kernel_size {list(kernel_size)}, stride {list(stride)}, padding {list(padding)}, "
            f"dilation {list(dilation)} gives {expected}",
        )
    return [grad_output.shape[1], input.shape[1] // groups, kernel_size[0], kernel_size[1]]


def check_conv_cross_moment(op, input, grad_output, other_input, other_grad_output, *conv):
    shape = check_conv(op, input, "input", grad_output, "grad_output", *conv)
    check_pair_like(op, other_input, "other_input", other_grad_output, "other_grad_output", input, grad_output)
    return shape


def check_conv_weighted_gradient_product(op, left, input, grad_output, weight, *conv, to_input, center=None):
    shape = check_conv(op, input, "input", grad_output, "grad_output", *conv)
    if to_input:
        check_same_shape(op, left, "left (to_input=True)", grad_output, "grad_output")
    else:
        check_same_shape(op, left, "left (to_input=False)", input, "input")
    check_float_like(op, left, "left", input, "input")
    check_conv_weight(op, weight, input, shape)
    check_conv_center(op, center, weight, input)


def check_conv_center(op, center, weight, input) -> None:
    if center is not None:
        if list(center.shape) != list(weight.shape):
            fail(op, f"center must have the weight's shape {list(weight.shape)}, got {list(center.shape)}")
        check_float_like(op, center, "center", input, "input")


def check_conv_weight(op, weight, input, shape) -> None:
    if list(weight.shape) != shape:
        fail(op, f"weight must have the conv weight's shape {shape}, got {list(weight.shape)}")
    check_float_like(op, weight, "weight", input, "input")


def check_conv_weighted_gradient_products(op, left_grad_output, left_input, input, grad_output, weight, center, *conv):
    shape = check_conv(op, input, "input", grad_output, "grad_output", *conv)
    check_conv_center(op, center, weight, input)
    check_pair_like(op, left_input, "left_input", left_grad_output, "left_grad_output", input, grad_output)
    check_conv_weight(op, weight, input, shape)
