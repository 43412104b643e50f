"""The benchmarks' helpers: profile_job.py's replay of a CUDA allocator trace (--memory), on made-up
traces (the peak and what was alive at it, by allocation site; the CUDA run itself needs a GPU),
its CPU peak from the profiler's allocation events, and bench_variance.py's environments (a
method's knobs, the shell's, the machine record)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import gradvar_ext

from helpers import ops_run

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import profile_job  # noqa: E402

TORCH_FRAME = {
    "filename": f"{os.sep}site-packages{os.sep}torch{os.sep}nn{os.sep}functional.py",
    "line": 5,
    "name": "conv2d",
}
OUR_FRAME = {"filename": f"{os.sep}repo{os.sep}gradvar_ext{os.sep}conv_backward.py", "line": 170, "name": "forward"}


def _alloc(addr: int, size: int, frames: list[dict]) -> dict:
    return {"action": "alloc", "addr": addr, "size": size, "frames": frames}


def _free(addr: int, size: int) -> dict:
    return {"action": "free_completed", "addr": addr, "size": size}


def test_live_at_peak_finds_the_peak_and_groups_its_blocks_by_site():
    trace = [
        _alloc(1, 100, [TORCH_FRAME, OUR_FRAME]),
        _alloc(2, 50, [OUR_FRAME]),
        {"action": "free_requested", "addr": 2, "size": 50},  # still held until completed
        _alloc(3, 30, [TORCH_FRAME, OUR_FRAME]),  # peak: 180 bytes, blocks 1, 2, 3
        _free(2, 50),
        _free(3, 30),
        _alloc(4, 60, []),  # 160: under the peak
        _free(99, 1000),  # a block from before the trace began: ignored
    ]
    peak, sites = profile_job.live_at_peak(trace)
    assert peak == 180
    assert sites == [
        ("conv_backward.py:170 forward <- functional.py:5 conv2d", 130, 2),
        ("conv_backward.py:170 forward", 50, 1),
    ]


def test_live_at_peak_of_an_empty_trace_is_zero():
    assert profile_job.live_at_peak([]) == (0, [])
    assert profile_job._site([]) == "(no Python frame)"
    assert profile_job._site([TORCH_FRAME]) == "functional.py:5 conv2d"  # no frame of ours: the innermost


def test_cpu_memory_at_peak_names_the_op_and_its_allocations(capsys):
    """--memory on the CPU: the peak of one call's live tensor bytes (4 + 2 MiB here: x * 2 while
    x is alive, then x freed), the op running at it, and the large allocations inside that op."""
    x = torch.ones(1024, 1024)

    def call():
        y = torch.ones(1024, 1024)  # 4 MiB
        z = (x + y).mul_(2)  # 4 MiB more: the peak, 8 MiB
        del y
        return z.sum()

    call()
    profile_job.print_cpu_memory_at_peak(call, "made-up", top=4)
    out = capsys.readouterr().out
    assert "## memory, made-up: 8.00 MB of tensors allocated during the call at its peak" in out
    assert "running at the peak: aten::add" in out
    assert "allocations of 256 KiB or more inside aten::add (MB, live after):\n    +4.00      8.00" in out


def test_benchmark_environment_puts_back_what_the_shell_set(monkeypatch):
    """bench_variance.environment, which the benchmarks and the profile set the library's knobs
    with: a variable set before the block comes back, one unset before is unset after, also
    when the block raises."""
    import bench_variance

    monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", "8")
    monkeypatch.delenv("GRADVAR_EXT_CONV_SLABS", raising=False)
    try:
        with bench_variance.environment({"GRADVAR_EXT_CHUNK_MIB": "128", "GRADVAR_EXT_CONV_SLABS": "0"}):
            assert os.environ["GRADVAR_EXT_CHUNK_MIB"] == "128"
            assert os.environ["GRADVAR_EXT_CONV_SLABS"] == "0"
            raise KeyError("inside")
    except KeyError:
        pass
    assert os.environ["GRADVAR_EXT_CHUNK_MIB"] == "8"
    assert "GRADVAR_EXT_CONV_SLABS" not in os.environ


def run_methods(workload: str, methods: tuple[str, ...], op: str) -> tuple[dict, list]:
    """Job (b) of bench_variance.py's workload under each method's knobs: how many times each ran
    the ATen op ``op``, and the results."""
    import bench_variance as bv

    model, x, y, lossfunc = bv.make_workload(workload, "cpu")
    counts, results = {}, []
    for method in methods:
        with bv.environment(bv.method_environment(method)):
            run = bv.method_function(method)
            names = ops_run(lambda run=run: results.append(run(model, x, y, lossfunc, "b")))
        counts[method] = names.count(op)
    return counts, results


def test_benchmark_weight_slice_methods_set_the_knob():
    """bench_variance.py's "gradvar-wgrad-K": the front end under GRADVAR_EXT_CONV_WEIGHT_SAMPLES=K;
    on the benchmark CNN (N = 64) more backend convolution_backward calls than the default, the
    same numbers."""
    import bench_variance as bv

    assert bv.method_environment("gradvar-wgrad-16") == {"GRADVAR_EXT_CONV_WEIGHT_SAMPLES": "16"}
    assert bv.method_function("gradvar-wgrad-16") is bv.run_gradvar
    assert bv.method_environment("gradvar-wmib-32") == {"GRADVAR_EXT_CONV_WEIGHT_MIB": "32"}
    assert bv.method_function("gradvar-wmib-32") is bv.run_gradvar
    assert bv.method_environment("gradvar-wmib-0") == {"GRADVAR_EXT_CONV_WEIGHT_MIB": "0"}  # whole batch
    assert bv.method_function("gradvar-wgrad-0") is bv.run_gradvar
    for bad in ("gradvar-wgrad--1", "gradvar-wmib-", "gradvar-wmib-2.5"):
        with pytest.raises(ValueError, match="gradvar-wgrad-K"):
            bv.method_function(bad)
    calls, results = run_methods("cnn", ("gradvar", "gradvar-wgrad-16"), "aten::convolution_backward")
    # the 2 conv layers whose input requires grad: _InputGradient's weight gradient, by default in
    # 8 MiB slices (layer 2, 384 KiB a sample: 4 calls of <= 21; layer 3, 128 KiB: 1), in 4 of 16
    # (layer 3: 3 more); in the no-grad path, an input call (the bias's gradient a sum) and the
    # weight's slices in the same counts, but for layer 3's: one call for all three by default, 1 + 4
    assert calls["gradvar-wgrad-16"] == calls["gradvar"] + 3 + 4, calls
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=0)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


def test_benchmark_partials_methods_set_the_knob():
    """bench_variance.py's "gradvar-partials-K": the front end under GRADVAR_EXT_FUSED_PARTIALS_MIB=K
    (CUDA's fused moments: K MiB of split partials; the A/B of the thirty-first session's rule)."""
    import bench_variance as bv

    assert bv.method_environment("gradvar-partials-64") == {"GRADVAR_EXT_FUSED_PARTIALS_MIB": "64"}
    assert bv.method_function("gradvar-partials-64") is bv.run_gradvar
    for bad in ("gradvar-partials-0", "gradvar-partials-", "gradvar-partials-x"):
        with pytest.raises(ValueError, match="gradvar-partials-K"):
            bv.method_function(bad)


def test_benchmark_chunk_methods_set_the_chunk_budget(monkeypatch):
    """bench_variance.py's "gradvar-chunk-K": the front end under GRADVAR_EXT_CHUNK_MIB=K (the
    workers' environment), the same numbers as the per-sample loop at 4 MiB chunks (the job then
    makes 5 bmm calls where the default, half the batch's 1.8 MB within 1-4 MiB, makes 8); the
    table's machine record lists the knobs the shell set."""
    import bench_variance as bv

    assert bv.method_environment("gradvar-chunk-8") == {"GRADVAR_EXT_CHUNK_MIB": "8"}
    assert bv.method_environment("gradvar-shifted") == {"GRADVAR_EXT_CONV_ALGORITHM": "shifted"}
    assert bv.method_environment("gradvar") == {}
    assert bv.method_function("gradvar-chunk-8") is bv.run_gradvar
    for bad in ("gradvar-chunk-0", "gradvar-chunk-", "gradvar-chunk-1.5"):
        with pytest.raises(ValueError, match="gradvar-chunk-K"):
            bv.method_function(bad)
    bmm_calls, results = run_methods("seed-mnist-cnn", ("gradvar", "gradvar-chunk-4"), "aten::bmm")
    model, x, y, lossfunc = bv.make_workload("seed-mnist-cnn", "cpu")
    if gradvar_ext.backend() != "reference":  # the reference forms all per-sample gradients at once
        assert bmm_calls == {"gradvar": 8, "gradvar-chunk-4": 5}
    total, grads = results[1]
    expected_total, expected_grads = bv.run_loop(model, x, y, lossfunc, "b")
    torch.testing.assert_close(total, expected_total, rtol=1e-4, atol=1e-6)
    for got, want in zip(grads, expected_grads, strict=True):  # float32 double backward: 1e-5 of the largest
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5 * float(want.abs().max()))
    monkeypatch.setenv("CUDNN_CONV_WSCAP_DBG", "16")
    monkeypatch.setenv("GRADVAR_EXT_CHUNK_MIB", "8")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4294967296")
    monkeypatch.setenv("HOME_OF_SOMETHING_ELSE", "x")
    recorded = bv.machine("cpu")["environment"]
    assert recorded["CUDNN_CONV_WSCAP_DBG"] == "16" and recorded["GRADVAR_EXT_CHUNK_MIB"] == "8"
    assert recorded["MALLOC_TRIM_THRESHOLD_"] == "4294967296"
    assert "HOME_OF_SOMETHING_ELSE" not in recorded


