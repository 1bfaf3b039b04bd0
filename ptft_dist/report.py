"""``ptft report``: PNG plots and one HTML page from run directories, offline.

Reads only what a run directory holds: ``metrics.jsonl`` (required), ``summary.json``,
``config.yaml`` and, for finetuning, ``eval.json``; W&B is not needed. Several runs share
each plot (one colour per run) so they can be compared; a pipeline directory stands for its
``pretrain/`` and ``finetune/`` runs.

Plots, each made when some run logged its metrics: loss (training solid, validation dashed),
learning rate, tokens/s, examples/s, MFU, memory, validation accuracy and perplexity, gradient
norm, every other logged number in one grid; for finetuning, the test metrics, per-class F1
and one confusion matrix per run. Steps are integer ticks; each figure has one unit; a metric
that stays constant in every run is listed in the page instead of plotted; steps logged as
skipped (``"skipped": true``, loss null) are marked on the loss plot, never drawn as 0. With
several runs of a kind, a table shows the config fields that differ between them.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError
from .redaction import redact, secret_values

log = logging.getLogger(__name__)


class ReportError(UserError):
    """A run directory or one of its files that cannot be read, with the file in the message."""


@dataclass
class Run:
    """One run directory, read."""

    label: str
    path: Path
    rows: list[dict]
    summary: dict | None = None
    config_text: str | None = None
    eval: dict | None = None
    _series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict, repr=False)

    @property
    def kind(self) -> str:
        keys = self.keys()
        if (
            self.eval is not None
            or "examples_per_s" in keys
            or "test_accuracy" in (self.summary or {}).get("metrics", {})
        ):
            return "finetune"
        if "tokens_per_s" in keys or "eval_mlm_loss" in keys:
            return "pretrain"
        return "run"

    def skipped_steps(self) -> list[int]:
        """Steps logged with ``"skipped": true`` (their update was dropped: loss not finite)."""
        return sorted({row["step"] for row in self.rows if row.get("skipped") is True})

    def constant(self, key: str) -> bool:
        """Logged at least twice, always with the same value."""
        values = self.series(key)[1]
        return len(values) >= 2 and max(values) == min(values)

    def keys(self) -> set[str]:
        return {k for row in self.rows for k, v in row.items() if _is_number(v)} - {"step", "time"}

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, by step; a step logged twice (a resumed run logs the
        steps after its checkpoint again) keeps its last value."""
        if key not in self._series:
            by_step: dict[int, float] = {}
            for row in self.rows:
                if _is_number(row.get(key)):
                    by_step[row["step"]] = float(row[key])
            steps = sorted(by_step)
            self._series[key] = (steps, [by_step[s] for s in steps])
        return self._series[key]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- reading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ReportError(f"{path}: cannot be read ({e.strerror})") from None


