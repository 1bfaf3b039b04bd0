"""Reading raw text for `ptft data build`: file formats, compression, sources and their mix.

Formats (by file name): ``.txt``/``.raw`` (one document per non-empty line), ``.jsonl`` (one
JSON object per line, text in a named field), ``.csv``/``.tsv`` (header row, text in a named
column), ``.parquet`` (text in a named column); each but Parquet optionally ``.gz`` or
``.zst``. Everything streams: memory holds one batch of documents per source.

A *source* is one entry of ``data.inputs`` (a file or a glob) with one mixing weight. A weight
``w`` means every training document of the source is written ``w`` times per pass over the
data: ``floor(w)`` copies of each, plus one more copy of a share ``w - floor(w)`` of them picked
by a stable hash of the text (``0.5`` keeps half of the documents; ``2`` doubles the source).
Copies come from re-reading the source, so they land far apart in the shards. Held-out
(validation) documents are written once whatever the weight, so evaluation does not depend
on the mix.

Sources are interleaved in chunks of a few dozen documents, always taking the next chunk from
the source that has read the smallest share of its planned bytes: every shard holds the mix,
not one source after another.
"""

from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import heapq
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataError

TEXT_SUFFIXES = {".txt": "text", ".raw": "text", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = (".gz", ".zst")
#: a batch closes at this many documents or this many characters, whichever comes first
BATCH_DOCUMENTS = 1000
BATCH_CHARS = 1 << 20
#: sources are interleaved in chunks this small, so that a shard mixes them finely
CHUNK_DOCUMENTS = 64
CHUNK_CHARS = 1 << 16


def file_format(path: Path) -> tuple[str, str | None]:
    """(format, compression) of an input file from its name; DataError when unsupported."""
    name = path.name.lower()
    compression = None
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            compression, name = suffix[1:], name[: -len(suffix)]
    for suffix, kind in TEXT_SUFFIXES.items():
        if name.endswith(suffix):
            if kind == "parquet" and compression:
                raise DataError(
                    f"input file {path}: Parquet is compressed inside the file; do not wrap it in .{compression}"
                )
            return kind, compression
    raise DataError(
        f"input file {path}: unsupported type; use .txt, .raw, .jsonl, .csv, .tsv or .parquet (text formats "
        "optionally .gz or .zst)"
    )


def is_validation(text: str, fraction: float) -> bool:
    """Stable across runs, machines and input order: a hash of the document decides."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1_000_000 < fraction * 1_000_000


def _keeps_extra_copy(text: str, share: float, salt: int) -> bool:
    """Whether a document gets the fractional copy of its source's weight (stable hash)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=salt.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") / 2**64 < share


@dataclass
class Source:
    """One entry of ``data.inputs``: the files its pattern matched and its mixing weight."""

    pattern: str
    files: list[Path]
    weight: float = 1.0
    num_bytes: int = 0
    num_documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "valid": 0})

    @property
    def num_passes(self) -> int:
        return max(1, math.ceil(self.weight))

    def manifest_entry(self) -> dict:
        return {
            "input": self.pattern,
            "files": [str(f) for f in self.files],
            "weight": self.weight,
            "num_bytes": self.num_bytes,
            "num_documents": dict(self.num_documents),
        }


def resolve_sources(patterns: list[str], weights: list[float] | None = None) -> list[Source]:
    """Expand globs; every pattern must match at least one supported file."""
    weights = list(weights or [])
    if weights and len(weights) != len(patterns):
        raise DataError(
            f"data.input_weights has {len(weights)} entries for {len(patterns)} data.inputs; give one weight per "
            "input or none"
        )
    sources = []
    for i, pattern in enumerate(patterns):
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"input pattern {pattern!r} matches no file")
        found = []
        for m in matches:
            p = Path(m)
            if not p.is_file():
                raise DataError(f"input file {p} does not exist")
            file_format(p)
            found.append(p)
        weight = float(weights[i]) if weights else 1.0
        if not weight > 0 or math.isinf(weight):
            raise DataError(f"data.input_weights[{i}] = {weight!r} for {pattern!r}: a weight must be a positive number")
        sources.append(Source(pattern, found, weight, sum(p.stat().st_size for p in found)))
    return sources


