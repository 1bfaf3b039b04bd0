"""Elastic pretraining over a lost and a returning node, on a ``ray.cluster_utils.Cluster``.

    python tests/_elastic_pretrain.py DATASET OUT_DIR [--stage 2] [--per-node 1] [--fixed]
        [--micro-batch 8] [--global-batch 32] [--start-timeout 15] [--skip-straight]

Two Ray nodes of ``--per-node`` CPUs each (the head and one more), ``scaling.num_workers`` =
both nodes' workers. The run first goes uninterrupted (``OUT_DIR/straight``), then again
(``OUT_DIR/elastic``) with ``scaling.min_workers`` = one node's workers: at step 12 the non-head
node is removed while it holds workers; the run must go on with the head's workers without
waiting; once it has trained 6 steps on fewer workers a new node is added, and the run grows back
(Ray's resize check every 3 s) and finishes. With ``--fixed`` (no ``min_workers``: today's fixed
size) the new node is added 20 s after the loss instead, for the benchmark's comparison.

Run in a process of its own (one process joins one cluster; set RAY_TMPDIR to a private
directory first, see ``tests/_multinode_pretrain.py``). Prints one JSON line: both summaries and
the timeline (wall-clock seconds: node removed, first step on fewer workers, node added, first
step on all workers again).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _multinode_pretrain import head_node_args  # noqa: E402
from helpers import TINY_MODEL  # noqa: E402

STEPS = 300
LOSE_AT = 40


def _last_entry(run_dir: Path) -> dict | None:
    """The newest ledger line of rank 0: step, world size, time."""
    try:
        lines = (run_dir / "ledger" / "rank0.jsonl").read_text().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, json.JSONDecodeError):
        return None


def _wait(what: str, done, runner: threading.Thread, timeout_s: float = 300) -> float:
    deadline = time.time() + timeout_s
    while not done():
        if time.time() > deadline or not runner.is_alive():
            raise TimeoutError(f"the run never got to: {what}")
        time.sleep(0.05)
    return time.time()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("dataset", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--per-node", type=int, default=1)
    parser.add_argument("--fixed", action="store_true")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=32, help="divisible at every size from --per-node up")
    parser.add_argument("--skip-straight", action="store_true")
    parser.add_argument("--start-timeout", type=float, default=15.0, help="scaling.start_timeout_s of the elastic run")
    args = parser.parse_args()
    from ray.cluster_utils import Cluster

    from ptft_dist import config as C
    from ptft_dist import jobs, launcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not os.environ.get("RAY_TMPDIR"):
        sys.exit("set RAY_TMPDIR to a private directory (see tests/_multinode_pretrain.py)")
    k = args.per_node
    cluster = Cluster(initialize_head=True, head_node_args=head_node_args(k))
    try:
        doomed = cluster.add_node(num_cpus=k)
        cluster.wait_for_nodes()
        common = [
            f"scaling.num_workers={2 * k}",
            "scaling.cpus_per_worker=1",
            "scaling.max_failures=-1",
            f"zero.stage={args.stage}",
            f"optim.max_steps={STEPS}",
            "checkpoint.every_steps=10",
            "data.ledger=true",
            "data.elastic_determinism=true",
            "tracking.log_every_steps=10",
            f"optim.micro_batch_size_per_rank={args.micro_batch}",
            f"optim.global_batch_size={args.global_batch}",
            "optim.lr=3e-3",
            "optim.warmup_steps=3",
            "eval_every_steps=1000",
            "data.num_eval_samples=16",
            f"data.dataset_dir={args.dataset}",
            *TINY_MODEL,
        ]
        timeline: dict[str, float] = {}
        with launcher.session(cluster.address):
            straight = None
            if not args.skip_straight:
                straight = jobs.pretrain(
                    C.load("pretrain", "pretrain_tiny", [*common, f"run_dir={args.out / 'straight'}"])
                )

            run_dir = args.out / "elastic"
            elastic = [
                f"scaling.min_workers={k}",
                "scaling.resize_interval_s=3",
                f"scaling.start_timeout_s={args.start_timeout:g}",
            ]
            if args.fixed:
                elastic = []
            cfg = C.load("pretrain", "pretrain_tiny", [*common, *elastic, f"run_dir={run_dir}"])
            outcome: dict = {}
            runner = threading.Thread(target=lambda: outcome.update(summary=jobs.pretrain(cfg)))
            runner.start()
            _wait(f"step {LOSE_AT}", lambda: (_last_entry(run_dir) or {}).get("step", 0) >= LOSE_AT, runner)
            logging.info("removing node %s (it holds %d of the %d workers)", doomed.node_id, k, 2 * k)
            timeline["removed"] = time.time()
            cluster.remove_node(doomed)  # its raylet and every process on it die
            if args.fixed:
                time.sleep(20)
                timeline["added"] = time.time()
                logging.info("adding a new node")
                cluster.add_node(num_cpus=k)
            else:
                _wait(
                    "a step on fewer workers",
                    lambda: (
                        (_last_entry(run_dir) or {}).get("world_size") == k
                        and _last_entry(run_dir)["time"] > timeline["removed"]
                    ),
                    runner,
                )
                timeline["first_small_step"] = _last_entry(run_dir)["time"]
                small_from = _last_entry(run_dir)["step"]
                _wait("6 steps on fewer workers", lambda: _last_entry(run_dir)["step"] >= small_from + 5, runner)
                timeline["added"] = time.time()
                logging.info("adding a new node")
                cluster.add_node(num_cpus=k)
            _wait(
                "a step on all workers again",
                lambda: (
                    (_last_entry(run_dir) or {}).get("world_size") == 2 * k
                    and _last_entry(run_dir)["time"] > timeline["added"]
                ),
                runner,
                timeout_s=600,
            )
            timeline["first_full_step"] = _last_entry(run_dir)["time"]
            runner.join(timeout=600)
            if "summary" not in outcome:
                raise RuntimeError("the run did not finish")
        print(json.dumps({"straight": straight, "elastic": outcome["summary"], "timeline": timeline}), flush=True)
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
