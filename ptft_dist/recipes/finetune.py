"""Sequence-classification finetuning (LoRA, IA3, head only or full), read top to bottom.

Features:
    - any local HF BERT / RoBERTa / ModernBERT directory (our pretraining export included)
    - single-text and text-pair tasks; train / validation / test files, or seeded stratified
      splits of the training file
    - LoRA (rsLoRA, DoRA options) or IA3 through ``peft``, the head alone (linear probe), or
      every parameter; the classification head (pooler/head + classifier) always trains,
      since a frozen random head cannot learn
    - DeepSpeed ZeRO 0-3 on the Ray Train workers; only trainable parameters are optimized
    - the same global batches on any world size: a seeded permutation per epoch, cut into
      global batches, each rank taking its slice; examples of similar length are batched
      together (length bucketing) and each micro batch pads to its longest example
    - ``task.max_length`` chosen from the data when unset (95th percentile of the training
      lengths, capped by the model's positions); class-weighted loss for imbalanced labels
      (``task.class_weights``)
    - validation every E steps: the best weights (by accuracy or macro-F1) are kept for the
      test, with early stopping
    - test accuracy, macro-F1, per-class precision/recall, confusion matrix, predictions file
    - the adapter saved in PEFT format (gathered under ZeRO-3, never empty) with the labels
      and tokenizer beside it; optionally a merged model; full finetuning saves an HF model

Finetune jobs write no checkpoints (they are minutes long): a job restarts from step 0, so
``scaling.max_failures`` must be 0 (the config refuses more).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import adapters, models, preflight
from .. import engine as engine_lib
from ..classify import GlobalBatches, Split, class_weights, classification_metrics, load_splits
from ..config import FinetuneConfig, batch_arithmetic, eval_due, grad_accum_steps, max_steps_for, to_dict
from ..data.build import DataError
from ..progress import heartbeat
from ..tracking import Tracker, write_summary
from ..world import World, all_gather_object, all_reduce_sum, barrier, broadcast_object, collective_batches

log = logging.getLogger(__name__)


@dataclass
class Best:
    """The best validation score so far, and this rank's trainable weights at it."""

    score: float = -1.0
    step: int = 0
    weights: list[torch.Tensor] | None = None
    evals_since: int = 0


@dataclass
class Setup:
    """What :func:`setup` builds for the loop."""

    cfg: FinetuneConfig
    world: World
    run_dir: Path
    tokenizer: Any
    names: list[str]
    train: Split
    validation: Split | None
    test: Split
    engine: Any
    family: str
    tracker: Tracker
    num_trainable: int
    num_params: int
    accum: int
    batches: GlobalBatches
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    #: per-class weights of the loss (task.class_weights), or None for plain cross-entropy
    loss_weights: torch.Tensor | None = None

    def held(self) -> list[torch.Tensor]:
        """The trainable weights this rank holds (its ZeRO-3 partition, or the whole tensor)."""
        return [getattr(p, "ds_tensor", p) for p in self.trainable]


# --------------------------------------------------------------------------- setup


