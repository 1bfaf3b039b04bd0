"""Reading raw text for `ptft data build`: file formats, compression, sources, their mix, and
the checks that keep garbage out.

Formats (by file name): ``.txt``/``.raw`` (one document per non-empty line), ``.jsonl`` (one
JSON object per line, text in a named field), ``.csv``/``.tsv`` (header row, text in a named
column), ``.parquet`` (text in a named column); each but Parquet optionally ``.gz`` or
``.zst``. ``.tar`` shards made by WebDataset (or any tar of samples), local or URL, with
brace notation (``corpus-{000000..000099}.tar``): each sample's ``.txt`` member is one
document, a ``.json`` member one object, a ``.jsonl`` member one object per line. A
``mongodb://host/db.collection`` location reads a collection (see :mod:`.mongo`).
Everything streams: memory holds one batch of documents per source.

:func:`iter_records` is the one reader of record files (csv, tsv, jsonl, parquet, text) for
both the data build and the labeled finetuning tasks (:mod:`.labeled`).

A *source* is one entry of ``data.inputs`` (a file, a glob, tar shards or a collection) with
one mixing weight. A weight ``w`` means every training document of the source is written
``w`` times per pass over the data: ``floor(w)`` copies of each, plus one more copy of a share
``w - floor(w)`` of them picked by a stable hash of the text (``0.5`` keeps half of the
documents; ``2`` doubles the source). Copies come from re-reading the source, so they land far
apart in the shards. Held-out (validation) documents are written once whatever the weight, so
evaluation does not depend on the mix.

Sources are interleaved in chunks of a few dozen documents, always taking the next chunk from
the source that has read the smallest share of its planned bytes (documents, for a
collection): every shard holds the mix, not one source after another.

**Garbage.** Before anything is tokenized, the first 64 KiB of every text file are checked: a
NUL byte, or more than :data:`GARBAGE_SHARE` of control or undecodable characters, refuses the
file by name (``data.on_error: skip``: the file is left out and counted). Every document read
gets the same check; undecodable bytes become U+FFFD and are counted per source.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import heapq
import io
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import files
from . import mongo as mongo_source
from .errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = {
    ".txt": "text",
    ".raw": "text",
    ".jsonl": "jsonl",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".tar": "tar",
}
COMPRESSION_SUFFIXES = (".gz", ".zst")
#: a batch closes at this many documents or this many characters, whichever comes first
BATCH_DOCUMENTS = 1000
BATCH_CHARS = 1 << 20
#: sources are interleaved in chunks this small, so that a shard mixes them finely
CHUNK_DOCUMENTS = 64
CHUNK_CHARS = 1 << 16
#: a text (a file's first SNIFF_BYTES, or one document) with a larger share of control or
#: undecodable characters is garbage, as is one with a NUL
GARBAGE_SHARE = 0.10
SNIFF_BYTES = 64 << 10
#: the members of a tar sample that hold text, by extension
TAR_TEXT_MEMBERS = ("txt", "json", "jsonl")
#: warnings naming skipped records, per source (the rest are counted)
MAX_NAMED_SKIPS = 5

# Control characters but tab, newline, vertical tab, form feed and carriage return; C1 controls; U+FFFD.
_BAD_CHARS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd]")
#: undecodable bytes replaced so far in this process (the "ptft-replace" codec error handler)
_REPLACED = [0]


def _count_replaced(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    _REPLACED[0] += error.end - error.start
    return "\ufffd", error.end  # what errors="replace" gives: the text is the same


codecs.register_error("ptft-replace", _count_replaced)


def garbage(text: str) -> str | None:
    """Why ``text`` is not text (NUL, or too many control / undecodable characters), or None."""
    if "\x00" in text:
        return "it holds NUL bytes (binary data, or UTF-16)"
    if not _BAD_CHARS.search(text):
        return None
    bad = len(_BAD_CHARS.findall(text))
    if bad > GARBAGE_SHARE * len(text):
        return f"{bad / len(text):.0%} of its characters are control or undecodable bytes (binary data?)"
    return None


def file_format(path: Path | str) -> tuple[str, str | None]:
    """(format, compression) of an input file from its name; DataError when unsupported."""
    name = str(path).rsplit("/", 1)[-1].lower()
    compression = None
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            compression, name = suffix[1:], name[: -len(suffix)]
    for suffix, kind in TEXT_SUFFIXES.items():
        if name.endswith(suffix):
            if kind in ("parquet", "tar") and compression:
                raise DataError(
                    f"input file {path}: {'Parquet' if kind == 'parquet' else 'a tar shard'} is read as is; do not "
                    f"wrap it in .{compression}"
                    + (" (Parquet is compressed inside the file)" if kind == "parquet" else "")
                )
            return kind, compression
    raise DataError(
        f"input file {path}: unsupported type; use .txt, .raw, .jsonl, .csv, .tsv, .parquet (text formats "
        "optionally .gz or .zst), .tar shards or a mongodb:// collection"
    )


def is_validation(text: str, fraction: float) -> bool:
    """Stable across runs, machines and input order: a hash of the document decides."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1_000_000 < fraction * 1_000_000


