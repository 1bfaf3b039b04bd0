"""Masked-LM pretraining, read top to bottom.

Features:
    - any data-parallel world under DeepSpeed ZeRO 0-3 (CPU/gloo or GPU/NCCL)
    - BERT or ModernBERT built from config, or continued from a local HF checkpoint
    - packed shards streamed per rank; dynamic 80/10/10 masking, seeded per step and rank
    - AdamW with weight-decay exclusions, warmup + linear/cosine decay, gradient clipping
    - held-out MLM loss, masked-token accuracy and perplexity on fixed samples and masks
    - checkpoints with every rank's ZeRO shard and data position, handed to ``on_checkpoint``
    - a NaN/inf loss stops the run, or (``on_nonfinite_loss: skip``) drops that step's update
    - an HF export (config, safetensors, tokenizer) gathered from every ZeRO stage

One batch, from shard to optimizer step: ``ShardStream`` (a DataLoader worker reads the
samples) -> ``data.stream.collate`` (a :class:`~ptft_dist.data.stream.Batch`) ->
:func:`train_step`: ``stream.advance`` (the read position moves past it),
``Masker.train`` (this step's mask), ``engine`` forward, :meth:`NonfiniteGuard.check`,
``engine.backward``, ``engine.step`` (the optimizer steps at the last micro batch).

The launcher (Ray, or a plain process group) builds the World and calls :func:`run` on every
rank; this file imports no Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import checkpoint, models, preflight
from .. import engine as engine_lib
from ..checkpoint import TrainState
from ..config import (
    PretrainConfig,
    at_world_size,
    batch_arithmetic,
    dump_yaml,
    eval_due,
    grad_accum_steps,
    max_steps_for,
    to_dict,
)
from ..data.build import load_tokenizer, tokenizer_dir
from ..data.mlm import Masker
from ..data.stream import ShardStream, collate, new_position, read_all
from ..ledger import Ledger
from ..progress import STOP_FILE, heartbeat
from ..tracking import Tracker, write_summary
from ..world import World, all_reduce_max, all_reduce_sum, barrier, collective_batches

log = logging.getLogger(__name__)

OnCheckpoint = Callable[[str, dict], None]

MAX_CONSECUTIVE_SKIPS = 10  # on_nonfinite_loss: skip gives up after this many bad steps in a row


# --------------------------------------------------------------------------- parts of a step


class NonfiniteGuard:
    """What happens when a training loss is NaN or infinite, in one place.

    ``raise`` (default): the step's verdict is shared, and every rank raises at the same step.
    ``skip``: (1) every rank learns before its backward whether any rank's loss is bad (one
    small all-reduce per micro batch), (2) gradient hooks zero the bad micro batch's
    gradients as they are made, (3) the step runs with lr 0, so that no weight moves, not
    even through AdamW's weight decay (the scheduler sets the next step's lr again).
    """

    def __init__(self, mode: str, engine, world: World, skipped_steps: int = 0):
        self.skip = mode == "skip"
        self.world = world
        self.skipped_steps = skipped_steps
        self.consecutive = 0
        self._zeroing = False
        if self.skip:
            for p in engine.module.parameters():
                if p.requires_grad:
                    p.register_hook(self._sanitize)

    def _sanitize(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0) if self._zeroing else grad

    def check(self, loss_value: float) -> bool:
        """Whether this micro batch is bad (on any rank, in skip mode: collective then)."""
        bad = not math.isfinite(loss_value)
        if self.skip:
            bad = all_reduce_sum([float(bad)])[0] > 0
            self._zeroing = bad
        return bad

    @contextlib.contextmanager
    def backward(self):
        """Around ``engine.backward``: the hooks zero gradients only inside."""
        try:
            yield
        finally:
            self._zeroing = False

    def hold_update(self, engine) -> None:
        """Before the optimizer step of a bad step (skip mode): lr 0 on every group."""
        if self.skip:
            for group in engine.optimizer.param_groups:
                group["lr"] = 0.0

    def end_step(self, step: int, num_bad_ranks: int) -> None:
        """After the step's shared verdict: count a skipped step, or raise."""
        if num_bad_ranks == 0:
            self.consecutive = 0
            return
        if not self.skip:  # every rank sees it at the same step and stops
            raise FloatingPointError(
                f"step {step}: the training loss is not finite on {num_bad_ranks} of {self.world.world_size} ranks "
                "(NaN or inf); lower optim.lr or check the data"
            )
        self.skipped_steps += 1
        self.consecutive += 1
        if self.world.is_rank_zero:
            log.warning(
                "step %d: the training loss is not finite (NaN or inf); the step's update is skipped (%d skipped so "
                "far)",
                step,
                self.skipped_steps,
            )
        if self.consecutive >= MAX_CONSECUTIVE_SKIPS:
            raise FloatingPointError(
                f"step {step}: the training loss was not finite for {self.consecutive} steps in a row "
                f"(on_nonfinite_loss: skip gives up after {MAX_CONSECUTIVE_SKIPS}); lower optim.lr or check the data"
            )


