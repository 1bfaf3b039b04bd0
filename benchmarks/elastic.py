"""Elastic pretraining: how fast a run goes on after a node loss, and what resharding costs.

    python benchmarks/elastic.py [--skip-loss] [--skip-checkpoint] [--skip-stream] [--stages 2 3]

(a) **Node loss** (``tests/_elastic_pretrain.py`` on a 2-node ``ray.cluster_utils.Cluster``, 1
    worker per node, tiny model): seconds from removing the node that holds a worker to the next
    training step, elastic (``scaling.min_workers=1``: goes on with 1 worker;
    ``scaling.start_timeout_s`` 15 and Ray's default 60) vs fixed size (today's behaviour: the
    run waits; a replacement node is added 20 s after the loss).
(b) **Checkpoint write and load** on a ~50M-parameter ModernBERT, 2 workers, ZeRO stage 2 and 3:
    the write (every rank its ZeRO shard, as ``checkpoint_save_s`` in metrics.jsonl), the load
    on the same 2 workers (the shards as written) and on 1 worker (DeepSpeed's universal
    conversion, then the load; ``checkpoint_load_s``).
(c) **Reading in global order** (elastic determinism) vs per-rank order: samples/s of one
    rank's stream of 2, WikiText-2 shards, shuffle window 1000, interleaved rounds.

Prints a table and, last, one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the node-loss script and its runner, the tiny dataset
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
os.environ.setdefault("WANDB_MODE", "disabled")

from helpers import build_tiny_dataset, run_cluster_script  # noqa: E402

from ptft_dist import checkpoint, jobs, launcher  # noqa: E402
from ptft_dist import config as C  # noqa: E402
from ptft_dist.tracking import read_metrics  # noqa: E402

#: ~50M parameters (ModernBERT, vocabulary 8192)
MODEL_50M = [
    "model.family=modernbert",
    "model.hidden_size=640",
    "model.num_layers=8",
    "model.num_heads=10",
    "model.intermediate_size=2560",
]


def wiki_dataset(work: Path) -> Path:
    out = work / "data"
    jobs.build_data(
        C.load("data", overrides=[f"data.output_dir={out}", "data.samples_per_shard=2048"]).data, work / "build"
    )
    return out


def node_loss(dataset: Path, work: Path, variant: str) -> dict:
    """One run of tests/_elastic_pretrain.py; the seconds of its timeline after the loss."""
    args = {"elastic": [], "elastic-60": ["--start-timeout", "60"], "fixed": ["--fixed"]}[variant]
    result, _ = run_cluster_script(
        "_elastic_pretrain.py", dataset, work / variant, "--skip-straight", *args, timeout=1800
    )
    t = result["timeline"]
    return {k: round(v - t["removed"], 1) for k, v in t.items() if k != "removed"}


def checkpoint_times(dataset: Path, work: Path, stage: int) -> dict:
    """Write with 2 workers; load on 2 (as written) and on 1 (universal conversion)."""
    run_dir = work / f"ckpt-z{stage}"
    common = [
        *MODEL_50M,
        f"zero.stage={stage}",
        "optim.max_steps=2",
        "optim.micro_batch_size_per_rank=4",
        "optim.global_batch_size=8",
        "eval_every_steps=1000",
        "data.num_eval_samples=8",
        f"data.dataset_dir={dataset}",
        f"run_dir={run_dir}",
    ]
    jobs.pretrain(C.load("pretrain", "pretrain_tiny", [*common, "stop_at_step=1"]))
    rows = read_metrics(run_dir)
    save_s = [r["checkpoint_save_s"] for r in rows if "checkpoint_save_s" in r][-1]
    # nothing left to train at max_steps=1: each resume only loads (and exports)
    jobs.pretrain(C.load("pretrain", "pretrain_tiny", [*common, "optim.max_steps=1"]))
    same = [r["checkpoint_load_s"] for r in read_metrics(run_dir) if "checkpoint_load_s" in r][-1]
    summary = jobs.pretrain(
        C.load("pretrain", "pretrain_tiny", [*common, "optim.max_steps=1", "scaling.num_workers=1"])
    )
    other = [r for r in read_metrics(run_dir) if "checkpoint_load_s" in r][-1]
    assert other["resumed_from_world_size"] == 2 and other["world_size"] == 1
    newest = checkpoint.latest(run_dir)
    size = sum(f.stat().st_size for f in newest.rglob("*") if f.is_file())
    return {
        "stage": stage,
        "save_s": round(save_s, 2),
        "load_same_world_s": round(same, 2),
        "load_other_world_s": round(other["checkpoint_load_s"], 2),
        "checkpoint_mb": round(size / 2**20, 1),
        "parameters": summary["metrics"].get("parameters"),
    }


def stream_rates(dataset: Path, rounds: int = 3, batches: int = 400) -> dict:
    """Samples/s of rank 0 of 2 reading ``batches`` micro batches of 16, per-rank vs global order."""
    import time

    from torch.utils.data import DataLoader

    from ptft_dist.data.stream import ShardStream, collate

    rates: dict[str, list[float]] = {"rank": [], "global": []}
    for _ in range(rounds):
        for order, extra in (("rank", {}), ("global", {"global_batch": 64, "micro_batch": 16})):
            stream = ShardStream(dataset, "train", rank=0, world_size=2, seed=0, shuffle_buffer=1000, **extra)
            it = iter(DataLoader(stream, batch_size=16, num_workers=0, collate_fn=collate))
            next(it)  # shard checks and the first window
            start = time.perf_counter()
            for _ in range(batches):
                next(it)
            rates[order].append(16 * batches / (time.perf_counter() - start))
    best = {k: max(v) for k, v in rates.items()}
    return {"samples_per_s": {k: round(v) for k, v in best.items()}, "global_over_rank": best["global"] / best["rank"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--skip-checkpoint", action="store_true")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ptft-elastic-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out: dict = {"node_loss": {}, "checkpoint": [], "stream": None}
    if not args.skip_loss:
        dataset = build_tiny_dataset(work / "tiny")
        for variant in ("elastic", "elastic-60", "fixed"):
            out["node_loss"][variant] = node_loss(dataset, work, variant)
            print(variant, out["node_loss"][variant], flush=True)
    if not (args.skip_checkpoint and args.skip_stream):
        dataset = wiki_dataset(work)
    if not args.skip_stream:
        out["stream"] = stream_rates(dataset)
        print("stream", out["stream"], flush=True)
    if not args.skip_checkpoint:
        with launcher.session(num_cpus=2):
            for stage in args.stages:
                out["checkpoint"].append(checkpoint_times(dataset, work, stage))
                print(out["checkpoint"][-1], flush=True)

    print("\nnode loss -> next step (s):")
    for variant, t in out["node_loss"].items():
        nxt = t.get("first_small_step", t.get("first_full_step"))
        print(f"  {variant:<11} next step after {nxt:6.1f}   back on all workers after {t['first_full_step']:6.1f}")
    print("\ncheckpoints (~50M parameters, 2 workers):")
    print(f"  {'stage':>5} {'write':>8} {'load 2->2':>10} {'load 2->1':>10} {'size MB':>8}")
    for c in out["checkpoint"]:
        print(
            f"  {c['stage']:>5} {c['save_s']:>8.2f} {c['load_same_world_s']:>10.2f} "
            f"{c['load_other_world_s']:>10.2f} {c['checkpoint_mb']:>8.1f}"
        )
    if out["stream"]:
        rates = out["stream"]["samples_per_s"]
        print(
            f"\nstream (rank 0 of 2): per-rank order {rates['rank']:,} samples/s, global order {rates['global']:,} "
            f"({out['stream']['global_over_rank']:.2f}x)"
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
