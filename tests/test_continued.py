"""Continued pretraining from an export on new text with the same tokenizer, and the finetune
options for other tasks than SST-2 (task.max_length from the data, class-weighted loss), in one
process (``run(cfg, World())``, no Ray)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_MODEL

from ptft_dist import adapters, preflight
from ptft_dist import config as C
from ptft_dist.classify import choose_max_length, class_weights, load_splits
from ptft_dist.data.build import DataError, build, read_manifest, tokenizer_sha256
from ptft_dist.data.labeled import materialize_trec
from ptft_dist.recipes import finetune, pretrain
from ptft_dist.tracking import read_metrics
from ptft_dist.world import World

ONE_PROCESS = ["scaling.num_workers=1", "tracking.wandb=false", "tracking.log_every_steps=1"]


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """The recipes make a process group of one; it goes when this module's tests are done."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _pretrain(dataset: Path, run_dir: Path, *overrides: str) -> dict:
    cfg = C.load(
        "pretrain",
        "pretrain_tiny",
        [f"data.dataset_dir={dataset}", *ONE_PROCESS, *TINY_MODEL, f"run_dir={run_dir}", "eval_every_steps=100"]
        + list(overrides),
    )
    return pretrain.run(cfg, World())


@pytest.fixture(scope="module")
def general_export(tiny_dataset, tmp_path_factory) -> Path:
    """A tiny model pretrained for 30 steps on WikiText-2: its HF export."""
    run_dir = tmp_path_factory.mktemp("general")
    summary = _pretrain(tiny_dataset, run_dir, "optim.max_steps=30", "optim.lr=3e-3")
    return Path(summary["artifacts"]["hf_model"])


def _first_loss(run_dir: Path) -> float:
    return next(r["train_loss"] for r in read_metrics(run_dir) if r.get("step") == 1 and "train_loss" in r)


