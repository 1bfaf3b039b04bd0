"""Sequence-classification finetuning with LoRA (or fully), read top to bottom.

Features:
    - any local HF BERT / RoBERTa / ModernBERT directory (our pretraining export included)
    - LoRA through ``peft`` on every linear layer of the encoder by default; the classification
      head (pooler/head + classifier) always trains, since a frozen random head cannot learn
    - DeepSpeed ZeRO 0-3 on the Ray Train workers; only trainable parameters are optimized
    - the same global batches on any world size: a seeded permutation per epoch, cut into
      global batches, each rank taking its slice; dynamic padding per micro batch
    - test accuracy, macro-F1, per-class precision/recall, confusion matrix, predictions file
    - the adapter saved in PEFT format (gathered under ZeRO-3, never empty) with the labels
      and tokenizer beside it; full finetuning saves an HF model instead
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import engine as engine_lib, models
from ..config import FinetuneConfig, batch_arithmetic, grad_accum_steps, to_dict
from ..data.build import DataError
from ..data.labeled import label_order, read_examples
from ..tracking import Tracker, write_summary
from ..world import World, all_gather_object, all_reduce_sum, barrier

log = logging.getLogger(__name__)


def classification_metrics(gold: list[int], pred: list[int], names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1 and the confusion matrix."""
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)
    for g, p in zip(gold, pred):
        confusion[g, p] += 1
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(k), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(k), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=(precision + recall) > 0)
    present = confusion.sum(1) > 0  # macro over the classes that occur in the gold labels
    return {
        "accuracy": float(tp.sum() / max(len(gold), 1)),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {n: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]), "support": int(confusion[i].sum())} for i, n in enumerate(names)},
        "confusion_matrix": confusion.tolist(),
    }


def _split(texts: list[str], labels: list[int], fraction: float, seed: int):
    """A seeded stratified split: ``fraction`` of each class goes to the second part."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(idx)
        n = int(round(len(idx) * fraction))
        held += idx[:n]
        keep += idx[n:]
    pick = lambda ids: ([texts[i] for i in sorted(ids)], [labels[i] for i in sorted(ids)])  # noqa: E731
    return pick(keep), pick(held)


def build_model(cfg: FinetuneConfig, num_labels: int, names: list[str], ds: dict):
    """The classifier on the base model, with LoRA adapters unless full finetuning."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base = Path(cfg.base_model)
    if not any((base / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")):
        raise DataError(f"base model {base} has no weights (model.safetensors); point base_model at an HF model directory")
    family = models.family_of(AutoConfig.from_pretrained(str(base)))
    with engine_lib.model_init_context(ds):
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=num_labels,
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            attn_implementation="sdpa",
            # the MLM head's weights do not fit a classifier: load what matches, init the rest
            ignore_mismatched_sizes=True,
        )
    if cfg.peft.method == "full":
        return model, family
    lora = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.peft.r,
        lora_alpha=cfg.peft.alpha,
        lora_dropout=cfg.peft.dropout,
        target_modules=cfg.peft.target_modules or models.LORA_TARGETS[family],
        modules_to_save=models.HEAD_MODULES[family],
    )
    return get_peft_model(model, lora), family


