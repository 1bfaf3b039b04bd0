"""Two Ray nodes (ray.cluster_utils.Cluster, 1 CPU each): STRICT_SPREAD from the config puts
the 2 training workers on different nodes, and the run completes.

The cluster lives in a subprocess (tests/_multinode_pretrain.py) so that it never meets the
test session's own Ray (conftest's ``ray_session``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import run_cluster_script

pytestmark = pytest.mark.dist


def test_strict_spread_puts_the_two_workers_on_different_nodes(tmp_path):
    # every worker's start-up line, on the console
    result, out = run_cluster_script(
        "_multinode_pretrain.py", tmp_path, timeout=600, env={"RAY_DEDUP_LOGS": "0", "PTFT_RAY_LOGS": "1"}
    )

    # Where the ranks ran, from each worker's own start-up line (Ray's node id, not node_rank:
    # Ray numbers nodes by IP, and both nodes here share one).
    placed = dict(re.findall(r"rank (\d+)/2 on Ray node ([0-9a-f]+)", out))
    assert set(placed) == {"0", "1"}, out[-4000:]
    assert placed["0"] != placed["1"], f"both workers ran on node {placed['0']}"
    assert set(placed.values()) == set(result["nodes"]), (placed, result["nodes"])

    summary = result["summary"]
    assert summary["metrics"]["completed"] is True and summary["metrics"]["steps"] == 4
    assert (Path(summary["artifacts"]["hf_model"]) / "model.safetensors").is_file()
    assert (tmp_path / "pretrain" / "summary.json").is_file()
