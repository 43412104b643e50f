"""gradvar_ext: statistics of per-sample gradients (second moment, variance, squared norms) of
``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` layers, computed by fused kernels without
materialising per-sample gradients, and differentiable to any order.

Importing the package registers the ``torch.ops.gradvar.*`` ops (compiled kernels, or the
pure-torch reference with a warning when they cannot be built); :func:`backend` says which.
"""

from __future__ import annotations

from . import _loader

_loader.load()

from . import reference  # noqa: E402
from ._loader import backend  # noqa: E402
from .conv_ops import (  # noqa: E402
    conv1d_batch_l2,
    conv1d_second_moment,
    conv1d_variance,
    conv2d_arguments,
    conv2d_arguments_of,
    conv2d_batch_l2,
    conv2d_bias_batch_l2,
    conv2d_bias_second_moment,
    conv2d_bias_variance,
    conv2d_moments,
    conv2d_second_moment,
    conv2d_variance,
)
from .frontend import BatchL2Grad, SumGradSquared, Variance, clear, collect, extend, unextend  # noqa: E402
from .micro_batches import total_variance  # noqa: E402
from .ops import (  # noqa: E402
    bias_batch_l2,
    bias_second_moment,
    bias_variance,
    linear_batch_l2,
    linear_cross_moment,
    linear_moments,
    linear_second_moment,
    linear_variance,
    variance_from_moments,
    weighted_gradient_product,
)

__all__ = [
    "BatchL2Grad",
    "SumGradSquared",
    "Variance",
    "backend",
    "clear",
    "collect",
    "extend",
    "unextend",
    "total_variance",
    "conv1d_batch_l2",
    "conv1d_second_moment",
    "conv1d_variance",
    "conv2d_arguments",
    "conv2d_arguments_of",
    "conv2d_batch_l2",
    "conv2d_bias_batch_l2",
    "conv2d_bias_second_moment",
    "conv2d_bias_variance",
    "conv2d_moments",
    "conv2d_second_moment",
    "conv2d_variance",
    "bias_batch_l2",
    "bias_second_moment",
    "bias_variance",
    "linear_batch_l2",
    "linear_cross_moment",
    "linear_moments",
    "linear_second_moment",
    "linear_variance",
    "reference",
    "variance_from_moments",
    "weighted_gradient_product",
]
