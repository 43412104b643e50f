"""The whole-model front end (extend + collect) end to end against the per-sample loop."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from torch import nn

import gradvar_ext as gv

DIGITS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data", "digits_batch.pt"
)
ALL = (gv.Variance(), gv.SumGradSquared(), gv.BatchL2Grad())
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def per_sample_grads(model, x, y, lossfunc, create_graph=False):
    """Ground truth: [N, *param.shape] per parameter, one backward per sample."""
    params = list(model.parameters())
    rows = [
        torch.autograd.grad(lossfunc(model(x[i : i + 1]), y[i : i + 1]), params, create_graph=create_graph)
        for i in range(x.shape[0])
    ]
    return [torch.stack([r[k] for r in rows]) for k in range(len(params))]


def collect_all(model, loss, loss_reduction="sum", create_graph=False):
    with gv.collect(*ALL, loss_reduction=loss_reduction):
        loss.backward(retain_graph=create_graph, create_graph=create_graph)


def collect_with(backward, model, x, y, lossfunc, create_graph=False):
    """All statistics from ``loss.backward`` (forward before the block) or from the statistics-only
    ``collect.backward`` (forward inside the block), which must leave every ``.grad`` untouched."""
    if backward == "loss.backward":
        return collect_all(model, lossfunc(model(x), y), create_graph=create_graph)
    with gv.collect(*ALL) as stats:
        stats.backward(lossfunc(model(x), y), create_graph=create_graph)
    assert all(p.grad is None for p in model.parameters())


BACKWARDS = ("loss.backward", "collect.backward")


def assert_statistics(model, per_sample, dtype):
    for p, g in zip(model.parameters(), per_sample):
        # the variance cancels: compare it on the scale of the second moment / N
        scale = (g.square().sum(0) / g.shape[0]).max().item()
        torch.testing.assert_close(
            p.variance, g.var(0, unbiased=False), rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * max(scale, 1)
        )
        torch.testing.assert_close(p.sum_grad_squared, g.square().sum(0), **TOL[dtype])
        torch.testing.assert_close(p.batch_l2, g.square().flatten(1).sum(1), **TOL[dtype])


def seed_models():
    digits = torch.load(DIGITS)
    x_digits, y_digits = digits["images"][:16], digits["labels"][:16]
    ce, mse = nn.CrossEntropyLoss(reduction="sum"), nn.MSELoss(reduction="sum")
    return {
        "linear-2-1": (lambda: nn.Sequential(nn.Linear(2, 1, bias=False)), torch.randn(3, 2), torch.randn(3, 1), mse),
        "digits-linear": (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x_digits, y_digits, ce),
        "digits-cnn": (
            lambda: nn.Sequential(
                nn.Conv2d(1, 5, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(20, 10)
            ),
            x_digits,
            y_digits,
            ce,
        ),
        "conv-hyperparameters": (
            lambda: nn.Sequential(
                nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
                nn.Tanh(),
                nn.Conv2d(6, 6, 3, padding="same", groups=6, padding_mode="reflect"),
                nn.Flatten(),
                nn.LazyLinear(3),
            ),
            torch.randn(5, 4, 7, 6),
            torch.randint(0, 3, (5,)),
            ce,
        ),
        "conv-strided": (
            lambda: nn.Sequential(
                nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2),
                nn.Tanh(),
                nn.Flatten(),
                nn.LazyLinear(3),
            ),
            torch.randn(5, 4, 7, 6),
            torch.randint(0, 3, (5,)),
            ce,
        ),
        "conv1d": (
            lambda: nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)),
            torch.randn(4, 3, 9),
            torch.randn(4, 2),
            mse,
        ),
        "sequence-linear": (lambda: nn.Linear(6, 4), torch.randn(5, 7, 6), torch.randn(5, 7, 4), mse),
        "two-middle-dims-linear": (lambda: nn.Linear(6, 4), torch.randn(5, 3, 2, 6), torch.randn(5, 3, 2, 4), mse),
        "one-sample": (
            lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)),
            torch.randn(1, 2, 4, 4),
            torch.randn(1, 2),
            mse,
        ),
    }


def build(name, dtype, device="cpu"):
    torch.manual_seed(0)
    make, x, y, lossfunc = seed_models()[name]
    model = make()
    model(x[:1])  # materialise lazy layers
    model = gv.extend(model.to(device=device, dtype=dtype))
    x = x.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=dtype) if y.is_floating_point() else y.to(device)
    return model, x, y, lossfunc


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(seed_models()))
def test_statistics_match_per_sample_loop(name, dtype, backward):
    model, x, y, lossfunc = build(name, dtype)
    collect_with(backward, model, x, y, lossfunc)
    assert_statistics(model, per_sample_grads(model, x, y, lossfunc), dtype)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(seed_models()))
def test_gradient_of_total_variance_matches_per_sample_loop(name, dtype, backward):
    model, x, y, lossfunc = build(name, dtype)
    params = list(model.parameters())
    collect_with(backward, model, x, y, lossfunc, create_graph=True)
    ours = torch.autograd.grad(sum(p.variance.sum() for p in params), params)
    gv.clear(model)
    model.zero_grad(set_to_none=True)  # the create_graph grads hold the graph
    loop = per_sample_grads(model, x, y, lossfunc, create_graph=True)
    want = torch.autograd.grad(sum(g.var(0, unbiased=False).sum() for g in loop), params)
    for a, b in zip(ours, want):
        torch.testing.assert_close(
            a, b, rtol=TOL[dtype]["rtol"] * 10, atol=TOL[dtype]["atol"] * 10 * max(1, b.abs().max().item())
        )


def test_one_sample_has_zero_variance():
    model, x, y, lossfunc = build("one-sample", torch.float64)
    collect_all(model, lossfunc(model(x), y))
    for p in model.parameters():
        assert torch.equal(p.variance, torch.zeros_like(p))


@pytest.mark.parametrize("name", ["digits-cnn", "sequence-linear"])
def test_mean_reduction_gives_statistics_of_per_sample_loss_gradients(name):
    """loss_reduction="mean" multiplies the backpropagated gradients by N: for a loss that averages
    over the batch, that gives the statistics of the per-sample losses' gradients."""
    model, x, y, lossfunc = build(name, torch.float64)
    mean_loss = type(lossfunc)(reduction="mean")
    per_sample_loss = lossfunc
    if isinstance(lossfunc, nn.MSELoss):  # MSE's mean also divides by the elements of one sample
        elements = y[0].numel()
        per_sample_loss = lambda out, t: nn.functional.mse_loss(out, t, reduction="sum") / elements  # noqa: E731
    collect_all(model, mean_loss(model(x), y), loss_reduction="mean")
    assert_statistics(model, per_sample_grads(model, x, y, per_sample_loss), torch.float64)


