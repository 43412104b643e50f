"""Variance of the per-sample gradients (job a) and also the gradient of the total variance (job b,
the seed's job), measured side by side for several methods, each in a fresh subprocess.

    python benchmarks/bench_variance.py [--job a|b] [--device cuda] [--quick] [--workloads mlp cnn]

Methods: floor (a plain forward + backward, for scale), gradvar (this library's front end,
extend + collect, statistics-only backward: collect.backward, no .grad), gradvar+grad (the same
with loss.backward(): the parameters' .grad as well), gradvar-fused (CUDA only: the fused moment
kernel forced on, GRADVAR_EXT_FUSED_CUDA=1, where the default picks chunked cuBLAS bmm),
gradvar-strided (asked for by name: the conv patches by strided views and copies instead of our
unfold / fold kernels, GRADVAR_EXT_UNFOLD=strided; CUDA's default before the twenty-first session),
gradvar-shifted (asked for by name: the conv moments and products by a bmm per kernel row over
width-unfolded images, GRADVAR_EXT_CONV_ALGORITHM=shifted),
gradvar-pytorch-conv (asked for by name: gradvar with PyTorch's own backward node for the conv
layers, GRADVAR_EXT_CONV_BACKWARD=pytorch, the A/B of gradvar_ext/conv_backward.py),
gradvar-pytorch-piecewise (likewise for the piecewise-linear layers, ReLU, LeakyReLU, Hardtanh
and max pooling, GRADVAR_EXT_PIECEWISE_BACKWARD=pytorch, the A/B of gradvar_ext/piecewise_backward.py),
gradvar-micro (gradvar_ext.total_variance in micro-batches of 16: memory bounded by 16 samples;
gradvar-micro-K: micro-batches of K, e.g. gradvar-micro-64 on a GPU, where 16 is launch-bound),
gradvar-chunk-K (gradvar with GRADVAR_EXT_CHUNK_MIB=K: what chunks of per-sample gradients, patches
and products may take; by default half the batch's, within 1-4 MiB on the CPU, 1-32 on a GPU),
gradvar-wgrad-K (gradvar with GRADVAR_EXT_CONV_WEIGHT_SAMPLES=K: the conv node's weight gradients
K samples per backend call),
gradvar-wmib-K (GRADVAR_EXT_CONV_WEIGHT_MIB=K: its weight-gradient calls K MiB of operands each), loop
(per-sample autograd loop: the ground truth every other method is checked against), torch.func
(vmap of grad), backpack (when installed), opacus (job a only, when installed). Prints a markdown
table of every method, then one of where ours stand against the peers (the loop, torch.func,
BackPACK, Opacus: the fastest one's time, the leanest one's peak), and writes JSON to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---------------------------------------------------------------- workloads
def make_workload(name: str, device: str):
    g = torch.Generator().manual_seed(0)
    if name == "seed-linear":
        model, x, y, loss = (
            nn.Linear(2, 1, bias=False),
            torch.randn(3, 2, generator=g),
            torch.randn(3, 1, generator=g),
            "mse",
        )
    elif name in ("seed-mnist-linear", "seed-mnist-cnn"):  # the seed's other two models, on MNIST-shaped data
        if name == "seed-mnist-linear":
            model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
        else:
            model = nn.Sequential(
                nn.Conv2d(1, 5, 5, 1), nn.ReLU(), nn.MaxPool2d(2, 2), nn.Flatten(), nn.Linear(720, 10)
            )
        x, y, loss = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g), "ce"
    elif name == "mlp":
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
        x, y, loss = torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g), "ce"
    elif name.startswith("cnn"):
        n = int(name.split("-")[1]) if "-" in name else 64
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(64, 10),
        )
        x, y, loss = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g), "ce"
    elif name == "seq":
        model, x, y, loss = (
            nn.Linear(256, 256),
            torch.randn(32, 128, 256, generator=g),
            torch.randn(32, 128, 256, generator=g),
            "mse",
        )
    else:
        raise ValueError(f"unknown workload {name!r}")
    torch.manual_seed(0)
    model = model.to(device)
    lossfunc = nn.MSELoss(reduction="sum") if loss == "mse" else nn.CrossEntropyLoss(reduction="sum")
    return model, x.to(device), y.to(device), lossfunc


# The seed's three models (Linear(2, 1) on N = 3; Flatten + Linear(784, 10) and its small CNN on an
# MNIST batch of 32), then the MLP, CNN and sequence layer.
WORKLOADS = ("seed-linear", "seed-mnist-linear", "seed-mnist-cnn", "mlp", "cnn", "seq")


# ---------------------------------------------------------------- methods
# Each returns (total variance, tensors): for job "a" the per-parameter variances, for job "b"
# the gradient of the total variance w.r.t. every parameter. Both are checked against the loop.
def _finish(job, params, variances):
    total = sum(v.sum() for v in variances)
    if job == "a":
        return total.detach(), [v.detach() for v in variances]
    return total.detach(), torch.autograd.grad(total, params)


def run_floor(model, x, y, lossfunc, job):
    loss = lossfunc(model(x), y)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


def run_gradvar(model, x, y, lossfunc, job, with_grad=False):
    """The front end, forward and backward inside collect: collect.backward, the statistics only
    (no .grad); with_grad: loss.backward(), the parameters' ordinary .grad as well."""
    import gradvar_ext as gv

    model = gv.extend(model)  # idempotent
    params = list(model.parameters())
    with gv.collect(gv.Variance()) as stats:
        loss = lossfunc(model(x), y)
        if with_grad:
            loss.backward(retain_graph=job == "b", create_graph=job == "b")
        else:
            stats.backward(loss, create_graph=job == "b")
    result = _finish(job, params, [p.variance for p in params])
    gv.clear(model)
    model.zero_grad(set_to_none=True)  # create_graph grads hold the graph
    return result


