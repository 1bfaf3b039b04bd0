"""Ray over separate network hosts (tests/netns.py): `ray start --head` on one host, `ray start
--address` on another, `ray job submit` from a third, with Ray's token authentication on.

Hosts: h1 the head (1 CPU), h2 a worker node (1 CPU), h3 a spare that joins when h2 is lost,
h4 a client with no Ray node of its own. Every host is its own network namespace with its own
hostname and address; the file system (checkout, venv, run directories) is shared, as NFS would
be. The tests run in order on one cluster: the pipeline, the refused clients and the listening
ports, then the host loss (which leaves h2 cut off).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import TINY_MODEL
from netns import hosts_fixture

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RUNTIME_ENV = ROOT / "launch" / "runtime-env.yaml"
GCS_PORT, DASHBOARD_PORT = 6379, 8265  # each host has its own ports: Ray's defaults collide with nothing

pytestmark = pytest.mark.dist

hosts = hosts_fixture(4)

# pretraining cut to 4 steps, one worker per host; finetuning keeps pipeline_tiny's short run
TINY_PIPELINE = [
    "data.max_documents=1000",
    "pretrain.optim.max_steps=4",
    "pretrain.eval_every_steps=4",
    "pretrain.scaling.placement_strategy=STRICT_SPREAD",
]


class RayHosts:
    """The cluster's settings and a few commands on its hosts."""

    def __init__(self, hosts, state: Path):
        self.head, self.worker, self.spare, self.client = hosts
        self.state = state
        self.token_file = state / "auth_token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.home = state / "home"  # no ~/.ray/auth_token there: the token comes from the settings only
        self.home.mkdir()
        self.gcs = f"{self.head.address}:{GCS_PORT}"
        self.dashboard = f"http://{self.head.address}:{DASHBOARD_PORT}"

    def env(self, host=None, token: bool = True) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in ("HOME", "PYTHONPATH")}
        env.update(HOME=str(self.home), PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        if token:
            env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_file))
        if host is not None:
            # each host's Ray state under a path of its own (the file system is shared)
            env["RAY_TMPDIR"] = str(self.temp_dir(host))
        return env

    def temp_dir(self, host) -> Path:
        return self.state / host.name.rsplit("-", 1)[1]

    def start_node(self, host, head: bool = False) -> None:
        common = [
            "--num-cpus=1",
            f"--node-ip-address={host.address}",
            f"--temp-dir={self.temp_dir(host)}",
            "--disable-usage-stats",
        ]
        if head:
            args = [
                "ray",
                "start",
                "--head",
                f"--port={GCS_PORT}",
                "--include-dashboard=true",
                f"--dashboard-host={host.address}",
                f"--dashboard-port={DASHBOARD_PORT}",
                *common,
            ]
        else:
            args = ["ray", "start", f"--address={self.gcs}", *common]
        env = self.env(host)
        if head:
            # a lost host is declared dead in ~10 s instead of ~1 min (the test's only Ray tuning)
            env.update(
                RAY_health_check_period_ms="1000",
                RAY_health_check_timeout_ms="2000",
                RAY_health_check_failure_threshold="5",
            )
        host.run(args, timeout_s=180, env=env)

    def client_run(self, args: list, timeout_s: float = 120, check: bool = True, token: bool = True):
        return self.client.run(args, timeout_s=timeout_s, check=check, env=self.env(token=token), cwd=ROOT)

    def submit(self, job_id: str, ptft_args: list, wait: bool = True, timeout_s: float = 900):
        """The plain Ray Jobs way, as docs/cluster-ray-job.md shows it."""
        args = ["ray", "job", "submit", "--address", self.dashboard, "--submission-id", job_id]
        args += ["--working-dir", ".", "--runtime-env", RUNTIME_ENV]
        args += [] if wait else ["--no-wait"]
        return self.client_run([*args, "--", "python", "-m", "ptft_dist.cli", *ptft_args], timeout_s=timeout_s)

    def status(self, job_id: str) -> str:
        r = self.client_run([ROOT / "launch" / "ray-status.sh", "--address", self.dashboard, job_id], check=False)
        return r.stdout.split(":", 1)[1].split()[0] if r.stdout.startswith("job ") else f"?{r.stdout}{r.stderr}"

    def placements(self, run_name: str) -> dict[int, tuple[str, str]]:
        """Rank -> (hostname, ip) of ``run_name``'s workers, from the start-up line each worker
        logged on its own host (Ray Train's JSON worker logs under that host's temp dir)."""
        found: dict[int, list[tuple[int, str, str]]] = {}
        for host_dir in self.state.iterdir():
            for log in host_dir.glob("session_*/logs/train/ray-train-app-worker-*.log"):
                for line in log.read_text(errors="replace").splitlines():
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    m = re.match(
                        r"rank (\d+)/\d+ on Ray node \w+ \(.*host (\S+), ip ([\d.]+)\)", entry.get("message", "")
                    )
                    if m and entry.get("run_name") == run_name:
                        found.setdefault(int(m.group(1)), []).append(
                            (entry.get("timestamp_ns", 0), m.group(2), m.group(3))
                        )
        # the latest start of each rank (a restarted group logs again)
        return {rank: max(starts)[1:] for rank, starts in found.items()}


