"""The same checks on CUDA tensors. Skipped where no GPU is visible (CI); run on a lent GPU."""

from __future__ import annotations

import functools

import pytest
import torch
from conv_samples import (
    CONV_CASES,
    CONV_GRAD_CASES,
    CONV_OPS,
    MULTI_CHUNK_CONV_CASES,
    ConvCase,
    check_gradients_and_opcheck,
)
from test_conv_backward import IDS as CONV_LAYER_IDS
from test_conv_backward import LAYERS as CONV_LAYERS
from test_conv_backward import check_second_order
from test_piecewise_backward import IDS as PIECEWISE_IDS
from test_piecewise_backward import MODELS as PIECEWISE_MODELS
from test_piecewise_backward import check_second_order as check_piecewise_second_order

import gradvar_ext

from helpers import assert_matches, call, check_uniform_weight, expected, ops_run, scale_for
from samples import ALL_CASES, GRAD_CASES, MULTI_CHUNK_CASES, OPS, Case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DTYPES = (torch.float64, torch.float32)
# The tensor-core kernels need sm_80+; below it their flags fall back to the CUDA-core / unfold paths.
TENSOR_CORES = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.fixture(autouse=True)
def _exact_backends():
    """float32 tolerances assume true float32 GEMMs (no TF32). gradgradcheck's reentrancy check
    (tolerance 0) needs cuDNN's repeatable algorithms: the conv statistics' backward takes the mean
    weight gradient from torch.nn.grad.conv2d_weight, and with cuDNN's default algorithms
    conv2d_variance on ConvCase(3, 2, 3, (5, 4), padding=(1, 1)) failed it 4 times in 4 on an H200
    (fourteenth session), unfolded or implicit alike, and passed 4 in 4 with deterministic=True.
    The library's own kernels are deterministic either way (tested below)."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    with torch.backends.cudnn.flags(
        enabled=True, benchmark=False, deterministic=True, allow_tf32=torch.backends.cudnn.allow_tf32
    ):
        yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_cuda_matches_reference(op, dtype):
    torch.manual_seed(10)
    for case in ALL_CASES + MULTI_CHUNK_CASES:
        args = case.args(op, dtype, device="cuda")
        out = call(op, *args)
        assert all(t.is_cuda for t in (out if isinstance(out, tuple) else (out,)))
        assert_matches(out, expected(op, *(a.cpu() for a in args)), dtype, scale_for(op, [a.cpu() for a in args]))


@pytest.mark.parametrize("case", GRAD_CASES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_cuda_gradcheck_gradgradcheck_opcheck(op, case):
    torch.manual_seed(11)
    args = case.args(op, torch.float64, device="cuda", requires_grad=True)
    fn = getattr(torch.ops.gradvar, op)
    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)
    torch.library.opcheck(fn.default, args)


def test_cuda_bias_functions():
    torch.manual_seed(12)
    g = torch.randn(7, 3, 5, dtype=torch.float64, device="cuda", requires_grad=True)
    for name in ("bias_second_moment", "bias_variance", "bias_batch_l2"):
        fn = getattr(gradvar_ext, name)
        torch.testing.assert_close(fn(g).cpu(), getattr(gradvar_ext.reference, name)(g.detach().cpu()))
        assert torch.autograd.gradgradcheck(fn, (g,))


def test_cuda_device_mismatch_is_named():
    x = torch.randn(4, 5, device="cuda")
    g = torch.randn(4, 3)
    with pytest.raises(ValueError, match="gradvar.linear_variance: grad_output is on cpu but input is on cuda"):
        torch.ops.gradvar.linear_variance(x, g)


def test_cuda_runs_on_the_current_stream_and_is_deterministic():
    torch.manual_seed(13)
    x = torch.randn(150, 3, 200, device="cuda")
    g = torch.randn(150, 3, 180, device="cuda")
    want = {op: call(op, x, g) for op in ("linear_variance", "linear_batch_l2")}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = {op: call(op, x, g) for op in want}
    stream.synchronize()
    for op in want:
        assert torch.equal(got[op], want[op]), op


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_non_default_device():
    x = torch.randn(6, 2, 5, device="cuda:1")
    g = torch.randn(6, 2, 3, device="cuda:1")
    out = torch.ops.gradvar.linear_variance(x, g)
    assert out.device == x.device
    torch.testing.assert_close(out.cpu(), gradvar_ext.reference.linear_variance(x.cpu(), g.cpu()))


# ---------------------------------------------------------------- Conv2d on CUDA
def assert_conv_cases_match_reference(op, dtype, cases):
    """op on CUDA tensors against the reference in float64 on the CPU, case by case (the variance
    at the scale of the second moment / N, which its cancellation errors follow)."""
    for case in cases:
        args = case.args(op, dtype, device="cuda")
        cpu64 = [a.cpu().double() if isinstance(a, torch.Tensor) else a for a in args]
        scale = None
        if op == "conv2d_variance":
            scale = (gradvar_ext.reference.conv2d_second_moment(*cpu64) / case.n).max().item()
        out = call(op, *args)
        assert all(t.is_cuda for t in (out if isinstance(out, tuple) else (out,)))
        assert_matches(out, gradvar_ext.reference.OPS[op](*cpu64), dtype, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", CONV_OPS)
def test_cuda_conv_matches_reference(op, dtype, conv_algorithm):
    torch.manual_seed(14)
    cases = CONV_CASES + [ConvCase(**{**c.__dict__, "to_input": False}) for c in CONV_CASES] + MULTI_CHUNK_CONV_CASES
    assert_conv_cases_match_reference(op, dtype, cases)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ("conv2d_second_moment", "conv2d_variance", "conv2d_moments"))
def test_cuda_conv_moments_by_slabs_of_rows(op, dtype, monkeypatch):
    """The benchmark CNN's 32 -> 64 channel conv at 32 x 32, N = 64 (75 MB of float32 patches),
    unfolded (float32's default; float64's moments go by shifted kernel rows by default, below):
    float32 goes a slab of 12 output rows at a time (12, 12, 8: one bmm, then 2 accumulating
    baddbmm), all samples in one chunk; float64's slabs would be 5 rows (K = 160 positions <
    6 O I / (O + I) = 314), too short: chunks of samples, no baddbmm. =5 forces slabs of 5 rows
    (7 slabs: 6 baddbmm), =0 turns them off. Every way matches the reference."""
    for name in ("GRADVAR_EXT_FUSED_CUDA", "GRADVAR_EXT_CHUNK_MIB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "auto" if dtype == torch.float32 else "unfold")
    torch.manual_seed(23)
    case = ConvCase(64, 32, 64, (32, 32), padding=(1, 1))
    args = case.args(op, dtype, device="cuda")
    cpu64 = [a.cpu().double() if isinstance(a, torch.Tensor) else a for a in args]
    scale = (gradvar_ext.reference.conv2d_second_moment(*cpu64) / case.n).max().item()
    want = gradvar_ext.reference.OPS[op](*cpu64)
    for slabs, accumulations in (("", 2 if dtype == torch.float32 else 0), ("5", 6), ("0", 0)):
        monkeypatch.setenv("GRADVAR_EXT_CONV_SLABS", slabs)
        out = []
        names = ops_run(lambda out=out: out.append(call(op, *args)))
        assert names.count("aten::baddbmm_") == accumulations, slabs
        assert_matches(out[0], want, dtype, scale if op == "conv2d_variance" else None)


@pytest.fixture
def cuda_chunked_unfold(monkeypatch):
    """The chunked conv moments on CUDA (not the fused walk), so that every op unfolds."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "unfold")
    monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", "0")


