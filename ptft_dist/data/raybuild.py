"""The data build spread over a Ray cluster (``data.engine: ray``): tasks read, tokenize, pack
and write; the driver plans the parts and writes the one manifest.

**Parts.** The driver cuts the input into parts fixed by the data alone: a file; a
``data.split_mb`` byte range of an uncompressed text or JSONL file (lines belong to the range
their first byte is in, see :class:`.ingest.FileRange`); a tar shard; an ``_id`` range of
about ``data.split_documents`` documents of a collection (``$bucketAuto``); each once per
pass of a weighted source. Neither the number of nodes nor of tasks changes a part, so the
shards and the manifest are the same on one node or fifty.

**Tasks.** One Ray task per part (one CPU, the tokenizer single-threaded) reads its part with
the local build's reader and checks (garbage, malformed records, ``data.on_error``), sends
each document to its split with the same rule (:func:`.ingest.document_split`: the hash of
the text), tokenizes, packs ``seq_len`` samples and writes them to its own shards,
``<split>-p<part>-NNNNNN.tar`` with keys ``<split>-p<part>-<n>``. It returns their manifest
entries, the per-source counts, and the tokens left over after its last whole sample.

**The driver** lists the parts' shards in plan order, packs the parts' leftovers (in plan
order) into the ``<split>-tail-`` shards, and writes the manifest. Per split this gives the
same number of samples as the local build (the leftovers add up: ``sum floor(n_i / b) +
floor(sum r_i / b) = floor(sum n_i / b)``), the same documents and the same tokens; only
where the sample boundaries fall differs, so the shards are not the local build's bytes.
Parts are interleaved by source in the plan (each source advances at the same pace), but a
part's shards hold one source: sources mix across shards, not within one.

**Failures.** A task whose worker or node dies is run again by Ray (``max_retries``). A shard
is written under a temporary name of its own attempt and renamed when complete; a retry
writes the same bytes to the same names, so a shard is never listed twice, and the manifest
lists only what completed tasks returned. Stray temporary files and unlisted shards of the
parts are removed before the manifest is written. A :class:`.DataError` in a task (a bad
record, garbage) is not retried: the build stops with its message.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

from . import mongo
from .errors import DataError
from .ingest import (
    BATCH_CHARS,
    BATCH_DOCUMENTS,
    RANGED_KINDS,
    FileRange,
    Source,
    SourceStats,
    _size,
    document_split,
    file_format,
    iter_source_documents,
)
from .shards import ShardWriter

log = logging.getLogger(__name__)

#: runs of a part after its worker or node died
MAX_RETRIES = 3
#: seconds between progress log lines
PROGRESS_EVERY_S = 30.0
SPLITS = ("train", "valid")


@dataclasses.dataclass(frozen=True)
class Part:
    """One task's share of the build: a unit of one source (a file, a :class:`.FileRange`, a
    tar shard, an ``_id``-range :class:`.mongo.Collection`) on one pass of that source."""

    index: int
    source: int
    unit: object
    source_pass: int
    #: bytes (documents, for a collection) the part plans to read
    size: float

    @property
    def name(self) -> str:
        return f"p{self.index:06d}"


def _units(source: Source, split_bytes: int, split_documents: int) -> list[tuple[object, float]]:
    """A source's units of one pass, each with its planned size."""
    if source.collection is not None:
        count = (source.collection_info or {}).get("count") or 0
        n = max(1, math.ceil(count / split_documents))
        ranges = mongo.split_ranges(source.collection, n) if n > 1 else [source.collection]
        return [(r, count / len(ranges)) for r in ranges]
    out: list[tuple[object, float]] = []
    for f in source.files:
        kind, compression = file_format(f)
        size = _size(str(f))
        if kind in RANGED_KINDS and not compression and size > split_bytes:
            out += [
                (FileRange(str(f), lo, min(lo + split_bytes, size)), min(split_bytes, size - lo))
                for lo in range(0, size, split_bytes)
            ]
        else:
            out.append((str(f), size))
    return out


