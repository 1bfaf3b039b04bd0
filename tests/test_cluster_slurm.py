"""cluster/slurm/ptft.sbatch on a real single-node Slurm: munged, slurmctld and slurmd started
here by cluster/slurm/local-cluster.sh (installed with apt-get when missing and possible).

Skipped, with the reason, only where Slurm cannot be installed (not root, no apt-get, no
package mirror). Job state comes from squeue/scontrol (there is no accounting database), the
exit code from the job's own output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from netns import host_set
from netns import skip_reason as hosts_skip_reason

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CLUSTER = ROOT / "cluster" / "slurm" / "local-cluster.sh"
SUBMIT = ROOT / "launch" / "slurm-submit.sh"
NEEDED = ("munged", "mungekey", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")
# pretraining cut to 4 steps; finetuning keeps pipeline_tiny's short run
TINY = ["data.max_documents=1000", "pretrain.optim.max_steps=4", "pretrain.eval_every_steps=4"]

pytestmark = [pytest.mark.slurm, pytest.mark.dist]


def _missing() -> list[str]:
    return [c for c in NEEDED if not shutil.which(c)]


def _ensure_slurm() -> str | None:
    """None when Slurm is usable here (installing it if missing and possible), else why not."""
    if not _missing():
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return (
            f"Slurm is not installed ({', '.join(_missing())} missing) and cannot be: "
            "installing needs root and apt-get (`cluster/slurm/local-cluster.sh install`)"
        )
    r = subprocess.run(
        [str(LOCAL_CLUSTER), "install"], capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
    )
    if r.returncode != 0:
        return f"installing slurm-wlm and munge failed (exit {r.returncode}): {(r.stderr or r.stdout)[-600:]}"
    return f"still missing after install: {', '.join(_missing())}" if _missing() else None


def _env(slurm_conf: str | None = None) -> dict[str, str]:
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    env.pop("RAY_ADDRESS", None)
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    return env


def _pid_alive(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running single-node cluster; yields the environment (SLURM_CONF) for its clients."""
    reason = _ensure_slurm()
    if reason:
        pytest.skip(reason)
    # Short: munge's socket lives under it (unix socket paths have a 107-byte limit).
    state = Path(tempfile.mkdtemp(prefix="ptft-slurm-", dir="/tmp" if os.path.isdir("/tmp") else None))
    pidfiles = [state / "slurmctld.pid", state / f"slurmd-{_short_hostname()}.pid", state / "munge" / "munged.pid"]
    try:
        r = subprocess.run(
            [str(LOCAL_CLUSTER), "start", str(state)],
            capture_output=True,
            text=True,
            timeout=180,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, f"local-cluster.sh start failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        yield _env(str(state / "slurm.conf"))
    finally:
        pids = [_pid_alive(p) for p in pidfiles]
        subprocess.run(
            [str(LOCAL_CLUSTER), "stop", str(state)], capture_output=True, timeout=120, stdin=subprocess.DEVNULL
        )
        for pid in filter(None, pids):
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text(), (
                f"daemon {pid} survived local-cluster.sh stop"
            )
        shutil.rmtree(state, ignore_errors=True)


def _short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def _queued(env: dict) -> list[str]:
    return subprocess.run(
        ["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=60
    ).stdout.split()


def test_sbatch_runs_the_tiny_pipeline_on_a_ray_cluster_over_the_allocation(slurm_cluster, tmp_path):
    env = slurm_cluster
    run_dir = tmp_path / "run"
    cpus = max(2, min(os.cpu_count() or 2, 4))
    cmd = [
        str(SUBMIT),
        "--wait",
        "--nodes=1",
        f"--cpus-per-task={cpus}",
        "--time=30",
        f"--output={tmp_path}/ptft-%j.out",
        "--",
        "pipeline",
        "--config",
        "pipeline_tiny",
        "--run-dir",
        str(run_dir),
        *TINY,
    ]
    start = time.monotonic()
    r = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL
    )
    elapsed_s = time.monotonic() - start
    job = re.search(r"submitted Slurm job (\d+)", r.stdout)
    assert job, f"not submitted:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    job_id = job.group(1)
    output = (tmp_path / f"ptft-{job_id}.out").read_text(errors="replace")
    ray_state = Path(f"/tmp/ray-ptft-{job_id}-{_short_hostname()}")  # the job's Ray logs, kept for debugging
    if ray_state.is_dir() and not subprocess.run(["pgrep", "-f", f"{ray_state}/"], capture_output=True).stdout:
        shutil.rmtree(ray_state, ignore_errors=True)

    # The job is gone from the queue, and slurmctld says it COMPLETED.
    assert job_id not in _queued(env)
    show = subprocess.run(
        ["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True, timeout=60
    ).stdout
    assert "JobState=COMPLETED" in show, f"{show}\n--- job output\n{output[-6000:]}"
    # The exit code, from the job's own output: its last word on ptft.
    assert re.findall(r"^ptft exited with (\d+)$", output, re.M)[-1:] == ["0"], output[-6000:]
    assert r.returncode == 0, r.stdout[-3000:]
    # Ray came up over the allocation, and ptft ran on it as the driver.
    assert "all 1 Ray node(s) joined" in output
    assert "joining the Ray cluster at" in output

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["pretrain"]["steps"] == 4
    assert (Path(summary["artifacts"]["hf_model"]) / "model.safetensors").is_file()
    assert list((run_dir / "finetune").rglob("adapter_config.json")), "finetuning exported no adapter"
    # Teardown: no process of the job's Ray is left behind.
    leftovers = subprocess.run(
        ["pgrep", "-f", f"/tmp/ray-ptft-{job_id}-"], capture_output=True, text=True
    ).stdout.split()
    assert not leftovers, f"Ray processes of job {job_id} still running: {leftovers}"
    print(f"slurm job {job_id}: submit -> COMPLETED in {elapsed_s:.0f} s")


def test_submit_refuses_a_bad_command_without_queueing(slurm_cluster, tmp_path):
    env = slurm_cluster
    before = _queued(env)
    r = subprocess.run(
        [str(SUBMIT), "--nodes=1", "--", "pretrain", "--run-dir", str(tmp_path), "optim.max_stepz=4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 2
    assert "max_stepz" in r.stderr and "not submitted" in r.stderr
    assert _queued(env) == before


@pytest.fixture(scope="module")
def slurm_on_two_hosts():
    """A 2-node Slurm on two network-namespace hosts: slurmctld and a slurmd on h1, a slurmd on h2.
    Yields (h1, h2, env for the Slurm commands, which run on h1: the login node)."""
    reason = _ensure_slurm() or hosts_skip_reason()
    if reason:
        pytest.skip(reason)
    state = Path(tempfile.mkdtemp(prefix="ptft-sl2-", dir="/tmp" if os.path.isdir("/tmp") else None))
    with host_set(2) as (h1, h2):
        try:
            r = subprocess.run(
                [str(LOCAL_CLUSTER), "start", str(state), f"{h1.name}={h1.address}", f"{h2.name}={h2.address}"],
                capture_output=True,
                text=True,
                timeout=180,
                stdin=subprocess.DEVNULL,
            )
            assert r.returncode == 0, f"local-cluster.sh start failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            yield h1, h2, _env(str(state / "slurm.conf"))
        finally:
            subprocess.run(
                [str(LOCAL_CLUSTER), "stop", str(state)], capture_output=True, timeout=120, stdin=subprocess.DEVNULL
            )
            for host in (h1, h2):
                host.stop_all()
            shutil.rmtree(state, ignore_errors=True)


def test_sbatch_on_two_hosts_runs_pretraining_with_a_rank_on_each_then_finetuning(slurm_on_two_hosts, tmp_path):
    h1, h2, env = slurm_on_two_hosts
    run_dir = tmp_path / "run"
    cmd = [SUBMIT, "--wait", "--nodes=2", "--cpus-per-task=1", "--time=30", f"--output={tmp_path}/ptft-%j.out"]
    cmd += ["--", "pipeline", "--config", "pipeline_tiny", "--run-dir", run_dir, *TINY]
    cmd += ["pretrain.scaling.placement_strategy=STRICT_SPREAD"]
    start = time.monotonic()
    r = h1.run(cmd, timeout_s=1500, check=False, env=env, cwd=tmp_path)
    elapsed_s = time.monotonic() - start
    job = re.search(r"submitted Slurm job (\d+)", r.stdout)
    assert job, f"not submitted:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    job_id = job.group(1)
    output = (tmp_path / f"ptft-{job_id}.out").read_text(errors="replace")

    show = h1.run(["scontrol", "show", "job", job_id], env=env).stdout
    assert "JobState=COMPLETED" in show, f"{show}\n--- job output\n{output[-6000:]}"
    assert f"NodeList={h1.name[:-1]}[1-2]" in show or f"NodeList={h1.name},{h2.name}" in show, show
    assert re.findall(r"^ptft exited with (\d+)$", output, re.M)[-1:] == ["0"], output[-6000:]
    assert r.returncode == 0, r.stdout[-3000:]
    assert "all 2 Ray node(s) joined" in output, output[-4000:]

    # each pretraining rank's start-up line, from the Ray worker logs on the node it ran on
    placed: dict[int, tuple[str, str]] = {}
    for host in (h1, h2):
        for log in Path(f"/tmp/ray-ptft-{job_id}-{host.name}").glob("session_*/logs/train/ray-train-app-worker-*.log"):
            for line in log.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                m = re.match(r"rank (\d+)/2 on Ray node \w+ \(.*host (\S+), ip ([\d.]+)\)", entry.get("message", ""))
                if m and entry.get("run_name") == "pretrain":
                    placed[int(m.group(1))] = (m.group(2), m.group(3))
    assert sorted(placed.values()) == [(h1.name, h1.address), (h2.name, h2.address)], placed

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["pretrain"]["steps"] == 4
    assert {name: job["status"] for name, job in summary["metrics"]["finetune"].items()} == {"lora": "ok", "head": "ok"}
    # teardown: nothing of the job's Ray left on either host
    for host in (h1, h2):
        left = [p for p in host.pids() if f"/tmp/ray-ptft-{job_id}-" in _cmdline(p)]
        assert not left, f"Ray processes of job {job_id} still running on {host.name}: {left}"
        shutil.rmtree(f"/tmp/ray-ptft-{job_id}-{host.name}", ignore_errors=True)
    print(f"2-host slurm job {job_id}: submit -> COMPLETED in {elapsed_s:.0f} s; pretrain ranks {placed}")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.slow  # Slurm holds a requeued job ~2 min before it runs again
def test_sigterm_to_the_batch_script_checkpoints_requeues_and_the_job_resumes(slurm_cluster, tmp_path, tiny_dataset):
    env = slurm_cluster
    run_dir = tmp_path / "pre"
    cmd = [SUBMIT, "--nodes=1", "--cpus-per-task=2", "--time=30", f"--output={tmp_path}/ptft-%j.out", "--"]
    cmd += ["pretrain", "--config", "pretrain_tiny", "--run-dir", run_dir, f"data.dataset_dir={tiny_dataset}"]
    cmd += ["optim.max_steps=200", "checkpoint.every_steps=1000", "eval_every_steps=1000", "data.num_eval_samples=16"]
    cmd += ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128"]
    cmd += ["tracking.log_every_steps=1"]
    start = time.monotonic()
    r = subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    job_id = re.search(r"submitted Slurm job (\d+)", r.stdout).group(1)
    beat = run_dir / "progress" / "rank0.json"
    deadline = time.monotonic() + 600
    while True:
        assert time.monotonic() < deadline, "the job never reached step 5"
        try:
            if json.loads(beat.read_text())["step"] >= 5:
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.5)
    # what --signal=B:TERM@300 does before the time limit: SIGTERM to the batch script only
    subprocess.run(["scancel", "--batch", "--signal=TERM", job_id], env=env, check=True, timeout=60)
    deadline = time.monotonic() + 900
    show = ""
    while "JobState=COMPLETED" not in show and "JobState=FAILED" not in show:
        assert time.monotonic() < deadline, f"the job did not finish after its requeue:\n{show}"
        time.sleep(3)
        show = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    output = (tmp_path / f"ptft-{job_id}.out").read_text(errors="replace")
    ray_state = Path(f"/tmp/ray-ptft-{job_id}-{_short_hostname()}")
    if not subprocess.run(["pgrep", "-f", f"{ray_state}/"], capture_output=True).stdout:
        shutil.rmtree(ray_state, ignore_errors=True)
    assert "JobState=COMPLETED" in show and "Restarts=1" in show, f"{show}\n{output[-6000:]}"
    # first run: checkpoint on SIGTERM, exit 75, requeued; second run: resumed, exit 0
    assert re.findall(r"^ptft exited with (\d+)$", output, re.M) == ["75", "0"], output[-6000:]
    assert f"requeued job {job_id}" in output and "run the same command again to resume" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["completed"] is True and summary["metrics"]["steps"] == 200
    steps = [
        json.loads(line)["step"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"train_loss"' in line
    ]
    assert steps == list(range(1, 201)), "the requeued job went on from the checkpoint, not from step 0"
    print(f"slurm SIGTERM -> checkpoint -> requeue -> resumed -> COMPLETED: {time.monotonic() - start:.0f} s")