def _keeps_extra_copy(text: str, share: float, salt: int) -> bool:
    """Whether a document gets the fractional copy of its source's weight (stable hash)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=salt.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") / 2**64 < share


# --------------------------------------------------------------------------- sources


@dataclass
class SourceStats:
    """What reading one source saw (first pass only): replaced bytes, records left out and why,
    files refused as garbage."""

    #: records read (documents, lines, rows, tar members), whatever became of them
    records_read: int = 0
    replaced_bytes: int = 0
    skipped_records: dict[str, int] = field(default_factory=dict)
    skipped_files: list[dict] = field(default_factory=list)
    #: counts only, no warnings (the tokenizer's pass: the full pass names them)
    quiet: bool = False

    def skip(self, reason: str, where: str, message: str) -> None:
        n = self.skipped_records.get(reason, 0) + 1
        self.skipped_records[reason] = n
        if n <= MAX_NAMED_SKIPS and not self.quiet:
            log.warning(
                "skipped %s%s", message, " (further ones are counted, not named)" if n == MAX_NAMED_SKIPS else ""
            )


@dataclass
class Source:
    """One entry of ``data.inputs``: the files its pattern matched (or its collection), its
    mixing weight, and what reading it saw."""

    pattern: str
    files: list
    weight: float = 1.0
    num_bytes: int = 0
    num_documents: dict[str, int] = field(default_factory=lambda: {"train": 0, "valid": 0})
    collection: mongo_source.Collection | None = None
    collection_info: dict | None = None
    stats: SourceStats = field(default_factory=SourceStats)

    @property
    def num_passes(self) -> int:
        return max(1, math.ceil(self.weight))

    @property
    def name(self) -> str:
        """The pattern as it may be shown (a MongoDB password replaced by ``***``)."""
        return mongo_source.public_uri(self.pattern) if self.collection else self.pattern

    @property
    def planned(self) -> int:
        """Units of progress of one pass: bytes of the files, or documents of a collection."""
        if self.collection is not None:
            return max(1, (self.collection_info or {}).get("count") or 1)
        return max(1, self.num_bytes)

    def manifest_entry(self) -> dict:
        entry = {
            "input": self.name,
            "files": [str(f) for f in self.files],
            "weight": self.weight,
            "num_bytes": self.num_bytes,
            "num_documents": dict(self.num_documents),
            "records_read": self.stats.records_read,
            "replaced_bytes": self.stats.replaced_bytes,
            "skipped_records": dict(self.stats.skipped_records),
            "skipped_files": list(self.stats.skipped_files),
        }
        if self.collection is not None:
            entry["mongodb"] = self.collection.manifest_entry() | (self.collection_info or {})
        return entry

    def summary(self) -> str:
        """One line for the build summary: documents, replaced bytes, what was left out."""
        docs = self.num_documents["train"] + self.num_documents["valid"]
        parts = [f"{docs:,} documents"]
        if self.stats.replaced_bytes:
            parts.append(f"{self.stats.replaced_bytes:,} undecodable bytes replaced")
        for reason, n in sorted(self.stats.skipped_records.items()):
            parts.append(f"{n:,} {reason} records skipped")
        if self.stats.skipped_files:
            parts.append(f"{len(self.stats.skipped_files)} files refused as garbage")
        return f"{self.name}: " + ", ".join(parts)


_BRACES = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")


def _expand(pattern: str) -> list[str]:
    """Brace notation (``shard-{000..009}.tar``, ``{a,b}.txt``), then globs (local)."""
    if _BRACES.search(pattern):
        from braceexpand import braceexpand

        names = list(braceexpand(pattern))
    else:
        names = [pattern]
    out = []
    for name in names:
        if not files.is_remote(name) and glob.has_magic(name):
            out += sorted(glob.glob(os.path.expanduser(name)))
        else:
            out.append(name)
    return out


def resolve_sources(
    patterns: list[str], weights: list[float] | None = None, *, on_error: str = "raise", mongo=None, text_field="text"
) -> list[Source]:
    """Expand globs and braces, check every file exists and looks like text, connect to every
    collection: all before anything is tokenized. ``mongo`` holds the ``data.mongo`` settings."""
    weights = list(weights or [])
    if weights and len(weights) != len(patterns):
        raise DataError(
            f"data.input_weights has {len(weights)} entries for {len(patterns)} data.inputs; give one weight per "
            "input or none"
        )
    sources = []
    for i, pattern in enumerate(patterns):
        weight = float(weights[i]) if weights else 1.0
        shown = mongo_source.public_uri(pattern) if mongo_source.is_mongo(pattern) else pattern
        if not weight > 0 or math.isinf(weight):
            raise DataError(f"data.input_weights[{i}] = {weight!r} for {shown!r}: a weight must be a positive number")
        if mongo_source.is_mongo(pattern):
            sources.append(_mongo_source(pattern, weight, mongo, text_field))
            continue
        matches = _expand(pattern)
        if not matches:
            raise DataError(f"input pattern {pattern!r} matches no file")
        stats = SourceStats()
        found, size = [], 0
        for m in matches:
            kind, compression = file_format(m)
            if files.is_remote(m):
                if kind != "tar":
                    raise DataError(f"input {m}: only .tar shards are read from URLs; copy the file to local disk")
                if not files.exists(m):
                    raise DataError(f"input file {m} does not exist")
                found.append(m)
                continue
            p = Path(m)
            if not p.is_file():
                raise DataError(f"input file {p} does not exist")
            reason = _sniff(p, kind, compression)
            if reason:
                message = f"input file {p}: {reason}, not text"
                if on_error != "skip":
                    raise DataError(f"{message}; remove it from data.inputs or set data.on_error=skip")
                log.warning("%s: left out (data.on_error=skip)", message)
                stats.skipped_files.append({"file": str(p), "reason": reason})
                continue
            found.append(p)
            size += p.stat().st_size
        sources.append(Source(pattern, found, weight, size, stats=stats))
    return sources


def _mongo_source(location: str, weight: float, settings, text_field: str) -> Source:
    spec = mongo_source.from_settings(location, settings)
    info = mongo_source.describe(spec)
    if spec.projection is not None and text_field.split(".")[0] not in spec.projection:
        log.warning("%s: data.mongo.projection does not name data.text_field %r", spec.where, text_field)
    return Source(location, [], weight, 0, collection=spec, collection_info=info)


def _sniff(path: Path, kind: str, compression: str | None) -> str | None:
    """Why the start of a text file is not text, or None (Parquet is typed: not sniffed)."""
    if kind in ("parquet", "tar"):
        return None
    try:
        with _open_stream(path, compression, []) as fh:
            head = fh.read(SNIFF_BYTES)
    except (EOFError, OSError):
        return None  # unreadable: the read itself names it
    except Exception as e:
        if type(e).__module__.startswith("zstd") or type(e).__name__ == "ZstdError":
            return None
        raise
    if b"\x00" in head:
        return "it holds NUL bytes (binary data, or UTF-16)"
    text = head.decode("utf-8", "replace")
    bad = len(_BAD_CHARS.findall(text))
    if bad > GARBAGE_SHARE * len(text):
        return f"{bad / len(text):.0%} of the characters of its first {len(head):,} bytes are control or undecodable"
    return None


# --------------------------------------------------------------------------- record files


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


def _open_stream(path: Path, compression: str | None, progress_out: list):
    raw = open(path, "rb")
    progress_out.append(_Progress(raw))
    if compression == "gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if compression == "zst":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise DataError(f"input file {path}: reading .zst needs the `zstandard` package") from None
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw


def _open_text(path: Path, compression: str | None, progress_out: list, newline: str | None) -> io.TextIOWrapper:
    # Undecodable bytes become U+FFFD (and are counted) rather than aborting a long build.
    stream = _open_stream(path, compression, progress_out)
    return io.TextIOWrapper(stream, encoding="utf-8", errors="ptft-replace", newline=newline)


@dataclass
class Bad:
    """A record that cannot be used: where it is and why (raised, or skipped and counted)."""

    where: str
    message: str
    reason: str = "malformed"


class Row(dict):
    """A CSV/TSV row as {column: value}, knowing how many fields the line had."""

    num_fields: int = 0


def iter_records(
    path: str | Path,
    *,
    text_field: str = "text",
    require: tuple[str, ...] = (),
    tsv_quoting: str = "minimal",
    progress_out: list | None = None,
    byte_range: tuple[int, int] | None = None,
) -> Iterator[tuple[str, dict | Bad]]:
    """``(where, record)`` for every record of a csv/tsv/jsonl/parquet/text file, in order:
    ``where`` is ``file:line`` (``file: row n`` for Parquet), a record a dict (a text line is
    ``{text_field: line}``) or :class:`Bad` for a line that cannot be parsed. ``require`` names
    columns that must exist (checked on the header or schema; Parquet: as text).
    ``tsv_quoting="none"`` reads TSV fields as is (GLUE-style files with stray quotes).
    ``byte_range`` (uncompressed text and JSONL only): the lines that start in ``[lo, hi)``
    (see :class:`FileRange`); ``where`` then counts lines from the first of them."""
    path = Path(files.location(path))
    kind, compression = file_format(path)
    progress_out = progress_out if progress_out is not None else []
    if kind == "tar":
        raise DataError(f"{path}: a tar shard is not a record file")
    if kind == "parquet":
        yield from _parquet_records(path, require, progress_out)
        return
    shown: str | Path = path
    if byte_range is not None:
        if kind not in RANGED_KINDS or compression:
            raise DataError(f"{path}: only uncompressed .txt/.raw/.jsonl files are read in byte ranges")
        start, end = byte_range
        shown = f"{path} (from byte {start:,}) line"
    try:
        if byte_range is not None:
            opened = _open_range(path, byte_range[0], byte_range[1], progress_out)
        else:
            opened = _open_text(path, compression, progress_out, "" if kind in ("csv", "tsv") else None)
        with opened as fh:
            if kind == "text":
                for lineno, line in enumerate(fh, 1):
                    yield f"{shown}:{lineno}", {text_field: line}
            elif kind == "jsonl":
                yield from _jsonl_records(fh, shown)
            else:
                yield from _csv_records(fh, path, require, kind, tsv_quoting)
    except (EOFError, OSError) as e:  # a truncated .gz / .zst, or a read error
        raise DataError(f"input file {path}: cannot be read to the end ({type(e).__name__}: {e})") from None
    except DataError:
        raise
    except Exception as e:
        if type(e).__module__.startswith("zstd") or type(e).__name__ == "ZstdError":
            raise DataError(f"input file {path}: not valid zstd data ({e})") from None
        raise
    progress_out[-1].done = path.stat().st_size if byte_range is None else byte_range[1] - byte_range[0]


#: formats a file of which is cut into byte ranges (one record per line, no header)
RANGED_KINDS = ("text", "jsonl")


@dataclass(frozen=True)
class FileRange:
    """The lines of an uncompressed text or JSONL file that start in bytes ``[lo, hi)``: a line
    belongs to the range its first byte is in, so ranges cut at any offsets partition the file
    into whole lines (a read seeks to ``lo``, skips to the next line, and stops after the line
    that runs over ``hi``)."""

    path: str
    lo: int
    hi: int

    def __str__(self) -> str:
        return f"{self.path} bytes {self.lo:,}..{self.hi:,}"


def _line_start(fh, offset: int, size: int) -> int:
    """The offset of the first line that starts at or after ``offset`` (the file size if none)."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    fh.seek(offset - 1)
    pos = offset - 1
    while True:
        chunk = fh.read(1 << 16)
        if not chunk:
            return size
        i = chunk.find(b"\n")
        if i >= 0:
            return pos + i + 1
        pos += len(chunk)