def plan(sources: list[Source], split_bytes: int, split_documents: int) -> list[Part]:
    """Every source's units on every pass, interleaved by source: ordered by the share of its
    source's planned reading done before the unit (then source, then place), the split-level
    version of the local build's mix. Depends only on the data and the two split sizes."""
    keyed = []
    for i, source in enumerate(sources):
        units = _units(source, split_bytes, split_documents)
        per_pass = sum(size for _, size in units) or 1.0
        total = per_pass * source.num_passes
        done, place = 0.0, 0
        for p in range(source.num_passes):
            for unit, size in units:
                keyed.append(((done / total, i, place), i, unit, p, size))
                done += size
                place += 1
    keyed.sort(key=lambda k: k[0])
    return [Part(n, i, unit, p, size) for n, (_, i, unit, p, size) in enumerate(keyed)]


# --------------------------------------------------------------------------- the task

_TOKENIZERS: dict = {}


def _encoder(tokenizer_json: str, sep_id: int):
    """Load the tokenizer once per worker process (for the build's encoder function)."""
    from . import build

    key = hash(tokenizer_json)
    if _TOKENIZERS.get("key") != key:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one task per CPU
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(tokenizer_json)
        tok.no_truncation()
        tok.no_padding()
        build._WORKER.update(tok=tok, sep=sep_id)
        _TOKENIZERS["key"] = key
    return build._encode


def run_part(part: Part, source: Source, settings: dict) -> dict:
    """Read, check, tokenize, pack and write one part; its shards, counts and leftover tokens.
    A DataError comes back as ``{"error": message}`` (not retried)."""
    from .build import _Packer

    wall, cpu = time.perf_counter(), time.process_time()
    try:
        encode = _encoder(settings["tokenizer_json"], settings["sep"])
        out = Path(settings["out_dir"])
        dtype = np.dtype(settings["dtype"])
        writers = {
            s: ShardWriter(out, s, settings["seq_len"], dtype, settings["samples_per_shard"], part=part.name)
            for s in SPLITS
        }
        packers = {s: _Packer(settings["seq_len"], settings["cls"], writers[s]) for s in SPLITS}
        stats = SourceStats() if part.source_pass == 0 else None  # what reading saw: counted on the first pass
        num_documents = {s: 0 for s in SPLITS}
        totals = {"num_tokens": 0, "num_bytes": 0}
        texts: list[str] = []
        splits: list[str] = []
        chars = 0

        def flush() -> None:
            encoded = encode(texts, splits)
            for s in SPLITS:
                packers[s].add(encoded[s])
                num_documents[s] += splits.count(s)
            totals["num_tokens"] += encoded["num_tokens"]
            totals["num_bytes"] += encoded["num_bytes"]

        documents = iter_source_documents(
            source,
            part.unit,
            text_field=settings["text_field"],
            min_chars=settings["min_chars"],
            on_error=settings["on_error"],
            stats=stats,
        )
        for text in documents:
            split = document_split(text, part.source_pass, source.weight, part.source, settings["fraction"])
            if split is None:
                continue
            texts.append(text)
            splits.append(split)
            chars += len(text)
            if len(texts) >= BATCH_DOCUMENTS or chars >= BATCH_CHARS:
                flush()
                texts, splits, chars = [], [], 0
        if texts:
            flush()
        for w in writers.values():
            w.close_shard()
    except DataError as e:
        return {"error": str(e)}
    import ray

    return {
        "part": part.index,
        "shards": {s: writers[s].shards for s in SPLITS},
        "leftover": {s: packers[s].carry for s in SPLITS},
        "num_documents": num_documents,
        "stats": dataclasses.asdict(stats) if stats is not None else None,
        "node": ray.get_runtime_context().get_node_id(),
        "wall_s": time.perf_counter() - wall,
        "cpu_s": time.process_time() - cpu,
        **totals,
    }


#: the function each part runs (a test may wrap it)
PART_FUNCTION = run_part


# --------------------------------------------------------------------------- the driver


