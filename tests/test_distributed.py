"""Data-parallel training on CPU: DDP (and FSDP2 where this torch runs it) with two
processes on gloo give the gradients of one process on the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import vmamba

WORLD = 2
TINY = dict(depths=[1, 1, 1, 1], dims=8, num_classes=10, drop_path_rate=0.0)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _batch():
    torch.manual_seed(1)
    return torch.randn(2 * WORLD, 3, 32, 32), torch.randint(0, 10, (2 * WORLD,))


def _model():
    torch.manual_seed(0)
    return vmamba.VSSM(**TINY)


def _reference_grads():
    model = _model()
    x, y = _batch()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _worker(rank: int, port: int, kind: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = _model()
        if kind == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
        else:
            from torch.distributed.fsdp import fully_shard
            for layer in model.layers:   # one unit per block: VSSM calls blocks, not stages
                for block in layer.blocks:
                    fully_shard(block)
            wrapped = fully_shard(model)
        x, y = _batch()
        shard = slice(rank * 2, rank * 2 + 2)
        torch.nn.functional.cross_entropy(wrapped(x[shard]), y[shard]).backward()
        grads = {}
        for name, p in model.named_parameters():
            g = p.grad
            if kind == "fsdp":
                g = g.full_tensor()   # DTensor shard -> the whole gradient
            grads[name] = g.detach().clone()
        if rank == 0:
            torch.save(grads, out)
        dist.barrier()   # no rank tears down while another still talks to it
        del wrapped, model
    finally:
        dist.destroy_process_group()
    # Gloo's worker threads can abort the interpreter's own shutdown ("terminate called
    # without an active exception"); the work is done and saved, so leave without it.
    os._exit(0)


def _run(kind: str, tmp_path) -> dict:
    out = str(tmp_path / f"{kind}.pt")
    mp.spawn(_worker, args=(_free_port(), kind, out), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=True)


def _assert_same(grads: dict) -> None:
    reference = _reference_grads()
    assert grads.keys() == reference.keys()
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_ddp_gradients_equal_single_process(tmp_path):
    _assert_same(_run("ddp", tmp_path))


def test_fsdp2_gradients_equal_single_process(tmp_path):
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        pytest.skip("this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)")
    _assert_same(_run("fsdp", tmp_path))
