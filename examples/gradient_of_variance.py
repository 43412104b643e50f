"""The gradient of the total variance of the per-sample gradients, checked against a per-sample loop.

Our version of the first check in BackPACK's "gradient of backpropagated quantities" example:
a Linear(2, 1, bias=False) model on N = 3 random samples with a summed MSE loss. We capture the
layer's input and the backpropagated grad_output (with create_graph=True), get the variance of
the per-sample weight gradients from ``gradvar_ext.linear_variance`` without forming them, sum
it, and differentiate that sum w.r.t. the parameters. A second model adds a bias and middle dims.

Run:  python examples/gradient_of_variance.py      (exit status 1 if any check fails)
"""

from __future__ import annotations

import torch
from torch import nn

import gradvar_ext


def total_variance_and_gradient_gradvar(x, y, layer: nn.Linear, lossfunc):
    """Total variance of the per-sample gradients of `layer`'s parameters, and its gradient."""
    out = layer(x)
    loss = lossfunc(out, y)
    (grad_output,) = torch.autograd.grad(loss, out, create_graph=True)  # differentiable w.r.t. the parameters
    total_var = gradvar_ext.linear_variance(x, grad_output).sum()
    if layer.bias is not None:
        total_var = total_var + gradvar_ext.bias_variance(grad_output).sum()
    return total_var, torch.autograd.grad(total_var, list(layer.parameters()))


def total_variance_and_gradient_loop(x, y, layer: nn.Linear, lossfunc):
    """The same by brute force: one backward per sample, per-sample gradients stacked."""
    per_sample = []
    for i in range(x.shape[0]):
        loss = lossfunc(layer(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(layer.parameters()), create_graph=True)
        per_sample.append(torch.cat([g.reshape(-1) for g in grads]))
    total_var = torch.stack(per_sample).var(dim=0, unbiased=False).sum()
    return total_var, torch.autograd.grad(total_var, list(layer.parameters()))


def check_same_results(x, y, layer, lossfunc) -> bool:
    var_ours, grad_ours = total_variance_and_gradient_gradvar(x, y, layer, lossfunc)
    var_loop, grad_loop = total_variance_and_gradient_loop(x, y, layer, lossfunc)
    same = torch.allclose(var_ours, var_loop, atol=1e-4, rtol=1e-4)
    print(f"  total variance: gradvar {var_ours.item():.6f}, per-sample loop {var_loop.item():.6f}")
    print(f"  Total variance is the same? {same}")
    print("  Gradient of the total variance w.r.t. parameters is the same?")
    all_same = same
    for (name, _), a, b in zip(layer.named_parameters(), grad_ours, grad_loop):
        match = torch.allclose(a, b, atol=1e-4, rtol=1e-4)
        all_same &= match
        print(f"    {name:<8}: {match}")
    return all_same


def main() -> int:
    print(f"gradvar_ext backend: {gradvar_ext.backend()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    ok = True
    for device in devices:
        torch.manual_seed(0)
        print(f"\n[{device}] Linear(2, 1, bias=False), N = 3, MSELoss(reduction='sum')")
        x, y = torch.randn(3, 2, device=device), torch.randn(3, 1, device=device)
        ok &= check_same_results(x, y, nn.Linear(2, 1, bias=False).to(device), nn.MSELoss(reduction="sum"))

        print(f"\n[{device}] Linear(10, 3) with bias on sequences [N = 8, T = 5, 10], MSELoss(reduction='sum')")
        x, y = torch.randn(8, 5, 10, device=device), torch.randn(8, 5, 3, device=device)
        ok &= check_same_results(x, y, nn.Linear(10, 3).to(device), nn.MSELoss(reduction="sum"))
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