@dataclass(frozen=True)
class StepVerdict:
    """What every rank agrees on after a step: one all-reduce of rank 0's clock decisions and
    every rank's non-finite flag, so that all ranks stop, save and skip at the same step."""

    out_of_time: bool
    save_due: bool
    preempted: bool
    num_nonfinite_ranks: int
    train_time_s: float

    @classmethod
    def agree(
        cls, world: World, *, out_of_time: bool, save_due: bool, preempted: bool, nonfinite: bool, train_time_s: float
    ) -> StepVerdict:
        """Collective: every rank calls it once per step."""
        zero = world.is_rank_zero
        flags = all_reduce_sum(
            [float(out_of_time and zero), float(save_due and zero), float(preempted and zero), float(nonfinite)]
            + [train_time_s * zero]
        )
        return cls(flags[0] > 0, flags[1] > 0, flags[2] > 0, int(flags[3]), flags[4])


@dataclass
class StepResult:
    """One optimizer step on this rank: its samples, and the loss of its good micro batches."""

    keys: list[str]
    loss_sum: float
    num_good_micro_batches: int
    """Micro batches whose loss counts: none in a step whose update was skipped."""
    nonfinite: bool
    lr: float
    """The lr the optimizer step used (0 for a skipped step)."""


@dataclass
class LogWindow:
    """Train metrics since the last logged step."""

    start_step: int
    start_time: float
    loss_sum: float = 0.0
    num_micro_batches: int = 0
    num_skipped_steps: int = 0
    lr: float = 0.0

    def add(self, result: StepResult, skipped: bool) -> None:
        self.loss_sum += result.loss_sum
        self.num_micro_batches += result.num_good_micro_batches
        self.num_skipped_steps += skipped
        self.lr = result.lr


@dataclass
class Setup:
    """What :func:`setup` builds for the loop."""

    cfg: PretrainConfig
    world: World
    run_dir: Path
    manifest: dict
    tokenizer: Any
    hf_config: Any
    model: torch.nn.Module
    engine: Any
    clock: dict
    tracker: Tracker
    stream: ShardStream
    batches: Any
    masker: Masker
    eval_inputs: torch.Tensor
    eval_labels: torch.Tensor
    accum: int
    config_yaml: str
    ledger: Any = None
    on_checkpoint: OnCheckpoint | None = None
    flops_per_token: float = 0.0
    peak_tflops: float | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def seq_len(self) -> int:
        return self.manifest["seq_len"]


# --------------------------------------------------------------------------- setup


