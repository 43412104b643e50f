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
the modules. The same forward hook gives an extended convolution's output a backward node of
ours (``conv_backward.py``: same gradients, a leaner double backward), and a forward hook on
every ReLU, LeakyReLU, Hardtanh / ReLU6 and (adaptive) max pooling layer does so for theirs
(``piecewise_backward.py``: no zeros in the double backward).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
import weakref
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from . import conv_backward, piecewise_backward
from .layer_statistics import describe, layer_data, statistics

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
    through the call takes it. Alive as long as the call's autograd graph (its tensor hook).
    ``extended`` turns False when ``unextend`` drops the call (its gradient is then ignored)."""

    __slots__ = ("input", "extended", "__weakref__")

    def __init__(self, layer_input: Tensor) -> None:
        self.input: Tensor | None = layer_input
        self.extended = True


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
        calls = self.records.pop(module)
        differentiable = any(go.requires_grad for _, go in calls)  # create_graph: the statistics join the graph
        # Otherwise no graph is kept, and the ops run below autograd: their autograd wrappers (Python,
        # torch.library's, 4-15 us a call) would only find that nothing needs a gradient.
        below_autograd = contextlib.nullcontext() if differentiable else torch._C._AutoDispatchBelowAutograd()
        with torch.set_grad_enabled(differentiable), below_autograd:
            data = layer_data(module, calls, self.loss_reduction)
            self.check_batch(module, data.input.shape[0])
            self.results[module] = statistics(module, data, [ext.savefield for ext in self.extensions])

    def check_batch(self, module: nn.Module, n: int) -> None:
        """Every layer of a block must see the same samples in dim 0 (its N)."""
        if self.batch is None:
            self.batch = (module, n)
        elif self.batch[1] != n:
            other = "the micro-batch" if self.batch[0] is None else describe(self.batch[0])  # total_variance's
            raise ValueError(
                f"gradvar_ext.collect: {describe(module)} got a batch of {n} where {other} had "
                f"{self.batch[1]} in this block; per-sample statistics take dim 0 of every extended layer's "
                "input as the sample, so a layer on samples folded into dim 0 (x.reshape(-1, features)) or on a "
                "tensor without the batch dim would mix samples: keep the batch in dim 0 (Linear takes [N, *, in])"
            )


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    # the module's own parameters: _parameters, which parameters(recurse=False) walks ~10x slower
    return [p for p in module._parameters.values() if p is not None and p.requires_grad]


def extend(module: nn.Module) -> nn.Module:
    """Instrument every Linear, Conv1d and Conv2d layer of ``module``; returns ``module`` itself.

    Every ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Hardtanh`` (``nn.ReLU6``), ``nn.MaxPool2d`` and
    ``nn.AdaptiveMaxPool2d`` gets a forward hook too, which gives its output a backward node whose
    double backward forms no zeros (``piecewise_backward.py``; the same gradients;
    ``GRADVAR_EXT_PIECEWISE_BACKWARD=pytorch`` keeps PyTorch's).

    Raises TypeError for a layer with trainable parameters of an unsupported type (freeze it with
    ``requires_grad_(False)`` to extend the rest). Extending twice is harmless; :func:`unextend`
    removes the hooks.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"gradvar_ext.extend: expected an nn.Module, got {type(module).__name__}")
    for name, sub in module.named_modules():
        if isinstance(sub, SUPPORTED):
            # the hook itself, not membership, tells an extended layer: a deep copy keeps the hook
            if not _hook_keys(sub):
                sub.register_forward_hook(_on_forward, with_kwargs=True)
            _EXTENDED.add(sub)
        elif isinstance(sub, piecewise_backward.PIECEWISE):
            if not _hook_keys(sub):
                sub.register_forward_hook(_on_piecewise_forward, with_kwargs=True)
        elif _trainable(sub):
            supported = ", ".join(t.__name__ for t in SUPPORTED)
            raise TypeError(
                f"gradvar_ext.extend: layer {name or '<root>'!r} ({type(sub).__name__}) has trainable parameters, "
                f"but per-sample gradient statistics are supported for {supported} only. Freeze it "
                "(requires_grad_(False)) or leave it out of the extended model."
            )
    return module


