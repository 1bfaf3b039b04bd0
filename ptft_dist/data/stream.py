"""Streaming packed samples from the shards of a dataset directory, and MLM masking.

Which shards a (rank, loader worker) reads is a pure function of (seed, epoch, world size,
number of loader workers): the epoch's shard order is a permutation seeded by
(seed, epoch); rank r takes every world_size-th shard from position r, and its loader worker
w every num_workers-th of those. So each shard is read by exactly one (rank, worker) per
epoch. Samples then pass a bounded shuffle buffer seeded by (seed, epoch, rank, worker).

The stream runs over epochs without end; the recipe counts optimizer steps, so ranks whose
shards hold fewer samples simply enter the next epoch sooner and no collective waits on a
rank that ran dry. Tar files are read with webdataset's tar iterator.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .build import DataError, read_manifest


def shards_for(num_shards: int, *, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> list[int]:
    """Indices of the shards one (rank, loader worker) reads in one epoch."""
    order = np.random.default_rng([seed, epoch]).permutation(num_shards)
    return [int(i) for i in order[rank::world_size][worker::num_workers]]


def _decode(sample: dict, dtype: np.dtype, seq_len: int, url: str) -> np.ndarray:
    key = sample.get("__key__", "?")
    if "ids" not in sample:
        raise DataError(f"shard {url}: sample {key!r} has no 'ids' field (fields: {sorted(k for k in sample if not k.startswith('__'))})")
    ids = np.frombuffer(sample["ids"], dtype=dtype)
    if ids.size != seq_len:
        raise DataError(f"shard {url}: sample {key!r} has {ids.size} tokens, the manifest says seq_len={seq_len}")
    return ids


def iter_shard(url: str, dtype: np.dtype, seq_len: int) -> Iterator[tuple[str, np.ndarray]]:
    """(key, token ids) of every sample in one tar shard, in order."""
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": url}]):
            yield sample["__key__"], _decode(sample, dtype, seq_len, url)
    except DataError:
        raise
    except Exception as e:  # tarfile and I/O errors: name the shard
        raise DataError(f"shard {url}: cannot be read ({type(e).__name__}: {e})") from e


class ShardStream(IterableDataset):
    """Endless stream of (slot, epoch, key, token ids) for one rank, resumable.

    With ``num_workers`` DataLoader workers the stream is split into that many *slots* (one
    per worker; one slot without workers). The DataLoader takes whole batches from its
    workers in turn, so the training loop knows which slot each batch came from and can
    record, per slot, the epoch and the samples read in it: that is the read position
    (:meth:`Position`). A resumed stream starts every slot at its position and rotates the
    workers so that the batch order continues exactly.

    Args:
        dataset_dir: a directory made by ``ptft data build``.
        split: ``train`` or ``valid``.
        rank, world_size: this rank's place among the data-parallel ranks.
        seed: seeds the shard order and shuffle buffer.
        shuffle_buffer: samples held for shuffling (0 or 1 disables it).
        position: where to resume, from :func:`new_position` / :func:`advance`.
    """

    def __init__(self, dataset_dir: str | Path, split: str, *, rank: int, world_size: int, seed: int, shuffle_buffer: int, position: dict | None = None):
        self.manifest = read_manifest(dataset_dir)
        self.dir = Path(dataset_dir)
        self.split = split
        self.shards = self.manifest["splits"][split]["shards"]
        self.dtype = np.dtype(self.manifest["dtype"])
        self.seq_len = self.manifest["seq_len"]
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = shuffle_buffer
        self.position = position
        for shard in self.shards:
            if not (self.dir / shard["file"]).is_file():
                raise DataError(f"shard {self.dir / shard['file']} listed in {self.dir / 'manifest.json'} is missing")

    def _epoch_samples(self, epoch: int, slot: int, num_slots: int) -> Iterator[tuple[str, np.ndarray]]:
        picked = shards_for(len(self.shards), seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size, worker=slot, num_workers=num_slots)
        rng = random.Random(f"{self.seed}/{epoch}/{self.rank}/{slot}")
        buffer: list[tuple[str, np.ndarray]] = []
        for index in picked:
            for item in iter_shard(str(self.dir / self.shards[index]["file"]), self.dtype, self.seq_len):
                if self.shuffle_buffer <= 1:
                    yield item
                    continue
                buffer.append(item)
                if len(buffer) >= self.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[tuple[int, int, str, np.ndarray]]:
        info = get_worker_info()
        worker, num_slots = (info.id, info.num_workers) if info else (0, 1)
        position = self.position or new_position(num_slots)
        if position["num_slots"] != num_slots:
            raise ValueError(f"the saved read position has {position['num_slots']} loader slots, this loader has {num_slots}: resume with the same data.num_loader_workers")
        slot = (worker + position["batches"]) % num_slots
        epoch, skip = position["slots"][slot]
        while True:
            empty = True
            for key, ids in self._epoch_samples(epoch, slot, num_slots):
                empty = False
                if skip:  # resuming inside this epoch: drop what was already consumed
                    skip -= 1
                    continue
                yield slot, epoch, key, ids
            if empty and len(self.shards) >= self.world_size * num_slots:
                raise DataError(f"{self.dir}: split {self.split!r} yielded no samples in epoch {epoch}")
            epoch, skip = epoch + 1, 0


def new_position(num_slots: int) -> dict:
    """The read position at the start: every slot at epoch 0, nothing read."""
    return {"num_slots": num_slots, "batches": 0, "slots": [[0, 0] for _ in range(num_slots)]}


def advance(position: dict, slot: int, epochs: list[int]) -> None:
    """Record one consumed batch from ``slot`` whose samples came from ``epochs``."""
    state = position["slots"][slot]
    for e in epochs:
        if e != state[0]:
            state[0], state[1] = e, 0
        state[1] += 1
    position["batches"] += 1


def read_all(dataset_dir: str | Path, split: str, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    """Keys and ids of a split in shard order (the held-out set for evaluation)."""
    manifest = read_manifest(dataset_dir)
    dtype, seq_len = np.dtype(manifest["dtype"]), manifest["seq_len"]
    keys, rows = [], []
    for shard in manifest["splits"][split]["shards"]:
        for key, ids in iter_shard(str(Path(dataset_dir) / shard["file"]), dtype, seq_len):
            keys.append(key)
            rows.append(ids)
            if limit is not None and len(rows) >= limit:
                return keys, np.stack(rows)
    return keys, np.stack(rows)


def mask_tokens(ids: torch.Tensor, *, mlm_probability: float, mask_id: int, vocab_size: int, special_ids: list[int], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic BERT masking: choose ``mlm_probability`` of the non-special tokens; of those
    80% become [MASK], 10% a random token, 10% stay. Returns (input_ids, labels) with
    labels = -100 where nothing is predicted."""
    ids = ids.long()
    labels = ids.clone()
    special = torch.zeros_like(ids, dtype=torch.bool)
    for s in special_ids:
        special |= ids == s
    chosen = (torch.rand(ids.shape, generator=generator) < mlm_probability) & ~special
    labels[~chosen] = -100
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = mask_id
    randomize = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomize] = torch.randint(vocab_size, ids.shape, generator=generator)[randomize]
    return inputs, labels
