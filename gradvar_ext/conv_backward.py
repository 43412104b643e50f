"""An extended convolution's backward as a node of ours, whose own backward (create_graph) is lean.

Why: PyTorch records the backward of ``nn.Conv1d`` / ``nn.Conv2d`` as one ``convolution_backward``.
Differentiated (the gradient of the variance), ``_convolution_double_backward`` forms the
derivative of the input gradient w.r.t. the weight as a convolution of the batch-transposed
tensors with an output-sized kernel, on contiguous copies of both: on the benchmark CNN (2 CPU
cores, N = 64) 25.6 ms for the 32 -> 64 layer at 32x32, where its weight gradient takes ~7 ms, and
the step's peak memory (benchmarks/RESULTS.md).

How: the forward hook of an extended layer returns, in place of the conv's output, an alias of
it (same storage) made by :class:`_ConvolutionBackward`, a node of (input, weight, bias)
(PyTorch's node drops out of the graph that follows). Its backward gives the input
``conv_transpose(grad, weight)`` through a second node, :class:`_InputGradient`, whose own backward is two plain
backend calls (a convolution for ``grad``'s part, a weight gradient for the weight's: 6 + 7 ms
for that layer, where PyTorch's backward of ``conv_transpose2d`` took 27); the weight gets its
``convolution_backward`` (weight part only) and the bias ``grad.sum``, each only where this
backward pass executes the input's node, as PyTorch's nodes skip gradients nobody asked for
(``collect.backward`` asks for no weight gradient). Without ``create_graph`` there is nothing
to differentiate: it makes PyTorch's own single ``convolution_backward`` call where that computes
the weight's gradient whole (else an input-only call, the weight's slices and the bias's sum,
``_bias_gradient``). The benchmark CNN's job (b): 155 ms and 118 MB peak against 182 ms and 141
MB with PyTorch's node (job (a), first order: 1-2% slower, the node's Python cost).

Where: the output of an extended layer that is PyTorch's convolution of exactly the layer's input
(which requires grad: else there is no input gradient to differentiate), weight and bias
(``_convolution_of``), outside torch.func transforms, torch.compile and torch.jit tracing.
``GRADVAR_EXT_CONV_BACKWARD=pytorch`` keeps PyTorch's node (read at each forward);
``GRADVAR_EXT_CONV_WEIGHT_SAMPLES=k`` makes the node's weight gradients k samples a backend call;
``GRADVAR_EXT_CONV_WEIGHT_MIB=m`` slices of at most m MiB of operands, 8 by default on every
device, a bound on oneDNN's copies of them and cuDNN's workspaces (``_weight_call_samples``).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The autograd internals the nodes rely on (tested with PyTorch 2.13 and 2.14, and 2.11 on an
# H200); without them, PyTorch's nodes stay: the conv node's `_executes` needs
# _will_engine_execute_node, and plain_autograd() (every node) peek_interpreter_stack.
_INTERNALS = hasattr(torch._C, "_will_engine_execute_node")
_PEEK_INTERPRETER_STACK = getattr(torch._C._functorch, "peek_interpreter_stack", None)


def ours_chosen(variable: str) -> bool:
    """Whether the environment variable ``variable`` (read at each forward) leaves our node on:
    ``gradvar`` (the default) or ``pytorch`` (PyTorch's node)."""
    choice = os.environ.get(variable, "gradvar")
    if choice not in ("gradvar", "pytorch"):
        raise ValueError(f"gradvar_ext: {variable} must be 'gradvar' or 'pytorch', got {choice!r}")
    return choice == "gradvar"


def plain_autograd() -> bool:
    """Whether a Python autograd node may stand in for PyTorch's here: not under torch.compile,
    torch.jit tracing (a traced model must not call Python functions: torch.jit.save) or a
    torch.func transform (which a PyTorch without peek_interpreter_stack cannot tell: no)."""
    return (
        _PEEK_INTERPRETER_STACK is not None
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and _PEEK_INTERPRETER_STACK() is None
    )


def _convolution_of(output: Tensor, layer_input: Tensor, module: nn.Module) -> tuple | None:
    """(stride, padding, dilation, groups) where ``output`` is PyTorch's convolution of exactly
    ``layer_input`` with the layer's weight and bias, and nothing waits on its gradient yet; else
    None (an input padded first, as padding_mode != "zeros" and asymmetric 'same' do, a cast under
    autocast, a hook that changed the output or put a tensor hook on it: PyTorch's node stays)."""
    node = output.grad_fn  # a ConvolutionBackward0 (reroute asked)
    if output._backward_hooks or output.retains_grad:  # they stay with PyTorch's node: it must get the gradient
        return None
    try:  # the node's saved arguments: private attributes, which a later PyTorch may rename
        if node._saved_transposed:
            return None
        if node._saved_input is not layer_input or node._saved_weight is not module.weight:
            return None
        bias = module.bias if module.bias is not None and module.bias.requires_grad else None
        if getattr(node.next_functions[2][0], "variable", None) is not bias:  # its AccumulateGrad, or none
            return None
        return (tuple(node._saved_stride), tuple(node._saved_padding), tuple(node._saved_dilation), node._saved_groups)
    except AttributeError:
        return None


def reroute(module: nn.Module, layer_input, output: Tensor) -> Tensor:
    """In the forward hook: the layer's output to return, an alias of ``output`` with the backward
    of :class:`_ConvolutionBackward` where it applies, else ``output`` itself."""
    if (
        type(output.grad_fn).__name__ != "ConvolutionBackward0"  # a Linear layer's, first: host-bound models
        or type(layer_input) is not Tensor
        or not layer_input.requires_grad
        or not _INTERNALS
        or not plain_autograd()
        or not ours_chosen("GRADVAR_EXT_CONV_BACKWARD")
    ):
        return output
    conv = _convolution_of(output, layer_input, module)
    if conv is None:
        return output
    return _ConvolutionBackward.apply([output], layer_input, module.weight, module.bias, conv)


def _number_edges(ctx, *inputs) -> None:
    """The node's gradient edges are its tensor inputs' (a None bias has none): their positions."""
    ctx.edge_of = {i: k for k, i in enumerate(i for i, value in enumerate(inputs) if isinstance(value, Tensor))}


def _executes(ctx, index: int) -> bool:
    """Whether this backward pass needs the gradient of the node's input ``index`` (a leaf's, under
    ``autograd.grad``, which PyTorch cannot tell: taken as needed)."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[ctx.edge_of[index]][0]
    if node is None:
        return False
    try:
        return torch._C._will_engine_execute_node(node)
    except RuntimeError:  # "A leaf node was passed to _will_engine_execute_node ... autograd.grad()"
        return True


class _ConvolutionBackward(torch.autograd.Function):
    """The layer's output again (an alias: same storage, no copy) as a node of (input, weight,
    bias); backward: their gradients. The output comes boxed in a list, so that it is no input
    of the node: PyTorch's node is not in this graph."""

    @staticmethod
    def forward(ctx, boxed_output, layer_input, weight, bias, conv):
        ctx.save_for_backward(layer_input, weight)
        ctx.conv = conv
        _number_edges(ctx, boxed_output, layer_input, weight, bias)
        return boxed_output[0].detach()  # not a view: in-place ops on it are allowed

    @staticmethod
    def backward(ctx, grad):
        layer_input, weight = ctx.saved_tensors
        if not torch.is_grad_enabled():  # no create_graph: the backend's own calls, nothing to differentiate
            need = [_executes(ctx, i) for i in (1, 2, 3)]
            samples = _weight_call_samples(layer_input, grad)
            if need[1] and samples >= len(layer_input):
                return None, *_backend_backward(grad, layer_input, weight, ctx.conv, need), None
            # the weight's gradient in slices, or none: no backend call for the bias (oneDNN's
            # call for it computes the weight's gradient all the same, _bias_gradient)
            grad_input = (
                _backend_backward(grad, layer_input, weight, ctx.conv, [True, False, False])[0] if need[0] else None
            )
            grad_weight = _weight_gradient(layer_input, grad, weight, ctx.conv, samples) if need[1] else None
            return None, grad_input, grad_weight, _bias_gradient(grad) if need[2] else None, None
        grad_input = grad_weight = grad_bias = None
        if _executes(ctx, 1):
            grad_input = _InputGradient.apply(grad, weight, layer_input.shape, ctx.conv)
        if _executes(ctx, 2):
            grad_weight = _weight_gradient(layer_input, grad, weight, ctx.conv)
        if _executes(ctx, 3):
            grad_bias = _bias_gradient(grad)
        return None, grad_input, grad_weight, grad_bias, None