class _Window(io.RawIOBase):
    """Bytes ``[start, end)`` of an open binary file, as a raw stream."""

    def __init__(self, raw, start: int, end: int):
        self.raw, self.start, self.left = raw, start, max(0, end - start)
        raw.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        if n <= 0:
            return 0
        got = self.raw.readinto(memoryview(buffer)[:n])
        self.left -= got
        return got

    def close(self) -> None:
        self.raw.close()
        super().close()


def _open_range(path: Path, lo: int, hi: int, progress_out: list) -> io.TextIOWrapper:
    raw = open(path, "rb")
    size = os.fstat(raw.fileno()).st_size
    start, end = _line_start(raw, lo, size), _line_start(raw, hi, size)
    progress_out.append(_Progress(raw))
    return io.TextIOWrapper(io.BufferedReader(_Window(raw, start, end)), encoding="utf-8", errors="ptft-replace")


def _jsonl_records(fh, path: Path | str) -> Iterator[tuple[str, dict | Bad]]:
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            yield where, Bad(where, f"{where}: not valid JSON ({e.msg})")


def _csv_records(fh, path: Path, require, kind: str, tsv_quoting: str) -> Iterator[tuple[str, dict | Bad]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    tsv = kind == "tsv"
    quoting = csv.QUOTE_NONE if tsv and tsv_quoting == "none" else csv.QUOTE_MINIMAL
    reader = csv.reader(fh, delimiter="\t" if tsv else ",", quoting=quoting)
    what = "TSV" if tsv else "CSV"
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"{path}:1: not valid {what} ({e})") from None
    names = [h.strip() for h in header]
    for column in require:
        if column not in names:
            raise DataError(
                f"{path}: no column {column!r} in the header (columns: {', '.join(names)}); set data.text_field"
            )
    needed = max((names.index(c) for c in require), default=-1)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            where = f"{path}:{reader.line_num}"
            raise DataError(f"{where}: not valid {what} ({e})") from None
        if not row:
            continue
        where = f"{path}:{reader.line_num}"
        if needed >= len(row):
            column = next(c for c in require if names.index(c) >= len(row))
            yield (
                where,
                Bad(
                    where,
                    f"{where}: the row has {len(row)} fields, column {column!r} is field {names.index(column) + 1}",
                ),
            )
            continue
        record = Row(zip(names, row))
        record.num_fields = len(row)
        yield where, record