class _Progress:
    """Bytes of one file read so far, from the position of the raw (compressed) file."""

    def __init__(self, raw):
        self.raw = raw
        self.done = 0

    @property
    def bytes_read(self) -> int:
        if self.done:
            return self.done
        try:
            return self.raw.tell()
        except (OSError, ValueError):
            return 0


def _open_text(path: Path, compression: str | None, progress_out: list, newline: str | None) -> io.TextIOWrapper:
    raw = open(path, "rb")
    progress_out.append(_Progress(raw))
    if compression == "gz":
        stream = gzip.GzipFile(fileobj=raw, mode="rb")
    elif compression == "zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise DataError(f"input file {path}: reading .zst needs the `zstandard` package") from None
        stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    else:
        stream = raw
    # Undecodable bytes become U+FFFD rather than aborting a long build.
    return io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline=newline)


def iter_file_documents(path: Path, text_field: str, min_chars: int, progress_out: list | None = None) -> Iterator[str]:
    """Documents of one input file, in order, stripped; shorter than min_chars are skipped."""
    kind, compression = file_format(path)
    progress_out = progress_out if progress_out is not None else []
    if kind == "parquet":
        yield from _parquet_documents(path, text_field, min_chars, progress_out)
        return
    try:
        with _open_text(path, compression, progress_out, "" if kind in ("csv", "tsv") else None) as fh:
            if kind == "text":
                for line in fh:
                    text = line.strip()
                    if len(text) >= min_chars:
                        yield text
            elif kind == "jsonl":
                yield from _jsonl_documents(fh, path, text_field, min_chars)
            else:
                yield from _csv_documents(fh, path, text_field, min_chars, "\t" if kind == "tsv" else ",")
    except (EOFError, OSError) as e:  # a truncated .gz / .zst, or a read error
        if isinstance(e, DataError):
            raise
        raise DataError(f"input file {path}: cannot be read to the end ({type(e).__name__}: {e})") from None
    except Exception as e:
        if type(e).__module__.startswith("zstd") or type(e).__name__ == "ZstdError":
            raise DataError(f"input file {path}: not valid zstd data ({e})") from None
        raise
    progress_out[-1].done = path.stat().st_size


def _jsonl_documents(fh, path: Path, text_field: str, min_chars: int) -> Iterator[str]:
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or text_field not in record:
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (set data.text_field)")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not text")
        text = text.strip()
        if len(text) >= min_chars:
            yield text


def _csv_documents(fh, path: Path, column: str, min_chars: int, delimiter: str) -> Iterator[str]:
    csv.field_size_limit(sys.maxsize)
    reader = csv.reader(fh, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{path}:1: not valid {'TSV' if delimiter == chr(9) else 'CSV'} ({e})") from None
    names = [h.strip() for h in header]
    if column not in names:
        raise DataError(
            f"{path}: no column {column!r} in the header (columns: {', '.join(names)}); set data.text_field"
        )
    index = names.index(column)
    try:
        for row in reader:
            if not row:
                continue
            if index >= len(row):
                raise DataError(
                    f"{path}:{reader.line_num}: the row has {len(row)} fields, column {column!r} is field {index + 1}"
                )
            text = row[index].strip()
            if len(text) >= min_chars:
                yield text
    except csv.Error as e:
        raise DataError(
            f"{path}:{reader.line_num}: not valid {'TSV' if delimiter == chr(9) else 'CSV'} ({e})"
        ) from None


def _parquet_documents(path: Path, column: str, min_chars: int, progress_out: list) -> Iterator[str]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"input file {path}: reading Parquet needs the `pyarrow` package") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"input file {path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: no column {column!r} (columns: {', '.join(names)}); set data.text_field")
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {column!r} is {kind}, not text")
    size, total_rows, rows = path.stat().st_size, max(1, pf.metadata.num_rows), 0

    class _RowProgress:
        done = 0

        @property
        def bytes_read(self) -> int:
            return self.done or size * rows // total_rows

    progress_out.append(_RowProgress())
    for batch in pf.iter_batches(batch_size=BATCH_DOCUMENTS, columns=[column]):
        for text in batch.column(0).to_pylist():
            rows += 1
            if text is None:
                continue
            text = text.strip()
            if len(text) >= min_chars:
                yield text
    progress_out[-1].done = size


