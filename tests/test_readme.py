"""The README's Python examples, run as written (in order, one namespace, as a reader pastes
them) and checked against the per-sample loop: a README that works as written."""

from __future__ import annotations

import os
import re

import torch
from test_frontend import per_sample_grads  # the per-sample loop, one backward per sample
from test_micro_batches import loop_total_variance  # the loop's total variance and its gradient

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_readme_python_examples_run_as_written_and_match_the_per_sample_loop():
    blocks = python_blocks()
    assert len(blocks) == 6, "a README example was added or removed: check it here too"
    torch.manual_seed(0)
    ns: dict = {}
    exec(compile(blocks[0], "README block 1", "exec"), ns)  # extend + collect + gradient of the variance
    model, x, y = ns["model"], ns["x"], ns["y"]
    summed = torch.nn.CrossEntropyLoss(reduction="sum")
    want_total, want_grad, _ = loop_total_variance(model, x, y, summed)
    torch.testing.assert_close(ns["total_variance"].detach(), want_total.detach(), rtol=1e-4, atol=1e-5)
    for ours, want in zip(ns["grad_of_variance"], want_grad):
        torch.testing.assert_close(ours, want, rtol=1e-3, atol=1e-4)
    assert all(p.grad is None and not hasattr(p, "variance") for p in model.parameters())  # cleared

    exec(compile(blocks[1], "README block 2", "exec"), ns)  # the statistics-only backward
    for ours, want in zip(ns["grad_of_variance"], want_grad):
        torch.testing.assert_close(ours, want, rtol=1e-3, atol=1e-4)
    assert all(p.grad is None for p in model.parameters())

    exec(compile(blocks[2], "README block 3", "exec"), ns)  # DP-SGD clipping
    params, grads = list(model.parameters()), per_sample_grads(model, x, y, summed)
    norms = sum(g.flatten(1).square().sum(1) for g in grads).sqrt()
    factors = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any()  # some samples are clipped: the check can tell
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, (factors.view(-1, *[1] * (g.dim() - 1)) * g).sum(0), rtol=1e-4, atol=1e-5)

    # a training step with the variance penalty: .grad before the step is d(loss + w * penalty)
    full = torch.autograd.grad(summed(model(x), y), list(model.parameters()))
    _, penalty_grad, _ = loop_total_variance(model, x, y, summed)
    exec(compile(blocks[3], "README block 4", "exec"), ns)
    assert ns["penalty_weight"] == 0.1 and all(r.abs().max() > 0 for r in penalty_grad)
    for p, f, r in zip(model.parameters(), full, penalty_grad):
        torch.testing.assert_close(p.grad, f + 0.1 * r, rtol=1e-3, atol=1e-5)
    assert all(not hasattr(p, "variance") for p in model.parameters())

    exec(compile(blocks[4], "README block 5", "exec"), ns)  # the gradient noise scale
    grads = per_sample_grads(model, x, y, summed)
    n = len(x)
    trace = sum(g.var(0, unbiased=True).sum() for g in grads)
    mean_squared = sum(g.mean(0).square().sum() for g in grads)
    torch.testing.assert_close(ns["trace_sigma"], trace, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ns["noise_scale"], trace / (mean_squared - trace / n), rtol=1e-3, atol=1e-6)

    model.zero_grad(set_to_none=True)
    exec(compile(blocks[5], "README block 6", "exec"), ns)  # total_variance in micro-batches
    want_total, want_grad, _ = loop_total_variance(model, x, y, torch.nn.CrossEntropyLoss())
    torch.testing.assert_close(ns["total"], want_total.detach(), rtol=1e-4, atol=1e-6)
    for p, want in zip(model.parameters(), want_grad):
        torch.testing.assert_close(p.grad, want, rtol=1e-3, atol=1e-6)