def test_benchmark_records_the_cpu_it_ran_on(monkeypatch, tmp_path):
    """bench_variance.machine: the CPU's name with its family / model / stepping (the name alone,
    "AMD EPYC", did not tell apart two generations whose CNN ratios differ), the vector
    instructions PyTorch uses and a GEMM rate read now (CPU runs only)."""
    import bench_variance as bv

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
        "stepping\t: 1\n\nprocessor\t: 1\ncpu family\t: 99\nmodel\t\t: 99\n"
    )
    assert bv.cpu_fields(str(cpuinfo)) == {
        "cpu": "AMD EPYC",
        "cpu_id": "family 25 model 17 stepping 1",
    }  # the first CPU's
    rate = bv.matmul_gflops(size=64, repeats=2)
    assert 0.01 < rate < 1e5  # a rate measured, not a constant
    monkeypatch.setattr(bv, "matmul_gflops", lambda: 42.0)
    info = bv.machine("cpu")
    assert info["cpu"] == bv.cpu_fields()["cpu"] and info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_matmul_gflops"] == 42.0


def test_benchmark_standing_against_the_fastest_and_leanest_peers():
    """bench_variance.standing: each of our methods against the fastest peer's time and the
    leanest peer's peak, among the peers that ran and matched the loop (an uninstalled BackPACK
    and an Opacus that disagreed count for nothing, however fast or lean); our methods that
    disagree get no row; the floor is neither ours nor a peer."""
    import bench_variance as bv

    def record(ms, mb, matches="yes"):
        return {"median_ms": ms, "round_ms": [ms], "peak_mb": mb, "matches_loop": matches}

    measured = {
        "loop": record(300.0, 114.0),
        "floor": record(50.0, 56.0, "floor (no variance)"),
        "gradvar": record(150.0, 103.0),
        "gradvar+grad": record(140.0, 90.0, "NO"),
        "gradvar-micro-16": record(240.0, 29.5),
        "torch.func": record(200.0, 179.0),
        "backpack": {"error": "not installed"},
        "opacus": record(10.0, 1.0, "NO"),
    }
    rows = bv.standing(measured)
    assert [r["method"] for r in rows] == ["gradvar", "gradvar-micro-16"]
    assert all(r["fastest_peer"] == "torch.func" and r["leanest_peer"] == "loop" for r in rows)
    assert rows[0]["speedup"] == pytest.approx(200 / 150) and rows[0]["extra_mb"] == pytest.approx(-11.0)
    assert rows[1]["speedup"] == pytest.approx(200 / 240) and rows[1]["extra_mb"] == pytest.approx(29.5 - 114)
    assert bv.standing_rows("cnn", rows[:1]) == ["| cnn | gradvar | 1.33x torch.func | -11.0 MB vs loop |"]
    assert bv.standing({"gradvar": record(1.0, 1.0), "loop": {"error": "timed out"}}) == []
