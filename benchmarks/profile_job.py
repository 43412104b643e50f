"""Where a method's time goes on a workload of bench_variance.py: kernel count and the costliest ops.

    python benchmarks/profile_job.py [--device cuda] [--job a|b] [--workloads mlp cnn seq]
                                     [--methods gradvar torch.func] [--top 12] [--memory] [--tf32]

For each (workload, method), in this process: the median time of 10 calls after 3 warm-ups, then
one call under torch.profiler: how many kernels it ran (CUDA: device kernels launched, incl.
memset/memcpy; CPU: ATen ops with no ATen op inside them, views and allocations left out: the
launch-bound proxy) and the top ops by self time (CUDA: device time; CPU: host time). At the
benchmark sizes the GPU jobs are bound by launches and the host's dispatch, so the kernel count
is what to cut (benchmarks/RESULTS.md).

--memory: one more call, then where its memory peaks: what to cut when a method's peak is above
another's. CUDA: the allocator's history recorded, what was alive at the call's peak, by where it
was allocated (the innermost Python frame outside torch's package, and the innermost frame).
CPU: the profiler's allocation events (the benchmark's peak), the ops running at the peak and the
large allocations inside the outermost one. With GRADVAR_EXT_CHUNK_MIB=gpu,
GRADVAR_EXT_CONV_ALGORITHM=unfold and GRADVAR_EXT_CONV_SLABS=auto the CPU runs a GPU's chunks,
conv path and slabs: on the benchmark CNN's job (b) it read 155.8 MB where the H100 measured
156.8 (thirty-first session).

Backends as bench_variance.py's workers set them: true float32, cuDNN's TF32 off (which picks
other cuDNN algorithms, with other workspaces: the twenty-first session's profile, TF32 on,
found 158 MB alive at gradvar's CNN peak where the benchmark, TF32 off, measured 330).
--tf32 keeps PyTorch's defaults instead (cuDNN convolutions in TF32).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_variance as bv  # noqa: E402

NOT_KERNELS = {
    "aten::" + name
    for name in (
        "empty empty_like empty_strided view view_as reshape _reshape_alias _unsafe_view as_strided t "
        "transpose permute expand expand_as narrow slice select squeeze unsqueeze squeeze_ unsqueeze_ "
        "unflatten flatten detach alias lift_fresh resolve_conj resolve_neg result_type is_nonzero item "
        "_local_scalar_dense split chunk unbind contiguous set_ _has_compatible_shallow_copy_type resize_ "
        "as_strided_ to unfold"
    ).split()  # `to` alone is a no-op; a real conversion counts as the copy inside it
}


def _is_op(event) -> bool:
    return event.name.startswith(("aten::", "gradvar::"))


def cpu_kernels(prof) -> Counter:
    """ATen ops that would each be one kernel on a GPU, by name: the ops, views and allocations
    left out, with no such op inside them (a GEMM that only resolves views inside counts; the
    ops around a copy do not)."""
    ops = [e for e in prof.events() if _is_op(e)]
    candidates = [e for e in ops if e.name not in NOT_KERNELS]
    enclosing = set()  # ops with a candidate inside
    for e in candidates:
        p = e.cpu_parent
        while p is not None:
            enclosing.add(id(p))
            p = p.cpu_parent
    return Counter(e.name for e in candidates if id(e) not in enclosing)


def cuda_kernels(prof) -> Counter:
    return Counter(
        e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "[memory]"
    )


def live_at_peak(trace: list[dict]) -> tuple[int, list[tuple[str, int, int]]]:
    """Replay an allocator trace (``torch.cuda.memory._snapshot()["device_traces"][i]``): the peak of
    the bytes allocated after the trace began, and the blocks alive at that peak grouped by their
    allocation site as (site, bytes, blocks), largest first. A block counts from its ``alloc``
    to its ``free_completed`` (a stream's pending free still holds the memory)."""
    live: dict[int, dict] = {}
    total = peak = 0
    at_peak: list[dict] = []
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, list(live.values())
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    sites: dict[str, list[int]] = {}
    for event in at_peak:
        entry = sites.setdefault(_site(event.get("frames", [])), [0, 0])
        entry[0] += event["size"]
        entry[1] += 1
    return peak, sorted(((site, size, count) for site, (size, count) in sites.items()), key=lambda r: -r[1])


def _site(frames: list[dict]) -> str:
    """The innermost frame outside torch's package (file:line function), and the innermost of all."""
    if not frames:
        return "(no Python frame)"

    def name(frame: dict) -> str:
        return f"{os.path.basename(frame['filename'])}:{frame['line']} {frame['name']}"

    ours = next((f for f in frames if f"{os.sep}torch{os.sep}" not in f["filename"]), frames[0])
    return name(ours) if ours is frames[0] else f"{name(ours)} <- {name(frames[0])}"


def print_memory_at_peak(call, label: str, top: int) -> None:
    """One more call (warm) with the CUDA allocator's history recorded: what was alive at its peak."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, context="alloc", stacks="python")
    try:
        call()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(None)
    peak, sites = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()])
    print(f"\n## memory, {label}: {peak / 2**20:.1f} MB allocated during the call at its peak")
    for site, size, count in sites[:top]:
        print(f"{size / 2**20:8.2f} MB in {count:3d} blocks: {site}")


def print_cpu_memory_at_peak(call, label: str, top: int) -> None:
    """One more call under the profiler with its allocation events (bench_variance.cpu_allocations,
    whose peak the benchmark reports): the ops running at the peak, and the allocations of at
    least 256 KiB (+) and frees (-) inside the outermost ATen / gradvar op running then, each with
    the live total after it and the innermost op that made it. The events carry no address, so
    what is alive at the peak is read from that sequence, not listed block by block as on CUDA."""
    events, allocations = bv.cpu_allocations(call)
    ops = [e for e in events if e.name() != "[memory]"]
    live, after = 0, []
    for _, nbytes in allocations:
        live += nbytes
        after.append(live)
    peak = max(after, default=0)
    print(f"\n## memory, {label}: {peak / 2**20:.2f} MB of tensors allocated during the call at its peak")
    if peak <= 0:
        return
    # the first moment within 64 KiB of the peak: the large allocation that made it, not a scalar's after it
    peak_ns = next(start for (start, _), total in zip(allocations, after) if total >= peak - (64 << 10))

    def running(ns: int) -> list:
        return sorted((e for e in ops if e.start_ns() <= ns <= e.end_ns()), key=lambda e: (e.start_ns(), -e.end_ns()))

    at_peak = running(peak_ns)
    print("running at the peak:", " > ".join(e.name() for e in at_peak) or "(no op)")
    outer = next((e for e in at_peak if e.name().startswith(("aten::", "gradvar::"))), None)
    if outer is None:
        return
    print(f"allocations of 256 KiB or more inside {outer.name()} (MB, live after):")
    shown = 0
    for (start, nbytes), total in zip(allocations, after):
        if outer.start_ns() <= start <= outer.end_ns() and abs(nbytes) >= 256 << 10 and shown < 2 * top:
            inner = running(start)
            print(f"{nbytes / 2**20:+9.2f} {total / 2**20:9.2f}  {inner[-1].name() if inner else ''}")
            shown += 1


def profile_one(workload: str, method: str, device: str, job: str, top: int, memory: bool = False) -> None:
    model, x, y, lossfunc = bv.make_workload(workload, device)
    fn = bv.method_function(method)
    call, label = (lambda: fn(model, x, y, lossfunc, job)), f"{workload}, {method}"
    with bv.environment(bv.method_environment(method)):
        _profile(call, label, device, top)
        if memory:  # the same warm model
            (print_memory_at_peak if device == "cuda" else print_cpu_memory_at_peak)(call, label, top)


def _profile(call, label: str, device: str, top: int) -> None:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):
        call()
    times = []
    for _ in range(10):
        sync()
        start = time.perf_counter()
        call()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        call()
        sync()
    kernels = cuda_kernels(prof) if device == "cuda" else cpu_kernels(prof)
    print(f"\n## {label}: {statistics.median(times):.3f} ms, {sum(kernels.values())} kernels")
    print("most frequent:", ", ".join(f"{name} x{count}" for name, count in kernels.most_common(8)))
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=50))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--job", default="b", choices=["a", "b"])
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn", "seq"])
    parser.add_argument("--methods", nargs="+", default=["gradvar", "torch.func"])
    parser.add_argument("--top", type=int, default=12, help="rows of the op table")
    parser.add_argument("--memory", action="store_true", help="where each call's memory peaks (CUDA: what is alive)")
    parser.add_argument("--tf32", action="store_true", help="keep PyTorch's TF32 defaults (not the benchmark's)")
    args = parser.parse_args()
    if not args.tf32:
        bv.exact_float32()
    print(bv.machine(args.device), "(cuDNN TF32 allowed)" if args.tf32 else "(true float32: cuDNN TF32 off)")
    for workload in args.workloads:
        for method in args.methods:
            profile_one(workload, method, args.device, args.job, args.top, memory=args.memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
