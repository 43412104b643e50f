"""The front end under DistributedDataParallel: two CPU processes (gloo), each checking its own
statistics against a per-sample loop over its own samples."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_frontend import per_sample_grads  # the per-sample loop, one backward per sample
from torch import nn

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out_dir: str) -> None:
    import gradvar_ext as gv

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)  # the same initial model on every rank
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
        model = gv.extend(nn.parallel.DistributedDataParallel(net))
        g = torch.Generator().manual_seed(rank)  # each rank its own samples
        x, y = torch.randn(5, 1, 4, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (5,), generator=g)
        lossfunc = nn.CrossEntropyLoss(reduction="sum")
        params = list(net.parameters())
        per_sample = per_sample_grads(net, x, y, lossfunc)
        want = [g.var(0, unbiased=False) for g in per_sample]
        results, global_variance = [], []
        for _ in range(2):  # loss.backward (DDP all-reduces .grad), twice: the reducer's state carries over
            loss = lossfunc(model(x), y)
            with gv.collect(gv.Variance(), gv.SumGradSquared()):
                loss.backward()
            results.append([p.variance.clone() for p in params])
            # the README's recipe for all ranks' samples: summed squares all-reduced; .grad is DDP's
            # mean of the ranks' gradient sums (reduction "sum"), so their sum is .grad * WORLD
            n = 5 * WORLD
            squares = [p.sum_grad_squared.clone() for p in params]
            for s in squares:
                dist.all_reduce(s)
            global_variance.append([s / n - (p.grad * WORLD / n) ** 2 for s, p in zip(squares, params)])
            net.zero_grad(set_to_none=True)
        for _ in range(2):  # the statistics-only backward (no .grad, no all-reduce)
            with gv.collect(gv.Variance()) as stats:
                stats.backward(lossfunc(model(x), y))
            results.append([p.variance.clone() for p in params])
        lossfunc(model(x), y).backward()  # a plain DDP step still works after them
        synced = [p.grad.clone() for p in params]
        torch.save(
            {"want": want, "per_sample": per_sample, "results": results, "global": global_variance, "synced": synced},
            os.path.join(out_dir, f"{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()
    # Leave without Python's finalisation: a gloo worker thread that drops a finished all-reduce
    # just after the rank is done would take the GIL while the interpreter is finalising and abort
    # the process (std::terminate in ProcessGroupGloo::runLoop, ~1 run in 10 on 2 cores, with or
    # without gradvar_ext). The results are saved; an exception above still fails the rank.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="no gloo backend")
def test_statistics_under_ddp_are_each_ranks_own(tmp_path):
    mp.spawn(_rank, args=(_free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"{rank}.pt") for rank in range(WORLD)]
    for got in ranks:
        for results in got["results"]:
            for ours, want in zip(results, got["want"]):
                torch.testing.assert_close(ours, want, rtol=1e-9, atol=1e-12)
    # the ranks' samples differ, and so do their statistics, while DDP's .grad is the same on both
    assert not torch.allclose(ranks[0]["want"][0], ranks[1]["want"][0])
    for a, b in zip(ranks[0]["synced"], ranks[1]["synced"]):
        torch.testing.assert_close(a, b)
    # all ranks' samples: the per-sample gradients of both, and the recipe on each rank (2 steps)
    every = [torch.cat(pair) for pair in zip(*(got["per_sample"] for got in ranks))]
    want = [g.var(0, unbiased=False) for g in every]
    for got in ranks:
        for step in got["global"]:
            for ours, theirs in zip(step, want, strict=True):
                torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12)