def _parquet_records(path: Path, require, progress_out: list) -> Iterator[tuple[str, dict | Bad]]:
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
    for column in require:
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
    for batch in pf.iter_batches(batch_size=BATCH_DOCUMENTS, columns=list(require) or None):
        for record in batch.to_pylist():
            rows += 1
            yield f"{path}: row {rows}", record
    progress_out[-1].done = size


# --------------------------------------------------------------------------- documents


def _text(where: str, record, text_field: str, null_ok: bool = False) -> str | Bad | None:
    """The text of one record; None for a null value where nulls are skipped (Parquet)."""
    if isinstance(record, Bad):
        return record
    if not isinstance(record, dict) or text_field not in record:
        return Bad(where, f"{where}: no field {text_field!r} (set data.text_field)")
    text = record[text_field]
    if text is None and null_ok:
        return None
    if not isinstance(text, str):
        return Bad(where, f"{where}: field {text_field!r} is {type(text).__name__}, not text")
    return text


def _file_texts(
    path: Path, text_field: str, progress_out: list, byte_range: tuple[int, int] | None = None
) -> Iterator[tuple[str, str | Bad | None]]:
    kind, _ = file_format(path)
    require = (text_field,) if kind in ("csv", "tsv", "parquet") else ()
    records = iter_records(
        path, text_field=text_field, require=require, progress_out=progress_out, byte_range=byte_range
    )
    for where, record in records:
        yield where, _text(where, record, text_field, null_ok=kind == "parquet")


