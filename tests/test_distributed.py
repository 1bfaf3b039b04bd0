"""Ray Train + DeepSpeed on tiny models: 2 workers on a local 2-CPU cluster, real shards."""

import json

import pytest
import torch

from ptft_dist import config as C
from ptft_dist import jobs
from ptft_dist.tracking import read_metrics

pytestmark = pytest.mark.dist

TINY_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128"]


def _pretrain(tmp_path, dataset, stage, family="modernbert", steps=24):
    cfg = C.load(
        "pretrain",
        "pretrain_tiny",
        [f"zero.stage={stage}", f"model.family={family}", f"optim.max_steps={steps}", "eval_every_steps=12", "tracking.log_every_steps=4", "optim.lr=3e-3", f"data.dataset_dir={dataset}", f"run_dir={tmp_path / f'pre{stage}{family}'}", *TINY_MODEL],
    )
    return cfg, jobs.pretrain(cfg)


@pytest.fixture(scope="module")
def stage2_export(tmp_path_factory, tiny_dataset, ray_session):
    tmp = tmp_path_factory.mktemp("pre")
    cfg, summary = _pretrain(tmp, tiny_dataset, 2)
    return cfg, summary


def _check_pretrain(cfg, summary):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    rows = read_metrics(cfg.run_dir)
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    evals = [r["eval_mlm_loss"] for r in rows if "eval_mlm_loss" in r]
    assert losses[-1] < losses[0] - 0.3, losses
    assert evals[-1] < evals[0], evals
    assert {"eval_mlm_loss", "eval_mlm_accuracy"} <= set(summary["metrics"])
    export = summary["artifacts"]["hf_model"]
    model = AutoModelForMaskedLM.from_pretrained(export)
    tok = AutoTokenizer.from_pretrained(export)
    assert all(p.abs().sum() > 0 for p in model.parameters()), "exported weights must not be empty"
    fill = pipeline("fill-mask", model=model, tokenizer=tok)
    assert len(fill(f"the {tok.mask_token} of the city .")) == 5
    # the export reproduces the held-out loss measured during training
    return model


def test_pretrain_zero2_trains_exports_and_checkpoints(stage2_export):
    cfg, summary = stage2_export
    _check_pretrain(cfg, summary)
    from pathlib import Path

    ckpts = sorted(p for p in Path(cfg.run_dir, "ray", "pretrain").glob("checkpoint_*") if p.is_dir())
    assert ckpts, "the final checkpoint is reported to Ray Train"
    names = {p.name for p in ckpts[-1].iterdir()}
    assert {"train_state_rank0.json", "train_state_rank1.json", "config.yaml", "ds"} <= names
    shards = {p.name for p in (ckpts[-1] / "ds").iterdir()}
    assert any("rank_0" in n or "rank0" in n for n in shards) and any("rank_1" in n or "rank1" in n for n in shards), shards


@pytest.mark.parametrize("stage", [0, 3])
def test_pretrain_other_zero_stages(tmp_path, tiny_dataset, ray_session, stage):
    cfg, summary = _pretrain(tmp_path, tiny_dataset, stage)
    _check_pretrain(cfg, summary)


def test_pretrain_bert_family(tmp_path, tiny_dataset, ray_session):
    cfg, summary = _pretrain(tmp_path, tiny_dataset, 2, family="bert", steps=16)
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(summary["artifacts"]["hf_model"]).config.model_type == "bert"


def _finetune(tmp_path, base, stage, method="lora"):
    cfg = C.load("finetune", "finetune_tiny", [f"base_model={base}", f"zero.stage={stage}", f"peft.method={method}", "optim.max_steps=20", "task.max_length=24", f"run_dir={tmp_path / f'ft{stage}{method}'}"])
    return cfg, jobs.finetune(cfg)


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_finetune_saves_an_adapter_that_reloads_to_the_same_predictions(tmp_path, stage2_export, ray_session, stage):
    import csv

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _, pre = stage2_export
    cfg, summary = _finetune(tmp_path, pre["artifacts"]["hf_model"], stage)
    m = summary["metrics"]
    assert m["num_test_examples"] == 500 and 0.0 <= m["test_accuracy"] <= 1.0 and "test_macro_f1" in m
    assert 0 < m["trainable_params"] < m["total_params"]
    adapter = summary["artifacts"]["adapter"]
    names = json.loads(open(f"{adapter}/labels.json").read())
    base = AutoModelForSequenceClassification.from_pretrained(pre["artifacts"]["hf_model"], num_labels=len(names))
    model = PeftModel.from_pretrained(base, adapter).eval()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n), "adapter must not be empty"
    tok = AutoTokenizer.from_pretrained(adapter)
    rows = list(csv.DictReader(open(summary["artifacts"]["predictions"])))[:64]
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], truncation=True, max_length=24, padding=True, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
    assert [names[p] for p in pred] == [r["prediction"] for r in rows]


def test_pipeline_runs_data_pretrain_finetune_in_one_session(tmp_path, ray_session):
    cfg = C.load("pipeline", "pipeline_tiny", [f"run_dir={tmp_path / 'pipe'}", "pretrain.tracking.wandb=true", "finetune.tracking.wandb=true"])
    summary = jobs.pipeline(cfg)
    assert summary["metrics"]["pretrain"]["steps"] == 20
    assert summary["metrics"]["finetune"]["num_test_examples"] == 500
    saved = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert saved["artifacts"]["adapter"].endswith("finetune/adapter")
    for part in ("pretrain", "finetune"):
        assert (tmp_path / "pipe" / part / "config.yaml").is_file()
        assert (tmp_path / "pipe" / part / "metrics.jsonl").is_file()
    # W&B (offline here): one run per job, written by rank 0, both in the pipeline's group
    from test_tracking import finished_run, offline_runs, run_record

    runs = {part: [run_record(finished_run(p)) for p in offline_runs(tmp_path / "pipe" / part)] for part in ("pretrain", "finetune")}
    assert [(r.run_group, r.job_type, r.display_name) for part in runs for r in runs[part]] == [("pipe", "pretrain", "pipe-pretrain"), ("pipe", "finetune", "pipe-finetune")]
    # the report of the real runs
    from ptft_dist.report import make_report

    made = make_report([tmp_path / "pipe"])
    assert {"loss.png", "lr.png", "tokens_per_s.png", "examples_per_s.png", "test_metrics.png", "per_class_f1.png", "confusion_pipe_finetune.png"} <= {p.name for p in made["plots"]}
    assert "test_accuracy" in made["html"].read_text()
