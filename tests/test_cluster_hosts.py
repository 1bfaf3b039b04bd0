"""Network-namespace hosts (tests/netns.py, cluster/local/hosts.sh): own hostname, own address,
reachable from each other and from nothing else, and nothing left after the teardown."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from netns import HOSTS_SH, host_set, skip_reason

pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")

SERVE = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 7000)); s.listen(1)
c, peer = s.accept(); c.sendall(socket.gethostname().encode() + b" " + peer[0].encode()); c.close()
"""
ASK = """
import socket, sys
c = socket.create_connection((sys.argv[1], 7000), timeout=10); print(c.recv(200).decode())
"""


def test_hosts_have_their_own_names_and_addresses_and_reach_only_each_other(tmp_path):
    with host_set(2) as (a, b):
        assert a.run(["hostname"]).stdout.strip() == a.name
        assert b.run(["hostname"]).stdout.strip() == b.name
        assert a.address != b.address and a.address.rsplit(".", 1)[0] == b.address.rsplit(".", 1)[0]
        assert f"inet {a.address}/24" in a.run(["ip", "-4", "-o", "addr", "show", "eth0"]).stdout
        # the other host by name (the set's /etc/hosts), over TCP; it sees a's address
        server = b.popen([sys.executable, "-c", SERVE, b.address], log=tmp_path / "serve.log")
        for _ in range(50):
            r = a.run([sys.executable, "-c", ASK, b.name], check=False)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        assert r.stdout.split() == [b.name, a.address], r.stderr
        server.wait(timeout=30)
        # no route anywhere else: nothing leaves the set (checked without sending a packet)
        r = a.run(["ip", "-4", "route", "get", "192.0.2.1"], check=False)
        assert r.returncode != 0 and "unreachable" in r.stderr.lower(), r.stdout + r.stderr
        assert a.run(["ip", "-4", "route"]).stdout.split()[0].startswith(a.address.rsplit(".", 1)[0])
        # a pulled cable: the other host is unreachable until it is plugged in again
        b.link("down")
        r = a.run([sys.executable, "-c", ASK.replace("timeout=10", "timeout=2"), b.name], check=False)
        assert r.returncode != 0
        b.link("up")
        # something left running on a host: the teardown stops it
        sleeper = b.popen(["sleep", "600"], log=tmp_path / "sleep.log")
        time.sleep(0.5)
        left = b.pids()
        assert left, "the sleeper is not in b's namespace"
        set_name = a.set_name
    # host_set checked that namespaces and interfaces are gone; processes and state too:
    assert sleeper.wait(timeout=10) != 0
    for pid in left:
        assert not _alive(pid), f"process {pid} of {b.name} survived the teardown"
    r = subprocess.run([str(HOSTS_SH), "check", set_name], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert set_name not in subprocess.run([str(HOSTS_SH), "list"], capture_output=True, text=True).stdout


def test_a_failing_body_still_removes_the_hosts():
    with pytest.raises(RuntimeError, match="boom"):
        with host_set(1) as (a,):
            set_name = a.set_name
            raise RuntimeError("boom")
    assert set_name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_bad_set_names_and_counts_are_refused():
    r = subprocess.run([str(HOSTS_SH), "up", "Bad_Name", "2"], capture_output=True, text=True)
    assert r.returncode == 1 and "set name 'Bad_Name'" in r.stderr
    r = subprocess.run([str(HOSTS_SH), "up", "ptftx", "12"], capture_output=True, text=True)
    assert r.returncode == 1 and "1-9, not '12'" in r.stderr
    r = subprocess.run([str(HOSTS_SH), "exec", "ptftnone-h1", "true"], capture_output=True, text=True)
    assert r.returncode == 1 and "no host set ptftnone" in r.stderr


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False
