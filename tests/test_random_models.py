"""Randomly drawn small models (MLPs, Linear layers on sequences, Conv1d / Conv2d stacks with random
stride, padding, padding mode, dilation, groups and bias, Tanh, ReLU, LeakyReLU or ReLU6, max
pooling) through every way of getting the statistics, against the per-sample loop: the
combinations the hand-written cases do not list. A seed per case, so a failure names one model to
rerun. The piecewise-linear layers get our backward nodes (gradvar_ext/piecewise_backward.py),
small as they are."""

from __future__ import annotations

import random
from unittest import mock

import pytest
import torch
from torch import nn

import gradvar_ext as gv
from gradvar_ext import piecewise_backward

PATHS = ("loss.backward", "collect.backward", "total_variance", "total_variance-micro")
CASES = 48


def random_conv_stack(rng: random.Random, two_d: bool, n: int):
    """1-2 conv layers with hyper-parameters drawn until the layer accepts its input."""
    channels, height, width = rng.randint(1, 4), rng.randint(5, 9), rng.randint(5, 9)
    shape = (channels, height, width) if two_d else (channels, height)
    layers: list = []
    conv_type = nn.Conv2d if two_d else nn.Conv1d
    for _ in range(rng.randint(1, 2)):
        groups = rng.choice([g for g in (1, 2, 3) if channels % g == 0])
        stride = rng.randint(1, 2)
        options = dict(
            stride=stride,
            padding=rng.choice([0, 1, "same"] if stride == 1 else [0, 1]),
            dilation=rng.randint(1, 2),
            groups=groups,
            bias=rng.random() < 0.7,
            padding_mode=rng.choice(["zeros", "reflect", "replicate", "circular"]),
        )
        try:
            conv = conv_type(channels, groups * rng.randint(1, 3), rng.randint(1, 3), **options)
            nn.Sequential(*layers, conv)(torch.zeros(1, *shape, dtype=torch.float64).to(conv.weight.dtype))
        except RuntimeError:  # too small an input for this kernel, padding mode and dilation
            continue
        layers += [conv, rng.choice([nn.Tanh(), nn.ReLU(), nn.LeakyReLU(0.1)])]
        channels = conv.out_channels
        if two_d and rng.random() < 0.6:
            pool = nn.MaxPool2d(2, stride=rng.randint(1, 2), ceil_mode=rng.random() < 0.5)
            try:
                nn.Sequential(*layers, pool)(torch.zeros(1, *shape))
                layers.append(pool)
            except RuntimeError:  # too small an input to pool
                pass
    return layers + [nn.Flatten()], torch.randn(n, *shape)


def random_model(seed: int, device: str = "cpu"):
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kind, n = rng.choice(["mlp", "sequence", "conv1d", "conv2d"]), rng.randint(1, 6)
    if kind in ("mlp", "sequence"):
        widths = [rng.randint(1, 6) for _ in range(rng.randint(2, 4))]
        layers = []
        for a, b in zip(widths, widths[1:]):
            layers += [
                nn.Linear(a, b, bias=rng.random() < 0.7),
                rng.choice([nn.Tanh(), nn.ReLU(), nn.ReLU6(), nn.Identity()]),
            ]
        positions = () if kind == "mlp" else (rng.randint(1, 4),)
        layers.append(nn.Flatten())
        x = torch.randn(n, *positions, widths[0])
    else:
        layers, x = random_conv_stack(rng, kind == "conv2d", n)
    features = nn.Sequential(*layers).double()
    x = x.double()
    with torch.no_grad():
        width = features(x[:1]).shape[1]
    model = nn.Sequential(features, nn.Linear(width, 3).double()).to(device)
    reduction = rng.choice(["sum", "mean"])
    y = torch.randn(n, 3, dtype=torch.float64)
    return model, x.to(device), y.to(device), nn.MSELoss(reduction=reduction), rng


def loop_total_variance(model, x, y, lossfunc):
    """Per-sample gradients of the per-sample losses (either reduction), their variance and the
    gradient of its total, one autograd call per sample."""
    params = list(model.parameters())
    rows = [
        torch.autograd.grad(lossfunc(model(x[i : i + 1]), y[i : i + 1]), params, create_graph=True)
        for i in range(x.shape[0])
    ]
    per_sample = [torch.stack([r[k] for r in rows]) for k in range(len(params))]
    total = sum(g.var(0, unbiased=False).sum() for g in per_sample)
    return [g.detach() for g in per_sample], total.detach(), torch.autograd.grad(total, params)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("seed", range(CASES))
def test_random_model_statistics_and_gradient_of_total_variance_match_the_loop(seed, conv_algorithm):
    """Each drawn model with each way of forming the conv layers' per-sample gradients (conftest)."""
    check_random_model(seed, "cpu")


def check_random_model(seed: int, device: str) -> None:
    """Model ``seed`` on ``device`` through one of the four ways (by seed), against the loop."""
    with mock.patch.object(piecewise_backward, "MIN_ZEROS_BYTES", 0):
        check_drawn_model(seed, device)


def check_drawn_model(seed: int, device: str) -> None:
    model, x, y, lossfunc, rng = random_model(seed, device)
    path, create_graph = PATHS[seed % len(PATHS)], rng.random() < 0.5
    per_sample, total, total_grad = loop_total_variance(model, x, y, lossfunc)
    params = list(gv.extend(model).parameters())
    if path.startswith("total_variance"):
        micro_batch_size = rng.randint(1, 3) if path.endswith("micro") else None
        got = gv.total_variance(model, lossfunc, x, y, micro_batch_size=micro_batch_size, backward=create_graph)
        close(got, total)
        for p, g in zip(params, per_sample):
            close(p.variance, g.var(0, unbiased=False))
        if create_graph:
            for p, expected in zip(params, total_grad):
                close(p.grad, expected)
        return
    extensions = (gv.Variance(), gv.SumGradSquared(), gv.BatchL2Grad())
    if path == "loss.backward":
        loss = lossfunc(model(x), y)
        with gv.collect(*extensions, loss_reduction=lossfunc.reduction):
            loss.backward(create_graph=create_graph)
    else:
        with gv.collect(*extensions, loss_reduction=lossfunc.reduction) as stats:
            stats.backward(lossfunc(model(x), y), create_graph=create_graph)
    for p, g in zip(params, per_sample):
        close(p.variance, g.var(0, unbiased=False))
        close(p.sum_grad_squared, g.square().sum(0))
        close(p.batch_l2, g.square().flatten(1).sum(1))
    if create_graph:
        for got, expected in zip(torch.autograd.grad(sum(p.variance.sum() for p in params), params), total_grad):
            close(got, expected)
    gv.clear(model)
    model.zero_grad(set_to_none=True)