def setup(cfg: FinetuneConfig, world: World) -> Setup:
    """Tokenizer, splits, the classifier with its adapters, the engine and the tracker."""
    from transformers import AutoConfig, AutoTokenizer

    preflight.check_base_model(cfg)  # weights and a tokenizer that belong together; pooling
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    names, train, validation, test = load_splits(cfg)
    cfg = preflight.with_steps(cfg, max_steps_for(cfg.optim, len(train)))  # a run sized by optim.max_epochs
    cfg, length_note = adapters.resolve_max_length(cfg, tokenizer, train)  # task.max_length from the data
    if length_note and world.is_rank_zero:
        log.info("%s", length_note)
    if len(train) < cfg.optim.global_batch_size:
        raise DataError(
            f"{cfg.task.train_file}: {len(train)} training examples are fewer than one global batch of "
            f"{cfg.optim.global_batch_size}"
        )
    run_dir = Path(cfg.run_dir)
    tracker = Tracker(run_dir, cfg.tracking, world, config=to_dict(cfg), job_type="finetune")
    heartbeat(run_dir, world.rank, 0, "setup")
    try:
        hidden_size = AutoConfig.from_pretrained(cfg.base_model).hidden_size
        ds = engine_lib.ds_config(cfg.optim, cfg.zero, cfg.scaling, hidden_size=hidden_size)
        model, family = adapters.build_classifier(cfg, names, ds)
        num_trainable, num_params = models.num_params(model, trainable_only=True), models.num_params(model)
        engine = engine_lib.initialize(model, cfg.optim, ds, fused=engine_lib.fused_adamw(cfg.optim, cfg.scaling))
    except BaseException:
        tracker.close()
        raise
    if world.is_rank_zero:
        log.info(
            "%s %s: %s of %s parameters train (%.2f%%); %d labels; %d train / %d validation / %d test; %s",
            family,
            cfg.peft.method,
            f"{num_trainable:,}",
            f"{num_params:,}",
            100 * num_trainable / num_params,
            len(names),
            len(train),
            len(validation or []),
            len(test),
            batch_arithmetic(cfg.optim, cfg.scaling),
        )
    weights = class_weights(train.labels, len(names), cfg.task.class_weights)
    if weights is not None and world.is_rank_zero:
        present = [w for w in weights if w > 0]
        log.info(
            "[%s] class weights (%s): %.3g to %.3g over %d classes",
            cfg.name,
            cfg.task.class_weights,
            min(present),
            max(present),
            len(present),
        )
    pairs = train.pairs or [""] * len(train)
    return Setup(
        cfg=cfg,
        world=world,
        run_dir=run_dir,
        tokenizer=tokenizer,
        names=names,
        train=train,
        validation=validation,
        test=test,
        engine=engine,
        family=family,
        tracker=tracker,
        num_trainable=num_trainable,
        num_params=num_params,
        accum=grad_accum_steps(cfg.optim, cfg.scaling),
        batches=GlobalBatches(
            np.array([len(t) + len(p) for t, p in zip(train.texts, pairs)]), cfg.optim.global_batch_size, cfg.optim.seed
        ),
        trainable=[p for p in engine.module.parameters() if p.requires_grad],
        loss_weights=None if weights is None else torch.tensor(weights, dtype=torch.float32, device=engine.device),
    )


# --------------------------------------------------------------------------- batches and predictions


def encode(s: Setup, split: Split, idx: list[int]) -> dict[str, torch.Tensor]:
    """Model inputs for examples ``idx`` of a split, padded to the longest of them."""
    texts = [split.texts[i] for i in idx]
    pairs = [split.pairs[i] for i in idx] if split.pairs is not None else None
    enc = s.tokenizer(
        texts, pairs, truncation=True, max_length=s.cfg.task.max_length, padding=True, return_tensors="pt"
    )
    keep = ("input_ids", "attention_mask") + (("token_type_ids",) if s.family == "bert" else ())
    return {k: v.to(s.engine.device) for k, v in enc.items() if k in keep}


@torch.no_grad()
def predict(s: Setup, split: Split) -> list[int]:
    """Predicted label ids of a split. Collective: every rank runs the same number of forwards."""
    micro = s.cfg.optim.micro_batch_size_per_rank
    s.engine.eval()
    mine: list[tuple[int, int]] = []
    for rows in collective_batches(len(split), micro, s.world):
        idx = list(range(rows.start, rows.stop)) if rows is not None else [0]
        logits = s.engine(**encode(s, split, idx)).logits
        if rows is not None:
            mine += list(zip(idx, logits.argmax(-1).tolist()))
    s.engine.train()
    got = dict(p for part in all_gather_object(mine) for p in part)
    return [got[i] for i in range(len(split))]


# --------------------------------------------------------------------------- the step, validation


