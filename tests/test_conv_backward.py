"""Extended convolutions' own backward node (gradvar_ext/conv_backward.py): the same gradients as
PyTorch's to every order, where it applies and only there, and no gradient nobody asked for."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

import gradvar_ext as gv
from gradvar_ext import conv_backward

SAME_EVEN = pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")

# (layer, input shape): strides, paddings ('same' / 'valid' included), dilation, groups, no bias, Conv1d
LAYERS = [
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (5, 3, 7, 6)),
    (lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(0, 1), dilation=(1, 2), groups=2), (3, 4, 9, 8)),
    (lambda: nn.Conv2d(3, 5, 3, stride=2, bias=False), (4, 3, 8, 8)),  # rows no output position reads
    (lambda: nn.Conv2d(2, 3, 3, padding="same", dilation=2), (3, 2, 6, 5)),
    (lambda: nn.Conv2d(2, 3, 2, padding="valid"), (3, 2, 5, 5)),
    (lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 5, 5)),  # depthwise
    (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=2, dilation=2), (4, 3, 11)),
]
IDS = ["plain", "strided-dilated-grouped", "stride2-no-bias", "same", "valid", "depthwise", "conv1d"]


def two_models(make_layer, shape, device="cpu"):
    """(extended, plain) float64 copies: a tanh in front (the conv's input requires grad), the
    conv, a linear head."""
    torch.manual_seed(0)
    layer = make_layer()
    with torch.no_grad():
        features = layer(torch.zeros(shape)).flatten(1).shape[1]
    plain = nn.Sequential(nn.Tanh(), layer, nn.Tanh(), nn.Flatten(), nn.Linear(features, 2))
    plain = plain.to(device, torch.float64)
    return gv.extend(copy.deepcopy(plain)), plain


def first_and_second_order(model, x, y):
    """Gradients w.r.t. the input and every parameter, and the gradient of their squared norm."""
    x = x.clone().requires_grad_(True)
    params = list(model.parameters())
    loss = nn.functional.mse_loss(model(x * 1.5), y, reduction="sum")
    grads = torch.autograd.grad(loss, [x, *params], create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    return grads, torch.autograd.grad(penalty, [x, *params])


def check_second_order(make_layer, shape, device="cpu"):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    y = torch.randn(shape[0], 2, dtype=torch.float64, device=device)
    model, plain = two_models(make_layer, shape, device)
    assert conv_node(model, x.clone().requires_grad_(True)) == "_ConvolutionBackwardBackward"
    assert conv_node(plain, x.clone().requires_grad_(True)) == "ConvolutionBackward0"
    ours, theirs = first_and_second_order(model, x, y), first_and_second_order(plain, x, y)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make_layer,shape", LAYERS, ids=IDS)
def test_gradients_to_the_second_order_match_pytorch(make_layer, shape):
    check_second_order(make_layer, shape)


def conv_node(model, x):
    """The type name of the node behind the conv layer's output (the layer at index 1)."""
    seen = []
    handle = model[1].register_forward_hook(lambda m, a, out: seen.append(type(out.grad_fn).__name__))
    model(x)
    handle.remove()
    return seen[0]


@SAME_EVEN
def test_the_node_applies_where_it_should():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    for make_layer, applies in [
        (lambda: nn.Conv2d(3, 4, 3, padding=1), True),
        (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), False),  # input padded first
        (lambda: nn.Conv2d(3, 4, 4, padding="same"), False),  # asymmetric: padded first
    ]:
        model = gv.extend(nn.Sequential(nn.Tanh(), make_layer()))
        want = "_ConvolutionBackwardBackward" if applies else "ConvolutionBackward0"
        # the forward hook below runs after extend's: it sees the final output
        assert conv_node(model, x.requires_grad_(True)) == want
    model = gv.extend(nn.Sequential(nn.Identity(), nn.Conv2d(3, 4, 3)))
    assert conv_node(model, torch.randn(2, 3, 6, 6)) == "ConvolutionBackward0"  # no input gradient to route


def test_switched_off_by_the_environment(monkeypatch):
    model = gv.extend(nn.Sequential(nn.Tanh(), nn.Conv2d(3, 4, 3)))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    monkeypatch.setenv("GRADVAR_EXT_CONV_BACKWARD", "pytorch")
    assert conv_node(model, x) == "ConvolutionBackward0"
    monkeypatch.setenv("GRADVAR_EXT_CONV_BACKWARD", "fast")
    with pytest.raises(ValueError, match="GRADVAR_EXT_CONV_BACKWARD must be 'gradvar' or 'pytorch', got 'fast'"):
        model(x)