class Reuse(nn.Module):
    """One Linear and one grouped Conv2d, each called twice in a forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.conv(torch.tanh(self.conv(x))).flatten(1)[:, :4]
        return self.lin(torch.sigmoid(self.lin(h)))


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reused_layers_get_statistics_of_their_total_gradient(dtype, backward):
    torch.manual_seed(1)
    model = gv.extend(Reuse().to(dtype))
    x, y = torch.randn(5, 2, 4, 4, dtype=dtype), torch.randn(5, 4, dtype=dtype)
    lossfunc = nn.MSELoss(reduction="sum")
    collect_with(backward, model, x, y, lossfunc)
    assert_statistics(model, per_sample_grads(model, x, y, lossfunc), dtype)


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize(
    "layer, shape", [(nn.Linear(3, 3), (3,)), (nn.Conv2d(2, 2, 3), (2, 5, 5))], ids=["linear", "conv2d"]
)
def test_a_layer_called_on_batches_of_different_sizes_is_an_error(layer, shape, backward):
    """Its statistics add the calls' gradients sample by sample: every call needs the same N."""
    layer = gv.extend(layer)

    def loss():
        return layer(torch.randn(4, *shape)).sum() + layer(torch.randn(2, *shape)).sum()

    match = rf"{type(layer).__name__} .* was called 2 times in one forward with batch sizes \[2, 4\]"
    with pytest.raises(ValueError, match=match):
        if backward == "loss.backward":
            with gv.collect(gv.Variance()):
                loss().backward()
        else:
            with gv.collect(gv.Variance()) as stats:
                stats.backward(loss())


