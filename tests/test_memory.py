"""Memory of the fast paths against batch size N (not a timed test).

Each measurement runs in a fresh interpreter and reads the process's peak resident memory
around one call (Linux: the peak reset to the current RSS just before it, /proc/self/clear_refs;
else ru_maxrss, which an earlier spike at start-up could hide: the grouped conv path once read
1.8 MB at N = 32 where it adds 13.9), so the number is what the call adds on top of its inputs. The
per-sample gradients of these layers are hundreds of MB at N = 512: materialising them would show.
- the statistic itself: extra memory stays flat in N (the chunk budget, at most 4 MiB on the CPU, plus the result);
- its backward returns input-sized gradients, which must grow with N: the growth stays within a
  few input-sized tensors, far below the per-sample gradients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURE = textwrap.dedent(
    """
    import json, resource, sys, torch, gradvar_ext
    torch.set_num_threads(1)
    kind, n, part = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    def status_mb(field):  # VmRSS (now) or VmHWM (the peak since the last reset)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 2**10
    def reset_peak():  # Linux: the peak back to the current RSS; else (None) the process's peak so far
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return status_mb("VmRSS")
        except OSError:
            return None
    def peak_mb(reset):
        return status_mb("VmHWM") if reset is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    if kind == "linear":   # Linear(512, 512) on [N, 4, 512]: per-sample gradients 1 MB each
        x = torch.randn(n, 4, 512, requires_grad=True); go = torch.randn(n, 4, 512, requires_grad=True)
        run = lambda: torch.ops.gradvar.linear_variance(x, go)
    else:                  # Conv2d(128, 128, 3, padding=1) on 8x8: per-sample gradients 0.6 MB each
        x = torch.randn(n, 128, 8, 8, requires_grad=True); go = torch.randn(n, 128, 8, 8, requires_grad=True)
        run = lambda: torch.ops.gradvar.conv2d_variance(x, go, [3, 3], [1, 1], [1, 1], [1, 1], 1)
    if part != "forward":
        var = run()
    reset = reset_peak()
    before = reset if reset is not None else peak_mb(None)
    if part == "forward":
        var = run()
    else:
        torch.autograd.grad(var.sum(), (x, go))
    print(json.dumps({
        "extra_mb": peak_mb(reset) - before,
        "per_sample_grads_mb": n * var.numel() * 4 / 2**20,
        "inputs_mb": (x.numel() + go.numel()) * 4 / 2**20,
    }))
    """
)


def measure(kind: str, n: int, part: str) -> dict:
    # A fixed mmap threshold: glibc otherwise raises it after large frees and serves the next
    # chunk's scratch from a heap it does not return, so RSS would count freed memory (seen: +46 MB).
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    if "ASAN_OPTIONS" in env:  # scripts/sanitize_cpu.sh: ASan's quarantine keeps freed scratch resident
        env["ASAN_OPTIONS"] += ":quarantine_size_mb=0"  # (RSS +150 MB at N = 512), so here none
    if kind.startswith("conv2d-"):  # conv2d-unfold / -grouped / -shifted: each way of forming g_n
        env["GRADVAR_EXT_CONV_ALGORITHM"] = kind.split("-")[1]
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, kind, str(n), part], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["linear", "conv2d-unfold", "conv2d-grouped", "conv2d-shifted"])
def test_statistic_memory_is_flat_in_batch_size(kind):
    small, large = measure(kind, 32, "forward"), measure(kind, 512, "forward")
    assert large["per_sample_grads_mb"] > 250  # what materialising would cost at N = 512
    assert large["extra_mb"] < 64, (small, large)
    assert large["extra_mb"] - small["extra_mb"] < 12, (small, large)


@pytest.mark.parametrize("kind", ["linear", "conv2d-unfold", "conv2d-grouped", "conv2d-shifted"])
def test_backward_memory_grows_only_with_input_sized_gradients(kind):
    small, large = measure(kind, 32, "backward"), measure(kind, 512, "backward")
    growth = large["extra_mb"] - small["extra_mb"]
    input_growth = large["inputs_mb"] - small["inputs_mb"]
    assert growth < 3 * input_growth + 16, (small, large)
    assert growth < large["per_sample_grads_mb"] / 2, (small, large)


def _profiled_peak_mb(fn) -> float:
    from bench_variance import cpu_peak_bytes  # the benchmark's own measurement (conftest: on sys.path)

    return cpu_peak_bytes(fn) / 2**20


@pytest.mark.parametrize("op", ["linear_variance", "conv2d_variance"])
def test_chunk_budget_knob_bounds_the_scratch(op, monkeypatch):
    """GRADVAR_EXT_CHUNK_MIB=n: scratch per call within n MiB (a chunk of at least one sample), same result."""
    import torch

    import gradvar_ext

    torch.manual_seed(0)
    if op == "linear_variance":  # per-sample gradients [256, 256]: 0.25 MiB each, 8 MiB for all 32
        x, go = torch.randn(32, 16, 256), torch.randn(32, 16, 256)
        run = lambda: gradvar_ext.linear_variance(x, go)  # noqa: E731
    else:  # unfolded patches [144, 256] and gradients [32, 144] per sample: ~0.16 MiB
        x, go = torch.randn(32, 16, 16, 16), torch.randn(32, 32, 16, 16)
        monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "unfold")
        run = lambda: gradvar_ext.conv2d_variance(x, go, 3, padding=1)  # noqa: E731
    default = run()
    peaks = {}
    for mib in (1, 8):
        monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", str(mib))
        torch.testing.assert_close(run(), default)
        peaks[mib] = _profiled_peak_mb(run)
    results_mb = 2 * default.numel() * 4 / 2**20  # the moment and the sum, weight-shaped
    assert peaks[1] <= 1 + results_mb + 0.05, peaks
    assert peaks[8] > 2 * peaks[1], peaks  # the knob does take more samples per chunk


@pytest.mark.parametrize(("product", "bound_mib"), [("to_grad_output", 1.1), ("to_input", 0.6), ("both", 0.6)], ids=str)
def test_conv_products_hold_one_chunk_of_patches(product, bound_mib, monkeypatch):
    """The moments' backward products on the unfold path (CUDA's for float32) under 1 MiB chunks:
    one chunk of unfolded patches alive at a time, and the columns of the product towards the
    input in the memory of the patches, let go first (they are the same size): half the budget.
    Until the thirty-first session the previous chunk's patches were let go only after the next
    was formed and the columns had a buffer of their own: 1.81 / 0.91 / 1.34 MiB here (then 0.97 /
    0.91 / 0.91, then 0.97 / 0.49 / 0.49); on the benchmark CNN's job (b) under the GPU's rule,
    three 18 MB blocks at the peak where one is left."""
    import torch

    import gradvar_ext  # noqa: F401  (registers torch.ops.gradvar)

    torch.manual_seed(0)
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", "unfold")
    monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", "1")
    x, go = torch.randn(32, 16, 16, 16), torch.randn(32, 32, 16, 16)  # 0.14 MiB of patches a sample
    weight, center = torch.randn(32, 16, 3, 3), torch.randn(32, 16, 3, 3)
    conv = ([3, 3], [1, 1], [1, 1], [1, 1], 1)
    ops = torch.ops.gradvar
    run, results = {
        "to_grad_output": (lambda: (ops.conv2d_weighted_gradient_product(x, x, go, weight, *conv, False, center),), go),
        "to_input": (lambda: (ops.conv2d_weighted_gradient_product(go, x, go, weight, *conv, True, center),), x),
        "both": (
            lambda: ops.conv2d_weighted_gradient_products(go, x, x, go, weight, center, *conv),
            torch.cat([go, x], 1),
        ),
    }[product]
    expected = run()
    scratch = _profiled_peak_mb(run) - results.numel() * 4 / 2**20
    assert scratch <= bound_mib, scratch
    monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", "64")  # one chunk: the same values
    for got, want in zip(run(), expected, strict=True):
        torch.testing.assert_close(got, want)


def _linear_moments_scratch_mib(n: int, t: int, features: int, dtype: str, chunk_flag: str | None, monkeypatch):
    """The scratch of one linear_moments call (profiled peak less the two weight-shaped results)
    under GRADVAR_EXT_CHUNK_MIB=chunk_flag (None: unset), its values checked against forced
    1 MiB chunks; and one sample's per-sample gradient, in MiB."""
    import torch

    import gradvar_ext

    torch.manual_seed(0)
    x = torch.randn(n, t, features, dtype=getattr(torch, dtype))
    go = torch.randn(n, t, features, dtype=getattr(torch, dtype))
    run = lambda: gradvar_ext.linear_moments(x, go)  # noqa: E731
    monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", "1")
    small_chunks = run()
    if chunk_flag is None:
        monkeypatch.delenv("GRADVAR_EXT_CHUNK_MIB")
    else:
        monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", chunk_flag)
    torch.testing.assert_close(run(), small_chunks)
    results_mib = 2 * features * features * x.element_size() / 2**20  # moment and sum
    return _profiled_peak_mb(run) - results_mib, features * features * x.element_size() / 2**20


