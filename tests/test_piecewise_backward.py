"""Extended models' ReLU, LeakyReLU, Hardtanh / ReLU6 and max pooling backward nodes
(gradvar_ext/piecewise_backward.py): the same gradients as PyTorch's to every order, where they
apply and only there, and no zeros in a double backward."""

from __future__ import annotations

import copy

import pytest
import torch
from test_conv_backward import (
    assert_matches_the_loop,
    check_checkpointing,
    check_traced_model_saves,
    check_vmap_of_grad_is_pytorchs,
)
from torch import nn

import gradvar_ext as gv
from gradvar_ext import piecewise_backward

OURS = "_PiecewiseBackwardBackward"
RELU, LEAKY, HARDTANH, POOL, ADAPTIVE = "relu", "leaky_relu", "hardtanh", "max_pool", "adaptive_max_pool"  # kinds
PYTORCHS = {
    RELU: "ReluBackward0",
    LEAKY: "LeakyReluBackward0",
    HARDTANH: "HardtanhBackward0",
    POOL: "MaxPool2DWithIndicesBackward0",
    ADAPTIVE: "AdaptiveMaxPool2DBackward0",
}
NONE = "NoneType"  # an output without a gradient (a ReLU on the data)


def ours(kinds: list[str]) -> list[str]:
    """The nodes of layers of these kinds with ours applied (no gradient: none)."""
    return [kind if kind == NONE else OURS for kind in kinds]


def pytorchs(kinds: list[str]) -> list[str]:
    return [PYTORCHS.get(kind, kind) for kind in kinds]


# (model, input shape, the kinds of its piecewise layers): a ReLU between layers (its input
# requires grad), max pooling with its options (stride, padding, dilation, ceil_mode), a ReLU
# first in the model (on the data: no gradient, nothing to route) and twice in a row, LeakyReLU,
# ReLU6 and Hardtanh with their own bounds.
MODELS = [
    (lambda: nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)), (7, 5), [RELU]),
    (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)),
        (3, 2, 6, 6),
        [RELU, POOL],
    ),
    (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.MaxPool2d(3, stride=2, padding=1, dilation=1, ceil_mode=True),
            nn.Tanh(),
            nn.MaxPool2d((2, 1), dilation=(1, 2)),
            nn.AdaptiveMaxPool2d((2, 3)),
            nn.Flatten(),
            nn.Linear(18, 3),
        ),
        (3, 2, 7, 7),
        [POOL, POOL, ADAPTIVE],
    ),
    (
        lambda: nn.Sequential(nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.ReLU(), nn.Linear(4, 3)),
        (6, 5),
        [NONE, RELU, RELU],
    ),
    (
        lambda: nn.Sequential(
            nn.Linear(5, 6),
            nn.LeakyReLU(0.2),
            nn.Linear(6, 6),
            nn.ReLU6(),
            nn.Linear(6, 6),
            nn.Hardtanh(-0.3, 0.5),
            nn.Linear(6, 3),
        ),  # fmt: skip
        (8, 5),
        [LEAKY, HARDTANH, HARDTANH],
    ),
]
IDS = ["mlp", "cnn", "pool-options", "relu-first-and-twice", "leaky-relu6-hardtanh"]


@pytest.fixture(autouse=True)
def reroute_small_layers(monkeypatch):
    """These tests' layers are small: the nodes apply to them all (by default only where PyTorch's
    zeros would take at least 1 MiB, test_only_where_the_zeros_would_be_large)."""
    monkeypatch.setattr(piecewise_backward, "MIN_ZEROS_BYTES", 0)


def piecewise_nodes(model, x) -> list[str]:
    """The type names of the nodes behind the outputs of the model's ReLU and max pooling layers."""
    seen = []
    handles = [
        m.register_forward_hook(lambda m, a, out: seen.append(type(out.grad_fn).__name__))
        for m in model.modules()
        if isinstance(m, piecewise_backward.PIECEWISE)
    ]
    model(x)
    for handle in handles:
        handle.remove()
    return seen


def first_and_second_order(model, x, y):
    """Gradients w.r.t. every parameter, and the gradient of their squared norm (a double backward)."""
    params = list(model.parameters())
    loss = nn.functional.mse_loss(model(x), y, reduction="sum")
    grads = torch.autograd.grad(loss, params, create_graph=True)
    penalty = sum(g.square().sum() for g in grads)
    return grads, torch.autograd.grad(penalty, params)


