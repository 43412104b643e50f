"""BackPACK-style whole-model front end: ``extend`` a model, ``collect`` statistics during backward.

    model = gradvar_ext.extend(model)
    loss = lossfunc(model(x), y)
    with gradvar_ext.collect(gradvar_ext.Variance(), gradvar_ext.SumGradSquared(), gradvar_ext.BatchL2Grad()):
        loss.backward(retain_graph=True, create_graph=True)
    p.variance, p.sum_grad_squared, p.batch_l2   # for every parameter of an extended layer

Statistics only, faster when ``.grad`` is not needed (the parameters' ordinary gradients are not
computed): run the forward inside the block too and call its ``backward``:

    with gradvar_ext.collect(gradvar_ext.Variance()) as stats:
        stats.backward(lossfunc(model(x), y), create_graph=True)

Data flows one way: forward hooks attach a tensor hook to each layer output that holds the
layer's input; during backward, inside ``collect``, the hook hands ``(input, grad_output)`` to
the block (the first backward through a forward call takes its input: nothing is held after it);
as soon as every pending forward call of a layer has its gradient, the ``gradvar`` ops turn
them into the layer's statistics and let them go (a layer used several times in one forward
waits for all its calls), so a backward holds no batch of layer inputs and output gradients to
its end. The statistics are set on the parameters when the block exits. Nothing is stored on
the modules.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import conv_ops, ops

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class Extension:
    """A statistic of the per-sample gradients; ``savefield`` is the parameter attribute it fills."""

    savefield: str = ""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Variance(Extension):
    """Variance over samples of the per-sample gradients (biased: divides by N), as BackPACK's."""

    savefield = "variance"


class SumGradSquared(Extension):
    """Sum over samples of the squared per-sample gradients."""

    savefield = "sum_grad_squared"


class BatchL2Grad(Extension):
    """Squared L2 norm of each sample's gradient of the parameter, shape ``[N]``."""

    savefield = "batch_l2"


class _Moments(Extension):
    """``(sum_n g_n**2, sum_n g_n)`` from one pass, one autograd node per layer (the moments ops):
    what ``total_variance`` sums over micro-batches. Internal."""

    savefield = "_gradvar_moments"


_EXTENDED: weakref.WeakSet = weakref.WeakSet()  # modules whose hooks are installed
_ACTIVE: list[_Collector] = []  # the innermost collect() block records


class _Call:
    """One forward call of an extended layer: holds the layer's input until the first backward
    through the call takes it. Alive as long as the call's autograd graph (its tensor hook)."""

    __slots__ = ("input", "__weakref__")

    def __init__(self, layer_input: Tensor) -> None:
        self.input: Tensor | None = layer_input


_CALLS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> WeakSet of its live _Calls


