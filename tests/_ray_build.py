"""A data build with ``data.engine=ray`` on a ``ray.cluster_utils.Cluster`` of NODES nodes of
one CPU each, and the same build with the local engine, in this one process.

    python tests/_ray_build.py OUT_DIR NODES TOKENIZER_DIR INPUT [INPUT ...]

Run in a process of its own (by tests/test_data_sources.py and benchmarks/data_sources.py):
one process joins one cluster, and the test session has its own Ray. Set RAY_TMPDIR to a
private directory first (see tests/_multinode_pretrain.py). PTFT_TEST_BUILD: data.* settings
of both builds as a JSON object (seq_len, split_mb, input_weights...); PTFT_TEST_SKIP_LOCAL=1
leaves out the local build; PTFT_TEST_WARM=1 first runs a small Ray build of the first input's
first 64 KB (untimed: the workers started, the driver's imports done, as on a cluster already
running). Prints one JSON
line at the end: the nodes the tasks ran on and their CPU seconds, wall seconds, both manifests, per split how often
each token id occurs in each build's samples, and the files of the Ray build. With
PTFT_TEST_KILL_TASK=1 the worker of part 0 dies on its first attempt right after its first
shard is renamed into place (Ray runs the part again).
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


def _failing_part(part, source, settings):
    """Part 0's first attempt: the worker exits right after its first shard is complete."""
    from ptft_dist.data import raybuild, shards

    marker = Path(settings["out_dir"]).parent / "killed-once"
    if part.index == 0 and marker.exists():
        marker.with_name("retried").write_text("")
    if part.index == 0 and not marker.exists():
        marker.write_text("")
        original = shards.ShardWriter.close_shard

        def close_and_die(self):
            original(self)
            if self.shards:
                os._exit(1)

        shards.ShardWriter.close_shard = close_and_die
    return raybuild.run_part(part, source, settings)


def _token_counts(out: Path, manifest: dict) -> dict:
    """Per split: how often each token id occurs in the samples (read back through the
    manifest, keys and sha256 checked), [CLS] included."""
    import numpy as np

    from ptft_dist.data.shards import ShardReader

    dtype = np.dtype(manifest["dtype"])
    got = {}
    for split in ("train", "valid"):
        shards = manifest["splits"][split]["shards"]
        reader = ShardReader(
            str(out),
            split,
            shards,
            seq_len=manifest["seq_len"],
            dtype=dtype,
            rec_bytes=manifest["record_bytes"],
            verify=True,
        )
        counts = np.zeros(manifest["vocab_size"], dtype=np.int64)
        for i, entry in enumerate(shards):
            for item in reader.read(i, np.arange(entry["num_samples"])):
                if not isinstance(item, tuple):
                    raise SystemExit(str(item))
                counts += np.bincount(item[1].astype(np.int64), minlength=len(counts))
        reader.close()
        got[split] = counts.tolist()
    return got


def main(out: Path, nodes: int, tokenizer: str, inputs: list[str]) -> int:
    import ray
    from ray.cluster_utils import Cluster

    from ptft_dist import config as C
    from ptft_dist.data import raybuild
    from ptft_dist.data.build import build

    logging.basicConfig(level=logging.WARNING)
    if not os.environ.get("RAY_TMPDIR"):
        sys.exit("set RAY_TMPDIR to a private directory (see this file's docstring)")
    cfg = dict(seq_len=32, shard_size_mb=2) | json.loads(os.environ.get("PTFT_TEST_BUILD") or "{}")
    cfg |= dict(inputs=inputs, tokenizer=C.TokenizerConfig(path=tokenizer))
    head = {"num_cpus": 1, "include_dashboard": False, "gcs_server_port": _free_port()}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        seen: dict = {}
        original = raybuild.run

        def remember(*a, **kw):  # the nodes the tasks ran on, their CPU seconds
            splits, totals = original(*a, **kw)
            seen.update(totals)
            return splits, totals

        raybuild.run = remember
        if os.environ.get("PTFT_TEST_WARM") == "1":
            head = out / "warm-input" / Path(inputs[0]).name
            head.parent.mkdir(parents=True, exist_ok=True)
            with open(inputs[0], "rb") as fh:
                head.write_bytes(fh.read(64 << 10).rsplit(b"\n", 1)[0] + b"\n")
            small = dict(cfg, inputs=[str(head)], split_mb=0.01, input_weights=[])
            build(C.DataBuildConfig(engine="ray", **small), out / "warm", progress=False)
        if os.environ.get("PTFT_TEST_KILL_TASK") == "1":
            raybuild.PART_FUNCTION = _failing_part
        start = time.perf_counter()
        on_ray = build(C.DataBuildConfig(engine="ray", **cfg), out / "ray", progress=False)
        ray_s = time.perf_counter() - start
        local, local_s = None, None
        if os.environ.get("PTFT_TEST_SKIP_LOCAL") != "1":
            start = time.perf_counter()
            local = build(C.DataBuildConfig(**cfg), out / "local", progress=False)
            local_s = time.perf_counter() - start
        result = {
            "nodes": sorted(n.node_id for n in cluster.list_all_nodes()),
            "task_nodes": seen["nodes"],
            "cpu_s_per_node": seen["cpu_s_per_node"],
            "ray_s": ray_s,
            "local_s": local_s,
            "ray": on_ray,
            "local": local,
            "ray_tokens": _token_counts(out / "ray", on_ray),
            "local_tokens": _token_counts(out / "local", local) if local else None,
            "files": sorted(p.name for p in (out / "ray").iterdir()),
        }
        print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    a = sys.argv
    sys.exit(main(Path(a[1]).resolve(), int(a[2]), a[3], a[4:]))