def test_without_the_autograd_internals_it_uses_pytorchs_node(monkeypatch):
    """A PyTorch without the private attributes the node reads: PyTorch's node stays, no error."""
    model = gv.extend(nn.Sequential(nn.Tanh(), nn.Conv2d(3, 4, 3)))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    monkeypatch.setattr(conv_backward, "_INTERNALS", False)
    assert conv_node(model, x) == "ConvolutionBackward0"
    renamed = types.SimpleNamespace(grad_fn=types.SimpleNamespace(), _backward_hooks=None, retains_grad=False)
    assert conv_backward._convolution_of(renamed, x, model[1]) is None  # no _saved_* attributes


def test_an_earlier_hook_that_changes_the_output_keeps_pytorchs_node():
    """A forward hook registered before extend that rescales the output: the node would miss the
    scale, so it must not apply; the gradients stay right."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3).double()
    layer.register_forward_hook(lambda m, a, out: out * 2)
    model = gv.extend(nn.Sequential(nn.Tanh(), layer))
    plain = nn.Sequential(nn.Tanh(), copy.deepcopy(layer))
    gv.unextend(plain)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert conv_node(model, x) == "MulBackward0"
    x1 = x.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    g1 = torch.autograd.grad(model(x1).square().sum(), [x1, layer.weight])
    g2 = torch.autograd.grad(plain(x2).square().sum(), [x2, plain[1].weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_in_place_ops_after_the_layer_work():
    """The layer returns an alias of its output that is no view: ReLU(inplace=True) after it works."""
    torch.manual_seed(0)
    model = gv.extend(nn.Sequential(nn.Tanh(), nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True)).double())
    plain = gv.unextend(copy.deepcopy(model))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert conv_node(model, x.clone().requires_grad_(True)) == "_ConvolutionBackwardBackward"
    results = []
    for m in (model, plain):
        xi = x.clone().requires_grad_(True)
        results.append(torch.autograd.grad(m(xi * 1.0).square().sum(), [xi, *m.parameters()]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_an_earlier_forward_hook_that_used_the_output_keeps_working():
    """A forward hook registered before extend that computes with the output (saving it for its
    backward): its graph keeps PyTorch's node, the layer's caller gets ours; the gradients through
    both add up to PyTorch's."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3).double()
    side = []
    layer.register_forward_hook(lambda m, a, out: side.append((out * out).sum()) and None)
    model = gv.extend(nn.Sequential(nn.Tanh(), layer))
    plain = gv.unextend(copy.deepcopy(model))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    results, nodes = [], []
    for m in (model, plain):
        xi = x.clone().requires_grad_(True)
        out = m(xi * 1.0)
        nodes.append(type(out.grad_fn).__name__)
        results.append(torch.autograd.grad(out.sum() + side[-1], [xi, *m.parameters()]))
    assert nodes == ["_ConvolutionBackwardBackward", "ConvolutionBackward0"]
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_a_tensor_hook_an_earlier_forward_hook_put_on_the_output_gets_its_gradient():
    """Tensor hooks (and retain_grad) stay with PyTorch's node: where one is on the output before
    extend's hook runs, the node does not apply, and the hook receives the gradient."""
    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, 3).double()
    received = []
    layer.register_forward_hook(lambda m, a, out: out.register_hook(received.append) and None)
    model = gv.extend(nn.Sequential(nn.Tanh(), layer))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert conv_node(model, x) == "ConvolutionBackward0"
    out = model(x)
    torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(received[-1], torch.ones_like(out))


def test_statistics_only_backward_forms_no_weight_gradient(monkeypatch):
    """collect.backward asks autograd for the layer outputs' gradients only: the node skips the
    weight and bias gradients (PyTorch's nodes do the same), and the results match the loop's."""
    calls = []
    original = conv_backward._weight_gradient
    monkeypatch.setattr(conv_backward, "_weight_gradient", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    model = gv.extend(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 3, 3), nn.Flatten(), nn.Linear(12, 2)))
    model = model.double()
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    lossfunc = nn.MSELoss(reduction="sum")
    with gv.collect(gv.Variance()) as stats:
        stats.backward(lossfunc(model(x), y), create_graph=True)
    assert calls == []
    total = sum(p.variance.sum() for p in model.parameters())
    grads = torch.autograd.grad(total, list(model.parameters()))
    gv.clear(model)
    assert_matches_the_loop(gv.unextend(copy.deepcopy(model)), x, y, lossfunc, total, grads)


