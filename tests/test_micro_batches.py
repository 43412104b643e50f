"""gradvar_ext.total_variance: the total variance and its gradient a micro-batch at a time,
against the per-sample loop, for every split of the batch."""

from __future__ import annotations

import pytest
import torch
from bench_variance import cpu_peak_bytes  # the benchmark's own memory measurement (conftest: on sys.path)
from test_frontend import TOL, Reuse, build, per_sample_grads, seed_models
from torch import nn

import gradvar_ext as gv

SPLITS = (None, 1, 2, 3)  # the whole batch at once; micro-batches of 1, 2, 3 samples (3 rarely divides N)


def loop_total_variance(model, x, y, lossfunc):
    """Ground truth: total variance, its gradient and the per-parameter variances from the loop."""
    params = list(model.parameters())
    per_sample = per_sample_grads(model, x, y, lossfunc, create_graph=True)
    variances = [g.var(0, unbiased=False) for g in per_sample]
    total = sum(v.sum() for v in variances)
    return total.detach(), torch.autograd.grad(total, params), [v.detach() for v in variances]


def assert_close(a, b, dtype, factor=1):
    tol = TOL[dtype]
    torch.testing.assert_close(
        a, b, rtol=tol["rtol"] * factor, atol=tol["atol"] * factor * max(1.0, b.abs().max().item())
    )


@pytest.mark.parametrize("backward", [False, True], ids=["variance", "and-its-gradient"])
@pytest.mark.parametrize("micro_batch_size", SPLITS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(seed_models()))
def test_matches_per_sample_loop_for_every_split(name, dtype, micro_batch_size, backward):
    model, x, y, lossfunc = build(name, dtype)
    total_want, grads_want, variances_want = loop_total_variance(model, x, y, lossfunc)
    model.zero_grad(set_to_none=True)
    total = gv.total_variance(model, lossfunc, x, y, micro_batch_size=micro_batch_size, backward=backward)
    assert total.grad_fn is None and total.shape == ()
    assert_close(total, total_want, dtype, factor=10)
    for p, grad_want, variance_want in zip(model.parameters(), grads_want, variances_want):
        assert p.variance.grad_fn is None
        assert_close(p.variance, variance_want, dtype, factor=10)
        if backward:
            assert_close(p.grad, grad_want, dtype, factor=10)
        else:
            assert p.grad is None
    assert not any(hasattr(p, "sum_grad_squared") for p in model.parameters())