def check_second_order(make_model, shape, nodes, device="cpu"):
    """Our nodes where ``nodes`` says, PyTorch's in the plain copy, and the same gradients of
    first and second order (float64)."""
    torch.manual_seed(0)
    plain = make_model().to(device, torch.float64)
    model = gv.extend(copy.deepcopy(plain))
    x = torch.randn(shape, dtype=torch.float64, device=device) + 0.1  # the data: no exact zeros at the kinks
    y = torch.randn(shape[0], 3, dtype=torch.float64, device=device)
    assert piecewise_nodes(model, x) == ours(nodes)
    assert piecewise_nodes(plain, x) == pytorchs(nodes)
    got, want = first_and_second_order(model, x, y), first_and_second_order(plain, x, y)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make_model,shape,nodes", MODELS, ids=IDS)
def test_gradients_to_the_second_order_match_pytorch(make_model, shape, nodes):
    check_second_order(make_model, shape, nodes)


def count_zeros(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::zeros_like", "aten::zeros"))


def test_the_double_backward_forms_no_zeros(monkeypatch):
    """PyTorch's nodes differentiate the layers' backward w.r.t. the tensor they saved as
    zeros_like and carry the zeros back; ours have no such derivative to form. Same gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 1), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 1),
        nn.ReLU6(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )  # fmt: skip
    model = gv.extend(model.double())
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    results, zeros = {}, {}
    for choice in ("pytorch", "gradvar"):
        monkeypatch.setenv("GRADVAR_EXT_PIECEWISE_BACKWARD", choice)
        zeros[choice] = count_zeros(lambda: first_and_second_order(model, x, y))
        results[choice] = first_and_second_order(model, x, y)
    assert zeros["pytorch"] - zeros["gradvar"] == 5, zeros  # one per layer (the loss's and our ops' stay)
    for a, b in zip(results["gradvar"][1], results["pytorch"][1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_where_it_applies():
    torch.manual_seed(0)
    x = torch.randn(3, 4, requires_grad=True)
    images = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert piecewise_nodes(gv.extend(nn.Sequential(nn.ReLU())), x) == [OURS]  # a leaf that requires grad
    assert piecewise_nodes(gv.extend(nn.Sequential(nn.ReLU())), x.detach()) == [NONE]  # no gradient at all
    assert piecewise_nodes(gv.extend(nn.Sequential(nn.Tanh(), nn.ReLU(inplace=True))), x) == [PYTORCHS[RELU]]
    with torch.no_grad():
        assert piecewise_nodes(gv.extend(nn.Sequential(nn.ReLU())), x) == [NONE]
    pool = gv.extend(nn.MaxPool2d(2, return_indices=True))  # a tuple: left as it is
    assert type(pool(images)[0].grad_fn).__name__ == PYTORCHS[POOL]
    assert type(gv.extend(nn.MaxPool2d(2))(images).grad_fn).__name__ == OURS
    for inplace in (nn.LeakyReLU(inplace=True), nn.ReLU6(inplace=True), nn.Hardtanh(inplace=True)):
        assert type(gv.extend(inplace)(torch.tanh(x)).grad_fn).__name__ != OURS
    # called by keyword, and an nn.ReLU subclass
    relu = gv.extend(type("MyReLU", (nn.ReLU,), {})())
    assert type(relu(input=x).grad_fn).__name__ == OURS


def test_only_where_the_zeros_would_be_large(monkeypatch):
    """By default a layer keeps PyTorch's node where the zeros it would form (the ReLU's output,
    the max pooling's input) take less than 1 MiB: there the node's Python time costs more."""
    monkeypatch.undo()  # the module's own threshold
    assert piecewise_backward.MIN_ZEROS_BYTES == 1 << 20
    model = gv.extend(nn.Sequential(nn.Tanh(), nn.ReLU(), nn.MaxPool2d(2)))
    small = torch.randn(4, 4, 128, 127, requires_grad=True)  # 4 * 4 * 128 * 127 floats: just below 1 MiB
    large = torch.randn(4, 4, 128, 128, requires_grad=True)  # 1 MiB; pooled: 256 KiB, the zeros are its input's
    assert piecewise_nodes(model, small) == [PYTORCHS[RELU], PYTORCHS[POOL]]
    assert piecewise_nodes(model, large) == [OURS, OURS]
    assert piecewise_nodes(model, large.double()[:, :, :64]) == [OURS, OURS]  # bytes, not elements


def test_switched_off_by_the_environment(monkeypatch):
    model = gv.extend(nn.Sequential(nn.Tanh(), nn.ReLU(), nn.MaxPool2d(2)))
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    monkeypatch.setenv("GRADVAR_EXT_PIECEWISE_BACKWARD", "pytorch")
    assert piecewise_nodes(model, x) == [PYTORCHS[RELU], PYTORCHS[POOL]]
    monkeypatch.setenv("GRADVAR_EXT_PIECEWISE_BACKWARD", "fast")
    with pytest.raises(ValueError, match="GRADVAR_EXT_PIECEWISE_BACKWARD must be 'gradvar' or 'pytorch', got 'fast'"):
        model(x)


def test_a_pytorch_that_cannot_tell_torch_func_transforms_keeps_pytorchs_nodes(monkeypatch):
    """Without torch._C._functorch.peek_interpreter_stack a forward under vmap cannot be told
    apart: PyTorch's nodes stay, no error."""
    from gradvar_ext import conv_backward

    monkeypatch.setattr(conv_backward, "_PEEK_INTERPRETER_STACK", None)
    model = gv.extend(nn.Sequential(nn.Tanh(), nn.ReLU(), nn.MaxPool2d(2)))
    assert piecewise_nodes(model, torch.randn(2, 3, 4, 4, requires_grad=True)) == [PYTORCHS[RELU], PYTORCHS[POOL]]


@pytest.mark.parametrize(
    "layer,op", [(nn.ReLU(), torch.relu), (nn.MaxPool2d(2), lambda t: nn.functional.max_pool2d(t, 2))]
)
def test_an_earlier_hook_that_changes_the_output_keeps_pytorchs_node(layer, op):
    """A forward hook registered before extend that applies the layer's op again to a rescaled
    output: still that op's node, but not of the layer's input, so ours must not apply."""
    layer = copy.deepcopy(layer)
    layer.register_forward_hook(lambda m, a, out: op(out * 2))
    model = gv.extend(nn.Sequential(nn.Tanh(), layer))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert piecewise_nodes(model, x)[0] in PYTORCHS.values()
    plain = nn.Sequential(nn.Tanh(), copy.deepcopy(layer))  # the same hook, never extended
    (ours,) = torch.autograd.grad(model(x).square().sum(), [x])
    (theirs,) = torch.autograd.grad(plain(x).square().sum(), [x])
    torch.testing.assert_close(ours, theirs)


def test_a_tensor_hook_on_the_output_gets_its_gradient():
    relu = nn.ReLU()
    received = []
    relu.register_forward_hook(lambda m, a, out: out.register_hook(received.append) and None)
    model = gv.extend(nn.Sequential(nn.Tanh(), relu))
    x = torch.randn(2, 3, requires_grad=True)
    assert piecewise_nodes(model, x) == [PYTORCHS[RELU]]
    torch.autograd.grad(model(x).sum(), [x])
    torch.testing.assert_close(received[-1], torch.ones(2, 3))


@pytest.mark.parametrize(
    "make", [nn.ReLU, nn.LeakyReLU, nn.ReLU6, lambda: nn.MaxPool2d(2), lambda: nn.AdaptiveMaxPool2d(3)]
)
def test_in_place_changes_of_what_the_node_saved_are_caught_as_by_pytorch(make):
    """The nodes save aliases of what PyTorch's save (the ReLU's output, the pooling's input):
    changing it in place before the backward is the error PyTorch raises."""
    for extended in (False, True):
        layer = gv.extend(make()) if extended else make()
        x = torch.randn(2, 3, 4, 4, requires_grad=True)
        hidden = x * 1.0  # (which saves no tensor for its backward)
        out = layer(hidden)
        (out if isinstance(layer, nn.ReLU) else hidden).add_(1)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.sum().backward()


@pytest.mark.parametrize(
    "layer",
    [
        nn.ReLU(),
        nn.LeakyReLU(0.1),
        nn.Hardtanh(-0.5, 0.5),
        nn.MaxPool2d(2, stride=1, padding=1),
        nn.AdaptiveMaxPool2d(3),
    ],
)
def test_gradcheck_and_gradgradcheck_through_the_node(layer):
    layer = gv.extend(layer)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x = (x + 0.2 * x.sign()).requires_grad_(True)  # away from ReLU's kink (random: no ties in a window)

    def f(x):
        out = layer(x * 1.0)
        assert type(out.grad_fn).__name__ == OURS
        return out.square()

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_recomputes_through_the_nodes(use_reentrant):
    """torch.utils.checkpoint reruns the forward (and extend's hooks, so the nodes) in the
    backward; the gradients are PyTorch's, and so is a double backward through it (non-reentrant)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(3, 2, 1), nn.LeakyReLU())
    body = check_checkpointing(body, use_reentrant)
    assert piecewise_nodes(body, torch.randn(3, 2, 6, 6, dtype=torch.float64)) == [OURS, OURS, OURS]


def test_torch_func_transforms_keep_pytorchs_node():
    """Under torch.func the nodes (plain autograd.Functions) do not apply; vmap(grad) of an
    extended model gives PyTorch's per-sample gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 1))
    check_vmap_of_grad_is_pytorchs(gv.extend(model.double()), torch.randn(5, 2, 4, 4, dtype=torch.float64))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace", "ignore:`torch.jit.save")
def test_a_traced_extended_model_saves():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(3, 2))
    check_traced_model_saves(gv.extend(model), torch.randn(2, 2, 4, 4))


def test_extend_twice_and_unextend():
    relu, pool = nn.ReLU(), nn.MaxPool2d(2)
    model = gv.extend(gv.extend(nn.Sequential(nn.Conv2d(2, 3, 3), relu, pool)))
    assert len(relu._forward_hooks) == len(pool._forward_hooks) == 1
    x = torch.randn(2, 2, 6, 6)
    assert piecewise_nodes(model, x) == [OURS, OURS]
    gv.unextend(model)
    assert len(relu._forward_hooks) == len(pool._forward_hooks) == 0
    assert piecewise_nodes(model, x) == [PYTORCHS[RELU], PYTORCHS[POOL]]


@pytest.mark.parametrize("with_grad", [False, True], ids=["statistics-only", "with-grad"])
def test_statistics_and_their_gradient_match_the_per_sample_loop(with_grad):
    """The seed's job on a model with ReLUs and max pooling, through collect.backward and through
    loss.backward (with .grad): the gradient of the total variance equals the per-sample loop's."""
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(12, 2),
    )  # fmt: skip
    plain = plain.double()
    model = gv.extend(copy.deepcopy(plain))
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    lossfunc = nn.MSELoss(reduction="sum")
    assert piecewise_nodes(model, x) == [OURS, OURS, OURS]
    with gv.collect(gv.Variance()) as stats:
        loss = lossfunc(model(x), y)
        if with_grad:
            grads = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        else:
            stats.backward(loss, create_graph=True)
    total = sum(p.variance.sum() for p in model.parameters())
    grads = torch.autograd.grad(total, list(model.parameters()))
    gv.clear(model)
    assert_matches_the_loop(plain, x, y, lossfunc, total, grads)


def test_reroute_leaves_other_outputs_alone():
    """What the hook is handed that is not the layer's op's tensor output of its input: left as it is."""
    relu, pool = nn.ReLU(), nn.MaxPool2d(2)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    assert piecewise_backward.reroute(relu, x, torch.tanh(x)) is None  # not a ReLU's node
    assert piecewise_backward.reroute(relu, x, torch.relu(x * 2)) is None  # a ReLU of something else
    assert piecewise_backward.reroute(relu, (x,), torch.relu(x)) is None  # not a tensor input
    assert piecewise_backward.reroute(pool, x, torch.relu(x)) is None  # not a max pooling's node
    assert piecewise_backward.reroute(pool, x, nn.functional.max_pool2d(x * 2, 2)) is None
    assert type(piecewise_backward.reroute(relu, x, torch.relu(x)).grad_fn).__name__ == OURS
    assert type(piecewise_backward.reroute(pool, x, nn.functional.max_pool2d(x, 2)).grad_fn).__name__ == OURS
    leaky = nn.LeakyReLU(0.1)
    assert piecewise_backward.reroute(leaky, x, nn.functional.leaky_relu(x * 2, 0.1)) is None
    assert piecewise_backward.reroute(leaky, x, torch.relu(x)) is None