@dataclass(eq=False)  # compared by identity (_ACTIVE.remove, `in`): its fields hold tensors
class _Collector:
    extensions: tuple
    loss_reduction: str
    records: dict = field(default_factory=dict)  # module -> [(input, grad_output)] of calls awaiting the rest
    delivered: set = field(default_factory=set)  # the _Calls whose gradient this block received
    results: dict = field(default_factory=dict)  # module -> [(parameter, savefield, statistic)], set at the exit
    outputs: list = field(default_factory=list)  # gradient edges of the layer outputs of forwards inside
    called: set = field(default_factory=set)  # layers whose forward ran inside the block
    extended: list = field(default_factory=list)  # the extended layers at the block's entry
    grads_at_entry: dict = field(default_factory=dict)  # their parameters -> _grad_state at the entry
    covered: set = field(default_factory=set)  # layers whose statistics a block nested in this one computed
    batch: tuple | None = None  # (layer, N) of the first layer whose statistics were computed
    deliveries: ClassVar[int] = 0  # output gradients received by any block so far

    def deliver(self, module: nn.Module, call: _Call, layer_input: Tensor | None, grad_output: Tensor) -> None:
        """A forward call's output gradient: recorded; the layer's statistics are computed once no
        other live call of the layer awaits its backward (else at the block's exit)."""
        if call in self.delivered:
            raise RuntimeError(
                "gradvar_ext.collect: a second backward pass reached the same forward call of "
                f"{type(module).__name__}; per-sample statistics are defined for one backward per forward: "
                "use one backward per collect block"
            )
        if layer_input is None:
            raise RuntimeError(
                f"gradvar_ext.collect: the backward pass reached a forward call of {type(module).__name__} that an "
                "earlier backward already went through (its input was released then); per-sample statistics take "
                "one backward per forward: run the forward again inside or before this block"
            )
        self.delivered.add(call)
        _Collector.deliveries += 1
        self.records.setdefault(module, []).append((layer_input, grad_output))
        if all(other.input is None for other in _CALLS.get(module, ())):
            self.finish(module)

    def finish(self, module: nn.Module) -> None:
        """The layer's statistics from its recorded calls, which are let go."""
        if module in self.results:
            raise RuntimeError(
                f"gradvar_ext.collect: {type(module).__name__} got gradients from a forward pass that ran after "
                "its statistics were computed from an earlier one; per-sample statistics take one forward and one "
                "backward per collect block (micro-batches: one block each)"
            )
        self.results[module] = _statistics(module, self.records.pop(module), self)

    def check_batch(self, module: nn.Module, n: int) -> None:
        """Every layer of a block must see the same samples in dim 0 (its N)."""
        if self.batch is None:
            self.batch = (module, n)
        elif self.batch[1] != n:
            other = "the micro-batch" if self.batch[0] is None else _describe(self.batch[0])  # total_variance's
            raise ValueError(
                f"gradvar_ext.collect: {_describe(module)} got a batch of {n} where {other} had "
                f"{self.batch[1]} in this block; per-sample statistics take dim 0 of every extended layer's "
                "input as the sample, so a layer on samples folded into dim 0 (x.reshape(-1, features)) or on a "
                "tensor without the batch dim would mix samples: keep the batch in dim 0 (Linear takes [N, *, in])"
            )


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    # the module's own parameters: _parameters, which parameters(recurse=False) walks ~10x slower
    return [p for p in module._parameters.values() if p is not None and p.requires_grad]


