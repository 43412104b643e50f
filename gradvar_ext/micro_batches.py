"""The total variance of the per-sample gradients, and its gradient, a micro-batch at a time.

``collect`` over a whole batch holds the batch's activations (and, with ``create_graph=True``,
its double-backward graph) like any batched backward does, so its peak memory grows with N.
:func:`total_variance` bounds it by the micro-batch instead, for any N:

    total = gradvar_ext.total_variance(model, lossfunc, x, y, micro_batch_size=16, backward=True)

The variance needs only sums over samples, so micro-batches add up: each contributes its
moments ``(sum_n g_n**2, sum_n g_n)``, from one moments op per layer in a statistics-only
backward (``collect.backward``). Its gradient needs the mean gradient first: with ``g_n`` sample
n's gradient, ``H_n`` its loss's Hessian and ``m`` the mean gradient,

    d/dθ [ sum_n ||g_n||² / N - ||m||² ] = (2 / N) sum_n H_n (g_n - m),

a sum over samples again, of the gradient of ``S_B = sum_{n in B} (||g_n||² - 2 <g_n, m>) / N``
with ``m`` held fixed: both terms are sums of the micro-batch's moments, so one backward pass
through the moments ops and the model's double backward give it. ``backward=True`` therefore
makes two passes: one plain forward + backward per micro-batch for ``m``, then one double
backward per micro-batch for ``S_B``, whose gradient is accumulated into ``.grad``. The last
micro-batch needs only one: its moments' sum completes ``m`` (only the double backward needs
``m``), so it goes straight from the first pass into its double backward, and the second pass
takes the others. Each micro-batch's graph is freed before the next one runs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .frontend import _ACTIVE, Variance, _Moments, clear, collect, extend
from .ops import variance_from_moments

_NAME = "gradvar_ext.total_variance"


def total_variance(
    model: nn.Module,
    lossfunc: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    micro_batch_size: int | None = None,
    loss_reduction: str | None = None,
    backward: bool = False,
    scale: float = 1.0,
) -> Tensor:
    """Total variance of the per-sample gradients, ``micro_batch_size`` samples at a time.

    Sample n's gradient is that of ``lossfunc(model(inputs[n:n+1]), targets[n:n+1])`` w.r.t. the
    trainable parameters (the per-sample loop's); the total variance is the sum, over every
    parameter entry, of their variance over the N samples (biased: divides by N, as
    ``torch.var(unbiased=False)`` and BackPACK's ``Variance``).

    Args:
        model: the model; its supported layers are extended (:func:`gradvar_ext.extend`) if they
            are not yet (and stay so: :func:`gradvar_ext.unextend` removes the hooks), and every
            trainable parameter must belong to one of them.
        lossfunc: ``lossfunc(model(x), y)`` -> a scalar, the sum or the mean of the samples'
            losses (``loss_reduction``).
        inputs, targets: the batch, ``[N, ...]`` each.
        micro_batch_size: samples per forward and backward (``None``: the whole batch at once).
            Where it does not divide N, the remainder forms the first micro-batch. Peak memory
            is that of a micro-batch, whatever N is. Time grows as micro-batches
            shrink, most on a GPU, where small ones are bound by kernel launches (H100, benchmark
            CNN at N = 512: micro-batches of 16 took 4.9x the whole batch's time for 1/11 of its
            memory): pick the largest micro-batch that fits.
        loss_reduction: ``"sum"`` or ``"mean"``: how ``lossfunc`` reduces over the samples.
            ``None`` (default): ``lossfunc.reduction`` (``nn.MSELoss``, ``nn.CrossEntropyLoss``, ...).
        backward: also accumulate ``scale`` times the gradient of the total variance w.r.t. the
            parameters into their ``.grad`` (like ``Tensor.backward``). With more than one
            micro-batch this takes a plain forward + backward per micro-batch but the last for
            the mean gradient, besides the double backward per micro-batch.
        scale: the factor of the accumulated gradient (a regulariser's weight, say).

    Returns:
        The total variance, a detached 0-dim tensor. Each trainable parameter also gets
        ``p.variance``, its per-entry variance (detached).

    The model's forward must give the same outputs each time it sees a micro-batch: dropout
    draws the same masks in both passes (the random number generator's state is replayed), and
    layers such as BatchNorm in training mode, whose output depends on the other samples, give
    per-sample gradients that depend on how the batch is split (as in any per-sample method).
    """
    if _ACTIVE:
        raise RuntimeError(f"{_NAME}: call it outside collect blocks (it runs its own, one per micro-batch)")
    reduction = _loss_reduction(lossfunc, loss_reduction)
    n = _check_batch(inputs, targets, micro_batch_size)
    model = extend(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{_NAME}: the model has no trainable parameter")
    size = n if micro_batch_size is None else micro_batch_size
    batches = list(zip(inputs.split(size), targets.split(size)))
    if len(batches) > 1 and batches[-1][0].shape[0] < size:
        batches.insert(0, batches.pop())  # the remainder first: pass 1 (_in_micro_batches) skips a full one

    def summed_loss(x: Tensor, y: Tensor) -> Tensor:
        """The micro-batch's loss as the sum of its samples' losses."""
        loss = lossfunc(model(x), y)
        if not isinstance(loss, Tensor) or loss.dim() != 0:
            raise ValueError(f"{_NAME}: lossfunc must return a scalar tensor (a 'sum' or 'mean' reduction)")
        return loss * x.shape[0] if reduction == "mean" else loss

    run = _in_one_batch if len(batches) == 1 else _in_micro_batches
    try:
        total, variances = run(params, summed_loss, batches, n, backward, scale)
    finally:
        clear(model)  # collect's results: they may hold a graph
    for p, v in zip(params, variances):
        p.variance = v
    return total


def _statistic(p: Tensor, name: str, parts: int = 1):
    """What collect set on ``p`` (zeros for a parameter the loss does not depend on)."""
    if hasattr(p, name):
        return getattr(p, name)
    return torch.zeros_like(p) if parts == 1 else tuple(torch.zeros_like(p) for _ in range(parts))


def _in_one_batch(params, summed_loss, batches, n, backward, scale):
    """The whole batch in one collect block: the variance straight from its moments."""
    with _block(Variance(), batches[0][0]) as stats:
        stats.backward(summed_loss(*batches[0]), create_graph=backward)
    variances = [_statistic(p, "variance") for p in params]
    total = sum(v.sum() for v in variances)
    if backward:
        torch.autograd.backward(total * scale, inputs=params)
    return total.detach(), [v.detach() for v in variances]


def _in_micro_batches(params, summed_loss, batches, n, backward, scale):
    """Sums over micro-batches of the moments (sum_n g_n**2, sum_n g_n): the statistics-only
    backward gives both from one op per layer, whose own backward is one pass (no weight
    gradients with a graph, no double backward through them). With ``backward``: pass 1 (plain
    gradients) over all micro-batches but the last, the last one's moments and double backward,
    then pass 2 over the others (2K - 1 forwards for K micro-batches, not 2K). A smaller remainder
    micro-batch comes first (total_variance), so pass 1 skips a full-size micro-batch, not it."""
    second_moments = [torch.zeros_like(p) for p in params]
    sums = [torch.zeros_like(p) for p in params]  # sum_n g_n, from the moments
    mean: list = []  # m, once known

    def moments_of(x: Tensor, y: Tensor, pass_1_sums: list | None = None) -> None:
        """One micro-batch's moments (added up) and, with ``backward``, S_B's gradient into .grad;
        ``pass_1_sums`` (the last micro-batch): the other micro-batches' sum_n g_n, which this
        one's completes to m."""
        with _block(_Moments(), x) as stats:
            stats.backward(summed_loss(x, y), create_graph=backward)
        moments = [_statistic(p, _Moments.savefield, parts=2) for p in params]
        batch_sums = [g.detach() for _, g in moments]
        if pass_1_sums is not None:
            mean.extend(torch._foreach_div(torch._foreach_add(pass_1_sums, batch_sums), n))
        if backward:  # S_B = (sum_{n in B} ||g_n||² - 2 <sum_{n in B} g_n, m>) / N
            s = sum(q.sum() - 2 * (g * m).sum() for (q, g), m in zip(moments, mean)) / n
            torch.autograd.backward(s * scale, inputs=params)
        torch._foreach_add_(second_moments, [q.detach() for q, _ in moments])
        torch._foreach_add_(sums, batch_sums)

    if not backward:
        for x, y in batches:
            moments_of(x, y)
    else:
        states = []  # the random number generators' state before each micro-batch's first forward
        pass_1_sums = [torch.zeros_like(p) for p in params]
        for x, y in batches[:-1]:  # pass 1: the mean gradient m, held fixed in S_B
            states.append(_rng_state(x))
            torch._foreach_add_(pass_1_sums, _grads(summed_loss(x, y), params))
        moments_of(*batches[-1], pass_1_sums=pass_1_sums)
        after = _rng_state(batches[-1][0])  # as after one forward over the batch, once the replays are done
        for state, (x, y) in zip(states, batches[:-1]):  # pass 2, with pass 1's dropout masks
            _set_rng_state(state)
            moments_of(x, y)
        _set_rng_state(after)
    variances = [variance_from_moments(q, g, n) for q, g in zip(second_moments, sums)]
    return sum(v.sum() for v in variances), variances


def _block(extension, x: Tensor) -> collect:
    """A collect block whose layers must all see x's samples in dim 0 (a layer that folds them into
    dim 0, x.reshape(-1, features), would give statistics of rows, not samples: an error)."""
    block = collect(extension)
    block._expect_samples(x.shape[0])
    return block


def _grads(loss: Tensor, params: list) -> tuple:
    """d loss / d params, zeros for a parameter the loss does not depend on."""
    return torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)


def _loss_reduction(lossfunc, loss_reduction: str | None) -> str:
    declared = getattr(lossfunc, "reduction", None)
    if declared is not None and declared not in ("sum", "mean"):
        raise ValueError(
            f"{_NAME}: lossfunc.reduction is {declared!r}; lossfunc must reduce the samples' losses to a "
            "scalar, their 'sum' or their 'mean'"
        )
    if loss_reduction is None:
        if declared is None:
            raise ValueError(
                f"{_NAME}: pass loss_reduction='sum' or 'mean' (how lossfunc reduces over the samples): "
                "lossfunc has no reduction attribute to read it from"
            )
        return declared
    if loss_reduction not in ("sum", "mean"):
        raise ValueError(f"{_NAME}: loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
    if declared is not None and declared != loss_reduction:
        raise ValueError(f"{_NAME}: loss_reduction={loss_reduction!r} but lossfunc.reduction is {declared!r}")
    return loss_reduction


def _check_batch(inputs: Tensor, targets: Tensor, micro_batch_size: int | None) -> int:
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, Tensor) or t.dim() == 0:
            raise ValueError(f"{_NAME}: {name} must be a tensor with the samples in dim 0")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{_NAME}: batch size (dim 0) of targets ({targets.shape[0]}) does not match inputs ({inputs.shape[0]})"
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{_NAME}: inputs has an empty batch (N = 0)")
    if micro_batch_size is not None and (
        isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1
    ):
        raise ValueError(f"{_NAME}: micro_batch_size must be a positive int or None, got {micro_batch_size!r}")
    return inputs.shape[0]


def _rng_state(x: Tensor) -> tuple:
    """The random number generators' state before a micro-batch's first forward (dropout masks):
    the CPU's and, for CUDA inputs, that of the inputs' device."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(x.device) if x.is_cuda else None), x.device


def _set_rng_state(state: tuple) -> None:
    cpu, cuda, device = state
    torch.set_rng_state(cpu)
    if cuda is not None:  # on the device it was read from, not the current one
        torch.cuda.set_rng_state(cuda, device)