@dataclass
class Batch:
    """Documents to encode, each with its split ('train' or 'valid') and source index."""

    texts: list[str]
    splits: list[str]
    sources: list[int]


class _SourceReader:
    """One source's batches over all its passes, and how far it is (share of planned bytes)."""

    def __init__(
        self,
        index: int,
        source: Source,
        text_field: str,
        min_chars: int,
        validation_fraction: float,
        train_only_first_pass: bool,
    ):
        self.index, self.source = index, source
        self.text_field, self.min_chars, self.fraction = text_field, min_chars, validation_fraction
        self.first_pass_only = train_only_first_pass
        self._pass = 0
        self._progress: list = []
        self._done_bytes = 0
        self._gen = self._batches()

    @property
    def progress(self) -> float:
        current = sum(p.bytes_read for p in self._progress)
        planned = max(1, self.source.num_bytes) * (1 if self.first_pass_only else self.source.num_passes)
        return (self._done_bytes + current) / planned

    def next_chunk(self) -> tuple[list[str], list[str]] | None:
        return next(self._gen, None)

    def _batches(self) -> Iterator[tuple[list[str], list[str]]]:
        w = self.source.weight
        passes = 1 if self.first_pass_only else self.source.num_passes
        for p in range(passes):
            self._pass = p
            full = p < math.floor(w)  # every training document gets this copy
            share = w - math.floor(w)  # else: this share of them, by hash
            texts, splits, chars = [], [], 0
            for path in self.source.files:
                self._progress = []
                for text in iter_file_documents(path, self.text_field, self.min_chars, self._progress):
                    valid = is_validation(text, self.fraction)
                    if valid:
                        if p:  # held-out documents are written once
                            continue
                    elif not self.first_pass_only and not full and not _keeps_extra_copy(text, share, self.index):
                        continue
                    texts.append(text)
                    splits.append("valid" if valid else "train")
                    chars += len(text)
                    if len(texts) >= CHUNK_DOCUMENTS or chars >= CHUNK_CHARS:
                        yield texts, splits
                        texts, splits, chars = [], [], 0
                self._done_bytes += path.stat().st_size
                self._progress = []
            if texts:
                yield texts, splits


def mixed_batches(
    sources: list[Source], *, text_field: str, min_chars: int, validation_fraction: float, first_pass_only: bool = False
) -> Iterator[Batch]:
    """Batches of all sources, interleaved chunk by chunk so that each source advances at
    the same pace through its planned bytes (deterministic: it depends only on the files)."""
    readers = [
        _SourceReader(i, s, text_field, min_chars, validation_fraction, first_pass_only) for i, s in enumerate(sources)
    ]
    heap = [(0.0, r.index) for r in readers]
    heapq.heapify(heap)
    batch = Batch([], [], [])
    chars = 0
    while heap:
        _, i = heapq.heappop(heap)
        chunk = readers[i].next_chunk()
        if chunk is None:
            continue
        heapq.heappush(heap, (readers[i].progress, i))
        batch.texts += chunk[0]
        batch.splits += chunk[1]
        batch.sources += [i] * len(chunk[0])
        chars += sum(map(len, chunk[0]))
        if len(batch.texts) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = Batch([], [], []), 0
    if batch.texts:
        yield batch
