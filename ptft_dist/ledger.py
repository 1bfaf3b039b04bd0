"""The sample ledger (``data.ledger: true``): which samples each rank trained on, per step.

Each rank appends one JSON line per optimizer step to ``<run_dir>/ledger/rank<r>.jsonl``:
``{"step", "rank", "world_size", "time", "keys"}``. A step redone after a restart is written
again, perhaps by another world size; :func:`committed` reads the trajectory that counted."""

from __future__ import annotations

import json
import time
from pathlib import Path

DIR = "ledger"


class Ledger:
    """One rank's ledger file, opened for appending (line-buffered: a crash loses no whole line)."""

    def __init__(self, run_dir: Path, rank: int, world_size: int):
        (Path(run_dir) / DIR).mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size = rank, world_size
        self.file = open(Path(run_dir) / DIR / f"rank{rank}.jsonl", "a", buffering=1)

    def write(self, step: int, keys: list[str]) -> None:
        entry = {"step": step, "rank": self.rank, "world_size": self.world_size, "time": time.time(), "keys": keys}
        self.file.write(json.dumps(entry) + "\n")

    def close(self) -> None:
        self.file.close()


def committed(run_dir: str | Path) -> dict[int, list[str]]:
    """Step -> the sample keys of every rank of the attempt that counted, rank by rank.

    The last write of a step (by time) names the world size of the attempt that counted; each of
    its ranks' last entry for that step is the one that counted (older attempts, of any size,
    wrote before it)."""
    latest: dict[tuple[int, int], dict] = {}
    for path in sorted(Path(run_dir, DIR).glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            key = (entry["step"], entry["rank"])
            if key not in latest or entry["time"] >= latest[key]["time"]:
                latest[key] = entry
    last_of_step: dict[int, dict] = {}
    for (step, _), entry in latest.items():
        if step not in last_of_step or entry["time"] > last_of_step[step]["time"]:
            last_of_step[step] = entry
    steps: dict[int, list[str]] = {}
    for step, last in sorted(last_of_step.items()):
        ranks = [latest.get((step, r)) for r in range(last["world_size"])]
        if any(e is None or e["world_size"] != last["world_size"] for e in ranks):
            raise ValueError(f"{run_dir}: the ledger of step {step} lacks a rank of its world of {last['world_size']}")
        steps[step] = [k for e in ranks for k in e["keys"]]
    return steps
