"""torch.compile through the ops (their fake kernels and autograd formulas) and through an extended
model inside a collect block. backend="aot_eager": it traces with the fake kernels and runs the
traced graph eagerly, so no C++ compiler is needed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradvar_ext as gv


@pytest.mark.parametrize("middle", [(), (3,)], ids=["one-position", "three-positions"])
def test_compiled_op_and_its_gradient_match_eager(middle):
    torch.manual_seed(0)
    x = torch.randn(5, *middle, 4, dtype=torch.float64, requires_grad=True)
    go = torch.randn(5, *middle, 3, dtype=torch.float64, requires_grad=True)

    def variance_and_grads(x, go):
        v = torch.ops.gradvar.linear_variance(x, go)
        return v, torch.autograd.grad(v.square().sum(), (x, go), create_graph=True)

    torch._dynamo.reset()
    compiled = torch.compile(variance_and_grads, backend="aot_eager", fullgraph=False)
    (v, grads), (v_ref, grads_ref) = compiled(x, go), variance_and_grads(x, go)
    torch.testing.assert_close(v, v_ref)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def test_compiled_model_inside_collect_matches_the_loop():
    """The statistics of a compiled model (its double backward, for the gradient of the variance,
    is not supported by torch.compile's aot_autograd: PyTorch raises)."""
    torch.manual_seed(0)
    model = gv.extend(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(27, 2)).double())
    x, y = torch.randn(4, 2, 5, 5, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    lossfunc = nn.MSELoss(reduction="sum")
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    params = list(model.parameters())
    rows = [torch.autograd.grad(lossfunc(model(x[n : n + 1]), y[n : n + 1]), params) for n in range(4)]
    for backward in ("loss.backward", "collect.backward"):
        with gv.collect(gv.Variance(), gv.BatchL2Grad()) as stats:  # the layers' hooks run around the graph
            loss = lossfunc(compiled(x), y)
            loss.backward() if backward == "loss.backward" else stats.backward(loss)
        for p, g in zip(params, zip(*rows)):
            g = torch.stack(g)
            torch.testing.assert_close(p.variance, g.var(0, unbiased=False))
            torch.testing.assert_close(p.batch_l2, g.square().flatten(1).sum(1))
        model.zero_grad(set_to_none=True)
    gv.clear(model)
