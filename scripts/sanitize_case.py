"""A small run of every CUDA kernel, default and fused paths (CUDA cores, tensor cores; the fused
products with either fused moments; the fused squared norms with "1"; the unfold / fold kernels,
the default, over all rows and slabs; the sliced accumulate kernel, the default for few columns,
forced, with the shifted conv moments; the wide accumulate kernel, forced), for compute-sanitizer."""

import os

import torch

import gradvar_ext as gv

torch.manual_seed(0)
for fused in ("0", "1", "tensor_cores"):
    os.environ["GRADVAR_EXT_FUSED_CUDA"] = fused
    os.environ["GRADVAR_EXT_FUSED_BACKWARD_CUDA"] = "0" if fused == "0" else "1"  # the products' kernel
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(5, 3, 70, device="cuda", dtype=dtype, requires_grad=True)
        g = torch.randn(5, 3, 66, device="cuda", dtype=dtype, requires_grad=True)
        var = gv.linear_variance(x, g)
        total = var.sum() + gv.linear_second_moment(x, g).sum() + gv.linear_batch_l2(x, g).sum()
        total = total + gv.linear_cross_moment(x, g, x * 2, g * 3).sum()
        torch.autograd.grad(total, (x, g))
        # one position per sample (fused when forced) and direct-form squared norms (fused with "1")
        x1, g1 = torch.randn(5, 70, device="cuda", dtype=dtype), torch.randn(5, 66, device="cuda", dtype=dtype)
        gv.linear_variance(x1, g1), gv.linear_cross_moment(x1, g1, x1 * 2, g1 * 3)
        gv.linear_batch_l2(
            torch.randn(4, 40, 9, device="cuda", dtype=dtype), torch.randn(4, 40, 5, device="cuda", dtype=dtype)
        )
        # 7 samples >= 6 kernel taps: the backward folds by strided views (fewer: at::col2im)
        xc = torch.randn(7, 4, 7, 6, device="cuda", dtype=dtype, requires_grad=True)
        gc = torch.randn(7, 6, 4, 6, device="cuda", dtype=dtype, requires_grad=True)
        conv = dict(kernel_size=(2, 3), stride=(2, 1), padding=(1, 1), dilation=(1, 1), groups=2)
        total = gv.conv2d_variance(xc, gc, **conv).sum() + gv.conv2d_batch_l2(xc, gc, **conv).sum()
        torch.autograd.grad(total, (xc, gc))
        if fused == "tensor_cores":
            # 16-byte copies (rows of a multiple of 16 bytes; 70 and 66 above are element copies in
            # float32), 2 steps per sample: the 4-stage ring wraps
            gv.linear_variance(
                torch.randn(5, 20, 68, device="cuda", dtype=dtype), torch.randn(5, 20, 64, device="cuda", dtype=dtype)
            )
            # the moments reading patches in place (tile edges: 70 -> 66)
            os.environ["GRADVAR_EXT_CONV_ALGORITHM"] = "implicit"
            xi = torch.randn(3, 70, 9, 7, device="cuda", dtype=dtype)
            gi = torch.randn(3, 66, 5, 7, device="cuda", dtype=dtype)
            gv.conv2d_variance(xi, gi, kernel_size=(3, 3), stride=(2, 1), padding=(1, 1))
            del os.environ["GRADVAR_EXT_CONV_ALGORITHM"]
        if fused == "0":
            # our unfold / fold kernels (the default, forced), all rows and slabs of 2 rows, forward and backward
            os.environ["GRADVAR_EXT_UNFOLD"] = "im2col"
            for slabs in ("0", "2"):
                os.environ["GRADVAR_EXT_CONV_SLABS"] = slabs
                total = gv.conv2d_variance(xc, gc, **conv).sum() + gv.conv2d_batch_l2(xc, gc, **conv).sum()
                torch.autograd.grad(total, (xc, gc))
            del os.environ["GRADVAR_EXT_UNFOLD"], os.environ["GRADVAR_EXT_CONV_SLABS"]
            # the sliced accumulate kernel (shared memory, barriers: racecheck), with the moments by
            # shifted kernel rows over both unfoldings (stride_h 2: phase-major rows); a cross moment
            os.environ["GRADVAR_EXT_ACCUMULATE"] = "sliced"
            os.environ["GRADVAR_EXT_CONV_ALGORITHM"] = "shifted"
            shifted = dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1), groups=2)
            xs = torch.randn(7, 4, 9, 8, device="cuda", dtype=dtype, requires_grad=True)
            gs = torch.randn(7, 6, 7, 4, device="cuda", dtype=dtype, requires_grad=True)
            for unfold in ("strided", "im2col"):  # the variance's backward: the shifted products
                os.environ["GRADVAR_EXT_UNFOLD"] = unfold
                torch.autograd.grad(gv.conv2d_variance(xs, gs, **shifted).sum(), (xs, gs))
                torch.ops.gradvar.conv2d_cross_moment(xs, gs, xs * 2, gs * 3, *shifted.values())
            gs2 = gs[:, :, :4].detach().requires_grad_()
            torch.autograd.grad(gv.conv2d_variance(xs, gs2, **{**shifted, "stride": (2, 2)}).sum(), (xs, gs2))
            gv.linear_variance(
                torch.randn(9, 3, 70, device="cuda", dtype=dtype), torch.randn(9, 3, 33, device="cuda", dtype=dtype)
            )
            del os.environ["GRADVAR_EXT_ACCUMULATE"], os.environ["GRADVAR_EXT_CONV_ALGORITHM"]
            del os.environ["GRADVAR_EXT_UNFOLD"]
            # the wide accumulate kernel (16-byte loads): whole packs, g once (the variance) and
            # both read (a cross moment); 33 columns a row of 2: no whole packs in float32
            os.environ["GRADVAR_EXT_ACCUMULATE"] = "wide"
            xw = torch.randn(9, 3, 36, device="cuda", dtype=dtype)
            for gw in (
                torch.randn(9, 3, 40, device="cuda", dtype=dtype),
                torch.randn(9, 3, 33, device="cuda", dtype=dtype),
            ):
                gv.linear_variance(xw, gw), gv.linear_cross_moment(xw, gw, xw * 2, gw * 3)
            del os.environ["GRADVAR_EXT_ACCUMULATE"]
torch.cuda.synchronize()
print("sanitize case done")
