"""Soak: train a tiny model for a long time with a checkpoint every minute, and watch the
workers for leaks.

    python benchmarks/soak.py [--minutes 20]

Every 10 s it samples each training worker's RSS and open file descriptors (the workers'
pids come from their heartbeat files, ``<run_dir>/progress/rank<r>.json``) and counts the
checkpoints kept. RSS growth is measured from the sample at 20% of the run (after warm-up and
the first checkpoints) to the end; goal <= 5%. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "disabled")

from ptft_dist import config as C  # noqa: E402
from ptft_dist import jobs, launcher  # noqa: E402


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=20.0)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ptft-soak-"))
    jobs.build_data(
        C.load(
            "data",
            overrides=[
                f"data.output_dir={work / 'data'}",
                "data.max_documents=6000",
                "data.seq_len=64",
                "data.samples_per_shard=256",
            ],
        ).data,
        work / "build",
    )
    run_dir = work / "run"
    cfg = C.load(
        "pretrain",
        "pretrain_tiny",
        [
            f"data.dataset_dir={work / 'data'}",
            f"run_dir={run_dir}",
            "optim.max_steps=10000000",
            f"time_budget_s={a.minutes * 60}",
            "checkpoint.every_minutes=1",
            "checkpoint.keep_last=2",
            "eval_every_steps=500",
            "tracking.log_every_steps=100",
        ],
    )
    samples: list[dict] = []
    done = threading.Event()

    def watch() -> None:
        start = time.time()
        while not done.wait(10):
            row = {
                "t_s": time.time() - start,
                "checkpoints": len([d for d in (run_dir / "ray" / "pretrain").glob("checkpoint_*") if d.is_dir()]),
            }
            for beat in sorted((run_dir / "progress").glob("rank*.json")):
                try:
                    pid = json.loads(beat.read_text())["pid"]
                    row[f"{beat.stem}_rss_mb"], row[f"{beat.stem}_fds"] = _rss_mb(pid), _fds(pid)
                except (OSError, ValueError):
                    continue
            samples.append(row)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with launcher.session(num_cpus=2):
        summary = jobs.pretrain(cfg)
    done.set()
    watcher.join()
    rows = [r for r in samples if "rank0_rss_mb" in r]
    base = rows[max(0, int(len(rows) * 0.2))]
    last = rows[-1]
    print(f"{'t (s)':>7} {'rank0 RSS MB':>13} {'rank1 RSS MB':>13} {'fds r0':>7} {'fds r1':>7} {'checkpoints':>12}")
    for r in rows[:: max(1, len(rows) // 20)] + [last]:
        print(
            f"{r['t_s']:>7.0f} {r.get('rank0_rss_mb', 0):>13.0f} {r.get('rank1_rss_mb', 0):>13.0f} "
            f"{r.get('rank0_fds', 0):>7} {r.get('rank1_fds', 0):>7} {r['checkpoints']:>12}"
        )
    figures = {
        "minutes": a.minutes,
        "steps": summary["metrics"]["steps"],
        "rss_growth_rank0": last["rank0_rss_mb"] / base["rank0_rss_mb"] - 1,
        "rss_growth_rank1": last.get("rank1_rss_mb", float("nan")) / base.get("rank1_rss_mb", float("nan")) - 1,
        "fds_start_end_rank0": [base["rank0_fds"], last["rank0_fds"]],
        "checkpoints_kept_max": max(r["checkpoints"] for r in rows),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