def run(cfg: FinetuneConfig, world: World, *, resume_dir: str | None = None, on_checkpoint=None) -> dict | None:
    """Finetune on every rank; returns the summary on rank 0 (None elsewhere)."""
    from transformers import AutoTokenizer

    # 1. validate, set up, read the data
    cfg.check()
    engine_lib.init_distributed(world, cfg.scaling)
    torch.manual_seed(cfg.optim.seed)
    run_dir = Path(cfg.run_dir)
    if not cfg.base_model:
        raise DataError("finetune.base_model is not set: point it at an HF model directory (e.g. a pretraining export)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    texts, raw_labels = read_examples(cfg.task.train_file, cfg.task.text_column, cfg.task.label_column)
    names = label_order(raw_labels)
    index = {n: i for i, n in enumerate(names)}
    labels = [index[y] for y in raw_labels]
    if cfg.task.test_file:
        test_texts, test_raw = read_examples(cfg.task.test_file, cfg.task.text_column, cfg.task.label_column)
        unseen = sorted(set(test_raw) - set(index))
        if unseen:
            raise DataError(f"{cfg.task.test_file}: labels {unseen[:10]} never occur in {cfg.task.train_file}")
        test_labels = [index[y] for y in test_raw]
    else:
        (texts, labels), (test_texts, test_labels) = _split(texts, labels, 0.1, cfg.optim.seed)
    accum = grad_accum_steps(cfg.optim, cfg.scaling)
    micro = cfg.optim.micro_batch_size_per_rank

    tracker = Tracker(run_dir, cfg.tracking, world, config=to_dict(cfg), job_type="finetune")
    try:
        # 2. model (+ LoRA) and engine
        ds = engine_lib.ds_config(cfg.optim, cfg.zero, cfg.scaling)
        model, family = build_model(cfg, len(names), names, ds)
        trainable, total = models.num_params(model, trainable_only=True), models.num_params(model)
        engine = engine_lib.initialize(model, cfg.optim, ds)
        if world.is_rank_zero:
            log.info("%s %s: %s of %s parameters train (%.2f%%); %d labels; %s", family, cfg.peft.method, f"{trainable:,}", f"{total:,}", 100 * trainable / total, len(names), batch_arithmetic(cfg.optim, cfg.scaling))

        def encode(batch_texts: list[str]):
            enc = tokenizer(batch_texts, truncation=True, max_length=cfg.task.max_length, padding=True, return_tensors="pt")
            return {k: v.to(engine.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}

        # 3. the loop: global batch g of an epoch is order[g*G:(g+1)*G]; rank r takes its part
        G = cfg.optim.global_batch_size
        steps_per_epoch = len(texts) // G
        if steps_per_epoch == 0:
            raise DataError(f"{cfg.task.train_file}: {len(texts)} examples are fewer than one global batch of {G}")
        start = last_time = time.perf_counter()
        loss_acc, loss_n, last_step = 0.0, 0, 0
        engine.train()
        for step in range(cfg.optim.max_steps):
            epoch, g = divmod(step, steps_per_epoch)
            order = np.random.default_rng([cfg.optim.seed, epoch]).permutation(len(texts))
            batch = order[g * G : (g + 1) * G]
            for m in range(accum):
                lo = (m * world.world_size + world.rank) * micro
                ids = batch[lo : lo + micro]
                out = engine(**encode([texts[i] for i in ids]), labels=torch.tensor([labels[i] for i in ids], device=engine.device))
                engine.backward(out.loss)
                engine.step()
                loss_acc += out.loss.item()
                loss_n += 1
            done = step + 1
            if done % cfg.tracking.log_every_steps == 0 or done == cfg.optim.max_steps:
                now = time.perf_counter()
                total_loss, n = all_reduce_sum([loss_acc, loss_n])
                metrics = {"train_loss": total_loss / max(n, 1), "lr": engine.get_lr()[0], "examples_per_s": G * (done - last_step) / (now - last_time), "epoch": epoch}
                tracker.log(metrics, done)
                if world.is_rank_zero:
                    log.info("step %d/%d | loss %.4f | lr %.2e | %.0f examples/s", done, cfg.optim.max_steps, metrics["train_loss"], metrics["lr"], metrics["examples_per_s"])
                loss_acc, loss_n, last_step, last_time = 0.0, 0, done, now
        train_time_s = time.perf_counter() - start

        # 4. test predictions: every rank runs the same number of forwards (ZeRO-3 gathers)
        engine.eval()
        num_batches = math.ceil(len(test_texts) / micro)
        mine: list[tuple[int, int]] = []
        with torch.no_grad():
            for r in range(math.ceil(num_batches / world.world_size)):
                b = r * world.world_size + world.rank
                real = b < num_batches
                idx = list(range(b * micro, min((b + 1) * micro, len(test_texts)))) if real else [0]
                logits = engine(**encode([test_texts[i] for i in idx])).logits
                if real:
                    mine += list(zip(idx, logits.argmax(-1).tolist()))
        predictions = dict(p for part in all_gather_object(mine) for p in part)

        # 5. save the adapter (or the full model); gathering is collective
        state = engine_lib.full_state_dict(engine, trainable_only=cfg.peft.method != "full")
        out_dir = run_dir / ("adapter" if cfg.peft.method != "full" else "model")
        if world.is_rank_zero:
            if cfg.peft.method == "full":
                models.save_hf(engine.module, state, tokenizer, out_dir)
            else:
                engine.module.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(out_dir)
            (out_dir / "labels.json").write_text(json.dumps(names))
        barrier()
        if not world.is_rank_zero:
            return None

        # 6. metrics, predictions file, summary
        pred = [predictions[i] for i in range(len(test_texts))]
        scores = classification_metrics(test_labels, pred, names)
        with open(run_dir / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label", "prediction"])
            for t, y, p in zip(test_texts, test_labels, pred):
                writer.writerow([t, names[y], names[p]])
        (run_dir / "eval.json").write_text(json.dumps(scores, indent=1))
        majority = max(np.bincount(test_labels, minlength=len(names))) / len(test_labels)
        summary = {
            "test_accuracy": scores["accuracy"],
            "test_macro_f1": scores["macro_f1"],
            "test_majority_class_accuracy": float(majority),
            "num_test_examples": len(test_texts),
            "trainable_params": trainable,
            "total_params": total,
            "steps": cfg.optim.max_steps,
            "train_time_s": train_time_s,
        }
        tracker.log({k: v for k, v in summary.items() if k.startswith("test_")}, cfg.optim.max_steps)
        key = "adapter" if cfg.peft.method != "full" else "model"
        write_summary(run_dir, summary, {key: str(out_dir.resolve()), "predictions": str((run_dir / "predictions.csv").resolve()), "base_model": cfg.base_model})
        log.info("test accuracy %.4f | macro-F1 %.4f | majority class %.4f", scores["accuracy"], scores["macro_f1"], majority)
        return {"metrics": summary}
    finally:
        tracker.close()