def _tar_texts(location: str | Path, text_field: str, progress_out: list) -> Iterator[tuple[str, str | Bad | None]]:
    """The documents of one tar shard, read with webdataset's tar iterator and sample grouping."""
    from webdataset import tariterators

    loc = files.location(location)
    try:
        fh = files.open_binary(loc)
    except FileNotFoundError:
        raise DataError(f"input file {loc} does not exist") from None
    progress_out.append(_Progress(fh))
    try:
        samples = tariterators.group_by_keys(tariterators.tar_file_expander([{"url": loc, "stream": fh}]))
        for sample in samples:
            key = sample.get("__key__", "?")
            members = [ext for ext in TAR_TEXT_MEMBERS if ext in sample]
            if not members:
                have = ", ".join(k for k in sample if not k.startswith("__"))
                yield (
                    f"{loc} sample {key}",
                    Bad(
                        f"{loc} sample {key}",
                        f"{loc}: sample {key!r} has no text member (.txt, .json or .jsonl; it has: {have})",
                        "no-text",
                    ),
                )
                continue
            for ext in members:
                where = f"{loc} member {key}.{ext}"
                raw = sample[ext]
                body = raw.decode("utf-8", "ptft-replace") if isinstance(raw, bytes) else str(raw)
                if ext == "txt":
                    yield where, body
                    continue
                lines = body.splitlines() if ext == "jsonl" else [body]
                for n, line in enumerate(lines, 1):
                    at = f"{where}:{n}" if ext == "jsonl" else where
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        yield at, Bad(at, f"{at}: not valid JSON ({e.msg})")
                        continue
                    yield at, _text(at, record, text_field)
    except DataError:
        raise
    except Exception as e:  # tarfile.ReadError, a truncated member, a duplicate file name
        raise DataError(f"input file {loc}: not a readable tar shard ({type(e).__name__}: {e})") from None
    finally:
        fh.close()
    progress_out[-1].done = _size(loc)


