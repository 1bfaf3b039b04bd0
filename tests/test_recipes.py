"""The recipes in one process (``run(cfg, World())``, no Ray): resume, non-finite steps and
the save cadence, in seconds. The Ray tests (test_resume, test_faults, test_bad_input) stay
the end-to-end proof on two workers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import TINY_MODEL
from safetensors.torch import load_file

from ptft_dist import checkpoint
from ptft_dist import config as C
from ptft_dist.recipes import pretrain
from ptft_dist.tracking import read_metrics
from ptft_dist.world import World

TINY = [
    "scaling.num_workers=1",
    *TINY_MODEL,
    "optim.lr=3e-3",
    "optim.warmup_steps=3",
    "tracking.log_every_steps=1",
    "tracking.wandb=false",
    "eval_every_steps=100",
]


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """The recipe makes a process group of one; it goes when this module's tests are done."""
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _cfg(tiny_dataset, run_dir, *overrides) -> C.PretrainConfig:
    return C.load(
        "pretrain", "pretrain_tiny", [f"data.dataset_dir={tiny_dataset}", *TINY, f"run_dir={run_dir}", *overrides]
    )


def _train_rows(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "train_loss" in r}


def test_stop_and_resume_in_one_process_equals_the_uninterrupted_run(tmp_path, tiny_dataset):
    straight = pretrain.run(_cfg(tiny_dataset, tmp_path / "straight", "optim.max_steps=8"), World())
    assert straight["metrics"]["completed"] and straight["metrics"]["steps"] == 8

    paused_cfg = _cfg(tiny_dataset, tmp_path / "paused", "optim.max_steps=8", "stop_at_step=3")
    assert pretrain.run(paused_cfg, World()) is None  # paused: no export, a checkpoint
    ckpt = checkpoint.latest(tmp_path / "paused" / "checkpoints")
    assert ckpt is not None and checkpoint.TrainState.read(ckpt).step == 3
    resumed = pretrain.run(paused_cfg, World(), resume_dir=str(ckpt))
    assert resumed["metrics"]["completed"] and resumed["metrics"]["steps"] == 8

    a, b = _train_rows(tmp_path / "straight"), _train_rows(tmp_path / "paused")
    assert sorted(b) == list(range(1, 9))
    for step in a:
        assert abs(a[step]["train_loss"] - b[step]["train_loss"]) <= 1e-6, step
        assert a[step]["lr"] == b[step]["lr"], step
    wa = load_file(str(tmp_path / "straight" / "export" / "model.safetensors"))
    wb = load_file(str(tmp_path / "paused" / "export" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_checkpoints_follow_the_save_cadence_and_the_last_step(tmp_path, tiny_dataset):
    pretrain.run(_cfg(tiny_dataset, tmp_path, "optim.max_steps=5", "checkpoint.every_steps=2"), World())
    saved = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert saved == ["step_00000002", "step_00000004", "step_00000005"]
    for name in saved:
        folder = tmp_path / "checkpoints" / name
        state = checkpoint.TrainState.read(folder)
        assert checkpoint.is_complete(folder) and state.step == int(name[5:])
        assert state.samples_seen == 16 * state.step and state.data_position["batches"] == 2 * state.step


def test_a_skipped_step_logs_no_loss_and_the_lr_it_ran_with(tmp_path, tiny_dataset):
    """on_nonfinite_loss: skip: the bad step's row says so (train_loss null, skipped, lr 0),
    the steps around it are finite, and the lr goes back to the schedule's."""
    summary = pretrain.run(
        _cfg(tiny_dataset, tmp_path, "optim.max_steps=5", "on_nonfinite_loss=skip", "inject_nonfinite_at_steps=[3]"),
        World(),
    )
    assert summary["metrics"]["nonfinite_skipped_steps"] == 1
    rows = _train_rows(tmp_path)
    bad = rows[3]
    assert bad["train_loss"] is None and bad["skipped"] is True and bad["lr"] == 0.0
    assert bad["nonfinite_skipped_steps"] == 1
    for step in (1, 2, 4, 5):
        assert math.isfinite(rows[step]["train_loss"]) and "skipped" not in rows[step] and rows[step]["lr"] > 0
    # the metrics file itself has a JSON null, not 0.0 or NaN
    line = next(r for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"step": 3' in r)
    assert json.loads(line)["train_loss"] is None


def test_a_nonfinite_loss_stops_the_run_naming_the_step(tmp_path, tiny_dataset):
    with pytest.raises(FloatingPointError, match=r"step 2: the training loss is not finite on 1 of 1 ranks"):
        pretrain.run(_cfg(tiny_dataset, tmp_path, "optim.max_steps=4", "inject_nonfinite_at_steps=[2]"), World())
    assert not Path(tmp_path, "export").exists()


def test_a_run_sized_in_tokens_runs_the_steps_they_make(tmp_path, tiny_dataset):
    """optim.max_tokens: floor(tokens / (global batch x seq_len)) steps, said in config.yaml."""
    summary = pretrain.run(_cfg(tiny_dataset, tmp_path, "optim.max_tokens=3000"), World())
    assert summary["metrics"]["steps"] == 3000 // (16 * 64) and summary["metrics"]["tokens_seen"] == 2 * 16 * 64
