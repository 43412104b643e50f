"""Shared fixtures; benchmarks/ on sys.path for the tests that use the benchmark's own helpers
(its CPU memory measurement, its methods)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.fixture(params=["unfold", "unfold-strided", "unfold-slabs", "grouped", "shifted"])
def conv_algorithm(request, monkeypatch):
    """Forces each way the compiled kernels form per-sample conv gradients (csrc/conv2d_ops.cpp):
    unfolded patches + bmm (patches by the default unfolding, our im2col kernels, or by strided
    views of the image, GRADVAR_EXT_UNFOLD=strided; or, for the moments, slabs of 2 output rows
    at a time, CUDA's default where patches outweigh gradients, forced here on every device), one
    grouped convolution per chunk of samples, or one bmm per kernel row over width-unfolded images
    (shifted). The grouped one runs the backend's convolutions, which on CUDA follow
    torch.backends.cudnn.allow_tf32 (default on): off here, so float32 is checked at float32
    precision."""
    algorithm, _, unfold = request.param.partition("-")
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", algorithm)
    if unfold == "slabs":
        monkeypatch.setenv("GRADVAR_EXT_CONV_SLABS", "2")
    elif unfold:
        monkeypatch.setenv("GRADVAR_EXT_UNFOLD", unfold)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return request.param
