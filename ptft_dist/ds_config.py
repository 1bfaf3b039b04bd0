"""The DeepSpeed JSON of a run, derived from its config sections; never written by hand.

Owned by the engine side (:mod:`ptft_dist.engine` hands it to ``deepspeed.initialize``);
torch-free, so that ``--dry-run`` prints it without importing torch.
"""

from __future__ import annotations

from typing import Any

from .config import OptimConfig, ScalingConfig, ZeroConfig, grad_accum_steps

#: Smallest ZeRO-1/2 gradient bucket on CPU (elements): hidden_size^2 buckets meant ~70 gloo
#: collectives per step for a 256-wide model; one 20 MB bucket per rank costs nothing there.
CPU_MIN_BUCKET = 5_000_000


def deepspeed_config(
    optim: OptimConfig, zero: ZeroConfig, scaling: ScalingConfig, *, on_gpu: bool, hidden_size: int | None = None
) -> dict[str, Any]:
    """The DeepSpeed JSON for these sections. The optimizer and schedule are built by the
    engine module (client AdamW with parameter groups and a LambdaLR), so they are not here.

    With ``hidden_size``, ZeRO's communication buckets are sized to the model as
    transformers' integration does ("auto"): DeepSpeed's defaults (5e8 elements) allocate a
    2 GB fp32 bucket per rank under ZeRO-3, more than a small model's whole state.
    """
    precision = zero.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"
    zero_opt: dict[str, Any] = {"stage": zero.stage}
    bucket = zero.bucket_elements or (hidden_size * hidden_size if hidden_size else None)
    if bucket and zero.stage in (1, 2) and not on_gpu and not zero.bucket_elements:
        bucket = max(bucket, CPU_MIN_BUCKET)  # fewer gloo collectives per step
    if bucket and zero.stage >= 1:
        zero_opt["reduce_bucket_size"] = bucket
    reduce_scatter = zero.reduce_scatter if zero.reduce_scatter is not None else on_gpu
    if zero.stage in (1, 2) and not reduce_scatter:
        zero_opt["reduce_scatter"] = False
    if zero.stage == 3:
        zero_opt["stage3_gather_16bit_weights_on_model_save"] = True
        if bucket:
            zero_opt["stage3_prefetch_bucket_size"] = int(0.9 * bucket)
        if hidden_size:
            zero_opt["stage3_param_persistence_threshold"] = 10 * hidden_size
    if zero.offload_optimizer:
        zero_opt["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if zero.offload_params:
        zero_opt["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    ds: dict[str, Any] = {
        "train_batch_size": optim.global_batch_size,
        "train_micro_batch_size_per_gpu": optim.micro_batch_size_per_rank,
        "gradient_accumulation_steps": grad_accum_steps(optim, scaling),
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero_opt,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if zero.offload_optimizer:
        # DeepSpeed's own CPU Adam is the optimizer that works with offload.
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": optim.betas, "weight_decay": optim.weight_decay},
        }
        ds["zero_force_ds_cpu_optimizer"] = True
    return ds