class FoldsSamples(nn.Module):
    """A sequence model whose head sees the samples' positions folded into dim 0 ([N * T, hidden])."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(4, 8), nn.Linear(8, 1)

    def forward(self, x):  # [N, T, 4]
        return self.head(self.embed(x).reshape(-1, 8)).reshape(x.shape[0], -1).sum(1)


@pytest.mark.parametrize("backward", BACKWARDS)
def test_layers_that_see_different_batches_in_one_block_are_an_error(backward):
    """[N * T, hidden] rows are not samples: their 'per-sample' statistics would be wrong, silently."""
    model = gv.extend(FoldsSamples())
    x, y, lossfunc = torch.randn(5, 3, 4), torch.randn(5), nn.MSELoss(reduction="sum")
    with pytest.raises(ValueError, match=r"Linear \(8, 4\) got a batch of 5 where Linear \(1, 8\) had 15"):
        collect_with(backward, model, x, y, lossfunc)
    model.embed.requires_grad_(False)  # the head alone: total_variance knows N
    for micro_batch_size, rows, samples in ((None, 15, 5), (2, 3, 1)):  # 5 = 1 + 2 + 2: the remainder first
        match = rf"Linear \(1, 8\) got a batch of {rows} where the micro-batch had {samples} in"
        with pytest.raises(ValueError, match=match):
            gv.total_variance(model, lossfunc, x, y, micro_batch_size=micro_batch_size)


def test_unsupported_parameterised_layer_is_an_error_naming_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"layer '1' \(BatchNorm1d\) has trainable parameters.*Linear, Conv1d, Conv2d"):
        gv.extend(model)
    model[1].requires_grad_(False)  # frozen: fine
    gv.extend(model)


class AttentionThenLinear(nn.Module):
    """nn.MultiheadAttention uses its out_proj (a Linear) by weight, never calling it."""

    def __init__(self):
        super().__init__()
        self.attention, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 1)
        self.attention.in_proj_weight.requires_grad_(False)  # not a supported layer: frozen
        self.attention.in_proj_bias.requires_grad_(False)

    def forward(self, x):
        return self.head(self.attention(x, x, x)[0]).sum((1, 2))


BYPASSED = r"the loss depends on the parameters of NonDynamicallyQuantizableLinear \(4, 4\), but .*used directly"


@pytest.mark.parametrize("backward", BACKWARDS)
def test_a_parameter_used_without_calling_its_layer_is_an_error_not_a_missing_statistic(backward):
    model = gv.extend(AttentionThenLinear())
    x, y, lossfunc = torch.randn(5, 3, 4), torch.randn(5), nn.MSELoss(reduction="sum")
    if backward == "loss.backward":  # .grad exists already: the block's backward accumulates into it
        lossfunc(model(x), y).backward()
    with pytest.raises(RuntimeError, match=BYPASSED):
        collect_with(backward, model, x, y, lossfunc)
    model.zero_grad(set_to_none=True)
    assert not hasattr(model.head.weight, "variance")  # nothing half-set
    with pytest.raises(RuntimeError, match=BYPASSED):  # was: total variance without out_proj's, silently
        gv.total_variance(model, lossfunc, x, y, micro_batch_size=2, backward=True)
    model.attention.out_proj.requires_grad_(False)  # frozen: the rest is fine
    total = gv.total_variance(model, lossfunc, x, y)
    head = (model.head.weight, model.head.bias)
    rows = [torch.autograd.grad(lossfunc(model(x[n : n + 1]), y[n : n + 1]), head) for n in range(5)]
    torch.testing.assert_close(total, sum(torch.stack(g).var(0, unbiased=False).sum() for g in zip(*rows)))


def test_a_forward_before_extend_is_an_error_in_the_block():
    plain = nn.Linear(6, 6)
    out = plain(torch.randn(3, 6))  # before extend: no hook saw its input
    gv.extend(plain)
    with (
        pytest.raises(RuntimeError, match=r"Linear \(6, 6\), but the backward reached them without a call"),
        gv.collect(gv.Variance()),
    ):
        out.sum().backward()  # the error comes as the block ends
    assert not hasattr(plain.weight, "variance")


def test_collect_backward_through_a_forward_before_the_block_is_an_error():
    """collect.backward takes the statistics of the calls inside its block: a layer called before
    it would be left out, so the loss must not depend on it."""
    model = gv.extend(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)))
    x = torch.randn(4, 3)
    hidden = model[1](model[0](x))  # before the block
    with gv.collect(gv.Variance()) as stats:
        with pytest.raises(RuntimeError, match=r"Linear \(3, 3\), but no call of that layer ran inside this block"):
            stats.backward(model[2](hidden).sum())
    model[0].requires_grad_(False)  # frozen: nothing to leave out
    with gv.collect(gv.Variance()) as stats:
        stats.backward(model[2](hidden.detach()).sum())
    assert model[2].weight.variance.shape == (1, 3)


def test_tied_weights_of_two_layers_are_an_error():
    first, second = nn.Linear(3, 3), nn.Linear(3, 3)
    second.weight = first.weight
    model = gv.extend(nn.Sequential(first, nn.Tanh(), second))
    for backward in BACKWARDS:
        with pytest.raises(RuntimeError, match=r"Linear \(3, 3\) and Linear \(3, 3\) share a parameter"):
            collect_with(backward, model, torch.randn(5, 3), torch.randn(5, 3), nn.MSELoss(reduction="sum"))
        model.zero_grad(set_to_none=True)


def test_gradients_of_layers_outside_the_block_forward_are_no_bypass():
    """Writes to .grad that are not a backward through a parameter: no error. An inner block's
    statistics cover its layers for the enclosing block."""
    model, x, y, lossfunc = build("sequence-linear", torch.float64)
    idle = gv.extend(nn.Linear(2, 2))  # extended, not run in the blocks below
    idle(torch.randn(3, 2)).sum().backward()
    with gv.collect(gv.Variance()) as stats:
        idle.zero_grad(set_to_none=False)  # an in-place zero, not a gradient
        stats.backward(lossfunc(model(x), y))
    with gv.collect(gv.SumGradSquared()):
        with gv.collect(gv.Variance()):
            lossfunc(model(x), y).backward()
    assert hasattr(model.weight, "variance") and not hasattr(model.weight, "sum_grad_squared")


@pytest.mark.parametrize("backward", BACKWARDS)
def test_extending_part_of_a_model_gives_that_parts_statistics(backward):
    """gv.extend(model[k]): its layers get statistics, the rest none and no error; the gradient of
    their variance still reaches every parameter (through the extended layers' inputs)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4), nn.Tanh(), nn.Linear(4, 2))
    model = model.double()
    gv.extend(model[3])
    x, y = torch.randn(6, 1, 4, 4, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    lossfunc = nn.MSELoss(reduction="sum")
    collect_with(backward, model, x, y, lossfunc, create_graph=True)
    part = list(model[3].parameters())
    assert all(not hasattr(p, "variance") for m in (model[0], model[5]) for p in m.parameters())
    ours = torch.autograd.grad(sum(p.variance.sum() for p in part), list(model.parameters()))
    stats = [(p.variance.detach(), p.sum_grad_squared.detach(), p.batch_l2.detach()) for p in part]
    gv.clear(model)
    model.zero_grad(set_to_none=True)
    loop = per_sample_grads(model, x, y, lossfunc, create_graph=True)[2:4]  # model[3]'s weight and bias
    for (variance, second, l2), g in zip(stats, loop):
        torch.testing.assert_close(variance, g.var(0, unbiased=False).detach(), **TOL[torch.float64])
        torch.testing.assert_close(second, g.square().sum(0).detach(), **TOL[torch.float64])
        torch.testing.assert_close(l2, g.square().flatten(1).sum(1).detach(), **TOL[torch.float64])
    want = torch.autograd.grad(sum(g.var(0, unbiased=False).sum() for g in loop), list(model.parameters()))
    assert want[0].abs().max() > 0  # the first conv's parameters get a gradient
    for a, b in zip(ours, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9 * max(1, b.abs().max().item()))


@pytest.mark.parametrize(
    ("layer", "sample", "shape"),
    [
        (nn.Linear(3, 2), (3,), r"\[N, \*, in_features\]"),
        (nn.Conv1d(2, 3, 3), (2, 5), r"\[N, C, L\]"),
        (nn.Conv2d(2, 3, 3), (2, 5, 5), r"\[N, C, H, W\]"),
    ],
    ids=["linear", "conv1d", "conv2d"],
)
def test_unbatched_input_is_an_error_naming_the_layer(layer, sample, shape):
    """PyTorch's layers take a single unbatched sample; per-sample statistics cannot."""
    model = gv.extend(layer)
    x = torch.randn(*sample)
    model(x).sum().backward()  # outside a block the extended layer works as before
    dims = ", ".join(map(str, sample))
    match = rf"{type(layer).__name__} got an input of shape \[{dims}\], without a batch dimension.*{shape}"
    with gv.collect(gv.Variance()) as stats, pytest.raises(ValueError, match=match):
        stats.backward(model(x).sum())


@pytest.mark.parametrize("name", ["digits-cnn", "conv-hyperparameters", "sequence-linear"])
def test_dp_sgd_clipping_recipe_matches_per_sample_loop(name):
    """The README's DP-SGD recipe: per-sample norms from BatchL2Grad, then one backward of the
    losses weighted by the clip factors gives sum_n min(1, C / ||g_n||) g_n in .grad."""
    model, x, y, lossfunc = build(name, torch.float64)
    per_sample_lossfunc = type(lossfunc)(reduction="none")
    # the recipe
    with gv.collect(gv.BatchL2Grad()) as stats:
        losses = per_sample_lossfunc(model(x), y).reshape(x.shape[0], -1).sum(1)  # one loss per sample
        stats.backward(losses.sum(), retain_graph=True)
    norms = sum(p.batch_l2 for p in model.parameters()).sqrt()
    max_norm = norms.median().item()  # clips about half of the samples
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    (losses * factors).sum().backward()
    gv.clear(model)
    # the per-sample loop
    grads = per_sample_grads(model, x, y, lossfunc)
    norms_want = torch.stack([g.flatten(1).square().sum(1) for g in grads]).sum(0).sqrt()
    torch.testing.assert_close(norms, norms_want)
    factors_want = (max_norm / (norms_want + 1e-6)).clamp(max=1.0)
    assert 0 < int((factors_want < 1).sum()) < x.shape[0]  # some clipped, some not
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, (factors_want.reshape((-1,) + (1,) * (g.dim() - 1)) * g).sum(0))


def test_results_without_create_graph_hold_no_graph():
    model, x, y, lossfunc = build("digits-cnn", torch.float32)
    collect_all(model, lossfunc(model(x), y))
    for p in model.parameters():
        for name in ("variance", "sum_grad_squared", "batch_l2"):
            assert getattr(p, name).grad_fn is None and not getattr(p, name).requires_grad


def test_statistics_without_create_graph_run_below_autograd(monkeypatch):
    """Without create_graph nothing joins a graph, so the block calls the ops with autograd's
    dispatch keys excluded: no autograd wrapper a call (torch.library's, in Python). Seen from
    the op calls themselves; the values are those of the per-sample loop."""
    from gradvar_ext import ops

    calls, real = [], ops._ops

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                excluded = torch._C._dispatch_tls_is_dispatch_key_excluded(torch._C.DispatchKey.AutogradFunctionality)
                calls.append((name, excluded))
                return getattr(real, name)(*args)

            return call

    monkeypatch.setattr(ops, "_ops", Spy())
    model = gv.extend(nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(), nn.Linear(3, 2, bias=False)).double())
    x = torch.randn(5, 4, dtype=torch.float64)
    with gv.collect(gv.Variance(), gv.SumGradSquared()):
        model(x).pow(2).sum().backward()
    assert sorted(calls) == sorted([("linear_variance", True), ("linear_second_moment", True)] * 2)
    grads = per_sample_grads(model, x, torch.zeros(5, 2, dtype=torch.float64), lambda out, _: out.pow(2).sum())
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.variance, g.var(0, unbiased=False), **TOL[torch.float64])
        torch.testing.assert_close(p.sum_grad_squared, g.pow(2).sum(0), **TOL[torch.float64])


