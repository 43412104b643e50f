"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["unfold", "grouped"])
def conv_algorithm(request, monkeypatch):
    """Forces each way the compiled kernels form per-sample conv gradients (csrc/conv2d_ops.cpp):
    unfolded patches + bmm, or one grouped convolution per chunk of samples."""
    monkeypatch.setenv("GRADVAR_EXT_CONV_ALGORITHM", request.param)
    return request.param
