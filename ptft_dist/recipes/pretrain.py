"""Masked-LM pretraining, read top to bottom.

Features:
    - any data-parallel world under DeepSpeed ZeRO 0-3 (CPU/gloo or GPU/NCCL)
    - BERT or ModernBERT built from config, or continued from a local HF checkpoint
    - packed shards streamed per rank; dynamic 80/10/10 masking, seeded per step and rank
    - AdamW with weight-decay exclusions, warmup + linear/cosine decay, gradient clipping
    - held-out MLM loss, masked-token accuracy and perplexity on fixed samples and masks
    - checkpoints with every rank's ZeRO shard and data position, handed to ``on_checkpoint``
    - an HF export (config, safetensors, tokenizer) gathered from every ZeRO stage

The launcher (Ray, or a plain process group) builds the World and calls :func:`run` on every
rank; this file imports no Ray.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import checkpoint, models
from .. import engine as engine_lib
from ..config import PretrainConfig, batch_arithmetic, dump_yaml, grad_accum_steps
from ..data.build import DataError, check_tokenizer, load_tokenizer, read_manifest, tokenizer_dir
from ..data.stream import ShardStream, advance, mask_tokens, new_position, read_all
from ..progress import heartbeat
from ..tracking import Tracker, write_summary
from ..world import World, all_reduce_max, all_reduce_sum, barrier

log = logging.getLogger(__name__)

OnCheckpoint = Callable[[str, dict], None]


MAX_CONSECUTIVE_SKIPS = 10  # on_nonfinite_loss: skip gives up after this many bad steps in a row
STOP_FILE = "STOP"  # its presence in the run dir asks the workers to checkpoint and stop


def _collate(items):
    slots, epochs, keys, ids = zip(*items)
    return slots[0], list(epochs), list(keys), torch.from_numpy(np.stack(ids).astype("int64"))


def _mlm_logits_and_labels(out_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels at masked positions, for dense heads ([B, T, V]) and masked-only
    heads (ModernBERT's sparse prediction returns [num_masked, V])."""
    flat = labels.reshape(-1)
    picked = flat[flat != -100]
    if out_logits.dim() == 2:
        return out_logits, picked
    return out_logits.reshape(-1, out_logits.size(-1))[flat != -100], picked


@torch.no_grad()
def evaluate(
    engine, eval_inputs: torch.Tensor, eval_labels: torch.Tensor, micro_batch: int, world: World
) -> dict[str, float]:
    """Held-out MLM loss, masked-token accuracy and perplexity. Collective: every rank runs
    the same number of forwards (ZeRO-3 forwards gather parameters from all ranks)."""
    engine.module.eval()
    num_batches = math.ceil(len(eval_inputs) / micro_batch)
    rounds = math.ceil(num_batches / world.world_size)
    loss_sum = correct = count = 0.0
    for r in range(rounds):
        b = r * world.world_size + world.rank
        real = b < num_batches
        sl = slice(b * micro_batch, (b + 1) * micro_batch) if real else slice(0, micro_batch)
        out = engine(input_ids=eval_inputs[sl].to(engine.device), labels=eval_labels[sl].to(engine.device))
        if not real:
            continue  # this rank only took part in the collective forward
        logits, target = _mlm_logits_and_labels(out.logits.float(), eval_labels[sl].to(engine.device))
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count])
    engine.module.train()
    loss = loss_sum / max(count, 1)
    return {
        "eval_mlm_loss": loss,
        "eval_mlm_accuracy": correct / max(count, 1),
        "eval_perplexity": math.exp(min(loss, 50.0)),
    }


