"""Kernels vs the pure-torch reference, gradcheck + gradgradcheck, opcheck: every op, many shapes."""

from __future__ import annotations

import pytest
import torch

import gradvar_ext
from gradvar_ext import ops, reference

from helpers import (
    assert_matches,
    call,
    check_uniform_weight,
    check_variance_and_its_gradients,
    expected,
    is_tiny,
    ops_run,
    ran_aten_arithmetic,
    scale_for,
)
from samples import ALL_CASES, GRAD_CASES, MIDDLES, MULTI_CHUNK_CASES, N_VALUES, OPS, Case

DTYPES = (torch.float64, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("middle", MIDDLES, ids=str)
@pytest.mark.parametrize("n", N_VALUES)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference(op, n, middle, dtype):
    torch.manual_seed(n)
    for case in (c for c in ALL_CASES if c.n == n and c.middle == middle):
        args = case.args(op, dtype)
        assert_matches(call(op, *args), expected(op, *args), dtype, scale_for(op, args))


@pytest.mark.parametrize("case", MULTI_CHUNK_CASES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_matches_reference_over_several_chunks(op, case):
    torch.manual_seed(0)
    args = case.args(op, torch.float64)
    assert_matches(call(op, *args), expected(op, *args), torch.float64, scale_for(op, args))


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_gradcheck_and_gradgradcheck(op, case):
    torch.manual_seed(1)
    args = case.args(op, torch.float64, requires_grad=True)
    fn = getattr(torch.ops.gradvar, op)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("case", GRAD_CASES[1:4], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_gradients_match_autograd_through_reference(op, case):
    """First and second derivatives of our autograd formulas vs plain autograd through the reference."""
    torch.manual_seed(2)
    args = case.args(op, torch.float64, requires_grad=True)
    ours, ref = call(op, *args), reference.OPS[op](*args)
    ours, ref = (ours, ref) if isinstance(ref, tuple) else ((ours,), (ref,))
    upstream = [torch.randn_like(r) for r in ref]
    g_ours = torch.autograd.grad(ours, args, upstream, create_graph=True)
    g_ref = torch.autograd.grad(ref, args, upstream, create_graph=True)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    probes = [torch.randn_like(g) for g in g_ref]
    gg_ours = torch.autograd.grad(g_ours, args, probes, allow_unused=True)
    gg_ref = torch.autograd.grad(g_ref, args, probes, allow_unused=True)
    for a, b in zip(gg_ours, gg_ref):
        a = torch.zeros_like(b) if a is None and b is not None else a
        b = torch.zeros_like(a) if b is None and a is not None else b
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, case):
    torch.manual_seed(3)
    args = case.args(op, torch.float64, requires_grad=True)
    torch.library.opcheck(getattr(torch.ops.gradvar, op).default, args)


# ---------------------------------------------------------------- bias statistics
BIAS_FUNCTIONS = ("bias_second_moment", "bias_variance", "bias_batch_l2")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", BIAS_FUNCTIONS)
def test_bias_matches_reference(name, dtype):
    torch.manual_seed(4)
    for case in ALL_CASES[::3]:
        g = case.args("linear_second_moment", dtype)[1]
        want = getattr(reference, name)(g.double())
        scale = None
        if name == "bias_variance":
            scale = (reference.bias_second_moment(g.double()) / g.shape[0]).max().item()
        assert_matches(getattr(gradvar_ext, name)(g), want, dtype, scale)


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
@pytest.mark.parametrize("name", BIAS_FUNCTIONS)
def test_bias_gradcheck_and_gradgradcheck(name, case):
    torch.manual_seed(5)
    g = case.args("linear_second_moment", torch.float64, requires_grad=True)[1]
    fn = getattr(gradvar_ext, name)
    assert torch.autograd.gradcheck(fn, (g,))
    assert torch.autograd.gradgradcheck(fn, (g,))
    torch.testing.assert_close(
        torch.autograd.grad(fn(g).sum(), g)[0], torch.autograd.grad(getattr(reference, name)(g).sum(), g)[0]
    )


@pytest.mark.parametrize("out", [8, 32, 33, 40])
def test_bias_variance_both_formulas(out):
    """reference.bias_variance takes torch.var for up to 32 columns (or on CUDA) and two passes in
    plain ops above (faster there on the CPU): both are the variance of the per-sample bias
    gradients (sums over the middle dims), differentiable twice."""
    torch.manual_seed(7)
    g = torch.randn(5, 2, out, dtype=torch.float64, requires_grad=True)
    want = g.detach().sum(1).var(0, unbiased=False)
    torch.testing.assert_close(gradvar_ext.bias_variance(g), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gradvar_ext.bias_variance(g.float()), want.float())
    assert torch.autograd.gradcheck(gradvar_ext.bias_variance, (g,))
    assert torch.autograd.gradgradcheck(gradvar_ext.bias_variance, (g,))


# ---------------------------------------------------------------- variance properties
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("middle", MIDDLES, ids=str)
def test_variance_of_one_sample_is_exactly_zero(middle, dtype):
    x, g = Case(1, middle, 5, 3).args("linear_variance", dtype)
    assert torch.equal(gradvar_ext.linear_variance(x, g), torch.zeros(3, 5, dtype=dtype))
    assert torch.equal(gradvar_ext.bias_variance(g), torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("middle", MIDDLES, ids=str)
def test_variance_never_negative_under_cancellation(middle):
    """Large identical per-sample gradients plus tiny noise: S/N and mean^2 nearly cancel in float32."""
    torch.manual_seed(6)
    x = 1000 + torch.randn(64, *middle, 9) * 1e-3
    g = 1000 + torch.randn(64, *middle, 7) * 1e-3
    var = gradvar_ext.linear_variance(x, g)
    assert var.min().item() >= 0
    assert gradvar_ext.bias_variance(g).min().item() >= 0


def test_identical_samples_have_zero_variance_in_float64():
    x = torch.randn(1, 3, 6, dtype=torch.float64).expand(10, 3, 6)
    g = torch.randn(1, 3, 4, dtype=torch.float64).expand(10, 3, 4)
    var = gradvar_ext.linear_variance(x, g)
    sm = gradvar_ext.linear_second_moment(x, g)
    assert var.max().item() <= 1e-12 * sm.max().item()


def test_batch_l2_sums_to_trace_of_second_moment():
    torch.manual_seed(7)
    for middle in MIDDLES:
        x, g = Case(9, middle, 16, 12).args("linear_batch_l2", torch.float64)
        torch.testing.assert_close(
            gradvar_ext.linear_batch_l2(x, g).sum(), gradvar_ext.linear_second_moment(x, g).sum()
        )


@pytest.mark.parametrize("case", [Case(1, (), 3, 2), Case(5, (), 4, 3), Case(4, (3,), 3, 2)], ids=str)
def test_variance_by_moments_equals_the_reference_with_its_gradients(case):
    """The front end's Variance when a backward follows (one autograd node over the moments op):
    values, first and second derivatives as autograd through the reference; gradgradcheck."""
    torch.manual_seed(6)
    x, g = case.args("linear_variance", torch.float64, requires_grad=True)
    check_variance_and_its_gradients(
        ops.linear_variance_by_moments, reference.linear_variance, (x, g), second_order=case.n > 1
    )
    small = (
        torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True),
        torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(ops.linear_variance_by_moments, small)
    assert torch.autograd.gradgradcheck(ops.linear_variance_by_moments, small)


def test_variance_by_moments_of_one_sample_has_zero_gradients():
    x = torch.randn(1, 4, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    variance = ops.linear_variance_by_moments(x, g)
    assert torch.equal(variance, torch.zeros(2, 3, dtype=torch.float64))
    for grad in torch.autograd.grad(variance.sum(), (x, g)):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_results_are_deterministic():
    x, g = Case(150, (3,), 200, 180).args("linear_variance", torch.float32)
    for op in ("linear_variance", "linear_batch_l2"):
        assert torch.equal(call(op, x, g), call(op, x, g))


# Tiny CPU layers (samples x positions x in x out <= 2**12 multiply-adds, samples <= 512) take the
# core's direct loops, larger ones its ATen path (bmm): pairs on both sides of those bounds.
TINY_BOUND_CASES = [
    (Case(64, (), 8, 8), True),
    (Case(65, (), 8, 8), False),
    (Case(512, (), 2, 4), True),
    (Case(513, (), 2, 3), False),
    (Case(2, (2, 4), 16, 16, contiguous=False), True),
    (Case(3, (2, 4), 16, 16, contiguous=False), False),
    (Case(4, (32,), 32, 1), True),
    (Case(4, (33,), 32, 1), False),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case,direct", TINY_BOUND_CASES, ids=str)
@pytest.mark.parametrize(
    "op",
    (
        "linear_second_moment",
        "linear_variance",
        "linear_moments",
        "linear_batch_l2",
        "weighted_gradient_product",
        "weighted_gradient_products",
    ),
)
def test_tiny_layers_match_reference_on_both_sides_of_the_direct_loops_bound(op, case, direct, dtype):
    assert is_tiny(case.n, *case.middle, case.fin, case.fout) == direct
    torch.manual_seed(case.n)
    args = case.args(op, dtype)
    out = []
    names = ops_run(lambda: out.append(call(op, *args)))
    assert_matches(out[0], expected(op, *args), dtype, scale_for(op, args))
    if gradvar_ext.backend() != "reference":
        assert ran_aten_arithmetic(names) != direct, names


def test_tiny_layers_variance_never_negative_and_exact_for_identical_samples():
    """The direct loop's variance (float32 in, double accumulators): clamped at 0 under
    cancellation, 0 for identical samples."""
    torch.manual_seed(8)
    x = 1000 + torch.randn(16, 9) * 1e-3
    g = 1000 + torch.randn(16, 7) * 1e-3
    assert gradvar_ext.linear_variance(x, g).min().item() >= 0
    x, g = torch.randn(1, 9).expand(16, 9), torch.randn(1, 7).expand(16, 7)
    assert gradvar_ext.linear_variance(x, g).max().item() <= 1e-7 * gradvar_ext.linear_second_moment(x, g).max().item()


# ---------------------------------------------------------------- variance from the one-pass moments
@pytest.mark.parametrize("case", [Case(1, (), 3, 2), Case(5, (), 4, 3), Case(4, (3,), 3, 2)], ids=str)
def test_variance_from_moments_equals_the_variance_op_with_its_gradients(case):
    """The front end's Variance (moments op + variance_from_moments): the variance op's values,
    and first and second derivatives equal to autograd through the reference variance."""
    torch.manual_seed(5)
    x, g = case.args("linear_variance", torch.float64, requires_grad=True)
    ours = gradvar_ext.variance_from_moments(*gradvar_ext.linear_moments(x, g), case.n)
    ref = reference.linear_variance(x, g)
    assert_matches(ours, call("linear_variance", x, g), torch.float64, ref.abs().max().item())
    upstream = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, (x, g), upstream, create_graph=True)
    g_ref = torch.autograd.grad(ref, (x, g), upstream, create_graph=True)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if case.n > 1:
        probes = [torch.randn_like(t) for t in g_ref]
        for a, b in zip(torch.autograd.grad(g_ours, (x, g), probes), torch.autograd.grad(g_ref, (x, g), probes)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        assert torch.autograd.gradgradcheck(
            lambda a, b: gradvar_ext.variance_from_moments(a, b, 3),
            (
                torch.rand(3, 2, dtype=torch.float64, requires_grad=True) + 2,
                torch.randn(3, 2, dtype=torch.float64, requires_grad=True),
            ),
        )


# ---------------------------------------------------------------- a uniform weight: variance.sum()'s gradient
@pytest.mark.parametrize("centered", [True, False], ids=["center", "no-center"])
@pytest.mark.parametrize(
    "case",
    [
        Case(6, (), 5, 4),
        Case(6, (), 50, 40),
        Case(5, (), 4, 3, contiguous=False),
        Case(5, (), 40, 30, contiguous=False),
        Case(4, (3,), 5, 4),
        Case(4, (3,), 40, 30),
    ],
    ids=str,
)
def test_products_of_a_uniform_weight_equal_the_dense_weights(case, centered):
    """A weight of one value expanded (stride 0) gives the dense weight's products; without middle
    dims (rank-one g_n) each product is a row sum instead of its GEMM (tiny layers: no GEMM either
    way, the direct loop)."""
    torch.manual_seed(12)
    saved = 0 if case.middle or is_tiny(case.n, case.fin, case.fout) else 1
    for op, at in (("weighted_gradient_products", 4), ("weighted_gradient_product", 3)):
        args = case.args(op, torch.float64)
        if not centered:
            args = (*args[:-1], None)
        check_uniform_weight(op, args, at, 2 * saved if op.endswith("products") else saved)


@pytest.mark.parametrize("case", [Case(6, (), 40, 30), Case(4, (3,), 40, 30)], ids=str)
@pytest.mark.parametrize(
    "statistic", [ops.linear_variance_by_moments, gradvar_ext.linear_variance, gradvar_ext.linear_second_moment]
)
def test_gradients_of_a_summed_statistic_equal_those_of_a_dense_upstream(statistic, case):
    """``statistic(x, g).sum()`` hands its backward one value expanded, which stays one (``scaled``)
    into the products: first and second derivatives equal to those of the same upstream made dense."""
    torch.manual_seed(13)
    x, g = case.args("linear_variance", torch.float64, requires_grad=True)
    assert ops.scaled(torch.ones(()).expand(40, 30), 2.0).stride() == (0, 0)  # 1200 elements: kept expanded
    grads = []
    for total in (lambda s: s.sum(), lambda s: (s * torch.ones_like(s)).sum()):
        grads.append(torch.autograd.grad(total(statistic(x, g)), (x, g), create_graph=True))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * float(b.detach().abs().max()))
    probes = [torch.randn_like(t) for t in grads[0]]
    second = [torch.autograd.grad(first, (x, g), probes) for first in grads]
    for a, b in zip(*second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * float(b.detach().abs().max()))


@pytest.mark.parametrize("fin, fout", [(0, 3), (3, 0)])
def test_products_of_a_uniform_weight_with_no_features(fin, fout):
    """A layer with no input or no output features: an expanded weight of no elements gives the
    dense one's (empty or zero) products, no error from the uniform weight's row sum."""
    x, g = torch.randn(4, fin, dtype=torch.float64), torch.randn(4, fout, dtype=torch.float64)
    uniform = torch.ones((), dtype=torch.float64).expand(fout, fin)
    for got, want in zip(
        torch.ops.gradvar.weighted_gradient_products(g, x, x, g, uniform, None),
        torch.ops.gradvar.weighted_gradient_products(g, x, x, g, uniform.contiguous(), None),
        strict=True,
    ):
        assert got.shape == want.shape and torch.equal(got, torch.zeros_like(want))