def test_repeated_collects_leave_no_stale_results_and_free_graphs():
    model, x, y, lossfunc = build("digits-cnn", torch.float64)
    collect_all(model, lossfunc(model(x), y), create_graph=True)
    first = weakref.ref(model[0].weight.variance)
    # Second backward reaches only the last layer: earlier layers must not keep the first results.
    head_only = lossfunc(model[4](model[:4](x).detach()), y)
    collect_all(model, head_only)
    for p in model[0].parameters():
        assert not hasattr(p, "variance")
    truth = per_sample_grads(model[4], model[:4](x).detach(), y, lossfunc)
    torch.testing.assert_close(model[4].weight.variance, truth[0].var(0, unbiased=False))
    for p in model.parameters():
        p.grad = None  # the create_graph grads hold the graph too, as in plain PyTorch
    gc.collect()
    assert first() is None  # the first block's differentiable results (and their graph) are gone


def test_forward_without_collect_keeps_nothing():
    model, x, y, lossfunc = build("sequence-linear", torch.float32)
    inp = x.clone().requires_grad_(True)
    ref = weakref.ref(inp)
    out = model(inp)
    del inp, out
    gc.collect()
    assert ref() is None


def test_extending_twice_records_each_call_once():
    model, x, y, lossfunc = build("sequence-linear", torch.float64)
    gv.extend(model)
    collect_all(model, lossfunc(model(x), y))
    assert_statistics(model, per_sample_grads(model, x, y, lossfunc), torch.float64)


