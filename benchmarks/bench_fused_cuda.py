"""The fused CUDA moment kernel against cuBLAS computing the plain per-sample gradients.

    python benchmarks/bench_fused_cuda.py

For Linear shapes [N, T, in] -> [N, T, out] it times, with CUDA events (median of 20 after warm-up):
  bmm      torch.bmm(G^T, X): the per-sample gradients [N, out, in] (cuBLAS; O(N out in) memory)
  default  linear_variance on the default CUDA path (chunked bmm + fused accumulate)
  fused    linear_variance with GRADVAR_EXT_FUSED_CUDA=1 (one pass, O(out in) memory)
  tf32x3   the same on tensor cores, GRADVAR_EXT_FUSED_CUDA=tf32x3 (float32 only, sm_80+)
Throughput counts the per-sample GEMM FLOPs (2 N T out in) for all three; peak memory is what the
call allocates beyond its inputs. Issue target: fused >= 50% of bmm's throughput.
"""

from __future__ import annotations

import os
import statistics

import torch

import gradvar_ext

SHAPES = [(256, 16, 256, 256), (128, 64, 512, 512), (64, 128, 1024, 1024), (1024, 8, 128, 128), (32, 256, 768, 768)]


def timed(fn, reps=20):
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


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, gradvar backend {gradvar_ext.backend()}")
    rows = []
    for dtype in (torch.float32, torch.float64):
        for n, t, i, o in SHAPES:
            x = torch.randn(n, t, i, device="cuda", dtype=dtype)
            g = torch.randn(n, t, o, device="cuda", dtype=dtype)
            flops = 2 * n * t * i * o
            results = {}
            results["bmm"] = timed(lambda x=x, g=g: torch.bmm(g.transpose(1, 2), x))
            os.environ.pop("GRADVAR_EXT_FUSED_CUDA", None)
            results["default"] = timed(lambda x=x, g=g: gradvar_ext.linear_variance(x, g))
            for name, flag in (("fused", "1"), ("tf32x3", "tf32x3")):
                os.environ["GRADVAR_EXT_FUSED_CUDA"] = flag
                results[name] = timed(lambda x=x, g=g: gradvar_ext.linear_variance(x, g))
            os.environ.pop("GRADVAR_EXT_FUSED_CUDA", None)
            cells = " | ".join(f"{ms:.3f} ms, {flops / ms / 1e9:.1f} TF/s, {mb:.0f} MB" for ms, mb in results.values())
            best = min(results["fused"][0], results["tf32x3"][0])
            rows.append(f"| {str(dtype)[6:]} | {n}x{t}x{i}->{o} | {cells} | {results['bmm'][0] / best:.2f} |")
    print(
        "\n| dtype | N x T x in -> out | bmm (per-sample grads) | default path | fused | fused tf32x3 "
        "(float64: = fused) | best fused / bmm throughput |"
    )
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
