import json
import logging
from dataclasses import dataclass

import pytest
from helpers import finished_run, history, offline_runs, run_record

from ptft_dist import config as C
from ptft_dist.config import TrackingConfig
from ptft_dist.tracking import Tracker, read_metrics, wandb_mode, write_summary
from ptft_dist.world import World


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_jsonl_on_rank_zero_only(tmp_path):
    t0 = Tracker(tmp_path / "r0", TrackingConfig(), World(rank=0, world_size=2))
    t1 = Tracker(tmp_path / "r1", TrackingConfig(), World(rank=1, world_size=2))
    for t in (t0, t1):
        t.log({"train_loss": 1.5, "bad": float("nan")}, step=3)
        t.close()
    rows = read_metrics(tmp_path / "r0")
    assert rows[0]["step"] == 3 and rows[0]["train_loss"] == 1.5 and rows[0]["bad"] is None
    assert not (tmp_path / "r1").exists()
    assert t0.run_id is None and not (tmp_path / "r0" / "wandb").exists()


def test_wandb_offline_run_holds_config_metrics_and_system_metrics(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc login either
    assert wandb_mode() == "offline"
    cfg = TrackingConfig(wandb=True, project="p", group="demo", tags=["t"])
    with caplog.at_level(logging.INFO, logger="ptft_dist.tracking"):
        t = Tracker(
            tmp_path / "pretrain",
            cfg,
            World(),
            config={"optim": {"lr": 0.01}, "zero": {"stage": 2}},
            job_type="pretrain",
        )
        t.log({"train_loss": 2.0, "lr": 0.001, "grad_norm": None}, step=10)
        t.log({"train_loss": 1.5, "lr": 0.002}, step=20)
        t.log({"eval_mlm_loss": 1.7}, step=20)
        t.close()
    (part,) = offline_runs(tmp_path / "pretrain")
    records = finished_run(part)
    run = run_record(records)
    assert run.run_id == t.run_id and run.project == "p" and run.run_group == "demo" and run.job_type == "pretrain"
    assert run.display_name == "demo-pretrain" and list(run.tags) == ["t"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["optim"] == {"lr": 0.01} and config["zero"] == {"stage": 2}
    # every metric is plotted against the optimizer step
    metrics = [r.metric for r in records if r.WhichOneof("record_type") == "metric"]
    assert any(m.glob_name == "*" and m.step_metric == "step" for m in metrics)
    rows = history(records)
    assert [(r["step"], r.get("train_loss"), r.get("eval_mlm_loss")) for r in rows] == [
        (10, 2.0, None),
        (20, 1.5, None),
        (20, None, 1.7),
    ]
    assert "grad_norm" not in rows[0]  # None is not sent
    # system metrics (CPU, memory, ...) are sampled by W&B itself
    stats = [r.stats for r in records if r.WhichOneof("record_type") == "stats"]
    assert stats and any(item.key == "memory_percent" for s in stats for item in s.item)
    assert any(m.endswith(f"upload later with: wandb sync {part}") for m in caplog.messages)


def test_a_tracker_resumed_with_the_run_id_continues_the_same_run(tmp_path, offline):
    cfg = TrackingConfig(wandb=True)
    first = Tracker(tmp_path, cfg, World(), config={"a": 1})
    first.log({"train_loss": 3.0}, step=5)
    first.close()
    # what the recipe stores in its checkpoint, and hands back on resume
    stored = first.run_id
    assert stored and len(stored) == 8
    second = Tracker(tmp_path, cfg, World(), config={"a": 1}, resume_id=stored)
    assert second.run_id == stored
    second.log({"train_loss": 2.5}, step=5)  # the step after the checkpoint, logged again
    second.close()
    parts = offline_runs(tmp_path)
    assert len(parts) == 2
    assert [run_record(finished_run(p)).run_id for p in parts] == [stored, stored]
    assert second.sync_command() == "wandb sync " + " ".join(str(p) for p in parts)
    # the JSONL keeps both rows; readers take the last value of a step
    assert [r["train_loss"] for r in read_metrics(tmp_path)] == [3.0, 2.5]
    # a new job gets a new run; a configured id is used as is
    third = Tracker(tmp_path / "other", cfg, World())
    fourth = Tracker(tmp_path / "fixed", TrackingConfig(wandb=True, run_id="my-run_1"), World())
    for t in (third, fourth):
        t.close()
    assert third.run_id not in (None, stored) and fourth.run_id == "my-run_1"


def test_wandb_disabled_by_config_or_environment(tmp_path, monkeypatch):
    off = Tracker(tmp_path / "off", TrackingConfig(wandb=False), World())
    off.log({"x": 1.0}, step=1)
    off.close()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    disabled = Tracker(tmp_path / "disabled", TrackingConfig(wandb=True), World())
    disabled.log({"x": 1.0}, step=1)
    disabled.close()
    for name, t in (("off", off), ("disabled", disabled)):
        assert t.run_id is None and not (tmp_path / name / "wandb").exists()
        assert read_metrics(tmp_path / name)[0]["x"] == 1.0


def test_a_wandb_login_in_netrc_means_online(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    netrc = tmp_path / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline"


@dataclass(kw_only=True)
class _WithSecrets:
    run_dir: str = "runs/x"
    hub_token: str | None = None
    tokenizer: str = "tok"
    tracking: TrackingConfig = C.f(factory=TrackingConfig)


def test_no_secret_reaches_config_dumps_summary_logs_or_wandb(tmp_path, monkeypatch, caplog):
    api_key = "local-0123456789abcdef0123456789abcdef01234567"
    hub_token = "hf_SECRETvalue42"
    monkeypatch.setenv("WANDB_API_KEY", api_key)
    monkeypatch.setenv("HF_TOKEN", hub_token)
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key would mean online; no network here
    cfg = _WithSecrets(hub_token=hub_token, tracking=TrackingConfig(wandb=True, name=f"run-{api_key}"))
    dumped = C.dump_yaml(cfg)
    assert hub_token not in dumped and "hub_token: '***'" in dumped and "tokenizer: tok" in dumped
    (tmp_path / "config.yaml").write_text(dumped)
    with caplog.at_level(logging.DEBUG):
        t = Tracker(tmp_path, TrackingConfig(wandb=True), World(), config=C.to_dict(cfg))
        t.log({"train_loss": 1.0}, step=1)
        t.summary({"note": f"key={api_key}", "test_accuracy": 0.5})
        t.close()
        write_summary(
            tmp_path, {"test_accuracy": 0.5, "api_key": api_key}, {"model": f"/x/{hub_token}/m", "tokenizer": "/x/tok"}
        )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {
        "metrics": {"test_accuracy": 0.5, "api_key": "***"},
        "artifacts": {"model": "/x/***/m", "tokenizer": "/x/tok"},
    }
    (part,) = offline_runs(tmp_path)
    config = {u.key: json.loads(u.value_json) for u in run_record(finished_run(part)).config.update}
    assert config["hub_token"] == "***" and config["tracking"]["name"] == "run-***" and config["tokenizer"] == "tok"
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 5
    for p in files:
        raw = p.read_bytes()
        assert api_key.encode() not in raw and hub_token.encode() not in raw, f"a secret leaked into {p}"
    assert not any(api_key in m or hub_token in m for m in caplog.messages)


def test_tracking_fields_are_checked():
    with pytest.raises(C.ConfigError, match=r"tracking\.run_id"):
        C.load("pretrain", overrides=["tracking.run_id=has/slash"])
    with pytest.raises(C.ConfigError, match=r"finetune\.tracking\.log_every_steps"):
        C.load("pipeline", overrides=["finetune.tracking.log_every_steps=0"])
    cfg = C.load("finetune", overrides=["tracking.group=demo", "tracking.run_id=abc-123"])
    assert (cfg.tracking.group, cfg.tracking.run_id) == ("demo", "abc-123")


def test_summary_is_written_atomically(tmp_path):
    write_summary(tmp_path / "x", {"a": 1.0}, {"m": "/p"})
    assert json.loads((tmp_path / "x" / "summary.json").read_text()) == {
        "metrics": {"a": 1.0},
        "artifacts": {"m": "/p"},
    }
    assert not list((tmp_path / "x").glob("*.tmp"))