def setup(cfg: PretrainConfig, world: World, resume_dir: str | None, on_checkpoint: OnCheckpoint | None):
    """Model, engine, data and tracker, resumed from ``resume_dir`` when given.

    Returns ``(setup, state, guard)``."""
    # this worker group's size: an elastic restart or a manual resize has another one
    cfg = dataclasses.replace(cfg, scaling=at_world_size(cfg.scaling, world.world_size))
    dataset_dir = cfg.data.dataset_dir
    # the manifest, the shards' tokenizer (the model's, matching its hash) and the model's fit
    manifest = preflight.check_dataset(dataset_dir, cfg.model, on_error=cfg.data.on_error)
    # a run sized by optim.max_epochs or max_tokens, said in steps
    train_samples = manifest["splits"]["train"]["num_samples"]
    cfg = preflight.with_steps(cfg, max_steps_for(cfg.optim, train_samples, manifest["seq_len"]))
    tokenizer = load_tokenizer(tokenizer_dir(dataset_dir, manifest))
    run_dir = Path(cfg.run_dir)

    # a resumed run continues its W&B run (rank 0 stored the id in the checkpoint)
    saved = TrainState.read(resume_dir) if resume_dir else TrainState()
    tracker = Tracker(
        run_dir, cfg.tracking, world, config=to_dict(cfg), job_type="pretrain", resume_id=saved.wandb_run_id
    )
    heartbeat(run_dir, world.rank, saved.step, "setup")
    try:
        hf_config = models.mlm_config(
            cfg.model, vocab_size=manifest["vocab_size"], special_ids=manifest["tokenizer"]["special_ids"]
        )
        ds = engine_lib.ds_config(cfg.optim, cfg.zero, cfg.scaling, hidden_size=hf_config.hidden_size)
        ds = checkpoint.ds_config_for_resume(ds, resume_dir, world.world_size)
        with engine_lib.model_init_context(ds):
            model = models.build_mlm(cfg.model, hf_config)
        clock = {"progress": 0.0}  # share of time_budget_s spent, shared by rank 0 every step
        engine = engine_lib.initialize(
            model,
            cfg.optim,
            ds,
            clock if cfg.time_budget_s else None,
            fused=engine_lib.fused_adamw(cfg.optim, cfg.scaling),
        )
        if world.is_rank_zero:
            log.info(
                "%s: %s parameters; %s; ZeRO stage %d",
                type(model).__name__,
                f"{models.num_params(model):,}",
                batch_arithmetic(cfg.optim, cfg.scaling, manifest["seq_len"]),
                cfg.zero.stage,
            )

        state = TrainState(tokenizer_sha256=manifest["tokenizer"]["sha256"], wandb_run_id=tracker.run_id)
        if resume_dir:
            old_world = checkpoint.written_by(resume_dir)
            started = time.perf_counter()
            state = checkpoint.load(engine, resume_dir, world)
            # how long the resume took, and from which world size (a row of its own in metrics.jsonl)
            tracker.log(
                {
                    "checkpoint_load_s": time.perf_counter() - started,
                    "resumed_from_world_size": old_world,
                    "world_size": world.world_size,
                },
                state.step,
            )
            if old_world != world.world_size and world.is_rank_zero:
                log.info(
                    "world size %d -> %d: gradient accumulation %d -> %d (global batch %d)",
                    old_world,
                    world.world_size,
                    cfg.optim.global_batch_size // (cfg.optim.micro_batch_size_per_rank * old_world),
                    grad_accum_steps(cfg.optim, cfg.scaling),
                    cfg.optim.global_batch_size,
                )
            state.wandb_run_id = tracker.run_id
            if cfg.time_budget_s:
                clock["progress"] = state.train_time_s / cfg.time_budget_s
        position = state.data_position or new_position(max(1, cfg.data.num_loader_workers), world_size=world.world_size)

        # this rank's stream, and the fixed held-out set with fixed masks
        stream = ShardStream(
            dataset_dir,
            "train",
            rank=world.rank,
            world_size=world.world_size,
            seed=cfg.optim.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            position=position,
            num_loader_workers=cfg.data.num_loader_workers,
            on_error=cfg.data.on_error,
            verify=cfg.data.verify_shards,
            manifest=manifest,
            **(
                {"global_batch": cfg.optim.global_batch_size, "micro_batch": cfg.optim.micro_batch_size_per_rank}
                if cfg.data.elastic_determinism
                else {}
            ),
        )
        loader = DataLoader(
            stream,
            batch_size=cfg.optim.micro_batch_size_per_rank,
            num_workers=cfg.data.num_loader_workers,
            collate_fn=collate,
        )
        masker = Masker.for_dataset(
            manifest, cfg.data.mlm_probability, cfg.optim.seed, global_micro=cfg.data.elastic_determinism
        )
        _, eval_ids = read_all(dataset_dir, "valid", limit=cfg.data.num_eval_samples, manifest=manifest)
        eval_inputs, eval_labels = masker.held_out(torch.from_numpy(eval_ids.astype("int64")))

        ledger = Ledger(run_dir, world.rank, world.world_size) if cfg.data.ledger else None
    except BaseException:
        tracker.close()
        raise
    s = Setup(
        cfg=cfg,
        world=world,
        run_dir=run_dir,
        manifest=manifest,
        tokenizer=tokenizer,
        hf_config=hf_config,
        model=model,
        engine=engine,
        clock=clock,
        tracker=tracker,
        stream=stream,
        batches=iter(loader),
        masker=masker,
        eval_inputs=eval_inputs,
        eval_labels=eval_labels,
        accum=grad_accum_steps(cfg.optim, cfg.scaling),
        config_yaml=dump_yaml(cfg),
        ledger=ledger,
        on_checkpoint=on_checkpoint,
        flops_per_token=models.flops_per_token(hf_config, manifest["seq_len"], cfg.data.mlm_probability),
        peak_tflops=engine_lib.peak_tflops(cfg.scaling, cfg.peak_tflops_per_rank),
    )
    return s, state, NonfiniteGuard(cfg.on_nonfinite_loss, engine, world, state.nonfinite_skipped_steps)


