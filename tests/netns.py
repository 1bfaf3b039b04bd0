"""Separate network hosts on this machine for tests: ``cluster/local/hosts.sh`` behind a small API.

    with host_set(3) as hosts:          # or the ``hosts_fixture(n)`` pytest fixture
        hosts[0].name, hosts[0].address # "ptftab12cd-h1", "10.213.K.1"
        hosts[0].run(["hostname"])      # a command on that host, waited for
        hosts[1].popen([...], log=path) # a daemon on that host, stopped by the teardown
        hosts[1].link("down")           # its cable pulled out at the switch

Each host is a network namespace with a hostname of its own, on a private bridge; the file
system is shared. The teardown stops every process whose network namespace is one of the set's
(whoever started it), removes namespaces, veths and mounts, and fails if anything is left.
``skip_reason()`` says why hosts cannot be made here (not root, no ``ip``/``unshare``), for
``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOSTS_SH = ROOT / "cluster" / "local" / "hosts.sh"


def skip_reason() -> str | None:
    """None when this machine can make network-namespace hosts, else why not."""
    if os.geteuid() != 0:
        return "network-namespace hosts need root (ip netns, unshare --uts)"
    missing = [c for c in ("ip", "unshare", "nsenter", "shuf") if not shutil.which(c)]
    if missing:
        return f"network-namespace hosts need {', '.join(missing)} (iproute2, util-linux)"
    probe = f"ptftprobe{secrets.token_hex(2)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Host:
    name: str
    address: str
    set_name: str

    @property
    def hostname(self) -> str:
        return self.name

    def command(self, args: list) -> list[str]:
        """``args`` as a command line that runs on this host."""
        return [str(HOSTS_SH), "exec", self.name, *map(str, args)]

    def run(self, args: list, timeout_s: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(
            self.command(args), capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, **kw
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"on {self.name}: {' '.join(map(str, args))} exited {r.returncode}\n"
                f"--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-4000:]}"
            )
        return r

    def popen(self, args: list, log: Path, **kw) -> subprocess.Popen:
        """A long-running process on this host, its output in ``log``; the set's teardown ends it."""
        with open(log, "ab") as out:
            return subprocess.Popen(
                self.command(args),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **kw,
            )

    def link(self, state: str) -> None:
        subprocess.run([str(HOSTS_SH), "link", self.name, state], check=True, capture_output=True, timeout=30)

    def stop_all(self, grace_s: float = 10) -> None:
        """SIGTERM to every process on this host, SIGKILL to what is left after ``grace_s``."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + grace_s
            while self.pids() and time.monotonic() < deadline:
                time.sleep(0.2)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


@contextlib.contextmanager
def host_set(num_hosts: int):
    """``num_hosts`` hosts, removed afterwards (also when the body fails); fails if anything is left."""
    set_name = f"ptft{secrets.token_hex(3)}"
    r = subprocess.run([str(HOSTS_SH), "up", set_name, str(num_hosts)], capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode == 0, f"hosts.sh up failed:\n{r.stdout}\n{r.stderr}"
        hosts = [Host(name, addr, set_name) for name, addr, _ in (line.split() for line in r.stdout.splitlines())]
        assert len(hosts) == num_hosts, r.stdout
        yield hosts
    finally:
        down = subprocess.run([str(HOSTS_SH), "down", set_name], capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, f"hosts.sh down left something behind:\n{down.stdout}\n{down.stderr}"
    assert set_name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert set_name not in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def hosts_fixture(num_hosts: int, scope: str = "module"):
    """A pytest fixture giving ``num_hosts`` hosts; skips (with the reason) where none can be made."""

    @pytest.fixture(scope=scope)
    def hosts():
        reason = skip_reason()
        if reason:
            pytest.skip(reason)
        with host_set(num_hosts) as made:
            yield made

    return hosts
