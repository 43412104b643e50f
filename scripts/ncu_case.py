"""One call of a tensor-core moments kernel for Nsight Compute (issue 5: why the walk runs below
cuBLAS's rate). Cases, the benchmark's shapes (benchmarks/bench_fused_cuda.py):
  implicit  conv2d_variance, 64 x 32 x 32 x 32 -> 64 channels, 3x3, padding 1, patches read in place
  walk      linear_variance on [64, 128, 1024] -> 1024: the tensor-core walk over unfolded factors
  gemm      bmm on the same conv patches, unfolded beforehand: cuBLAS's kernel as the yardstick
Usage (on the GPU): ncu --kernel-name regex:fused_moments_mma --launch-count 1 --clock-control none \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
    python scripts/ncu_case.py implicit [float32|float64]"""

import os
import sys

import torch

import gradvar_ext as gv

case = sys.argv[1]
dtype = getattr(torch, sys.argv[2] if len(sys.argv) > 2 else "float32")
torch.manual_seed(0)
if case in ("implicit", "gemm"):
    x = torch.randn(64, 32, 32, 32, device="cuda", dtype=dtype)
    g = torch.randn(64, 64, 32, 32, device="cuda", dtype=dtype)
    if case == "implicit":
        os.environ["GRADVAR_EXT_CONV_ALGORITHM"] = "implicit"
        gv.conv2d_variance(x, g, 3, padding=1)
    else:
        cols = torch.nn.functional.unfold(x, 3, padding=1)
        torch.bmm(g.flatten(2), cols.transpose(1, 2))
elif case == "walk":
    os.environ["GRADVAR_EXT_FUSED_CUDA"] = "tensor_cores"
    x = torch.randn(64, 128, 1024, device="cuda", dtype=dtype)
    g = torch.randn(64, 128, 1024, device="cuda", dtype=dtype)
    gv.linear_variance(x, g)
else:
    sys.exit(f"ncu_case.py: case must be implicit, walk or gemm, got {case!r}")
torch.cuda.synchronize()
print(f"{case} {dtype}: done")
