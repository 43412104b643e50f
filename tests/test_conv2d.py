"""Conv2d ops vs the reference (itself checked against a per-sample autograd loop), gradients,
opcheck, errors, nn.Conv2d-style arguments ('same', padding modes), Conv1d and conv bias."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conv_samples import (
    CONV_CASES,
    CONV_GRAD_CASES,
    CONV_OPS,
    MULTI_CHUNK_CONV_CASES,
    ConvCase,
    check_gradients_and_opcheck,
)
from torch import nn

import gradvar_ext
from gradvar_ext import conv_ops, reference

from helpers import (
    assert_matches,
    call,
    check_uniform_weight,
    check_variance_and_its_gradients,
    is_tiny,
    ops_run,
    ran_aten_arithmetic,
)

DTYPES = (torch.float64, torch.float32)


def per_sample_weight_grads(module: nn.Module, x, y, loss_fn):
    """Ground truth: one backward per sample through the real module."""
    grads = []
    for i in range(x.shape[0]):
        loss = loss_fn(module(x[i : i + 1]), y[i : i + 1])
        grads.append(torch.autograd.grad(loss, module.weight)[0])
    return torch.stack(grads)


def conv_scale(op, args):
    if op != "conv2d_variance":
        return None
    x, go, *conv = args
    return (reference.conv2d_second_moment(x.double(), go.double(), *conv) / x.shape[0]).max().item()


@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_reference_equals_per_sample_autograd(case):
    torch.manual_seed(0)
    x, go, *conv = case.args("conv2d_second_moment", torch.float64)
    kernel, stride, padding, dilation, groups = conv
    loops = []
    for i in range(case.n):
        w = torch.zeros(case.c_out, case.c_in // groups, *kernel, dtype=torch.float64, requires_grad=True)
        out = F.conv2d(x[i : i + 1], w, None, stride, padding, dilation, groups)
        loops.append(torch.autograd.grad(out, w, go[i : i + 1])[0])
    torch.testing.assert_close(reference.conv2d_per_sample_gradients(x, go, *conv), torch.stack(loops))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_matches_reference(op, dtype, conv_algorithm):
    torch.manual_seed(1)
    for case in CONV_CASES + [ConvCase(**{**c.__dict__, "to_input": False}) for c in CONV_CASES]:
        args = case.args(op, dtype)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        want = reference.OPS[op](*(a.double() if isinstance(a, torch.Tensor) else a for a in args))
        assert_matches(call(op, *args), want, dtype, conv_scale(op, tensors[:2] + list(args[len(tensors) :][:5])))


@pytest.mark.parametrize("case", MULTI_CHUNK_CONV_CASES, ids=str)
@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_matches_reference_over_several_chunks(op, case, conv_algorithm):
    torch.manual_seed(2)
    args = case.args(op, torch.float64)
    assert_matches(call(op, *args), reference.OPS[op](*args), torch.float64)


@pytest.mark.skipif(gradvar_ext.backend() == "reference", reason="the slabs are the compiled kernels'")
@pytest.mark.parametrize("op", ["conv2d_second_moment", "conv2d_variance", "conv2d_moments"])
def test_moments_by_slabs_of_rows_over_several_chunks(op, monkeypatch):
    """GRADVAR_EXT_CONV_SLABS=3 under a 1 MiB budget: 50 samples of 64 -> 64 channels at 16x16
    (a 295 KB gradient each: half the budget holds one) in 50 chunks, each formed over 6 slabs of
    3, 3, 3, 3, 3 and 1 output rows (one bmm, then 5 accumulating baddbmm): the reference's numbers."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "unfold")
    monkeypatch.setenv("GRADVAR_EXT_CONV_SLABS", "3")
    monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", "1")
    torch.manual_seed(5)
    args = MULTI_CHUNK_CONV_CASES[0].args(op, torch.float64)
    out = []
    names = ops_run(lambda: out.append(call(op, *args)))
    assert names.count("aten::baddbmm_") == 50 * 5
    assert_matches(out[0], reference.OPS[op](*args), torch.float64)