MICRO_BATCH_SIZE = 16


def run_gradvar_micro(model, x, y, lossfunc, job, micro_batch_size=MICRO_BATCH_SIZE):
    """gradvar_ext.total_variance, micro_batch_size samples per forward and backward: peak memory
    bounded by the micro-batch. Job (b) makes two passes (the mean gradient first)."""
    import gradvar_ext as gv

    params = list(model.parameters())
    total = gv.total_variance(model, lossfunc, x, y, micro_batch_size=micro_batch_size, backward=job == "b")
    result = total, [p.grad if job == "b" else p.variance for p in params]
    model.zero_grad(set_to_none=True)
    return result


def run_loop(model, x, y, lossfunc, job):
    params = list(model.parameters())
    rows = []
    for i in range(x.shape[0]):
        loss = lossfunc(model(x[i : i + 1]), y[i : i + 1])
        rows.append(torch.autograd.grad(loss, params, create_graph=job == "b"))
    return _finish(job, params, [torch.stack([r[k] for r in rows]).var(0, unbiased=False) for k in range(len(params))])


def run_torch_func(model, x, y, lossfunc, job):
    from torch.func import functional_call, grad, vmap

    params = dict(model.named_parameters())

    def loss_one(p, xi, yi):
        return lossfunc(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return _finish(job, list(params.values()), [per_sample[k].var(0, unbiased=False) for k in params])


def run_backpack(model, x, y, lossfunc, job):
    from backpack import backpack, extend
    from backpack.extensions import Variance

    model, lossfunc = extend(model), extend(lossfunc)
    params = list(model.parameters())
    loss = lossfunc(model(x), y)
    with backpack(Variance()):
        loss.backward(retain_graph=job == "b", create_graph=job == "b")
    result = _finish(job, params, [p.variance for p in params])
    model.zero_grad(set_to_none=True)  # break the create_graph reference cycle
    return result


def run_opacus(model, x, y, lossfunc, job):
    """`model` is the GradSampleModule the worker wrapped once (its hooks stay on the model)."""
    if job == "b":
        raise NotImplementedError("Opacus cannot differentiate its per-sample gradients (job b)")
    params = list(model.parameters())
    lossfunc(model(x), y).backward()
    result = _finish(job, params, [p.grad_sample.var(0, unbiased=False) for p in params])
    for p in params:
        p.grad_sample = None
    return result


METHODS = {
    "floor": run_floor,
    "gradvar": run_gradvar,
    "gradvar+grad": functools.partial(run_gradvar, with_grad=True),
    "gradvar-fused": run_gradvar,
    "gradvar-strided": run_gradvar,
    "gradvar-shifted": run_gradvar,
    "gradvar-pytorch-conv": run_gradvar,
    "gradvar-pytorch-piecewise": run_gradvar,
    "gradvar-micro": run_gradvar_micro,
    "loop": run_loop,
    "torch.func": run_torch_func,
    "backpack": run_backpack,
    "opacus": run_opacus,
}
OPTIONAL = {"backpack": "backpack", "opacus": "opacus"}  # method -> package it needs
# method -> the environment its worker runs under (the opt-in CUDA paths, the conv-node A/B)
METHOD_ENV = {
    "gradvar-fused": {"GRADVAR_EXT_FUSED_CUDA": "1"},
    "gradvar-strided": {"GRADVAR_EXT_UNFOLD": "strided"},
    "gradvar-shifted": {"GRADVAR_EXT_CONV_ALGORITHM": "shifted"},
    "gradvar-pytorch-conv": {"GRADVAR_EXT_CONV_BACKWARD": "pytorch"},
    "gradvar-pytorch-piecewise": {"GRADVAR_EXT_PIECEWISE_BACKWARD": "pytorch"},
}


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """Sets the environment variables `values` (the library reads its knobs at each call) for the
    block, then puts back what was there before: a variable set in the shell stays set."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


def _sized(method: str, prefix: str, least: int = 1) -> int | None:
    """K of a method named prefix + K (K a whole number, at least ``least``), else None."""
    size = method[len(prefix) :] if method.startswith(prefix) else ""
    return int(size) if size.isdigit() and int(size) >= least else None


def method_function(method: str):
    """METHODS[method]; "gradvar-micro-K": total_variance in micro-batches of K samples;
    "gradvar-chunk-K" / "gradvar-wgrad-K" / "gradvar-wmib-K" / "gradvar-partials-K": gradvar under a knob
    (method_environment)."""
    if (size := _sized(method, "gradvar-micro-")) is not None:
        return functools.partial(run_gradvar_micro, micro_batch_size=size)
    if method_environment(method) and method not in METHOD_ENV:
        return run_gradvar
    if method not in METHODS:
        raise ValueError(
            f"unknown method {method!r}: one of {', '.join(METHODS)}, gradvar-micro-K (K samples), "
            "gradvar-chunk-K (K MiB chunks), gradvar-wgrad-K (K samples per conv weight-gradient call) or "
            "gradvar-wmib-K (K MiB of operands per conv weight-gradient call; for these two 0: the whole batch) "
            "or gradvar-partials-K (K MiB of CUDA's fused split partials)"
        )
    return METHODS[method]


def method_environment(method: str) -> dict[str, str]:
    """The knobs a method's worker runs under: METHOD_ENV's; for "gradvar-chunk-K",
    GRADVAR_EXT_CHUNK_MIB=K (what the chunks of per-sample gradients, patches and products may
    take: by default half the batch's, within 1-4 MiB on the CPU, 1-32 on a GPU); for
    "gradvar-wgrad-K", GRADVAR_EXT_CONV_WEIGHT_SAMPLES=K (samples per backend weight-gradient
    call in the conv node's backward); for "gradvar-wmib-K", GRADVAR_EXT_CONV_WEIGHT_MIB=K (the
    node's weight gradients in slices of at most K MiB of operands: 8 by default; for these two,
    K = 0: the whole batch a call, as PyTorch's node); for "gradvar-partials-K",
    GRADVAR_EXT_FUSED_PARTIALS_MIB=K (CUDA's fused moments split over blocks with up to K MiB of
    partials; 64: the rule before the thirty-first session): the time / peak-memory trade of one knob."""
    for prefix, knob, least in (
        ("gradvar-chunk-", "GRADVAR_EXT_CHUNK_MIB", 1),
        ("gradvar-wgrad-", "GRADVAR_EXT_CONV_WEIGHT_SAMPLES", 0),
        ("gradvar-wmib-", "GRADVAR_EXT_CONV_WEIGHT_MIB", 0),
        ("gradvar-partials-", "GRADVAR_EXT_FUSED_PARTIALS_MIB", 1),
    ):
        if (size := _sized(method, prefix, least)) is not None:
            return {knob: str(size)}
    return METHOD_ENV.get(method, {})


# ---------------------------------------------------------------- one measurement (child process)
def cpu_allocations(fn) -> tuple[list, list]:
    """One call of fn under the profiler with its allocation events: all its events, and
    (start ns, +size at malloc / -size at free) of every allocation of ATen's CPU allocator, in
    time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    allocations = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    return events, allocations


def cpu_peak_bytes(fn) -> int:
    """Peak of live tensor bytes that one call of fn adds, from the profiler's allocation events
    (cpu_allocations). Exact where RSS is not: no allocator caching, no earlier high-water mark,
    no one-time initialisation (fn is warm). Memory that bypasses ATen's allocator (BLAS / oneDNN
    internal buffers) is not seen."""
    live = peak = 0
    for _, nbytes in cpu_allocations(fn)[1]:
        live += nbytes
        peak = max(peak, live)
    return peak


def exact_float32() -> None:
    """True float32 everywhere: cuDNN convolutions default to TF32, whose ~1e-3 rounding would fail
    every method's comparison with the per-sample loop on the CNN (seen on an H200). It also picks
    cuDNN's algorithms, and so their workspaces, which are part of every method's peak on a GPU:
    profile_job.py sets the same, so that its times and memory explain this benchmark's."""
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def worker(method: str, workload: str, device: str, repeats: int, out_path: str, job: str) -> None:
    """Times `repeats` runs after a warm-up (more for runs under 10 ms: as many as fill ~0.2 s, at
    most 100, so sub-millisecond timings are not noise), then measures the peak extra memory of
    one more run: CUDA from the caching allocator's peak statistics, CPU from the profiler's
    allocation events (an untimed run: profiling slows it)."""
    os.environ.update(method_environment(method))
    exact_float32()
    torch.manual_seed(0)
    model, x, y, lossfunc = make_workload(workload, device)
    fn = method_function(method)
    if method == "opacus":  # wrap once: the wrapper's hooks stay on the model
        from opacus import GradSampleModule

        model = GradSampleModule(model, loss_reduction="sum")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn(model, x, y, lossfunc, job)  # warm-up (loads kernels, allocator pools)
    sync()
    start = time.perf_counter()
    fn(model, x, y, lossfunc, job)  # a second warm-up, timed to size the repeats
    sync()
    once = time.perf_counter() - start
    if once < 0.01:
        repeats = max(repeats, min(100, int(0.2 / max(once, 1e-6))))
    times = []
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        total, grads = fn(model, x, y, lossfunc, job)
        sync()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(model, x, y, lossfunc, job)
        sync()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak_bytes(lambda: fn(model, x, y, lossfunc, job))
    torch.save({"total": total.detach().cpu(), "grads": [g.detach().cpu() for g in grads]}, out_path)
    print(json.dumps({"median_ms": 1000 * statistics.median(times), "peak_mb": max(peak, 0) / 2**20}))


def _run_worker(method, workload, device, repeats, out_path, job) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, __file__, "--worker", method, workload, device, str(repeats), out_path, job]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["failed"])[-1]
        return {"error": last[:160]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(method, workload, device, repeats, tmp, job) -> dict:
    out_path = os.path.join(tmp, f"{method}-{workload}.pt")
    result = _run_worker(method, workload, device, repeats, out_path, job)
    if "error" in result:
        return result
    result["values"] = torch.load(out_path)
    return result


def agrees(a, b, rtol=1e-3, atol=1e-5) -> bool:
    scale = max(float(b["total"].abs()), 1e-12)
    ok = abs(float(a["total"]) - float(b["total"])) <= rtol * scale + atol
    for ga, gb in zip(a["grads"], b["grads"]):
        ok &= bool(torch.allclose(ga, gb, rtol=rtol, atol=atol * max(1.0, float(gb.abs().max()))))
    return ok


# The tools a user would pick instead of ours (the peers).
PEERS = ("loop", "torch.func", "backpack", "opacus")


def standing(measured: dict) -> list[dict]:
    """Where each of our methods stands on one workload (``measured``: method -> its JSON record):
    the fastest peer's median time over ours (above 1: we are faster) and our peak extra memory
    less the leanest peer's (below 0: we are leaner). A method that failed, was not installed or
    disagrees with the loop counts for neither side; without a peer, no rows."""
    valid = {m: r for m, r in measured.items() if "error" not in r and r.get("matches_loop") == "yes"}
    peers = {m: r for m, r in valid.items() if m in PEERS}
    if not peers:
        return []
    fastest = min(peers, key=lambda m: peers[m]["median_ms"])
    leanest = min(peers, key=lambda m: peers[m]["peak_mb"])
    return [
        {
            "method": m,
            "fastest_peer": fastest,
            "speedup": peers[fastest]["median_ms"] / r["median_ms"],
            "leanest_peer": leanest,
            "extra_mb": r["peak_mb"] - peers[leanest]["peak_mb"],
        }
        for m, r in valid.items()
        if m.startswith("gradvar")
    ]


def standing_rows(workload: str, rows: list[dict]) -> list[str]:
    return [
        f"| {workload} | {r['method']} | {r['speedup']:.2f}x {r['fastest_peer']} | "
        f"{r['extra_mb']:+.1f} MB vs {r['leanest_peer']} |"
        for r in rows
    ]


def cpu_fields(path: str = "/proc/cpuinfo") -> dict:
    """/proc/cpuinfo's model name, and its family / model / stepping: "AMD EPYC" alone names
    generations as far apart as the 2-core VMs of this project's runs (the thirty-second
    session's, family 25 model 1, AVX2, 87-163 GFLOP/s float32 GEMM on 2 threads; earlier sessions'
    oneDNN convolutions ran at ~340, which takes AVX-512)."""
    fields = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = (part.strip() for part in line.partition(":"))
                if key in ("model name", "cpu family", "model", "stepping") and key not in fields:
                    fields[key] = value
                if not key:  # the first processor's block ends
                    break
    except OSError:
        pass
    info = {"cpu": fields.get("model name") or platform.processor()}
    if "cpu family" in fields:
        info["cpu_id"] = " ".join(
            f"{k.split()[-1]} {fields[k]}" for k in ("cpu family", "model", "stepping") if k in fields
        )
    return info


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    """float32 GEMM throughput of this CPU now, GFLOP/s (best of `repeats` [size, size] products,
    ~0.1 s): the CPU jobs are FLOP-bound, so their times only compare between runs whose machines
    read alike (a slow hour of a VM shows here too)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return round(2 * size**3 / best / 1e9, 1)


def machine(device: str) -> dict:
    """What the run was measured on: Python, torch, threads, the CPU (model, family / model /
    stepping, the vector instructions PyTorch's CPU kernels use, its GEMM rate now) or the GPU,
    and the environment variables that change what a run measures."""
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    info.update(cpu_fields())
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", ...
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu_matmul_gflops"] = matmul_gflops()
    info["environment"] = measured_environment()
    return info


# Variables besides the library's own (GRADVAR_EXT_*) that change what a run measures: cuDNN's
# workspace cap (part of every method's GPU peak), cuBLAS's workspaces, the allocators (glibc's
# MALLOC_*_ tunables, a preloaded jemalloc / tcmalloc: on the 2-core CPU every method's CNN time
# moves by 20-25% with them, benchmarks/RESULTS.md), threads.
_OTHER_KNOBS = (
    "CUDNN_CONV_WSCAP_DBG",
    "CUBLAS_WORKSPACE_CONFIG",
    "PYTORCH_CUDA_ALLOC_CONF",
    "PYTORCH_ALLOC_CONF",
    "NVIDIA_TF32_OVERRIDE",
    "OMP_NUM_THREADS",
    "LD_PRELOAD",
)


def measured_environment() -> dict[str, str]:
    """The knobs set in the shell for this run (every worker inherits them; a method's own, as
    gradvar-chunk-K's, come on top), recorded with the machine so that a table says what it ran under."""
    return {
        k: v for k, v in sorted(os.environ.items()) if k.startswith(("GRADVAR_EXT_", "MALLOC_")) or k in _OTHER_KNOBS
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip the slowest loops")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument(
        "--job",
        default="b",
        choices=["a", "b"],
        help="a: the variance of the per-sample gradients; b (default): also the gradient of the "
        "total variance w.r.t. all parameters (double backward)",
    )
    parser.add_argument("--json", default=None, help="output path (default benchmarks/results/<device>-<job>.json)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every method this many times per workload, in rotating order, and report the "
        "median of the rounds' medians (a machine whose speed drifts biases one pass per method)",
    )
    args = parser.parse_args()
    methods = args.methods or [
        m
        for m in METHODS
        if m not in ("gradvar-strided", "gradvar-shifted", "gradvar-pytorch-conv")
        and (m != "gradvar-fused" or args.device == "cuda")
    ]
    for method in methods:
        try:
            method_function(method)
        except ValueError as e:
            parser.error(str(e))
    repeats = 3 if args.quick else 7
    rows, results = [], {"machine": machine(args.device), "job": args.job, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in args.workloads:
            measured = {}
            order = ["loop"] + [m for m in methods if m != "loop"]
            for round_ in range(args.rounds):
                for method in order[round_ % len(order) :] + order[: round_ % len(order)]:
                    if method in OPTIONAL:
                        try:
                            __import__(OPTIONAL[method])
                        except ImportError:
                            measured[method] = {"error": "not installed"}
                            continue
                    if "error" in measured.get(method, {}):
                        continue
                    r = measure(method, workload, args.device, repeats, tmp, args.job)
                    if "error" in r or method not in measured:
                        measured[method] = dict(r, round_ms=[r.get("median_ms")])
                    else:
                        measured[method]["round_ms"].append(r["median_ms"])
                        measured[method]["median_ms"] = statistics.median(measured[method]["round_ms"])
                    print(f"{workload:>12} {method:>14}: " + (r.get("error") or f"{r['median_ms']:.2f} ms"), flush=True)
            measured = {m: measured[m] for m in order if m in measured}
            truth = measured["loop"].get("values")
            results["workloads"][workload] = {}
            for method, r in measured.items():
                if "error" in r:
                    rows.append(f"| {workload} | {method} | - | - | {r['error']} |")
                    results["workloads"][workload][method] = {"error": r["error"]}
                    continue
                ok = (
                    "floor (no variance)"
                    if method == "floor"
                    else ("yes" if truth and agrees(r["values"], truth) else "NO")
                )
                rows.append(f"| {workload} | {method} | {r['median_ms']:.2f} | {r['peak_mb']:.1f} | {ok} |")
                results["workloads"][workload][method] = {
                    "median_ms": r["median_ms"],
                    "round_ms": r["round_ms"],
                    "peak_mb": r["peak_mb"],
                    "matches_loop": ok,
                }
    results["standing"] = {w: standing(measured) for w, measured in results["workloads"].items()}
    path = args.json or os.path.join(HERE, "results", f"{args.device}-{args.job}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nmachine: {json.dumps(results['machine'])}\n")
    print("| workload | method | median time (ms) | peak extra memory (MB) | matches per-sample loop |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(
        "\nWhere ours stand: the fastest peer's median time over ours (above 1x: faster), our peak extra "
        "memory less the leanest peer's (below 0: leaner); peers: the loop, torch.func, BackPACK, Opacus, "
        "those that ran and matched the loop\n"
    )
    print("| workload | method | against the fastest peer | against the leanest peer |")
    print("|---|---|---|---|")
    print("\n".join(row for w, r in results["standing"].items() for row in standing_rows(w, r)))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6], sys.argv[7])
    else:
        raise SystemExit(main())
