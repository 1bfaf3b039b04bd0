"""Small real datasets for the data tests: shards written by the real writer, with shard sizes
chosen to be uneven, and token ids that encode the sample index (so a test can check that a
key comes with its own ids)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ptft_dist.data.build import FORMAT, FORMAT_VERSION, MANIFEST
from ptft_dist.data.shards import ShardWriter, record_bytes

SEQ_LEN = 16
UNEVEN_SIZES = [5, 13, 1, 8, 21, 3, 9, 2]  # 62 samples: divisible by none of 2, 3, 4, 8


def write_dataset(out: Path, sizes: list[int] = UNEVEN_SIZES, valid_sizes: list[int] = (4,)) -> Path:
    """A dataset directory whose train shards hold ``sizes`` samples; sample i's ids are
    i, i+1, ..., i+15 (mod 60000)."""
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype("<u2")
    splits = {}
    for split, split_sizes in (("train", sizes), ("valid", list(valid_sizes))):
        writer = ShardWriter(out, split, SEQ_LEN, dtype, samples_per_shard=10**9)
        for n in split_sizes:
            index = np.arange(writer.num_samples, writer.num_samples + n)
            writer.add((index[:, None] + np.arange(SEQ_LEN)[None, :]) % 60000)
            writer.close_shard()
        splits[split] = {
            "num_documents": 0,
            "num_samples": writer.num_samples,
            "num_tokens": writer.num_samples * SEQ_LEN,
            "shards": writer.shards,
        }
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "seq_len": SEQ_LEN,
        "vocab_size": 60000,
        "dtype": dtype.str,
        "record_bytes": record_bytes(SEQ_LEN, 2),
        "tokenizer": {
            "dir": "tokenizer",
            "sha256": "0" * 64,
            "special_ids": {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4},
        },
        "sources": [],
        "splits": splits,
    }
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def index_of(key: str) -> int:
    return int(key.rsplit("-", 1)[1])