def _size(loc: str) -> int:
    if not files.is_remote(loc):
        return os.path.getsize(loc)
    fs, path = files._fs(loc)
    try:
        return int(fs.size(path) or 0)
    except OSError:
        return 0


def _collection_texts(
    source: Source, text_field: str, progress_out: list, spec=None
) -> Iterator[tuple[str, str | Bad | None]]:
    spec = spec if isinstance(spec, mongo_source.Collection) else source.collection

    class _Count:
        bytes_read = 0

    count = _Count()
    progress_out.append(count)
    for document in mongo_source.iter_documents(spec, (text_field,)):
        count.bytes_read += 1
        where = f"{spec.where}, document _id={document.get('_id')!r}"
        try:
            yield where, mongo_source.text_of(spec, document, text_field)
        except DataError as e:
            yield where, Bad(where, str(e))


def _units(source: Source) -> list:
    return [source.collection] if source.collection is not None else list(source.files)


def _unit_size(source: Source, unit) -> int:
    if source.collection is not None:
        return source.planned
    return _size(str(unit))


def iter_source_documents(
    source: Source,
    unit,
    *,
    text_field: str,
    min_chars: int,
    on_error: str = "raise",
    progress_out: list | None = None,
    stats: SourceStats | None = None,
) -> Iterator[str]:
    """Documents of one unit of a source (a file, a tar shard, a collection; a :class:`FileRange`
    of a file or an ``_id`` range of the collection), stripped, checked:
    bad records and garbage raise DataError, or are skipped and counted (``on_error="skip"``);
    shorter than ``min_chars`` are skipped (counted when not blank)."""
    progress_out = progress_out if progress_out is not None else []
    if source.collection is not None:
        raw = _collection_texts(source, text_field, progress_out, unit)
    elif isinstance(unit, FileRange):
        raw = _file_texts(Path(unit.path), text_field, progress_out, (unit.lo, unit.hi))
    elif file_format(unit)[0] == "tar":
        raw = _tar_texts(unit, text_field, progress_out)
    else:
        raw = _file_texts(Path(unit), text_field, progress_out)
    while True:
        mark = _REPLACED[0]
        try:
            where, text = next(raw)
        except StopIteration:
            if stats is not None:
                stats.replaced_bytes += _REPLACED[0] - mark
            return
        if stats is not None:
            stats.replaced_bytes += _REPLACED[0] - mark
            stats.records_read += 1
        if text is None:
            continue
        if isinstance(text, Bad):
            if on_error != "skip":
                raise DataError(text.message)
            if stats is not None:
                stats.skip(text.reason, where, text.message)
            continue
        text = text.strip()
        if len(text) < min_chars:
            if text and stats is not None:
                stats.skipped_records["short"] = stats.skipped_records.get("short", 0) + 1
            continue
        reason = garbage(text)
        if reason:
            message = f"{where}: {reason}"
            if on_error != "skip":
                raise DataError(f"{message}; remove it or set data.on_error=skip")
            if stats is not None:
                stats.skip("garbage", where, message)
            continue
        yield text


def iter_file_documents(path: Path, text_field: str, min_chars: int, progress_out: list | None = None) -> Iterator[str]:
    """Documents of one input file, in order, stripped; shorter than min_chars are skipped."""
    source = Source(str(path), [path])
    yield from iter_source_documents(
        source, path, text_field=text_field, min_chars=min_chars, progress_out=progress_out
    )