def run(
    sources: list[Source],
    *,
    out_dir: Path,
    tokenizer_json: Path,
    ids: dict,
    dtype: np.dtype,
    seq_len: int,
    samples_per_shard: int,
    read: dict,
    split_mb: float,
    split_documents: int,
) -> tuple[dict, dict]:
    """Run every part on the cluster (the Ray session open in this process); returns the splits
    (``num_documents``, ``num_samples``, ``shards``) and the build's totals (tokens, bytes,
    parts, the nodes the tasks ran on, the tasks' CPU seconds per node). Adds what the tasks
    counted to ``sources``."""
    import ray

    from .build import _Packer

    if not ray.is_initialized():
        raise RuntimeError("data.engine=ray needs a Ray session (ptft data build --address, or ray.init())")
    parts = plan(sources, max(1, int(split_mb * 1e6)), split_documents)
    settings = ray.put(
        {
            "tokenizer_json": Path(tokenizer_json).read_text(),
            "sep": ids["sep"],
            "cls": ids["cls"],
            "out_dir": str(out_dir),
            "dtype": dtype.str,
            "seq_len": seq_len,
            "samples_per_shard": samples_per_shard,
            "text_field": read["text_field"],
            "min_chars": read["min_chars"],
            "fraction": read["validation_fraction"],
            "on_error": read["on_error"],
        }
    )
    task = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, scheduling_strategy="SPREAD")(PART_FUNCTION)
    source_refs = [ray.put(s) for s in sources]
    log.info("tokenize + pack: %d parts on %d CPUs", len(parts), int(ray.cluster_resources().get("CPU", 1)))
    pending = {task.remote(p, source_refs[p.source], settings): p for p in parts}
    results: dict[int, dict] = {}
    start = last = time.perf_counter()
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                part = pending.pop(ref)
                got = ray.get(ref)
                if "error" in got:
                    raise DataError(got["error"])
                results[part.index] = got
            now = time.perf_counter()
            if now - last >= PROGRESS_EVERY_S:
                last = now
                log.info("tokenize + pack: %d of %d parts done (%.0fs)", len(results), len(parts), now - start)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    log.info("tokenize + pack: done in %.1fs", time.perf_counter() - start)

    ordered = [results[p.index] for p in parts]
    for part, got in zip(parts, ordered):
        source = sources[part.source]
        for s in SPLITS:
            source.num_documents[s] += got["num_documents"][s]
        if got["stats"] is not None:
            source.stats.records_read += got["stats"]["records_read"]
            source.stats.replaced_bytes += got["stats"]["replaced_bytes"]
            for reason, n in got["stats"]["skipped_records"].items():
                source.stats.skipped_records[reason] = source.stats.skipped_records.get(reason, 0) + n
    splits = {}
    for s in SPLITS:
        tail = ShardWriter(out_dir, s, seq_len, dtype, samples_per_shard, part="tail")
        packer = _Packer(seq_len, ids["cls"], tail)
        for got in ordered:
            packer.add(got["leftover"][s])
        tail.close_shard()
        shards = [dict(e) for got in ordered for e in got["shards"][s]] + tail.shards
        first = 0
        for entry in shards:
            entry["first_index"] = first
            first += entry["num_samples"]
        splits[s] = {
            "num_documents": sum(got["num_documents"][s] for got in ordered),
            "num_samples": first,
            "shards": shards,
        }
    _remove_strays(out_dir, {e["file"] for s in SPLITS for e in splits[s]["shards"]})
    totals = {
        "num_tokens": sum(got["num_tokens"] for got in ordered),
        "num_bytes": sum(got["num_bytes"] for got in ordered),
        "num_parts": len(parts),
        "nodes": sorted({got["node"] for got in ordered}),
        "cpu_s_per_node": {},
    }
    for got in ordered:
        totals["cpu_s_per_node"][got["node"]] = totals["cpu_s_per_node"].get(got["node"], 0.0) + got["cpu_s"]
    return splits, totals


def _remove_strays(out_dir: Path, listed: set[str]) -> None:
    """Temporary files of failed attempts and part shards no manifest entry lists."""
    for path in Path(out_dir).iterdir():
        name = path.name
        stray = name.endswith(".tmp") and name.split("-", 1)[0] in SPLITS
        stray = stray or (name.endswith(".tar") and name.split("-", 1)[0] in SPLITS and name not in listed)
        if stray and path.is_file():
            log.info("removing %s (left by a failed attempt)", path)
            path.unlink()
