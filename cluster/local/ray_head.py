#!/usr/bin/env python3
"""Start and stop a Ray head on this machine, for development and tests.

    python cluster/local/ray_head.py start --state-dir runs/head [--num-cpus 2]
    python cluster/local/ray_head.py stop  --state-dir runs/head

Why not plain ``ray start --head`` / ``ray stop``: ``ray stop`` kills *every* Ray process on
the machine, including other people's clusters and test sessions. This script starts the head
on free ports of its own (never Ray's defaults), in a temporary directory and a process group
of its own, records them in ``<state-dir>/head.json``, and ``stop`` ends exactly the
processes of that head: its process group, every process whose command line names its
temporary directory, and their descendants (workers and job drivers).

The dashboard, which serves the Ray Jobs API, listens on 127.0.0.1 only. ``start`` prints
``RAY_ADDRESS=http://127.0.0.1:<port>``, the address ``launch/ray-submit.sh`` wants.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

#: Ports a head needs besides the worker ports (those are left to the OS: 0/0).
PORT_NAMES = (
    "port",
    "dashboard-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that are free right now (Ray binds some on every interface)."""
    socks, ports = [], []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("0.0.0.0", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _ray_cli() -> str:
    """The ``ray`` next to this Python (a venv's), else the one on PATH."""
    here = Path(sys.executable).parent / "ray"
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        sys.exit("ray_head: the `ray` command is not installed (pip install 'ray[default]')")
    return found


def start(state_dir: Path, num_cpus: int, num_gpus: int, timeout_s: float) -> dict:
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "head.json"
    if state_file.exists():
        sys.exit(f"ray_head: {state_file} exists: a head from this state dir may be running; stop it first")
    # Ray's socket paths live under the temp dir and must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ptft-ray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
    cmd = [
        _ray_cli(),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
    ]
    cmd += [f"--{name}={port}" for name, port in ports.items()]
    cmd += [
        "--min-worker-port=0",
        "--max-worker-port=0",
        f"--num-cpus={num_cpus}",
        f"--num-gpus={num_gpus}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log_path = state_dir / "ray-start.log"
    with open(log_path, "w") as log:
        # A session of its own: the head's daemons share a process group that `stop` can end
        # without touching the caller's.
        # This Python's bin dir first on PATH, as in an activated venv: a job's entrypoint
        # (`python -m ptft_dist.cli`) runs through the head's shell and must find it.
        env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, env=env
        )
        state = {
            "dashboard_url": f"http://127.0.0.1:{ports['dashboard-port']}",
            "gcs_port": ports["port"],
            "temp_dir": temp_dir,
            "pgid": proc.pid,
            "ports": ports,
        }
        state_file.write_text(json.dumps(state, indent=2))
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        stop(state_dir)
        tail = log_path.read_text()[-3000:] if log_path.exists() else ""
        sys.exit(
            f"ray_head: `ray start --head` {'timed out' if rc is None else f'exited with {rc}'}; its output:\n{tail}"
        )
    # The GCS binds the node's routable IP (Ray replaces 127.0.0.1 by it); record what it chose.
    for line in log_path.read_text().splitlines():
        if "ray start --address=" in line:
            state["gcs_address"] = line.split("--address=")[1].strip().strip("'\"").split("'")[0]
    state_file.write_text(json.dumps(state, indent=2))
    return state


def _head_processes(state: dict):
    import psutil

    me = psutil.Process()
    spared = {me.pid, *(p.pid for p in me.parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.pid in spared:
                continue
            cmdline = proc.info["cmdline"] or []
            # A recycled pgid could name someone else's group: require a Ray process in it.
            in_group = os.getpgid(proc.pid) == state["pgid"] and any("ray" in arg for arg in cmdline)
            mine = in_group or any(state["temp_dir"] in arg for arg in cmdline)
            if mine:
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    if child.pid not in spared:
                        found[child.pid] = child
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            continue
    return list(found.values())


def stop(state_dir: Path, grace_s: float = 5.0) -> int:
    """End the head recorded in ``state_dir``; returns how many processes were signalled."""
    import psutil

    state_file = state_dir / "head.json"
    if not state_file.exists():
        print(f"ray_head: no {state_file}; nothing to stop")
        return 0
    state = json.loads(state_file.read_text())
    procs = _head_processes(state)
    for p in procs:
        with _quiet():
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    # gcs_server and the autoscaler monitor ignore SIGTERM; `ray stop` kills them too.
    for p in alive + _head_processes(state):
        with _quiet():
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    state_file.unlink()
    return len(procs)


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, typ, value, tb):
        import psutil

        return typ is not None and issubclass(typ, (psutil.NoSuchProcess, ProcessLookupError))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start a head on free ports; prints RAY_ADDRESS")
    s.add_argument(
        "--state-dir", required=True, type=Path, help="where head.json (ports, temp dir, process group) is kept"
    )
    s.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1)
    s.add_argument("--num-gpus", type=int, default=0)
    s.add_argument("--timeout-s", type=float, default=120.0, help="how long `ray start` may take")
    t = sub.add_parser("stop", help="stop the head recorded in --state-dir, and nothing else")
    t.add_argument("--state-dir", required=True, type=Path)
    args = p.parse_args(argv)
    if args.command == "start":
        state = start(args.state_dir, args.num_cpus, args.num_gpus, args.timeout_s)
        print(f"RAY_ADDRESS={state['dashboard_url']}")
        print(f"# cluster address for `ray start --address` / ray.init: {state.get('gcs_address', '?')}")
        print(f"# stop it with: {sys.executable} {sys.argv[0]} stop --state-dir {args.state_dir}")
    else:
        n = stop(args.state_dir)
        print(f"stopped {n} processes of the head in {args.state_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