@pytest.mark.skipif(gradvar_ext.backend() == "reference", reason="the slabs are the compiled kernels'")
@pytest.mark.parametrize(
    ("case", "dtype", "accumulations"),
    [
        # 75 MB of patches, 74 KB of gradient a sample: slabs of 12 rows (K = 384 >= 6 O I / (O + I) = 314)
        (ConvCase(64, 32, 64, (32, 32), padding=(1, 1)), torch.float32, 2),
        # float64: slabs of 5 rows (K = 160 < 314): chunks of samples instead
        (ConvCase(64, 32, 64, (32, 32), padding=(1, 1)), torch.float64, 0),
        # 64 -> 64 at 16x16: 14-row slabs (K = 224 < 6 O I / (O + I) = 346): chunks of samples
        (ConvCase(64, 64, 64, (16, 16), padding=(1, 1)), torch.float32, 0),
        # 3 -> 32 at 32x32 (the benchmark CNN's first conv): the batch's gradients and patches take
        # 7.3 MB, half of it 15 rows (15, 15, 2: 2 baddbmm; all 32 rows in one slab under 32 MiB)
        (ConvCase(64, 3, 32, (32, 32), padding=(1, 1)), torch.float32, 2),
        # the seed's MNIST conv (1 -> 5, 5x5 on 28x28, N = 32): 1.9 MB, the 1 MiB floor: 13 rows (13, 11)
        (ConvCase(32, 1, 5, (28, 28), kernel=(5, 5)), torch.float32, 1),
    ],
    ids=["32to64-f32-slabs", "32to64-f64-samples", "64to64-f32-samples", "3to32-half-batch", "seed-1mib-floor"],
)
def test_cuda_slab_rule_applied_on_cpu(case, dtype, accumulations, monkeypatch):
    """GRADVAR_EXT_CONV_SLABS=auto applies CUDA's default rule on the CPU: slabs only where the
    whole batch fits one chunk and each slab's K positions satisfy K (O + I) >= 6 O I (on an H100
    the shorter slabs of the middle two rows' shapes ran slower than chunks of samples), under a
    budget of at most half what the whole batch's gradients and patches take (at least 1 MiB)."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "unfold")
    monkeypatch.setenv("GRADVAR_EXT_CONV_SLABS", "auto")
    monkeypatch.delenv("GRADVAR_EXT_CHUNK_MIB", raising=False)
    torch.manual_seed(6)
    x, go, *conv = case.args("conv2d_second_moment", dtype)
    out = []
    names = ops_run(lambda: out.append(call("conv2d_second_moment", x, go, *conv)))
    assert names.count("aten::baddbmm_") == accumulations
    if accumulations:  # slabs: the whole batch in one chunk, one bmm to start it
        assert names.count("aten::bmm") == 1
    want = reference.conv2d_second_moment(x.double(), go.double(), *conv)
    assert_matches(out[0], want, dtype)


@pytest.mark.skipif(gradvar_ext.backend() == "reference", reason="the shifted GEMMs are the compiled kernels'")
@pytest.mark.parametrize("unfold", ["", "strided"], ids=["im2col", "strided"])
@pytest.mark.parametrize(
    ("case", "chunk_mib", "bmm_calls"),
    [
        (ConvCase(3, 4, 6, (9, 8), kernel=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2), 0, 3),
        (ConvCase(4, 6, 3, (7, 7), kernel=(2, 3), padding=(2, 1), dilation=(1, 2), groups=3, contiguous=False), 0, 2),
        (ConvCase(2, 2, 3, (5, 5), kernel=(5, 5), padding=(2, 2)), 0, 5),
        (ConvCase(5, 3, 2, (6, 6), kernel=(1, 1)), 0, 1),
        # 50 samples of 64 -> 64 at 16x16 under 2 MiB (~1 MB of float64 scratch a sample: width-
        # unfolded and padded image, gradients: 2 a chunk, 25 chunks of 3 bmm; the cross moment's
        # two pairs: 1 a chunk)
        (MULTI_CHUNK_CONV_CASES[0], 2, (25 * 3, 50 * 3 * 2)),
        # stride_h > 1: the rows phase-major (kernel row i reads phase (i * dil_h) % s)
        (ConvCase(3, 2, 2, (8, 7), stride=(2, 3)), 0, 3),
        (ConvCase(2, 4, 6, (9, 8), kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 2), groups=2), 0, 3),
        (ConvCase(2, 3, 4, (11, 6), kernel=(4, 3), stride=(3, 2), padding=(2, 1)), 0, 4),
        (ConvCase(2, 2, 3, (7, 9), kernel=(2, 2), stride=(3, 4)), 0, 2),
        (ConvCase(3, 4, 5, (6, 6), kernel=(1, 1), stride=(2, 2)), 0, 1),
    ],
    ids=str,
)
@pytest.mark.parametrize("op", ["conv2d_second_moment", "conv2d_variance", "conv2d_moments", "conv2d_cross_moment"])
def test_moments_by_shifted_kernel_rows(op, case, chunk_mib, bmm_calls, unfold, monkeypatch):
    """GRADVAR_EXT_CONV_ALGORITHM=shifted: one bmm per kernel row and chunk over the images
    unfolded along their width only (every padding, dilation, stride, group and kernel shape;
    several chunks), both unfoldings (stride_h > 1: strided views); the reference's numbers in
    the weight's order."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "shifted")
    monkeypatch.setenv("GRADVAR_EXT_UNFOLD", unfold)
    monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", str(chunk_mib) if chunk_mib else "")
    torch.manual_seed(8)
    args = case.args(op, torch.float64)
    out = []
    names = ops_run(lambda: out.append(call(op, *args)))
    if isinstance(bmm_calls, tuple):  # (one pair, the cross moment's two)
        bmm_calls = bmm_calls[op == "conv2d_cross_moment"]
    elif op == "conv2d_cross_moment":
        bmm_calls *= 2
    assert names.count("aten::bmm") == bmm_calls
    assert_matches(out[0], reference.OPS[op](*args), torch.float64)