def train_step(s: Setup, step: int) -> tuple[int, float, int]:
    """One optimizer step (1-based ``step``): this rank's slices of the step's global batch.

    Returns (epoch, sum of the micro-batch losses, number of micro batches)."""
    world, micro = s.world, s.cfg.optim.micro_batch_size_per_rank
    epoch, batch = s.batches.of_step(step)
    loss_sum = 0.0
    for m in range(s.accum):
        lo = (m * world.world_size + world.rank) * micro
        ids = batch[lo : lo + micro].tolist()
        labels = torch.tensor([s.train.labels[i] for i in ids], device=s.engine.device)
        if s.loss_weights is None:
            loss = s.engine(**encode(s, s.train, ids), labels=labels).loss
        else:  # class-weighted cross-entropy: the weighted mean over the micro batch
            logits = s.engine(**encode(s, s.train, ids)).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, weight=s.loss_weights)
        s.engine.backward(loss)
        s.engine.step()
        loss_sum += loss.item()
    return epoch, loss_sum, s.accum


def validate(s: Setup, step: int, best: Best) -> bool:
    """Score the validation split, keep the best weights; whether to stop early (collective)."""
    cfg = s.cfg
    heartbeat(s.run_dir, s.world.rank, step, "eval")
    scores = classification_metrics(s.validation.labels, predict(s, s.validation), s.names)
    s.tracker.log({"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}, step)
    if scores[cfg.metric] > best.score:
        best.score, best.step, best.evals_since = scores[cfg.metric], step, 0
        best.weights = [w.detach().clone() for w in s.held()]
    else:
        best.evals_since += 1
    stop = broadcast_object(bool(cfg.early_stopping_patience and best.evals_since >= cfg.early_stopping_patience))
    if stop and s.world.is_rank_zero:
        log.info(
            "[%s] early stop at step %d: no better validation %s since step %d", cfg.name, step, cfg.metric, best.step
        )
    return stop


def restore_best(s: Setup, best: Best, step: int) -> None:
    """Put the best validation weights back for the test (when they are not the last)."""
    if best.weights is None or best.step == step:
        return
    with torch.no_grad():
        for w, saved in zip(s.held(), best.weights):
            w.copy_(saved)
    if s.world.is_rank_zero:
        log.info(
            "[%s] testing the best weights: step %d, validation %s %.4f",
            s.cfg.name,
            best.step,
            s.cfg.metric,
            best.score,
        )


# --------------------------------------------------------------------------- the recipe


def run(cfg: FinetuneConfig, world: World, *, resume_dir: str | None = None, on_checkpoint=None) -> dict | None:
    """Finetune on every rank; returns the summary on rank 0 (None elsewhere).

    ``on_checkpoint`` is never called: finetune jobs write no checkpoints. A ``resume_dir`` is
    refused (there is nothing a finetune job could resume from).
    """
    # 1. validate and set up
    cfg.check()
    if resume_dir is not None:
        raise DataError(f"finetune[{cfg.name}]: finetune jobs write no checkpoints; {resume_dir} cannot be resumed")
    engine_lib.init_distributed(world, cfg.scaling, cfg.zero)
    torch.manual_seed(cfg.optim.seed)
    s = setup(cfg, world)
    cfg = s.cfg  # the run length in steps
    try:
        # 2. the loop: global batch g of an epoch is order[g*G:(g+1)*G]; rank r takes its part
        start = window_time = time.perf_counter()
        loss_sum, num_micro, window_step, step = 0.0, 0, 0, 0
        best = Best()
        s.engine.train()
        for step in range(1, cfg.optim.max_steps + 1):
            epoch, loss, n = train_step(s, step)
            loss_sum, num_micro = loss_sum + loss, num_micro + n
            heartbeat(s.run_dir, world.rank, step)
            if step % cfg.tracking.log_every_steps == 0 or step == cfg.optim.max_steps:
                now = time.perf_counter()
                log_metrics(s, step, epoch, loss_sum, num_micro, (step - window_step) / (now - window_time))
                loss_sum, num_micro, window_step, window_time = 0.0, 0, step, now
            if s.validation is not None and (eval_due(step, cfg.eval_every_steps) or step == cfg.optim.max_steps):
                if validate(s, step, best):
                    break
        train_time_s = time.perf_counter() - start
        restore_best(s, best, step)

        # 3. test predictions, then the adapter (or model): gathering is collective
        heartbeat(s.run_dir, world.rank, step, "test")
        pred = predict(s, s.test)
        heartbeat(s.run_dir, world.rank, step, "export")
        artifacts = export(s)
        if not world.is_rank_zero:
            return None
        return write_results(s, pred, artifacts, best, step, train_time_s)
    finally:
        s.tracker.close()


def log_metrics(s: Setup, step: int, epoch: int, loss_sum: float, num_micro: int, steps_per_s: float) -> None:
    """The window's mean train loss over all ranks, and its speed (collective)."""
    cfg = s.cfg
    total_loss, n = all_reduce_sum([loss_sum, num_micro])
    metrics = {
        "train_loss": total_loss / max(n, 1),
        "lr": s.engine.get_lr()[0],
        "examples_per_s": cfg.optim.global_batch_size * steps_per_s,
        "epoch": epoch,
        "peak_memory_mb": engine_lib.peak_memory_mb(cfg.scaling),
    }
    s.tracker.log(metrics, step)
    if s.world.is_rank_zero:
        log.info(
            "[%s] step %d/%d | loss %.4f | lr %.2e | %.0f examples/s",
            cfg.name,
            step,
            cfg.optim.max_steps,
            metrics["train_loss"],
            metrics["lr"],
            metrics["examples_per_s"],
        )


def export(s: Setup) -> dict[str, str]:
    """Save the adapter (or the full model) with its labels; collective gather, rank 0 writes."""
    cfg = s.cfg
    adapter = cfg.peft.method in ("lora", "ia3")
    state = engine_lib.full_state_dict(s.engine, s.world, trainable_only=adapter)
    key = "adapter" if adapter else "model"
    out_dir = s.run_dir / key
    if s.world.is_rank_zero:
        if adapter:
            s.engine.module.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
            s.tokenizer.save_pretrained(out_dir)
        else:
            models.save_hf(s.engine.module, state, s.tokenizer, out_dir)
        (out_dir / "labels.json").write_text(json.dumps(s.names))
        (out_dir / "classifier.json").write_text(
            json.dumps({"pooling": cfg.pooling, "max_length": cfg.task.max_length})
        )
    barrier()
    artifacts = {key: str(out_dir.resolve())}
    if s.world.is_rank_zero and cfg.export_merged and adapter:
        artifacts["merged_model"] = str(adapters.merge_adapter(out_dir, s.run_dir / "merged").resolve())
    return artifacts


def write_results(s: Setup, pred: list[int], artifacts: dict, best: Best, step: int, train_time_s: float) -> dict:
    """Test metrics, the predictions file, eval.json and the summary (rank 0)."""
    cfg, test, names = s.cfg, s.test, s.names
    scores = classification_metrics(test.labels, pred, names)
    predictions = s.run_dir / "predictions.csv"
    with open(predictions, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text"] + (["text_pair"] if test.pairs is not None else []) + ["label", "prediction"])
        for i, (t, y, p) in enumerate(zip(test.texts, test.labels, pred)):
            writer.writerow([t] + ([test.pairs[i]] if test.pairs is not None else []) + [names[y], names[p]])
    (s.run_dir / "eval.json").write_text(json.dumps(dict(scores, labels=names), indent=1))
    artifacts = dict(artifacts, predictions=str(predictions.resolve()), base_model=cfg.base_model)
    majority = max(np.bincount(test.labels, minlength=len(names))) / len(test)
    summary = {
        "test_accuracy": scores["accuracy"],
        "test_macro_f1": scores["macro_f1"],
        "test_majority_class_accuracy": float(majority),
        "num_test_examples": len(test),
        "trainable_params": s.num_trainable,
        "total_params": s.num_params,
        "steps": step,
        "max_length": cfg.task.max_length,
        "best_step": best.step if best.weights is not None else step,
        "best_val_" + cfg.metric: best.score if best.weights is not None else None,
        "train_time_s": train_time_s,
    }
    s.tracker.log({k: v for k, v in summary.items() if k.startswith("test_")}, step)
    write_summary(s.run_dir, summary, artifacts)
    log.info(
        "[%s] test accuracy %.4f | macro-F1 %.4f | majority class %.4f",
        cfg.name,
        scores["accuracy"],
        scores["macro_f1"],
        majority,
    )
    return {"metrics": summary}
