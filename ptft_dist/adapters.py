"""Classifiers on an encoder: what trains (LoRA, IA3, the head, everything) through
``peft``, and loading or merging what ``ptft finetune`` saved. Functions over HF models; no
distributed code, no file layout beyond the adapter directory's own.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import engine as engine_lib
from . import models
from .config import FinetuneConfig
from .data.errors import DataError


def build_classifier(cfg: FinetuneConfig, names: list[str], ds: dict):
    """The classifier on the base model, with what trains chosen by ``cfg.peft.method``."""
    from peft import IA3Config, LoraConfig, TaskType, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification

    base = Path(cfg.base_model)  # checked by preflight.check_base_model
    family = models.family_of(AutoConfig.from_pretrained(str(base)))
    with engine_lib.model_init_context(ds):
        model = AutoModelForSequenceClassification.from_pretrained(
            str(base),
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            attn_implementation="sdpa",
            **models.pooling_kwargs(family, cfg.pooling),
        )
    head = models.HEAD_MODULES[family]
    method = cfg.peft.method
    if method == "full":
        return model, family
    if method == "head":
        for name, p in model.named_parameters():
            # a head module anywhere in the name: BERT's pooler is `bert.pooler.*`, its classifier `classifier.*`
            p.requires_grad = any(f".{h}." in f".{name}" for h in head)
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


def resolve_max_length(cfg: FinetuneConfig, tokenizer=None, train=None) -> tuple[FinetuneConfig, str | None]:
    """``cfg`` with ``task.max_length`` set, and the line that says how it was chosen (None
    when the config gave it): the 95th percentile of the training examples' lengths in tokens
    under the base model's tokenizer, capped by the model's longest input
    (:func:`classify.choose_max_length`). ``tokenizer`` and ``train`` (the training split) are
    loaded from the config when not given."""
    import dataclasses

    import numpy as np
    from transformers import AutoConfig, AutoTokenizer

    from .classify import MAX_LENGTH_QUANTILE, choose_max_length, load_splits

    if cfg.task.max_length is not None:
        return cfg, None
    tokenizer = tokenizer or AutoTokenizer.from_pretrained(cfg.base_model)
    train = train if train is not None else load_splits(cfg)[1]
    enc = tokenizer(train.texts, train.pairs, truncation=False, verbose=False)["input_ids"]
    lengths = [len(ids) for ids in enc]
    positions = models.max_input_tokens(AutoConfig.from_pretrained(cfg.base_model))
    chosen = choose_max_length(lengths, positions)
    cut = float(np.mean(np.asarray(lengths) > chosen))
    note = (
        f"[{cfg.name}] task.max_length={chosen}: the {100 * MAX_LENGTH_QUANTILE:.0f}th percentile of the "
        f"{len(lengths):,} training examples' lengths (median {int(np.median(lengths))}, longest {max(lengths)} tokens"
        + (f", capped by the model's {positions} positions" if positions and chosen == positions else "")
        + f"); {cut:.1%} of them are truncated"
    )
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, max_length=chosen)), note


def classifier_meta(model_dir: str | Path) -> dict:
    """What ``ptft finetune`` recorded beside the weights (``classifier.json``): ``pooling`` and
    ``max_length`` (the task's, in tokens); empty for a directory without it (older runs)."""
    path = Path(model_dir) / "classifier.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def load_classifier(model_dir: str | Path):
    """(model, tokenizer, labels) from a saved adapter (with its base model) or a full model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    labels_file = model_dir / "labels.json"
    if not labels_file.is_file():
        raise DataError(f"{model_dir} has no labels.json: it is not an adapter or model written by `ptft finetune`")
    names = json.loads(labels_file.read_text())
    kw = dict(num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    pooling = classifier_meta(model_dir).get("pooling", "cls")
    if (model_dir / "adapter_config.json").is_file():
        from peft import PeftModel
        from transformers import AutoConfig

        base = json.loads((model_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
        if not Path(base).is_dir():
            raise DataError(f"{model_dir}: its base model {base} is not a directory here")
        kw.update(models.pooling_kwargs(models.family_of(AutoConfig.from_pretrained(base)), pooling))
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
    meta = classifier_meta(adapter_dir)
    if meta:
        (out / "classifier.json").write_text(json.dumps(meta))
    return out