@pytest.mark.parametrize("layer, shape", [(nn.Linear(3, 2), (4, 3)), (nn.Conv2d(2, 3, 3), (4, 2, 5, 5))], ids=str)
def test_a_layer_called_with_its_input_as_keyword_gets_the_same_statistics(layer, shape):
    layer = gv.extend(layer.double())
    x = torch.randn(*shape, dtype=torch.float64)
    results = []
    for call in (lambda: layer(x), lambda: layer(input=x)):  # nn.Module hooks see only positional args
        with gv.collect(gv.Variance(), gv.BatchL2Grad()) as stats:
            stats.backward(call().pow(3).sum())
        results.append((layer.weight.variance, layer.weight.batch_l2, layer.bias.variance))
    expected = [torch.stack(rows).var(0, unbiased=False) for rows in zip(*per_sample_grads_of(layer, x))]
    for got in results:
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[2], expected[1])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def per_sample_grads_of(layer, x):
    """Each sample's (weight, bias) gradient of sum(layer(x_n) ** 3), by autograd one sample at a time."""
    return [torch.autograd.grad(layer(x[n : n + 1]).pow(3).sum(), (layer.weight, layer.bias)) for n in range(len(x))]


@pytest.mark.parametrize("extend_again", [False, True], ids=["copy", "copy-extended"])
def test_a_deep_copy_of_an_extended_model_is_extended_once(extend_again, tmp_path):
    """A deep copy (or a pickled model) keeps the forward hook; extend must not add a second one,
    which would count every call twice (4x the variance)."""
    import copy

    model, x, y, lossfunc = build("digits-cnn", torch.float64)
    twin = copy.deepcopy(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    for other in (twin, loaded):
        if extend_again:
            gv.extend(other)
        assert all(len(m._forward_hooks) == 1 for m in other.modules() if isinstance(m, gv.frontend.SUPPORTED))
        collect_all(other, lossfunc(other(x), y))
        assert_statistics(other, per_sample_grads(other, x, y, lossfunc), torch.float64)
        with gv.collect(gv.SumGradSquared()):  # a new block clears the copy's earlier results too
            pass
        assert not any(hasattr(p, "variance") for p in other.parameters())


def test_collect_rejects_bad_arguments():
    with pytest.raises(TypeError, match="gradvar_ext.collect: expected Variance"):
        gv.collect("variance")
    with pytest.raises(ValueError, match="loss_reduction must be 'sum' or 'mean'"):
        gv.collect(gv.Variance(), loss_reduction="batchmean")


@pytest.mark.parametrize("name", ["digits-linear", "digits-cnn", "conv-strided", "sequence-linear"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # BackPACK's module hooks
def test_agrees_with_backpack_where_backpack_is_right(name):
    """Same names, same numbers as BackPACK (an optional dependency: skipped when not installed).
    Where BackPACK differs, ours must be the one that matches the per-sample loop (seen: BackPACK
    1.7.1's BatchL2Grad for the grouped, strided, dilated conv of "conv-strided"). Not on
    "conv-hyperparameters": BackPACK fails on padding='same' and other padding modes."""
    backpack = pytest.importorskip("backpack")
    from backpack import extensions

    model, x, y, lossfunc = build(name, torch.float64)
    collect_all(model, lossfunc(model(x), y))
    fields = ("variance", "sum_grad_squared", "batch_l2")
    ours = [{f: getattr(p, f) for f in fields} for p in model.parameters()]
    bp_model, bp_loss = backpack.extend(model), backpack.extend(lossfunc)
    with backpack.backpack(extensions.Variance(), extensions.SumGradSquared(), extensions.BatchL2Grad()):
        bp_loss(bp_model(x), y).backward()
    loop = per_sample_grads(model, x, y, lossfunc)
    agreed = 0
    for p, mine, g in zip(model.parameters(), ours, loop):
        truth = {
            "variance": g.var(0, unbiased=False),
            "sum_grad_squared": g.square().sum(0),
            "batch_l2": g.square().flatten(1).sum(1),
        }
        for f in fields:
            if torch.allclose(mine[f], getattr(p, f)):
                agreed += 1
            else:
                torch.testing.assert_close(mine[f], truth[f])
                assert not torch.allclose(getattr(p, f), truth[f])
    assert agreed >= 3 * len(ours) - 1


def test_two_backward_passes_through_one_forward_are_an_error():
    """They would otherwise count each layer call twice (2 g_n): refuse instead of a wrong number."""
    model, x, y, lossfunc = build("sequence-linear", torch.float64)
    loss = lossfunc(model(x), y)
    with pytest.raises(RuntimeError, match="a second backward pass reached the same forward call of Linear"):
        with gv.collect(gv.Variance()):
            loss.backward(retain_graph=True)
            loss.backward()
    assert not hasattr(model.weight, "variance")


def test_statistics_only_backward_refuses_what_it_cannot_do():
    model, x, y, lossfunc = build("sequence-linear", torch.float64)
    loss = lossfunc(model(x), y)
    with gv.collect(gv.Variance()) as stats, pytest.raises(RuntimeError, match="run the forward inside it"):
        stats.backward(loss)  # the forward ran before the block
    with pytest.raises(RuntimeError, match=r"call it inside its `with` block"):
        stats.backward(loss)
    plain = nn.Linear(6, 4).double()  # not extended
    with gv.collect(gv.Variance()) as stats:
        model(x)  # an extended layer ran, but the loss does not use it
        with pytest.raises(RuntimeError, match="does not depend on the output of any extended layer"):
            stats.backward(lossfunc(plain(x), y))


def test_statistics_only_backward_releases_the_graph_with_the_block():
    model, x, y, lossfunc = build("digits-cnn", torch.float64)
    inp = x.clone()  # saved by the first conv's graph node, which the block's gradient edges hold
    ref = weakref.ref(inp)
    with gv.collect(gv.Variance()) as stats:
        stats.backward(lossfunc(model(inp), y))
    del inp
    gc.collect()
    assert ref() is None and model[0].weight.variance.grad_fn is None


def test_nested_collect_blocks_each_get_their_own_statistics():
    model, x, y, lossfunc = build("sequence-linear", torch.float64)
    extensions = (gv.SumGradSquared(),)  # the same extension objects: blocks differ only by identity
    with gv.collect(*extensions) as outer:
        with gv.collect(*extensions):
            pass  # an empty inner block must leave the outer one active
        outer.backward(lossfunc(model(x), y))
        with gv.collect(*extensions) as inner:
            inner.backward(lossfunc(2 * model(x), y))
        inner_result = model.weight.sum_grad_squared
    g = per_sample_grads(model, x, y, lossfunc)[0]
    torch.testing.assert_close(model.weight.sum_grad_squared, g.square().sum(0), **TOL[torch.float64])
    g2 = per_sample_grads(model, x, y, lambda out, t: lossfunc(2 * out, t))[0]
    torch.testing.assert_close(inner_result, g2.square().sum(0), **TOL[torch.float64])


@pytest.mark.parametrize("backward", BACKWARDS)
def test_a_layers_inputs_and_gradients_are_released_during_the_backward(backward):
    """Once every forward call of a layer has its gradient, its statistics are computed and its
    (input, grad_output) let go in the backward itself: the block does not hold a batch of them
    to its end (so job (a)'s memory beyond a plain backward stays flat in N). Results unchanged."""
    torch.manual_seed(0)
    first, middle, last = (gv.extend(nn.Linear(6, 6).double()) for _ in range(3))
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    seen = {}

    def at_first_layer(_):  # runs after the last layer's backward (and the block's work on it)
        gc.collect()
        seen["held"] = (seen["input"]() is not None, seen["grad_output"]() is not None)

    def forward():
        out = first(x)
        out.register_hook(at_first_layer)
        h = torch.tanh(middle(torch.tanh(out)))
        seen["input"] = weakref.ref(h)
        out = last(h)
        out.register_hook(lambda g: seen.update(grad_output=weakref.ref(g)))
        return ((out - y) ** 2).sum()

    model = nn.Sequential(first, nn.Tanh(), middle, nn.Tanh(), last)
    if backward == "loss.backward":
        loss = forward()
        with gv.collect(*ALL):
            loss.backward()
    else:
        with gv.collect(*ALL) as stats:
            stats.backward(forward())
    assert seen["held"] == (False, False)
    assert_statistics(model, per_sample_grads(model, x, y, nn.MSELoss(reduction="sum")), torch.float64)


def test_a_forward_call_backpropagated_once_cannot_feed_a_later_block():
    """The first backward through a forward call takes the layer input it held; a later block
    that backpropagates the same (retained) graph is refused by name, not given wrong numbers."""
    model, x, y, lossfunc = build("sequence-linear", torch.float64)
    loss = lossfunc(model(x), y)
    loss.backward(retain_graph=True)  # outside any block: an ordinary training step
    with pytest.raises(RuntimeError, match="an earlier backward already went through"):
        with gv.collect(gv.Variance()):
            loss.backward()
    assert not hasattr(model.weight, "variance")


def test_a_pending_call_of_another_graph_defers_the_statistics_to_the_block_exit():
    """A live forward call that this backward does not reach (here: a second forward whose graph
    is kept) leaves the layer's statistics to the block's exit: still those of the calls that
    got a gradient inside it."""
    model, x, y, lossfunc = build("sequence-linear", torch.float64)
    kept = model(x)  # a live call that never gets a gradient
    with gv.collect(gv.SumGradSquared()) as stats:
        stats.backward(lossfunc(model(x), y))
    g = per_sample_grads(model, x, y, lossfunc)[0]
    torch.testing.assert_close(model.weight.sum_grad_squared, g.square().sum(0), **TOL[torch.float64])
    del kept


def test_two_forward_and_backward_passes_in_one_block_are_an_error():
    """Micro-batches in one block would mix different samples in one statistic: refused by name."""
    model, x, y, lossfunc = build("sequence-linear", torch.float64)
    with pytest.raises(RuntimeError, match="Linear got gradients from a forward pass that ran after"):
        with gv.collect(gv.Variance()):
            lossfunc(model(x[:3]), y[:3]).backward()
            lossfunc(model(x[3:]), y[3:]).backward()
    assert not hasattr(model.weight, "variance")


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_gives_the_statistics_of_the_plain_model(use_reentrant):
    """torch.utils.checkpoint recomputes the forward during the backward, which makes new forward
    calls of the extended layers: the statistics must still be those of the per-sample loop."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(2)
    body = gv.extend(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6)).double())
    head = gv.extend(nn.Linear(6, 2).double())
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    lossfunc = nn.MSELoss(reduction="sum")

    def model(inp):
        return head(torch.tanh(checkpoint(body, inp, use_reentrant=use_reentrant)))

    with gv.collect(*ALL):
        lossfunc(model(x.clone().requires_grad_(use_reentrant)), y).backward()
    plain = nn.Sequential(body, nn.Tanh(), head)
    assert_statistics(plain, per_sample_grads(plain, x, y, lossfunc), torch.float64)


def test_statistics_of_a_scaled_loss_are_scaled_by_its_square():
    """The README's GradScaler note: statistics of scaler.scale(loss)'s gradients / scale**2."""
    model, x, y, lossfunc = build("digits-cnn", torch.float64)
    results = []
    for scale in (1.0, 1024.0):
        with gv.collect(*ALL) as stats:
            stats.backward(lossfunc(model(x), y) * scale)
        results.append([getattr(p, e.savefield) / scale**2 for p in model.parameters() for e in ALL])
    for unscaled, scaled in zip(*results):
        torch.testing.assert_close(scaled, unscaled, **TOL[torch.float64])


def test_unextend_removes_the_hooks_and_the_statistics_of_those_layers_only():
    """unextend(model[k]): its layers run hook-free and get no statistics (their old ones are
    deleted); the layers still extended get the per-sample loop's statistics; extend undoes it."""
    model, x, y, lossfunc = build("digits-cnn", torch.float64)
    own_hook_calls = []
    model[0].register_forward_hook(lambda *args: own_hook_calls.append(1))  # a user's hook stays
    collect_all(model, lossfunc(model(x), y), create_graph=True)
    assert gv.unextend(model[0]) is model[0]
    assert not any(hasattr(p, name) for p in model[0].parameters() for name in ("variance", "batch_l2"))
    assert hasattr(model[4].weight, "variance")  # the rest keep theirs until the next block
    assert len(model[0]._forward_hooks) == 1 and len(model[4]._forward_hooks) == 1
    model.zero_grad(set_to_none=True)
    for backward in BACKWARDS:
        collect_with(backward, model, x, y, lossfunc)
        assert not any(hasattr(p, "variance") for p in model[0].parameters())
        assert_statistics(model[4], per_sample_grads(model, x, y, lossfunc)[2:], torch.float64)
        model.zero_grad(set_to_none=True)
    gv.extend(model)
    collect_all(model, lossfunc(model(x), y))
    assert_statistics(model, per_sample_grads(model, x, y, lossfunc), torch.float64)
    assert len(own_hook_calls) > 0 and len(model[0]._forward_hooks) == 2
    import copy

    gv.unextend(copy.deepcopy(model))  # a copy's hooks are its own: the model stays extended
    model.zero_grad(set_to_none=True)
    collect_all(model, lossfunc(model(x), y))
    assert_statistics(model, per_sample_grads(model, x, y, lossfunc), torch.float64)


def test_unextend_drops_a_pending_forward_and_its_held_input():
    model, x, y, lossfunc = build("sequence-linear", torch.float64)
    inp = x.clone().requires_grad_(True)
    loss = lossfunc(model(inp), y)
    (call,) = gv.frontend._CALLS[model]
    assert call.input is inp
    gv.unextend(model)
    assert call.input is None and model not in gv.frontend._EXTENDED
    with gv.collect(gv.Variance()):
        loss.backward()  # the dropped call's gradient is ignored: no statistics, no error
    assert not hasattr(model.weight, "variance") and model.weight.grad is not None
    loss = lossfunc(model(x), y)  # unextended: nothing held
    gv.extend(model)  # extended again before the backward: that forward's statistics are missing
    with pytest.raises(RuntimeError, match=r"Linear \(4, 6\).*a forward that ran before gradvar_ext.extend"):
        with gv.collect(gv.Variance()):
            loss.backward()


def test_unextend_inside_a_block_or_of_a_non_module_is_an_error():
    model, x, y, lossfunc = build("sequence-linear", torch.float64)
    with pytest.raises(RuntimeError, match="gradvar_ext.unextend: called inside a collect block"):
        with gv.collect(gv.Variance()):
            gv.unextend(model)
    assert any(hook is gv.frontend._on_forward for hook in model._forward_hooks.values())
    with pytest.raises(TypeError, match="gradvar_ext.unextend: expected an nn.Module, got str"):
        gv.unextend("model")
    plain = nn.Linear(2, 2)
    assert gv.unextend(plain) is plain and len(plain._forward_hooks) == 0  # never extended: as it was