def run(
    cfg: PretrainConfig, world: World, *, resume_dir: str | None = None, on_checkpoint: OnCheckpoint | None = None
) -> dict | None:
    """Pretrain on every rank; returns the summary on rank 0 (None elsewhere).

    ``on_checkpoint(directory, metrics)`` is called on every rank after each rank saved its
    part of a checkpoint into ``directory`` (under Ray it calls ``ray.train.report``).
    """
    # 1. validate (a resumed run must match its checkpoint) and set up the process group
    cfg.check()
    if resume_dir:
        checkpoint.check_compatible(resume_dir, _plain(cfg), world.world_size)
    engine_lib.init_distributed(world, cfg.scaling)
    torch.manual_seed(cfg.optim.seed)
    run_dir = Path(cfg.run_dir)
    dataset_dir = cfg.data.dataset_dir
    if not dataset_dir:
        raise DataError("pretrain.data.dataset_dir is not set: build a dataset with `ptft data build` first")
    manifest = read_manifest(dataset_dir)
    # the shards' tokenizer must be the model's (and match the manifest's hash)
    check_tokenizer(dataset_dir, cfg.model.init_from or tokenizer_dir(dataset_dir, manifest), what="model.init_from")
    tokenizer = load_tokenizer(tokenizer_dir(dataset_dir, manifest))
    seq_len = manifest["seq_len"]
    special = manifest["tokenizer"]["special_ids"]
    accum = grad_accum_steps(cfg.optim, cfg.scaling)

    # 2. tracker (rank 0 writes)
    # a resumed run continues its W&B run (rank 0 stored the id in the checkpoint)
    saved = checkpoint.read_state(resume_dir) if resume_dir else {}
    tracker = Tracker(
        run_dir, cfg.tracking, world, config=_plain(cfg), job_type="pretrain", resume_id=saved.get("wandb_run_id")
    )
    heartbeat(run_dir, world.rank, saved.get("step", 0), "setup")
    try:
        # 3. model and engine
        hf_config = models.mlm_config(cfg.model, vocab_size=manifest["vocab_size"], special_ids=special)
        ds = engine_lib.ds_config(cfg.optim, cfg.zero, cfg.scaling, hidden_size=hf_config.hidden_size)
        if hf_config.vocab_size < manifest["vocab_size"]:
            raise DataError(
                f"model vocab_size {hf_config.vocab_size} < dataset vocab_size {manifest['vocab_size']} ({dataset_dir})"
            )
        if seq_len > hf_config.max_position_embeddings:
            raise DataError(
                f"dataset seq_len {seq_len} > model.max_position_embeddings {hf_config.max_position_embeddings}"
            )
        with engine_lib.model_init_context(ds):
            model = models.build_mlm(cfg.model, hf_config)
        clock = {"progress": 0.0}  # share of time_budget_s spent, shared by rank 0 every step
        engine = engine_lib.initialize(model, cfg.optim, ds, clock if cfg.time_budget_s else None)
        if world.is_rank_zero:
            log.info(
                "%s: %s parameters; %s; ZeRO stage %d",
                type(model).__name__,
                f"{models.num_params(model):,}",
                batch_arithmetic(cfg.optim, cfg.scaling, seq_len),
                cfg.zero.stage,
            )

        # 4. resume
        step, samples_seen, prior_time = 0, 0, 0.0
        position = new_position(max(1, cfg.data.num_loader_workers), world_size=world.world_size)
        if resume_dir:
            state = checkpoint.load(engine, resume_dir, world)
            step, samples_seen, position = state["step"], state["samples_seen"], state["data_position"]
            prior_time = state.get("train_time_s", 0.0)
            if cfg.time_budget_s:
                clock["progress"] = prior_time / cfg.time_budget_s

        # 5. data: this rank's stream, and the fixed held-out set with fixed masks
        stream = ShardStream(
            dataset_dir,
            "train",
            rank=world.rank,
            world_size=world.world_size,
            seed=cfg.optim.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            position=copy.deepcopy(position),
            num_loader_workers=cfg.data.num_loader_workers,
            on_error=cfg.data.on_error,
            verify=cfg.data.verify_shards,
        )
        position = stream.state_dict()
        loader = DataLoader(
            stream,
            batch_size=cfg.optim.micro_batch_size_per_rank,
            num_workers=cfg.data.num_loader_workers,
            collate_fn=_collate,
        )
        batches = iter(loader)
        _, eval_ids = read_all(dataset_dir, "valid", limit=cfg.data.num_eval_samples)
        mask_args = dict(
            mlm_probability=cfg.data.mlm_probability,
            mask_id=special["mask"],
            vocab_size=manifest["vocab_size"],
            special_ids=[special["cls"], special["sep"], special["pad"]],
        )
        eval_inputs, eval_labels = mask_tokens(
            torch.from_numpy(eval_ids.astype("int64")),
            generator=torch.Generator().manual_seed(cfg.optim.seed + 1_000_003),
            **mask_args,
        )

        # 6. the loop
        tokens_per_step = cfg.optim.global_batch_size * seq_len
        flops_per_token = models.flops_per_token(hf_config, seq_len, cfg.data.mlm_probability)
        peak_tflops = engine_lib.peak_tflops(cfg.scaling, cfg.peak_tflops_per_rank)
        start_time = last_time = last_save = time.perf_counter()
        start_step, paused, preempted = step, False, False
        train_time = prior_time  # seconds trained, this run and the ones it resumed
        last_step, loss_acc, loss_n = step, 0.0, 0
        eval_metrics: dict[str, float] = {}
        config_yaml = dump_yaml(cfg)

        def save(tag_step: int, metrics: dict) -> None:
            train_state = {
                "step": tag_step,
                "samples_seen": samples_seen,
                "data_position": position,
                "tokenizer_sha256": manifest["tokenizer"]["sha256"],
                "wandb_run_id": tracker.run_id,
                "train_time_s": train_time,
                "nonfinite_skipped_steps": skipped_steps,
            }
            if on_checkpoint is None:
                checkpoint.save(
                    engine, run_dir / "checkpoints" / f"step_{tag_step:08d}", world, train_state, config_yaml
                )
                return
            with tempfile.TemporaryDirectory(prefix="ptft-ckpt-") as tmp:
                checkpoint.save(engine, tmp, world, train_state, config_yaml)
                barrier()
                on_checkpoint(tmp, metrics)

        # on_nonfinite_loss: skip zeroes the gradients of a bad micro batch as they are made
        skip_nonfinite = cfg.on_nonfinite_loss == "skip"
        sanitize = {"on": False}
        skipped_steps, consecutive_skips = (state.get("nonfinite_skipped_steps", 0) if resume_dir else 0), 0
        if skip_nonfinite:
            for p in engine.module.parameters():
                if p.requires_grad:
                    p.register_hook(
                        lambda g: torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0) if sanitize["on"] else g
                    )
        ledger = None
        if cfg.data.ledger:
            (run_dir / "ledger").mkdir(parents=True, exist_ok=True)
            ledger = open(run_dir / "ledger" / f"rank{world.rank}.jsonl", "a", buffering=1)
        while step < cfg.optim.max_steps:
            step_keys: list[str] = []
            nonfinite = False
            for micro in range(accum):
                slot, epochs, _keys, ids = next(batches)
                advance(position, slot, epochs)
                step_keys += _keys
                # The mask of a micro batch depends only on (seed, rank, step, micro index):
                # a resumed run draws the same masks without saving generator state.
                gen = torch.Generator().manual_seed(
                    ((cfg.optim.seed * 1_000_003 + world.rank) * 1_000_003 + step) * 64 + micro
                )
                inputs, labels = mask_tokens(ids, generator=gen, **mask_args)
                out = engine(input_ids=inputs.to(engine.device), labels=labels.to(engine.device))
                loss = out.loss
                if step + 1 in cfg.inject_nonfinite_at_steps and world.is_rank_zero and micro == 0:
                    loss = loss * float("nan")  # fault simulation (tests, drills)
                loss_value = loss.item()
                bad = not math.isfinite(loss_value)
                if skip_nonfinite:
                    # every rank learns before its backward whether any rank's loss is bad
                    bad = all_reduce_sum([float(bad)])[0] > 0
                    sanitize["on"] = bad
                engine.backward(loss)
                sanitize["on"] = False
                nonfinite = nonfinite or bad
                if skip_nonfinite and nonfinite and micro == accum - 1:
                    # skip the update: the bad gradients were zeroed, and lr 0 keeps AdamW
                    # (and its weight decay) from moving any weight; the scheduler sets the
                    # lr of the next step again
                    for group in engine.optimizer.param_groups:
                        group["lr"] = 0.0
                engine.step()
                if not bad:
                    loss_acc += loss_value
                    loss_n += 1
            step += 1
            samples_seen += cfg.optim.global_batch_size
            if ledger is not None:
                ledger.write(json.dumps({"step": step, "keys": step_keys}) + "\n")
            heartbeat(run_dir, world.rank, step)
            # Clock-based decisions are rank 0's, shared in one small all-reduce so that every
            # rank stops and saves at the same step.
            now = time.perf_counter()
            elapsed = prior_time + now - start_time
            out_of_time = cfg.time_budget_s is not None and elapsed > cfg.time_budget_s
            save_due = cfg.checkpoint.every_minutes > 0 and now - last_save > 60 * cfg.checkpoint.every_minutes
            preempted = (run_dir / STOP_FILE).exists()
            zero = world.is_rank_zero
            flags = all_reduce_sum(
                [
                    float(out_of_time and zero),
                    float(save_due and zero),
                    float(preempted and zero),
                    float(nonfinite),
                    elapsed * zero,
                ]
            )
            out_of_time, save_due, preempted, train_time = flags[0] > 0, flags[1] > 0, flags[2] > 0, flags[4]
            if cfg.time_budget_s:
                clock["progress"] = min(1.0, train_time / cfg.time_budget_s)
            consecutive_skips = consecutive_skips + 1 if flags[3] > 0 else 0
            if flags[3] > 0 and skip_nonfinite:
                skipped_steps += 1
                if world.is_rank_zero:
                    log.warning(
                        "step %d: the training loss is not finite (NaN or inf); the step's update is skipped (%d "
                        "skipped so far)",
                        step,
                        skipped_steps,
                    )
                if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                    raise FloatingPointError(
                        f"step {step}: the training loss was not finite for {consecutive_skips} steps in a row "
                        f"(on_nonfinite_loss: skip gives up after {MAX_CONSECUTIVE_SKIPS}); lower optim.lr or check "
                        "the data"
                    )
            elif flags[3] > 0:  # every rank sees it at the same step and stops
                raise FloatingPointError(
                    f"step {step}: the training loss is not finite on {int(flags[3])} of {world.world_size} ranks "
                    "(NaN or inf); lower optim.lr or check the data"
                )
            # stop_at_step pauses a run that started before it; the resumed run goes on
            paused = (cfg.stop_at_step is not None and start_step < cfg.stop_at_step <= step < cfg.optim.max_steps) or (
                preempted and step < cfg.optim.max_steps
            )
            last = step == cfg.optim.max_steps or out_of_time or paused

            if step % cfg.tracking.log_every_steps == 0 or last:
                now = time.perf_counter()
                mean_loss = all_reduce_sum([loss_acc, loss_n])
                grad_norm = engine.get_global_grad_norm()
                tokens_per_s = tokens_per_step * (step - last_step) / (now - last_time)
                metrics = {
                    "train_loss": mean_loss[0] / max(mean_loss[1], 1),
                    "lr": engine.get_lr()[0],
                    "grad_norm": float(grad_norm) if grad_norm is not None else None,
                    "tokens_per_s": tokens_per_s,
                    "samples_per_s": cfg.optim.global_batch_size * (step - last_step) / (now - last_time),
                    "step_time_s": (now - last_time) / (step - last_step),
                    "tokens_seen": samples_seen * seq_len,
                    "epoch": max(e for e, _ in position["slots"]),
                    "peak_memory_mb": all_reduce_max([engine_lib.peak_memory_mb(cfg.scaling)])[0],
                    "data_skipped_samples": all_reduce_sum([stream.num_skipped_samples])[0],
                    "nonfinite_skipped_steps": skipped_steps,
                    "train_time_s": train_time,
                }
                if peak_tflops:
                    metrics["mfu"] = tokens_per_s * flops_per_token / (peak_tflops * 1e12 * world.world_size)
                eta = (cfg.optim.max_steps - step) * metrics["step_time_s"]
                if cfg.time_budget_s:
                    eta = min(eta, max(0.0, cfg.time_budget_s - train_time))
                metrics["eta_s"] = eta
                tracker.log(metrics, step)
                if world.is_rank_zero:
                    log.info(
                        "step %d/%d | loss %.3f | lr %.2e | %.0f tok/s | ETA %.0fs",
                        step,
                        cfg.optim.max_steps,
                        metrics["train_loss"],
                        metrics["lr"],
                        metrics["tokens_per_s"],
                        eta,
                    )
                last_step, last_time, loss_acc, loss_n = step, now, 0.0, 0

            if step % cfg.eval_every_steps == 0 or last:
                heartbeat(run_dir, world.rank, step, "eval")
                eval_metrics = evaluate(engine, eval_inputs, eval_labels, cfg.optim.micro_batch_size_per_rank, world)
                tracker.log(dict(eval_metrics, train_time_s=train_time), step)
                if world.is_rank_zero:
                    log.info(
                        "step %d eval | mlm loss %.3f | masked-token accuracy %.3f",
                        step,
                        eval_metrics["eval_mlm_loss"],
                        eval_metrics["eval_mlm_accuracy"],
                    )

            if (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or save_due or last:
                if world.is_rank_zero and not last:
                    log.info("step %d: writing a checkpoint", step)
                heartbeat(run_dir, world.rank, step, "checkpoint")
                save(step, {"step": step, **eval_metrics})
                last_save = time.perf_counter()
            if out_of_time or paused:
                break

        train_time_s = time.perf_counter() - start_time
        skipped = all_reduce_sum([stream.num_skipped_samples])[0]  # collective: before any rank returns
        if not eval_metrics:  # resumed a finished run: measure the model as it is
            eval_metrics = evaluate(engine, eval_inputs, eval_labels, cfg.optim.micro_batch_size_per_rank, world)
        if ledger is not None:
            ledger.close()
        if paused:
            if world.is_rank_zero:
                why = "preemption (SIGTERM)" if preempted else "stop_at_step"
                log.info(
                    "stopped at step %d of %d (%s); run again with the same run dir to resume",
                    step,
                    cfg.optim.max_steps,
                    why,
                )
                write_summary(
                    run_dir,
                    dict(eval_metrics, steps=step, completed=False, preempted=bool(preempted)),
                    {"checkpoints": str((run_dir / "ray").resolve())},
                )
            return None

        # 7. export the consolidated weights
        heartbeat(run_dir, world.rank, step, "export")
        state_dict = engine_lib.full_state_dict(engine)
        export_dir = run_dir / "export"
        if world.is_rank_zero:
            models.save_hf(engine.module, state_dict, tokenizer, export_dir)
        barrier()
        if not world.is_rank_zero:
            return None
        summary_metrics = dict(
            eval_metrics,
            data_skipped_samples=skipped,
            nonfinite_skipped_steps=skipped_steps,
            steps=step,
            completed=True,
            tokens_seen=samples_seen * seq_len,
            train_time_s=train_time_s,
            parameters=models.num_params(model),
        )
        write_summary(
            run_dir,
            summary_metrics,
            {"hf_model": str(export_dir.resolve()), "dataset": str(Path(dataset_dir).resolve())},
        )
        return {"metrics": summary_metrics, "artifacts": {"hf_model": str(export_dir.resolve())}}
    finally:
        tracker.close()


def _plain(cfg) -> dict:
    from ..config import to_dict

    return to_dict(cfg)