def test_continued_pretraining_loads_trains_and_exports_with_the_same_tokenizer(general_export, tiny_dataset, tmp_path):
    # 1. the new (in-domain) corpus, tokenized with the export's tokenizer
    train, _ = materialize_trec(tmp_path / "trec")
    data = C.load(
        "data",
        None,
        [f"data.inputs=[{train}]", f"data.tokenizer.path={general_export}", "data.seq_len=64"]
        + ["data.samples_per_shard=50", "data.validation_fraction=0.05"],
    ).data
    manifest = build(data, tmp_path / "trec_data", progress=False)
    assert manifest["tokenizer"]["sha256"] == tokenizer_sha256(general_export)

    # 2. pretraining goes on from the export's weights, on the new corpus
    run_dir = tmp_path / "continued"
    summary = _pretrain(tmp_path / "trec_data", run_dir, f"model.init_from={general_export}", "optim.max_steps=6")
    assert summary["metrics"]["completed"] and summary["metrics"]["steps"] == 6
    fresh = _pretrain(tmp_path / "trec_data", tmp_path / "fresh", "optim.max_steps=1")
    assert _first_loss(run_dir) < _first_loss(tmp_path / "fresh") - 0.5, "the export's weights were loaded"

    # 3. the export keeps the tokenizer: the same hash all along
    export = Path(summary["artifacts"]["hf_model"])
    assert (
        tokenizer_sha256(export)
        == tokenizer_sha256(general_export)
        == read_manifest(tiny_dataset)["tokenizer"]["sha256"]
    )
    from safetensors.torch import load_file

    before, after = load_file(str(general_export / "model.safetensors")), load_file(str(export / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before), "it trained"
    assert fresh["metrics"]["steps"] == 1


def test_another_tokenizer_is_refused_saying_how_to_build_the_data(general_export, tmp_path):
    train, _ = materialize_trec(tmp_path / "trec")
    data = C.load(
        "data", None, [f"data.inputs=[{train}]", "data.tokenizer.vocab_size=500", "data.samples_per_shard=50"]
    ).data
    build(data, tmp_path / "own_tokenizer", progress=False)
    model = C.ModelConfig(init_from=str(general_export))
    with pytest.raises(DataError) as e:
        preflight.check_dataset(str(tmp_path / "own_tokenizer"), model)
    assert "is not the one" in str(e.value)
    assert f"ptft data build --run-dir <new dir> data.inputs=[...] data.tokenizer.path={general_export}" in str(e.value)
    # in a pipeline the data is tokenized with the model's tokenizer; naming another one is refused early
    with pytest.raises(DataError, match=r"continued pretraining needs the model's own tokenizer"):
        preflight.check_continued_tokenizer(str(general_export), str(tmp_path / "own_tokenizer" / "tokenizer"))
    assert "tokenized with its tokenizer" in preflight.check_continued_tokenizer(str(general_export), None)


# --------------------------------------------------------------------------- finetuning options


def _finetune_cfg(export: Path, run_dir: Path, train: Path, test: Path, *overrides: str) -> C.FinetuneConfig:
    return C.load(
        "finetune",
        "finetune_tiny",
        [
            f"base_model={export}",
            f"run_dir={run_dir}",
            f"task.train_file={train}",
            f"task.test_file={test}",
            "task.max_length=null",
            "peft.method=full",
            "optim.global_batch_size=16",
            "optim.micro_batch_size_per_rank=16",
            "optim.max_steps=4",
            "optim.warmup_steps=1",
            *ONE_PROCESS,
            *overrides,
        ],
    )


def test_max_length_is_the_95th_percentile_of_the_training_lengths(general_export, tmp_path, caplog):
    train, test = materialize_trec(tmp_path / "trec")
    cfg = _finetune_cfg(general_export, tmp_path / "ft", train, test)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(general_export))
    lengths = [len(ids) for ids in tok(load_splits(cfg)[1].texts)["input_ids"]]
    expected = int(np.quantile(lengths, 0.95, method="higher"))
    assert 15 < expected < 40  # TREC questions: short
    with caplog.at_level("INFO", logger="ptft_dist.recipes.finetune"):
        summary = finetune.run(cfg, World())
    assert summary["metrics"]["max_length"] == expected
    assert f"task.max_length={expected}: the 95th percentile" in caplog.text

    # long documents are capped by the model's positions
    long = tmp_path / "long.csv"
    with open(long, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        writer.writerows([[" ".join(["word"] * (600 + i)), "ab"[i % 2]] for i in range(40)])
    chosen, note = adapters.resolve_max_length(dataclasses.replace(cfg, task=C.TaskConfig(train_file=str(long))))
    assert chosen.task.max_length == 512 and "capped by the model's 512 positions" in note
    given, none = adapters.resolve_max_length(
        _finetune_cfg(general_export, tmp_path, train, test, "task.max_length=48")
    )
    assert given.task.max_length == 48 and none is None
    assert choose_max_length([3, 4, 5], None) == 8 and choose_max_length(list(range(1, 101)), 50) == 50


def test_class_weights_balance_the_loss(general_export, tmp_path):
    assert class_weights([0, 0, 0, 1], 3, "none") is None
    assert class_weights([0, 0, 0, 1], 3, "balanced") == pytest.approx([4 / 6, 2.0, 0.0])
    assert class_weights([0, 0, 0, 1], 3, "sqrt") == pytest.approx([(4 / 6) ** 0.5, 2**0.5, 0.0])

    # on a balanced task every weight is 1: the weighted loss is the plain one, step for step
    src, test = materialize_trec(tmp_path / "trec")
    with open(src, newline="") as fh:
        rows = list(csv.DictReader(fh))
    per_class: dict[str, list] = {}
    for row in rows:
        per_class.setdefault(row["label"], []).append(row)
    balanced = tmp_path / "balanced.csv"
    with open(balanced, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["text", "label"])
        writer.writeheader()
        writer.writerows(r for part in per_class.values() for r in part[:60])
    losses = {}
    for mode in ("none", "balanced"):
        run_dir = tmp_path / mode
        cfg = _finetune_cfg(general_export, run_dir, balanced, test, f"task.class_weights={mode}", "task.max_length=32")
        finetune.run(cfg, World())
        losses[mode] = [r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert len(losses["none"]) == 4
    np.testing.assert_allclose(losses["balanced"], losses["none"], rtol=1e-5)
    assert json.loads((tmp_path / "balanced" / "summary.json").read_text())["metrics"]["max_length"] == 32


def test_eval_every_steps_0_evaluates_once_at_the_end(general_export, tiny_dataset, tmp_path):
    """0 is "only at the end" in both recipes (with a validation file too), and a negative
    value is refused by the config check."""
    train, test = materialize_trec(tmp_path / "trec")
    cfg = _finetune_cfg(
        general_export, tmp_path / "ft", train, test, f"task.validation_file={test}", "eval_every_steps=0"
    )
    finetune.run(cfg, World())
    assert [r["step"] for r in read_metrics(tmp_path / "ft") if "val_accuracy" in r] == [4]
    _pretrain(tiny_dataset, tmp_path / "pre", "optim.max_steps=3", "eval_every_steps=0")
    assert [r["step"] for r in read_metrics(tmp_path / "pre") if "eval_mlm_loss" in r] == [3]
    with pytest.raises(C.ConfigError, match=r"eval_every_steps must be >= 0 \(0: evaluate only at the end\), got -1"):
        _finetune_cfg(general_export, tmp_path / "bad", train, test, "eval_every_steps=-1").check()
