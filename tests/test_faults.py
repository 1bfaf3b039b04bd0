"""Real faults: a worker process killed with SIGKILL, the driver stopped with SIGTERM, a
checkpoint left half-written. Nothing is lost or counted twice."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import TINY_MODEL, run_cluster_script

from ptft_dist import checkpoint, jobs
from ptft_dist import config as C

pytestmark = pytest.mark.dist

TINY = [
    *TINY_MODEL,
    "optim.lr=3e-3",
    "optim.warmup_steps=3",
    "eval_every_steps=1000",
    "data.num_eval_samples=16",
]


def _wait_for_step(run_dir: Path, rank: int, step: int, timeout_s: float = 300) -> int:
    """Poll the rank's heartbeat until it reached ``step``; returns its pid."""
    path = run_dir / "progress" / f"rank{rank}.json"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            beat = json.loads(path.read_text())
            if beat["step"] >= step:
                return beat["pid"]
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.02)
    raise TimeoutError(f"rank {rank} of {run_dir} never reached step {step}")


def _committed_ledger(run_dir: Path, rank: int) -> dict[int, list[str]]:
    """Step -> sample keys of the trajectory that counted: a step redone after a restart is
    written again, and its last entry wins."""
    steps: dict[int, list[str]] = {}
    for line in (run_dir / "ledger" / f"rank{rank}.jsonl").read_text().splitlines():
        entry = json.loads(line)
        steps[entry["step"]] = entry["keys"]
    return steps


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


def test_sigkill_of_a_worker_restarts_from_the_checkpoint_and_loses_nothing(tmp_path, tiny_dataset, ray_session):
    common = [
        "optim.max_steps=30",
        "checkpoint.every_steps=8",
        "data.ledger=true",
        "tracking.log_every_steps=1",
        "optim.micro_batch_size_per_rank=16",
        "optim.global_batch_size=32",
        f"data.dataset_dir={tiny_dataset}",
        *TINY,
    ]
    straight = C.load("pretrain", "pretrain_tiny", [*common, f"run_dir={tmp_path / 'straight'}"])
    jobs.pretrain(straight)

    faulty = C.load("pretrain", "pretrain_tiny", [*common, "scaling.max_failures=1", f"run_dir={tmp_path / 'faulty'}"])
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=jobs.pretrain(faulty)))
    runner.start()
    pid = _wait_for_step(tmp_path / "faulty", rank=1, step=12)
    os.kill(pid, signal.SIGKILL)  # a real signal to the real worker process
    runner.join(timeout=600)
    assert outcome["summary"]["metrics"]["completed"] is True and outcome["summary"]["metrics"]["steps"] == 30
    restarted = json.loads((tmp_path / "faulty" / "progress" / "rank1.json").read_text())["pid"]
    assert restarted != pid, "the worker group was restarted"

    for rank in (0, 1):
        a, b = _committed_ledger(tmp_path / "straight", rank), _committed_ledger(tmp_path / "faulty", rank)
        assert sorted(b) == list(range(1, 31))
        assert a == b, f"rank {rank} trained on other samples after the restart"
    keys = [
        k for rank in (0, 1) for step_keys in _committed_ledger(tmp_path / "faulty", rank).values() for k in step_keys
    ]
    assert len(keys) == len(set(keys)) == 30 * 32, "every sample once (less than one epoch here)"
    wa, wb = _weights(tmp_path / "straight"), _weights(tmp_path / "faulty")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


def test_a_lost_node_is_waited_for_and_the_run_resumes_losing_nothing(tmp_path, tiny_dataset):
    """ray.cluster_utils.Cluster in its own process (tests/_node_loss_pretrain.py): the node
    holding a worker is removed at step 12, a new one is added 25 s later."""
    result, out = run_cluster_script("_node_loss_pretrain.py", tiny_dataset, tmp_path, timeout=900)
    assert result["lost"]["metrics"]["completed"] is True and result["lost"]["metrics"]["steps"] == 30
    assert result["pids_before"] != result["pids_after"], "the worker group was restarted"
    assert "for cluster resources" in out, "the wait for a new node was not said"
    for rank in (0, 1):
        a, b = _committed_ledger(tmp_path / "straight", rank), _committed_ledger(tmp_path / "lost", rank)
        assert sorted(b) == list(range(1, 31)) and a == b, f"rank {rank} trained on other samples after the node loss"
    wa, wb = _weights(tmp_path / "straight"), _weights(tmp_path / "lost")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