@pytest.fixture(params=["im2col", "strided"])
def cuda_unfolding(request, cuda_chunked_unfold, monkeypatch):
    """Both unfoldings on CUDA: our unfold / fold kernels (cuda/unfold_kernels.cu, the default)
    and GRADVAR_EXT_UNFOLD=strided (the opt-out: strided views and copies, products folded back
    by strided additions). Their gradcheck, gradgradcheck and opcheck: conv_algorithm's "unfold"
    and "unfold-strided" in test_cuda_conv_gradcheck_gradgradcheck_opcheck."""
    monkeypatch.setenv("GRADVAR_EXT_UNFOLD", request.param)
    return request.param


@pytest.mark.parametrize("slabs", ["0", "2"], ids=["chunks", "slabs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", CONV_OPS)
def test_cuda_unfoldings_match_reference(op, dtype, slabs, cuda_unfolding, monkeypatch):
    """Every conv op with the columns unfolded (all rows, or slabs of 2 rows for the moments) and
    the backward's products folded back, by either unfolding: every stride, padding, dilation and
    group."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_SLABS", slabs)
    torch.manual_seed(29)
    cases = CONV_CASES + [ConvCase(**{**c.__dict__, "to_input": False}) for c in CONV_CASES] + MULTI_CHUNK_CONV_CASES
    assert_conv_cases_match_reference(op, dtype, cases)


def test_cuda_im2col_kernels_run_by_default(cuda_chunked_unfold, monkeypatch):
    """The variance and its gradient launch the unfold kernel and the fold kernel by default, and
    neither under GRADVAR_EXT_UNFOLD=strided."""
    x, go, *conv = ConvCase(3, 4, 6, (9, 8), kernel=(3, 2), stride=(2, 1), padding=(1, 0), groups=2).args(
        "conv2d_variance", torch.float32, "cuda", requires_grad=True
    )
    monkeypatch.delenv("GRADVAR_EXT_UNFOLD", raising=False)
    names = _cuda_kernels_of(lambda: torch.autograd.grad(call("conv2d_variance", x, go, *conv).sum(), (x, go)))
    assert any("gradvar::unfold::im2col_rows_kernel" in n for n in names), names
    assert any("gradvar::unfold::col2im_kernel" in n for n in names), names
    monkeypatch.setenv("GRADVAR_EXT_UNFOLD", "strided")  # (3 samples < 6 taps: ATen's col2im folds)
    names = _cuda_kernels_of(lambda: torch.autograd.grad(call("conv2d_variance", x, go, *conv).sum(), (x, go)))
    assert not any("gradvar::unfold::" in n for n in names), names


@pytest.mark.parametrize("unfold", ["strided", "im2col"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", [op for op in CONV_OPS if op != "conv2d_batch_l2"])
def test_cuda_conv_ops_by_shifted_kernel_rows(op, dtype, unfold, monkeypatch):
    """GRADVAR_EXT_CONV_ALGORITHM=shifted on CUDA (opt-in): the moments and the backward's
    products one bmm per kernel row and chunk over width-unfolded images, by strided views or by
    the im2col / col2im kernels (stride_h > 1: phase-major rows by strided views); every conv
    case, several chunks, and the benchmark CNN's 32 -> 64 conv."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "shifted")
    monkeypatch.setenv("GRADVAR_EXT_UNFOLD", unfold)
    torch.manual_seed(31)
    cnn = ConvCase(64, 32, 64, (32, 32), padding=(1, 1))
    cases = CONV_CASES + MULTI_CHUNK_CONV_CASES + [cnn]
    if op == "conv2d_weighted_gradient_product":
        cases += [ConvCase(**{**c.__dict__, "to_input": False}) for c in cases]
    assert_conv_cases_match_reference(op, dtype, cases)
    if op in CONV_MOMENT_OPS or op == "conv2d_moments":
        args = cnn.args(op, dtype, device="cuda")
        names = ops_run(lambda: call(op, *args))
        assert names.count("aten::bmm") % 3 == 0 and names.count("aten::bmm") >= 3, names.count("aten::bmm")
        assert "aten::baddbmm_" not in names  # not the slabs of the unfolded path
        if dtype == torch.float64 and op != "conv2d_cross_moment":
            # 1.28 MB of scratch a sample: all 64 in one chunk of the moments' 128 MiB; 13 a chunk
            # (5 chunks) under a forced 16 MiB, which still matches
            assert names.count("aten::bmm") == 3
            monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", "16")
            out = []
            assert ops_run(lambda: out.append(call(op, *args))).count("aten::bmm") == 15
            assert_conv_cases_match_reference(op, dtype, [cnn])


@pytest.mark.parametrize("op", ("conv2d_second_moment", "conv2d_variance", "conv2d_moments"))
def test_cuda_float64_conv_moments_go_by_shifted_kernel_rows_by_default(op, monkeypatch):
    """auto on CUDA: the float64 moments by shifted kernel rows (one bmm per kernel row and chunk:
    the benchmark CNN's conv in one chunk of 128 MiB), float32's by unfolded patches (slabs:
    baddbmm), and float64's backward products and a 1x1 kernel's moments by unfolded patches too
    (the same ATen ops as under GRADVAR_EXT_CONV_ALGORITHM=unfold)."""
    for name in (
        "GRADVAR_EXT_CONV_ALGORITHM",
        "GRADVAR_EXT_FUSED_CUDA",
        "GRADVAR_EXT_CHUNK_MIB",
        "GRADVAR_EXT_CONV_SLABS",
    ):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(37)
    cnn = ConvCase(64, 32, 64, (32, 32), padding=(1, 1))
    args = cnn.args(op, torch.float64, device="cuda")
    names = ops_run(lambda: call(op, *args))
    assert names.count("aten::bmm") == 3 and "aten::baddbmm_" not in names, names
    assert_conv_cases_match_reference(op, torch.float64, [cnn])
    names = ops_run(lambda: call(op, *cnn.args(op, torch.float32, device="cuda")))
    assert "aten::baddbmm_" in names, names
    # the products, and a 1x1 stride-1 kernel's moments (its unfolding is a view), as unfold
    pointwise = ConvCase(8, 16, 32, (8, 8), kernel=(1, 1))
    for name, case in (("conv2d_weighted_gradient_product", cnn), (op, pointwise)):
        args = case.args(name, torch.float64, device="cuda")
        ran = {}
        for algorithm in ("auto", "unfold", "shifted"):
            monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", algorithm)
            ran[algorithm] = [n for n in ops_run(lambda n=name, a=args: call(n, *a)) if n.startswith("aten::")]
        assert ran["auto"] == ran["unfold"] != ran["shifted"], name


@pytest.mark.parametrize("case", CONV_GRAD_CASES, ids=str)
@pytest.mark.parametrize("op", CONV_OPS)
def test_cuda_conv_gradcheck_gradgradcheck_opcheck(op, case, conv_algorithm):
    check_gradients_and_opcheck(op, case, "cuda")


# ---------------------------------------------------------------- the moment paths on CUDA
MOMENT_OPS = ("linear_second_moment", "linear_variance", "linear_cross_moment")
CONV_MOMENT_OPS = ("conv2d_second_moment", "conv2d_variance", "conv2d_cross_moment")


@pytest.fixture(params=["0", "1", "tensor_cores"])
def fused(request, monkeypatch):
    """Chunked bmm ("0"), the fused kernel on CUDA cores ("1"; the default for few positions) and,
    on sm_80+, on tensor cores (3xTF32 for float32, DMMA for float64)."""
    monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", request.param)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", MOMENT_OPS)
