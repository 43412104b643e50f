"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(params=["unfold", "grouped"])
def conv_algorithm(request, monkeypatch):
    """Forces each way the compiled kernels form per-sample conv gradients (csrc/conv2d_ops.cpp):
    unfolded patches + bmm, or one grouped convolution per chunk of samples. The grouped one runs
    the backend's convolutions, which on CUDA follow torch.backends.cudnn.allow_tf32 (default on):
    off here, so float32 is checked at float32 precision."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", request.param)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    return request.param