def _backend_backward(grad: Tensor, layer_input: Tensor, weight: Tensor, conv: tuple, need: list) -> tuple:
    """The backend's convolution backward (PyTorch's one call): (input, weight, bias) gradients
    where ``need`` says so, None elsewhere."""
    stride, padding, dilation, groups = conv
    bias_sizes = [weight.shape[0]] if need[2] else None
    return torch.ops.aten.convolution_backward(
        grad, layer_input, weight, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups, need
    )


def _bias_gradient(grad: Tensor) -> Tensor:
    """grad summed over the batch and the positions. Not the backend's: on the CPU oneDNN's
    convolution_backward computes a bias gradient only together with the weight's, and pays for
    that one even where it is not asked for (the benchmark CNN's 32 -> 64 layer at 32x32, N = 64,
    2 cores: input and bias 13.9 ms, the input alone 6.6, the bias alone 7.0 where this sum takes
    0.14; twenty-ninth session)."""
    return grad.sum([0, *range(2, grad.dim())])


# The operands (an input and an output gradient, sliced by sample) of one of the node's
# weight-gradient calls, by default. CPU: oneDNN reorders both into copies, so a whole-batch
# call held 24 MB of copies at the benchmark CNN's job (b) peak (the 32 -> 64 conv at 32x32, N =
# 64: 384 KiB a sample); in 8 MiB slices (21 samples), with the products' grouped chunks in 4 MiB
# (csrc/conv2d_ops.cpp, grouped_product_gradients), the peak fell 116.6 -> 111.0 MB at the same
# time, below the per-sample loop's 114.3 (benchmarks/RESULTS.md, twenty-fifth session). GPU: cuDNN
# runs that layer's weight gradient by FFT, with a workspace that grows with the batch; in 8 MiB
# slices the job's peak on an H100 fell 298.6 -> 254.5 MB (torch.func 268.4) for 11.99 -> 13.81 ms
# (torch.func 20.52; 32 MiB slices, i.e. the whole batch there: 298.6; twenty-eighth session), and
# with the no-grad path's call split too (an input-only call, the weight's slices, the bias's sum)
# to 156.8 MB at the same time (10.66 vs 11.55 ms, 3 rounds; the loop 114.4; CPU: 156.0 vs 172.2
# ms, the same 103.0 MB; thirtieth session).
WEIGHT_CALL_BYTES = 8 << 20