def assert_matches_the_loop(plain, x, y, lossfunc, total, grads):
    """``total`` (a total variance) and ``grads`` (its gradient w.r.t. the parameters) against the
    per-sample loop's on ``plain``, the model without gradvar's hooks."""
    params = list(plain.parameters())
    rows = [
        torch.autograd.grad(lossfunc(plain(x[i : i + 1]), y[i : i + 1]), params, create_graph=True)
        for i in range(len(x))
    ]
    want = sum(torch.stack([r[k] for r in rows]).var(0, unbiased=False).sum() for k in range(len(params)))
    torch.testing.assert_close(total.detach(), want.detach(), rtol=1e-10, atol=0)
    for a, b in zip(grads, torch.autograd.grad(want, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_gradcheck_and_gradgradcheck_through_an_extended_layer():
    torch.manual_seed(0)
    layer = gv.extend(nn.Conv2d(2, 3, 3, stride=2, padding=1).double())
    x = torch.randn(2, 2, 6, 5, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_(True)
    b = layer.bias.detach().clone().requires_grad_(True)

    def f(x, w, b):
        out = torch.func.functional_call(layer, {"weight": w, "bias": b}, (x * 1.0,))
        assert type(out.grad_fn).__name__ == "_ConvolutionBackwardBackward"
        return out

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_torch_func_transforms_keep_pytorchs_node():
    """Under torch.func the node (a plain autograd.Function) does not apply; vmap(grad) of an
    extended model gives PyTorch's per-sample gradients."""
    torch.manual_seed(0)
    model = gv.extend(nn.Sequential(nn.Tanh(), nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 1)).double())
    check_vmap_of_grad_is_pytorchs(model, torch.randn(3, 2, 4, 4, dtype=torch.float64))


def check_vmap_of_grad_is_pytorchs(model, x):
    """Per-sample gradients of an extended model by torch.func (vmap of grad) = its plain copy's by autograd."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi):
        return torch.func.functional_call(model, p, (xi.unsqueeze(0),)).sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    plain = gv.unextend(copy.deepcopy(model))
    for i in range(len(x)):
        want = torch.autograd.grad(plain(x[i : i + 1]).sum(), list(plain.parameters()))
        for name, w in zip(params, want):
            torch.testing.assert_close(per_sample[name][i], w)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_through_the_node(use_reentrant):
    """torch.utils.checkpoint reruns the forward (and extend's hook, so the node) in the backward:
    the gradients are PyTorch's."""
    torch.manual_seed(0)
    check_checkpointing(
        nn.Sequential(nn.Tanh(), nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 3)), use_reentrant
    )


def check_checkpointing(body, use_reentrant):
    """``body`` (float64) under torch.utils.checkpoint, extended against plain: the gradients of
    the input and parameters, and (non-reentrant) a double backward through it."""
    from torch.utils.checkpoint import checkpoint

    plain = body.double()
    body = gv.extend(copy.deepcopy(plain))
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    results = []
    for m in (body, plain):
        xi = x.clone().requires_grad_(True)
        checkpoint(m, xi * 1.0, use_reentrant=use_reentrant).square().sum().backward()  # reentrant: no .grad()
        results.append([xi.grad, *(p.grad for p in m.parameters())])
        if not use_reentrant:
            out = checkpoint(m, x * 1.0, use_reentrant=False).square().sum()
            grads = torch.autograd.grad(out, list(m.parameters()), create_graph=True)
            results[-1] += torch.autograd.grad(sum(g.square().sum() for g in grads), list(m.parameters()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
    return body


@pytest.mark.filterwarnings("ignore:`torch.jit.trace", "ignore:`torch.jit.save")
def test_a_traced_extended_model_saves():
    """torch.jit.trace records no Python node (a traced module with one cannot be saved)."""
    check_traced_model_saves(
        gv.extend(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Conv2d(3, 2, 3))), torch.randn(2, 2, 8, 8)
    )


def check_traced_model_saves(model, x):
    """torch.jit.trace of an extended model saves, and the traced model computes what the model does."""
    import io

    traced = torch.jit.trace(model, x, check_trace=False)
    torch.jit.save(traced, io.BytesIO())
    torch.testing.assert_close(traced(x), model(x))


def record_backend_calls(monkeypatch) -> list[tuple[int, tuple]]:
    """(samples, output mask) of every backend convolution_backward call the node makes from now on."""
    calls = []
    original = conv_backward._backend_backward
    monkeypatch.setattr(
        conv_backward, "_backend_backward", lambda g, x, *a: calls.append((len(x), tuple(a[-1]))) or original(g, x, *a)
    )
    return calls


@pytest.mark.parametrize("samples", ["1", "2"])
@pytest.mark.parametrize("make_layer,shape", LAYERS, ids=IDS)
def test_weight_gradients_in_slices_of_the_batch_match_pytorch(make_layer, shape, samples, monkeypatch):
    """GRADVAR_EXT_CONV_WEIGHT_SAMPLES=k: the node's weight gradients come from backend calls on k
    samples at a time, summed (a bound on cuDNN's FFT workspace, which grows with the batch). The
    same gradients as PyTorch's to the second order, and without create_graph too, where the input
    gradient is one call and the bias's a sum (no backend call)."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_WEIGHT_SAMPLES", samples)
    sizes = record_backend_calls(monkeypatch)
    check_second_order(make_layer, shape)
    k, n = int(samples), shape[0]
    weight_only = [size for size, need in sizes if need == (False, True, False)]
    assert weight_only and all(size == k for size in weight_only[: n // k]) and sum(weight_only) % n == 0
    model, plain = two_models(make_layer, shape)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    sizes.clear()
    ours = torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()])
    theirs = torch.autograd.grad(plain(x).square().sum(), [x, *plain.parameters()])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    bias = model[1].bias is not None
    if k >= n:  # one slice: the backend's one call for all three
        assert sizes == [(n, (True, True, bias))]
    else:
        slices = [(min(s + k, n) - s, (False, True, False)) for s in range(0, n, k)]
        assert sizes == [(n, (True, False, False)), *slices]
        if not bias:  # the weight alone: its slices, no call for the input
            sizes.clear()
            (weight_grad,) = torch.autograd.grad(model(x).square().sum(), [model[1].weight])
            assert sizes == slices
            torch.testing.assert_close(weight_grad, theirs[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("input_grad", [True, False])
def test_a_frozen_weight_gets_no_backend_call_for_the_bias(input_grad, monkeypatch):
    """Bias-only training (the weight frozen), no create_graph: the input's gradient from the
    backend's input-only call (none where the input needs none) and the bias's from a sum, not
    from a backend call with the bias in its mask (oneDNN's computes the weight's gradient for
    it); the gradients PyTorch's node gives."""
    make_layer, shape = LAYERS[0]
    model, plain = two_models(make_layer, shape)
    for m in (model, plain):
        m[1].weight.requires_grad_(False)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)  # the node applies: its input needs grad
    sizes = record_backend_calls(monkeypatch)
    ours = torch.autograd.grad(model(x * 1.5).square().sum(), [x] * input_grad + [model[1].bias, model[4].weight])
    assert sizes == [(shape[0], (True, False, False))] * input_grad  # input_grad False: the node skips it
    theirs = torch.autograd.grad(plain(x * 1.5).square().sum(), [x] * input_grad + [plain[1].bias, plain[4].weight])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_weight_gradient_slices_by_default_and_by_the_knobs(monkeypatch):
    """Unset: on any device, as many samples as keep a call's operands (input and output
    gradient) within WEIGHT_CALL_BYTES. GRADVAR_EXT_CONV_WEIGHT_SAMPLES=k: slices of k (0: the
    whole batch); GRADVAR_EXT_CONV_WEIGHT_MIB=m: the rule with m MiB (0: whole); a bad value is
    named."""
    x, grad = torch.randn(64, 32, 32, 32), torch.randn(64, 64, 32, 32)  # 384 KiB a sample: the CNN's layer 2
    monkeypatch.delenv("GRADVAR_EXT_CONV_WEIGHT_SAMPLES", raising=False)
    monkeypatch.delenv("GRADVAR_EXT_CONV_WEIGHT_MIB", raising=False)
    assert conv_backward.WEIGHT_CALL_BYTES == 8 << 20
    assert conv_backward._weight_call_samples(x, grad) == 21  # 8 MiB // 384 KiB
    assert conv_backward._weight_call_samples(x[:8], grad[:8]) == 8  # a small batch: one call
    on_meta = torch.empty(64, 32, 32, 32, device="meta"), torch.empty(64, 64, 32, 32, device="meta")
    assert conv_backward._weight_call_samples(*on_meta) == 21  # the same rule off the CPU
    huge = torch.empty(3, 512, 64, 64)  # 8 MiB a sample, so 16 MiB of operands: one at a time
    assert conv_backward._weight_call_samples(huge, huge) == 1
    monkeypatch.setenv("GRADVAR_EXT_CONV_WEIGHT_SAMPLES", "0")
    assert conv_backward._weight_call_samples(x, grad) == 64
    monkeypatch.setenv("GRADVAR_EXT_CONV_WEIGHT_SAMPLES", "4")
    assert conv_backward._weight_call_samples(x, grad) == 4
    assert conv_backward._weight_call_samples(*on_meta) == 4
    monkeypatch.setenv("GRADVAR_EXT_CONV_WEIGHT_MIB", "4")  # the samples knob wins
    assert conv_backward._weight_call_samples(x, grad) == 4
    monkeypatch.setenv("GRADVAR_EXT_CONV_WEIGHT_SAMPLES", "-1")
    with pytest.raises(ValueError, match=r"GRADVAR_EXT_CONV_WEIGHT_SAMPLES must be a whole number .* got '-1'"):
        conv_backward._weight_call_samples(x, grad)
    monkeypatch.delenv("GRADVAR_EXT_CONV_WEIGHT_SAMPLES")
    assert conv_backward._weight_call_samples(x, grad) == 10  # 4 MiB // 384 KiB
    assert conv_backward._weight_call_samples(*on_meta) == 10
    monkeypatch.setenv("GRADVAR_EXT_CONV_WEIGHT_MIB", "0")
    assert conv_backward._weight_call_samples(x, grad) == 64
    assert conv_backward._weight_call_samples(*on_meta) == 64
    monkeypatch.setenv("GRADVAR_EXT_CONV_WEIGHT_MIB", "8M")
    with pytest.raises(ValueError, match=r"GRADVAR_EXT_CONV_WEIGHT_MIB must be a whole number of MiB .* got '8M'"):
        conv_backward._weight_call_samples(x, grad)


@pytest.mark.parametrize("make_layer,shape", LAYERS, ids=IDS)
def test_default_weight_slices_match_pytorch(make_layer, shape, monkeypatch):
    """The default rule with a budget of two samples' operands: every weight-gradient call (the
    create_graph path's, _InputGradient's, the no-grad path's) in slices of 2, the no-grad path's
    input gradient one call and its bias gradient a sum; PyTorch's gradients to the second order
    and without create_graph."""
    monkeypatch.delenv("GRADVAR_EXT_CONV_WEIGHT_SAMPLES", raising=False)
    monkeypatch.delenv("GRADVAR_EXT_CONV_WEIGHT_MIB", raising=False)
    model, plain = two_models(make_layer, shape)
    x = torch.randn(shape, dtype=torch.float64)
    output = model[1](x)  # the conv's output (model: tanh, conv, tanh, flatten, linear)
    monkeypatch.setattr(conv_backward, "WEIGHT_CALL_BYTES", 2 * (x[0].numel() + output[0].numel()) * 8)
    sizes = record_backend_calls(monkeypatch)
    check_second_order(make_layer, shape)
    n = shape[0]
    weight_only = [size for size, need in sizes if need == (False, True, False)]
    assert weight_only and all(size == 2 for size in weight_only[: n // 2]) and sum(weight_only) % n == 0
    assert all(size == n for size, need in sizes if need != (False, True, False))
    sizes.clear()
    x.requires_grad_(True)
    ours = torch.autograd.grad(model(x).square().sum(), [x, *model.parameters()])  # no create_graph
    if n > 2:
        assert sizes == [(n, (True, False, False))] + [(min(2, n - s), (False, True, False)) for s in range(0, n, 2)]
    else:  # one slice: the backend's one call for all three
        assert sizes == [(n, (True, True, model[1].bias is not None))]
    theirs = torch.autograd.grad(plain(x).square().sum(), [x, *plain.parameters()])
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
