"""The bad-input cases not covered next to their module (config, data, task files have their
own): each ends in a clear error naming the file, field or value, or a documented handling;
never a hang. docs/reliability.md lists every case and the test that proves it."""

import gzip
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import TINY_MODEL

from ptft_dist import config as C
from ptft_dist import jobs
from ptft_dist.config import DataBuildConfig, TokenizerConfig
from ptft_dist.data.build import DataError, build, read_manifest

TINY = [
    *TINY_MODEL,
    "eval_every_steps=1000",
    "data.num_eval_samples=16",
]


def _ptft(*args):
    return subprocess.run([sys.executable, "-m", "ptft_dist.cli", *args], capture_output=True, text=True, timeout=300)


def test_non_utf8_bytes_and_empty_documents_are_handled(tmp_path):
    src = tmp_path / "mixed.txt"
    good = [f"the river {i} flows past the old mill and the village green number {i} . " * 3 for i in range(52)]
    src.write_bytes(
        (good[0] + "\n\n   \n" + good[1]).encode()
        + b"\xff\xfe broken bytes \xc3\x28 here\n"
        + "".join(g + "\n" for g in good[2:]).encode()
    )
    m = build(
        DataBuildConfig(
            inputs=[str(src)],
            seq_len=16,
            samples_per_shard=50,
            validation_fraction=0.1,
            tokenizer=TokenizerConfig(vocab_size=120),
        ),
        tmp_path / "out",
        progress=False,
    )
    docs = m["splits"]["train"]["num_documents"] + m["splits"]["valid"]["num_documents"]
    assert docs == 52, "blank lines are not documents; undecodable bytes became U+FFFD, not an error"


def test_a_single_enormous_line_is_packed_in_bounded_pieces(tmp_path):
    src = tmp_path / "one_line.txt.gz"
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "music"]
    with gzip.open(src, "wt") as fh:
        fh.write(" ".join(words[i % 7] for i in range(400_000)))  # ~2.4 MB, no newline
        fh.write("\n" + "".join(f"document {i} is short but real text about {words[i % 7]} .\n" for i in range(200)))
    m = build(
        DataBuildConfig(
            inputs=[str(src)],
            seq_len=64,
            samples_per_shard=500,
            validation_fraction=0.2,
            tokenizer=TokenizerConfig(vocab_size=100),
        ),
        tmp_path / "out",
        progress=False,
    )
    assert m["splits"]["train"]["num_samples"] + m["splits"]["valid"]["num_samples"] > 6000