def read_rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl, each checked to be an object with an integer ``step``."""
    if not path.is_file():
        raise ReportError(
            f"{path} does not exist: not a run directory (a run directory holds metrics.jsonl, summary.json and "
            "config.yaml)"
        )
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path} line {n}: not valid JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
            raise ReportError(
                f"{path} line {n}: a row must be a JSON object with an integer 'step' field, got {line[:80]!r}"
            )
        rows.append(row)
    if not rows:
        raise ReportError(f"{path} has no rows: the run logged nothing yet")
    return rows


def read_run(path: str | Path, label: str | None = None) -> Run:
    """Read one run directory. ``metrics.jsonl`` is required; ``summary.json`` (absent while a
    run is going), ``config.yaml`` and ``eval.json`` are used when present."""
    path = Path(path)
    run = Run(label=label or path.name, path=path, rows=read_rows(path / "metrics.jsonl"))
    if (path / "summary.json").is_file():
        summary = _read_json(path / "summary.json")
        if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
            raise ReportError(
                f'{path / "summary.json"}: field \'metrics\' must be a mapping ({{"metrics": ..., "artifacts": ...}})'
            )
        if not isinstance(summary.setdefault("artifacts", {}), dict):
            raise ReportError(f"{path / 'summary.json'}: field 'artifacts' must be a mapping")
        run.summary = summary
    if (path / "config.yaml").is_file():
        text = (path / "config.yaml").read_text(encoding="utf-8")
        try:
            run.config_text = yaml.safe_dump(
                redact(yaml.safe_load(text), secret_values()), sort_keys=False, default_flow_style=None
            )
        except yaml.YAMLError as e:
            raise ReportError(f"{path / 'config.yaml'}: not valid YAML ({e})") from None
    if (path / "eval.json").is_file():
        run.eval = _check_eval(path / "eval.json", _read_json(path / "eval.json"))
    return run


def _check_eval(path: Path, scores: Any) -> dict:
    if not isinstance(scores, dict) or not isinstance(scores.get("per_class"), dict):
        raise ReportError(f"{path}: field 'per_class' must be a mapping of label -> scores")
    k = len(scores["per_class"])
    matrix = scores.get("confusion_matrix")
    if not isinstance(matrix, list) or len(matrix) != k or not all(isinstance(r, list) and len(r) == k for r in matrix):
        raise ReportError(
            f"{path}: field 'confusion_matrix' must be a {k} x {k} list of lists (one row per label of 'per_class')"
        )
    return scores


def find_runs(paths: list[str | Path]) -> list[Run]:
    """The runs named on the command line; a directory without metrics.jsonl whose
    subdirectories are runs (a pipeline) stands for them. Labels are unique."""
    found: list[tuple[Path, str]] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"run directory {p} does not exist" if not p.exists() else f"{p} is not a directory")
        children: list[Path] = []
        if not (p / "metrics.jsonl").exists():  # a pipeline: its runs, and its finetune jobs one level down
            for c in sorted(d for d in p.iterdir() if d.is_dir()):
                if (c / "metrics.jsonl").is_file():
                    children.append(c)
                elif c.name == "finetune":
                    children += sorted(g for g in c.iterdir() if (g / "metrics.jsonl").is_file())
        order = {"pretrain": 0}
        children.sort(key=lambda c: (order.get(c.name, 1), str(c.relative_to(p))))
        if children:
            found += [(c, f"{p.resolve().name}/{c.relative_to(p)}") for c in children]
        else:
            found.append((p, p.resolve().name))
    labels = [label for _, label in found]
    if len(set(labels)) < len(labels):  # same names: tell them apart by their parents
        labels = [
            str(path.resolve()).rsplit("/", 2)[-2] + "/" + label if labels.count(label) > 1 else label
            for (path, _), label in zip(found, labels)
        ]
    if len(set(labels)) < len(labels):
        raise ReportError(
            f"the same run directory is named twice: {', '.join(sorted({lb for lb in labels if labels.count(lb) > 1}))}"
        )
    return [read_run(path, label) for (path, _), label in zip(found, labels)]


# --------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class Panel:
    """One plot: the metrics it draws, how they are named and scaled."""

    name: str
    title: str
    ylabel: str
    keys: tuple[tuple[str, str], ...]  # (metric, what it is: "train", "validation" or "")
    logy: bool = False
    scale: float = 1.0


PANELS = (
    Panel(
        "loss",
        "Loss",
        "cross-entropy loss",
        (
            ("train_loss", "train"),
            ("eval_mlm_loss", "validation"),
            ("eval_loss", "validation"),
            ("val_loss", "validation"),
        ),
    ),
    Panel("lr", "Learning rate", "learning rate", (("lr", ""),)),
    Panel("tokens_per_s", "Throughput", "tokens / s (all ranks)", (("tokens_per_s", ""),)),
    Panel("examples_per_s", "Throughput", "examples / s (all ranks)", (("examples_per_s", ""),)),
    Panel("mfu", "Model FLOPs utilisation", "MFU (% of peak)", (("mfu", ""),), scale=100.0),
    Panel(
        "eval_accuracy",
        "Validation masked-token accuracy",
        "accuracy",
        (("eval_mlm_accuracy", "validation"), ("eval_accuracy", "validation")),
    ),
    Panel(
        "perplexity", "Validation perplexity", "perplexity (log scale)", (("eval_perplexity", "validation"),), logy=True
    ),
    Panel("grad_norm", "Gradient norm", "global gradient norm (log scale)", (("grad_norm", ""),), logy=True),
)
#: Logged once at the end, shown as bars (finetuning) rather than curves.
FINAL_PREFIX = "test_"
MEMORY = re.compile(r"(^|_)(mem|memory)(_|$)")


def _memory_panel(keys: set[str]) -> Panel | None:
    """Memory metrics, all drawn in MiB (2^20 bytes): names ending in _mb/_mib are MiB (the
    engine's ``peak_memory_mb`` divides bytes by 2^20), _gb/_gib GiB, _bytes bytes."""
    mem = sorted(k for k in keys if MEMORY.search(k))
    if not mem:
        return None
    title = "Peak memory per rank" if mem == ["peak_memory_mb"] else "Memory"
    return Panel("memory", title, "MiB (2^20 bytes)", tuple((k, "") for k in mem))


def _memory_scale(key: str) -> float:
    if key.endswith(("_gb", "_gib")):
        return 1024.0
    if key.endswith("_bytes"):
        return 1 / 2**20
    return 1.0


def _figure(width: float = 7.0, height: float = 4.2):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _plot_panel(panel: Panel, runs: list[Run], colors: list, out: Path) -> Path | None:
    fig = _figure()
    ax = fig.add_subplot()
    lines = 0
    for run, color in zip(runs, colors):
        for key, role in panel.keys:
            steps, values = run.series(key)
            if not steps:
                continue
            scale = panel.scale * (_memory_scale(key) if panel.name == "memory" else 1.0)
            what = role or (key if len(panel.keys) > 1 else "")
            label = ", ".join(x for x in (run.label if len(runs) > 1 else "", what) if x) or key
            style = (
                dict(linestyle="--", marker="o", markersize=4)
                if role == "validation"
                else dict(linestyle="-", marker="o" if len(steps) < 12 else None, markersize=3)
            )
            ax.plot(steps, [v * scale for v in values], color=color, label=label, linewidth=1.6, **style)
            lines += 1
        if panel.name == "loss" and run.skipped_steps():
            skipped = run.skipped_steps()
            for i, s in enumerate(skipped[:200]):
                ax.axvline(
                    s,
                    color=color,
                    linestyle=":",
                    linewidth=1.0,
                    alpha=0.7,
                    label=f"skipped steps ({len(skipped)})" + (f", {run.label}" if len(runs) > 1 else "")
                    if i == 0
                    else None,
                )
            lines += 1
    if not lines:
        return None
    _integer_steps(ax)
    ax.set_title(panel.title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(panel.ylabel)
    if panel.logy:
        ax.set_yscale("log")
    if panel.name == "lr":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax.grid(True, alpha=0.3)
    if lines > 1:
        ax.legend(fontsize="small")
    path = out / f"{panel.name}.png"
    fig.savefig(path)
    return path


def _integer_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _plot_others(keys: list[str], runs: list[Run], colors: list, out: Path) -> Path | None:
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = _figure(max(6.0, 4.0 * cols), max(3.6, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, key in zip(axes, keys):
        for run, color in zip(runs, colors):
            steps, values = run.series(key)
            if steps:
                ax.plot(
                    steps,
                    values,
                    color=color,
                    label=run.label,
                    linewidth=1.4,
                    marker="o" if len(steps) < 12 else None,
                    markersize=3,
                )
        ax.set_title(key, fontsize="medium")
        ax.set_xlabel("optimizer step")
        _integer_steps(ax)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    if len(runs) > 1:
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color=c, linewidth=1.4) for c in colors]
        fig.legend(
            handles, [r.label for r in runs], loc="outside lower center", ncols=min(len(runs), 4), fontsize="small"
        )
    path = out / "other_metrics.png"
    fig.savefig(path)
    return path


def _final_metrics(run: Run) -> dict[str, float]:
    """test_* numbers: from summary.json, else the last logged value."""
    found = {
        k: float(v)
        for k, v in ((run.summary or {}).get("metrics") or {}).items()
        if k.startswith(FINAL_PREFIX) and _is_number(v)
    }
    for key in run.keys():
        if key.startswith(FINAL_PREFIX) and key not in found:
            found[key] = run.series(key)[1][-1]
    return found


def _bars(
    title: str,
    ylabel: str,
    groups: list[str],
    runs: list[Run],
    values: list[dict[str, float]],
    colors: list,
    path: Path,
) -> Path:
    import numpy as np

    fig = _figure(max(6.0, 1.2 * len(groups) + 2), 4.2)
    ax = fig.add_subplot()
    width = 0.8 / len(runs)
    x = np.arange(len(groups))
    for i, (run, vals, color) in enumerate(zip(runs, values, colors)):
        heights = [vals.get(g, float("nan")) for g in groups]
        bars = ax.bar(x + (i - (len(runs) - 1) / 2) * width, heights, width, color=color, label=run.label)
        ax.bar_label(bars, fmt="%.3f", fontsize="x-small", padding=2)
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylim(0, 1.08)
    ax.set_title(title if len(runs) > 1 else f"{title}: {runs[0].label}")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    if len(runs) > 1:
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def _confusion(run: Run, path: Path) -> Path:
    import numpy as np

    names = list(run.eval["per_class"])
    counts = np.array(run.eval["confusion_matrix"], dtype=float)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    size = max(4.5, 0.6 * len(names) + 2.5)
    fig = _figure(size + 1.0, size)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(
                j,
                i,
                f"{int(counts[i, j])}",
                ha="center",
                va="center",
                fontsize="small",
                color="white" if share[i, j] > 0.5 else "black",
            )
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"Confusion matrix: {run.label} (test set)")
    fig.colorbar(image, ax=ax, label="share of the true label's examples")
    fig.savefig(path)
    return path


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def constant_metrics(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Metric -> {run: value} of the metrics every run that logs them logged constant."""
    keys = set().union(*(r.keys() for r in runs))
    found = {}
    for key in sorted(keys):
        having = [r for r in runs if r.series(key)[0]]
        if key.startswith(FINAL_PREFIX) or not having or not all(r.constant(key) for r in having):
            continue
        found[key] = {r.label: r.series(key)[1][0] for r in having}
    return found


def config_differences(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Dotted config field -> {run: value} of the fields whose values differ between runs
    (each run's config.yaml; run_dir and tracking names left out)."""
    flat = {}
    for r in runs:
        if r.config_text is None:
            continue
        flat[r.label] = _flatten(yaml.safe_load(r.config_text) or {})
    if len(flat) < 2:
        return {}
    names = sorted(set().union(*flat.values()))
    ignore = re.compile(r"(^|\.)(run_dir|tracking\.(name|run_id|group))$")
    return {
        n: {label: f.get(n, "(absent)") for label, f in flat.items()}
        for n in names
        if not ignore.search(n) and len({json.dumps(f.get(n, "(absent)"), default=str) for f in flat.values()}) > 1
    }


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        out = {}
        for i, v in enumerate(data):
            out.update(_flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: data}


def make_plots(runs: list[Run], out: Path) -> list[Path]:
    """Every plot the runs have data for, as PNG files in ``out``."""
    colors = _colors(len(runs))
    keys = set().union(*(r.keys() for r in runs)) - set(constant_metrics(runs))
    panels = [dataclasses.replace(p, keys=tuple((k, role) for k, role in p.keys if k in keys)) for p in PANELS]
    memory = _memory_panel(keys)
    if memory:
        panels.insert(5, memory)
    made = [p for p in (_plot_panel(panel, runs, colors, out) for panel in panels) if p]
    covered = {k for panel in PANELS for k, _ in panel.keys} | {k for k, _ in (memory.keys if memory else ())}
    others = sorted(k for k in keys - covered if not k.startswith(FINAL_PREFIX))
    made += [p for p in [_plot_others(others, runs, colors, out)] if p]
    finals = [(r, c, f) for r, c in zip(runs, colors) if (f := _final_metrics(r))]
    if finals:
        groups = sorted(
            set().union(*(f for _, _, f in finals)), key=lambda k: (k != "test_accuracy", k != "test_macro_f1", k)
        )
        values = [{k.removeprefix(FINAL_PREFIX): v for k, v in f.items()} for _, _, f in finals]
        made.append(
            _bars(
                "Test metrics",
                "score",
                [g.removeprefix(FINAL_PREFIX) for g in groups],
                [r for r, _, _ in finals],
                values,
                [c for _, c, _ in finals],
                out / "test_metrics.png",
            )
        )
    scored = [r for r in runs if r.eval is not None]
    if scored:
        labels = list(dict.fromkeys(n for r in scored for n in r.eval["per_class"]))
        f1 = [{n: float(s.get("f1", float("nan"))) for n, s in r.eval["per_class"].items()} for r in scored]
        made.append(
            _bars(
                "Per-class F1 (test set)",
                "F1",
                labels,
                scored,
                f1,
                [colors[runs.index(r)] for r in scored],
                out / "per_class_f1.png",
            )
        )
        made += [_confusion(r, out / f"confusion_{_slug(r.label)}.png") for r in scored]
    return made


# --------------------------------------------------------------------------- HTML


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items())
    return str(value)


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; vertical-align: top; }}
th {{ background: #f3f3f3; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
img {{ max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }}
pre {{ background: #f7f7f7; padding: 1em; overflow-x: auto; }}
.note {{ color: #666; }}
</style></head><body>
{body}
</body></html>
"""


def render_html(runs: list[Run], plots: list[Path]) -> str:
    e = html.escape
    out = [f"<h1>ptft report: {e(', '.join(r.label for r in runs))}</h1>"]
    out.append(
        f"<p class='note'>Made {datetime.datetime.now().isoformat(timespec='seconds')} by <code>ptft report</code> "
        "from metrics.jsonl, summary.json, config.yaml and eval.json.</p>"
    )
    out.append("<h2>Runs</h2><table><tr><th>run</th><th>kind</th><th>steps logged</th><th>directory</th></tr>")
    for r in runs:
        steps = [row["step"] for row in r.rows]
        status = "" if r.summary else " <span class='note'>(no summary.json: still running, or stopped)</span>"
        out.append(
            f"<tr><td>{e(r.label)}</td><td>{e(r.kind)}</td><td "
            f"class='num'>{min(steps)}-{max(steps)}</td><td><code>{e(str(r.path.resolve()))}</code>{status}</td></tr>"
        )
    out.append("</table>")

    out.append("<h2>Summary</h2>")
    names = list(dict.fromkeys(k for r in runs for k in ((r.summary or {}).get("metrics") or {})))
    if names:
        out.append("<table><tr><th>metric</th>" + "".join(f"<th>{e(r.label)}</th>" for r in runs) + "</tr>")
        for name in names:
            cells = "".join(
                f"<td class='num'>{e(_fmt((r.summary or {}).get('metrics', {}).get(name, '')))}</td>" for r in runs
            )
            out.append(f"<tr><td>{e(name)}</td>{cells}</tr>")
        out.append("</table>")
        for r in runs:
            artifacts = (r.summary or {}).get("artifacts") or {}
            if artifacts:
                items = "".join(f"<li>{e(k)}: <code>{e(str(v))}</code></li>" for k, v in artifacts.items())
                out.append(f"<p>Artifacts of {e(r.label)}:</p><ul>{items}</ul>")
    else:
        out.append("<p class='note'>No run has a summary.json yet.</p>")

    constants = constant_metrics(runs)
    if constants:
        out.append("<h2>Constant metrics</h2><p class='note'>The same value at every logged step: not plotted.</p>")
        out.append("<table><tr><th>metric</th>" + "".join(f"<th>{e(r.label)}</th>" for r in runs) + "</tr>")
        for name, values in constants.items():
            cells = "".join(f"<td class='num'>{e(_fmt(values.get(r.label, '')))}</td>" for r in runs)
            out.append(f"<tr><td>{e(name)}</td>{cells}</tr>")
        out.append("</table>")
    skipped = [(r, r.skipped_steps()) for r in runs if r.skipped_steps()]
    for r, steps in skipped:
        shown = ", ".join(map(str, steps[:20])) + (" ..." if len(steps) > 20 else "")
        out.append(f"<p>{e(r.label)}: {len(steps)} skipped step(s) (loss not finite, update dropped): {e(shown)}</p>")

    out.append("<h2>Plots</h2>")
    for p in plots:
        out.append(f"<p><img src='{e(p.name)}' alt='{e(p.stem.replace('_', ' '))}'></p>")

    by_kind: dict[str, list[Run]] = {}
    for r in runs:
        by_kind.setdefault(r.kind, []).append(r)
    for kind, group in by_kind.items():
        if len(group) < 2:
            continue
        diffs = config_differences(group)
        out.append(f"<h2>What differs between the {e(kind)} runs' configs</h2>")
        if not diffs:
            out.append("<p class='note'>Nothing: the configs are the same (run directories aside).</p>")
            continue
        out.append("<table><tr><th>field</th>" + "".join(f"<th>{e(r.label)}</th>" for r in group) + "</tr>")
        for name, values in diffs.items():
            cells = "".join(f"<td class='num'>{e(_fmt(values.get(r.label, '')))}</td>" for r in group)
            out.append(f"<tr><td><code>{e(name)}</code></td>{cells}</tr>")
        out.append("</table>")

    out.append("<h2>Resolved configs</h2>")
    for r in runs:
        if r.config_text is None:
            out.append(f"<p class='note'>{e(r.label)}: no config.yaml</p>")
            continue
        out.append(f"<details><summary>{e(r.label)}: config.yaml</summary><pre>{e(r.config_text)}</pre></details>")
    return PAGE.format(title=e("ptft report: " + ", ".join(r.label for r in runs)), body="\n".join(out))


def make_report(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> dict[str, Any]:
    """Read the runs, write the PNGs and ``index.html`` into ``out_dir`` (default: ``report/``
    in the run directory when there is one, else ``./report``). Returns the paths.

    Raises:
        ReportError: a missing run directory or metrics.jsonl, or a malformed file, named.
    """
    if not run_dirs:
        raise ReportError("name at least one run directory")
    runs = find_runs(list(run_dirs))
    out = Path(out_dir) if out_dir else (Path(run_dirs[0]) / "report" if len(run_dirs) == 1 else Path("report"))
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(runs, out)
    index = out / "index.html"
    index.write_text(render_html(runs, plots), encoding="utf-8")
    log.info("report of %d run(s): %s (%d plots)", len(runs), index, len(plots))
    return {"html": index, "plots": plots, "runs": [r.label for r in runs]}