@pytest.mark.parametrize("micro_batch_size", [None, 2], ids=str)
def test_layers_called_twice_per_forward(micro_batch_size):
    """A Linear and a grouped Conv2d each called twice: the moments of their total gradient."""
    torch.manual_seed(1)
    model = Reuse().double()
    x, y = torch.randn(5, 2, 4, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    lossfunc = nn.MSELoss(reduction="sum")
    total_want, grads_want, variances_want = loop_total_variance(model, x, y, lossfunc)
    total = gv.total_variance(model, lossfunc, x, y, micro_batch_size=micro_batch_size, backward=True)
    assert_close(total, total_want, torch.float64)
    for p, grad_want, variance_want in zip(model.parameters(), grads_want, variances_want):
        assert_close(p.variance, variance_want, torch.float64)
        assert_close(p.grad, grad_want, torch.float64)


def test_the_pass_for_the_mean_gradient_runs_over_the_smaller_micro_batches():
    """N = 7 in micro-batches of 3: (1, 3, 3), the remainder first, so that the plain pass for the
    mean gradient (all micro-batches but the last) forms 4 samples' gradients, not 6; then the
    last micro-batch's double backward, then the others'. Numbers as the loop's."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    lossfunc = nn.MSELoss(reduction="sum")
    total_want, grads_want, _ = loop_total_variance(model, x, y, lossfunc)
    sizes = []
    model[0].register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    total = gv.total_variance(model, lossfunc, x, y, micro_batch_size=3, backward=True)
    assert sizes == [1, 3, 3, 1, 3]  # pass 1: 1 + 3 samples; the last; pass 2
    assert_close(total, total_want, torch.float64)
    for p, grad_want in zip(model.parameters(), grads_want):
        assert_close(p.grad, grad_want, torch.float64)


def test_scale_multiplies_the_gradient_which_accumulates_into_grad():
    model, x, y, lossfunc = build("digits-cnn", torch.float64)
    _, grads_want, _ = loop_total_variance(model, x, y, lossfunc)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    gv.total_variance(model, lossfunc, x, y, micro_batch_size=5, backward=True, scale=-0.5)
    for p, want in zip(params, grads_want):
        torch.testing.assert_close(p.grad, 1 - 0.5 * want)


@pytest.mark.parametrize("micro_batch_size", [None, 4], ids=str)
def test_mean_reduction_is_read_from_the_loss(micro_batch_size):
    """A loss that averages: statistics of the per-sample losses' gradients, whatever the split."""
    model, x, y, _ = build("digits-cnn", torch.float64)
    mean_loss = nn.CrossEntropyLoss()  # reduction="mean", read from the module
    total_want, grads_want, _ = loop_total_variance(model, x, y, mean_loss)
    total = gv.total_variance(model, mean_loss, x, y, micro_batch_size=micro_batch_size, backward=True)
    torch.testing.assert_close(total, total_want)
    for p, want in zip(model.parameters(), grads_want):
        torch.testing.assert_close(p.grad, want)


def check_dropout_replay(device: str) -> None:
    """Train-mode dropout: pass 2 replays pass 1's random state, so each micro-batch's per-sample
    gradients are those of the masks its single forward draws (as the reference below sees them),
    and the generator ends where one forward per micro-batch leaves it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 3))
    model = gv.extend(model.to(device=device, dtype=torch.float64))
    x, y = torch.randn(7, 6, dtype=torch.float64, device=device), torch.randint(0, 3, (7,), device=device)
    lossfunc, params = nn.CrossEntropyLoss(), list(model.parameters())
    torch.manual_seed(1)
    per_sample = []
    micro_batches = list(zip(x.split(3), y.split(3)))
    micro_batches.insert(0, micro_batches.pop())  # total_variance's order: (1, 3, 3), the remainder first
    for xb, yb in micro_batches:  # one forward per micro-batch, gradients per sample
        out = model(xb)
        for i in range(xb.shape[0]):
            per_sample.append(torch.autograd.grad(lossfunc(out[i : i + 1], yb[i : i + 1]), params, create_graph=True))
    state_want = torch.cuda.get_rng_state(device) if device != "cpu" else torch.get_rng_state()
    total_want = sum(torch.stack([g[k] for g in per_sample]).var(0, unbiased=False).sum() for k in range(4))
    grads_want = torch.autograd.grad(total_want, params)
    torch.manual_seed(1)
    total = gv.total_variance(model, lossfunc, x, y, micro_batch_size=3, backward=True)
    state = torch.cuda.get_rng_state(device) if device != "cpu" else torch.get_rng_state()
    assert torch.equal(state, state_want)
    torch.testing.assert_close(total, total_want.detach())
    for p, want in zip(params, grads_want):
        torch.testing.assert_close(p.grad, want)


def test_dropout_masks_are_the_same_in_both_passes():
    check_dropout_replay("cpu")


@pytest.mark.parametrize("micro_batch_size", [None, 2], ids=str)
def test_unused_parameters_get_zero_variance_and_no_gradient(micro_batch_size):
    """As Tensor.backward: a parameter the loss does not depend on gets no .grad."""

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    model = Branches().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    gv.total_variance(model, nn.MSELoss(reduction="sum"), x, y, micro_batch_size=micro_batch_size, backward=True)
    for p in model.unused.parameters():
        assert torch.equal(p.variance, torch.zeros_like(p)) and p.grad is None
    assert model.used.weight.variance.abs().sum() > 0


def test_peak_memory_is_bounded_by_the_micro_batch_not_the_batch():
    """The gradient of the total variance of a conv net: the whole batch at once holds N samples'
    activations and double-backward graph, micro-batches of 4 hold 4 samples' whatever N is."""
    torch.manual_seed(0)
    model = gv.extend(
        nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.Flatten(), nn.Linear(4096, 4)
        )
    )
    lossfunc = nn.CrossEntropyLoss(reduction="sum")

    def peak(n, micro_batch_size):
        x, y = torch.randn(n, 3, 16, 16), torch.randint(0, 4, (n,))
        run = lambda: gv.total_variance(model, lossfunc, x, y, micro_batch_size=micro_batch_size, backward=True)  # noqa: E731
        run()  # warm
        model.zero_grad(set_to_none=True)
        return cpu_peak_bytes(run)

    whole_8, whole_64 = peak(8, None), peak(64, None)
    micro_8, micro_64 = peak(8, 4), peak(64, 4)
    assert whole_64 > 4 * whole_8  # the whole-batch peak grows with N ...
    assert micro_64 < 1.25 * micro_8  # ... the micro-batched one does not
    assert micro_64 < whole_64 / 4


