"""A data build with ``data.engine=ray`` on a ``ray.cluster_utils.Cluster`` of NODES nodes of
one CPU each, and the same build with the local engine, in this one process.

    python tests/_ray_build.py OUT_DIR NODES INPUT TOKENIZER_DIR [SEQ_LEN]

Run in a process of its own (by tests/test_data_sources.py and benchmarks/data_sources.py):
one process joins one cluster, and the test session has its own Ray. Set RAY_TMPDIR to a
private directory first (see tests/_multinode_pretrain.py). Prints one JSON line at the end:
the nodes the actors ran on, wall seconds and shard hashes of the Ray build and of the local
build. With PTFT_TEST_KILL_ACTOR=1 one tokenizer actor is killed after the first batch comes
back (Ray restarts it and runs its queued batches again).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _hashes(m: dict) -> list[str]:
    return [sh["sha256"] for split in ("train", "valid") for sh in m["splits"][split]["shards"]]


def main(out: Path, nodes: int, source: str, tokenizer: str, seq_len: int) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from ptft_dist import config as C
    from ptft_dist.data import raybuild
    from ptft_dist.data.build import build

    logging.basicConfig(level=logging.WARNING)
    if not os.environ.get("RAY_TMPDIR"):
        sys.exit("set RAY_TMPDIR to a private directory (see this file's docstring)")
    cfg = dict(inputs=[source], seq_len=seq_len, shard_size_mb=2, tokenizer=C.TokenizerConfig(path=tokenizer))
    head = {"num_cpus": 1, "include_dashboard": False, "gcs_server_port": _free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        used: list[str] = []
        original = raybuild.RayEncoder.__init__

        def remember(self, *a, **kw):  # the nodes the actors were placed on
            original(self, *a, **kw)
            used.extend(self.nodes)

        raybuild.RayEncoder.__init__ = remember
        killed = []
        if os.environ.get("PTFT_TEST_KILL_ACTOR") == "1":  # a failed task: an actor dies mid-build
            original_map = raybuild.RayEncoder.map

            def map_and_kill(self, batches):
                for i, item in enumerate(original_map(self, batches)):
                    if i == 0:
                        ray.kill(self.actors[0], no_restart=False)  # its queued batches fail, are run again
                        killed.append(True)
                    yield item

            raybuild.RayEncoder.map = map_and_kill
        start = time.perf_counter()
        on_ray = build(C.DataBuildConfig(engine="ray", **cfg), out / "ray", progress=False)
        ray_s = time.perf_counter() - start
        start = time.perf_counter()
        local = build(C.DataBuildConfig(**cfg), out / "local", progress=False)
        local_s = time.perf_counter() - start
        result = {
            "nodes": sorted(n.node_id for n in cluster.list_all_nodes()),
            "actor_nodes": sorted(used),
            "ray_s": ray_s,
            "local_s": local_s,
            "ray_shards": _hashes(on_ray),
            "local_shards": _hashes(local),
            "tokens": on_ray["build"]["input_tokens"],
            "killed_an_actor": bool(killed),
            "documents": sum(on_ray["splits"][s]["num_documents"] for s in ("train", "valid")),
        }
        print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    seq = int(sys.argv[5]) if len(sys.argv) > 5 else 128
    sys.exit(main(Path(sys.argv[1]).resolve(), int(sys.argv[2]), sys.argv[3], sys.argv[4], seq))
