"""DeepSpeed: the engine around a model, its optimizer and schedule, and gathering the full
weights for export. The only module (with checkpoint.py) that imports deepspeed.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

import torch

from .config import OptimConfig, ScalingConfig, ZeroConfig
from .ds_config import deepspeed_config
from .world import World, direct_all_gather

log = logging.getLogger(__name__)


def on_gpu(scaling: ScalingConfig) -> bool:
    return scaling.use_gpu and torch.cuda.is_available()


def init_distributed(world: World, scaling: ScalingConfig, zero: ZeroConfig | None = None) -> None:
    """Wrap the launcher's process group (Ray and torchrun set it up) for DeepSpeed, with the
    all-gather ``zero.direct_all_gather`` asks for (None: its default)."""
    if not on_gpu(scaling):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # One thread per reserved CPU: two ranks on two cores must not oversubscribe.
        torch.set_num_threads(max(1, int(scaling.cpus_per_worker)))
    import deepspeed

    backend = "nccl" if on_gpu(scaling) else "gloo"
    if world.world_size == 1 and not torch.distributed.is_initialized():
        # one process without a launcher (tests, notebooks): a process group of one, in memory
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        for name in ("RANK", "LOCAL_RANK"):  # what a launcher would have set; DeepSpeed reads them
            os.environ.setdefault(name, "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        # DeepSpeed keeps its wrapper of an earlier group and a clone of its world (destroyed
        # since, in a notebook or a test) and would use them: let it wrap this new group
        import deepspeed.comm.comm as ds_comm
        import deepspeed.utils.groups as ds_groups

        ds_comm.cdb = None
        ds_groups._WORLD_GROUP = None
        ds_groups._ZERO_PARAM_INTRA_PARALLEL_GROUP = None
    with _no_cpu_shm_workspace():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    if not on_gpu(scaling):
        # DeepSpeed's CPU accelerator counts its "devices" from LOCAL_SIZE (its own launcher's
        # name for the ranks on this node) and otherwise runs `numactl` in a subprocess, on
        # every ZeRO-3 gradient bucket: give it the number torchrun and Ray Train set.
        os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1"))
    choice = zero.direct_all_gather if zero is not None else None
    use_direct_all_gather(not on_gpu(scaling) if choice is None else choice)


def use_direct_all_gather(enabled: bool) -> None:
    """Route DeepSpeed's blocking all-gathers into one tensor (ZeRO-1/2 gather the updated
    parameter partitions with one after every step) through :func:`world.direct_all_gather`,
    or give them back to the backend. Asynchronous ones (ZeRO-3's prefetch) stay the
    backend's."""
    import deepspeed.comm.comm as ds_comm

    backend = ds_comm.cdb
    backend.__dict__.pop("all_gather_into_tensor", None)  # the class's method again
    if not enabled:
        return
    native = backend.all_gather_into_tensor

    def all_gather_into_tensor(output_tensor, input_tensor, group=None, async_op=False):
        if async_op or not (output_tensor.is_contiguous() and input_tensor.is_contiguous()):
            return native(output_tensor=output_tensor, input_tensor=input_tensor, group=group, async_op=async_op)
        direct_all_gather(output_tensor, input_tensor, group)
        return None

    backend.all_gather_into_tensor = all_gather_into_tensor


@contextlib.contextmanager
def _no_cpu_shm_workspace():
    """Hide LOCAL_SIZE while DeepSpeed sets up its communication.

    When LOCAL_SIZE equals the world size, DeepSpeed's CPU communication op creates a 64 MiB
    shared-memory segment per rank in /dev/shm (``deepspeed_allreduce_buffer_*``, for its
    inference all-reduce, which training never calls) and never unlinks it: every run would
    leave its ranks' segments behind, in memory, until the machine restarts. Without
    LOCAL_SIZE it creates none; the op decides once per process, here.
    """
    hidden = os.environ.pop("LOCAL_SIZE", None)
    try:
        yield
    finally:
        if hidden is not None:
            os.environ["LOCAL_SIZE"] = hidden


#: Dense bf16 peak TFLOP/s by GPU name fragment, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_tflops(scaling: ScalingConfig, configured: float | None) -> float | None:
    if configured:
        return configured
    if not on_gpu(scaling):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def peak_memory_mb(scaling: ScalingConfig) -> float:
    """Peak memory of this rank so far: GPU allocations on GPU, process RSS on CPU."""
    if on_gpu(scaling):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def ds_config(
    optim: OptimConfig, zero: ZeroConfig, scaling: ScalingConfig, hidden_size: int | None = None
) -> dict[str, Any]:
    return deepspeed_config(optim, zero, scaling, on_gpu=on_gpu(scaling), hidden_size=hidden_size)


@contextlib.contextmanager
def model_init_context(ds: dict[str, Any]):
    """Build the model inside this so that ZeRO-3 partitions it as it is created.

    transformers' HfDeepSpeedConfig makes ``from_config``/``from_pretrained`` use
    ``zero.Init`` correctly (a bare ``deepspeed.zero.Init()`` around BertForMaskedLM fails
    with transformers 5). For stages 0-2 this does nothing.
    """
    if ds["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    keep = HfDeepSpeedConfig(ds)  # must stay alive while the model is built
    try:
        yield
    finally:
        del keep


def lr_lambda(optim: OptimConfig, clock: dict | None = None):
    """Warmup then linear / cosine / constant decay to ``min_lr_ratio``, as a factor of lr.

    With a ``clock`` (a dict whose ``"progress"`` the training loop keeps at the share of a
    time budget spent), the decay follows whichever ends first: ``max_steps`` or the budget.
    """

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        span = max(1, optim.max_steps - optim.warmup_steps)
        progress = min(1.0, max((step - optim.warmup_steps) / span, clock["progress"] if clock else 0.0))
        decay = 1.0 - progress if optim.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * decay

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: no decay for biases, norms and other 1-D tensors."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        shape_dims = len(getattr(p, "ds_shape", p.shape))
        (no_decay if shape_dims < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw(optim: OptimConfig, scaling: ScalingConfig) -> bool:
    """Whether AdamW runs as torch's fused kernel: ``optim.fused``, by default on CPU."""
    return not on_gpu(scaling) if optim.fused is None else optim.fused


def initialize(
    model: torch.nn.Module, optim: OptimConfig, ds: dict[str, Any], clock: dict | None = None, *, fused: bool = False
):
    """The DeepSpeed engine with AdamW (weight-decay exclusions; ``fused``: torch's fused
    kernel, see :func:`fused_adamw`) and the lr schedule (``clock``: see :func:`lr_lambda`)."""
    import deepspeed

    groups = param_groups(model, optim.weight_decay)
    optimizer = None
    if "optimizer" not in ds:  # offload configs let DeepSpeed build its CPU Adam
        # fused None, not False: False with foreach unset makes torch take its slowest, per-tensor loop
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=1e-8, fused=fused or None)
    schedule = lr_lambda(optim, clock)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=ds,
        dist_init_required=False,
    )
    return engine


def full_state_dict(engine, world: World, trainable_only: bool = False) -> dict[str, torch.Tensor] | None:
    """The consolidated weights, on rank 0 (None elsewhere). Collective: every rank calls it.

    Under ZeRO-3 each parameter is gathered from its shards, so the export is never empty.
    """
    import deepspeed

    module = engine.module
    stage = engine.zero_optimization_stage()
    rank = world.rank
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad or not trainable_only]
    if stage == 3:
        out = {}
        for name, p in named:
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if rank == 0:
                    out[name] = p.detach().clone().float()
        if rank != 0:
            return None
        if not trainable_only:  # persistent buffers (not partitioned)
            params = {id(p) for p in module.parameters()}
            for name, b in module.state_dict(keep_vars=True).items():
                if name not in out and id(b) not in params and b.numel() > 0:
                    out[name] = b.detach().clone()
        return out
    if rank != 0:
        return None
    if trainable_only:
        return {n: p.detach().clone().float() for n, p in named}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