# --------------------------------------------------------------------------- the step


def train_step(s: Setup, state: TrainState, guard: NonfiniteGuard) -> StepResult:
    """One optimizer step: ``accum`` micro batches, forward, backward, and the step."""
    cfg, engine = s.cfg, s.engine
    result = StepResult(keys=[], loss_sum=0.0, num_good_micro_batches=0, nonfinite=False, lr=0.0)
    for micro in range(s.accum):
        batch = next(s.batches)
        s.stream.advance(batch)
        result.keys += batch.keys
        inputs, labels = s.masker.train(batch.input_ids, rank=s.world.rank, step=state.step, micro=micro, accum=s.accum)
        loss = engine(input_ids=inputs.to(engine.device), labels=labels.to(engine.device)).loss
        if state.step + 1 in cfg.inject_nonfinite_at_steps and s.world.is_rank_zero and micro == 0:
            loss = loss * float("nan")  # fault simulation (tests, drills)
        loss_value = loss.item()
        bad = guard.check(loss_value)
        with guard.backward():
            engine.backward(loss)
        result.nonfinite = result.nonfinite or bad
        if micro == s.accum - 1:
            if result.nonfinite:
                guard.hold_update(engine)
            result.lr = engine.optimizer.param_groups[0]["lr"]
        engine.step()
        if not bad:
            result.loss_sum += loss_value
            result.num_good_micro_batches += 1
    if result.nonfinite:  # the update is dropped: no micro batch of the step counts
        result.loss_sum, result.num_good_micro_batches = 0.0, 0
    state.step += 1
    state.samples_seen += cfg.optim.global_batch_size
    return result


# --------------------------------------------------------------------------- log, eval, save


def log_metrics(s: Setup, state: TrainState, window: LogWindow) -> LogWindow:
    """Rank 0 logs the window's train metrics (collective: reduces over ranks); a new window.

    The loss is the mean over the window's finite micro batches; a window whose every step
    was skipped logs ``train_loss: null``. ``lr`` is what the last step really used."""
    cfg, world = s.cfg, s.world
    now = time.perf_counter()
    steps = state.step - window.start_step
    loss_sum, num_micro = all_reduce_sum([window.loss_sum, window.num_micro_batches])
    grad_norm = s.engine.get_global_grad_norm()
    tokens_per_s = cfg.optim.global_batch_size * s.seq_len * steps / (now - window.start_time)
    metrics = {
        "train_loss": loss_sum / num_micro if num_micro else None,
        "lr": window.lr,
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": tokens_per_s,
        "samples_per_s": cfg.optim.global_batch_size * steps / (now - window.start_time),
        "step_time_s": (now - window.start_time) / steps,
        "tokens_seen": state.samples_seen * s.seq_len,
        "epoch": s.stream.epoch,  # no copy of the read position on the step path
        "peak_memory_mb": all_reduce_max([engine_lib.peak_memory_mb(cfg.scaling)])[0],
        "data_skipped_samples": all_reduce_sum([s.stream.num_skipped_samples])[0],
        "nonfinite_skipped_steps": state.nonfinite_skipped_steps,
        "train_time_s": state.train_time_s,
    }
    if window.num_skipped_steps:
        metrics["skipped"] = True
        metrics["skipped_steps_in_window"] = window.num_skipped_steps
    if s.peak_tflops:
        metrics["mfu"] = tokens_per_s * s.flops_per_token / (s.peak_tflops * 1e12 * world.world_size)
    eta = (cfg.optim.max_steps - state.step) * metrics["step_time_s"]
    if cfg.time_budget_s:
        eta = min(eta, max(0.0, cfg.time_budget_s - state.train_time_s))
    metrics["eta_s"] = eta
    s.tracker.log(metrics, state.step)
    if world.is_rank_zero:
        loss = "skipped" if metrics["train_loss"] is None else f"{metrics['train_loss']:.3f}"
        log.info(
            "step %d/%d | loss %s | lr %.2e | %.0f tok/s | ETA %.0fs",
            state.step,
            cfg.optim.max_steps,
            loss,
            metrics["lr"],
            tokens_per_s,
            eta,
        )
    return LogWindow(start_step=state.step, start_time=now)


