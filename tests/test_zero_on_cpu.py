"""What ptft changes in DeepSpeed's CPU path, on real gloo process groups (3 spawned ranks, as
torchrun starts them): the direct all-gather (world.direct_all_gather) and fused AdamW."""

import os
import socket

import pytest
import torch
import torch.distributed as dist

from ptft_dist import config as C
from ptft_dist import engine
from ptft_dist.world import World, direct_all_gather

WORLD = 3


def _gathers_like_gloo(rank: int) -> None:
    """Every dtype and group: the same output as gloo's own all-gather."""
    for group in (None, dist.new_group([0, 2])):
        members = dist.get_process_group_ranks(group or dist.group.WORLD)
        if rank not in members:
            continue
        for dtype in (torch.float32, torch.int64):
            mine = (torch.arange(5) + 100 * rank).to(dtype)
            direct, gloo = torch.full((5 * len(members),), -1, dtype=dtype), torch.empty(5 * len(members), dtype=dtype)
            direct_all_gather(direct, mine, group)
            dist.all_gather_into_tensor(gloo, mine, group=group)
            assert torch.equal(direct, gloo), (members, dtype, direct, gloo)
    with pytest.raises(ValueError, match=r"must hold 3 inputs \(5 x torch.float32\)"):
        direct_all_gather(torch.empty(14), torch.zeros(5))  # checked before anything is sent


def _zero2_weights(direct: bool, fused: bool = False) -> list[torch.Tensor]:
    """Three ZeRO-2 steps of a small model from a fixed start, with the all-gather and AdamW
    chosen."""
    import deepspeed.comm.comm as ds_comm

    engine.use_direct_all_gather(direct)
    assert ("all_gather_into_tensor" in vars(ds_comm.cdb)) == direct  # routed as asked
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    optim = C.OptimConfig(global_batch_size=6, micro_batch_size_per_rank=2, lr=1e-2, warmup_steps=0)
    ds = engine.ds_config(optim, C.ZeroConfig(stage=2, bucket_elements=1024), C.ScalingConfig(num_workers=WORLD))
    eng = engine.initialize(model, optim, ds, fused=fused)
    assert eng.optimizer.optimizer.defaults["fused"] is (fused or None)
    for step in range(3):
        torch.manual_seed(10 * step + dist.get_rank())
        x = torch.randn(2, 16)
        eng.backward(eng(x).pow(2).mean())
        eng.step()
    return [p.detach().clone() for p in eng.module.parameters()]


def _worker(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    _gathers_like_gloo(rank)
    import deepspeed.comm.comm as ds_comm

    world, scaling = World(rank=rank, local_rank=rank, world_size=WORLD), C.ScalingConfig(num_workers=WORLD)
    engine.init_distributed(world, scaling, C.ZeroConfig(direct_all_gather=False))
    assert "all_gather_into_tensor" not in vars(ds_comm.cdb)
    engine.init_distributed(world, scaling)  # the default on CPU: direct
    assert "all_gather_into_tensor" in vars(ds_comm.cdb)
    backend, direct = _zero2_weights(direct=False), _zero2_weights(direct=True)
    assert all(torch.equal(a, b) for a, b in zip(backend, direct)), (
        "ZeRO-2 trained differently with the direct all-gather"
    )
    fused = _zero2_weights(direct=True, fused=True)  # the same update, in another order of float operations
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(direct, fused)), "fused AdamW moved apart"
    assert not all(torch.equal(a, b) for a, b in zip(direct, fused)), "fused AdamW did not run"
    dist.destroy_process_group()


def test_direct_all_gather_matches_gloo_is_the_cpu_default_and_trains_zero2_the_same_as_fused_adamw():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_worker, args=(port,), nprocs=WORLD)


def test_fused_adamw_is_the_default_on_cpu():
    optim = C.OptimConfig()
    assert engine.fused_adamw(optim, C.ScalingConfig()) is True
    assert engine.fused_adamw(C.OptimConfig(fused=False), C.ScalingConfig()) is False
    assert (
        engine.fused_adamw(optim, C.ScalingConfig(use_gpu=True)) is not torch.cuda.is_available()
    )  # GPU: torch default
