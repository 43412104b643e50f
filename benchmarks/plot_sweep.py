"""Plots time and peak extra memory against batch size from bench_variance.py sweep JSON files.

    python benchmarks/plot_sweep.py benchmarks/measured/cpu_cnn_sweep.json benchmarks/measured/h200_cnn_sweep.json

Needs matplotlib (a benchmark-only dependency). Writes one PNG per input next to it
(`<name>.png`): time (ms) and peak extra memory (MB) against N, log-log, one line per method,
and, when the sweep has the floor (a plain forward + backward), each method's memory beyond the
floor's at the same N: what the statistic itself costs (for gradvar's job (a) it should not grow
with N). Workloads are named `<name>-<N>`; a JSON with a plain `cnn` workload counts as N = 64.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def points(results: dict) -> dict[str, list[tuple[int, float, float]]]:
    """method -> sorted [(N, median ms, peak MB)] over the workloads that ran."""
    by_method: dict[str, list] = {}
    for workload, methods in results["workloads"].items():
        n = int(workload.rsplit("-", 1)[1]) if "-" in workload else 64
        for method, r in methods.items():
            if "median_ms" in r:
                by_method.setdefault(method, []).append((n, r["median_ms"], r["peak_mb"]))
    return {m: sorted(v) for m, v in by_method.items()}


def plot(path: str) -> str:
    with open(path) as f:
        results = json.load(f)
    machine = results.get("machine", {})
    cpu = " ".join(filter(None, (machine.get("cpu", "CPU"), machine.get("cpu_capability"))))  # "AMD EPYC AVX2"
    where = machine.get("gpu") or f"{cpu}, {machine.get('threads', '?')} threads"
    by_method = points(results)
    floor = {n: mb for n, _, mb in by_method.get("floor", [])}
    panels = 3 if floor else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    ax_time, ax_mem = axes[0], axes[1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (method, rows) in enumerate(by_method.items()):
        ns, style = [r[0] for r in rows], dict(marker="o", label=method, color=colors[k % len(colors)])
        ax_time.plot(ns, [r[1] for r in rows], **style)
        ax_mem.plot(ns, [max(r[2], 0.1) for r in rows], **style)
        if floor and method != "floor":
            beyond = [(n, mb - floor[n]) for n, _, mb in rows if n in floor]
            axes[2].plot([n for n, _ in beyond], [d for _, d in beyond], **style)
    labels = ["median time (ms)", "peak extra memory (MB)", "peak memory beyond the floor's (MB)"]
    for ax, label in zip(axes, labels):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log" if ax is not axes[-1] or panels == 2 else "symlog")
        ax.set_xlabel("batch size N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend()
    job = "variance" if results.get("job") == "a" else "variance + gradient of the total variance"
    fig.suptitle(f"CNN 3x32x32: {job} ({where})")
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=90)
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(plot(path))