@pytest.mark.skipif(gradvar_ext.backend() == "reference", reason="the shifted GEMMs are the compiled kernels'")
@pytest.mark.parametrize("unfold", ["", "strided"], ids=["im2col", "strided"])
@pytest.mark.parametrize(
    "case",
    [
        ConvCase(3, 4, 6, (9, 8), kernel=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2),
        ConvCase(2, 4, 6, (9, 8), kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(2, 2), groups=2),
        ConvCase(2, 3, 4, (11, 6), kernel=(4, 3), stride=(3, 2), padding=(2, 1), contiguous=False),
        ConvCase(5, 3, 2, (6, 6), kernel=(1, 1)),
    ],
    ids=str,
)
@pytest.mark.parametrize("op", ["conv2d_weighted_gradient_product", "conv2d_weighted_gradient_products"])
def test_products_by_shifted_kernel_rows(op, case, unfold, monkeypatch):
    """The backward's products under GRADVAR_EXT_CONV_ALGORITHM=shifted: per chunk, kh bmm form the
    gradients, then kernel row by kernel row the product towards grad_output (a bmm, kh - 1
    baddbmm) and the one towards the input (kh products added into width-unfolded columns,
    folded back; on the CPU a bmm each, then the strided add): the reference's numbers, towards
    the input, towards grad_output (with left = input: the variance's backward, its X1 reused)
    and both at once."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "shifted")
    monkeypatch.setenv("GRADVAR_EXT_UNFOLD", unfold)
    torch.manual_seed(9)
    kh = case.kernel[0]
    if op == "conv2d_weighted_gradient_products":
        variants = [case.args(op, torch.float64)]
        expected_calls = [(2 * kh + 1, kh - 1)]
    else:
        towards_input = case.args(op, torch.float64)
        x = case.args(op, torch.float64)[1]
        towards_grad = ConvCase(**{**case.__dict__, "to_input": False}).args(op, torch.float64)
        towards_grad_of_input = (x, x, *towards_grad[2:])
        variants = [towards_input, towards_grad, towards_grad_of_input]
        expected_calls = [(2 * kh, 0), (kh + 1, kh - 1), (kh + 1, kh - 1)]
    for args, (bmm, baddbmm) in zip(variants, expected_calls):
        out = []
        names = ops_run(lambda args=args, out=out: out.append(call(op, *args)))
        assert (names.count("aten::bmm"), names.count("aten::baddbmm_")) == (bmm, baddbmm)
        assert_matches(out[0], reference.OPS[op](*args), torch.float64)


@pytest.mark.parametrize(
    "case",
    [
        ConvCase(5, 3, 4, (3, 3)),
        ConvCase(5, 12, 16, (3, 3)),
        ConvCase(4, 4, 6, (4, 3), kernel=(4, 3), groups=2),
        ConvCase(4, 16, 24, (4, 3), kernel=(4, 3), groups=2),
        ConvCase(3, 2, 3, (5, 6), padding=(1, 2)),
    ],
    ids=str,
)
def test_products_of_a_uniform_weight_equal_the_dense_weights(case, conv_algorithm):
    """A conv weight of one value expanded (stride 0: the gradient of ``variance.sum()`` and the
    squared norms' weight of ones) gives the dense weight's products; on one output pixel (T = 1,
    rank-one g_n) the unfolding path forms each product with a row sum instead of its GEMM (tiny
    layers: no GEMM either way, the direct loop)."""
    torch.manual_seed(14)
    unfolded = conv_algorithm.startswith("unfold")
    saved = 1 if unfolded and case.out_hw == (1, 1) and not is_tiny(*case.work) else 0
    for op, at in (("conv2d_weighted_gradient_products", 4), ("conv2d_weighted_gradient_product", 3)):
        check_uniform_weight(op, case.args(op, torch.float64), at, 2 * saved if op.endswith("products") else saved)


# Tiny conv layers' products and squared norms (samples x groups x positions x in x out <= 2**12
# multiply-adds) take the core's direct loops (the products written positions last to col2im);
# pairs on both sides of the bound.
@pytest.mark.parametrize(
    "case,direct",
    [
        (ConvCase(2, 4, 4, (4, 4), groups=2), True),  # 2 x 2 x 4 x 18 x 2 = 576
        (ConvCase(2, 4, 4, (4, 4), groups=2, to_input=False), True),
        (ConvCase(8, 4, 8, (4, 4), padding=(1, 1)), False),  # 8 x 16 x 36 x 8 = 36864
        (ConvCase(3, 2, 3, (4, 5), stride=(2, 1), contiguous=False), True),
        (ConvCase(3, 2, 3, (4, 5), stride=(2, 1), contiguous=False, to_input=False), True),
    ],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "op", ["conv2d_weighted_gradient_product", "conv2d_weighted_gradient_products", "conv2d_batch_l2"]
)
def test_tiny_conv_layers_match_reference_on_both_sides_of_the_direct_loops_bound(op, case, direct, dtype, monkeypatch):
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "unfold")
    assert is_tiny(*case.work) == direct
    torch.manual_seed(case.n)
    args = case.args(op, dtype)
    out = []
    names = ops_run(lambda: out.append(call(op, *args)))
    assert_matches(out[0], reference.OPS[op](*(a.double() if torch.is_tensor(a) else a for a in args)), dtype)
    if gradvar_ext.backend() != "reference":
        assert ran_aten_arithmetic(names) != direct, names


@pytest.mark.skipif(gradvar_ext.backend() == "reference", reason="the slabs are the compiled kernels'")
def test_unknown_slab_rows_are_named(monkeypatch):
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "unfold")
    monkeypatch.setenv("GRADVAR_EXT_CONV_SLABS", "two")
    x, go, *conv = ConvCase(2, 8, 4, (6, 6), padding=(1, 1)).args("conv2d_variance", torch.float32)
    with pytest.raises(
        ValueError, match="GRADVAR_EXT_CONV_SLABS must be 0 \\(off\\), auto or a number of rows per slab, got 'two'"
    ):
        call("conv2d_variance", x, go, *conv)


@pytest.mark.parametrize("case", CONV_GRAD_CASES, ids=str)
@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_gradcheck_gradgradcheck_opcheck(op, case, conv_algorithm):
    check_gradients_and_opcheck(op, case, "cpu")


@pytest.mark.parametrize("case", [CONV_GRAD_CASES[i] for i in (0, 1, 3)], ids=str)
@pytest.mark.parametrize("op", CONV_OPS)
def test_conv_gradients_match_autograd_through_reference(op, case):
    torch.manual_seed(4)
    args = case.args(op, torch.float64, requires_grad=True)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    ours, ref = call(op, *args), reference.OPS[op](*args)
    ours, ref = (ours, ref) if isinstance(ref, tuple) else ((ours,), (ref,))
    upstream = [torch.randn_like(r) for r in ref]
    g_ours = torch.autograd.grad(ours, tensors, upstream, create_graph=True)
    g_ref = torch.autograd.grad(ref, tensors, upstream, create_graph=True)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    probes = [torch.randn_like(g) for g in g_ref]
    for a, b in zip(
        torch.autograd.grad(g_ours, tensors, probes, allow_unused=True),
        torch.autograd.grad(g_ref, tensors, probes, allow_unused=True),
    ):
        if a is not None or b is not None:
            torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b if b is not None else 0 * a)


@pytest.mark.parametrize("case", [CONV_GRAD_CASES[i] for i in (0, 1, 3)], ids=str)
def test_conv_variance_by_moments_equals_the_reference_with_its_gradients(case, conv_algorithm):
    """The front end's conv Variance when a backward follows (one autograd node over
    conv2d_moments): values, first and second derivatives as autograd through the reference."""
    torch.manual_seed(7)
    x, go, *conv = case.args("conv2d_variance", torch.float64, requires_grad=True)
    check_variance_and_its_gradients(
        lambda a, b: conv_ops.conv2d_variance_by_moments(a, b, *conv),
        lambda a, b: reference.conv2d_variance(a, b, *conv),
        (x, go),
        second_order=True,
    )


# ---------------------------------------------------------------- nn.Conv2d-style use
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding="same"),
        dict(kernel_size=(2, 4), padding="same", dilation=(2, 1)),  # asymmetric 'same': input padded first
        dict(kernel_size=3, padding="valid", stride=2),
        dict(kernel_size=3, padding=1, padding_mode="reflect"),
        dict(kernel_size=(3, 2), padding=(1, 2), padding_mode="circular", groups=2),
        dict(kernel_size=3, padding=2, padding_mode="replicate", dilation=2),
    ],
    ids=str,
)
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_nn_conv2d_modules_end_to_end(kwargs):
    """Real nn.Conv2d modules: our statistics from (input, grad_output) vs per-sample autograd."""
    torch.manual_seed(5)
    module = nn.Conv2d(4, 6, **kwargs).double()
    x = torch.randn(5, 4, 9, 8, dtype=torch.float64)
    out = module(x)
    y = torch.randn_like(out)
    go = torch.autograd.grad(F.mse_loss(out, y, reduction="sum"), out)[0]
    per_sample = per_sample_weight_grads(module, x, y, lambda a, b: F.mse_loss(a, b, reduction="sum"))
    args = gradvar_ext.conv2d_arguments_of(module)
    torch.testing.assert_close(gradvar_ext.conv2d_variance(x, go, **args), per_sample.var(0, unbiased=False))
    torch.testing.assert_close(gradvar_ext.conv2d_second_moment(x, go, **args), per_sample.square().sum(0))
    torch.testing.assert_close(gradvar_ext.conv2d_batch_l2(x, go, **args), per_sample.square().sum((1, 2, 3, 4)))
    bias = torch.stack([go[i].sum((1, 2)) for i in range(5)])
    torch.testing.assert_close(gradvar_ext.conv2d_bias_variance(go), bias.var(0, unbiased=False))
    torch.testing.assert_close(gradvar_ext.conv2d_bias_second_moment(go), bias.square().sum(0))
    torch.testing.assert_close(gradvar_ext.conv2d_bias_batch_l2(go), bias.square().sum(1))


def test_gradient_of_variance_through_padding_and_module():
    """create_graph=True end to end: gradient of the total variance w.r.t. the conv weight."""
    torch.manual_seed(6)
    module = nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect").double()
    x, y = torch.randn(4, 2, 6, 6, dtype=torch.float64), torch.randn(4, 3, 6, 6, dtype=torch.float64)
    out = module(x)
    go = torch.autograd.grad(F.mse_loss(out, y, reduction="sum"), out, create_graph=True)[0]
    total = gradvar_ext.conv2d_variance(x, go, **gradvar_ext.conv2d_arguments_of(module)).sum()
    ours = torch.autograd.grad(total, module.weight)[0]
    per_sample = []
    for i in range(4):
        loss = F.mse_loss(module(x[i : i + 1]), y[i : i + 1], reduction="sum")
        per_sample.append(torch.autograd.grad(loss, module.weight, create_graph=True)[0])
    want = torch.autograd.grad(torch.stack(per_sample).var(0, unbiased=False).sum(), module.weight)[0]
    torch.testing.assert_close(ours, want)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=4, stride=2, padding=1, dilation=1),
        dict(kernel_size=3, padding="same", groups=2),
    ],
    ids=str,
)
def test_conv1d(kwargs):
    torch.manual_seed(7)
    module = nn.Conv1d(4, 6, **kwargs).double()
    x = torch.randn(5, 4, 11, dtype=torch.float64)
    out = module(x)
    y = torch.randn_like(out)
    go = torch.autograd.grad(F.mse_loss(out, y, reduction="sum"), out)[0]
    per_sample = per_sample_weight_grads(module, x, y, lambda a, b: F.mse_loss(a, b, reduction="sum"))
    conv = dict(
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        groups=module.groups,
    )
    torch.testing.assert_close(gradvar_ext.conv1d_variance(x, go, **conv), per_sample.var(0, unbiased=False))
    torch.testing.assert_close(gradvar_ext.conv1d_second_moment(x, go, **conv), per_sample.square().sum(0))
    torch.testing.assert_close(gradvar_ext.conv1d_batch_l2(x, go, **conv), per_sample.square().sum((1, 2, 3)))


@pytest.mark.parametrize(
    "name, value", [("kernel_size", (3, 3)), ("stride", (1, 1)), ("dilation", 1.0), ("padding", (0, 1))], ids=str
)
def test_conv1d_rejects_a_two_dimensional_hyper_parameter_naming_itself(name, value):
    x, go = torch.randn(2, 3, 6), torch.randn(2, 4, 4)
    kwargs = dict(kernel_size=3)
    kwargs[name] = value
    with pytest.raises(ValueError, match=rf"gradvar.conv1d_variance: {name} must be an int or a 1-tuple of ints"):
        gradvar_ext.conv1d_variance(x, go, **kwargs)


def test_variance_of_one_sample_is_exactly_zero():
    x, go, *conv = ConvCase(1, 3, 4, (6, 6), padding=(1, 1)).args("conv2d_variance", torch.float32)
    assert torch.equal(call("conv2d_variance", x, go, *conv), torch.zeros(4, 3, 3, 3))


@pytest.mark.skipif(gradvar_ext.backend() == "reference", reason="the choice is the compiled kernels'")
def test_unknown_conv_algorithm_is_named(monkeypatch):
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "winograd")
    x, go, *conv = ConvCase(2, 8, 4, (6, 6), padding=(1, 1)).args("conv2d_variance", torch.float32)
    with pytest.raises(
        ValueError,
        match=r"^gradvar\.conv2d_variance: GRADVAR_EXT_CONV_ALGORITHM must be auto, unfold, grouped, implicit or "
        "shifted, got 'winograd'",
    ):
        call("conv2d_variance", x, go, *conv)


@pytest.mark.skipif(gradvar_ext.backend() == "reference", reason="the choice is the compiled kernels'")
def test_unknown_unfolding_is_named(monkeypatch):
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "unfold")
    monkeypatch.setenv("GRADVAR_EXT_UNFOLD", "fft")
    x, go, *conv = ConvCase(2, 8, 4, (6, 6), padding=(1, 1)).args("conv2d_variance", torch.float32)
    with pytest.raises(ValueError, match=r"^gradvar\.conv2d: GRADVAR_EXT_UNFOLD must be im2col or strided, got 'fft'"):
        call("conv2d_variance", x, go, *conv)


def test_algorithms_agree_on_the_auto_choice(monkeypatch):
    """float32, 3x3, stride 1, 16 channels: auto takes the grouped path; all agree. implicit (a
    CUDA kernel reading patches in place) is unfold off CUDA: the same numbers, bit for bit."""
    x, go, *conv = ConvCase(5, 16, 8, (7, 6), padding=(1, 1)).args("conv2d_variance", torch.float32)
    results = {}
    for algorithm in ("auto", "unfold", "grouped", "implicit"):
        monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", algorithm)
        results[algorithm] = call("conv2d_variance", x, go, *conv)
    want = reference.conv2d_variance(x.double(), go.double(), *conv)
    for result in results.values():
        assert_matches(result, want, torch.float32, want.abs().max().item())
    if gradvar_ext.backend() != "reference":
        assert torch.equal(results["implicit"], results["unfold"])


@pytest.mark.skipif(gradvar_ext.backend() == "reference", reason="the choice is the compiled kernels'")
@pytest.mark.parametrize(
    ("in_channels", "groups", "grouped"),
    [(16, 1, True), (8, 2, False), (16, 2, True), (4, 4, True), (1, 1, False), (3, 1, False)],
)
def test_auto_conv_algorithm_by_input_channels_per_group(in_channels, groups, grouped, monkeypatch):
    """auto on float32 CPU: one grouped convolution per chunk (a convolution_backward) for >= 8
    input channels per group or depthwise (1 in each of several groups); unfolded patches + bmm
    for fewer in one group (the seed's 1-channel MNIST conv: 1.6-2.5x faster that way)."""
    monkeypatch.delenv("GRADVAR_EXT_CONV_ALGORITHM", raising=False)
    torch.manual_seed(3)
    x, go = torch.randn(4, in_channels, 9, 9), torch.randn(4, 8, 7, 7)
    conv = ([3, 3], [1, 1], [0, 0], [1, 1], groups)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = call("conv2d_variance", x, go, *conv)
    names = {e.key for e in prof.key_averages()}
    assert ("aten::convolution_backward" in names) == grouped, names
    assert ("aten::bmm" in names) != grouped, names
    assert_matches(result, reference.conv2d_variance(x.double(), go.double(), *conv), torch.float32)


# ---------------------------------------------------------------- errors
def _ones(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


CONV = ([3, 3], [1, 1], [0, 0], [1, 1], 1)
BAD_CONV_INPUTS = [
    ((_ones(2, 3, 5), _ones(2, 4, 3, 3), *CONV), ValueError, "input must have shape [N, C_in, H, W]"),
    ((_ones(2, 3, 5, 5), _ones(2, 4, 9), *CONV), ValueError, "grad_output must have shape [N, C_out, H_out, W_out]"),
    ((_ones(2, 3, 5, 5), _ones(3, 4, 3, 3), *CONV), ValueError, "batch size (dim 0) of grad_output (3)"),
    ((_ones(0, 3, 5, 5), _ones(0, 4, 3, 3), *CONV), ValueError, "input has an empty batch"),
    ((_ones(2, 3, 5, 5), _ones(2, 4, 4, 3), *CONV), ValueError, "grad_output has spatial size [4, 3] but input [5, 5]"),
    (
        (_ones(2, 3, 5, 5), _ones(2, 4, 3, 3), [3, 3], [1, 1], [0, 0], [1, 1], 2),
        ValueError,
        "input has 3 channels, not divisible by groups = 2",
    ),
    (
        (_ones(2, 4, 5, 5), _ones(2, 3, 3, 3), [3, 3], [1, 1], [0, 0], [1, 1], 2),
        ValueError,
        "grad_output has 3 channels, not divisible by groups = 2",
    ),
    ((_ones(2, 3, 2, 2), _ones(2, 4, 1, 1), *CONV), ValueError, "is smaller than the dilated kernel"),
    ((_ones(2, 3, 5, 5), _ones(2, 4, 3, 3), [3, 3], [0, 1], [0, 0], [1, 1], 1), ValueError, "stride must be >= 1"),
    ((_ones(2, 3, 5, 5), _ones(2, 4, 3, 3), [3, 3], [1, 1], [-1, 0], [1, 1], 1), ValueError, "padding must be >= 0"),
    ((_ones(2, 3, 5, 5), _ones(2, 4, 3, 3), [3, 3], [1, 1], [0, 0], [1, 1], 0), ValueError, "groups must be >= 1"),
    ((_ones(2, 3, 5, 5, dtype=torch.int64), _ones(2, 4, 3, 3), *CONV), TypeError, "input must be float32 or float64"),
    ((_ones(2, 3, 5, 5), _ones(2, 4, 3, 3, dtype=torch.float64), *CONV), TypeError, "grad_output has dtype"),
]


@pytest.mark.parametrize("op", ["conv2d_variance", "conv2d_second_moment", "conv2d_batch_l2"])
@pytest.mark.parametrize("args,exc,text", BAD_CONV_INPUTS, ids=[b[2][:40] for b in BAD_CONV_INPUTS])
def test_conv_errors_name_the_argument(op, args, exc, text):
    for fn in (getattr(torch.ops.gradvar, op), reference.OPS[op]):
        with pytest.raises(exc) as info:
            fn(*args)
        assert f"gradvar.{op}: " in str(info.value) and text in str(info.value), str(info.value)


def test_conv_weighted_product_checks_left_and_weight():
    x, go = _ones(2, 3, 5, 5), _ones(2, 4, 3, 3)
    op = torch.ops.gradvar.conv2d_weighted_gradient_product
    with pytest.raises(ValueError, match=r"weight must have the conv weight's shape \[4, 3, 3, 3\]"):
        op(go, x, go, _ones(4, 3, 3, 2), *CONV, True)
    with pytest.raises(ValueError, match=r"left \(to_input=True\) must have the shape of grad_output"):
        op(x, x, go, _ones(4, 3, 3, 3), *CONV, True)
    with pytest.raises(ValueError, match=r"left \(to_input=False\) must have the shape of input"):
        op(go, x, go, _ones(4, 3, 3, 3), *CONV, False)
    for fn in (op, gradvar_ext.reference.conv2d_weighted_gradient_product):
        with pytest.raises(ValueError, match=r"center must have the weight's shape \[4, 3, 3, 3\], got \[4, 3, 3, 2\]"):
            fn(go, x, go, _ones(4, 3, 3, 3), *CONV, True, _ones(4, 3, 3, 2))


def test_python_arguments_are_validated():
    x, go = _ones(2, 3, 5, 5), _ones(2, 4, 5, 5)
    with pytest.raises(ValueError, match="gradvar.conv2d_variance: padding='same' needs stride 1"):
        gradvar_ext.conv2d_variance(x, go, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="gradvar.conv2d_variance: padding_mode must be one of"):
        gradvar_ext.conv2d_variance(x, go, 3, padding=1, padding_mode="mirror")
    with pytest.raises(ValueError, match="gradvar.conv2d_batch_l2: kernel_size must be an int or a pair"):
        gradvar_ext.conv2d_batch_l2(x, go, (3, 3, 3))
    with pytest.raises(ValueError, match="gradvar.conv2d_bias_variance: grad_output must have shape"):
        gradvar_ext.conv2d_bias_variance(_ones(2, 4))