@pytest.mark.parametrize("stage", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_elastic_run_goes_on_with_fewer_workers_and_grows_back_losing_nothing(tmp_path, tiny_dataset, stage):
    """tests/_elastic_pretrain.py: 2 nodes x 1 worker, scaling.min_workers=1. The node holding
    a worker is removed at step 40: training goes on with 1 worker without a new node; a node
    added back brings it to 2 workers again; the run finishes. With elastic determinism every
    committed step trained on the samples of the uninterrupted run, each sample once per epoch."""
    from ptft_dist import ledger

    result, _ = run_cluster_script("_elastic_pretrain.py", tiny_dataset, tmp_path, "--stage", stage)
    t = result["timeline"]
    assert t["removed"] < t["first_small_step"] < t["added"] < t["first_full_step"]
    assert result["elastic"]["metrics"]["completed"] is True and result["elastic"]["metrics"]["steps"] == 300
    straight, elastic = ledger.committed(tmp_path / "straight"), ledger.committed(tmp_path / "elastic")
    assert sorted(elastic) == list(range(1, 301))
    assert all(sorted(straight[s]) == sorted(elastic[s]) for s in straight), "a step trained on other samples"
    sizes = {json.loads(line)["world_size"] for line in (tmp_path / "elastic" / "ledger" / "rank0.jsonl").open()}
    assert sizes == {1, 2}
    num_samples = json.loads((tiny_dataset / "manifest.json").read_text())["splits"]["train"]["num_samples"]
    keys = [k for s in sorted(elastic) for k in elastic[s]]
    for e in range(len(keys) // num_samples):  # every whole epoch of the committed trajectory
        assert len(set(keys[e * num_samples : (e + 1) * num_samples])) == num_samples, f"epoch {e} repeats a sample"


def test_sigterm_writes_a_checkpoint_exits_75_and_the_same_command_resumes(tmp_path, tiny_dataset):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "ptft_dist.cli",
        "pretrain",
        "--config",
        "pretrain_tiny",
        "--run-dir",
        str(run_dir),
        f"data.dataset_dir={tiny_dataset}",
        "optim.max_steps=60",
        "tracking.log_every_steps=1",
        *TINY,
    ]
    env = dict(os.environ, RAY_ADDRESS="")  # its own local cluster, as a user's shell would start
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(run_dir, rank=0, step=5)
        session = psutil.Process(proc.pid).children(recursive=True)  # GCS, raylet, its workers and actors
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 75, out[-3000:]
    # the command's Ray session went with it: no worker, actor or Train controller lives on
    _, left = psutil.wait_procs(session, timeout=10)
    assert not left, f"processes of the stopped command's Ray session still run: {[p.name() for p in left]}"
    assert "run the same command again to resume" in out
    # the console has the driver's compact progress lines, not the workers' raw log lines
    assert "pretrain | step 5/60 | loss" in out and "RayTrainWorker" not in out, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary["metrics"]["steps"]
    assert summary["metrics"]["completed"] is False and summary["metrics"]["preempted"] is True and 5 <= stopped_at < 60
    saved = checkpoint.latest(run_dir / "ray")
    assert saved is not None and checkpoint.read_state(saved)["step"] == stopped_at

    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["completed"] is True and summary["metrics"]["steps"] == 60
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"train_loss"' in line
    ]
    assert steps == list(range(1, 61)), "the second run went on from the checkpoint, not from step 0"


def test_a_half_written_checkpoint_is_ignored(tmp_path, tiny_dataset, ray_session):
    import shutil

    cfg = C.load(
        "pretrain",
        "pretrain_tiny",
        ["optim.max_steps=8", "stop_at_step=4", f"data.dataset_dir={tiny_dataset}", f"run_dir={tmp_path / 'r'}", *TINY],
    )
    jobs.pretrain(cfg)
    good = checkpoint.latest(tmp_path / "r" / "ray")
    assert checkpoint.read_state(good)["step"] == 4
    # a later checkpoint whose writer died after its engine shard, before rank 1's state
    partial = good.parent / "checkpoint_partial"
    shutil.copytree(good, partial)
    state = json.loads((partial / "train_state_rank0.json").read_text())
    (partial / "train_state_rank0.json").write_text(json.dumps(dict(state, step=99)))
    (partial / "train_state_rank1.json").unlink()
    assert checkpoint.latest(tmp_path / "r" / "ray") == good
    # a later checkpoint whose copy was cut short (a full disk): every state file, a short shard
    cut = good.parent / "checkpoint_cut"
    shutil.copytree(good, cut)
    state = json.loads((cut / "train_state_rank0.json").read_text())
    (cut / "train_state_rank0.json").write_text(json.dumps(dict(state, step=98)))
    shard = next((cut / "ds").glob("zero_pp_rank_1_*"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert not checkpoint.is_complete(cut) and checkpoint.is_complete(good)
    assert checkpoint.latest(tmp_path / "r" / "ray") == good
    out = jobs.export(tmp_path / "r", tmp_path / "export")
    assert out["metrics"]["step"] == 4 and Path(out["artifacts"]["checkpoint"]) == good
    with pytest.raises(ValueError, match="train_state_rank1.json"):
        checkpoint.read_state(partial, rank=1)


@pytest.fixture
def disk_of_3mb(small_fs):
    """A 3 MiB file system: room for the tiny run's first checkpoint, not for its second."""
    return small_fs("3m")


def test_disk_full_while_writing_a_checkpoint_names_it_and_keeps_the_previous_one(
    tmp_path, tiny_dataset, ray_session, disk_of_3mb
):
    run_dir = disk_of_3mb / "run"
    cfg = C.load(
        "pretrain",
        "pretrain_tiny",
        [
            "optim.max_steps=40",
            "checkpoint.every_steps=4",
            "checkpoint.keep_last=5",
            f"data.dataset_dir={tiny_dataset}",
            f"run_dir={run_dir}",
            *TINY,
        ],
    )
    with pytest.raises(RuntimeError, match="No space left on device"):
        jobs.pretrain(cfg)
    good = checkpoint.latest(run_dir / "ray")
    assert good is not None and checkpoint.is_complete(good)
    saved = checkpoint.read_state(good)["step"]
    assert saved % 4 == 0 and saved < 40
    # what was written before the disk filled is whole: it exports, and the run resumes from it elsewhere
    out = jobs.export(run_dir, tmp_path / "export")
    assert out["metrics"]["step"] == saved and (tmp_path / "export" / "model.safetensors").is_file()