def extend(module: nn.Module) -> nn.Module:
    """Instrument every Linear, Conv1d and Conv2d layer of ``module``; returns ``module`` itself.

    Raises TypeError for a layer with trainable parameters of an unsupported type (freeze it with
    ``requires_grad_(False)`` to extend the rest). Extending twice is harmless.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"gradvar_ext.extend: expected an nn.Module, got {type(module).__name__}")
    for name, sub in module.named_modules():
        if isinstance(sub, SUPPORTED):
            if sub not in _EXTENDED:
                sub.register_forward_hook(_on_forward, with_kwargs=True)
                _EXTENDED.add(sub)
        elif _trainable(sub):
            supported = ", ".join(t.__name__ for t in SUPPORTED)
            raise TypeError(
                f"gradvar_ext.extend: layer {name or '<root>'!r} ({type(sub).__name__}) has trainable parameters, "
                f"but per-sample gradient statistics are supported for {supported} only. Freeze it "
                "(requires_grad_(False)) or leave it out of the extended model."
            )
    return module


def _on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
    if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
        return
    call = _Call(args[0] if args else kwargs["input"])  # layer(x) or layer(input=x)
    calls = _CALLS.get(module)
    if calls is None:
        calls = _CALLS[module] = weakref.WeakSet()
    calls.add(call)

    def on_grad(grad_output: Tensor) -> None:
        layer_input, call.input = call.input, None  # the first backward through the call takes it
        if _ACTIVE:
            _ACTIVE[-1].deliver(module, call, layer_input, grad_output)

    output.register_hook(on_grad)
    if _ACTIVE:  # a forward inside a collect block: collect.backward may ask for this output's gradient
        _ACTIVE[-1].outputs.append(torch.autograd.graph.get_gradient_edge(output))
        _ACTIVE[-1].called.add(module)


class collect:
    """Context manager: statistics of the per-sample gradients from the backward passes inside it.

    Args:
        *extensions: ``Variance()``, ``SumGradSquared()``, ``BatchL2Grad()``.
        loss_reduction: ``"sum"`` (default, BackPACK's semantics): statistics of the gradients as
            backpropagated. ``"mean"``: the loss averages over the batch, and the statistics are
            those of the per-sample loss gradients (the backpropagated ones times N).

    With ``backward(create_graph=True)`` the results are differentiable w.r.t. the parameters.
    Results of an earlier block are removed when a new block starts, so none is stale. With the
    forward inside the block as well, :meth:`backward` computes the statistics without the
    parameters' ordinary gradients.
    """

    def __init__(self, *extensions: Extension, loss_reduction: str = "sum") -> None:
        for ext in extensions:
            if not isinstance(ext, Extension):
                raise TypeError(
                    f"gradvar_ext.collect: expected Variance(), SumGradSquared() or BatchL2Grad(), got {ext!r}"
                )
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"gradvar_ext.collect: loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        self._collector = _Collector(tuple(extensions), loss_reduction)

    def __enter__(self) -> collect:
        extended = self._collector.extended = list(_EXTENDED)
        clear(*extended)
        self._collector.grads_at_entry = {p: _grad_state(p) for m in extended for p in _trainable(m)}
        _ACTIVE.append(self._collector)
        return self

    def backward(self, loss: Tensor, *, create_graph: bool = False, retain_graph: bool | None = None) -> None:
        """Backpropagate ``loss`` for the statistics only; the forward must run inside this block too.

        Like ``loss.backward(create_graph=..., retain_graph=...)``, but autograd computes only the
        gradients w.r.t. the outputs of the extended layers that ran inside the block, which is
        what the statistics are made of: no parameter's ``.grad`` is computed or accumulated, so
        the layers' weight-gradient products (and the first layer's input gradient) are skipped.
        The statistics are the same. Use it when they are the goal (a variance regulariser, noise
        scale estimates); use ``loss.backward()`` when you also need ``.grad``.

        Raises RuntimeError when no extended layer ran a forward with gradients inside the block,
        or when ``loss`` depends on none of them.
        """
        if self._collector not in _ACTIVE:
            raise RuntimeError("gradvar_ext.collect.backward: call it inside its `with` block")
        if not self._collector.outputs:
            raise RuntimeError(
                "gradvar_ext.collect.backward: no extended layer ran a forward with gradients inside this block; "
                "run the forward inside it (and extend the model with gradvar_ext.extend)"
            )
        bypassed = [m for m in self._collector.extended if m not in self._collector.called and _trainable(m)]
        if bypassed:  # layers not called here: does the loss use their parameters all the same?
            reached = _parameters_reached(loss, {p for m in bypassed for p in _trainable(m)})
            _check_not_bypassed(
                [m for m in bypassed if any(p in reached for p in _trainable(m))],
                f"no call of that layer ran inside this block ({_USED_DIRECTLY}, or its forward ran before the block)",
            )
        # backward (not autograd.grad) towards the outputs' gradient edges: the hooks take each
        # output gradient and nothing captures it, so it is freed once its layer has used it.
        deliveries = _Collector.deliveries  # to this block, or to one nested in it
        run = functools.partial(
            torch.autograd.backward,
            loss,
            inputs=self._collector.outputs,
            create_graph=create_graph,
            retain_graph=retain_graph,
        )
        if create_graph:
            with warnings.catch_warnings():  # its warning is about a cycle through .grad, untouched here
                warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
                run()
        else:
            run()
        if _Collector.deliveries == deliveries:
            raise RuntimeError(
                "gradvar_ext.collect.backward: the loss does not depend on the output of any extended layer "
                "that ran inside this block"
            )

    def __exit__(self, *exc_info) -> None:
        collector = self._collector
        _ACTIVE.remove(collector)
        collector.outputs = []  # the gradient edges hold the graph: release it with the block
        try:
            if exc_info[0] is None:
                for module in list(collector.records):  # layers with a call that got no gradient here
                    collector.finish(module)
                _check_not_bypassed(  # a backward wrote .grad of a layer without its statistics?
                    [
                        m
                        for m in collector.extended
                        if m not in collector.results
                        and m not in collector.covered
                        and any(_gradient_written(p, collector.grads_at_entry) for p in _trainable(m))
                    ],
                    f"the backward reached them without a call of that layer ({_USED_DIRECTLY}, or a forward that "
                    "ran before gradvar_ext.extend)",
                )
                if len(collector.results) > 1:
                    _check_not_shared(collector.results)
                for assignments in collector.results.values():
                    for param, name, value in assignments:
                        setattr(param, name, value)
            if _ACTIVE:  # gradients this block accounted for are no bypass for the enclosing one
                _ACTIVE[-1].covered.update(collector.results, collector.covered)
        finally:
            collector.records, collector.results, collector.delivered = {}, {}, set()
            collector.called, collector.grads_at_entry, collector.covered, collector.extended = set(), {}, set(), []
            collector.batch = None


# ---------------------------------------------------------------- parameters used around their layer
def _grad_state(p: Tensor) -> tuple | None:
    """What changes when a backward writes p.grad: the tensor (new, or replaced) or its version
    (accumulated in place)."""
    grad = p.grad
    return None if grad is None else (id(grad), grad._version)


def _gradient_written(p: Tensor, at_entry: dict) -> bool:
    """Whether a backward inside the block gave p a gradient: its .grad changed since the entry and
    is not all zeros (zero_grad(set_to_none=False) changes it too; a real gradient is not 0)."""
    if p not in at_entry or p.grad is None or _grad_state(p) == at_entry[p]:
        return False
    return bool(p.grad.ne(0).any())  # only for a layer without statistics: rare


def _parameters_reached(loss: Tensor, params: set) -> set:
    """The members of ``params`` whose gradient ``loss``'s backward would compute (its graph's leaves)."""
    reached, seen = set(), set()
    stack = [loss.grad_fn] if loss.grad_fn is not None else []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: a leaf
        if variable is not None and variable in params:
            reached.add(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached


def _check_not_bypassed(modules: list, reason: str) -> None:
    """Layers whose parameters get a gradient without a call of the layer that the block saw (the
    forward hook holds the input): their statistics would silently be missing (zero in total_variance)."""
    if modules:
        raise RuntimeError(
            f"gradvar_ext.collect: the loss depends on the parameters of {_describe(modules[0])}, but {reason}; "
            "the per-sample statistics need the layer's input from its forward: call the layer (inside the block "
            "for collect.backward), or freeze its parameters (requires_grad_(False))"
        )


_USED_DIRECTLY = "its weight used directly, as nn.MultiheadAttention uses its out_proj"


def _check_not_shared(results: dict) -> None:
    """A parameter of two extended layers (tied weights): its per-sample gradient is the sum of
    both layers', whose statistics are not those of either layer alone."""
    owner: dict = {}
    for module, assignments in results.items():
        for param, _, _ in assignments:
            other = owner.setdefault(param, module)
            if other is not module:
                raise RuntimeError(
                    f"gradvar_ext.collect: {_describe(other)} and {_describe(module)} share a parameter (tied "
                    "weights); per-sample statistics of a shared parameter are not supported: untie it, or "
                    "freeze it (requires_grad_(False))"
                )


