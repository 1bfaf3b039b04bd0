"""Metrics: a JSONL file always, W&B on rank 0 when enabled (offline without an API key).

``wandb`` is imported lazily, only when enabled. Other ranks get a tracker that writes
nothing, so callers never test the rank themselves.

One training job is one W&B run: rank 0 creates it with an id that the recipe stores in its
checkpoints (``tracker.run_id``) and hands back on resume (``Tracker(..., resume_id=...)``),
so a resumed job continues the same run instead of opening a new one. Metrics are plotted
against the optimizer step (``step``), not W&B's own call counter, so a resumed run that
logs a step again is not dropped. Secrets (the API key, fields named like ``*_key`` or
``*_token``) never reach the W&B config, the logs or ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .config import TrackingConfig
from .redaction import redact, secret_values
from .world import World

log = logging.getLogger(__name__)


def has_wandb_key() -> bool:
    """True when W&B can log in without asking: ``WANDB_API_KEY`` or a ``wandb login`` entry
    in ~/.netrc for the W&B host. Never reads the key into anything we keep."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return bool(host and netrc.netrc().authenticators(host))
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """``WANDB_MODE`` when set (online, offline, disabled), else online with a key, else offline."""
    return os.environ.get("WANDB_MODE") or ("online" if has_wandb_key() else "offline")


def new_run_id() -> str:
    """A fresh W&B run id: 8 lowercase letters and digits, like W&B's own."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


class Tracker:
    """``log(metrics, step)``, ``summary(metrics)``, ``run_id``, ``close()``. Rank 0 writes;
    others do nothing.

    Args:
        run_dir: where ``metrics.jsonl`` (and W&B's ``wandb/`` folder) go.
        cfg: the ``tracking`` section.
        world: only rank 0 writes.
        config: the resolved config, logged once to W&B (redacted).
        job_type: W&B job type (``pretrain``, ``finetune``).
        resume_id: the W&B run id stored in the checkpoint being resumed; the run continues
            under it. Takes precedence over ``cfg.run_id``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        cfg: TrackingConfig,
        world: World,
        *,
        config: dict | None = None,
        job_type: str = "train",
        resume_id: str | None = None,
    ):
        self.active = world.is_rank_zero
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self._wandb = None
        self._file = None
        self._offline_dir: Path | None = None
        self._run_id: str | None = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if cfg.wandb:
            self._start_wandb(config or {}, job_type, resume_id)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (rank 0 with W&B on), to store in checkpoints; None otherwise."""
        return self._run_id

    def _start_wandb(self, config: dict, job_type: str, resume_id: str | None) -> None:
        import wandb

        mode = wandb_mode()
        if mode == "disabled":
            log.info("W&B is disabled by WANDB_MODE=disabled; metrics go to %s only", self.run_dir / "metrics.jsonl")
            return
        run_id = resume_id or self.cfg.run_id or new_run_id()
        name = self.cfg.name or (f"{self.cfg.group}-{self.run_dir.name}" if self.cfg.group else self.run_dir.name)
        self._wandb = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=name,
            group=self.cfg.group,
            tags=self.cfg.tags or None,
            job_type=job_type,
            dir=str(self.run_dir),
            config=redact(config, secret_values()),
            id=run_id,
            resume="allow",  # continue the run when the id exists, else create it
            reinit="create_new",  # this tracker's own run, whatever else the process has open
            mode=mode,
        )
        self._run_id = self._wandb.id
        # The optimizer step is the x-axis of every metric (W&B's own `_step` counts calls).
        self._wandb.define_metric("step")
        self._wandb.define_metric("*", step_metric="step")
        verb = "continuing" if resume_id else "started"
        log.info(
            "W&B run %s %s (project %s, group %s, %s)", run_id, verb, self.cfg.project, self.cfg.group or "-", mode
        )
        if mode == "offline":
            self._offline_dir = Path(self._wandb.dir).parent
            why = "WANDB_MODE=offline" if os.environ.get("WANDB_MODE") else "no API key"
            log.info("W&B is offline (%s); upload later with: %s", why, self.sync_command())

    def sync_command(self) -> str | None:
        """The ``wandb sync`` command that uploads this offline run (every part of a resumed
        run: W&B uploads them in order); None when W&B is not offline."""
        if self._offline_dir is None:
            return None
        # Each start of a resumed run is one folder, named by its start time (plus "-1"...
        # when two start within a second); the log file inside is named by the run id.
        parts = sorted(
            {str(p.parent) for p in self._offline_dir.parent.glob(f"offline-run-*/run-{self._run_id}.wandb")}
            | {str(self._offline_dir)}
        )
        return "wandb sync " + " ".join(parts)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.active:
            return
        row = {"step": step, "time": round(time.time(), 3)}
        row.update(_finite(metrics))
        self._file.write(json.dumps(row) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "time" and v is not None})

    def summary(self, metrics: dict[str, Any]) -> None:
        """Final numbers for the W&B run's summary (summary.json is :func:`write_summary`'s)."""
        if self._wandb is not None:
            self._wandb.summary.update(redact(_finite(metrics), secret_values()))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
            if self._offline_dir is not None:
                log.info("W&B run saved offline in %s; upload with: %s", self._offline_dir, self.sync_command())


def write_summary(run_dir: str | Path, metrics: dict[str, Any], artifacts: dict[str, str]) -> Path:
    """Write ``summary.json`` = ``{"metrics": ..., "artifacts": ...}`` atomically, secrets redacted."""
    path = Path(run_dir, "summary.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(redact({"metrics": metrics, "artifacts": artifacts}, secret_values()), indent=1))
    os.replace(tmp, path)
    return path


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir, "metrics.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