@pytest.mark.parametrize(
    "n, t, features, scratch_mib",
    [
        (64, 4, 256, 4),  # 0.25 MiB a sample, 16 MiB for the batch: 4 MiB chunks (the cap)
        (16, 4, 256, 2),  # 4 MiB for the batch: half of it
        (6, 4, 256, 1),  # 1.5 MiB for the batch: half is below the 1 MiB floor
        (3, 4, 256, 0.75),  # 0.75 MiB for the batch: all of it in one chunk
    ],
)
def test_cpu_chunk_rule(n, t, features, scratch_mib, monkeypatch):
    """The CPU's chunk rule (csrc/outer_product_stats.cpp chunk_bytes): half of what the whole
    batch would form, within 1-4 MiB, so that a small batch is not held whole (the seed's MNIST
    CNN, job (a): 2.2 MB in one chunk, BackPACK 1.6, ours 1.5 in two)."""
    scratch, per_sample = _linear_moments_scratch_mib(n, t, features, "float32", None, monkeypatch)
    assert scratch_mib - per_sample <= scratch <= scratch_mib + 0.5, (scratch, scratch_mib)


@pytest.mark.parametrize(
    "n, t, features, dtype, scratch_mib",
    [
        (32, 4, 1024, "float64", 16 * 8),  # 8 MiB a sample: 16 samples a chunk (128 MiB, the cap)
        (24, 4, 1024, "float64", 12 * 8),  # ... but at most half the batch
        (64, 16, 256, "float32", 8),  # 0.25 MiB a sample: half the batch, 8 MiB (within 1-32 MiB)
        (16, 16, 256, "float32", 2),  # half the batch, 2 MiB (the floor was 4 MiB: all 16 samples)
        (3, 16, 256, "float32", 0.75),  # 0.75 MiB for the batch: below the 1 MiB floor, all of it
    ],
)
def test_gpu_chunk_rule_on_the_cpu(n, t, features, dtype, scratch_mib, monkeypatch):
    """GRADVAR_EXT_CHUNK_MIB=gpu: the GPU's chunk rule (csrc/outer_product_stats.cpp chunk_bytes)
    on the CPU: chunks of at least 16 samples where one forms more than 2 MiB (up to 128 MiB, at
    most half the batch), else half the batch within 1-32 MiB. The chunked moments' scratch is the
    chunk's per-sample gradients; same values as in 1 MiB chunks."""
    scratch, per_sample = _linear_moments_scratch_mib(n, t, features, dtype, "gpu", monkeypatch)
    assert scratch_mib - per_sample <= scratch <= scratch_mib + 0.5, (scratch, scratch_mib)


