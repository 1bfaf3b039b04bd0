"""`ptft report`: plots and HTML from run directories written by the Tracker."""

import json
import math

import numpy as np
import pytest
from PIL import Image

from ptft_dist import config as C
from ptft_dist.cli import main
from ptft_dist.report import ReportError, make_report, read_run
from ptft_dist.tracking import Tracker, write_summary
from ptft_dist.world import World

TAB10 = {"blue": (0x1F, 0x77, 0xB4), "orange": (0xFF, 0x7F, 0x0E), "green": (0x2C, 0xA0, 0x2C)}


def _pretrain_run(path, lr, steps=40, resumed_at=None, mfu=True):
    """A run directory as the pretraining recipe leaves it: config.yaml, metrics.jsonl, summary.json."""
    cfg = C.load("pretrain", overrides=[f"optim.lr={lr}", f"run_dir={path}"])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(C.dump_yaml(cfg))
    t = Tracker(path, cfg.tracking, World())
    loss = 7.0
    for step in range(5, steps + 1, 5):
        loss *= 0.93 if lr > 1e-3 else 0.97
        row = {
            "train_loss": loss,
            "lr": lr * min(1.0, step / 10),
            "grad_norm": 1.0 / step,
            "tokens_per_s": 4000.0 + 10 * step,
            "step_time_s": 0.5,
            "tokens_seen": step * 2048,
        }
        if mfu:
            row |= {"mfu": 0.31 + step / 1000, "peak_memory_mb": 900.0 + step}
        t.log(row, step)
        if step % 20 == 0:
            t.log(
                {"eval_mlm_loss": loss + 0.1, "eval_mlm_accuracy": 1 - loss / 8, "eval_perplexity": math.exp(loss)},
                step,
            )
    if resumed_at:  # a resumed run logs the steps after its checkpoint again
        for step in range(resumed_at + 5, steps + 1, 5):
            t.log({"train_loss": 0.5, "lr": lr}, step)
    t.close()
    write_summary(
        path,
        {"eval_mlm_loss": loss + 0.1, "eval_mlm_accuracy": 1 - loss / 8, "steps": steps},
        {"hf_model": str(path / "export")},
    )
    return path


def _finetune_run(path):
    cfg = C.load("finetune", overrides=[f"run_dir={path}"])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(C.dump_yaml(cfg))
    t = Tracker(path, cfg.tracking, World())
    for step in range(10, 51, 10):
        t.log(
            {"train_loss": 1.8 / (step / 10), "lr": 2e-3 * (1 - step / 50), "examples_per_s": 120.0 + step, "epoch": 0},
            step,
        )
    t.log({"test_accuracy": 0.8, "test_macro_f1": 0.7, "test_majority_class_accuracy": 0.3}, 50)
    t.close()
    names = ["ABBR", "DESC", "NUM"]
    confusion = [[3, 1, 0], [2, 40, 3], [0, 4, 47]]
    per_class = {
        n: {"precision": 0.8, "recall": 0.7, "f1": f1, "support": sum(confusion[i])}
        for i, (n, f1) in enumerate(zip(names, [0.6, 0.85, 0.9]))
    }
    (path / "eval.json").write_text(
        json.dumps({"accuracy": 0.8, "macro_f1": 0.7, "per_class": per_class, "confusion_matrix": confusion})
    )
    write_summary(
        path,
        {"test_accuracy": 0.8, "test_macro_f1": 0.7, "test_majority_class_accuracy": 0.3},
        {"adapter": str(path / "adapter")},
    )
    return path


def _has_color(png, rgb, min_pixels=30):
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3).astype(int)
    return int((np.abs(pixels - np.array(rgb)).sum(1) < 30).sum()) >= min_pixels


def test_report_overlays_runs_in_labelled_plots_and_an_html_page(tmp_path):
    a = _pretrain_run(tmp_path / "lr1e-3", 1e-3)
    b = _pretrain_run(tmp_path / "lr3e-3", 3e-3)
    made = make_report([a, b], tmp_path / "out")
    names = {p.name for p in made["plots"]}
    assert {
        "loss.png",
        "lr.png",
        "tokens_per_s.png",
        "mfu.png",
        "memory.png",
        "eval_accuracy.png",
        "perplexity.png",
        "grad_norm.png",
        "other_metrics.png",
    } <= names
    assert "examples_per_s.png" not in names and "test_metrics.png" not in names  # nothing logged for them
    for png in made["plots"]:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 300
    # both runs are drawn, each in its own colour
    loss = tmp_path / "out" / "loss.png"
    assert (
        _has_color(loss, TAB10["blue"]) and _has_color(loss, TAB10["orange"]) and not _has_color(loss, TAB10["green"])
    )
    page = made["html"].read_text()
    for name in names:
        assert f"src='{name}'" in page
    assert "lr1e-3" in page and "lr3e-3" in page and "eval_mlm_accuracy" in page and "hf_model" in page
    assert "zero:" in page and "lr: 0.003" in page  # the resolved configs