def test_fused_cuda_linear_matches_reference(fused, op, dtype):
    torch.manual_seed(16)
    # Shapes with positions (the fused path): tile edges (1, 63, 64, 65, 127-130, 256), positions
    # per sample below, at and above a stage (8), 128-bit loads (features % 4 == 0) or not, and
    # both split regimes.
    # One position per sample (no middle dims) takes the fused kernel too when it is forced.
    shapes = [(7, (3,), 5, 3), (2, (2, 3), 16, 12), (64, (5,), 65, 63), (300, (2,), 7, 9), (3, (17,), 130, 64)]
    shapes += [(5, (40,), 132, 256), (33, (8,), 36, 20), (6, (1, 13), 128, 127), (2, (9,), 129, 128)]
    shapes += [(300, (), 130, 129), (9, (), 256, 1), (2, (1,), 64, 65)]
    cases = ALL_CASES + [Case(n, m, fi, fo) for n, m, fi, fo in shapes] + MULTI_CHUNK_CASES
    for case in cases:
        args = case.args(op, dtype, device="cuda")
        want = expected(op, *(a.cpu() for a in args))
        assert_matches(call(op, *args), want, dtype, scale_for(op, [a.cpu() for a in args]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", CONV_MOMENT_OPS)
def test_fused_cuda_conv_matches_reference(fused, op, dtype):
    torch.manual_seed(17)
    assert_conv_cases_match_reference(op, dtype, CONV_CASES + MULTI_CHUNK_CONV_CASES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ("conv2d_second_moment", "conv2d_variance", "conv2d_moments"))
def test_implicit_patches_match_reference(op, dtype, monkeypatch):
    """GRADVAR_EXT_CONV_ALGORITHM=implicit: the moments' tensor-core kernel reads the patches from
    the image (every stride, padding, dilation, group and tile edge of the conv cases); the other
    ops (cross moment, batch_l2, the backward's products) unfold as before, so the gradients and
    gradgradcheck go through both."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "implicit")
    torch.manual_seed(19)
    cases = CONV_CASES + MULTI_CHUNK_CONV_CASES + [ConvCase(3, 70, 66, (9, 11), stride=(2, 1), padding=(2, 0))]
    assert_conv_cases_match_reference(op, dtype, cases)
    args = cases[-1].args(
        op, dtype, device="cuda"
    )  # the tensor-core kernel ran (unset FUSED_CUDA: no other path to it)
    ran = any("fused_moments_mma_kernel" in n for n in _cuda_kernels_of(lambda: call(op, *args)))
    assert ran == TENSOR_CORES  # below sm_80: the unfold path, the same numbers
    x, go, *conv = ConvCase(3, 2, 3, (5, 4), padding=(1, 1)).args(op, torch.float64, "cuda", requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b: call(op, a, b, *conv), (x, go))


@pytest.mark.parametrize("accumulate", ["columns", "sliced", "wide"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_accumulate_kernels_match_reference(accumulate, dtype, monkeypatch):
    """GRADVAR_EXT_ACCUMULATE=sliced (8 threads a column, their partial sums added in a fixed
    order), =columns (one thread a column) and =wide (16 bytes of columns a thread; the column
    kernel where the columns are no whole packs) forced: the chunked moments (Linear with
    positions, conv, cross moments, a chunk of one sample, more columns than one grid pass, 65 535
    blocks of 32) match the reference, and a second run gives the same bits."""
    monkeypatch.setenv("GRADVAR_EXT_ACCUMULATE", accumulate)
    monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", "0")
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "unfold")
    torch.manual_seed(37)
    shapes = [(7, (3,), 5, 3), (64, (9,), 33, 65), (1, (4,), 8, 8), (3, (2,), 1100, 2000)]
    for op in MOMENT_OPS:
        for case in [Case(n, m, fi, fo) for n, m, fi, fo in shapes]:
            args = case.args(op, dtype, device="cuda")
            want = expected(op, *(a.cpu() for a in args))
            got = call(op, *args)
            assert_matches(got, want, dtype, scale_for(op, [a.cpu() for a in args]))
            assert torch.equal(got, call(op, *args))
    for op in CONV_MOMENT_OPS:
        assert_conv_cases_match_reference(op, dtype, CONV_CASES + [ConvCase(64, 32, 64, (32, 32), padding=(1, 1))])


def test_cuda_accumulate_kernel_by_default_follows_the_columns(monkeypatch):
    """Unset, chunks of fewer than 512 * 256 columns (the benchmark CNN's convs) take the sliced
    kernel, more (a 512 x 512 Linear layer's) the wide kernel where they are whole 16-byte packs
    and the column kernel where they are not; each matches the reference."""
    monkeypatch.delenv("GRADVAR_EXT_ACCUMULATE", raising=False)
    monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", "0")
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "unfold")
    torch.manual_seed(41)
    kernels = ("accumulate_products_sliced_kernel", "accumulate_products_wide_kernel", "accumulate_products_kernel")
    for inputs, features, kernel in ((256, 511, 0), (256, 512, 1), (257, 513, 2)):
        case = Case(4, (3,), inputs, features)  # inputs * features columns (257 * 513: odd, no whole packs)
        args = case.args("linear_second_moment", torch.float32, device="cuda")
        out = []
        names = _cuda_kernels_of(lambda args=args, out=out: out.append(call("linear_second_moment", *args)))
        ran = [any(k in n for n in names) for k in kernels]
        assert ran == [k == kernel for k in range(3)], names
        want = expected("linear_second_moment", *(a.cpu() for a in args))
        assert_matches(out[0], want, torch.float32, None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_wide_accumulate_gives_the_column_kernels_bits(dtype, monkeypatch):
    """GRADVAR_EXT_ACCUMULATE=wide runs the wide kernel where the columns are whole 16-byte packs
    (its g-once variant for the moments, both reads for the cross moment) and gives the column
    kernel's bits (the same summation order); columns that are no whole packs take the column kernel."""
    monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", "0")
    torch.manual_seed(43)
    for op, features in (("linear_variance", 512), ("linear_cross_moment", 256), ("linear_second_moment", 255)):
        args = Case(16, (8,), 130, features).args(op, dtype, device="cuda")
        out = {}
        for accumulate in ("columns", "wide"):
            monkeypatch.setenv("GRADVAR_EXT_ACCUMULATE", accumulate)
            run = functools.partial(call, op, *args)
            names = _cuda_kernels_of(lambda run=run, out=out, a=accumulate: out.setdefault(a, run()))
            wide = any("accumulate_products_wide_kernel" in n for n in names)
            assert wide == (accumulate == "wide" and features * 130 % (16 // args[0].element_size()) == 0), names
        assert torch.equal(out["wide"], out["columns"]), op


def test_cuda_unknown_accumulate_kernel_is_named(monkeypatch):
    monkeypatch.setenv("GRADVAR_EXT_ACCUMULATE", "atomic")
    monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", "0")
    x, g = torch.randn(4, 3, 6, device="cuda"), torch.randn(4, 3, 5, device="cuda")
    with pytest.raises(ValueError, match="GRADVAR_EXT_ACCUMULATE must be columns, sliced or wide, got 'atomic'"):
        call("linear_second_moment", x, g)


@pytest.mark.parametrize(
    "variable, value, message",
    [
        (
            "GRADVAR_EXT_FUSED_CUDA",
            "tensor_core",
            "GRADVAR_EXT_FUSED_CUDA must be 0, 1 or tensor_cores, got 'tensor_core'",
        ),
        ("GRADVAR_EXT_FUSED_BACKWARD_CUDA", "yes", "GRADVAR_EXT_FUSED_BACKWARD_CUDA must be 0 or 1, got 'yes'"),
    ],
)
def test_cuda_unknown_fused_flag_is_named(monkeypatch, variable, value, message):
    """A misspelt fused-kernel flag raises rather than picking a kernel nobody asked for (before,
    any value but 0 meant the CUDA-core kernel)."""
    monkeypatch.setenv(variable, value)
    x, g = (
        torch.randn(4, 3, 6, device="cuda", dtype=torch.float64),
        torch.randn(4, 3, 5, device="cuda", dtype=torch.float64),
    )
    w = torch.randn(5, 6, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match=message):
        if variable == "GRADVAR_EXT_FUSED_CUDA":
            call("linear_second_moment", x, g)
        else:
            call("weighted_gradient_product", g, x, g, w)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_cuda_zero_positions_give_zeros(fused, dtype):
    """No positions per sample: every moment is a sum of no terms (the fused path writes its
    results without zeroing them first, except here)."""
    x, g = torch.randn(4, 0, 6, device="cuda", dtype=dtype), torch.randn(4, 0, 5, device="cuda", dtype=dtype)
    moment, total = call("linear_moments", x, g)
    for result in (moment, total, call("linear_variance", x, g), call("linear_second_moment", x, g)):
        assert torch.equal(result, torch.zeros(5, 6, device="cuda", dtype=dtype))


def test_fused_cuda_is_deterministic_and_gradgradchecks(fused):
    torch.manual_seed(18)
    x = torch.randn(300, 4, 70, device="cuda")
    g = torch.randn(300, 4, 50, device="cuda")
    assert torch.equal(call("linear_variance", x, g), call("linear_variance", x, g))
    x = torch.randn(3, 2, 3, device="cuda", dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 2, 2, device="cuda", dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(torch.ops.gradvar.linear_variance, (x, g))


def test_tf32x3_is_the_first_name_of_tensor_cores(monkeypatch):
    """GRADVAR_EXT_FUSED_CUDA=tf32x3 (its name while float32 alone had a tensor-core kernel) takes
    the same kernels as =tensor_cores, bit for bit (the kernels are deterministic); float64 on
    DMMA matches the reference to float64 accuracy."""
    torch.manual_seed(23)
    for dtype in DTYPES:
        x = torch.randn(37, 5, 70, device="cuda", dtype=dtype)
        g = torch.randn(37, 5, 66, device="cuda", dtype=dtype)
        results = []
        for flag in ("tensor_cores", "tf32x3"):
            monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", flag)
            results.append(call("linear_variance", x, g))
            names = _cuda_kernels_of(lambda x=x, g=g: call("linear_variance", x, g))
            policy = "Dmma" if dtype == torch.float64 else "Tf32x3"
            ran = any("fused_moments_mma_kernel" in n and policy in n for n in names)
            assert ran == TENSOR_CORES, (flag, names)
        assert torch.equal(*results)
        assert_matches(results[0], expected("linear_variance", x.cpu(), g.cpu()), dtype)


# Shapes where batch_l2 takes the direct form ||G_n^T X_n||^2 (T (in + out) >= in * out): tile
# edges for 128- (float32) and 64-wide (float64) tiles, many samples (splits over the GPU).
BATCH_L2_SHAPES = [(7, (3,), 5, 3), (300, (9,), 7, 9), (3, (70,), 130, 64), (5, (200,), 129, 128)]
BATCH_L2_SHAPES += [(4, (130,), 65, 63), (2, (1, 40), 4, 257), (1, (16,), 8, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_cuda_batch_l2_matches_reference(fused, dtype):
    """linear_batch_l2 and conv2d_batch_l2: with "1" the fused squared-norms kernel where the
    direct form is the cheaper one (opt-in), else chunked bmm + row-wise dot; the ghost form and
    one position per sample as before."""
    torch.manual_seed(22)
    cases = [Case(n, m, fi, fo, c) for n, m, fi, fo in BATCH_L2_SHAPES for c in (True, False)] + ALL_CASES
    for case in cases:
        args = case.args("linear_batch_l2", dtype, device="cuda")
        want = expected("linear_batch_l2", *(a.cpu() for a in args))
        assert_matches(call("linear_batch_l2", *args), want, dtype)
    for case in CONV_CASES + MULTI_CHUNK_CONV_CASES:
        args = case.args("conv2d_batch_l2", dtype, device="cuda")
        cpu64 = [a.cpu().double() if isinstance(a, torch.Tensor) else a for a in args]
        assert_matches(call("conv2d_batch_l2", *args), gradvar_ext.reference.conv2d_batch_l2(*cpu64), dtype)


def _cuda_kernels_of(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


def test_fused_cuda_opt_in_paths_run_their_kernels(monkeypatch):
    """GRADVAR_EXT_FUSED_CUDA=1 sends large one-position moments (N * I * O > 2**26) and
    direct-form squared norms to the fused kernels; unset, both stay on cuBLAS (faster there on an
    H100) and give the same numbers as the forced chunked path, bit for bit."""
    torch.manual_seed(23)
    x1, g1 = torch.randn(1024, 256, device="cuda"), torch.randn(1024, 257, device="cuda")  # T = 1, 67.4M
    x, g = torch.randn(6, 70, 9, device="cuda"), torch.randn(6, 70, 5, device="cuda")  # direct form
    results = {}
    for flag, fused in (("1", True), ("", False), ("0", False)):
        monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", flag)
        names = _cuda_kernels_of(lambda: call("linear_variance", x1, g1))
        assert any("fused_moments_kernel" in n for n in names) == fused, (flag, names)
        names = _cuda_kernels_of(lambda: call("linear_batch_l2", x, g))
        assert any("fused_squared_norms_kernel" in n for n in names) == fused, (flag, names)
        results[flag] = (call("linear_variance", x1, g1), call("linear_batch_l2", x, g))
    for a, b in zip(results[""], results["0"]):
        assert torch.equal(a, b)


PRODUCT_OPS = ("weighted_gradient_product", "weighted_gradient_products")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", PRODUCT_OPS)
def test_fused_cuda_products_match_reference(op, dtype, monkeypatch):
    """GRADVAR_EXT_FUSED_BACKWARD_CUDA=1 (opt-in): the fused weighted-product kernel for
    2 <= T <= 32 positions; T = 1 and T > 32 take the other paths. Tile edges: 31-33 and 64-65
    rows, 63-65 and 130 columns; contiguous or not."""
    monkeypatch.setenv("GRADVAR_EXT_FUSED_BACKWARD_CUDA", "1")
    torch.manual_seed(19)
    shapes = [(3, (2,), 5, 3), (2, (2, 3), 33, 31), (17, (32,), 65, 64), (4, (5,), 130, 63), (5, (33,), 20, 9)]
    shapes += [(9, (8,), 64, 65), (2, (1, 1), 4, 4)]
    cases = [c for c in ALL_CASES if c.middle] + [
        Case(n, m, fi, fo, c) for n, m, fi, fo in shapes for c in (True, False)
    ]
    for case in cases:
        args = case.args(op, dtype, device="cuda")
        want = expected(op, *(a.cpu() for a in args))
        assert_matches(call(op, *args), want, dtype, scale_for(op, [a.cpu() for a in args]))
        if op == "weighted_gradient_product":  # without the center
            assert_matches(call(op, *args[:4]), expected(op, *(a.cpu() for a in args[:4])), dtype)


def test_fused_cuda_products_gradgradcheck(monkeypatch):
    monkeypatch.setenv("GRADVAR_EXT_FUSED_BACKWARD_CUDA", "1")
    torch.manual_seed(21)
    for op in ("linear_variance", "linear_moments", "linear_second_moment", *PRODUCT_OPS):
        args = Case(3, (2,), 3, 2).args(op, torch.float64, device="cuda", requires_grad=True)
        fn = getattr(torch.ops.gradvar, op)
        assert torch.autograd.gradcheck(fn, args)
        assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_default_moment_path_by_positions(dtype, monkeypatch):
    """Unset GRADVAR_EXT_FUSED_CUDA takes the fused kernel for one position per sample while
    N * I * O <= 2**26 and for 1 < T <= 32 positions (float64 on tensor cores: 64, but 32 for a
    cross moment, which walks on CUDA cores), chunked cuBLAS (or two GEMMs) otherwise
    (csrc/outer_product_stats.cpp): bit for bit the forced path's result. For 1 < T the fused
    walk runs on tensor cores on sm_80+ (=tensor_cores), except for a cross moment (=1)."""
    torch.manual_seed(20)
    walk = "tensor_cores" if TENSOR_CORES else "1"
    limit = 64 if dtype == torch.float64 and TENSOR_CORES else 32
    # (samples, positions, in, out, forced path, the cross moment's): T = 1 at 2**26 and just
    # above it, then the positions' limits
    shapes = [
        (1024, 1, 256, 256, "1", "1"),
        (1024, 1, 256, 257, "0", "0"),
        (40, 32, 36, 20, walk, "1"),
        (40, 33, 36, 20, "0" if limit == 32 else walk, "0"),
        (40, limit, 36, 20, walk, "1" if limit == 32 else "0"),
        (40, limit + 1, 36, 20, "0", "0"),
        (40, 2, 36, 20, walk, "1"),
    ]
    for n, t, fan_in, fan_out, forced, forced_cross in shapes:
        x = torch.randn(n, t, fan_in, device="cuda", dtype=dtype).squeeze(1)  # T = 1: [N, in]
        g = torch.randn(n, t, fan_out, device="cuda", dtype=dtype).squeeze(1)
        monkeypatch.delenv("GRADVAR_EXT_FUSED_CUDA", raising=False)
        default = call("linear_variance", x, g)
        names = _cuda_kernels_of(lambda x=x, g=g: call("linear_variance", x, g))
        assert any("fused_moments_mma_kernel" in k for k in names) == (forced == "tensor_cores"), (t, names)
        cross = call("linear_cross_moment", x, g, 2 * x, g)
        monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", forced)
        assert torch.equal(default, call("linear_variance", x, g)), (n, t, fan_out, forced)
        monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", forced_cross)
        assert torch.equal(cross, call("linear_cross_moment", x, g, 2 * x, g)), (n, t, fan_out, "cross")


def _result_and_peak_mib(run):
    """run() once to warm up (cuBLAS's workspace, the allocator's blocks), then again: that call's
    result and how many MiB the allocator's peak rose above what was allocated before it."""
    run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    return out, (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.mark.parametrize("op", ["linear_moments", "weighted_gradient_products"])
def test_cuda_chunk_scratch_is_at_most_half_the_per_sample_gradients(op, monkeypatch):
    """The GPU's chunk budget (up to 32 MiB) is capped at half of what the whole batch would form
    (at least 1 MiB): the sequence layer's [32, 128, 256] -> 256 per-sample gradients are 8 MiB,
    all of which fit 32 MiB, so without the cap the call would hold them all at once, as much as
    torch.func does (csrc/outer_product_stats.cpp chunk_bytes)."""
    monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", "0")  # the chunked path (T = 128 takes it anyway)
    n, t, features = 32, 128, 256
    x = torch.randn(n, t, features, device="cuda")
    g = torch.randn(n, t, features, device="cuda")
    w = torch.randn(features, features, device="cuda")
    args = (x, g) if op == "linear_moments" else (g, x, x, g, w, w)
    results_mb = (2 * features * features if op == "linear_moments" else 2 * n * t * features) * 4 / 2**20
    out, peak_mb = _result_and_peak_mib(lambda: getattr(torch.ops.gradvar, op)(*args))
    scratch_mb = peak_mb - results_mb
    per_sample_grads_mb = n * features * features * 4 / 2**20  # 8 MiB
    assert scratch_mb <= per_sample_grads_mb / 2 + 0.5, (scratch_mb, out[0].shape)


def test_cuda_chunk_holds_sixteen_samples_of_large_gradients(monkeypatch):
    """Where one sample forms more than 2 MiB, a GPU chunk holds 16 samples (up to 128 MiB, at most
    half the batch) rather than the 32 MiB budget's 4: [32, 4, 1024] -> 1024 in float64 is 8 MiB a
    sample, so the chunked moments' scratch is 128 MiB (csrc/outer_product_stats.cpp chunk_bytes;
    the rule's other cases run on the CPU: test_memory.py::test_gpu_chunk_rule_on_the_cpu)."""
    monkeypatch.setenv("GRADVAR_EXT_FUSED_CUDA", "0")
    monkeypatch.delenv("GRADVAR_EXT_CHUNK_MIB", raising=False)
    n, t, features = 32, 4, 1024
    x = torch.randn(n, t, features, device="cuda", dtype=torch.float64)
    g = torch.randn(n, t, features, device="cuda", dtype=torch.float64)
    results_mb = 2 * features * features * 8 / 2**20  # moment and sum
    scratch_mb = _result_and_peak_mib(lambda: torch.ops.gradvar.linear_moments(x, g))[1] - results_mb
    assert 15 * 8 <= scratch_mb <= 16 * 8 + 1, scratch_mb


def test_cuda_conv_products_hold_one_block_of_patches_a_chunk(monkeypatch):
    """Both backward products of the benchmark CNN's 32 -> 64 conv at 32x32 (N = 64, float32,
    unfolded: CUDA's default) under the GPU's rule: chunks of 16 samples (2.4 MB of scratch
    counted a sample), of which one block of unfolded patches (18 MiB) is alive at a time, the
    columns towards the input taking its memory (csrc/outer_product_stats.cpp apply_weighted).
    Until the thirty-first session: the previous chunk's patches, this chunk's and the columns,
    54 MiB (counted on the CPU under GRADVAR_EXT_CHUNK_MIB=gpu; test_memory.py has the CPU's twin)."""
    for name in ("GRADVAR_EXT_CONV_ALGORITHM", "GRADVAR_EXT_CHUNK_MIB", "GRADVAR_EXT_CONV_SLABS"):
        monkeypatch.delenv(name, raising=False)
    torch.manual_seed(41)
    x = torch.randn(64, 32, 32, 32, device="cuda")
    go = torch.randn(64, 64, 32, 32, device="cuda")
    weight, center = torch.randn(64, 32, 3, 3, device="cuda"), torch.randn(64, 32, 3, 3, device="cuda")
    conv = ([3, 3], [1, 1], [1, 1], [1, 1], 1)
    run = lambda: torch.ops.gradvar.conv2d_weighted_gradient_products(go, x, x, go, weight, center, *conv)  # noqa: E731
    expected = run()
    out, peak_mib = _result_and_peak_mib(run)
    scratch_mib = peak_mib - (x.numel() + go.numel()) * 4 / 2**20
    patches_mib = 16 * 32 * 9 * 32 * 32 * 4 / 2**20  # 18 MiB: 16 samples' [1024, 288] patches
    assert patches_mib <= scratch_mib <= patches_mib + 4, scratch_mib
    for got, want in zip(out, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("n,fan_in,fan_out", [(128, 784, 512), (128, 512, 512), (32, 784, 10)])
def test_cuda_fused_walk_partials_stay_within_its_factors(n, fan_in, fan_out, monkeypatch):
    """The fused walk splits the samples over blocks only as far as the splits' partials take no
    more than the factors it reads (csrc/cuda/moment_walk.cuh partials_budget): the benchmark
    MLP's layers and the seed's Linear(784, 10), fused by default (one position), hold no more
    than their (input, grad_output) again beside the results. GRADVAR_EXT_FUSED_PARTIALS_MIB=64
    (the rule before) splits them to fill the GPU: more memory, the same values up to rounding."""
    for name in ("GRADVAR_EXT_FUSED_CUDA", "GRADVAR_EXT_FUSED_PARTIALS_MIB", "GRADVAR_EXT_CHUNK_MIB"):
        monkeypatch.delenv(name, raising=False)
    x = torch.randn(n, fan_in, device="cuda")
    g = torch.randn(n, fan_out, device="cuda")
    results_mib = 2 * fan_out * fan_in * 4 / 2**20  # moment and sum, float32

    def moments_and_scratch_mib():
        out, peak_mib = _result_and_peak_mib(lambda: torch.ops.gradvar.linear_moments(x, g))
        return out, peak_mib - results_mib

    out, scratch = moments_and_scratch_mib()
    assert scratch <= n * (fan_in + fan_out) * 4 / 2**20, scratch
    monkeypatch.setenv("GRADVAR_EXT_FUSED_PARTIALS_MIB", "64")
    before, scratch_before = moments_and_scratch_mib()
    for part, part_before in zip(out, before):
        torch.testing.assert_close(part, part_before, rtol=1e-5, atol=1e-5)
    tiles = -(-fan_in // 128) * -(-fan_out // 128)  # 128 x 128 float32 tiles
    if torch.cuda.get_device_properties(0).multi_processor_count // tiles >= 2:  # the old rule split it
        assert scratch_before >= 2 * results_mib > scratch, (scratch_before, scratch)
    monkeypatch.setenv("GRADVAR_EXT_FUSED_PARTIALS_MIB", "lots")
    with pytest.raises(ValueError, match="GRADVAR_EXT_FUSED_PARTIALS_MIB must be a whole number of MiB from 1 to"):
        torch.ops.gradvar.linear_moments(x, g)


def test_cuda_float64_conv_moments_scratch_stays_within_128_mib(monkeypatch):
    """The float64 conv moments' default on CUDA (shifted kernel rows) takes chunks of up to 128
    MiB: on the benchmark CNN's 32 -> 64 conv at 32x32 (1.25 MiB of scratch a sample) the
    variance's scratch stays under 128 MiB and the same at N = 256 and 512 (the CPU's twin of
    this bound: 99.7 MiB at N = 256 under GRADVAR_EXT_CHUNK_MIB=128)."""
    for name in ("GRADVAR_EXT_CONV_ALGORITHM", "GRADVAR_EXT_CHUNK_MIB", "GRADVAR_EXT_FUSED_CUDA"):
        monkeypatch.delenv(name, raising=False)
    scratch = {}
    for n in (256, 512):
        x = torch.randn(n, 32, 32, 32, device="cuda", dtype=torch.float64)
        go = torch.randn(n, 64, 32, 32, device="cuda", dtype=torch.float64)
        scratch[n] = _result_and_peak_mib(
            lambda x=x, go=go: torch.ops.gradvar.conv2d_variance(x, go, [3, 3], [1, 1], [1, 1], [1, 1], 1)
        )[1]
        del x, go
    assert scratch[256] <= 129 and abs(scratch[512] - scratch[256]) <= 8, scratch


# ---------------------------------------------------------------- the front end on CUDA
@pytest.mark.parametrize("make_layer,shape", CONV_LAYERS, ids=CONV_LAYER_IDS)
def test_cuda_conv_backward_node_matches_pytorch_to_the_second_order(make_layer, shape):
    """gradvar_ext/conv_backward.py's node on cuDNN: the same first and second-order gradients as
    PyTorch's own (tests/test_conv_backward.py)."""
    check_second_order(make_layer, shape, "cuda")


@pytest.mark.parametrize("make_model,shape,nodes", PIECEWISE_MODELS, ids=PIECEWISE_IDS)
def test_cuda_piecewise_nodes_match_pytorch_to_the_second_order(make_model, shape, nodes, monkeypatch):
    """gradvar_ext/piecewise_backward.py's ReLU and max pooling nodes on CUDA (every layer's, small
    as they are): the same first and second-order gradients as PyTorch's nodes."""
    from gradvar_ext import piecewise_backward

    monkeypatch.setattr(piecewise_backward, "MIN_ZEROS_BYTES", 0)
    check_piecewise_second_order(make_model, shape, nodes, "cuda")


def test_cuda_conv_weight_gradients_in_slices_of_the_batch(monkeypatch):
    """GRADVAR_EXT_CONV_WEIGHT_SAMPLES=10 on cuDNN, the benchmark CNN's 32 -> 64 conv at 32 x 32,
    N = 64, float64: the node's weight gradients in 7 calls (6 of 10 samples, one of 4), the input
    gradient one call; the same gradients as PyTorch's node to the second order. Unset, every
    weight-gradient call goes by operand bytes (8 MiB, the default rule on every device), the
    no-grad path's too; GRADVAR_EXT_CONV_WEIGHT_MIB=0: every call whole."""
    from test_conv_backward import first_and_second_order, record_backend_calls, two_models

    monkeypatch.setenv("GRADVAR_EXT_CONV_WEIGHT_SAMPLES", "10")
    sizes = record_backend_calls(monkeypatch)
    shape = (64, 32, 32, 32)
    model, plain = two_models(lambda: torch.nn.Conv2d(32, 64, 3, padding=1), shape, "cuda")
    torch.manual_seed(2)
    x = torch.randn(shape, dtype=torch.float64, device="cuda")
    y = torch.randn(64, 2, dtype=torch.float64, device="cuda")
    ours = first_and_second_order(model, x, y)
    weight_calls = [size for size, need in sizes if need == (False, True, False)]
    # first order (create_graph); second: through _InputGradient and through the forward's node again
    assert weight_calls == ([10] * 6 + [4]) * 3, sizes
    theirs = first_and_second_order(plain, x, y)
    for a, b in zip(ours[0] + ours[1], theirs[0] + theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    sizes.clear()
    x.requires_grad_(True)
    torch.autograd.grad(model(x).sum(), [x, *model.parameters()])  # no create_graph
    assert sizes == [(64, (True, False, False))] + [(10, (False, True, False))] * 6 + [(4, (False, True, False))]
    monkeypatch.delenv("GRADVAR_EXT_CONV_WEIGHT_SAMPLES")  # unset: 8 MiB, 768 KiB a sample, 10 a call
    sizes.clear()
    again = first_and_second_order(model, x.detach(), y)
    weight_calls = [size for size, need in sizes if need == (False, True, False)]
    assert weight_calls == ([10] * 6 + [4]) * 3 and (64, (True, False, False)) in sizes, sizes  # no-grad: split
    for a, b in zip(again[0] + again[1], theirs[0] + theirs[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    monkeypatch.setenv("GRADVAR_EXT_CONV_WEIGHT_MIB", "0")
    sizes.clear()
    first_and_second_order(model, x.detach(), y)
    assert sizes and all(size == 64 for size, _ in sizes), sizes


@pytest.mark.parametrize("backward", ["loss.backward", "collect.backward"])
def test_cuda_front_end_matches_per_sample_loop(backward):
    from test_frontend import assert_statistics, build, collect_with, per_sample_grads

    torch.backends.cudnn.allow_tf32 = False
    for name in ("digits-cnn", "conv-hyperparameters", "sequence-linear"):
        model, x, y, lossfunc = build(name, torch.float64, device="cuda")
        collect_with(backward, model, x, y, lossfunc)
        assert model[0].weight.variance.is_cuda if isinstance(model, torch.nn.Sequential) else True
        assert_statistics(model, per_sample_grads(model, x, y, lossfunc), torch.float64)


@pytest.mark.parametrize("seed", range(24))
def test_cuda_random_models_match_per_sample_loop(seed, conv_algorithm):
    """tests/test_random_models.py's drawn models on CUDA, with each conv algorithm."""
    from test_random_models import check_random_model

    check_random_model(seed, "cuda")


@pytest.mark.parametrize("micro_batch_size", [None, 3], ids=str)
def test_cuda_total_variance_matches_per_sample_loop(micro_batch_size):
    from test_frontend import build
    from test_micro_batches import assert_close, loop_total_variance

    torch.backends.cudnn.allow_tf32 = False
    for name in ("digits-cnn", "conv-hyperparameters", "sequence-linear"):
        model, x, y, lossfunc = build(name, torch.float64, device="cuda")
        total_want, grads_want, variances_want = loop_total_variance(model, x, y, lossfunc)
        model.zero_grad(set_to_none=True)
        total = gradvar_ext.total_variance(model, lossfunc, x, y, micro_batch_size=micro_batch_size, backward=True)
        assert total.is_cuda
        assert_close(total, total_want, torch.float64, factor=10)
        for p, grad_want, variance_want in zip(model.parameters(), grads_want, variances_want):
            assert_close(p.variance, variance_want, torch.float64, factor=10)
            assert_close(p.grad, grad_want, torch.float64, factor=10)


def test_cuda_total_variance_replays_the_dropout_masks():
    from test_micro_batches import check_dropout_replay

    check_dropout_replay("cuda")


def test_cuda_half_precision_is_promoted_to_float32():
    torch.manual_seed(19)
    x, g = torch.randn(9, 3, 20, device="cuda"), torch.randn(9, 3, 12, device="cuda")
    want = gradvar_ext.reference.linear_variance(x.half().double().cpu(), g.half().double().cpu())
    out = gradvar_ext.linear_variance(x.half(), g.half())
    assert out.dtype == torch.float32 and out.is_cuda
    assert_matches(out, want, torch.float32, scale_for("linear_variance", [x.half().cpu(), g.half().cpu()]))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        exact = torch.ops.gradvar.linear_variance(x, g)
    assert exact.dtype == torch.float32
    assert torch.equal(exact, torch.ops.gradvar.linear_variance(x, g))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_products_of_a_uniform_weight_equal_the_dense_weights(dtype):
    """As on the CPU (test_ops / test_conv2d): a weight of one value expanded (stride 0) gives the
    dense weight's products, a row sum instead of a GEMM where g_n is rank one (T = 1). The front
    end hands CUDA ops dense weights (``ops.scaled``); the squared norms' backward hands them this."""
    torch.manual_seed(15)
    for case, saved in ((Case(6, (), 5, 4), 1), (Case(4, (3,), 5, 4), 0)):
        for op, at in (("weighted_gradient_products", 4), ("weighted_gradient_product", 3)):
            args = tuple(a.to(dtype) if a is not None else a for a in case.args(op, torch.float64, device="cuda"))
            check_uniform_weight(op, args, at, 2 * saved if op.endswith("products") else saved)
    conv = ConvCase(5, 3, 4, (3, 3))
    args = conv.args("conv2d_weighted_gradient_products", torch.float64, device="cuda")
    check_uniform_weight("conv2d_weighted_gradient_products", args, 4, None)  # CUDA's conv path: its own choice
