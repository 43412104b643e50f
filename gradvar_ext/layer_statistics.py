"""A layer's statistics from the (input, grad_output) of its forward calls: the step between the
front end's hooks (``frontend.py``) and the ``gradvar`` ops.

:func:`layer_data` combines one layer's calls into what the ops take (a Linear layer's positions
concatenated; a conv layer's single call as it is, several calls as unfolded patches), with the
loss reduction's scale and half precision promoted; :func:`statistics` runs the op of each
statistic on it, for the weight and the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import conv_ops, ops


def describe(module: nn.Module) -> str:
    """A layer as errors name it: its type and weight shape."""
    return f"{type(module).__name__} {tuple(module.weight.shape)}"


def _variance(by_moments, variance_op):
    """Where a backward can follow, the variance through the moments op as one autograd node
    (same values; its backward needs no pass for the mean gradient). Otherwise the variance op
    itself (it finishes in place, no [out, in] temporaries)."""

    def variance(input: Tensor, grad_output: Tensor, **conv) -> Tensor:
        if not (torch.is_grad_enabled() and (input.requires_grad or grad_output.requires_grad)):
            return variance_op(input, grad_output, **conv)
        return by_moments(input, grad_output, **conv)

    return variance


def _bias_moments(grad_output: Tensor) -> tuple[Tensor, Tensor]:
    return ops.bias_second_moment(grad_output), grad_output.reshape(-1, grad_output.shape[-1]).sum(0)


_LINEAR = {
    "variance": _variance(ops.linear_variance_by_moments, ops.linear_variance),
    "sum_grad_squared": ops.linear_second_moment,
    "batch_l2": ops.linear_batch_l2,
    "_gradvar_moments": ops.linear_moments,
}
_BIAS = {
    "variance": ops.bias_variance,
    "sum_grad_squared": ops.bias_second_moment,
    "batch_l2": ops.bias_batch_l2,
    "_gradvar_moments": _bias_moments,
}
_CONV2D = {
    "variance": _variance(conv_ops.conv2d_variance_by_moments, conv_ops.conv2d_variance),
    "sum_grad_squared": conv_ops.conv2d_second_moment,
    "batch_l2": conv_ops.conv2d_batch_l2,
    "_gradvar_moments": conv_ops.conv2d_moments,
}


@dataclass
class LayerData:
    """What the ops need for one layer, all its calls combined.

    kind "linear": input [N, *, in], grad_output [N, *, out] of a single call as they are; of several
    calls [N, T, in] and [N, T, out], every call's positions concatenated, so the statistics are
    those of the total per-sample gradient. kind "conv": the single call's
    input and grad_output in Conv2d form. kind "patches" (a conv layer called several times):
    unfolded patches [N, groups, L, f] and grad_output [N, groups, L, C_out/groups], calls
    concatenated along L. bias_grad: what the bias statistics take, [N, *, out] with the per-sample
    bias gradient the sum over * (a Linear layer's grad_output itself; a conv's pixels summed).
    """

    kind: str
    input: Tensor
    grad_output: Tensor
    bias_grad: Tensor


def statistics(module: nn.Module, data: LayerData, savefields: list) -> list:
    """[(parameter, savefield, statistic)] of one layer, for each savefield (``p.variance`` and so
    on), of its trainable parameters."""
    results = []
    for name in savefields:
        if module.weight.requires_grad:
            results.append((module.weight, name, _weight_statistic(module, name, data)))
        if module.bias is not None and module.bias.requires_grad:
            results.append((module.bias, name, _BIAS[name](data.bias_grad)))
    return results


def _check_batched(module: nn.Module, x: Tensor) -> None:
    """Per-sample statistics need a batch dimension; PyTorch's layers also take one sample alone."""
    if isinstance(module, nn.Linear):
        if x.dim() >= 2:
            return
        shape = "[N, *, in_features]"
    elif x.dim() == (3 if isinstance(module, nn.Conv1d) else 4):
        return
    else:
        shape = "[N, C, L]" if isinstance(module, nn.Conv1d) else "[N, C, H, W]"
    raise ValueError(
        f"gradvar_ext.collect: {type(module).__name__} got an input of shape {list(x.shape)}, without a batch "
        f"dimension; per-sample statistics need a batch, {shape} (x.unsqueeze(0) for one sample)"
    )


