"""Tiny pretraining on a 2-node Ray cluster (``ray.cluster_utils.Cluster``, 1 CPU per node)
with ``scaling.placement_strategy=STRICT_SPREAD``.

    python tests/_multinode_pretrain.py OUT_DIR

Run in a process of its own by ``tests/test_cluster_multinode.py``: the test session's own Ray
(the ``ray_session`` fixture) lives in the pytest process, and one process joins one cluster.
Set RAY_TMPDIR to a private directory before starting it: ``Cluster`` records its address
in ``$RAY_TMPDIR/ray/ray_current_cluster``, where any other ``ray.init()`` on this machine
would otherwise find it and join it.

Prints one JSON line at the end: the ids of the cluster's nodes and the run's summary. The
worker start-up lines (``rank R/N on Ray node ID``) say where each rank ran.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from pathlib import Path

from helpers import TINY_MODEL  # this script's folder (tests/) is first on sys.path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def head_node_args(num_cpus: int) -> dict:
    """The head of a ``Cluster``: every port of our own choosing or picked by the OS, none of
    Ray's defaults; the dashboard (it hosts the state API Ray Train polls) on loopback."""
    return {
        "num_cpus": num_cpus,
        "include_dashboard": True,
        "dashboard_host": "127.0.0.1",
        "dashboard_port": _free_port(),
        "dashboard_agent_listen_port": _free_port(),
        "gcs_server_port": _free_port(),
    }


def main(out: Path) -> int:
    from ray.cluster_utils import Cluster

    from ptft_dist import config as C
    from ptft_dist import jobs
    from ptft_dist.data.build import build

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not os.environ.get("RAY_TMPDIR"):
        sys.exit("set RAY_TMPDIR to a private directory (see this file's docstring)")
    cluster = Cluster(initialize_head=True, head_node_args=head_node_args(1))
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        dataset = out / "data"
        build(
            C.DataBuildConfig(
                max_documents=800,
                seq_len=64,
                samples_per_shard=64,
                validation_fraction=0.05,
                tokenizer=C.TokenizerConfig(vocab_size=800),
            ),
            dataset,
            progress=False,
        )
        overrides = [
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=1",
            "scaling.placement_strategy=STRICT_SPREAD",
            "optim.max_steps=4",
            "eval_every_steps=4",
            "tracking.log_every_steps=2",
            *TINY_MODEL,
            f"data.dataset_dir={dataset}",
            f"run_dir={out / 'pretrain'}",
        ]
        cfg = C.load("pretrain", "pretrain_tiny", overrides)
        summary = jobs.pretrain(cfg, address=cluster.address)
        nodes = [node.node_id for node in cluster.list_all_nodes()]
        print(json.dumps({"nodes": nodes, "summary": summary}), flush=True)
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve()))