def unextend(module: nn.Module) -> nn.Module:
    """Undo :func:`extend` for every layer of ``module``; returns ``module`` itself.

    Removes the forward hooks (the model runs as a plain one again: no host cost per call) and
    deletes the statistics stored on the layers' parameters (as :func:`clear`: no result is left
    that a later block would not refresh). A forward that ran before, whose backward has not,
    lets its held input go; that backward gives no statistics. Other hooks are untouched;
    layers that were never extended are left as they are. Raises RuntimeError inside a
    ``collect`` block, whose statistics would miss the layers.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"gradvar_ext.unextend: expected an nn.Module, got {type(module).__name__}")
    if _ACTIVE:
        raise RuntimeError(
            "gradvar_ext.unextend: called inside a collect block; its statistics would miss the layers: "
            "call it after the block exits"
        )
    for sub in module.modules():
        for key in _hook_keys(sub):
            del sub._forward_hooks[key]
            sub._forward_hooks_with_kwargs.pop(key, None)
            sub._forward_hooks_always_called.pop(key, None)
        if not isinstance(sub, SUPPORTED):
            continue
        for call in _CALLS.pop(sub, ()):
            call.input, call.extended = None, False
        _EXTENDED.discard(sub)
    clear(module)
    return module


def _hook_keys(module: nn.Module) -> list:
    """The keys of extend's forward hooks among the module's (a deep copy keeps them)."""
    return [key for key, hook in module._forward_hooks.items() if hook is _on_forward or hook is _on_piecewise_forward]


def _on_piecewise_forward(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
    """The forward hook of a ``piecewise_backward.PIECEWISE`` layer: its output with our backward node, or None."""
    return piecewise_backward.reroute(module, args[0] if args else kwargs["input"], output)


def _on_forward(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor | None:
    """The forward hook: holds the call's input for its backward; returns the output the layer
    returns instead (an extended convolution's alias with our backward node), or None."""
    if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
        return None
    _EXTENDED.add(module)  # a no-op but for a deep copy of an extended layer: known from now on (clear, checks)
    layer_input = args[0] if args else kwargs["input"]  # layer(x) or layer(input=x)
    output = conv_backward.reroute(module, layer_input, output)  # convolutions: a leaner double backward
    call = _Call(layer_input)
    calls = _CALLS.get(module)
    if calls is None:
        calls = _CALLS[module] = weakref.WeakSet()
    calls.add(call)

    def on_grad(grad_output: Tensor) -> None:
        layer_input, call.input = call.input, None  # the first backward through the call takes it
        if _ACTIVE and call.extended:
            _ACTIVE[-1].deliver(module, call, layer_input, grad_output)

    output.register_hook(on_grad)
    if _ACTIVE:  # a forward inside a collect block: collect.backward may ask for this output's gradient
        _ACTIVE[-1].outputs.append(torch.autograd.graph.get_gradient_edge(output))
        _ACTIVE[-1].called.add(module)
    return output


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

    def _expect_samples(self, n: int) -> None:
        """Every extended layer of this block must see n samples in dim 0 (total_variance sets its
        micro-batch's; the error then names "the micro-batch" rather than the first layer)."""
        self._collector.batch = (None, n)

    def __enter__(self) -> collect:
        extended = self._collector.extended = list(_EXTENDED)
        _clear_parameters(p for m in extended for p in m._parameters.values() if p is not None)  # layers: no children
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
        not_called = {m: _trainable(m) for m in self._collector.extended if m not in self._collector.called}
        bypassed = {m: params for m, params in not_called.items() if params}
        if bypassed:  # layers not called here: does the loss use their parameters all the same?
            reached = _parameters_reached(loss, {p for params in bypassed.values() for p in params})
            _check_not_bypassed(
                [m for m, params in bypassed.items() if any(p in reached for p in params)],
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
    is not all zeros (zero_grad(set_to_none=False) changes it too; a real gradient is not 0). Asked
    only for layers that got no statistics in the block. Other in-place changes of a nonzero .grad
    inside the block (clip_grad_norm_ over a layer the block's forward did not use, with gradients
    left from an earlier step) read as a gradient too: an error naming the layer, never a silent
    one. (A hook per parameter per block would tell them apart; it cost 11 us per block.)"""
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
            f"gradvar_ext.collect: the loss depends on the parameters of {describe(modules[0])}, but {reason}; "
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
                    f"gradvar_ext.collect: {describe(other)} and {describe(module)} share a parameter (tied "
                    "weights); per-sample statistics of a shared parameter are not supported: untie it, or "
                    "freeze it (requires_grad_(False))"
                )


def clear(*modules: nn.Module) -> None:
    """Delete the statistics stored on the parameters of ``modules`` (and of their sub-modules).

    After ``backward(create_graph=True)`` the results hold the graph, which holds the parameters:
    clearing (or starting a new ``collect``) breaks that cycle.
    """
    _clear_parameters(p for module in modules for p in module.parameters())


_SAVEFIELDS = tuple(cls.savefield for cls in (Variance, SumGradSquared, BatchL2Grad, _Moments))


def _clear_parameters(params) -> None:
    for p in params:
        for name in _SAVEFIELDS:
            if hasattr(p, name):
                delattr(p, name)
