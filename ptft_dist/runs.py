"""``ptft runs DIR``: the run directories under a folder, with their state, in one table.

Owns reading a run directory's state from what it holds, and ``driver.json``, which the CLI
and the Python API write around a run (:func:`record_driver`: the driver's host, pid, command
and start; at the end its exit code and error line). The state, in order:

- ``summary.json`` present: finished, or stopped (``completed: false``: a checkpoint to resume);
- ``driver.json`` ended: exit 75 stopped, another non-zero code failed (with its error);
- ``driver.json`` still open: running while its pid lives on this host, else failed (killed);
- otherwise the workers' heartbeats ``progress/rank<r>.json``: a live pid or a beat of the
  last minute means running, a fresh config.yaml without heartbeats starting, else failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .progress import duration as format_duration

#: A heartbeat younger than this counts as running even when its pid is not on this host.
RECENT_BEAT_S = 60.0
DRIVER_FILE = "driver.json"
#: Metrics shown as "last eval", in this order, when a run has them.
EVAL_KEYS = ("test_accuracy", "test_macro_f1", "eval_mlm_loss", "eval_mlm_accuracy", "val_accuracy", "eval_accuracy")
MAX_DEPTH = 4


class RunsError(UserError):
    """The folder to list does not exist or is not a folder."""


@dataclass
class RunRow:
    path: str
    command: str
    state: str
    steps: int | None
    max_steps: int | None
    eval: dict[str, float]
    started: float | None
    duration_s: float | None
    error: str | None = None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@contextlib.contextmanager
def record_driver(run_dir: str | Path, command: str):
    """Around a run: ``<run_dir>/driver.json`` says the driver's host, pid, command and start,
    and at the end its exit code (0, 75 for a stop with a checkpoint, 1 or 2 for errors,
    130 interrupted) and error line. A record that cannot be written is skipped."""
    from .jobs import Preempted

    path = Path(run_dir) / DRIVER_FILE
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": command, "started": time.time()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, record)
    except OSError:
        yield
        return
    code, error = 0, None
    try:
        yield
    except Preempted as e:
        code, error = e.exit_code, str(e)
        raise
    except KeyboardInterrupt:
        code, error = 130, "interrupted"
        raise
    except (ValueError, OSError) as e:  # ConfigError, DataError
        code, error = 2, str(e)
        raise
    except BaseException as e:
        code, error = 1, str(e) or type(e).__name__
        raise
    finally:
        with contextlib.suppress(OSError):
            _write_json(path, record | {"ended": time.time(), "exit_code": code, "error": error})


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _rows(path: Path) -> list[dict]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut short by a run that is writing it
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _command(config: Any, summary: dict | None) -> str:
    if isinstance(config, dict):
        if "pretrain" in config and "finetune" in config:
            return "pipeline"
        if "base_model" in config or "task" in config:
            return "finetune"
        if "model" in config and "optim" in config:
            return "pretrain"
        if "data" in config:
            return "data build"
    metrics = (summary or {}).get("metrics") or {}
    if "test_accuracy" in metrics:
        return "finetune"
    if "eval_mlm_loss" in metrics:
        return "pretrain"
    return "?"


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _running(run: Path, now: float) -> bool:
    for beat_file in run.glob("progress/rank*.json"):
        beat = _read_json(beat_file)
        if not isinstance(beat, dict):
            continue
        if _alive(beat.get("pid")) or now - float(beat.get("time") or 0) < RECENT_BEAT_S:
            return True
    return False


def read_state(run: Path, now: float | None = None) -> RunRow:
    """One run directory's row."""
    now = time.time() if now is None else now
    config = None
    if (run / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError, UnicodeDecodeError):
            config = None
    summary = _read_json(run / "summary.json") if (run / "summary.json").is_file() else None
    summary = summary if isinstance(summary, dict) else None
    metrics = (summary or {}).get("metrics") or {}
    rows = _rows(run / "metrics.jsonl")
    command = _command(config, summary)
    children = [c for c in (run / "pretrain", *sorted(run.glob("finetune/*"))) if c.is_dir()]
    driver = _read_json(run / DRIVER_FILE) if (run / DRIVER_FILE).is_file() else None
    driver = driver if isinstance(driver, dict) else None
    if command == "?" and driver and isinstance(driver.get("command"), str):
        command = driver["command"]
    error = None
    if summary is not None and not (driver and driver.get("exit_code") not in (None, 0, 75)):
        state = "stopped" if metrics.get("completed") is False else "finished"
        failed = [j["job"] for j in metrics.get("jobs") or [] if isinstance(j, dict) and j.get("status") == "failed"]
        if failed:
            state = f"finished, {len(failed)} job(s) failed"
    elif driver is not None and "exit_code" in driver:
        code = driver["exit_code"]
        state = "finished" if code == 0 else "stopped" if code == 75 else "failed"
        error = driver.get("error")
    elif driver is not None and driver.get("host") == socket.gethostname():
        state = "running" if _alive(driver.get("pid")) else "failed"
        error = None if state == "running" else "the driver is gone without saying how it ended (killed?)"
    elif _running(run, now) or (command == "pipeline" and any(_running(c, now) for c in children)):
        state = "running"
    elif (
        not any(run.glob("progress/rank*.json"))
        and (run / "config.yaml").is_file()
        and now - (run / "config.yaml").stat().st_mtime < RECENT_BEAT_S
    ):
        state = "starting"  # written by the driver, no worker heartbeat yet
    else:
        state = "failed"
    steps = metrics.get("steps") if isinstance(metrics.get("steps"), int) else None
    if steps is None and rows:
        steps = max(r["step"] for r in rows)
    if steps is None:  # nothing logged yet: the step the workers' heartbeats last said
        beats = [_read_json(b) for b in run.glob("progress/rank*.json")]
        said = [b["step"] for b in beats if isinstance(b, dict) and isinstance(b.get("step"), int)]
        steps = max(said) if said else None
    max_steps = None
    if isinstance(config, dict) and isinstance(config.get("optim"), dict):
        max_steps = config["optim"].get("max_steps")
    last_eval: dict[str, float] = {}
    for key in EVAL_KEYS:
        value = metrics.get(key)
        if value is None:
            value = next((r[key] for r in reversed(rows) if isinstance(r.get(key), (int, float))), None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            last_eval[key] = float(value)
    times = [r["time"] for r in rows if isinstance(r.get("time"), (int, float))]
    started = driver.get("started") if driver else None
    if started is None and (run / "config.yaml").is_file():
        started = (run / "config.yaml").stat().st_mtime
    if times:
        started = min(times) if started is None else min(started, min(times))
    ends = [p.stat().st_mtime for p in (run / "summary.json", run / "metrics.jsonl") if p.is_file()]
    if driver and isinstance(driver.get("ended"), (int, float)):
        ends = [driver["ended"]]
    ends += [p.stat().st_mtime for p in run.glob("progress/rank*.json")]
    if state == "running":
        ends.append(now)
    duration = max(ends) - started if started is not None and ends else None
    return RunRow(
        str(run),
        command,
        state,
        steps,
        max_steps if isinstance(max_steps, int) else None,
        last_eval,
        started,
        duration,
        error,
    )


def _is_run(path: Path) -> bool:
    return any((path / f).is_file() for f in ("config.yaml", "metrics.jsonl", "summary.json", DRIVER_FILE))


def list_runs(folder: str | Path, now: float | None = None) -> list[RunRow]:
    """Every run directory under ``folder`` (itself included), a pipeline's steps after it."""
    root = Path(folder)
    if not root.exists():
        raise RunsError(f"{root} does not exist")
    if not root.is_dir():
        raise RunsError(f"{root} is not a directory")
    found: list[Path] = []

    def walk(path: Path, depth: int) -> None:
        if _is_run(path):
            found.append(path)
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(p for p in path.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return
        for child in children:
            if child.name not in ("ray", "progress", "ledger", "export", "adapter", "merged", "report", "tokenizer"):
                walk(child, depth + 1)

    walk(root, 0)
    return [read_state(p, now) for p in found]


def _duration(seconds: float | None) -> str:
    return "-" if seconds is None else format_duration(seconds)


def format_table(rows: list[RunRow], root: str | Path | None = None) -> str:
    """The rows as an aligned text table."""
    head = ("run", "command", "state", "steps", "last eval", "started", "duration")
    table = [head]
    for r in rows:
        steps = "-" if r.steps is None else f"{r.steps}" + (f"/{r.max_steps}" if r.max_steps else "")
        evals = ", ".join(f"{k} {v:.4g}" for k, v in r.eval.items()) or "-"
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started)) if r.started else "-"
        path = os.path.relpath(r.path, root) if root is not None else r.path
        table.append((path, r.command, r.state, steps, evals, started, _duration(r.duration_s)))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    for r in rows:
        if r.error and r.state == "failed":
            path = os.path.relpath(r.path, root) if root is not None else r.path
            text = " ".join(r.error.split())
            lines.append(f"{path}: {text[:300]}{'...' if len(text) > 300 else ''}")
    return "\n".join(lines)
