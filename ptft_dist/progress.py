"""The driver's view of a running job: one compact line per logged step, said waits.

The workers write ``<run_dir>/metrics.jsonl`` (rank 0) and ``<run_dir>/progress/rank<r>.json``
(every rank, every step, with the phase it is in: :func:`heartbeat`). :class:`Monitor` follows both from the
driver in a thread and prints

    pretrain | step 400/2,000 | loss 5.412 | 4.8k tok/s | ETA 5m31s
    pretrain | step 400 eval | MLM loss 5.301 | masked-token accuracy 21.4%
    pretrain | starting: data, model and DeepSpeed engine (10s so far)
    pretrain | step 600: writing a checkpoint (12s so far)
    finetune[sst2] | waiting for cluster resources (2 workers x 1 CPU; free now: 0.5 CPU)

instead of the workers' own log lines, which stay in Ray's log files (``--ray-logs`` shows
them here too). Nothing here imports ``ray``: the launcher hands in a ``waiting()`` callback.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("ptft_dist.progress")

#: Its presence in a run dir asks the workers to write a checkpoint and stop (the driver's
#: SIGTERM handler creates it; the training loop looks for it after every step).
STOP_FILE = "STOP"


def heartbeat(run_dir: str | Path, rank: int, step: int, phase: str = "train") -> None:
    """Write ``<run_dir>/progress/rank<rank>.json``: this process's pid, step and phase (setup,
    train, eval, checkpoint, test, export), for the driver's lines, monitoring and fault tests."""
    path = Path(run_dir) / "progress" / f"rank{rank}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    now = time.time()
    tmp.write_text(json.dumps({"pid": os.getpid(), "step": step, "time": now, "phase": phase, "phase_since": now}))
    os.replace(tmp, path)


#: What the driver says of a phase that lasts (a "train" phase is said by its metrics rows).
PHASES = {
    "setup": "starting: data, model and DeepSpeed engine",
    "eval": "evaluating",
    "checkpoint": "writing a checkpoint",
    "test": "testing",
    "export": "exporting the model",
}


def duration(seconds: float) -> str:
    """``42s``, ``5m31s``, ``2h05m``."""
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def rate(value: float, unit: str) -> str:
    return f"{value / 1000:.1f}k {unit}" if value >= 1000 else f"{value:.0f} {unit}"


class Monitor:
    """Follows a run directory from the driver; ``start()`` / ``stop()`` or a ``with`` block.

    ``waiting()`` returns a description of what the cluster cannot give yet (or None); it is
    asked while no worker has started, and while the heartbeat is stale (workers lost and
    being replaced). ``say`` receives every line (default: the log).
    """

    def __init__(
        self,
        run_dir: str | Path,
        name: str,
        *,
        max_steps: int,
        time_budget_s: float | None = None,
        waiting: Callable[[], str | None] | None = None,
        say: Callable[[str], None] | None = None,
        interval_s: float = 2.0,
        wait_notice_s: float = 20.0,
        slow_phase_s: float = 5.0,
    ) -> None:
        self.run_dir, self.name = Path(run_dir), name
        self.max_steps, self.time_budget_s = max_steps, time_budget_s
        self.waiting, self.say = waiting, say or log.info
        self.interval_s, self.wait_notice_s, self.slow_phase_s = interval_s, wait_notice_s, slow_phase_s
        metrics = self.run_dir / "metrics.jsonl"
        self._offset = metrics.stat().st_size if metrics.is_file() else 0  # a resumed run: only new rows
        self._started_at = time.time()
        self._seen_worker = False
        self._last_wait_notice = self._started_at
        self._phase_said: tuple | None = None
        self._last_row: dict | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"ptft-progress-{name}", daemon=True)

    def start(self) -> Monitor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the last rows

    def __enter__(self) -> Monitor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as e:  # never let monitoring take the run down
                log.debug("progress monitor: %s", e)

    # one look at the run directory
    def poll(self) -> None:
        for row in self._new_rows():
            self._seen_worker = True
            line = self.line(row)
            if line:
                self.say(f"{self.name} | {line}")
        beat = self._heartbeat()
        if beat is not None and beat.get("time", 0) >= self._started_at - 1:
            self._seen_worker = True
            self._phase(beat)
        now = time.time()
        # before the workers start, and while they are gone (a lost node, a restart)
        idle = not self._seen_worker or (
            beat is not None and now - beat.get("time", now) > max(self.wait_notice_s, 10.0)
        )
        if idle and self.waiting is not None and now - self._last_wait_notice >= self.wait_notice_s:
            what = self.waiting()
            if what:
                self.say(f"{self.name} | waiting {duration(now - self._started_at)} for cluster resources: {what}")
            self._last_wait_notice = now

    def _new_rows(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return []
        with open(path) as fh:
            fh.seek(self._offset)
            text = fh.read()
        end = text.rfind("\n") + 1  # a row being written is read next time
        self._offset += len(text[:end].encode())
        rows = []
        for raw in text[:end].splitlines():
            try:
                rows.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
        return rows

    def _heartbeat(self) -> dict | None:
        try:
            return json.loads((self.run_dir / "progress" / "rank0.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def _phase(self, beat: dict) -> None:
        phase = beat.get("phase", "train")
        if phase == "train":
            return
        since = beat.get("phase_since", beat.get("time", time.time()))
        key = (phase, beat.get("step"), since)
        waited = time.time() - since
        if waited >= self.slow_phase_s and self._phase_said != key:
            self._phase_said = key
            what = PHASES.get(phase, phase)
            where = "" if phase == "setup" else f"step {beat.get('step')}: "
            self.say(f"{self.name} | {where}{what} ({duration(waited)} so far)")

    def line(self, row: dict) -> str | None:
        """The compact line for one metrics row (None: not worth a line)."""
        step = row.get("step")
        if "eval_mlm_accuracy" in row:
            return (
                f"step {step} eval | MLM loss {row['eval_mlm_loss']:.3f}"
                f" | masked-token accuracy {100 * row['eval_mlm_accuracy']:.1f}%"
            )
        if "val_accuracy" in row:
            return (
                f"step {step} validation | accuracy {100 * row['val_accuracy']:.1f}%"
                f" | macro-F1 {row.get('val_macro_f1', float('nan')):.3f}"
            )
        if "test_accuracy" in row:
            return (
                f"test | accuracy {100 * row['test_accuracy']:.1f}%"
                f" | macro-F1 {row.get('test_macro_f1', float('nan')):.3f}"
            )
        if "train_loss" not in row:
            return None
        parts = [
            f"step {step:,}/{self.max_steps:,}" if not self.time_budget_s else f"step {step:,}",
            "loss skipped (not finite)" if row["train_loss"] is None else f"loss {row['train_loss']:.3f}",
        ]
        if "tokens_per_s" in row:
            parts.append(rate(row["tokens_per_s"], "tok/s"))
        elif "examples_per_s" in row:
            parts.append(rate(row["examples_per_s"], "examples/s"))
        eta = row.get("eta_s")
        if eta is None and self._last_row is not None and row.get("time") and self._last_row.get("time"):
            dt, ds = row["time"] - self._last_row["time"], step - self._last_row["step"]
            if dt > 0 and ds > 0:
                eta = (self.max_steps - step) * dt / ds
        if self.time_budget_s and row.get("train_time_s") is not None:
            parts.append(f"{duration(row['train_time_s'])} of {duration(self.time_budget_s)} budget")
        if eta is not None:
            parts.append(f"ETA {duration(eta)}")
        self._last_row = row
        return " | ".join(parts)
