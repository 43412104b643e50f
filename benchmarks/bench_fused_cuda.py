"""The fused CUDA moment kernel against cuBLAS computing the plain per-sample gradients.

    python benchmarks/bench_fused_cuda.py [--sections ratios breakdown budgets products opt-in]

For Linear shapes [N, T, in] -> [N, T, out] (and two Conv2d layers of the benchmark CNN, 3x3,
padding 1, T = H * W positions of C * 9 patch features) it times, with CUDA events (median of 20
after warm-up):
  bmm      torch.bmm(G^T, X): the per-sample gradients [N, out, in] (cuBLAS; O(N out in) memory;
           for Conv2d from patches unfolded beforehand, outside the timing)
  chunked  linear_variance / conv2d_variance with GRADVAR_EXT_FUSED_CUDA=0 (chunked bmm + accumulate)
  fused    GRADVAR_EXT_FUSED_CUDA=1, the fused kernel on CUDA cores (one pass, O(out in) memory)
  tensor   the same on tensor cores, GRADVAR_EXT_FUSED_CUDA=tensor_cores (sm_80+): 3xTF32 for
           float32, DMMA (FP64 tensor cores, as cuBLAS's DGEMM) for float64; unset, the default
           on sm_80+ for 1 < T <= 32
  grouped  Conv2d only: GRADVAR_EXT_CONV_ALGORITHM=grouped, cuDNN's weight gradient of one grouped
           convolution per chunk forms the per-sample gradients (no unfolded patches), then the
           chunked accumulate; the candidate for the conv shapes, where unfolding costs as much
           as the GEMM
  implicit Conv2d only: GRADVAR_EXT_CONV_ALGORITHM=implicit, the tensor-core kernel (3xTF32 /
           DMMA) reading the patches straight from the image: no unfolding, no per-sample gradients
  shifted  Conv2d only: GRADVAR_EXT_CONV_ALGORITHM=shifted, a bmm per kernel row over images
           unfolded along their width only (kw copies of the image, not kh * kw), then the accumulate
Throughput counts the per-sample GEMM FLOPs (2 N T out in) for all; peak memory is what the call
allocates beyond its inputs. Beside each call's time (CUDA events, host launch overhead included)
the GPU's own time from the profiler's kernel records: all kernels of the call, and the costliest
one alone (for fused: the fused kernel, without the zeroing, the partials' reduction and the
variance's elementwise steps). Issue target: fused >= 50% of bmm's throughput; the last column
also gives the default path's (what a user gets) and, for Conv2d, the grouped one's. Then the
chunked path under chunk budgets of 8-128 MiB (GRADVAR_EXT_CHUNK_MIB), then the
statistics' backward (weighted_gradient_products), chunked against the opt-in fused kernel, and
the two other opt-in paths of GRADVAR_EXT_FUSED_CUDA=1 against the default: one position per
sample (a Linear layer without middle dims: one pass for both GEMMs) and batch_l2's direct form.
GRADVAR_BENCH_SKIP_TENSOR_CORES=1 leaves out the tensor and implicit columns (scripts/gpu_check.sh
sets it when their tests failed: a faulting kernel would end this process, and its other tables).
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys

import torch

import gradvar_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_variance import environment  # noqa: E402

# T = 32 (128x32x512->512) decided float64's limit: on an H100 (fifteenth session) its tensor-core
# walk took 0.150 ms there against chunked cuBLAS's 0.316 (so the limit is 32, as float32's).
SHAPES = [(256, 16, 256, 256), (128, 32, 512, 512), (128, 64, 512, 512), (64, 128, 1024, 1024), (1024, 8, 128, 128)]
SHAPES += [(32, 256, 768, 768)]
CONV_SHAPES = [(64, 32, 64, 32), (64, 64, 64, 16)]  # N, C_in, C_out, H = W


def cases(dtype):
    """(label, N T in -> out, bmm, statistic) for every shape: the per-sample GEMM and our call."""
    for n, t, i, o in SHAPES:
        x = torch.randn(n, t, i, device="cuda", dtype=dtype)
        g = torch.randn(n, t, o, device="cuda", dtype=dtype)
        yield (
            f"{n}x{t}x{i}->{o}",
            (n, t, i, o),
            lambda x=x, g=g: torch.bmm(g.transpose(1, 2), x),
            lambda x=x, g=g: gradvar_ext.linear_variance(x, g),
        )
    for n, c, o, hw in CONV_SHAPES:
        x = torch.randn(n, c, hw, hw, device="cuda", dtype=dtype)
        g = torch.randn(n, o, hw, hw, device="cuda", dtype=dtype)
        cols = torch.nn.functional.unfold(x, 3, padding=1)  # [N, C * 9, H * W]
        yield (
            f"conv {c}->{o} {hw}x{hw}: {n}x{hw * hw}x{c * 9}->{o}",
            (n, hw * hw, c * 9, o),
            lambda cols=cols, g=g: torch.bmm(g.flatten(2), cols.transpose(1, 2)),
            lambda x=x, g=g: gradvar_ext.conv2d_variance(x, g, 3, padding=1),
        )


def timed(fn, reps=20):
    """(median ms per call from CUDA events, peak extra MB of one call)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def gpu_time(fn, reps=10):
    """(ms per call the GPU spends in all kernels, ms in the costliest kernel and its name), from the
    profiler's kernel records: a call's time without its host-side launch overhead."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernels = [(getattr(e, "self_device_time_total", 0.0), e.key) for e in prof.key_averages()]
    total = sum(t for t, _ in kernels) / reps / 1e3
    top_time, top_name = max(kernels) if kernels else (0.0, "-")
    return total, top_time / reps / 1e3, top_name


def ratio(bmm_gpu: float, call: tuple | None) -> str:
    """bmm's GPU time over a call's ('-' for a column left out)."""
    return "-" if call is None else f"{bmm_gpu / call[1]:.2f}"


SECTIONS = ("ratios", "breakdown", "budgets", "products", "opt-in")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="tables to print")
    sections = parser.parse_args().sections
    torch.backends.cuda.matmul.allow_tf32 = False
    skip_tensor_cores = os.environ.get("GRADVAR_BENCH_SKIP_TENSOR_CORES") == "1"
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, gradvar backend {gradvar_ext.backend()}")
    if "ratios" in sections:
        ratios_table(skip_tensor_cores)
    for name, table in (
        ("breakdown", conv_breakdown),
        ("budgets", chunk_budgets),
        ("products", products),
        ("opt-in", opt_in_paths),
    ):
        if name in sections:
            table()


def ratios_table(skip_tensor_cores: bool) -> None:
    """The main table: every path against bmm, per shape and dtype."""
    rows = []
    for dtype in (torch.float32, torch.float64):
        for label, (n, t, i, o), bmm, statistic in cases(dtype):
            tf = 2 * n * t * i * o / 1e9  # GFLOP; / ms = TF/s
            bmm_ms, bmm_mb = timed(bmm)
            bmm_gpu, _, _ = gpu_time(bmm)
            cells = [f"{bmm_ms:.3f} ms ({bmm_gpu:.3f} on GPU), {tf / bmm_gpu:.1f} TF/s, {bmm_mb:.0f} MB"]
            calls = {}
            conv = label.startswith("conv")
            for name, flag in (
                ("chunked", "0"),
                ("fused", "1"),
                ("tensor", "tensor_cores"),
                ("grouped", "0"),
                ("implicit", ""),
                ("shifted", ""),
                ("default", ""),
            ):
                if name in ("grouped", "implicit", "shifted") and not conv:
                    cells.append("-")
                    continue
                if name in ("tensor", "implicit") and skip_tensor_cores:
                    cells.append("left out (tests failed)")
                    calls[name] = None
                    continue
                env = {"GRADVAR_EXT_FUSED_CUDA": flag}
                if name in ("grouped", "implicit", "shifted"):
                    env["GRADVAR_EXT_CONV_ALGORITHM"] = name
                with environment(env):
                    ms, mb = timed(statistic)
                    total, kernel, kernel_name = gpu_time(statistic)
                calls[name] = (ms, total, kernel)
                if name == "default":
                    continue  # the same as chunked, fused or tensor: only its ratio is printed
                cells.append(f"{ms:.3f} ms ({total:.3f} on GPU, kernel {kernel:.3f}), {mb:.0f} MB")
                if name in ("fused", "tensor", "implicit") and "fused_moments" not in kernel_name:
                    cells[-1] += f" [top kernel: {kernel_name[:40]}]"
            ms, total, kernel = calls["fused"]
            ratios = f"{bmm_ms / ms:.2f} / {bmm_gpu / total:.2f} / {bmm_gpu / kernel:.2f}"
            ratios += f" | tensor cores {ratio(bmm_gpu, calls['tensor'])}, default {ratio(bmm_gpu, calls['default'])}"
            if conv:
                ratios += f", grouped {ratio(bmm_gpu, calls['grouped'])}, implicit {ratio(bmm_gpu, calls['implicit'])}"
                ratios += f", shifted {ratio(bmm_gpu, calls['shifted'])}"
            rows.append(f"| {str(dtype)[6:]} | {label} | {' | '.join(cells)} | {ratios} |")
            print(rows[-1], flush=True)  # as it comes, in case a time limit cuts the run
    print(
        "\n| dtype | N x T x in -> out | bmm (per-sample grads) | chunked | fused | fused, tensor cores "
        "| grouped (conv) | implicit (conv) | shifted (conv) | fused / bmm throughput: per call / GPU time / "
        "kernel alone | tensor cores, default (and grouped, implicit, shifted) / bmm, GPU time |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def conv_breakdown(top: int = 8) -> None:
    """Where conv2d_variance's GPU time goes, kernel by kernel, for the conv shapes: the default
    (float32: our im2col kernel, slabs of output rows, all samples in a chunk, where they pay; the
    sliced accumulate kernel for few columns; float64: shifted kernel rows in chunks of up to 128
    MiB since the twenty-fourth session), then unfolded patches (float64's default before): as they
    come by default, chunks of samples with all rows (GRADVAR_EXT_CONV_SLABS=0), padding + strided
    copies instead of our kernel (GRADVAR_EXT_UNFOLD=strided, the default before the twenty-first
    session), chunks of samples under 128 and 64 MiB budgets, the column accumulate kernel
    (GRADVAR_EXT_ACCUMULATE=columns), both opt-outs together; grouped, and shifted
    (GRADVAR_EXT_CONV_ALGORITHM=shifted: a bmm per kernel row over images unfolded along their
    width only; in float64 its chunks take up to 128 MiB) with our kernel, with strided views, and
    under 64 and 128 MiB budgets. On an H200 (twenty-fourth session) float64's shifted rows read
    0.51 / 0.53 of bmm, its unfolded ones 0.39 / 0.41; float32's default 0.62 / 0.54.
    The "all" row gives bmm's GPU time on pre-unfolded patches over the path's (the target's ratio).
    Then the backward's products (conv2d_weighted_gradient_products) by path: GPU time, launches."""
    strided, columns = {"GRADVAR_EXT_UNFOLD": "strided"}, {"GRADVAR_EXT_ACCUMULATE": "columns"}
    shifted, unfold = {"GRADVAR_EXT_CONV_ALGORITHM": "shifted"}, {"GRADVAR_EXT_CONV_ALGORITHM": "unfold"}
    paths = (
        ("default", {}),
        ("unfold", unfold),
        ("unfold, samples only", {**unfold, "GRADVAR_EXT_CONV_SLABS": "0"}),
        ("unfold, strided views", {**unfold, **strided}),
        ("unfold, samples only, 128 MiB", {**unfold, "GRADVAR_EXT_CONV_SLABS": "0", "GRADVAR_EXT_CHUNK_MIB": "128"}),
        ("unfold, 64 MiB", {**unfold, "GRADVAR_EXT_CHUNK_MIB": "64"}),
        ("unfold, column accumulate", {**unfold, **columns}),
        ("unfold, strided views, column accumulate", {**unfold, **strided, **columns}),
        ("grouped", {"GRADVAR_EXT_CONV_ALGORITHM": "grouped"}),
        ("shifted", shifted),
        ("shifted, strided views", {**shifted, **strided}),
        ("shifted, 64 MiB chunks", {**shifted, "GRADVAR_EXT_CHUNK_MIB": "64"}),
        ("shifted, 128 MiB chunks", {**shifted, "GRADVAR_EXT_CHUNK_MIB": "128"}),
    )
    print("\n| dtype | conv | path | kernel | launches a call | GPU us a call |\n|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        for n, c, o, hw in CONV_SHAPES:
            x = torch.randn(n, c, hw, hw, device="cuda", dtype=dtype)
            g = torch.randn(n, o, hw, hw, device="cuda", dtype=dtype)
            cols = torch.nn.functional.unfold(x, 3, padding=1)
            bmm_gpu, _, _ = gpu_time(lambda cols=cols, g=g: torch.bmm(g.flatten(2), cols.transpose(1, 2)))
            call = functools.partial(gradvar_ext.conv2d_variance, x, g, 3, padding=1)
            for path, env in paths:
                total, launches, events = _kernels_under(call, env)
                label = f"| {str(dtype)[6:]} | {c}->{o} {hw}x{hw} | {path}"
                print(f"{label} | all (bmm / this: {bmm_gpu * 1e3 / total:.2f}) | {launches:.0f} | {total:.1f} |")
                for e in events[:top]:
                    if getattr(e, "self_device_time_total", 0.0) > 0:
                        name = e.key.replace("|", "/")[:70]
                        print(f"{label} | {name} | {e.count / 5:.0f} | {e.self_device_time_total / 5:.1f} |")
    # The backward's products (both at once, as the variance's backward asks for them)
    print("\n| dtype | conv | path | products: launches a call | GPU us a call |\n|---|---|---|---|---|")
    for dtype in (torch.float32, torch.float64):
        for n, c, o, hw in CONV_SHAPES:
            x = torch.randn(n, c, hw, hw, device="cuda", dtype=dtype)
            g = torch.randn(n, o, hw, hw, device="cuda", dtype=dtype)
            w, center = (
                torch.randn(o, c, 3, 3, device="cuda", dtype=dtype),
                torch.randn(o, c, 3, 3, device="cuda", dtype=dtype),
            )
            conv = ([3, 3], [1, 1], [1, 1], [1, 1], 1)
            call = functools.partial(torch.ops.gradvar.conv2d_weighted_gradient_products, g, x, x, g, w, center, *conv)
            for path, env in PRODUCT_PATHS:
                total, launches, _ = _kernels_under(call, env)
                print(f"| {str(dtype)[6:]} | {c}->{o} {hw}x{hw} | {path} | {launches:.0f} | {total:.1f} |")


PRODUCT_PATHS = (
    ("default", {}),
    ("strided views", {"GRADVAR_EXT_UNFOLD": "strided"}),
    ("shifted", {"GRADVAR_EXT_CONV_ALGORITHM": "shifted"}),
    ("shifted, strided views", {"GRADVAR_EXT_CONV_ALGORITHM": "shifted", "GRADVAR_EXT_UNFOLD": "strided"}),
)


def _kernels_under(call, env: dict, reps: int = 5) -> tuple:
    """(GPU us a call over all kernels, launches a call, the profiler's events by GPU time) of
    call() under the environment env (set for the call only)."""
    from torch.profiler import ProfilerActivity, profile

    with environment(env):
        timed(call, reps=3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                call()
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, "self_device_time_total", 0.0))
    total = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / reps
    launches = sum(e.count for e in events if getattr(e, "self_device_time_total", 0.0) > 0) / reps
    return total, launches, events


BUDGET_SHAPES = [
    (torch.float64, 128, 64, 512, 512),
    (torch.float64, 64, 128, 1024, 1024),
    (torch.float32, 32, 256, 768, 768),
]
BUDGETS_MIB = ("8", "16", "32", "64", "128")


def chunk_budgets() -> None:
    """The chunked path (bmm, then the accumulate kernel reading the chunk back) under chunk
    budgets GRADVAR_EXT_CHUNK_MIB: does a chunk small enough to stay in L2 (50 MB on an H100)
    bring it past 50% of bmm, where the default's 32 MiB gave 45-48% (float64, T = 64-128)? Each
    with the column kernel (GRADVAR_EXT_ACCUMULATE=columns, the default for many columns until
    the twenty-eighth session) and the default's (sliced below 512 x 256 columns, else wide: 16
    bytes of columns a thread, g read once): on an H200 the column kernel took 0.152 of the
    chunked path's 0.268 ms at float64 128x64x512 (bmm 0.132); on an H100 the wide one brought
    that shape from 0.48 to 0.56 of bmm at 128 MiB."""
    calls = []
    for dtype, n, t, i, o in BUDGET_SHAPES:
        x = torch.randn(n, t, i, device="cuda", dtype=dtype)
        g = torch.randn(n, t, o, device="cuda", dtype=dtype)
        label = f"{str(dtype)[6:]} {n}x{t}x{i}->{o}"
        calls.append(
            (
                label,
                lambda x=x, g=g: torch.bmm(g.transpose(1, 2), x),
                functools.partial(gradvar_ext.linear_variance, x, g),
            )
        )
    for n, c, o, hw in CONV_SHAPES:
        x = torch.randn(n, c, hw, hw, device="cuda")
        g = torch.randn(n, o, hw, hw, device="cuda")
        cols = torch.nn.functional.unfold(x, 3, padding=1)
        label = f"float32 conv {c}->{o} {hw}x{hw}, N={n}"
        calls.append(
            (
                label,
                lambda cols=cols, g=g: torch.bmm(g.flatten(2), cols.transpose(1, 2)),
                functools.partial(gradvar_ext.conv2d_variance, x, g, 3, padding=1),
            )
        )
    rows = []
    for label, bmm, call in calls:
        bmm_gpu, _, _ = gpu_time(bmm)
        for accumulate in ("columns", "default"):  # the accumulate kernel: the column one, or the default's
            env = {"GRADVAR_EXT_FUSED_CUDA": "0"} | (
                {"GRADVAR_EXT_ACCUMULATE": "columns"} if accumulate == "columns" else {}
            )
            with environment(env):
                cells, gpu = under_flags(call, "GRADVAR_EXT_CHUNK_MIB", BUDGETS_MIB)
            ratios = " / ".join(f"{bmm_gpu / g:.2f}" for g in gpu)
            rows.append(f"| {label} | {accumulate} | {bmm_gpu:.3f} ms | {' | '.join(cells)} | {ratios} |")
            print(rows[-1], flush=True)
    heads = " | ".join(f"chunked, {b} MiB" for b in BUDGETS_MIB)
    print(f"\n| call | accumulate | bmm (GPU time) | {heads} | chunked / bmm throughput in GPU time, by budget |")
    print("|---|---|---|" + "---|" * len(BUDGETS_MIB) + "---|")
    print("\n".join(rows))


def under_flags(call, variable: str, flags) -> tuple[list[str], list[float]]:
    """Times `call` with the environment `variable` set to each flag in turn: (table cells "per
    call (GPU time), peak MB", GPU times in ms)."""
    cells, gpu = [], []
    for flag in flags:
        with environment({variable: flag}):
            ms, mb = timed(call)
            total, _, _ = gpu_time(call)
        gpu.append(total)
        cells.append(f"{ms:.3f} ms ({total:.3f} on GPU), {mb:.0f} MB")
    return cells, gpu


PRODUCT_SHAPES = [(256, 8, 256, 256), (256, 16, 256, 256), (128, 32, 512, 512), (1024, 8, 128, 128)]


def _bmm_product(x, g):
    return torch.bmm(g, torch.bmm(g.transpose(1, 2), x))


def products() -> None:
    """The statistics' backward, weighted_gradient_products (both products from h_n = W * g_n - C),
    chunked (bmm) against the fused kernel (GRADVAR_EXT_FUSED_BACKWARD_CUDA=1), and cuBLAS forming
    h_n and one product by bmm as the yardstick (same FLOPs as one fused product)."""
    rows = []
    for dtype in (torch.float32, torch.float64):
        for n, t, i, o in PRODUCT_SHAPES:
            x = torch.randn(n, t, i, device="cuda", dtype=dtype)
            g = torch.randn(n, t, o, device="cuda", dtype=dtype)
            w, c = torch.randn(o, i, device="cuda", dtype=dtype), torch.randn(o, i, device="cuda", dtype=dtype)
            cells = []
            bmm_ms, _ = timed(functools.partial(_bmm_product, x, g))
            cells.append(f"{bmm_ms:.3f} ms")
            call = functools.partial(torch.ops.gradvar.weighted_gradient_products, g, x, x, g, w, c)
            cells += under_flags(call, "GRADVAR_EXT_FUSED_BACKWARD_CUDA", ("0", "1"))[0]
            rows.append(f"| {str(dtype)[6:]} | {n}x{t}x{i}->{o} | {' | '.join(cells)} |")
            print(rows[-1], flush=True)
    print("\n| dtype | N x T x in -> out | bmm: h_n and one product | chunked products | fused products |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


ONE_POSITION_SHAPES = [(128, 784, 512), (128, 512, 512), (1024, 1024, 1024), (4096, 256, 256)]  # N, in, out
DIRECT_NORM_SHAPES = [(64, 256, 256, 256), (32, 1024, 512, 512), (256, 64, 64, 64)]  # N, T, in, out


def opt_in_paths() -> None:
    """Paths that GRADVAR_EXT_FUSED_CUDA=1 sends to the fused kernels and the default keeps on
    cuBLAS until measured: linear_variance with one position per sample (default: a GEMM of
    squares and a plain GEMM; fused: one pass) and linear_batch_l2 / conv2d_batch_l2 where the
    direct form ||G_n^T X_n||^2 is cheaper than the ghost norm (default: chunked bmm + row-wise
    dot; fused: the squared-norms kernel, no per-sample gradient in global memory)."""
    calls = []
    for dtype in (torch.float32, torch.float64):
        for n, i, o in ONE_POSITION_SHAPES:
            x = torch.randn(n, i, device="cuda", dtype=dtype)
            g = torch.randn(n, o, device="cuda", dtype=dtype)
            calls.append((dtype, f"linear_variance {n}x{i}->{o}", functools.partial(gradvar_ext.linear_variance, x, g)))
        for n, t, i, o in DIRECT_NORM_SHAPES:
            x = torch.randn(n, t, i, device="cuda", dtype=dtype)
            g = torch.randn(n, t, o, device="cuda", dtype=dtype)
            calls.append(
                (dtype, f"linear_batch_l2 {n}x{t}x{i}->{o}", functools.partial(gradvar_ext.linear_batch_l2, x, g))
            )
        for n, c, o, hw in CONV_SHAPES:
            x = torch.randn(n, c, hw, hw, device="cuda", dtype=dtype)
            g = torch.randn(n, o, hw, hw, device="cuda", dtype=dtype)
            label = f"conv2d_batch_l2 {c}->{o} {hw}x{hw}, N={n}"
            calls.append((dtype, label, functools.partial(gradvar_ext.conv2d_batch_l2, x, g, 3, padding=1)))
    rows = []
    for dtype, label, call in calls:
        cells, gpu = under_flags(call, "GRADVAR_EXT_FUSED_CUDA", ("", "1"))
        rows.append(f"| {str(dtype)[6:]} | {label} | {' | '.join(cells)} | {gpu[0] / gpu[1]:.2f} |")
        print(rows[-1], flush=True)
    print("\n| dtype | call | default (cuBLAS) | fused (GRADVAR_EXT_FUSED_CUDA=1) | fused speed-up in GPU time |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