def _describe(module: nn.Module) -> str:
    return f"{type(module).__name__} {tuple(module.weight.shape)}"


def clear(*modules: nn.Module) -> None:
    """Delete the statistics stored on the parameters of ``modules`` (and of their sub-modules).

    After ``backward(create_graph=True)`` the results hold the graph, which holds the parameters:
    clearing (or starting a new ``collect``) breaks that cycle.
    """
    fields = [cls.savefield for cls in (Variance, SumGradSquared, BatchL2Grad, _Moments)]
    for module in modules:
        for p in module.parameters():
            for name in fields:
                if hasattr(p, name):
                    delattr(p, name)


# ---------------------------------------------------------------- statistics from the records
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
class _LayerData:
    """What the ops need for one layer, all its calls combined.

    kind "linear": input [N, T, in], grad_output [N, T, out], every call's positions concatenated,
    so the statistics are those of the total per-sample gradient. kind "conv": the single call's
    input and grad_output in Conv2d form. kind "patches" (a conv layer called several times):
    unfolded patches [N, groups, L, f] and grad_output [N, groups, L, C_out/groups], calls
    concatenated along L. bias_grad: what the bias statistics take, [N, *, out] with the per-sample
    bias gradient the sum over * (a Linear layer's grad_output itself; a conv's pixels summed).
    """

    kind: str
    input: Tensor
    grad_output: Tensor
    bias_grad: Tensor


