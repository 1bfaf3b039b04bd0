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
    - validation every E steps: the best weights (by accuracy or macro-F1) are kept for the
      test, with early stopping
    - test accuracy, macro-F1, per-class precision/recall, confusion matrix, predictions file
    - the adapter saved in PEFT format (gathered under ZeRO-3, never empty) with the labels
      and tokenizer beside it; optionally a merged model; full finetuning saves an HF model
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import engine as engine_lib
from .. import models
from ..config import FinetuneConfig, batch_arithmetic, grad_accum_steps, to_dict
from ..data.build import DataError
from ..data.labeled import label_order, read_examples
from ..progress import heartbeat
from ..tracking import Tracker, write_summary
from ..world import World, all_gather_object, all_reduce_sum, barrier, broadcast_object

log = logging.getLogger(__name__)


@dataclass
class Split:
    texts: list[str]
    pairs: list[str] | None
    labels: list[int]

    def take(self, idx) -> Split:
        idx = list(idx)
        return Split(
            [self.texts[i] for i in idx],
            [self.pairs[i] for i in idx] if self.pairs is not None else None,
            [self.labels[i] for i in idx],
        )

    def __len__(self) -> int:
        return len(self.texts)


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
        "per_class": {
            n: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(confusion[i].sum()),
            }
            for i, n in enumerate(names)
        },
        "confusion_matrix": confusion.tolist(),
    }


def stratified_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (kept, held out): a seeded ``fraction`` of each class is held out."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == c]
        rng.shuffle(idx)
        n = int(round(len(idx) * fraction))
        held += idx[:n]
        keep += idx[n:]
    return sorted(keep), sorted(held)


def load_splits(cfg: FinetuneConfig) -> tuple[list[str], Split, Split | None, Split]:
    """Label names and the train / validation / test splits (validation may be None)."""
    task = cfg.task

    def read(path: str) -> tuple[list[str], list[str], list[str] | None]:
        got = read_examples(path, task.text_column, task.label_column, task.text_pair_column)
        return got[0], got[1], (got[2] if task.text_pair_column else None)

    texts, raw, pairs = read(task.train_file)
    names = label_order(raw)
    index = {n: i for i, n in enumerate(names)}
    train = Split(texts, pairs, [index[y] for y in raw])

    def other(path: str) -> Split:
        t, r, p = read(path)
        unseen = sorted(set(r) - set(index))
        if unseen:
            raise DataError(f"{path}: labels {unseen[:10]} never occur in {task.train_file}")
        return Split(t, p, [index[y] for y in r])

    if task.test_file:
        test = other(task.test_file)
    else:
        keep, held = stratified_split(train.labels, task.test_fraction, cfg.optim.seed + 1)
        train, test = train.take(keep), train.take(held)
    validation = None
    if task.validation_file:
        validation = other(task.validation_file)
    elif task.validation_fraction > 0 and cfg.eval_every_steps > 0:
        keep, held = stratified_split(train.labels, task.validation_fraction, cfg.optim.seed + 2)
        train, validation = train.take(keep), train.take(held)
    if task.train_examples is not None and task.train_examples < len(train.labels):
        _, sample = stratified_split(train.labels, task.train_examples / len(train.labels), cfg.optim.seed + 3)
        train = train.take(sample)
    return names, train, validation, test


def pooling_kwargs(family: str, pooling: str, where) -> dict:
    """Config overrides that make the classifier pool the way ``pooling`` says."""
    if family == "modernbert":
        return {"classifier_pooling": pooling}
    if pooling != "cls":
        raise DataError(
            f"pooling: {pooling!r} needs a ModernBERT model; {where} is a {family} model, whose classifier reads the "
            "first token (use pooling: cls)"
        )
    return {}


