"""An extended model's ``nn.ReLU`` and ``nn.MaxPool2d`` backward as nodes of ours, whose own
backward forms no zeros.

Why: both layers are piecewise linear: their backward routes the gradient by a pattern that is
constant near almost every input (ReLU's mask, max pooling's indices). PyTorch records it as
``threshold_backward(grad, result, 0)`` (the saved ``result`` is the ReLU's output) and
``max_pool2d_with_indices_backward(grad, self, ..., indices)`` (``self`` its input). Differentiated
again (the gradient of the variance, a double backward), their derivative w.r.t. that saved
tensor is ``zeros_like``: a tensor of zeros the size of the activation, which autograd carries
back through the graph of the forward (the layers before it, their weight gradients) to add
exact zeros to the parameters' gradients. On the benchmark CNN's job (b) (2 CPU cores, N = 64)
the ReLUs' zeros were 8 MB of the 111 MB peak, and with ``.grad`` (``loss.backward(create_graph=
True)``) the max pooling's 16 MB set the peak (benchmarks/RESULTS.md, twenty-sixth session).

How: as ``conv_backward.py`` does for convolutions, the forward hook that ``extend`` puts on each
of these layers returns, in place of its output, an alias of it (same storage, no copy) made by
a node of ours of the layer's input only, which saves detached aliases of what PyTorch's node
saves: its backward is the same one kernel, with the saved tensor outside the graph, so a double
backward differentiates it w.r.t. ``grad`` alone. The second derivative the zeros stood for is 0
wherever it is defined: the gradients are the same values, to any order.

Where: an ``nn.ReLU`` that is not in-place, an ``nn.MaxPool2d`` without ``return_indices``, whose
output is PyTorch's op of exactly the layer's input (which requires grad) and carries no tensor
hook, outside torch.func transforms, torch.compile and torch.jit tracing, and whose zeros would
take at least ``MIN_ZEROS_BYTES`` (the ReLU's output, the pooling's input).
``GRADVAR_EXT_PIECEWISE_BACKWARD=pytorch`` keeps PyTorch's nodes (read at each forward).
``torch.nn.functional`` calls in a model's own ``forward`` are no modules: they keep PyTorch's
nodes. Cost: the nodes' Python time, forward and backward, which a first-order backward (no
double backward to save) pays for nothing: 2-4% of the benchmark CNN's job (a).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

PIECEWISE = (nn.ReLU, nn.MaxPool2d)

# Below this size of the zeros PyTorch's node would form, the node's Python time costs more than
# the zeros: the seed's MNIST CNN (its ReLU's output 368 KB, N = 32; 2 CPU cores) took 11% longer
# for job (a) and 3% for job (b) with both its layers rerouted (twenty-sixth session).
MIN_ZEROS_BYTES = 1 << 20


def _enabled() -> bool:
    choice = os.environ.get("GRADVAR_EXT_PIECEWISE_BACKWARD", "gradvar")
    if choice not in ("gradvar", "pytorch"):
        raise ValueError(f"gradvar_ext: GRADVAR_EXT_PIECEWISE_BACKWARD must be 'gradvar' or 'pytorch', got {choice!r}")
    return choice == "gradvar"


def _of_input(output: Tensor, layer_input: Tensor, node_name: str) -> bool:
    """Whether ``output`` is PyTorch's op ``node_name`` of exactly ``layer_input`` (not of
    something a hook made of it) and nothing waits on its gradient yet."""
    node = output.grad_fn
    if type(node).__name__ != node_name or output._backward_hooks or output.retains_grad:
        return False
    edge = torch.autograd.graph.get_gradient_edge(layer_input)
    return node.next_functions[0] == (edge.node, edge.output_nr)


def _max_pool_of(output: Tensor, layer_input: Tensor) -> tuple | None:
    """(indices, kernel_size, stride, padding, dilation, ceil_mode) of PyTorch's max pooling of
    ``layer_input`` that made ``output``, from its node's saved arguments; else None."""
    if not _of_input(output, layer_input, "MaxPool2DWithIndicesBackward0"):
        return None
    node = output.grad_fn
    try:  # private attributes, which a later PyTorch may rename: then PyTorch's node stays
        if node._saved_self is not layer_input:
            return None
        return (
            node._saved_result1,
            list(node._saved_kernel_size),
            list(node._saved_stride),
            list(node._saved_padding),
            list(node._saved_dilation),
            bool(node._saved_ceil_mode),
        )
    except AttributeError:
        return None


def reroute(module: nn.Module, layer_input, output) -> Tensor | None:
    """In the forward hook of an ``nn.ReLU`` or ``nn.MaxPool2d``: the output to return, an alias
    of ``output`` with our node's backward where it applies, else None (the output as it is)."""
    if (
        type(output) is not Tensor  # MaxPool2d(return_indices=True): a tuple
        or type(layer_input) is not Tensor
        or not (layer_input.requires_grad and torch.is_grad_enabled())
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()  # a traced model must not call Python functions (torch.jit.save)
        or torch._C._functorch.peek_interpreter_stack() is not None
        or not _enabled()
    ):
        return None
    zeros = output if isinstance(module, nn.ReLU) else layer_input  # what PyTorch's node differentiates
    if zeros.numel() * zeros.element_size() < MIN_ZEROS_BYTES:
        return None
    if isinstance(module, nn.ReLU):  # in place: its output is its input, changed; PyTorch's node stays
        if module.inplace or not _of_input(output, layer_input, "ReluBackward0"):
            return None
        return _ReLUBackward.apply([output], layer_input)
    pool = _max_pool_of(output, layer_input)
    return None if pool is None else _MaxPool2dBackward.apply([output], layer_input, pool)


class _ReLUBackward(torch.autograd.Function):
    """The ReLU's output again (an alias) as a node of its input; backward:
    ``threshold_backward(grad, result, 0)``, ``result`` a detached alias of the output. The output
    comes boxed in a list, so that it is no input of the node: PyTorch's node is not in this graph."""

    @staticmethod
    def forward(ctx, boxed_output, layer_input):
        output = boxed_output[0].detach()  # not a view: in-place ops on it are allowed (and caught)
        ctx.save_for_backward(output.detach())  # an alias outside the graph, its version checked
        return output

    @staticmethod
    def backward(ctx, grad):
        (result,) = ctx.saved_tensors
        return None, torch.ops.aten.threshold_backward(grad, result, 0)


class _MaxPool2dBackward(torch.autograd.Function):
    """The max pooling's output again (an alias) as a node of its input; backward: PyTorch's
    ``max_pool2d_with_indices_backward`` with a detached alias of the input and the indices."""

    @staticmethod
    def forward(ctx, boxed_output, layer_input, pool):
        indices, *ctx.arguments = pool
        ctx.save_for_backward(layer_input.detach(), indices)
        return boxed_output[0].detach()

    @staticmethod
    def backward(ctx, grad):
        layer_input, indices = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.arguments
        grad_input = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, layer_input, kernel_size, stride, padding, dilation, ceil_mode, indices
        )
        return None, grad_input, None
