"""The CUDA unfold / fold and accumulate kernels' own source (csrc/cuda/unfold_kernels.cuh,
reduce_kernels.cuh) compiled for the CPU by tests/cuda_emulation.cpp, every grid run block by
block (thread by thread, or a block's threads as OS threads with a real barrier for the kernel
with shared memory), against F.unfold / F.fold and torch's sums: their index arithmetic, bounds,
row slabs, barriers and grid-stride loops are checked on every machine with a C++ compiler, GPU
or not. (tests/test_cuda.py runs them on a GPU.)"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conv_samples import CONV_CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILER = shutil.which("c++") or shutil.which("g++")
pytestmark = pytest.mark.skipif(COMPILER is None, reason="needs a C++ compiler")


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    library = str(tmp_path_factory.mktemp("cuda_emulation") / "cuda_emulation.so")
    source = os.path.join(ROOT, "tests", "cuda_emulation.cpp")
    include = os.path.join(ROOT, "csrc", "cuda")
    subprocess.run(
        [COMPILER, "-O1", "-std=c++17", "-pthread", "-shared", "-fPIC", "-I", include, source, "-o", library],
        check=True,
    )
    return ctypes.CDLL(library)


def _geometry(case, out_width: int):
    fields = (case.c_in, *case.hw, *case.kernel, *case.stride, *case.padding, *case.dilation, out_width)
    return (ctypes.c_int64 * 12)(*fields)


def _ptr(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def _suffix(dtype) -> str:
    return "f32" if dtype == torch.float32 else "f64"


def emulated_im2col_rows(kernels, case, image, first_row, rows, grid_cap):
    n, out_w = image.shape[0], case.out_hw[1]
    kk = case.kernel[0] * case.kernel[1]
    cols = torch.full((n, case.c_in * kk, rows * out_w), float("nan"), dtype=image.dtype)  # unwritten: NaN
    getattr(kernels, f"im2col_rows_{_suffix(image.dtype)}")(
        _ptr(image), _ptr(cols), _geometry(case, out_w), ctypes.c_int64(n), ctypes.c_int64(first_row),
        ctypes.c_int64(rows), ctypes.c_int64(grid_cap),
    )  # fmt: skip
    return cols


def emulated_col2im(kernels, case, cols, grid_cap):
    n = cols.shape[0]
    out_h, out_w = case.out_hw
    image = torch.full((n, case.c_in, *case.hw), float("nan"), dtype=cols.dtype)
    getattr(kernels, f"col2im_{_suffix(cols.dtype)}")(
        _ptr(cols), _ptr(image), _geometry(case, out_w), ctypes.c_int64(n), ctypes.c_int64(out_h),
        ctypes.c_int64(grid_cap),
    )  # fmt: skip
    return image


def _unfold(case, image):
    return F.unfold(image, case.kernel, dilation=case.dilation, padding=case.padding, stride=case.stride)


@pytest.mark.parametrize("grid_cap", [0, 1, 2], ids=["launch-grid", "1-block-grid", "2-block-grid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_emulated_im2col_kernel_matches_unfold(case, dtype, grid_cap, kernels):
    """All rows at once, and every slab of 1, 2 and 3 output rows (the slab path's columns)."""
    torch.manual_seed(0)
    image = torch.randn(case.n, case.c_in, *case.hw, dtype=dtype)
    want = _unfold(case, image)
    out_h, out_w = case.out_hw
    assert torch.equal(emulated_im2col_rows(kernels, case, image, 0, out_h, grid_cap), want)
    for rows in (1, 2, 3):
        for first in range(0, out_h, rows):
            count = min(rows, out_h - first)
            got = emulated_im2col_rows(kernels, case, image, first, count, grid_cap)
            assert torch.equal(got, want[:, :, first * out_w : (first + count) * out_w]), (first, count)


@pytest.mark.parametrize("grid_cap", [0, 1, 2], ids=["launch-grid", "1-block-grid", "2-block-grid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_emulated_col2im_kernel_matches_fold(case, dtype, grid_cap, kernels):
    """Every image pixel summed from the columns that read it, padding and stride gaps included."""
    torch.manual_seed(1)
    out_h, out_w = case.out_hw
    kk = case.kernel[0] * case.kernel[1]
    cols = torch.randn(case.n, case.c_in * kk, out_h * out_w, dtype=dtype)
    want = F.fold(cols, case.hw, case.kernel, dilation=case.dilation, padding=case.padding, stride=case.stride)
    torch.testing.assert_close(emulated_col2im(kernels, case, cols, grid_cap), want, rtol=0, atol=1e-5)


def test_emulated_kernels_leave_empty_inputs_alone(kernels):
    """No rows or no samples: the host side launches nothing (a grid of 0 blocks is an error)."""
    case = CONV_CASES[0]
    image = torch.randn(0, case.c_in, *case.hw)
    assert emulated_im2col_rows(kernels, case, image, 0, case.out_hw[0], 0).numel() == 0
    assert emulated_col2im(kernels, case, torch.randn(0, case.c_in * 9, 9), 0).numel() == 0


ACCUMULATE_KERNELS = {"columns": 0, "sliced": 1, "wide": 2}  # cuda_emulation.cpp's accumulate(kernel=)


def emulated_accumulate(kernels, kernel, g, gb, moment, total, grid_cap):
    """moment += sum_k g * gb, total += sum_k g (total None: no sum), in place, by the kernel named."""
    rows, columns = g.shape
    getattr(kernels, f"accumulate_{_suffix(g.dtype)}")(
        _ptr(g), _ptr(gb), _ptr(moment), None if total is None else _ptr(total), ctypes.c_int64(rows),
        ctypes.c_int64(columns), ctypes.c_int64(ACCUMULATE_KERNELS[kernel]), ctypes.c_int64(grid_cap),
    )  # fmt: skip


@pytest.mark.parametrize("grid_cap", [0, 1, 2], ids=["launch-grid", "1-block-grid", "2-block-grid"])
@pytest.mark.parametrize("kernel", list(ACCUMULATE_KERNELS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_emulated_accumulate_kernels_match_torch(dtype, kernel, grid_cap, kernels):
    """moment += sum_k g * gb and sum += sum_k g (or no sum), onto what the accumulators held, for
    fewer rows than slices, a partial slice, tiles of 32 columns and partial tiles, whole and
    partial 16-byte packs (the wide kernel: the column kernel where they do not fit), the cross
    moment's distinct gb; run twice, the same bits (a fixed summation order)."""
    torch.manual_seed(2)
    for rows, columns in ((1, 5), (7, 31), (8, 32), (13, 33), (64, 100), (3, 257), (5, 64), (9, 36)):
        for cross, with_sum in ((False, True), (True, True), (False, False)):
            g = torch.randn(rows, columns, dtype=dtype)
            gb = torch.randn(rows, columns, dtype=dtype) if cross else g
            start_m, start_s = torch.randn(columns, dtype=dtype), torch.randn(columns, dtype=dtype)
            results = []
            for _ in range(2):
                moment, total = start_m.clone(), start_s.clone()
                emulated_accumulate(kernels, kernel, g, gb, moment, total if with_sum else None, grid_cap)
                results.append((moment, total))
            moment, total = results[0]
            torch.testing.assert_close(moment, start_m + (g * gb).sum(0))
            torch.testing.assert_close(total, start_s + g.sum(0) if with_sum else start_s, rtol=1e-5, atol=1e-5)
            assert torch.equal(results[1][0], moment) and torch.equal(results[1][1], total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_emulated_wide_accumulate_gives_the_column_kernels_bits(dtype, kernels):
    """The wide kernel sums each column's rows in the column kernel's order: the same bits, with
    g read once (gb is g) or both read (a cross moment), over more packs than one grid pass."""
    torch.manual_seed(3)
    columns = 256 * 2 * (16 // torch.empty(0, dtype=dtype).element_size()) + 8  # 2 blocks of packs, and more
    for cross in (False, True):
        g = torch.randn(11, columns, dtype=dtype)
        gb = torch.randn(11, columns, dtype=dtype) if cross else g
        out = {}
        for kernel in ("columns", "wide"):
            torch.manual_seed(4)  # the same starting accumulators for both
            moment, total = torch.randn(columns, dtype=dtype), torch.randn(columns, dtype=dtype)
            emulated_accumulate(kernels, kernel, g, gb, moment, total, grid_cap=1)
            out[kernel] = (moment, total)
        assert torch.equal(out["wide"][0], out["columns"][0]) and torch.equal(out["wide"][1], out["columns"][1])
