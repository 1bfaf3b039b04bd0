"""``ptft runs DIR``: finished, stopped, failed and running runs, read from what their run
directories hold. The fast tests write the files with the writers the recipes use; the
distributed one lists real runs (stopped, resumed to the end, failed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import TINY_MODEL

from ptft_dist import config as C
from ptft_dist import jobs
from ptft_dist.cli import main
from ptft_dist.progress import heartbeat
from ptft_dist.runs import list_runs
from ptft_dist.tracking import write_summary


def _run(path, cfg, rows=(), summary=None):
    jobs.prepare_run_dir(path, cfg)
    with open(path / "metrics.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    if summary is not None:
        write_summary(path, summary, {})
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_runs_table_says_each_state(tmp_path, capsys):
    pre = C.load("pretrain", None, ["optim.max_steps=40"])
    t0 = time.time() - 600
    rows = [{"step": s, "time": t0 + s, "train_loss": 5.0} for s in (10, 20)]
    _run(
        tmp_path / "done",
        pre,
        rows + [{"step": 40, "time": t0 + 40, "eval_mlm_loss": 4.25}],
        summary={"steps": 40, "completed": True, "eval_mlm_loss": 4.25, "eval_mlm_accuracy": 0.125},
    )
    _run(tmp_path / "stopped", pre, rows, summary={"steps": 20, "completed": False, "preempted": True})
    failed = _run(tmp_path / "failed", pre, rows)
    heartbeat(failed, 0, 20)
    beat = failed / "progress" / "rank0.json"
    data = json.loads(beat.read_text())
    data.update(pid=_dead_pid(), time=time.time() - 3600)
    beat.write_text(json.dumps(data))
    live = _run(tmp_path / "live", pre, rows)
    heartbeat(live, 0, 20)  # this process: alive
    fin = C.load("finetune")
    _run(
        tmp_path / "nested" / "ft",
        fin,
        [{"step": 50, "time": t0 + 50, "train_loss": 1.0}],
        summary={"test_accuracy": 0.75, "test_macro_f1": 0.5, "steps": 50},
    )
    got = {os.path.relpath(r.path, tmp_path): r for r in list_runs(tmp_path)}
    assert {k: (r.command, r.state, r.steps, r.max_steps) for k, r in got.items()} == {
        "done": ("pretrain", "finished", 40, 40),
        "stopped": ("pretrain", "stopped", 20, 40),
        "failed": ("pretrain", "failed", 20, 40),
        "live": ("pretrain", "running", 20, 40),
        "nested/ft": ("finetune", "finished", 50, 50),
    }
    assert got["done"].eval == {"eval_mlm_loss": 4.25, "eval_mlm_accuracy": 0.125}
    assert got["nested/ft"].eval == {"test_accuracy": 0.75, "test_macro_f1": 0.5}
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["run", "command", "state", "steps", "last", "eval", "started", "duration"]
    assert "40/40" in out and "eval_mlm_loss 4.25" in out and "test_accuracy 0.75" in out
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_pipeline_lists_its_steps_and_failed_jobs(tmp_path):
    pipe = C.load("pipeline", "pipeline_tiny")
    root = tmp_path / "demo"
    jobs.prepare_run_dir(root, pipe)
    write_summary(root, {"jobs": [{"job": "lora", "status": "ok"}, {"job": "head", "status": "failed"}]}, {})
    _run(root / "pretrain", pipe.pretrain, [{"step": 20, "time": 1.0}], summary={"steps": 20, "completed": True})
    rows = {os.path.relpath(r.path, tmp_path): r for r in list_runs(tmp_path)}
    assert rows["demo"].command == "pipeline" and rows["demo"].state == "finished, 1 job(s) failed"
    assert rows["demo/pretrain"].state == "finished"


@pytest.mark.dist
def test_real_runs_stopped_resumed_and_failed(tiny_dataset, tmp_path, ray_session):
    tiny = [
        f"data.dataset_dir={tiny_dataset}",
        *TINY_MODEL,
        "eval_every_steps=1000",
        "data.num_eval_samples=16",
        "optim.max_steps=4",
    ]
    import ptft_dist

    cfg = C.load("pretrain", "pretrain_tiny", [*tiny, "stop_at_step=2", f"run_dir={tmp_path / 'a'}"])
    ptft_dist.pretrain(cfg)  # the Python API records the driver as the CLI does
    (row,) = list_runs(tmp_path / "a")
    assert (row.state, row.steps, row.max_steps) == ("stopped", 2, 4)
    ptft_dist.pretrain(cfg)  # the same command resumes to the end
    (row,) = list_runs(tmp_path / "a")
    assert (row.state, row.steps) == ("finished", 4) and "eval_mlm_loss" in row.eval
    bad = C.load(
        "pretrain", "pretrain_tiny", [*tiny, "optim.lr=1e30", "optim.warmup_steps=0", f"run_dir={tmp_path / 'b'}"]
    )
    with pytest.raises(RuntimeError):
        ptft_dist.pretrain(bad)
    (row,) = list_runs(tmp_path / "b")
    assert row.state == "failed" and "not finite" in row.error


def test_the_driver_record_says_how_a_run_ended(tmp_path, capsys):
    from ptft_dist.jobs import Preempted
    from ptft_dist.runs import record_driver

    pre = C.load("pretrain")
    for name, error, code in (
        ("crashed", RuntimeError("pretraining failed: step 3: the training loss is not finite"), 1),
        ("bad", C.ConfigError("optim.lr must be > 0"), 2),
        ("preempted", Preempted("preempted at step 2"), 75),
    ):
        _run(tmp_path / name, pre, [{"step": 2, "time": time.time()}])
        heartbeat(tmp_path / name, 0, 2)  # this process is alive: the record decides, not the heartbeat
        with pytest.raises(type(error)), record_driver(tmp_path / name, "pretrain"):
            raise error
        assert json.loads((tmp_path / name / "driver.json").read_text())["exit_code"] == code
    with record_driver(tmp_path / "open", "pretrain"):
        (row,) = list_runs(tmp_path / "open")
        assert (row.command, row.state) == ("pretrain", "running")
    rows = {os.path.relpath(r.path, tmp_path): r for r in list_runs(tmp_path)}
    assert rows["crashed"].state == "failed" and "not finite" in rows["crashed"].error
    assert rows["bad"].state == "failed" and rows["preempted"].state == "stopped"
    assert rows["open"].state == "finished"
    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "crashed: pretraining failed: step 3: the training loss is not finite" in out
