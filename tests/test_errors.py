"""Bad input gets a clear error that starts with the op name and names the argument,
from the compiled kernels, the reference (fallback) kernels and the fake kernels alike."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import gradvar_ext
from gradvar_ext import reference


def t(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype)


# (op, args, exception, text the message must contain)
BAD_INPUTS = [
    ("linear_variance", (t(5), t(3)), ValueError, "input must have shape [N, *, features]"),
    ("linear_variance", (t(4, 5), t(4, 2, 3)), ValueError, "grad_output must have the same number of dims as input"),
    (
        "linear_second_moment",
        (t(4, 5), t(3, 3)),
        ValueError,
        "batch size (dim 0) of grad_output (3) does not match input (4)",
    ),
    ("linear_batch_l2", (t(0, 5), t(0, 3)), ValueError, "input has an empty batch (N = 0)"),
    ("linear_variance", (t(4, 2, 5), t(4, 3, 3)), ValueError, "middle dims of grad_output"),
    (
        "linear_variance",
        (t(4, 5, dtype=torch.int64), t(4, 3, dtype=torch.int64)),
        TypeError,
        "input must be float32 or float64",
    ),
    (
        "linear_second_moment",
        (t(4, 5, dtype=torch.float16), t(4, 3, dtype=torch.float16)),
        TypeError,
        "input must be float32 or float64",
    ),
    ("linear_batch_l2", (t(4, 5), t(4, 3, dtype=torch.float64)), TypeError, "grad_output has dtype"),
    (
        "linear_cross_moment",
        (t(4, 5), t(4, 3), t(4, 6), t(4, 3)),
        ValueError,
        "other_input must have the shape of input",
    ),
    (
        "linear_cross_moment",
        (t(4, 5), t(4, 3), t(4, 5), t(4, 2)),
        ValueError,
        "other_grad_output must have the shape of grad_output",
    ),
    (
        "weighted_gradient_product",
        (t(4, 3), t(4, 5), t(4, 3), t(5, 3)),
        ValueError,
        "weight must have shape [out, in] = [3, 5]",
    ),
    (
        "weighted_gradient_product",
        (t(4, 2), t(4, 5), t(4, 3), t(3, 5)),
        ValueError,
        "left must have the shape of grad_output",
    ),
    (
        "weighted_gradient_product",
        (t(4, 3), t(4, 5), t(4, 3), t(3, 5, dtype=torch.float64)),
        TypeError,
        "weight has dtype",
    ),
    (
        "weighted_gradient_product",
        (t(4, 3), t(4, 5), t(4, 3), t(3, 5), t(5, 3)),
        ValueError,
        "center must have shape [out, in] = [3, 5], got [5, 3]",
    ),
    (
        "weighted_gradient_products",
        (t(4, 3), t(4, 5), t(4, 5), t(4, 3), t(3, 5), t(5, 3)),
        ValueError,
        "center must have shape [out, in] = [3, 5], got [5, 3]",
    ),
    (
        "weighted_gradient_products",
        (t(4, 3), t(4, 3), t(4, 5), t(4, 3), t(3, 5), None),
        ValueError,
        "left_input must have the shape of input",
    ),
]
IDS = [f"{op}-{text[:30]}" for op, _, _, text in BAD_INPUTS]


def _check(fn, op, args, exc, text):
    with pytest.raises(exc) as info:
        fn(*args)
    message = str(info.value)
    assert f"gradvar.{op}: " in message, message
    assert text in message, message


@pytest.mark.parametrize("op,args,exc,text", BAD_INPUTS, ids=IDS)
def test_registered_op_rejects(op, args, exc, text):
    _check(getattr(torch.ops.gradvar, op), op, args, exc, text)


@pytest.mark.parametrize("op,args,exc,text", BAD_INPUTS, ids=IDS)
def test_reference_rejects(op, args, exc, text):
    _check(reference.OPS[op], op, args, exc, text)


@pytest.mark.parametrize("op,args,exc,text", BAD_INPUTS, ids=IDS)
def test_fake_kernel_rejects(op, args, exc, text):
    with FakeTensorMode() as mode:
        fake_args = tuple(None if a is None else mode.from_tensor(a) for a in args)
        _check(getattr(torch.ops.gradvar, op), op, fake_args, exc, text)


def test_device_mismatch_is_named():
    with FakeTensorMode() as mode:
        x = mode.from_tensor(t(4, 5))
        g = mode.from_tensor(t(4, 3).to("meta"))
        _check(
            torch.ops.gradvar.linear_variance,
            "linear_variance",
            (x, g),
            ValueError,
            "grad_output is on meta but input is on cpu",
        )


@pytest.mark.parametrize("name", ["bias_second_moment", "bias_variance", "bias_batch_l2"])
def test_bias_functions_name_grad_output(name):
    _check(getattr(gradvar_ext, name), name, (t(5),), ValueError, "grad_output must have shape [N, *, features]")
    _check(getattr(gradvar_ext, name), name, (t(0, 5),), ValueError, "grad_output has an empty batch")
    _check(
        getattr(gradvar_ext, name),
        name,
        (t(2, 5, dtype=torch.int32),),
        TypeError,
        "grad_output must be float32 or float64",
    )
