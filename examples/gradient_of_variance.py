"""The gradient of the total variance of the per-sample gradients, checked against a per-sample loop.

Our port of BackPACK's "gradient of backpropagated quantities" example, with its three checks:
a Linear(2, 1) model on N = 3 random samples; a linear model on a batch of real handwritten
digits; a small CNN (Conv2d, ReLU, MaxPool2d, Flatten, Linear) on the same digits. The digits are
scikit-learn's bundled 8x8 digits (64 samples shipped in examples/data/digits_batch.pt, so no
download), where BackPACK's example used 28x28 MNIST: the CNN's Linear layer is sized to match.

For each: ``gradvar_ext.extend`` the model, run ``loss.backward(create_graph=True)`` inside
``gradvar_ext.collect(Variance())``, sum ``p.variance`` over the parameters, differentiate that
sum w.r.t. the parameters; then the same by brute force, one backward per sample; once more
with the statistics-only backward (``stats.backward(loss)`` inside the block: no ``.grad``);
and in micro-batches of two samples (``gradvar_ext.total_variance``: memory bounded by them).

Run:  python examples/gradient_of_variance.py      (exit status 1 if any check fails)
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

import gradvar_ext as gv

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "digits_batch.pt")


def total_variance_and_gradient_gradvar(x, y, model, lossfunc):
    """Total variance of the per-sample gradients and its gradient, with gradvar_ext."""
    model.zero_grad()
    loss = lossfunc(model(x), y)
    with gv.collect(gv.Variance()), warnings.catch_warnings():
        # PyTorch warns that .grad made with create_graph=True refers back to the parameters (a
        # reference cycle): we set .grad to None below, which breaks it.
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
        loss.backward(retain_graph=True, create_graph=True)
    total_var = sum(p.variance.sum() for p in model.parameters())
    grad_of_var = torch.autograd.grad(total_var, list(model.parameters()))
    gv.clear(model)  # drop the results (they hold the graph) and the grads made with create_graph
    model.zero_grad(set_to_none=True)
    return total_var.detach(), grad_of_var


def total_variance_and_gradient_statistics_only(x, y, model, lossfunc):
    """The same with the statistics-only backward: forward and backward inside ``collect``, no
    ``.grad`` computed (faster when the ordinary gradients are not needed)."""
    with gv.collect(gv.Variance()) as stats:
        stats.backward(lossfunc(model(x), y), create_graph=True)
    total_var = sum(p.variance.sum() for p in model.parameters())
    grad_of_var = torch.autograd.grad(total_var, list(model.parameters()))
    gv.clear(model)
    return total_var.detach(), grad_of_var


def total_variance_and_gradient_micro_batched(x, y, model, lossfunc):
    """The same two samples at a time (peak memory of 2 samples, whatever N is): the gradient
    goes into ``.grad`` as with ``backward()``."""
    model.zero_grad(set_to_none=True)
    total_var = gv.total_variance(model, lossfunc, x, y, micro_batch_size=2, backward=True)
    grad_of_var = [p.grad for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return total_var, grad_of_var


def total_variance_and_gradient_loop(x, y, model, lossfunc):
    """The same by brute force: per-sample gradients [N, D] from one backward per sample."""
    params = list(model.parameters())
    per_sample = []
    for i in range(x.shape[0]):
        loss = lossfunc(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params, create_graph=True)
        per_sample.append(torch.cat([g.reshape(-1) for g in grads]))
    total_var = torch.stack(per_sample).var(dim=0, unbiased=False).sum()
    return total_var.detach(), torch.autograd.grad(total_var, params)


def agree(var_a, grads_a, var_b, grads_b, tol=1e-5) -> bool:
    """Whether two (total variance, gradient per parameter) results match within ``tol``."""
    return torch.allclose(var_a, var_b, atol=tol, rtol=tol) and all(
        torch.allclose(a, b, atol=tol, rtol=tol) for a, b in zip(grads_a, grads_b)
    )


def check_same_results(x, y, model, lossfunc) -> bool:
    var_ours, grad_ours = total_variance_and_gradient_gradvar(x, y, model, lossfunc)
    var_loop, grad_loop = total_variance_and_gradient_loop(x, y, model, lossfunc)
    same = torch.allclose(var_ours, var_loop, atol=1e-4, rtol=1e-4)
    print(f"  total variance: gradvar {var_ours.item():.6f}, per-sample loop {var_loop.item():.6f}")
    print(f"  Total variance is the same? {same}")
    print("  Gradient of the total variance w.r.t. parameters is the same?")
    all_same = same
    for (name, _), a, b in zip(model.named_parameters(), grad_ours, grad_loop):
        match = torch.allclose(a, b, atol=1e-4, rtol=1e-4)
        all_same &= match
        print(f"    {name:<10}: {match}")
    var_stats, grad_stats = total_variance_and_gradient_statistics_only(x, y, model, lossfunc)
    same = agree(var_stats, grad_stats, var_ours, grad_ours)
    print(f"  Statistics-only backward (stats.backward) gives the same? {same}")
    var_micro, grad_micro = total_variance_and_gradient_micro_batched(x, y, model, lossfunc)
    micro_same = agree(var_micro, grad_micro, var_ours, grad_ours)
    print(f"  Micro-batches of 2 (gradvar_ext.total_variance) give the same? {micro_same}")
    return all_same and same and micro_same


def main() -> int:
    print(f"gradvar_ext backend: {gv.backend()}")
    digits = torch.load(DATA)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if "cuda" in devices:  # true float32 convolutions, as on the CPU (cuDNN defaults to TF32)
        torch.backends.cudnn.allow_tf32 = False
    ok = True
    for device in devices:
        torch.manual_seed(0)
        print(f"\n[{device}] Linear(2, 1, bias=False) on N = 3 random samples, MSELoss(reduction='sum')")
        x, y = torch.randn(3, 2, device=device), torch.randn(3, 1, device=device)
        model = gv.extend(nn.Sequential(nn.Linear(2, 1, bias=False))).to(device)
        ok &= check_same_results(x, y, model, nn.MSELoss(reduction="sum"))

        x, y = digits["images"][:32].to(device), digits["labels"][:32].to(device)
        print(f"\n[{device}] linear model on 32 handwritten digits (8x8), CrossEntropyLoss(reduction='sum')")
        model = gv.extend(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))).to(device)
        ok &= check_same_results(x, y, model, nn.CrossEntropyLoss(reduction="sum"))

        print(f"\n[{device}] CNN (Conv2d, ReLU, MaxPool2d, Flatten, Linear) on the same digits")
        model = gv.extend(
            nn.Sequential(nn.Conv2d(1, 5, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(20, 10))
        ).to(device)
        ok &= check_same_results(x, y, model, nn.CrossEntropyLoss(reduction="sum"))
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