def test_invalid_and_empty_manifest_and_empty_shard(tiny_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json.*not valid JSON"):
        read_manifest(copy)
    (copy / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DataError, match="manifest.json"):
        read_manifest(copy)
    shutil.copy(tiny_dataset / "manifest.json", copy / "manifest.json")
    first = read_manifest(copy)["splits"]["train"]["shards"][0]["file"]
    (copy / first).write_bytes(b"")  # an empty shard file
    from ptft_dist.data.stream import ShardStream

    with pytest.raises(DataError, match=first):
        stream = ShardStream(copy, "train", rank=0, world_size=1, seed=0, shuffle_buffer=0)
        for _ in stream:
            pass


def test_tokenizer_of_the_data_must_be_the_models(tiny_dataset, tmp_path):
    other = tmp_path / "other"
    build(
        DataBuildConfig(
            max_documents=300,
            seq_len=32,
            samples_per_shard=100,
            validation_fraction=0.1,
            tokenizer=TokenizerConfig(vocab_size=300),
        ),
        other,
        progress=False,
    )
    model_dir = tmp_path / "model"
    shutil.copytree(other / "tokenizer", model_dir)  # a model directory with another tokenizer
    cfg = C.load(
        "pretrain",
        "pretrain_tiny",
        [f"data.dataset_dir={tiny_dataset}", f"model.init_from={model_dir}", f"run_dir={tmp_path / 'r'}"],
    )
    with pytest.raises(DataError, match="tokenizer of model.init_from"):
        jobs.pretrain(cfg)  # refused in the driver: no Ray started
    assert not (tmp_path / "r" / "ray").exists()


def test_output_dir_not_writable_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    proc = _ptft("data", "build", "--run-dir", str(blocker / "run"), "data.max_documents=50")
    assert proc.returncode == 2
    assert str(blocker) in proc.stderr and "Traceback" not in proc.stderr


@pytest.fixture
def small_disk(small_fs):
    """A 512 KiB file system, so that a write runs out of space for real."""
    return small_fs("512k")


def test_disk_full_while_writing_shards_is_an_error_naming_the_file(small_disk, tmp_path):
    proc = _ptft(
        "data",
        "build",
        "--run-dir",
        str(tmp_path / "run"),
        f"data.output_dir={small_disk / 'ds'}",
        "data.max_documents=4000",
        "data.samples_per_shard=100000",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "No space left on device" in proc.stderr and str(small_disk / "ds") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (small_disk / "ds" / "manifest.json").exists(), "an incomplete dataset never gets a manifest"


@pytest.mark.dist
def test_more_workers_than_the_cluster_has_fails_fast(tiny_dataset, tmp_path, ray_session):
    cfg = C.load(
        "pretrain",
        "pretrain_tiny",
        [
            f"data.dataset_dir={tiny_dataset}",
            "scaling.num_workers=8",
            "optim.global_batch_size=64",
            f"run_dir={tmp_path / 'r'}",
        ],
    )
    with pytest.raises(
        C.ConfigError,
        match=r"scaling: 8 workers x 1 CPUs = 8 CPUs, but the Ray cluster has 2; lower scaling.num_workers",
    ):
        jobs.pretrain(cfg)


@pytest.mark.dist
def test_nonfinite_loss_stops_with_the_step_named(tiny_dataset, tmp_path, ray_session):
    # AdamW moves every weight by ~lr per step whatever the gradient: lr 1e30 overflows at once
    cfg = C.load(
        "pretrain",
        "pretrain_tiny",
        [
            f"data.dataset_dir={tiny_dataset}",
            "optim.lr=1e30",
            "optim.warmup_steps=0",
            "optim.max_steps=20",
            f"run_dir={tmp_path / 'r'}",
            *TINY,
        ],
    )
    with pytest.raises(RuntimeError, match=r"step \d+: the training loss is not finite"):
        jobs.pretrain(cfg)


@pytest.mark.dist
def test_nonfinite_loss_skip_drops_the_steps_update_and_goes_on(tiny_dataset, tmp_path, ray_session):
    from safetensors.torch import load_file

    # constant lr: steps 1-2 are the same in both runs, and the bad step 3 must move nothing
    common = [
        f"data.dataset_dir={tiny_dataset}",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
        "tracking.log_every_steps=1",
        *TINY,
    ]
    jobs.pretrain(C.load("pretrain", "pretrain_tiny", [*common, "optim.max_steps=2", f"run_dir={tmp_path / 'two'}"]))
    summary = jobs.pretrain(
        C.load(
            "pretrain",
            "pretrain_tiny",
            [
                *common,
                "optim.max_steps=3",
                "on_nonfinite_loss=skip",
                "inject_nonfinite_at_steps=[3]",
                f"run_dir={tmp_path / 'skip'}",
            ],
        )
    )
    assert summary["metrics"]["completed"] is True and summary["metrics"]["nonfinite_skipped_steps"] == 1
    two, skipped = (
        load_file(str(tmp_path / "two" / "export" / "model.safetensors")),
        load_file(str(tmp_path / "skip" / "export" / "model.safetensors")),
    )
    for k in two:
        assert torch.equal(two[k], skipped[k]), f"{k} moved in the skipped step"
    rows = [
        json.loads(line)
        for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()
        if '"train_loss"' in line
    ]
    assert [r["nonfinite_skipped_steps"] for r in rows] == [0, 0, 1] and all(
        math.isfinite(r["train_loss"]) for r in rows[:2]
    )

    # a run that only ever sees bad steps gives up, naming the step
    with pytest.raises(RuntimeError, match=r"step 10: the training loss was not finite for 10 steps in a row"):
        jobs.pretrain(
            C.load(
                "pretrain",
                "pretrain_tiny",
                [
                    *common,
                    "optim.max_steps=12",
                    "on_nonfinite_loss=skip",
                    f"inject_nonfinite_at_steps=[{','.join(map(str, range(1, 13)))}]",
                    f"run_dir={tmp_path / 'all'}",
                ],
            )
        )


@pytest.mark.dist
def test_resume_with_an_incompatible_config_is_refused(tiny_dataset, tmp_path, ray_session):
    common = [f"data.dataset_dir={tiny_dataset}", "optim.max_steps=6", f"run_dir={tmp_path / 'r'}", *TINY]
    jobs.pretrain(C.load("pretrain", "pretrain_tiny", [*common, "stop_at_step=2"]))
    wider = C.load("pretrain", "pretrain_tiny", [*common, "model.hidden_size=96", "model.num_heads=2"])
    with pytest.raises(RuntimeError, match=r"model.hidden_size=64.*this run has model.hidden_size=96"):
        jobs.pretrain(wider)