def _statistics(module: nn.Module, calls: list, collector: _Collector) -> list:
    """[(parameter, savefield, statistic)] of one layer from all its calls' (input, grad_output)."""
    differentiable = any(go.requires_grad for _, go in calls)
    results = []
    with torch.set_grad_enabled(differentiable):  # no create_graph: keep no graph alive
        data = _layer_data(module, calls, collector.loss_reduction)
        collector.check_batch(module, data.input.shape[0])
        for ext in collector.extensions:
            name = ext.savefield
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


def _layer_data(module: nn.Module, calls: list, loss_reduction: str) -> _LayerData:
    for x, _ in calls:
        _check_batched(module, x)
    sizes = [x.shape[0] for x, _ in calls]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"gradvar_ext.collect: {_describe(module)} was called {len(calls)} times in one forward with batch sizes "
            f"{sizes}; the statistics of a layer used several times add its calls' gradients sample by sample, "
            "so every call needs the same batch"
        )
    scale = calls[0][0].shape[0] if loss_reduction == "mean" else 1
    calls = [ops.promoted(x, go) for x, go in calls]  # mixed precision: float32 statistics
    calls = [(x, go * scale if scale != 1 else go) for x, go in calls]
    if isinstance(module, nn.Linear):
        if len(calls) == 1:  # [N, *, in] as it is: the ops take any middle dims (no view nodes to differentiate)
            return _LayerData("linear", calls[0][0], calls[0][1], calls[0][1])
        xs = _along_positions([x.reshape(x.shape[0], -1, x.shape[-1]) for x, _ in calls], 1)
        gos = _along_positions([go.reshape(go.shape[0], -1, go.shape[-1]) for _, go in calls], 1)
        return _LayerData("linear", xs, gos, gos)
    as2d = [(x.unsqueeze(2), go.unsqueeze(2)) if isinstance(module, nn.Conv1d) else (x, go) for x, go in calls]
    bias_grads = [go.sum((2, 3)) for _, go in as2d]
    bias_grad = bias_grads[0] if len(bias_grads) == 1 else torch.stack(bias_grads).sum(0)
    if len(as2d) == 1:
        return _LayerData("conv", as2d[0][0], as2d[0][1], bias_grad)
    patches, positions = zip(*(_unfolded(module, x, go) for x, go in as2d))
    return _LayerData("patches", _along_positions(patches, 2), _along_positions(positions, 2), bias_grad)


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


def _weight_statistic(module: nn.Module, name: str, data: _LayerData):
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