@torch.no_grad()
def evaluate(engine, eval_inputs: torch.Tensor, eval_labels: torch.Tensor, micro_batch: int, world: World) -> dict:
    """Held-out MLM loss, masked-token accuracy and perplexity. Collective: every rank runs
    the same number of forwards (ZeRO-3 forwards gather parameters from all ranks)."""
    engine.module.eval()
    loss_sum = correct = count = 0.0
    for rows in collective_batches(len(eval_inputs), micro_batch, world):
        real = rows is not None
        sl = rows if real else slice(0, micro_batch)
        out = engine(input_ids=eval_inputs[sl].to(engine.device), labels=eval_labels[sl].to(engine.device))
        if not real:
            continue  # this rank only took part in the collective forward
        logits, target = models.masked_logits_and_labels(out.logits.float(), eval_labels[sl].to(engine.device))
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


def run_eval(s: Setup, state: TrainState) -> None:
    """Held-out metrics, logged (collective)."""
    heartbeat(s.run_dir, s.world.rank, state.step, "eval")
    s.eval_metrics = evaluate(s.engine, s.eval_inputs, s.eval_labels, s.cfg.optim.micro_batch_size_per_rank, s.world)
    s.tracker.log(dict(s.eval_metrics, train_time_s=state.train_time_s), state.step)
    if s.world.is_rank_zero:
        log.info(
            "step %d eval | mlm loss %.3f | masked-token accuracy %.3f",
            state.step,
            s.eval_metrics["eval_mlm_loss"],
            s.eval_metrics["eval_mlm_accuracy"],
        )


def save(s: Setup, state: TrainState) -> None:
    """Write a checkpoint. Collective: every rank saves its part; then, under a launcher,
    every rank hands the directory to ``on_checkpoint`` (Ray: ``ray.train.report``)."""
    heartbeat(s.run_dir, s.world.rank, state.step, "checkpoint")
    state.data_position = s.stream.state_dict()
    started = time.perf_counter()
    if s.on_checkpoint is None:
        target = s.run_dir / "checkpoints" / f"step_{state.step:08d}"
        checkpoint.save(s.engine, target, s.world, state, s.config_yaml)
        s.tracker.log({"checkpoint_save_s": time.perf_counter() - started}, state.step)
        return
    with tempfile.TemporaryDirectory(prefix="ptft-ckpt-") as tmp:
        checkpoint.save(s.engine, tmp, s.world, state, s.config_yaml)
        barrier()
        s.on_checkpoint(tmp, {"step": state.step, **s.eval_metrics})
    # written and handed over (under Ray: persisted to the run's storage)
    s.tracker.log({"checkpoint_save_s": time.perf_counter() - started}, state.step)


# --------------------------------------------------------------------------- the recipe


