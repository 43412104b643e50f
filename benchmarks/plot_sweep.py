"""Plots time and peak extra memory against batch size from bench_variance.py sweep JSON files.

    python benchmarks/plot_sweep.py benchmarks/measured/cpu_cnn_sweep.json benchmarks/measured/h200_cnn_sweep.json

Needs matplotlib (a benchmark-only dependency). Writes one PNG per input next to it
(`<name>.png`): time (ms) and peak extra memory (MB) against N, log-log, one line per method.
Workloads are named `<name>-<N>`; a JSON with a plain `cnn` workload counts as N = 64.
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
    where = machine.get("gpu") or f"{machine.get('cpu', 'CPU')}, {machine.get('threads', '?')} threads"
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    for method, rows in points(results).items():
        ns = [r[0] for r in rows]
        ax_time.plot(ns, [r[1] for r in rows], marker="o", label=method)
        ax_mem.plot(ns, [max(r[2], 0.1) for r in rows], marker="o", label=method)
    for ax, label in ((ax_time, "median time (ms)"), (ax_mem, "peak extra memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend()
    fig.suptitle(f"CNN 3x32x32: variance + gradient of the total variance ({where})")
    fig.tight_layout()
    out = os.path.splitext(path)[0] + ".png"
    fig.savefig(out, dpi=90)
    return out


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(plot(path))
