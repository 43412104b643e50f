"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch

import gradvar_ext
from gradvar_ext import reference

TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}

# CPU layers of at most TINY_WORK multiply-adds (samples x groups x positions x in x out, sizes of
# 0 counted as 1) and TINY_ROWS samples x groups take the core's direct loops, no bmm (kSmallWork,
# kSmallRows: csrc/outer_product_stats.cpp).
TINY_WORK, TINY_ROWS = 2**12, 512


def is_tiny(rows: int, *sizes: int) -> bool:
    """Whether a CPU layer of ``rows`` = samples x groups and these other sizes (positions, in,
    out) takes the core's direct loops."""
    work = 1
    for size in (rows, *sizes):
        work *= max(size, 1)
    return work <= TINY_WORK and rows <= TINY_ROWS


def call(op: str, *args):
    return getattr(torch.ops.gradvar, op)(*args)


def expected(op: str, *args):
    """The reference, computed in float64 on the same values."""
    return reference.OPS[op](*(a.detach().double() for a in args))


def assert_matches(actual: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, scale: float | None = None) -> None:
    """|actual - want| <= tol * (|want| + scale), scale defaulting to max |want| (relative to the result's size).
    Tuples (ops with several outputs) are compared element by element."""
    if isinstance(actual, tuple):
        assert isinstance(want, tuple) and len(actual) == len(want)
        for a, w in zip(actual, want):
            assert_matches(a, w, dtype, scale)
        return
    assert actual.dtype == dtype, (actual.dtype, dtype)
    assert actual.shape == want.shape, (actual.shape, want.shape)
    want = want.to(actual.device)
    if scale is None:
        scale = want.abs().max().item() if want.numel() else 0.0
    err = (actual.double() - want).abs()
    bound = TOLERANCE[dtype] * (want.abs() + scale + 1e-30)
    assert torch.all(err <= bound), f"max error {err.max().item():.3g}, worst ratio {(err / bound).max().item():.3g}"


def scale_for(op: str, args) -> float | None:
    """Variance cancels: its rounding error is relative to the second moment / N, not to itself."""
    if op != "linear_variance":
        return None
    x, g = (a.detach().double() for a in args)
    return (reference.linear_second_moment(x, g) / x.shape[0]).max().item()


__all__ = ["assert_matches", "call", "expected", "gradvar_ext", "is_tiny", "scale_for"]


def check_variance_and_its_gradients(ours_fn, ref_fn, inputs, second_order: bool) -> None:
    """ours_fn(*inputs) equals ref_fn(*inputs) in value, first derivatives and (second_order)
    second derivatives w.r.t. every input, for random upstream gradients."""
    ours, ref = ours_fn(*inputs), ref_fn(*inputs)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    upstream = torch.randn_like(ref)
    g_ours = torch.autograd.grad(ours, inputs, upstream, create_graph=True)
    g_ref = torch.autograd.grad(ref, inputs, upstream, create_graph=True)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    if second_order:
        probes = [torch.randn_like(t) for t in g_ref]
        for a, b in zip(torch.autograd.grad(g_ours, inputs, probes), torch.autograd.grad(g_ref, inputs, probes)):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def ops_run(fn) -> list[str]:
    """Names of the ATen ops that fn() ran (the CPU profiler's events, in order)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


# The ATen arithmetic that the core's paths run and its direct loops for tiny layers don't.
ATEN_ARITHMETIC = frozenset(
    ("aten::bmm", "aten::baddbmm", "aten::baddbmm_", "aten::mm", "aten::sum", "aten::mul", "aten::mul_", "aten::square")
)


def ran_aten_arithmetic(names: list[str]) -> bool:
    """Whether ops_run's ``names`` include ATen arithmetic (the core's ATen path ran, not its loops)."""
    return not ATEN_ARITHMETIC.isdisjoint(names)


def check_uniform_weight(op: str, args: tuple, at: int, gemms_saved: int | None) -> None:
    """A products op given, as its weight (``args[at]``), one value expanded (stride 0: what the
    gradient of ``variance.sum()`` is): the results of the same weight made dense, and, where the
    per-sample gradients are rank one (T = 1), ``gemms_saved`` fewer bmm (a row sum instead; None:
    not counted)."""
    value = torch.tensor(0.37, dtype=args[at].dtype, device=args[at].device)
    uniform = value.expand(args[at].shape)
    runs = {}
    for name, weight in (("uniform", uniform), ("dense", uniform.contiguous())):
        with_weight = (*args[:at], weight, *args[at + 1 :])
        out = []
        names = ops_run(lambda with_weight=with_weight, out=out: out.append(call(op, *with_weight)))
        runs[name] = (out[0] if isinstance(out[0], tuple) else (out[0],), names.count("aten::bmm"))
    rtol, atol = (1e-10, 1e-12) if args[at].dtype == torch.float64 else (1e-5, 1e-6)
    for got, want in zip(runs["uniform"][0], runs["dense"][0], strict=True):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * float(want.abs().max()))
    if gemms_saved is not None and gradvar_ext.backend() != "reference":
        assert runs["dense"][1] - runs["uniform"][1] == gemms_saved, runs