def _whole_number(name: str, meaning: str) -> int | None:
    """The environment variable ``name`` as a whole number (read at each call), None when unset."""
    flag = os.environ.get(name, "")
    if not flag:
        return None
    if not flag.isdigit():
        raise ValueError(f"gradvar_ext: {name} must be a whole number of {meaning} (0: the whole batch), got {flag!r}")
    return int(flag)


def _weight_call_samples(layer_input: Tensor, grad: Tensor) -> int:
    """Samples per backend call that computes the weight's gradient, in every such call (the
    no-grad path's too). ``GRADVAR_EXT_CONV_WEIGHT_SAMPLES=k``: k (0: the whole batch). Else as
    many as keep a call's operands (input and output gradient) within a budget on any device:
    ``GRADVAR_EXT_CONV_WEIGHT_MIB=m`` MiB (0: the whole batch), by default WEIGHT_CALL_BYTES."""
    samples = len(layer_input)
    k = _whole_number("GRADVAR_EXT_CONV_WEIGHT_SAMPLES", "samples")
    if k is not None:
        return samples if k == 0 else min(k, samples)
    mib = _whole_number("GRADVAR_EXT_CONV_WEIGHT_MIB", "MiB")
    budget = mib << 20 if mib is not None else WEIGHT_CALL_BYTES
    if budget == 0 or samples == 0:
        return samples
    per_sample = (layer_input[0].numel() + grad[0].numel()) * layer_input.element_size()
    return max(1, min(samples, budget // max(1, per_sample)))


def _weight_gradient(layer_input: Tensor, grad: Tensor, weight: Tensor, conv: tuple, k: int | None = None) -> Tensor:
    """sum_n over positions of grad x unfold(layer_input): the backend's weight gradient, in
    slices of k samples (default: _weight_call_samples) summed."""
    k = _weight_call_samples(layer_input, grad) if k is None else k
    parts = [
        _backend_backward(grad[s : s + k], layer_input[s : s + k], weight, conv, [False, True, False])[1]
        for s in range(0, len(layer_input), k)
    ]
    return sum(parts[1:], parts[0])


class _InputGradient(torch.autograd.Function):
    """conv_transpose(grad, weight): the input gradient. Its backward takes the two backend calls
    it needs, for upstream gradient u shaped like the input: d/d grad = conv(u, weight), d/d weight
    = the weight gradient of a convolution of u with output gradient grad."""

    @staticmethod
    def forward(ctx, grad, weight, input_shape, conv):
        ctx.save_for_backward(grad, weight)
        ctx.conv = conv
        _number_edges(ctx, grad, weight)
        stride, padding, dilation, groups = conv
        output_padding = tuple(  # input rows / columns that no output position reached
            size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
            for size, out, s, p, d, k in zip(
                input_shape[2:], grad.shape[2:], stride, padding, dilation, weight.shape[2:]
            )
        )
        transposed = F.conv_transpose2d if weight.dim() == 4 else F.conv_transpose1d
        return transposed(grad, weight, None, stride, padding, output_padding, groups, dilation)

    @staticmethod
    def backward(ctx, upstream):
        grad, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_grad = grad_weight = None
        if _executes(ctx, 0):
            forward = F.conv2d if weight.dim() == 4 else F.conv1d
            grad_grad = forward(upstream, weight, None, stride, padding, dilation, groups)
        if _executes(ctx, 1):
            grad_weight = _weight_gradient(upstream, grad, weight, ctx.conv)
        return grad_grad, grad_weight, None, None
