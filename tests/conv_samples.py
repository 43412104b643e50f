"""Sample inputs for the Conv2d ops: each hyper-parameter alone and combined."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CONV_OPS = (
    "conv2d_second_moment",
    "conv2d_variance",
    "conv2d_moments",
    "conv2d_batch_l2",
    "conv2d_cross_moment",
    "conv2d_weighted_gradient_product",
    "conv2d_weighted_gradient_products",
)


@dataclass(frozen=True)
class ConvCase:
    n: int
    c_in: int
    c_out: int
    hw: tuple
    kernel: tuple = (3, 3)
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1
    contiguous: bool = True
    to_input: bool = True  # for conv2d_weighted_gradient_product

    def __str__(self) -> str:
        return (
            f"N{self.n}-c{self.c_in}to{self.c_out}-hw{self.hw[0]}x{self.hw[1]}-k{self.kernel[0]}x{self.kernel[1]}"
            f"-s{self.stride[0]}x{self.stride[1]}-p{self.padding[0]}x{self.padding[1]}"
            f"-d{self.dilation[0]}x{self.dilation[1]}-g{self.groups}" + ("" if self.contiguous else "-noncontig")
        )

    @property
    def conv(self) -> tuple:
        return (list(self.kernel), list(self.stride), list(self.padding), list(self.dilation), self.groups)

    @property
    def out_hw(self) -> tuple:
        return tuple(
            (self.hw[d] + 2 * self.padding[d] - self.dilation[d] * (self.kernel[d] - 1) - 1) // self.stride[d] + 1
            for d in range(2)
        )

    @property
    def work(self) -> tuple:
        """(samples x groups, positions, in, out) per group: the sizes of the core's outer products."""
        in_per_group = self.c_in // self.groups * self.kernel[0] * self.kernel[1]
        return (self.n * self.groups, math.prod(self.out_hw), in_per_group, self.c_out // self.groups)

    def _randn(self, shape, dtype, device, requires_grad):
        if self.contiguous:
            t = torch.randn(shape, dtype=dtype, device=device)
        else:  # channels-last memory layout
            t = torch.randn((shape[0], shape[2], shape[3], shape[1]), dtype=dtype, device=device).permute(0, 3, 1, 2)
        return t.requires_grad_(requires_grad)

    def args(self, op, dtype, device="cpu", requires_grad=False) -> tuple:
        def image():
            return self._randn((self.n, self.c_in, *self.hw), dtype, device, requires_grad)

        def grad():
            return self._randn((self.n, self.c_out, *self.out_hw), dtype, device, requires_grad)

        x, go = image(), grad()
        if op == "conv2d_cross_moment":
            return (x, go, image(), grad(), *self.conv)
        if op == "conv2d_weighted_gradient_products":
            weight = torch.randn(self.c_out, self.c_in // self.groups, *self.kernel, dtype=dtype, device=device)
            center = torch.randn_like(weight).requires_grad_(requires_grad)
            return (grad(), image(), x, go, weight.requires_grad_(requires_grad), center, *self.conv)
        if op == "conv2d_weighted_gradient_product":
            weight = torch.randn(self.c_out, self.c_in // self.groups, *self.kernel, dtype=dtype, device=device)
            left = grad() if self.to_input else image()
            center = torch.randn_like(weight).requires_grad_(requires_grad)
            return (left, x, go, weight.requires_grad_(requires_grad), *self.conv, self.to_input, center)
        return (x, go, *self.conv)


CONV_CASES = [
    ConvCase(2, 3, 4, (5, 5)),  # plain 3x3
    ConvCase(7, 2, 3, (6, 7), kernel=(1, 1)),  # 1x1 kernel: unfolding is a view
    ConvCase(1, 3, 2, (7, 6), kernel=(2, 3)),  # N = 1, non-square kernel
    ConvCase(3, 2, 2, (8, 7), stride=(2, 3)),  # stride
    ConvCase(2, 2, 3, (7, 9), kernel=(2, 2), stride=(3, 4)),  # stride > kernel
    ConvCase(3, 2, 3, (5, 6), padding=(1, 2)),  # padding
    ConvCase(3, 2, 3, (5, 6), kernel=(2, 2), padding=(4, 2)),  # padding past the kernel: rows of zeros only
    ConvCase(2, 2, 2, (9, 8), dilation=(2, 3)),  # dilation
    ConvCase(3, 4, 6, (6, 5), groups=2),  # groups
    ConvCase(3, 4, 8, (5, 5), groups=4),  # depthwise (groups = C_in), channel multiplier 2
    ConvCase(2, 3, 4, (3, 3)),  # one output position: the single-position (GEMM) path
    ConvCase(3, 4, 6, (3, 3), groups=2),  # the same per group
    ConvCase(3, 4, 6, (9, 8), kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    ConvCase(
        4, 6, 3, (7, 7), kernel=(2, 3), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=3, contiguous=False
    ),
]
# Several chunks of samples (per-sample unfolded patches + gradients exceed the chunk budget).
MULTI_CHUNK_CONV_CASES = [ConvCase(50, 64, 64, (16, 16), padding=(1, 1))]
# Small cases for gradcheck / gradgradcheck / opcheck.
CONV_GRAD_CASES = [
    ConvCase(2, 2, 2, (4, 4), kernel=(2, 2)),
    ConvCase(3, 2, 4, (5, 4), kernel=(2, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    ConvCase(2, 2, 2, (3, 3), kernel=(3, 3), contiguous=False),
    ConvCase(2, 2, 2, (4, 3), kernel=(2, 2), stride=(2, 2), padding=(1, 1), to_input=False),
]


def check_gradients_and_opcheck(op: str, case: ConvCase, device: str) -> None:
    """gradcheck + gradgradcheck in float64 over the op's tensor arguments, and opcheck."""
    torch.manual_seed(3)
    args = case.args(op, torch.float64, device=device, requires_grad=True)
    where = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]  # tensors may follow the conv
    op_fn = getattr(torch.ops.gradvar, op)

    def fn(*tensors):
        full = list(args)
        for i, t in zip(where, tensors):
            full[i] = t
        return op_fn(*full)

    tensors = tuple(args[i] for i in where)
    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)
    torch.library.opcheck(op_fn.default, args)
