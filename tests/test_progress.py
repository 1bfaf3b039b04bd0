"""The driver's progress lines (ptft_dist.progress.Monitor), from real run-directory files."""

import json
import os
import time

from ptft_dist.progress import Monitor, duration, heartbeat


def _append(run_dir, *rows, newline=True):
    with open(run_dir / "metrics.jsonl", "a") as fh:
        for i, row in enumerate(rows):
            fh.write(json.dumps(row) + ("\n" if newline or i < len(rows) - 1 else ""))


def test_durations_read_like_a_clock():
    assert [duration(s) for s in (0, 42.7, 331, 7500)] == ["0s", "42s", "5m31s", "2h05m"]


def test_each_logged_step_becomes_one_compact_line(tmp_path):
    said = []
    mon = Monitor(tmp_path, "pretrain", max_steps=2000, say=said.append)
    _append(
        tmp_path,
        {"step": 20, "time": 100.0, "train_loss": 7.5, "tokens_per_s": 4812.0, "eta_s": 331.0},
        {"step": 20, "time": 100.5, "eval_mlm_loss": 7.31, "eval_mlm_accuracy": 0.0512},
    )
    mon.poll()
    assert said == [
        "pretrain | step 20/2,000 | loss 7.500 | 4.8k tok/s | ETA 5m31s",
        "pretrain | step 20 eval | MLM loss 7.310 | masked-token accuracy 5.1%",
    ]

    # a row being written is left for the next look; finetuning rows have no ETA of their own
    said.clear()
    ft = Monitor(tmp_path / "ft", "finetune[sst2]", max_steps=100, say=said.append)
    (tmp_path / "ft").mkdir()
    _append(
        tmp_path / "ft",
        {"step": 10, "time": 10.0, "train_loss": 0.7, "examples_per_s": 250.0},
        {"step": 20, "time": 20.0, "train_loss": 0.6, "examples_per_s": 251.0},
        newline=False,
    )
    ft.poll()
    assert said == ["finetune[sst2] | step 10/100 | loss 0.700 | 250 examples/s"]
    with open(tmp_path / "ft" / "metrics.jsonl", "a") as fh:
        fh.write("\n" + json.dumps({"step": 20, "time": 20.5, "val_accuracy": 0.8, "val_macro_f1": 0.79}) + "\n")
    ft.poll()
    assert said[1:] == [
        "finetune[sst2] | step 20/100 | loss 0.600 | 251 examples/s | ETA 1m20s",
        "finetune[sst2] | step 20 validation | accuracy 80.0% | macro-F1 0.790",
    ]


def test_a_time_budget_replaces_the_step_total(tmp_path):
    said = []
    mon = Monitor(tmp_path, "pretrain", max_steps=1_000_000, time_budget_s=600, say=said.append)
    _append(
        tmp_path,
        {"step": 80, "time": 1.0, "train_loss": 6.8, "tokens_per_s": 4900.0, "train_time_s": 68.0, "eta_s": 532.0},
    )
    mon.poll()
    assert said == ["pretrain | step 80 | loss 6.800 | 4.9k tok/s | 1m08s of 10m00s budget | ETA 8m52s"]


def test_a_resumed_run_prints_only_its_new_rows(tmp_path):
    _append(tmp_path, {"step": 5, "time": 1.0, "train_loss": 9.0, "tokens_per_s": 10.0})
    said = []
    mon = Monitor(tmp_path, "pretrain", max_steps=10, say=said.append)
    mon.poll()
    assert said == []
    _append(tmp_path, {"step": 6, "time": 2.0, "train_loss": 8.0, "tokens_per_s": 10.0})
    mon.poll()
    assert said == ["pretrain | step 6/10 | loss 8.000 | 10 tok/s"]


def test_slow_checkpoints_and_resource_waits_are_said(tmp_path):
    said, asked = [], []

    def waiting():
        asked.append(1)
        return "2 workers x 1 CPU; free now: 0.5 CPU"

    mon = Monitor(
        tmp_path, "finetune[b]", max_steps=10, waiting=waiting, say=said.append, wait_notice_s=0.0, slow_phase_s=1.0
    )
    mon.poll()
    assert len(said) == 1 and said[0].startswith(
        "finetune[b] | waiting 0s for cluster resources: 2 workers x 1 CPU; free now: 0.5 CPU"
    )

    # a worker is up: no more resource questions; a checkpoint that takes long is said once
    (tmp_path / "progress").mkdir()
    now = time.time()
    (tmp_path / "progress" / "rank0.json").write_text(
        json.dumps({"pid": 1, "step": 200, "time": now, "phase": "checkpoint", "phase_since": now - 3})
    )
    mon.poll()
    mon.poll()
    assert len(asked) == 1
    assert said[1:] == ["finetune[b] | step 200: writing a checkpoint (3s so far)"]


def test_workers_gone_quiet_make_the_wait_said_again(tmp_path):
    said = []
    mon = Monitor(
        tmp_path,
        "pretrain",
        max_steps=10,
        waiting=lambda: "2 workers x 1 CPU; free now: 1 CPU",
        say=said.append,
        wait_notice_s=0.0,
    )
    (tmp_path / "progress").mkdir()
    beat = tmp_path / "progress" / "rank0.json"
    beat.write_text(json.dumps({"pid": 1, "step": 12, "time": time.time(), "phase": "train"}))
    mon.poll()
    assert said == []  # training: nothing to say
    beat.write_text(json.dumps({"pid": 1, "step": 12, "time": time.time() - 15, "phase": "train"}))  # a node was lost
    mon.poll()
    assert len(said) == 1 and "for cluster resources: 2 workers x 1 CPU; free now: 1 CPU" in said[0]


def test_a_long_setup_is_said_from_the_workers_heartbeat(tmp_path):
    said = []
    mon = Monitor(tmp_path, "finetune[trec]", max_steps=10, say=said.append, slow_phase_s=0.0)
    heartbeat(tmp_path, 0, 0, "setup")
    beat = json.loads((tmp_path / "progress" / "rank0.json").read_text())
    assert beat["phase"] == "setup" and beat["step"] == 0 and beat["pid"] == os.getpid()
    mon.poll()
    mon.poll()  # said once
    assert len(said) == 1 and said[0].startswith("finetune[trec] | starting: data, model and DeepSpeed engine (")
    heartbeat(tmp_path, 0, 1)  # training: the metrics rows speak from now on
    mon.poll()
    assert len(said) == 1