def build_model(cfg: FinetuneConfig, names: list[str], ds: dict):
    """The classifier on the base model, with what trains chosen by ``cfg.peft.method``."""
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base = Path(cfg.base_model)
    if not any(
        (base / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    ):
        raise DataError(
            f"base model {base} has no weights (model.safetensors); point base_model at an HF model directory"
        )
    family = models.family_of(AutoConfig.from_pretrained(str(base)))
    with engine_lib.model_init_context(ds):
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            attn_implementation="sdpa",
            **pooling_kwargs(family, cfg.pooling, base),
        )
    head = models.HEAD_MODULES[family]
    method = cfg.peft.method
    if method == "full":
        return model, family
    if method == "head":
        for name, p in model.named_parameters():
            p.requires_grad = any(name == h or name.startswith(h + ".") for h in head)
        return model, family
    if method == "lora":
        peft_cfg = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=cfg.peft.r,
            lora_alpha=cfg.peft.alpha,
            lora_dropout=cfg.peft.dropout,
            use_rslora=cfg.peft.rslora,
            use_dora=cfg.peft.dora,
            target_modules=cfg.peft.target_modules or models.LORA_TARGETS[family],
            modules_to_save=head,
        )
    else:
        targets, feedforward = models.IA3_TARGETS[family]
        peft_cfg = IA3Config(
            task_type=TaskType.SEQ_CLS,
            target_modules=cfg.peft.target_modules or targets,
            feedforward_modules=feedforward if not cfg.peft.target_modules else [],
            modules_to_save=head,
        )
    return get_peft_model(model, peft_cfg), family


