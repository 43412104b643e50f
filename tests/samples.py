"""One list of sample inputs for every op, fed to the reference, gradient and opcheck tests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

N_VALUES = (1, 2, 7, 64)
MIDDLES = ((), (3,), (2, 3))
# (in_features, out_features): ones, odd sizes, and (16, 12) where batch_l2 takes the ghost-norm path.
FEATURES = ((1, 1), (5, 3), (1, 7), (4, 1), (16, 12))
OPS = (
    "linear_second_moment",
    "linear_variance",
    "linear_moments",
    "linear_batch_l2",
    "linear_cross_moment",
    "weighted_gradient_product",
    "weighted_gradient_products",
)


def randn(shape, dtype, device, contiguous=True, requires_grad=False) -> torch.Tensor:
    """Random tensor; non-contiguous ones are every other column of a wider tensor."""
    if contiguous:
        t = torch.randn(shape, dtype=dtype, device=device)
    else:
        t = torch.randn((*shape[:-1], 2 * shape[-1]), dtype=dtype, device=device)[..., ::2]
        assert not t.is_contiguous() or shape[-1] <= 1
    return t.requires_grad_(requires_grad)


def op_args(op: str, n, middle, fin, fout, dtype, device, contiguous=True, requires_grad=False) -> tuple:
    """Arguments of `op` for a Linear layer with batch n, middle dims `middle`, fin -> fout."""

    def make(features):
        return randn((n, *middle, features), dtype, device, contiguous, requires_grad)

    x, g = make(fin), make(fout)
    if op == "linear_cross_moment":
        return x, g, make(fin), make(fout)
    if op == "weighted_gradient_product":
        weight = randn((fout, fin), dtype, device, contiguous, requires_grad)
        center = randn((fout, fin), dtype, device, contiguous, requires_grad)
        return make(fout), x, g, weight, center
    if op == "weighted_gradient_products":
        weight = randn((fout, fin), dtype, device, contiguous, requires_grad)
        center = randn((fout, fin), dtype, device, contiguous, requires_grad)
        return make(fout), make(fin), x, g, weight, center
    return x, g


@dataclass(frozen=True)
class Case:
    n: int
    middle: tuple
    fin: int
    fout: int
    contiguous: bool = True

    def __str__(self) -> str:
        mid = "x".join(map(str, self.middle)) or "none"
        return f"N{self.n}-mid{mid}-{self.fin}to{self.fout}" + ("" if self.contiguous else "-noncontig")

    def args(self, op, dtype, device="cpu", requires_grad=False) -> tuple:
        return op_args(op, self.n, self.middle, self.fin, self.fout, dtype, device, self.contiguous, requires_grad)


# Every shape combination: value tests (cheap).
ALL_CASES = [
    Case(n, m, fi, fo, c) for n, m, (fi, fo), c in itertools.product(N_VALUES, MIDDLES, FEATURES, (True, False))
]
# Small shapes for gradcheck / gradgradcheck / opcheck (cost grows with the element count).
GRAD_CASES = [
    Case(1, (), 3, 2),
    Case(3, (), 3, 2),
    Case(3, (2,), 3, 2),
    Case(2, (2, 2), 2, 3, contiguous=False),
    Case(4, (3,), 1, 1),
]
# Enough samples and features that the chunked paths run several chunks, the last one partial.
MULTI_CHUNK_CASES = [Case(150, (2,), 256, 256), Case(150, (3,), 200, 180)]