def layer_data(module: nn.Module, calls: list, loss_reduction: str) -> LayerData:
    for x, _ in calls:
        _check_batched(module, x)
    sizes = [x.shape[0] for x, _ in calls]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"gradvar_ext.collect: {describe(module)} was called {len(calls)} times in one forward with batch sizes "
            f"{sizes}; the statistics of a layer used several times add its calls' gradients sample by sample, "
            "so every call needs the same batch"
        )
    scale = calls[0][0].shape[0] if loss_reduction == "mean" else 1
    calls = [ops.promoted(x, go) for x, go in calls]  # mixed precision: float32 statistics
    calls = [(x, go * scale if scale != 1 else go) for x, go in calls]
    if isinstance(module, nn.Linear):
        if len(calls) == 1:  # [N, *, in] as it is: the ops take any middle dims (no view nodes to differentiate)
            return LayerData("linear", calls[0][0], calls[0][1], calls[0][1])
        xs = _along_positions([x.reshape(x.shape[0], -1, x.shape[-1]) for x, _ in calls], 1)
        gos = _along_positions([go.reshape(go.shape[0], -1, go.shape[-1]) for _, go in calls], 1)
        return LayerData("linear", xs, gos, gos)
    as2d = [(x.unsqueeze(2), go.unsqueeze(2)) if isinstance(module, nn.Conv1d) else (x, go) for x, go in calls]
    bias_grads = [go.sum((2, 3)) for _, go in as2d]
    bias_grad = bias_grads[0] if len(bias_grads) == 1 else torch.stack(bias_grads).sum(0)
    if len(as2d) == 1:
        return LayerData("conv", as2d[0][0], as2d[0][1], bias_grad)
    patches, positions = zip(*(_unfolded(module, x, go) for x, go in as2d))
    return LayerData("patches", _along_positions(patches, 2), _along_positions(positions, 2), bias_grad)


def _along_positions(tensors: list, dim: int) -> Tensor:
    """Several calls' tensors side by side along the positions dim (one call: as it is, no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim)


def _conv2d_kwargs(module: nn.Module) -> dict:
    kwargs = conv_ops.conv2d_arguments_of(module)
    if isinstance(module, nn.Conv1d):  # as Conv2d over [N, C, 1, L]
        kwargs.update(
            kernel_size=(1, module.kernel_size[0]),
            stride=(1, module.stride[0]),
            dilation=(1, module.dilation[0]),
            padding=module.padding if isinstance(module.padding, str) else (0, module.padding[0]),
        )
    return kwargs


def _unfolded(module: nn.Module, x: Tensor, go: Tensor):
    """One call of a conv layer as per-group Linear factors: patches [N, groups, L, f], grad [N, groups, L, C_out/g]."""
    x, kernel, stride, padding, dilation, groups = conv_ops.conv2d_arguments(x, **_conv2d_kwargs(module))
    cols = torch.nn.functional.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    n, L = cols.shape[0], cols.shape[-1]
    patches = cols.reshape(n, groups, -1, L).transpose(2, 3)
    positions = go.reshape(n, groups, go.shape[1] // groups, L).transpose(2, 3)
    return patches, positions


def _weight_statistic(module: nn.Module, name: str, data: LayerData):
    """The statistic shaped like the weight (``[N]`` for batch_l2; a pair for the moments)."""
    if data.kind == "linear":
        return _LINEAR[name](data.input, data.grad_output)
    if data.kind == "conv":
        result = _CONV2D[name](data.input, data.grad_output, **_conv2d_kwargs(module))
    else:  # several calls: the Linear ops per group over the concatenated unfolded patches
        per_group = [_LINEAR[name](data.input[:, j], data.grad_output[:, j]) for j in range(data.input.shape[1])]
        if name == "batch_l2":
            return sum(per_group)
        pairs = isinstance(per_group[0], tuple)
        result = tuple(torch.cat(part, 0) for part in zip(*per_group)) if pairs else torch.cat(per_group, 0)
    if name == "batch_l2":
        return result
    if isinstance(result, tuple):
        return tuple(part.reshape(module.weight.shape) for part in result)
    return result.reshape(module.weight.shape)
