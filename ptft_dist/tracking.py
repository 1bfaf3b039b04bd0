"""Metrics: a JSONL file always, W&B on rank 0 when enabled (offline without an API key).

``wandb`` is imported lazily, only when enabled. Other ranks get a tracker that writes
nothing, so callers never test the rank themselves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from .config import TrackingConfig
from .world import World

log = logging.getLogger(__name__)

SECRET_HINTS = ("key", "token", "secret", "password")


class Tracker:
    """``log(metrics, step)``, ``summary(...)``, ``close()``. Rank 0 writes; others do nothing."""

    def __init__(self, run_dir: str | Path, cfg: TrackingConfig, world: World, *, config: dict | None = None, job_type: str = "train"):
        self.active = world.is_rank_zero
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self._wandb = None
        self._file = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb:
            self._start_wandb(config or {}, job_type)

    def _start_wandb(self, config: dict, job_type: str) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        self._wandb = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.cfg.name or self.run_dir.name,
            tags=self.cfg.tags or None,
            job_type=job_type,
            dir=str(self.run_dir),
            config=config,
            mode=mode,
        )
        if mode == "offline":
            log.info("W&B is offline; upload later with: wandb sync %s", self._wandb.dir.rsplit("/files", 1)[0])

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def write_summary(run_dir: str | Path, metrics: dict[str, Any], artifacts: dict[str, str]) -> Path:
    path = Path(run_dir, "summary.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"metrics": metrics, "artifacts": artifacts}, indent=1))
    os.replace(tmp, path)
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir, "metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
