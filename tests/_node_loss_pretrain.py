"""A node lost mid-run: tiny pretraining on a 2-node Ray cluster (``ray.cluster_utils.Cluster``,
1 CPU per node), the non-head node removed while it holds a training worker, a new node added
a little later; the run resumes from its last checkpoint and finishes.

    python tests/_node_loss_pretrain.py DATASET OUT_DIR

Run in a process of its own by ``tests/test_faults.py`` (one process joins one cluster; set
RAY_TMPDIR to a private directory first, see ``tests/_multinode_pretrain.py``). Runs the same
config uninterrupted first (``OUT_DIR/straight``), then with the node loss (``OUT_DIR/lost``),
and prints one JSON line: both summaries, the removed node's id and the restarted worker pids.
"""

from __future__ import annotations

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


def _beat(run_dir: Path, rank: int) -> dict | None:
    try:
        return json.loads((run_dir / "progress" / f"rank{rank}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def main(dataset: Path, out: Path) -> int:
    from ray.cluster_utils import Cluster

    from ptft_dist import config as C
    from ptft_dist import jobs, launcher

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if not os.environ.get("RAY_TMPDIR"):
        sys.exit("set RAY_TMPDIR to a private directory (see tests/_multinode_pretrain.py)")
    cluster = Cluster(initialize_head=True, head_node_args=head_node_args(1))
    try:
        doomed = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        common = [
            "scaling.num_workers=2",
            "scaling.cpus_per_worker=1",
            "scaling.max_failures=2",
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
            f"data.dataset_dir={dataset}",
        ]
        with launcher.session(cluster.address):
            straight = jobs.pretrain(C.load("pretrain", "pretrain_tiny", [*common, f"run_dir={out / 'straight'}"]))

            lost_dir = out / "lost"
            outcome: dict = {}
            runner = threading.Thread(
                target=lambda: outcome.update(
                    summary=jobs.pretrain(C.load("pretrain", "pretrain_tiny", [*common, f"run_dir={lost_dir}"]))
                )
            )
            runner.start()
            deadline = time.time() + 300
            while not (
                (_beat(lost_dir, 0) or {}).get("step", 0) >= 12 and (_beat(lost_dir, 1) or {}).get("step", 0) >= 12
            ):
                if time.time() > deadline or not runner.is_alive():
                    raise TimeoutError("the run never reached step 12")
                time.sleep(0.05)
            before = {r: _beat(lost_dir, r)["pid"] for r in (0, 1)}
            logging.info("removing node %s (it holds one of the two workers)", doomed.node_id)
            cluster.remove_node(doomed)  # its raylet and every process on it die
            time.sleep(25)  # the run cannot go on with one CPU: it waits, and says so
            logging.info("adding a new node")
            cluster.add_node(num_cpus=1)
            runner.join(timeout=600)
            if "summary" not in outcome:
                raise RuntimeError("the run did not finish after the node came back")
            after = {r: _beat(lost_dir, r)["pid"] for r in (0, 1)}
        print(
            json.dumps(
                {
                    "straight": straight,
                    "lost": outcome["summary"],
                    "removed_node": doomed.node_id,
                    "pids_before": before,
                    "pids_after": after,
                }
            ),
            flush=True,
        )
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()))