def lossfunc_mse(out, target):
    return ((out - target) ** 2).sum()


@pytest.mark.parametrize(
    "kwargs, lossfunc, error",
    [
        (dict(micro_batch_size=0), None, "micro_batch_size must be a positive int or None, got 0"),
        (dict(micro_batch_size=2.5), None, "micro_batch_size must be a positive int or None, got 2.5"),
        (dict(targets=torch.randn(4, 2)), None, r"batch size \(dim 0\) of targets \(4\) does not match inputs \(5\)"),
        (dict(inputs=torch.randn(0, 3), targets=torch.randn(0, 2)), None, r"inputs has an empty batch \(N = 0\)"),
        (dict(), lossfunc_mse, "pass loss_reduction='sum' or 'mean' .* no reduction attribute"),
        (dict(loss_reduction="sum"), nn.MSELoss(), "loss_reduction='sum' but lossfunc.reduction is 'mean'"),
        (dict(loss_reduction="avg"), lossfunc_mse, "loss_reduction must be 'sum' or 'mean', got 'avg'"),
        (dict(), nn.MSELoss(reduction="none"), "lossfunc.reduction is 'none'; lossfunc must reduce"),
        (dict(loss_reduction="sum"), lambda out, t: (out - t) ** 2, "lossfunc must return a scalar tensor"),
    ],
)
def test_bad_arguments_are_errors_naming_them(kwargs, lossfunc, error):
    model = nn.Linear(3, 2)
    args = dict(inputs=torch.randn(5, 3), targets=torch.randn(5, 2))
    args.update(kwargs)
    with pytest.raises(ValueError, match="gradvar_ext.total_variance: " + error):
        gv.total_variance(
            model, lossfunc or nn.MSELoss(reduction="sum"), args.pop("inputs"), args.pop("targets"), **args
        )


def test_unsupported_trainable_layer_is_an_error_naming_it():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(TypeError, match="layer '1' \\(BatchNorm1d\\)"):
        gv.total_variance(model, nn.MSELoss(), torch.randn(5, 3), torch.randn(5, 2))


def test_inside_a_collect_block_is_an_error():
    model = gv.extend(nn.Linear(3, 2))
    with gv.collect(gv.Variance()), pytest.raises(RuntimeError, match="call it outside collect blocks"):
        gv.total_variance(model, nn.MSELoss(), torch.randn(5, 3), torch.randn(5, 2))


def test_benchmark_runs_micro_batches_of_the_size_its_method_names():
    """bench_variance.py's "gradvar-micro-K": total_variance K samples at a time, same numbers as the loop."""
    from bench_variance import make_workload, method_function, run_loop

    model, x, y, lossfunc = make_workload("seed-mnist-cnn", "cpu")
    assert method_function("gradvar-micro-12").keywords == {"micro_batch_size": 12}  # 32 = 12 + 12 + 8
    total, grads = method_function("gradvar-micro-12")(model, x, y, lossfunc, "b")
    grads = [g.clone() for g in grads]
    model.zero_grad(set_to_none=True)
    expected_total, expected_grads = run_loop(model, x, y, lossfunc, "b")
    assert_close(total, expected_total, torch.float32)
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, torch.float32)
    for bad in ("gradvar-micro-0", "gradvar-micro-", "gradvar-nano"):
        with pytest.raises(ValueError, match="unknown method"):
            method_function(bad)