def test_finetune_report_has_test_metrics_per_class_f1_and_confusion_matrix(tmp_path):
    pipe = tmp_path / "demo"
    _pretrain_run(pipe / "pretrain", 1e-3, mfu=False)
    _finetune_run(pipe / "finetune")
    made = make_report([pipe])  # a pipeline directory stands for its runs
    assert made["html"] == pipe / "report" / "index.html"
    assert made["runs"] == ["demo/pretrain", "demo/finetune"]
    names = {p.name for p in made["plots"]}
    assert {
        "loss.png",
        "examples_per_s.png",
        "test_metrics.png",
        "per_class_f1.png",
        "confusion_demo_finetune.png",
    } <= names
    assert "mfu.png" not in names and "memory.png" not in names
    assert _has_color(pipe / "report" / "confusion_demo_finetune.png", (8, 48, 107), 200)  # the darkest Blues cell


def test_a_step_logged_again_after_resume_keeps_its_last_value(tmp_path):
    run = read_run(_pretrain_run(tmp_path / "r", 1e-3, steps=30, resumed_at=20))
    steps, losses = run.series("train_loss")
    assert steps == [5, 10, 15, 20, 25, 30] and losses[-2:] == [0.5, 0.5]


def test_secrets_in_an_old_config_yaml_are_redacted(tmp_path, monkeypatch):
    run = _pretrain_run(tmp_path / "r", 1e-3)
    (run / "config.yaml").write_text((run / "config.yaml").read_text() + "hub_token: hf_abcdef123\n")
    page = make_report([run])["html"].read_text()
    assert "hf_abcdef123" not in page and "hub_token: &#x27;***&#x27;" in page


def test_bad_run_directories_are_named(tmp_path):
    with pytest.raises(ReportError, match="run directory .*nowhere does not exist"):
        make_report([tmp_path / "nowhere"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"empty/metrics\.jsonl does not exist"):
        make_report([tmp_path / "empty"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": \n')
    with pytest.raises(ReportError, match=r"bad/metrics\.jsonl line 2: not valid JSON"):
        make_report([bad])
    (bad / "metrics.jsonl").write_text('{"train_loss": 2.0}\n')
    with pytest.raises(ReportError, match=r"line 1: .*integer 'step'"):
        make_report([bad])
    (bad / "metrics.jsonl").write_text("\n")
    with pytest.raises(ReportError, match="has no rows"):
        make_report([bad])
    (bad / "metrics.jsonl").write_text('{"step": 1, "train_loss": 2.0}\n')
    (bad / "summary.json").write_text('{"metrics": [1, 2]}')
    with pytest.raises(ReportError, match=r"bad/summary\.json: field 'metrics'"):
        make_report([bad])
    (bad / "summary.json").unlink()
    (bad / "eval.json").write_text('{"per_class": {"a": {}, "b": {}}, "confusion_matrix": [[1, 2]]}')
    with pytest.raises(ReportError, match=r"bad/eval\.json: field 'confusion_matrix' must be a 2 x 2"):
        make_report([bad])


def test_cli_report(tmp_path, capsys):
    run = _pretrain_run(tmp_path / "r", 1e-3)
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'rep' / 'index.html'}" in out and "plot: " in out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "ptft report: error: run directory" in capsys.readouterr().err


def test_steps_are_integer_ticks_and_memory_has_one_unit(tmp_path):
    from matplotlib.figure import Figure

    from ptft_dist.report import _integer_steps, _memory_panel

    ax = Figure().add_subplot()
    ax.plot([1, 2, 3], [1.0, 2.0, 3.0])
    _integer_steps(ax)
    ticks = [t for t in ax.get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    panel = _memory_panel({"peak_memory_mb", "train_loss"})
    assert panel.title == "Peak memory per rank" and panel.ylabel == "MiB (2^20 bytes)" and "MB" not in panel.title


def test_constant_series_are_listed_not_plotted_and_configs_show_what_differs(tmp_path):
    a = _pretrain_run(tmp_path / "a", 1e-3)
    b = _pretrain_run(tmp_path / "b", 3e-3)
    made = make_report([a, b], tmp_path / "out")
    from ptft_dist.report import constant_metrics, find_runs

    runs = find_runs([a, b])
    assert constant_metrics(runs) == {"step_time_s": {"a": 0.5, "b": 0.5}}  # 0.5 at every step in both runs
    page = made["html"].read_text()
    assert "<h2>Constant metrics</h2>" in page and "<td>step_time_s</td>" in page
    # the grid of other metrics has tokens_seen only: drawn with one panel
    assert "other_metrics.png" in {p.name for p in made["plots"]}
    assert "What differs between the pretrain runs" in page
    differs = page.split("What differs", 1)[1].split("</table>", 1)[0]
    assert "<code>optim.lr</code>" in differs and "run_dir" not in differs and "optim.max_steps" not in differs


def test_skipped_steps_are_marked_never_drawn_as_zero(tmp_path):
    run_dir = _pretrain_run(tmp_path / "r", 1e-3)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        if row["step"] in (10, 15) and "train_loss" in row:
            row.update(train_loss=None, skipped=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = read_run(run_dir)
    steps, values = run.series("train_loss")
    assert 10 not in steps and 15 not in steps and min(values) > 1.0
    assert run.skipped_steps() == [10, 15]
    made = make_report([run_dir], tmp_path / "out")
    assert "2 skipped step(s) (loss not finite, update dropped): 10, 15" in made["html"].read_text()
    # every step skipped: the loss plot shows the marks only, no line at 0
    for row in rows:
        if "train_loss" in row:
            row.update(train_loss=None, skipped=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_run(run_dir).series("train_loss") == ([], [])
    made = make_report([run_dir], tmp_path / "out2")
    assert (tmp_path / "out2" / "loss.png").is_file()