@pytest.fixture(scope="module")
def cluster(hosts):
    # short: Ray's socket paths live under it (107-byte limit)
    state = Path(tempfile.mkdtemp(prefix="ptft-rh-", dir="/tmp" if os.path.isdir("/tmp") else None))
    state.chmod(0o755)
    try:
        ray = RayHosts(hosts, state)
        t0 = time.monotonic()
        ray.start_node(ray.head, head=True)
        ray.start_node(ray.worker)
        print(f"2-host Ray cluster up in {time.monotonic() - t0:.0f} s")
        yield ray
    finally:
        # Ray's processes first (they would write on into the state dir), then their files;
        # hosts_fixture's teardown checks that nothing is left on the hosts
        for host in hosts:
            host.stop_all()
        shutil.rmtree(state, ignore_errors=True)


def test_ray_job_submit_runs_the_pipeline_with_one_worker_per_host(cluster, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    r = cluster.submit("pipe", ["pipeline", "--config", "pipeline_tiny", "--run-dir", run_dir, *TINY_PIPELINE])
    elapsed_s = time.monotonic() - t0
    assert "Job 'pipe' succeeded" in r.stdout + r.stderr, r.stdout[-6000:]
    assert cluster.status("pipe") == "SUCCEEDED"
    assert f"joining the Ray cluster at {cluster.gcs}" in r.stdout

    # the two pretraining ranks ran on the two hosts, each on its own address
    placed = cluster.placements("pretrain")
    assert set(placed) == {0, 1}, placed
    assert sorted(placed.values()) == sorted(
        [(cluster.head.hostname, cluster.head.address), (cluster.worker.hostname, cluster.worker.address)]
    ), placed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["pretrain"]["steps"] == 4
    assert (Path(summary["artifacts"]["hf_model"]) / "model.safetensors").is_file()
    assert {name: job["status"] for name, job in summary["metrics"]["finetune"].items()} == {"lora": "ok", "head": "ok"}
    assert (run_dir / "finetune" / "lora" / "adapter" / "adapter_config.json").is_file()
    print(f"2-host pipeline: ray job submit -> SUCCEEDED in {elapsed_s:.0f} s; pretrain ranks {placed}")


def test_clients_without_the_token_are_refused_and_the_dashboard_listens_on_the_head_address_only(cluster):
    # the Jobs API (the dashboard) without a token, and with a wrong one
    r = cluster.client_run(["ray", "job", "list", "--address", cluster.dashboard], check=False, token=False)
    assert r.returncode != 0 and "Missing authentication token" in r.stdout + r.stderr, r.stdout + r.stderr
    env = dict(cluster.env(), RAY_AUTH_TOKEN="0" * 64)
    env.pop("RAY_AUTH_TOKEN_PATH")
    r = cluster.client.run(["ray", "job", "list", "--address", cluster.dashboard], check=False, env=env)
    assert r.returncode != 0 and "token is invalid" in r.stdout + r.stderr, r.stdout + r.stderr
    # the cluster itself (GCS) with a wrong token
    join = f"import ray; ray.init(address={cluster.gcs!r}); print('joined')"
    r = cluster.client.run([sys.executable, "-c", join], check=False, env=env, timeout_s=120)
    assert r.returncode != 0 and "joined" not in r.stdout
    assert f"Failed to connect to Ray cluster at {cluster.gcs}" in r.stderr, r.stderr[-3000:]
    # with the token, the same client gets in
    r = cluster.client_run(["ray", "job", "list", "--address", cluster.dashboard])
    assert "pipe" in r.stdout + r.stderr

    # the dashboard (Jobs API) and the job agents listen on the head's address (and loopback), not on every one
    listening = _listening(cluster.head)
    assert listening[DASHBOARD_PORT] == {cluster.head.address}, listening
    for host in (cluster.head, cluster.worker):
        agents = {port: addrs for port, addrs in _listening(host, "ray::DashboardAgent").items()}
        http_agent = [addrs for addrs in agents.values() if addrs <= {host.address, "127.0.0.1"}]
        assert http_agent, f"no dashboard agent bound to {host.address} only: {agents}"
    # nothing on the client host: it runs no Ray node
    assert not _listening(cluster.client)


def _listening(host, process: str | None = None) -> dict[int, set[str]]:
    """Port -> addresses of the TCP sockets listening on ``host`` (of ``process`` only, if given)."""
    out = host.run(["ss", "-H", "-ltnp"]).stdout
    ports: dict[int, set[str]] = {}
    for line in out.splitlines():
        local, users = line.split()[3], line.split(None, 5)[-1]
        if process and process[:15] not in users:
            continue
        addr, port = local.rsplit(":", 1)
        ports.setdefault(int(port), set()).add(addr.strip("[]").removeprefix("::ffff:").replace("*", "0.0.0.0"))
    return ports


# a pretraining long enough to lose a host in the middle; the data ledger says what each step read
LOSS_RUN = [
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=1",
    "scaling.max_failures=2",
    "scaling.placement_strategy=STRICT_SPREAD",
    "optim.max_steps=30",
    "checkpoint.every_steps=8",
    "data.ledger=true",
    "tracking.log_every_steps=1",
    "optim.micro_batch_size_per_rank=16",
    "optim.global_batch_size=32",
    "optim.lr=3e-3",
    "optim.warmup_steps=3",
    *TINY_MODEL,
    "eval_every_steps=1000",
    "data.num_eval_samples=16",
]


def _beat(run_dir: Path, rank: int) -> dict:
    try:
        return json.loads((run_dir / "progress" / f"rank{rank}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def test_a_host_cut_off_mid_run_is_replaced_and_the_run_finishes_losing_nothing(cluster, tiny_dataset, tmp_path):
    run_dir = tmp_path / "lost"
    t0 = time.monotonic()
    cluster.submit(
        "lost",
        ["pretrain", "--config", "pretrain_tiny", "--run-dir", run_dir, f"data.dataset_dir={tiny_dataset}", *LOSS_RUN],
        wait=False,
    )
    deadline = time.monotonic() + 400
    while not (_beat(run_dir, 0).get("step", 0) >= 12 and _beat(run_dir, 1).get("step", 0) >= 12):
        assert time.monotonic() < deadline, "the run never reached step 12"
        assert cluster.status("lost") in ("PENDING", "RUNNING"), cluster.status("lost")
        time.sleep(0.2)
    before = {rank: _beat(run_dir, rank)["pid"] for rank in (0, 1)}
    cut_at = _beat(run_dir, 0)["step"]
    cluster.worker.link("down")  # h2's cable pulled: its raylet and its training worker are cut off
    t_cut = time.monotonic()
    time.sleep(20)  # Ray declares h2 dead; the run cannot go on with one host, and waits
    assert cluster.status("lost") == "RUNNING"
    cluster.start_node(cluster.spare)  # a new host joins
    deadline = time.monotonic() + 600
    while (state := cluster.status("lost")) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, "the run did not finish after the new host joined"
        time.sleep(2)
    logs = cluster.client_run(["ray", "job", "logs", "--address", cluster.dashboard, "lost"]).stdout
    assert state == "SUCCEEDED", logs[-6000:]
    print(
        f"host lost at step {cut_at}: job SUCCEEDED {time.monotonic() - t_cut:.0f} s later, "
        f"{time.monotonic() - t0:.0f} s in all"
    )

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["metrics"]["completed"] is True and summary["metrics"]["steps"] == 30
    after = {rank: _beat(run_dir, rank)["pid"] for rank in (0, 1)}
    assert after != before, "the worker group was not restarted"
    # after the restart the ranks ran on the head and the new host (h2 is unreachable)
    placed = cluster.placements("pretrain")
    assert sorted(h for h, _ in placed.values()) == sorted([cluster.head.hostname, cluster.spare.hostname]), placed
    # nothing lost, nothing twice: every step 1..30 committed on both ranks, every sample once
    keys = []
    for rank in (0, 1):
        steps: dict[int, list[str]] = {}
        for line in (run_dir / "ledger" / f"rank{rank}.jsonl").read_text().splitlines():
            entry = json.loads(line)
            steps[entry["step"]] = entry["keys"]  # a step redone after the restart: its last entry counts
        assert sorted(steps) == list(range(1, 31)), f"rank {rank}: steps {sorted(steps)}"
        keys += [k for step in steps.values() for k in step]
    assert len(keys) == len(set(keys)) == 30 * 32, "every sample once (less than one epoch here)"
