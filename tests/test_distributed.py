"""Ray Train + DeepSpeed on tiny models: 2 workers on a local 2-CPU cluster, real shards."""

import json
import time

import pytest
import torch
from helpers import TINY_MODEL

from ptft_dist import config as C
from ptft_dist import jobs
from ptft_dist.tracking import read_metrics

pytestmark = pytest.mark.dist


def _pretrain(tmp_path, dataset, stage, family="modernbert", steps=24):
    cfg = C.load(
        "pretrain",
        "pretrain_tiny",
        [
            f"zero.stage={stage}",
            f"model.family={family}",
            f"optim.max_steps={steps}",
            "eval_every_steps=12",
            "tracking.log_every_steps=4",
            "optim.lr=3e-3",
            f"data.dataset_dir={dataset}",
            f"run_dir={tmp_path / f'pre{stage}{family}'}",
            *TINY_MODEL,
        ],
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
    assert any("rank_0" in n or "rank0" in n for n in shards) and any("rank_1" in n or "rank1" in n for n in shards), (
        shards
    )


def test_the_embedded_cluster_starts_none_of_the_helpers_it_does_not_use(stage2_export, ray_session):
    """The lean local session (launcher.lean): of Ray Train's actors only the controller, the
    report barrier and the workers run (docs/cluster-local.md)."""
    import ray

    classes = {a["ActorClassName"] for a in ray._private.state.actors().values()}
    assert {"TrainController", "RayTrainWorker"} <= classes, classes
    left_out = {"PreemptionWatcher", "PlacementGroupCleaner", "DatasetManager", "_AutoscalingCoordinatorActor"}
    assert not classes & left_out, classes


def _deepspeed_shm_segments() -> set[str]:
    from pathlib import Path

    return {p.name for p in Path("/dev/shm").glob("deepspeed*")}


@pytest.mark.parametrize("stage", [0, 3])
def test_pretrain_other_zero_stages(tmp_path, tiny_dataset, ray_session, stage):
    before = _deepspeed_shm_segments()
    cfg, summary = _pretrain(tmp_path, tiny_dataset, stage)
    _check_pretrain(cfg, summary)
    # DeepSpeed's CPU op would leave a 64 MiB segment per rank in memory (engine.init_distributed)
    assert _deepspeed_shm_segments() <= before


def test_pretrain_bert_family(tmp_path, tiny_dataset, ray_session):
    cfg, summary = _pretrain(tmp_path, tiny_dataset, 2, family="bert", steps=16)
    from transformers import AutoModelForMaskedLM

    assert AutoModelForMaskedLM.from_pretrained(summary["artifacts"]["hf_model"]).config.model_type == "bert"


def _finetune(tmp_path, base, stage, method="lora", extra=()):
    cfg = C.load(
        "finetune",
        "finetune_tiny",
        [
            f"base_model={base}",
            f"zero.stage={stage}",
            f"peft.method={method}",
            "optim.max_steps=20",
            "task.max_length=24",
            f"run_dir={tmp_path / f'ft{stage}{method}'}",
            *extra,
        ],
    )
    return cfg, jobs.finetune(cfg)


def _reload_predictions_match(summary, n=64, pair=False):
    """The saved adapter/model, loaded fresh, predicts what the run wrote in predictions.csv."""
    import csv

    from ptft_dist.adapters import load_classifier

    key = "adapter" if "adapter" in summary["artifacts"] else "model"
    model, tok, names = load_classifier(summary["artifacts"][key])
    rows = list(csv.DictReader(open(summary["artifacts"]["predictions"])))[:n]
    with torch.no_grad():
        enc = tok(
            [r["text"] for r in rows],
            [r["text_pair"] for r in rows] if pair else None,
            truncation=True,
            max_length=24,
            padding=True,
            return_tensors="pt",
        )
        pred = (
            model(**{k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
            .logits.argmax(-1)
            .tolist()
        )
    assert [names[p] for p in pred] == [r["prediction"] for r in rows]
    return model


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_finetune_saves_an_adapter_that_reloads_to_the_same_predictions(
    tmp_path, stage2_export, ray_session, stage
):
    _, pre = stage2_export
    cfg, summary = _finetune(tmp_path, pre["artifacts"]["hf_model"], stage, extra=["export_merged=true"])
    m = summary["metrics"]
    assert m["num_test_examples"] == 500 and 0.0 <= m["test_accuracy"] <= 1.0 and "test_macro_f1" in m
    assert 0 < m["trainable_params"] < m["total_params"]
    model = _reload_predictions_match(summary)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert lora and all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n), "adapter must not be empty"
    heads = [n for n, p in model.named_parameters() if "modules_to_save" in n]
    assert any(".head." in n for n in heads) and any("classifier" in n for n in heads), "the classification head trains"
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(summary["artifacts"]["merged_model"]).eval()
    tok_rows = ["what is the capital of france ?", "who wrote hamlet ?"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(summary["artifacts"]["merged_model"])
    enc = tok(tok_rows, padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(merged(**enc).logits, model(**enc).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["ia3", "head", "full"])
def test_other_methods_train_and_reload(tmp_path, stage2_export, ray_session, method):
    _, pre = stage2_export
    cfg, summary = _finetune(tmp_path, pre["artifacts"]["hf_model"], 2, method=method)
    m = summary["metrics"]
    if method == "full":
        assert m["trainable_params"] == m["total_params"]
    else:
        assert 0 < m["trainable_params"] < m["total_params"] * 0.2
    _reload_predictions_match(summary)


def test_text_pair_task_with_validation_and_early_stopping(tmp_path, stage2_export, ray_session):
    import csv
    import random

    rng = random.Random(0)
    words = ["cat", "dog", "sun", "rain", "city", "river", "music", "stone", "bread", "glass"]
    for name, n in (("train", 400), ("dev", 80), ("test", 80)):
        with open(tmp_path / f"{name}.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["premise", "hypothesis", "label"])
            for _ in range(n):
                a = " ".join(rng.choice(words) for _ in range(5))
                same = rng.random() < 0.5
                b = a if same else " ".join(rng.choice(words) for _ in range(5))
                w.writerow([a, b, "same" if same else "different"])
    _, pre = stage2_export
    extra = [
        f"task.train_file={tmp_path / 'train.csv'}",
        f"task.validation_file={tmp_path / 'dev.csv'}",
        f"task.test_file={tmp_path / 'test.csv'}",
        "task.text_column=premise",
        "task.text_pair_column=hypothesis",
        "eval_every_steps=5",
        "early_stopping_patience=2",
        "metric=macro_f1",
        "optim.max_steps=40",
    ]
    cfg, summary = _finetune(tmp_path, pre["artifacts"]["hf_model"], 2, extra=extra)
    m = summary["metrics"]
    assert m["num_test_examples"] == 80
    assert m["best_val_macro_f1"] is not None and 1 <= m["best_step"] <= m["steps"] <= 40
    vals = [r for r in read_metrics(cfg.run_dir) if "val_macro_f1" in r]
    assert vals and max(r["val_macro_f1"] for r in vals) == pytest.approx(m["best_val_macro_f1"])
    _reload_predictions_match(summary, pair=True)


def test_pipeline_runs_two_finetune_jobs_side_by_side(tmp_path, ray_session):
    cfg = C.load(
        "pipeline",
        "pipeline_tiny",
        [f"run_dir={tmp_path / 'pipe'}", f"finetune.1.task.train_file={tmp_path / 'no_such_file.csv'}"],
    )
    with pytest.raises(Exception, match="no_such_file.csv"):
        jobs.pipeline(cfg)  # a bad job is refused before pretraining starts
    cfg = C.load(
        "pipeline",
        "pipeline_tiny",
        [
            f"run_dir={tmp_path / 'pipe'}",
            "pretrain_on_task_text=true",
            "pretrain.tracking.wandb=true",
            "finetune.0.tracking.wandb=true",
            "finetune.1.tracking.wandb=true",
        ],
    )
    summary = jobs.pipeline(cfg)
    assert summary["metrics"]["pretrain"]["steps"] == 20
    # the finetune jobs' training texts went into the pretraining corpus, once (the jobs share them)
    manifest = json.loads((tmp_path / "pipe" / "data" / "manifest.json").read_text())
    (added,) = manifest["task_text"]
    assert sorted(added["jobs"]) == ["head", "lora"] and sum(added["num_documents"].values()) > 0
    table = {row["job"]: row for row in summary["metrics"]["jobs"]}
    assert set(table) == {"lora", "head"} and all(row["status"] == "ok" for row in table.values())
    assert all(summary["metrics"]["finetune"][j]["num_test_examples"] == 500 for j in table)
    a, b = table["lora"], table["head"]
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"], "the two jobs' run times overlap"
    # both jobs held their workers at once: each started before the other finished (their
    # 30-step loops take about a second, too short to compare the metrics logs' timestamps)
    saved = json.loads((tmp_path / "pipe" / "summary.json").read_text())
    assert saved["artifacts"]["finetune"]["lora"]["adapter"].endswith("finetune/lora/adapter")
    assert (tmp_path / "pipe" / "jobs.csv").read_text().count("\n") == 3
    for part in ("pretrain", "finetune/lora", "finetune/head"):
        assert (tmp_path / "pipe" / part / "config.yaml").is_file()
        assert (tmp_path / "pipe" / part / "metrics.jsonl").is_file()
    # W&B (offline here): one run per job, written by rank 0, all in the pipeline's group
    from helpers import finished_run, offline_runs, run_record

    runs = {
        part: [run_record(finished_run(p)) for p in offline_runs(tmp_path / "pipe" / part)]
        for part in ("pretrain", "finetune/lora", "finetune/head")
    }
    assert [(r.run_group, r.job_type, r.display_name) for part in runs for r in runs[part]] == [
        ("pipe", "pretrain", "pipe-pretrain"),
        ("pipe", "finetune", "pipe-lora"),
        ("pipe", "finetune", "pipe-head"),
    ]
    # the report of the real runs
    from ptft_dist.report import make_report

    made = make_report([tmp_path / "pipe"])
    assert {"loss.png", "lr.png", "tokens_per_s.png", "examples_per_s.png", "test_metrics.png", "per_class_f1.png"} <= {
        p.name for p in made["plots"]
    }
    assert any(p.name.startswith("confusion_") and "lora" in p.name for p in made["plots"])
    assert "test_accuracy" in made["html"].read_text()


def test_a_failing_finetune_job_does_not_stop_the_others(tmp_path, stage2_export, ray_session):
    _, pre = stage2_export
    good = C.load(
        "finetune",
        "finetune_tiny",
        [
            f"base_model={pre['artifacts']['hf_model']}",
            "name=good",
            "optim.max_steps=10",
            "scaling.cpus_per_worker=0.5",
            f"run_dir={tmp_path / 'good'}",
        ],
    )
    bad = C.load(
        "finetune",
        "finetune_tiny",
        [
            f"base_model={tmp_path / 'no_model_here'}",
            "name=bad",
            "optim.max_steps=10",
            "scaling.cpus_per_worker=0.5",
            f"run_dir={tmp_path / 'bad'}",
        ],
    )
    # the bad job's model is missing; resolved as a pipeline does (its model is made later), it fails on the workers
    good, bad = jobs._resolve_finetune(good), jobs._resolve_finetune(bad, check_model=False)
    results = jobs.run_finetune_jobs([good, bad])
    assert results["good"]["metrics"]["status"] == "ok" and results["good"]["metrics"]["num_test_examples"] == 500
    assert results["bad"]["metrics"]["status"] == "failed" and "no_model_here" in results["bad"]["error"]


def test_what_outlives_the_grace_after_ray_shutdown_is_killed(monkeypatch):
    """launcher._reap: a process of an embedded session still running REAP_GRACE_S after
    ray.shutdown() (a Ray Train controller did, holding 490 MB until reboot) is killed."""
    import subprocess

    import psutil

    from ptft_dist import launcher

    monkeypatch.setattr(launcher, "REAP_GRACE_S", 0.5)
    lingering = subprocess.Popen(["sleep", "120"])
    started = time.monotonic()
    launcher._reap([psutil.Process(lingering.pid)])  # it reaps the child too
    assert not psutil.pid_exists(lingering.pid), "a `sleep 120` of the session outlived _reap"
    assert time.monotonic() - started < 5