def _bucketed(order: np.ndarray, lengths: np.ndarray, global_batch: int, window: int = 50) -> np.ndarray:
    """Reorder so that each global batch holds examples of similar length: sort by length
    within windows of ``window`` global batches, then shuffle the batches of the window."""
    out = []
    span = global_batch * window
    rng = np.random.default_rng(int(order[0]) if len(order) else 0)
    for lo in range(0, len(order), span):
        chunk = order[lo : lo + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches = [chunk[i : i + global_batch] for i in range(0, len(chunk), global_batch)]
        full = [b for b in batches if len(b) == global_batch]
        rng.shuffle(full)
        out.extend(full + [b for b in batches if len(b) != global_batch])
    return np.concatenate(out) if out else order


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
    if (
        not Path(cfg.base_model, "tokenizer_config.json").is_file()
        and not Path(cfg.base_model, "tokenizer.json").is_file()
    ):
        raise DataError(f"base model {cfg.base_model} has no tokenizer (tokenizer.json / tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    names, train, validation, test = load_splits(cfg)
    accum = grad_accum_steps(cfg.optim, cfg.scaling)
    micro = cfg.optim.micro_batch_size_per_rank

    tracker = Tracker(run_dir, cfg.tracking, world, config=to_dict(cfg), job_type="finetune")
    heartbeat(run_dir, world.rank, 0, "setup")
    try:
        # 2. model (+ adapters) and engine
        from transformers import AutoConfig

        ds = engine_lib.ds_config(
            cfg.optim, cfg.zero, cfg.scaling, hidden_size=AutoConfig.from_pretrained(cfg.base_model).hidden_size
        )
        model, family = build_model(cfg, names, ds)
        trainable, total = models.num_params(model, trainable_only=True), models.num_params(model)
        engine = engine_lib.initialize(model, cfg.optim, ds)
        if world.is_rank_zero:
            log.info(
                "%s %s: %s of %s parameters train (%.2f%%); %d labels; %d train / %d validation / %d test; %s",
                family,
                cfg.peft.method,
                f"{trainable:,}",
                f"{total:,}",
                100 * trainable / total,
                len(names),
                len(train),
                len(validation or []),
                len(test),
                batch_arithmetic(cfg.optim, cfg.scaling),
            )

        def encode(split: Split, idx: list[int]):
            texts = [split.texts[i] for i in idx]
            pairs = [split.pairs[i] for i in idx] if split.pairs is not None else None
            enc = tokenizer(
                texts, pairs, truncation=True, max_length=cfg.task.max_length, padding=True, return_tensors="pt"
            )
            return {
                k: v.to(engine.device)
                for k, v in enc.items()
                if k in ("input_ids", "attention_mask", "token_type_ids")
                and (k != "token_type_ids" or family == "bert")
            }

        def predict(split: Split) -> list[int]:
            """Predictions for a split. Collective: every rank runs the same number of forwards."""
            engine.eval()
            num_batches = math.ceil(len(split) / micro)
            mine: list[tuple[int, int]] = []
            with torch.no_grad():
                for r in range(math.ceil(num_batches / world.world_size)):
                    b = r * world.world_size + world.rank
                    real = b < num_batches
                    idx = list(range(b * micro, min((b + 1) * micro, len(split)))) if real else [0]
                    logits = engine(**encode(split, idx)).logits
                    if real:
                        mine += list(zip(idx, logits.argmax(-1).tolist()))
            engine.train()
            got = dict(p for part in all_gather_object(mine) for p in part)
            return [got[i] for i in range(len(split))]

        # the trainable weights this rank holds (its ZeRO-3 partition, or the whole tensor)
        held = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
        snapshot = lambda: [(getattr(p, "ds_tensor", p).detach().clone()) for _, p in held]  # noqa: E731

        # 3. the loop: global batch g of an epoch is order[g*G:(g+1)*G]; rank r takes its part
        G = cfg.optim.global_batch_size
        steps_per_epoch = len(train) // G
        if steps_per_epoch == 0:
            raise DataError(
                f"{cfg.task.train_file}: {len(train)} training examples are fewer than one global batch of {G}"
            )
        lengths = np.array(
            [
                len(t) + (len(p) if train.pairs is not None else 0)
                for t, p in zip(train.texts, train.pairs or train.texts)
            ]
        )
        start = last_time = time.perf_counter()
        loss_acc, loss_n, last_step = 0.0, 0, 0
        best, best_step, best_weights, evals_since_best = -1.0, 0, None, 0
        step = 0
        engine.train()
        for step in range(1, cfg.optim.max_steps + 1):
            epoch, g = divmod(step - 1, steps_per_epoch)
            order = _bucketed(np.random.default_rng([cfg.optim.seed, epoch]).permutation(len(train)), lengths, G)
            batch = order[g * G : (g + 1) * G]
            for m in range(accum):
                lo = (m * world.world_size + world.rank) * micro
                ids = batch[lo : lo + micro].tolist()
                out = engine(
                    **encode(train, ids), labels=torch.tensor([train.labels[i] for i in ids], device=engine.device)
                )
                engine.backward(out.loss)
                engine.step()
                loss_acc += out.loss.item()
                loss_n += 1
            heartbeat(run_dir, world.rank, step)
            if step % cfg.tracking.log_every_steps == 0 or step == cfg.optim.max_steps:
                now = time.perf_counter()
                total_loss, n = all_reduce_sum([loss_acc, loss_n])
                metrics = {
                    "train_loss": total_loss / max(n, 1),
                    "lr": engine.get_lr()[0],
                    "examples_per_s": G * (step - last_step) / (now - last_time),
                    "epoch": epoch,
                    "peak_memory_mb": engine_lib.peak_memory_mb(cfg.scaling),
                }
                tracker.log(metrics, step)
                if world.is_rank_zero:
                    log.info(
                        "[%s] step %d/%d | loss %.4f | lr %.2e | %.0f examples/s",
                        cfg.name,
                        step,
                        cfg.optim.max_steps,
                        metrics["train_loss"],
                        metrics["lr"],
                        metrics["examples_per_s"],
                    )
                loss_acc, loss_n, last_step, last_time = 0.0, 0, step, now
            if validation is not None and (step % cfg.eval_every_steps == 0 or step == cfg.optim.max_steps):
                heartbeat(run_dir, world.rank, step, "eval")
                scores = classification_metrics(validation.labels, predict(validation), names)
                tracker.log({"val_accuracy": scores["accuracy"], "val_macro_f1": scores["macro_f1"]}, step)
                if scores[cfg.metric] > best:
                    best, best_step, best_weights, evals_since_best = scores[cfg.metric], step, snapshot(), 0
                else:
                    evals_since_best += 1
                stop = cfg.early_stopping_patience and evals_since_best >= cfg.early_stopping_patience
                if broadcast_object(bool(stop)):
                    if world.is_rank_zero:
                        log.info(
                            "[%s] early stop at step %d: no better validation %s since step %d",
                            cfg.name,
                            step,
                            cfg.metric,
                            best_step,
                        )
                    break
        train_time_s = time.perf_counter() - start
        if best_weights is not None and best_step != step:
            with torch.no_grad():
                for (_, p), w in zip(held, best_weights):
                    getattr(p, "ds_tensor", p).copy_(w)
            if world.is_rank_zero:
                log.info(
                    "[%s] testing the best weights: step %d, validation %s %.4f", cfg.name, best_step, cfg.metric, best
                )

        # 4. test predictions
        heartbeat(run_dir, world.rank, step, "test")
        pred = predict(test)

        # 5. save the adapter (or the full model); gathering is collective
        heartbeat(run_dir, world.rank, step, "export")
        state = engine_lib.full_state_dict(engine, trainable_only=cfg.peft.method in ("lora", "ia3"))
        key = "adapter" if cfg.peft.method in ("lora", "ia3") else "model"
        out_dir = run_dir / key
        if world.is_rank_zero:
            if key == "model":
                models.save_hf(engine.module, state, tokenizer, out_dir)
            else:
                engine.module.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)
                tokenizer.save_pretrained(out_dir)
            (out_dir / "labels.json").write_text(json.dumps(names))
            (out_dir / "classifier.json").write_text(json.dumps({"pooling": cfg.pooling}))
        barrier()
        if not world.is_rank_zero:
            return None

        # 6. metrics, predictions file, merged export, summary
        scores = classification_metrics(test.labels, pred, names)
        with open(run_dir / "predictions.csv", "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text"] + (["text_pair"] if test.pairs is not None else []) + ["label", "prediction"])
            for i, (t, y, p) in enumerate(zip(test.texts, test.labels, pred)):
                writer.writerow([t] + ([test.pairs[i]] if test.pairs is not None else []) + [names[y], names[p]])
        (run_dir / "eval.json").write_text(json.dumps(dict(scores, labels=names), indent=1))
        artifacts = {
            key: str(out_dir.resolve()),
            "predictions": str((run_dir / "predictions.csv").resolve()),
            "base_model": cfg.base_model,
        }
        if cfg.export_merged and key == "adapter":
            artifacts["merged_model"] = str(merge_adapter(out_dir, run_dir / "merged").resolve())
        majority = max(np.bincount(test.labels, minlength=len(names))) / len(test)
        summary = {
            "test_accuracy": scores["accuracy"],
            "test_macro_f1": scores["macro_f1"],
            "test_majority_class_accuracy": float(majority),
            "num_test_examples": len(test),
            "trainable_params": trainable,
            "total_params": total,
            "steps": step,
            "best_step": best_step if best_weights is not None else step,
            "best_val_" + cfg.metric: best if best_weights is not None else None,
            "train_time_s": train_time_s,
        }
        tracker.log({k: v for k, v in summary.items() if k.startswith("test_")}, step)
        write_summary(run_dir, summary, artifacts)
        log.info(
            "[%s] test accuracy %.4f | macro-F1 %.4f | majority class %.4f",
            cfg.name,
            scores["accuracy"],
            scores["macro_f1"],
            majority,
        )
        return {"metrics": summary}
    finally:
        tracker.close()


def load_classifier(model_dir: str | Path):
    """(model, tokenizer, labels) from a saved adapter (with its base model) or a full model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    labels_file = model_dir / "labels.json"
    if not labels_file.is_file():
        raise DataError(f"{model_dir} has no labels.json: it is not an adapter or model written by `ptft finetune`")
    names = json.loads(labels_file.read_text())
    kw = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    head_file = model_dir / "classifier.json"
    pooling = json.loads(head_file.read_text())["pooling"] if head_file.is_file() else "cls"
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel
        from transformers import AutoConfig

        base = json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        if not Path(base).is_dir():
            raise DataError(f"{model_dir}: its base model {base} is not a directory here")
        kw.update(pooling_kwargs(models.family_of(AutoConfig.from_pretrained(base)), pooling, base))
        model = PeftModel.from_pretrained(
            AutoModelForSequenceClassification.from_pretrained(base, **kw), str(model_dir)
        )
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), **kw)
    return model.eval(), AutoTokenizer.from_pretrained(str(model_dir)), names


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold the adapter into the base weights: a plain HF classifier directory."""
    model, tokenizer, names = load_classifier(adapter_dir)
    merged = model.merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "labels.json").write_text(json.dumps(names))
    return out