# --------------------------------------------------------------------------- the mix


def document_split(text: str, source_pass: int, weight: float, source_index: int, fraction: float) -> str | None:
    """Where one document read on pass ``source_pass`` of its source goes: ``"valid"`` (held
    out by hash, first pass only), ``"train"``, or None (not copied on this pass: the pass is
    past ``floor(weight)`` and the hash leaves the document out of the fractional share)."""
    if is_validation(text, fraction):
        return None if source_pass else "valid"
    if source_pass < math.floor(weight):
        return "train"
    return "train" if _keeps_extra_copy(text, weight - math.floor(weight), source_index) else None


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
        on_error: str,
    ):
        self.index, self.source = index, source
        self.text_field, self.min_chars, self.fraction = text_field, min_chars, validation_fraction
        self.first_pass_only, self.on_error = train_only_first_pass, on_error
        self._pass = 0
        self.scratch = SourceStats(quiet=True)  # what the first-pass-only read (the tokenizer's) saw
        self._progress: list = []
        self._done_bytes = 0
        self._gen = self._batches()

    @property
    def progress(self) -> float:
        return self.units_done / (self.source.planned * (1 if self.first_pass_only else self.source.num_passes))

    @property
    def units_done(self) -> int:
        """Bytes (documents, for a collection) read so far over all passes."""
        return self._done_bytes + sum(p.bytes_read for p in self._progress)

    def next_chunk(self) -> tuple[list[str], list[str]] | None:
        return next(self._gen, None)

    def _batches(self) -> Iterator[tuple[list[str], list[str]]]:
        w = self.source.weight
        passes = 1 if self.first_pass_only else self.source.num_passes
        for p in range(passes):
            self._pass = p
            texts, splits, chars = [], [], 0
            # what reading saw is counted once: on the first pass of the full read
            stats = self.scratch if self.first_pass_only else (self.source.stats if p == 0 else None)
            for unit in _units(self.source):
                self._progress = []
                for text in iter_source_documents(
                    self.source,
                    unit,
                    text_field=self.text_field,
                    min_chars=self.min_chars,
                    on_error=self.on_error,
                    progress_out=self._progress,
                    stats=stats,
                ):
                    if self.first_pass_only:  # the tokenizer's read: every document once
                        split = "valid" if is_validation(text, self.fraction) else "train"
                    else:
                        split = document_split(text, p, w, self.index, self.fraction)
                    if split is None:
                        continue
                    texts.append(text)
                    splits.append(split)
                    chars += len(text)
                    if len(texts) >= CHUNK_DOCUMENTS or chars >= CHUNK_CHARS:
                        yield texts, splits
                        texts, splits, chars = [], [], 0
                self._done_bytes += _unit_size(self.source, unit)
                self._progress = []
            if texts:
                yield texts, splits


class Mix:
    """Batches of all sources, interleaved chunk by chunk so that each source advances at the
    same pace through its planned bytes (deterministic: it depends only on the data). Iterate
    it; ``units_done`` / ``units_planned`` say how far it is (for progress and ETA)."""

    def __init__(
        self,
        sources: list[Source],
        *,
        text_field: str,
        min_chars: int,
        validation_fraction: float,
        first_pass_only: bool = False,
        on_error: str = "raise",
    ):
        self.readers = [
            _SourceReader(i, s, text_field, min_chars, validation_fraction, first_pass_only, on_error)
            for i, s in enumerate(sources)
        ]
        self.first_pass_only = first_pass_only

    @property
    def fraction_done(self) -> float:
        """Share of the planned reading done, averaged over the sources by planned size."""
        planned = [r.source.planned * (1 if self.first_pass_only else r.source.num_passes) for r in self.readers]
        total = sum(planned) or 1
        return sum(min(1.0, r.progress) * w for r, w in zip(self.readers, planned)) / total

    def skipped(self) -> dict[str, int]:
        """Records left out so far, by reason, over all sources (this read)."""
        out: dict[str, int] = {}
        for r in self.readers:
            stats = r.scratch if self.first_pass_only else r.source.stats
            for reason, n in stats.skipped_records.items():
                out[reason] = out.get(reason, 0) + n
        return out

    def __iter__(self) -> Iterator[Batch]:
        readers = self.readers
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
