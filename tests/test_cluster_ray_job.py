"""`launch/ray-*.sh` against a real Ray head started with `ray start --head` on ports of its own.

The head is started and stopped by cluster/local/ray_head.py, which ends only that head's
processes (`ray stop` would end every Ray on the machine, other test sessions' included).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"

# pretraining cut to 4 steps; finetuning keeps pipeline_tiny's short run
TINY = ["data.max_documents=1000", "pretrain.optim.max_steps=4", "pretrain.eval_every_steps=4"]


def _env() -> dict[str, str]:
    # The venv's bin first, as in an activated venv: the scripts call `ray`.
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(name, None)
    return env


def _run(
    args: list, timeout_s: float, check_rc: int | None = 0, env: dict | None = None
) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(a) for a in args],
        cwd=ROOT,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
    )
    if check_rc is not None:
        assert r.returncode == check_rc, (
            f"{args[0]} exited {r.returncode}\n--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-4000:]}"
        )
    return r


@pytest.fixture
def ray_head(tmp_path):
    """A real head (2 CPUs) on free ports, dashboard on 127.0.0.1; always stopped."""
    state = tmp_path / "head"
    try:
        _run(
            [sys.executable, ROOT / "cluster/local/ray_head.py", "start", "--state-dir", state, "--num-cpus", "2"],
            timeout_s=240,
        )
        yield json.loads((state / "head.json").read_text())
    finally:
        _run(
            [sys.executable, ROOT / "cluster/local/ray_head.py", "stop", "--state-dir", state],
            timeout_s=120,
            check_rc=None,
        )


@pytest.mark.dist
def test_submit_pipeline_follow_logs_and_stop_a_job(tmp_path, ray_head):
    address = ray_head["dashboard_url"]
    assert address.startswith("http://127.0.0.1:") and not address.endswith(":8265")
    run_dir = tmp_path / "run"

    t0 = time.monotonic()
    # 1. submit the tiny pipeline and follow it to the end
    r = _run(
        [
            LAUNCH / "ray-submit.sh",
            "--address",
            address,
            "--job-id",
            "tiny-pipeline",
            "pipeline",
            "--config",
            "pipeline_tiny",
            "--run-dir",
            run_dir,
            *TINY,
        ],
        timeout_s=900,
    )
    assert "job tiny-pipeline: SUCCEEDED" in r.stdout
    # the driver joined the head rather than starting a Ray of its own
    assert "joining the Ray cluster at" in r.stdout + r.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["pretrain"]["steps"] == 4
    assert summary["metrics"]["finetune"], "the pipeline reports its finetuning"
    assert (Path(summary["artifacts"]["hf_model"]) / "model.safetensors").is_file()
    assert list((run_dir / "finetune").rglob("adapter_config.json")), "finetuning exported no adapter"

    t1 = time.monotonic()
    # `ptft --address` joins the same head as a plain driver; with a token on this machine the
    # head uses token authentication, and a driver sends it when told to (cluster-local.md)
    join = (
        "import ray\nfrom ptft_dist import launcher\n"
        f"with launcher.session({ray_head['gcs_address']!r}):\n"
        "    print('cpus', ray.cluster_resources()['CPU'])"
    )
    env = _env()
    if (Path.home() / ".ray" / "auth_token").is_file():
        env["RAY_AUTH_MODE"] = "token"
    assert "cpus 2.0" in _run([sys.executable, "-c", join], timeout_s=180, env=env).stdout
    # 2. logs of a finished job, then its status
    r = _run([LAUNCH / "ray-logs.sh", "--address", address, "tiny-pipeline"], timeout_s=120)
    assert "pretraining: eval MLM loss" in r.stdout and f"run directory: {run_dir}" in r.stdout
    assert "job tiny-pipeline: SUCCEEDED" in r.stdout

    # 3. a long pretraining, submitted without waiting, then stopped
    long_dir = tmp_path / "long"
    _run(
        [
            LAUNCH / "ray-submit.sh",
            "--address",
            address,
            "--no-wait",
            "--job-id",
            "long-pretrain",
            "pretrain",
            "--run-dir",
            long_dir,
            f"data.dataset_dir={run_dir / 'data'}",
            "optim.max_steps=100000",
        ],
        timeout_s=300,
    )
    deadline = time.monotonic() + 240
    while not (long_dir / "config.yaml").exists():  # the driver is running ptft
        assert time.monotonic() < deadline, "the submitted pretraining never started"
        time.sleep(1)
    assert _run(
        [LAUNCH / "ray-status.sh", "--address", address, "long-pretrain"], timeout_s=60, check_rc=3
    ).stdout.startswith("job long-pretrain: RUNNING")
    r = _run([LAUNCH / "ray-stop.sh", "--address", address, "long-pretrain"], timeout_s=180)
    assert "job long-pretrain: STOPPED" in r.stdout
    _run([LAUNCH / "ray-status.sh", "--address", address, "long-pretrain"], timeout_s=60, check_rc=1)
    assert not (long_dir / "summary.json").exists()
    print(f"ray job submit: pipeline {t1 - t0:.0f} s, logs + submit/stop {time.monotonic() - t1:.0f} s")


def test_submit_refuses_bad_usage_before_contacting_ray():
    r = _run([LAUNCH / "ray-submit.sh", "--address", "http://127.0.0.1:9", "presets"], timeout_s=60, check_rc=2)
    assert "'presets' is not a ptft command that runs on a cluster" in r.stderr
    r = _run([LAUNCH / "ray-submit.sh", "--addres", "x", "pipeline"], timeout_s=60, check_rc=2)
    assert "unknown option --addres" in r.stderr
    r = _run([LAUNCH / "ray-submit.sh"], timeout_s=60, check_rc=2)
    assert "no ptft command given" in r.stderr


def test_dry_run_checks_the_command_and_the_runtime_env_without_contacting_ray(tmp_path):
    address = ["--address", "http://127.0.0.1:9"]  # nothing listens there: a dry run never asks
    r = _run([LAUNCH / "ray-submit.sh", *address, "--dry-run", "pipeline", "--config", "pipeline_tiny"], timeout_s=120)
    assert "dry run: 'ptft pipeline --config pipeline_tiny' checks out; would run:" in r.stdout
    cmd = r.stdout.splitlines()[-1]
    assert (
        cmd.startswith("ray job submit --address http://127.0.0.1:9 ") and "-- python -m ptft_dist.cli pipeline" in cmd
    )
    # the checked-in runtime env is the base of the one submitted
    assert "TOKENIZERS_PARALLELISM" in cmd and "runs" in cmd and str(ROOT) in cmd
    r = _run([LAUNCH / "ray-submit.sh", *address, "--dry-run", "pretrain", "optim.max_stepz=4"], 120, check_rc=2)
    assert "max_stepz" in r.stderr and "not submitted" in r.stderr
    outside = tmp_path / "mine.yaml"
    outside.write_text("optim: {max_steps: 4}\n")
    r = _run([LAUNCH / "ray-submit.sh", *address, "--dry-run", "pretrain", "--config", outside], 120, check_rc=2)
    assert f"--config {outside} is outside the checkout" in r.stderr
