import json

from ptft_dist.config import TrackingConfig
from ptft_dist.tracking import Tracker, read_metrics, write_summary
from ptft_dist.world import World


def test_jsonl_on_rank_zero_only(tmp_path):
    t0 = Tracker(tmp_path / "r0", TrackingConfig(), World(rank=0, world_size=2))
    t1 = Tracker(tmp_path / "r1", TrackingConfig(), World(rank=1, world_size=2))
    for t in (t0, t1):
        t.log({"train_loss": 1.5, "bad": float("nan")}, step=3)
        t.close()
    rows = read_metrics(tmp_path / "r0")
    assert rows[0]["step"] == 3 and rows[0]["train_loss"] == 1.5 and rows[0]["bad"] is None
    assert not (tmp_path / "r1").exists()


def test_wandb_offline_run_holds_config_and_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    t = Tracker(tmp_path, TrackingConfig(wandb=True, project="p", tags=["t"]), World(), config={"optim": {"lr": 0.01}})
    t.log({"train_loss": 2.0}, step=1)
    t.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (record,) = runs[0].glob("*.wandb")
    raw = record.read_bytes()  # the offline run log (protobuf records) holds config and history
    assert b"optim" in raw and b"train_loss" in raw


def test_summary_is_written_atomically(tmp_path):
    write_summary(tmp_path / "x", {"a": 1.0}, {"m": "/p"})
    assert json.loads((tmp_path / "x" / "summary.json").read_text()) == {"metrics": {"a": 1.0}, "artifacts": {"m": "/p"}}
    assert not list((tmp_path / "x").glob("*.tmp"))
