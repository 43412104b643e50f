"""An extended model's ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Hardtanh`` (``nn.ReLU6``),
``nn.MaxPool2d`` and ``nn.AdaptiveMaxPool2d`` backward as nodes of ours, whose own backward forms
no zeros.

Why: these layers are piecewise linear: their backward routes the gradient by a pattern that is
constant near almost every input (the activations' masks, max pooling's indices). PyTorch
records it as one kernel of the gradient and a saved tensor: ``threshold_backward(grad, result,
0)`` (the saved ``result`` is the ReLU's output), ``leaky_relu_backward`` / ``hardtanh_backward``
of the input, ``max_pool2d_with_indices_backward(grad, self, ..., indices)`` (and the adaptive
pooling's). Differentiated
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

Where: such a layer (not in-place; max pooling without ``return_indices``; the 1d poolings are
2d ones behind a squeeze, and keep PyTorch's nodes) whose output is
PyTorch's op of exactly the layer's input (which requires grad) and carries no tensor hook,
outside torch.func transforms, torch.compile and torch.jit tracing, and whose zeros (input-sized)
would take at least ``MIN_ZEROS_BYTES``.
``GRADVAR_EXT_PIECEWISE_BACKWARD=pytorch`` keeps PyTorch's nodes (read at each forward).
``torch.nn.functional`` calls in a model's own ``forward`` are no modules: they keep PyTorch's
nodes. Cost: the nodes' Python time, forward and backward, which a first-order backward (no
double backward to save) pays for nothing: 2-4% of the benchmark CNN's job (a).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .conv_backward import ours_chosen, plain_autograd

PIECEWISE = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.MaxPool2d, nn.AdaptiveMaxPool2d)  # nn.ReLU6 is an nn.Hardtanh

# Below this size of the zeros PyTorch's node would form (the layer's input's), the node's Python
# time costs more than the zeros: the seed's MNIST CNN (its ReLU's input 368 KB, N = 32; 2 CPU
# cores) took 11% longer for job (a) and 3% for job (b) with both its layers rerouted
# (twenty-sixth session).
MIN_ZEROS_BYTES = 1 << 20


def _node_of_input(output: Tensor, layer_input: Tensor, node_name: str):
    """``output``'s node where it is PyTorch's ``node_name`` of exactly ``layer_input`` (not of
    something a hook made of it) and nothing waits on the output's gradient yet; else None."""
    node = output.grad_fn
    if type(node).__name__ != node_name or output._backward_hooks or output.retains_grad:
        return None
    edge = torch.autograd.graph.get_gradient_edge(layer_input)
    return node if node.next_functions[0] == (edge.node, edge.output_nr) else None


# Per layer type, from PyTorch's node and the layer's input and output: our node's (kernel, saved
# tensors, other arguments), its backward being kernel(grad, *saved, *arguments); the arguments
# are read from PyTorch's node (private attributes, which a later PyTorch may rename: then its
# node stays).
def _relu(node, layer_input, output):
    return torch.ops.aten.threshold_backward, (output,), (0,)


def _leaky_relu(node, layer_input, output):
    return torch.ops.aten.leaky_relu_backward, (layer_input,), (node._saved_negative_slope, False)


def _hardtanh(node, layer_input, output):
    return torch.ops.aten.hardtanh_backward, (layer_input,), (node._saved_min_val, node._saved_max_val)


def _max_pool_backward(grad, layer_input, indices, *arguments):
    return torch.ops.aten.max_pool2d_with_indices_backward(grad, layer_input, *arguments, indices)


def _max_pool(node, layer_input, output):
    arguments = (node._saved_kernel_size, node._saved_stride, node._saved_padding, node._saved_dilation)
    return _max_pool_backward, (layer_input, node._saved_result1), (*map(list, arguments), node._saved_ceil_mode)


def _adaptive_max_pool(node, layer_input, output):
    return torch.ops.aten.adaptive_max_pool2d_backward, (layer_input, node._saved_result1), ()


_LAYERS = (  # (layer type, PyTorch's node of its output, ours)
    (nn.ReLU, "ReluBackward0", _relu),
    (nn.LeakyReLU, "LeakyReluBackward0", _leaky_relu),
    (nn.Hardtanh, "HardtanhBackward0", _hardtanh),
    (nn.MaxPool2d, "MaxPool2DWithIndicesBackward0", _max_pool),
    (nn.AdaptiveMaxPool2d, "AdaptiveMaxPool2DBackward0", _adaptive_max_pool),
)


def reroute(module: nn.Module, layer_input, output) -> Tensor | None:
    """In the forward hook of one of the ``PIECEWISE`` layers: the output to return, an alias of
    ``output`` with our node's backward where it applies, else None (the output as it is)."""
    if (
        type(output) is not Tensor  # MaxPool2d(return_indices=True): a tuple
        or type(layer_input) is not Tensor
        or not (layer_input.requires_grad and torch.is_grad_enabled())
        or getattr(module, "inplace", False)  # its output is its input, changed: PyTorch's node stays
        or not plain_autograd()
        or not ours_chosen("GRADVAR_EXT_PIECEWISE_BACKWARD")
        or layer_input.numel() * layer_input.element_size() < MIN_ZEROS_BYTES
    ):
        return None
    for layer_type, node_name, ours in _LAYERS:
        if isinstance(module, layer_type):
            node = _node_of_input(output, layer_input, node_name)
            if node is None:
                return None
            try:
                kernel, saved, arguments = ours(node, layer_input, output)
            except AttributeError:
                return None
            return _PiecewiseBackward.apply([output], layer_input, kernel, saved, arguments)
    return None


class _PiecewiseBackward(torch.autograd.Function):
    """The layer's output again (an alias: same storage, no copy) as a node of its input;
    backward: ``kernel(grad, *saved, *arguments)``, PyTorch's own backward kernel, with detached
    aliases of the tensors PyTorch's node saves, outside the graph (so that a double backward has
    no derivative w.r.t. them to form). The output comes boxed in a list, so that it is no input
    of the node: PyTorch's node is not in this graph."""

    @staticmethod
    def forward(ctx, boxed_output, layer_input, kernel, saved, arguments):
        ctx.kernel, ctx.arguments = kernel, arguments
        ctx.save_for_backward(*(t.detach() for t in saved))  # aliases, their versions checked
        return boxed_output[0].detach()  # not a view: in-place ops on it are allowed (and caught)

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.kernel(grad, *ctx.saved_tensors, *ctx.arguments), None, None, None