def test_bad_chunk_budget_is_named(monkeypatch):
    import torch

    import gradvar_ext

    monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", "lots")
    with pytest.raises(
        ValueError, match="GRADVAR_EXT_CHUNK_MIB must be a whole number of MiB from 1 to 1048576 or gpu, got 'lots'"
    ):
        gradvar_ext.linear_variance(torch.randn(4, 3, 5), torch.randn(4, 3, 2))


@pytest.mark.parametrize(
    "workload,method,margin_mb", [("cnn", "gradvar", 8.0), ("cnn-16", "gradvar", 0.5), ("cnn", "gradvar+grad", 2.0)]
)
def test_benchmark_cnn_job_b_peaks_below_the_per_sample_loop(workload, method, margin_mb):
    """The benchmark CNN's job (b) (variance, total variance and its gradient) on the whole batch
    of 64, and of 16 (the sweep's smallest), float32: below the per-sample loop's peak (the
    leanest peer there), by the benchmark's own measurement; at N = 64 with ``.grad`` too
    (``loss.backward(create_graph=True)`` inside ``collect``). What it takes: the products'
    grouped chunks within the core's 4 MiB (csrc/conv2d_ops.cpp, grouped_product_gradients) and
    the conv node's weight gradients in 8 MiB slices (conv_backward.WEIGHT_CALL_BYTES): 111.0
    MB against the loop's 114.3 at N = 64 (117.9 before; twenty-fifth session); the ReLU and max
    pooling layers' nodes (piecewise_backward.py), no zeros the size of an activation in the
    double backward: 103.0 MB, 28.0 against the loop's 29.0 at N = 16 (30.0 before), and 111.3
    with ``.grad`` (128.7 before; twenty-sixth session)."""
    import bench_variance as bv
    import torch

    torch.manual_seed(0)
    peaks = {}
    for name in (method, "loop"):
        model, x, y, lossfunc = bv.make_workload(workload, "cpu")
        run = lambda: bv.METHODS[name](model, x, y, lossfunc, "b")  # noqa: B023, E731
        run()  # warm: one-time allocations are no part of a step
        peaks[name] = _profiled_peak_mb(run)
    assert peaks[method] < peaks["loop"] - margin_mb, peaks
