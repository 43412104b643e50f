"""float16 / bfloat16 arguments: the documented functions and the front end compute and return the
statistics in float32 (``gradvar_ext.ops.promoted``); the raw ops refuse them with a hint."""

from __future__ import annotations

import pytest
import torch

import gradvar_ext as gv
from gradvar_ext import reference

from helpers import assert_matches

LOW = (torch.float16, torch.bfloat16)
CONV = dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1), dilation=(1, 1), groups=2)


def _linear_cases():
    x, g = torch.randn(6, 3, 5), torch.randn(6, 3, 4)
    left, w = torch.randn(6, 3, 4), torch.randn(4, 5)
    return [
        (gv.linear_second_moment, reference.linear_second_moment, (x, g)),
        (gv.linear_variance, reference.linear_variance, (x, g)),
        (gv.linear_moments, reference.linear_moments, (x, g)),
        (gv.linear_batch_l2, reference.linear_batch_l2, (x, g)),
        (gv.linear_cross_moment, reference.linear_cross_moment, (x, g, 2 * x, g - 1)),
        (gv.weighted_gradient_product, reference.weighted_gradient_product, (left, x, g, w)),
        (gv.bias_variance, reference.bias_variance, (g,)),
        (gv.bias_batch_l2, reference.bias_batch_l2, (g,)),
    ]


def _conv_cases():
    x, g = torch.randn(3, 4, 7, 6), torch.randn(3, 6, 4, 6)
    conv = tuple(CONV.values())
    return [
        (
            lambda a, b: gv.conv2d_second_moment(a, b, **CONV),
            lambda a, b: reference.conv2d_second_moment(a, b, *conv),
            (x, g),
        ),
        (lambda a, b: gv.conv2d_variance(a, b, **CONV), lambda a, b: reference.conv2d_variance(a, b, *conv), (x, g)),
        (lambda a, b: gv.conv2d_moments(a, b, **CONV), lambda a, b: reference.conv2d_moments(a, b, *conv), (x, g)),
        (lambda a, b: gv.conv2d_batch_l2(a, b, **CONV), lambda a, b: reference.conv2d_batch_l2(a, b, *conv), (x, g)),
        (gv.conv2d_bias_variance, lambda b: reference.bias_variance(b.flatten(2).transpose(1, 2)), (g,)),
    ]


def _scale(want) -> float:
    first = want[0] if isinstance(want, tuple) else want
    return first.abs().max().item()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("case", range(len(_linear_cases()) + len(_conv_cases())))
def test_half_precision_arguments_give_float32_statistics_of_their_values(case, dtype):
    torch.manual_seed(30)
    fn, ref, args = (_linear_cases() + _conv_cases())[case]
    low = [a.to(dtype) for a in args]
    out = fn(*low)
    for t in out if isinstance(out, tuple) else (out,):
        assert t.dtype == torch.float32
    # exact statistics of the rounded values, to float32 accuracy (variance: on the moment's scale)
    want = ref(*(a.double() for a in low))
    assert_matches(out, want, torch.float32, _scale(want))


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_gradients_flow_back_in_the_arguments_dtype(dtype):
    torch.manual_seed(31)
    x = torch.randn(5, 3, 6).to(dtype).requires_grad_(True)
    g = torch.randn(5, 3, 4).to(dtype).requires_grad_(True)
    gv.linear_variance(x, g).square().sum().backward()
    x32, g32 = x.detach().float().requires_grad_(True), g.detach().float().requires_grad_(True)
    gv.linear_variance(x32, g32).square().sum().backward()
    assert x.grad.dtype == dtype and g.grad.dtype == dtype
    assert torch.equal(x.grad, x32.grad.to(dtype)) and torch.equal(g.grad, g32.grad.to(dtype))


def test_mixed_float32_input_and_bfloat16_grad_output():
    torch.manual_seed(32)
    x, g = torch.randn(6, 5), torch.randn(6, 4).to(torch.bfloat16)
    torch.testing.assert_close(gv.linear_variance(x, g), gv.linear_variance(x, g.float()), rtol=0, atol=0)


def test_raw_ops_refuse_half_precision_with_a_hint():
    x, g = torch.randn(6, 5).to(torch.bfloat16), torch.randn(6, 4).to(torch.bfloat16)
    with pytest.raises(
        TypeError, match=r"gradvar.linear_variance: input must be float32 or float64.*promote it to float32"
    ):
        torch.ops.gradvar.linear_variance(x, g)


@pytest.mark.parametrize("name", ["digits-cnn", "sequence-linear"])
def test_front_end_under_autocast_matches_the_per_sample_loop(name):
    """Mixed precision (CPU autocast, bfloat16): layers see float32 or bfloat16 inputs and bfloat16
    grad_outputs; the statistics come out in float32 and agree with the per-sample loop run under
    the same autocast to bfloat16's accuracy (the loop's own per-sample gradients are rounded)."""
    from test_frontend import build, per_sample_grads

    model, x, y, lossfunc = build(name, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with gv.collect(gv.Variance(), gv.SumGradSquared()):
            lossfunc(model(x).float(), y).backward()
        per_sample = per_sample_grads(model, x, y, lambda out, t: lossfunc(out.float(), t))
    for p, g in zip(model.parameters(), per_sample):
        assert p.variance.dtype == torch.float32 and p.sum_grad_squared.dtype == torch.float32
        scale = g.square().sum(0).max().item()
        torch.testing.assert_close(p.sum_grad_squared, g.square().sum(0), rtol=3e-2, atol=3e-2 * scale)
        torch.testing.assert_close(p.variance, g.var(0, unbiased=False), rtol=3e-2, atol=3e-2 * scale / g.shape[0])


@pytest.mark.parametrize("op", ["linear_variance", "conv2d_moments"])
def test_raw_ops_under_autocast_compute_in_float32(op):
    """Inside torch.autocast the ops cast half-precision arguments to float32 and keep autocast away
    from their own matrix products: float32 arguments give the same numbers as outside it."""
    torch.manual_seed(33)
    if op == "linear_variance":
        args = (torch.randn(64, 33), torch.randn(64, 17))
    else:
        args = (torch.randn(3, 4, 7, 6), torch.randn(3, 6, 4, 6), *CONV.values())
    fn = getattr(torch.ops.gradvar, op)
    want = fn(*args)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fn(*args)
        low = fn(*(a.bfloat16() if isinstance(a, torch.Tensor) else a for a in args))
    for w, g, lo in zip(*(t if isinstance(t, tuple) else (t,) for t in (want, got, low))):
        assert g.dtype == torch.float32 and lo.dtype == torch.float32
        assert torch.equal(g, w)