def run(
    cfg: PretrainConfig, world: World, *, resume_dir: str | None = None, on_checkpoint: OnCheckpoint | None = None
) -> dict | None:
    """Pretrain on every rank; returns the summary on rank 0 (None elsewhere).

    ``on_checkpoint(directory, metrics)`` is called on every rank after each rank saved its
    part of a checkpoint into ``directory`` (under Ray it calls ``ray.train.report``).
    """
    # 1. validate (a resumed run must match its checkpoint) and set up
    cfg.check()
    if resume_dir:
        checkpoint.check_compatible(resume_dir, to_dict(cfg))
    engine_lib.init_distributed(world, cfg.scaling, cfg.zero)
    torch.manual_seed(cfg.optim.seed)
    s, state, guard = setup(cfg, world, resume_dir, on_checkpoint)
    cfg = s.cfg  # the run length in steps
    try:
        # 2. the loop: step, agree, log, eval, save
        start_step, start_time, prior_time = state.step, time.perf_counter(), state.train_time_s
        last_save = start_time
        window = LogWindow(start_step=state.step, start_time=start_time)
        paused = verdict = None
        while state.step < cfg.optim.max_steps:
            result = train_step(s, state, guard)
            if s.ledger is not None:
                s.ledger.write(state.step, result.keys)
            heartbeat(s.run_dir, world.rank, state.step)
            # clock decisions are rank 0's; every rank stops and saves at the same step
            now = time.perf_counter()
            verdict = StepVerdict.agree(
                world,
                out_of_time=cfg.time_budget_s is not None and prior_time + now - start_time > cfg.time_budget_s,
                save_due=cfg.checkpoint.every_minutes > 0 and now - last_save > 60 * cfg.checkpoint.every_minutes,
                preempted=(s.run_dir / STOP_FILE).exists(),
                nonfinite=result.nonfinite,
                train_time_s=prior_time + now - start_time,
            )
            state.train_time_s = verdict.train_time_s
            if cfg.time_budget_s:
                s.clock["progress"] = min(1.0, state.train_time_s / cfg.time_budget_s)
            guard.end_step(state.step, verdict.num_nonfinite_ranks)
            state.nonfinite_skipped_steps = guard.skipped_steps
            window.add(result, skipped=verdict.num_nonfinite_ranks > 0)
            # stop_at_step pauses a run that started before it; the resumed run goes on
            stop_here = cfg.stop_at_step is not None and start_step < cfg.stop_at_step <= state.step
            paused = (stop_here or verdict.preempted) and state.step < cfg.optim.max_steps
            last = state.step == cfg.optim.max_steps or verdict.out_of_time or paused

            if state.step % cfg.tracking.log_every_steps == 0 or last:
                window = log_metrics(s, state, window)
            if eval_due(state.step, cfg.eval_every_steps) or last:
                run_eval(s, state)
            if (
                (cfg.checkpoint.every_steps and state.step % cfg.checkpoint.every_steps == 0)
                or verdict.save_due
                or last
            ):
                if world.is_rank_zero and not last:
                    log.info("step %d: writing a checkpoint", state.step)
                save(s, state)
                last_save = time.perf_counter()
            if verdict.out_of_time or paused:
                break

        # 3. finish: a paused run says how to resume; a finished one exports
        skipped = all_reduce_sum([s.stream.num_skipped_samples])[0]  # collective: before any rank returns
        if not s.eval_metrics:  # resumed a finished run: measure the model as it is
            run_eval(s, state)
        if paused:
            say_paused(s, state, preempted=verdict.preempted)
            return None
        return export(s, state, skipped, train_time_s=time.perf_counter() - start_time)
    finally:
        if s.ledger is not None:
            s.ledger.close()
        s.tracker.close()


def say_paused(s: Setup, state: TrainState, *, preempted: bool) -> None:
    if not s.world.is_rank_zero:
        return
    why = "preemption (SIGTERM)" if preempted else "stop_at_step"
    log.info(
        "stopped at step %d of %d (%s); run again with the same run dir to resume",
        state.step,
        s.cfg.optim.max_steps,
        why,
    )
    write_summary(
        s.run_dir,
        dict(s.eval_metrics, steps=state.step, completed=False, preempted=bool(preempted)),
        {"checkpoints": str((s.run_dir / "ray").resolve())},
    )


def export(s: Setup, state: TrainState, skipped: float, *, train_time_s: float) -> dict | None:
    """The consolidated weights as an HF directory, and the summary (collective gather)."""
    heartbeat(s.run_dir, s.world.rank, state.step, "export")
    state_dict = engine_lib.full_state_dict(s.engine, s.world)
    export_dir = s.run_dir / "export"
    if s.world.is_rank_zero:
        models.save_hf(s.engine.module, state_dict, s.tokenizer, export_dir)
    barrier()
    if not s.world.is_rank_zero:
        return None
    summary_metrics = dict(
        s.eval_metrics,
        data_skipped_samples=skipped,
        nonfinite_skipped_steps=state.nonfinite_skipped_steps,
        steps=state.step,
        completed=True,
        tokens_seen=state.samples_seen * s.seq_len,
        train_time_s=train_time_s,
        parameters=models.num_params(s.model),
    )
    artifacts = {"hf_model": str(export_dir.resolve()), "dataset": str(Path(s.cfg.data.dataset_dir).resolve())}
    write_summary(s.run_dir, summary_metrics, artifacts)
    return {"metrics": summary_metrics, "artifacts": {"hf_model": artifacts["hf_model"]}}
