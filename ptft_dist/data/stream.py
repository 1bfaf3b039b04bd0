"""Streaming packed samples from the shards of a dataset, resumable by seeking; MLM masking.

**The order of an epoch** depends only on (seed, epoch): the shards are permuted with a
generator seeded by (seed, epoch), their samples laid end to end, and the samples permuted
within consecutive windows of ``shuffle_buffer`` (each window seeded by seed, epoch and its
index). Call the result positions ``0 .. N-1`` of epoch ``e``.

**Which rank reads what** depends only on (seed, epoch, world size): an epoch's positions are
cut into ``world_size`` contiguous ranges of ``N // world_size`` or one more, and the ranks
whose range gets the extra sample rotate from epoch to epoch, so after any number of epochs
no rank has read more than one sample more than another. A rank's stream is its range of
epoch 0, then of epoch 1, and so on without end: every rank always has a next batch (no rank
waits on another, no hang), and the last batch of an epoch is topped up from the next one
instead of being dropped or padded. Inside a rank, DataLoader worker ``w`` of ``K`` ("slot")
reads the rank's samples ``w, w+K, w+2K, ...``. So every sample is read exactly once per
epoch, by one (rank, slot), whatever the world size, loader workers or shard sizes.

**In global order** (elastic determinism, :class:`GlobalLayout`) the epochs are instead one
sequence cut into global steps of ``global_batch`` samples, and rank ``r`` of ``W`` reads the
``r``-th ``1/W`` of every step: the samples of a step do not depend on the world size.

**The read position** is, per slot, how many of its samples the training loop has consumed,
plus how many batches (to know which worker's batch comes next). Samples are fixed-size tar
members, so a resumed stream computes the byte offset of its next sample and starts reading
there: nothing before it is read. On another world size or loader-worker count, the stream is
*rebased*: the samples of the epochs in progress that no rank had consumed are split among the
new ranks and read first, then whole epochs continue on the new layout (see docs/data.md).

Shards are read with :class:`.shards.ShardReader` (local files or any fsspec URL, by ranged
reads) rather than WebDataset's sequential tar iterator, which cannot seek; the shards stay
valid WebDataset tar files.
"""

from __future__ import annotations

import bisect
import copy
import logging
import multiprocessing
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from . import files
from .build import MANIFEST, read_manifest
from .errors import DataError
from .shards import SampleError, ShardError, ShardReader, size_problem

log = logging.getLogger(__name__)

POSITION_VERSION = 2
#: samples read per request when the shuffle window is off
READ_CHUNK = 1024


class Item(NamedTuple):
    """One sample as the stream yields it."""

    slot: int
    """The DataLoader worker ("slot") that read it."""
    epoch: int
    key: str
    input_ids: np.ndarray
    stream_index: int
    """Its index in its rank's stream: what :func:`advance` records as consumed (exact also
    when bad samples were skipped)."""


class Batch(NamedTuple):
    """One micro batch of a rank, made by :func:`collate` from the items of one slot."""

    slot: int
    epochs: list[int]
    keys: list[str]
    input_ids: torch.Tensor
    """[batch, seq_len] int64 token ids, unmasked (masking is the training loop's, per step)."""
    indices: list[int]
    """Each sample's index in its rank's stream (:attr:`Item.stream_index`)."""


def collate(items: list[Item]) -> Batch:
    """The DataLoader ``collate_fn`` for a :class:`ShardStream`: items of one slot -> Batch."""
    return Batch(
        slot=items[0].slot,
        epochs=[it.epoch for it in items],
        keys=[it.key for it in items],
        input_ids=torch.from_numpy(np.stack([it.input_ids for it in items]).astype("int64")),
        indices=[it.stream_index for it in items],
    )


# --------------------------------------------------------------------------- layout


def _overlap(a0: int, a1: int, b0: int, b1: int) -> int:
    return max(0, min(a1, b1) - max(a0, b0))


def _part(total: int, world_size: int, rank: int, offset: int) -> tuple[int, int]:
    """(start, size) of ``rank``'s contiguous part when ``total`` items are cut into
    ``world_size`` parts; the ``total % world_size`` extra items go to ranks
    ``offset, offset+1, ...`` (cyclically)."""
    q, m = divmod(total, world_size)
    size = q + ((rank - offset) % world_size < m)
    start = (
        rank * q + _overlap(offset, offset + m, 0, rank) + _overlap(offset, offset + m, world_size, world_size + rank)
    )
    return start, size


@dataclass(frozen=True)
class Layout:
    """Which epoch positions each rank reads, in order: first its share of ``pending`` (ranges
    of epochs in progress left over by a rebase), then its range of every epoch from
    ``epoch`` on. ``offset`` says which rank gets the first extra sample after the pending
    share, keeping every rank within one sample of the others."""

    world_size: int
    num_samples: int
    pending: tuple[tuple[int, int, int], ...] = ()
    epoch: int = 0
    offset: int = 0
    _starts: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        starts = [0]
        for _, a, b in self.pending:
            starts.append(starts[-1] + b - a)
        object.__setattr__(self, "_starts", tuple(starts))

    @classmethod
    def of(cls, position: dict, num_samples: int) -> Layout:
        layout = position.get("layout") or {}
        pending = tuple((int(e), int(a), int(b)) for e, a, b in layout.get("pending", []))
        return cls(
            position["world_size"], num_samples, pending, int(layout.get("epoch", 0)), int(layout.get("offset", 0))
        )

    def to_dict(self) -> dict:
        return {"pending": [list(p) for p in self.pending], "epoch": self.epoch, "offset": self.offset}

    @property
    def num_pending(self) -> int:
        return self._starts[-1]

    def share(self, rank: int) -> tuple[int, int]:
        return _part(self.num_pending, self.world_size, rank, 0)

    def fresh_count(self, rank: int, j: int) -> int:
        """Samples of fresh epochs ``epoch .. epoch+j-1`` that ``rank`` reads."""
        q, m = divmod(self.num_samples, self.world_size)
        k0, w = self.offset, self.world_size
        return j * q + (k0 + j * m - 1 - rank) // w - (k0 - 1 - rank) // w

    def fresh_range(self, rank: int, j: int) -> tuple[int, int]:
        m = self.num_samples % self.world_size
        return _part(self.num_samples, self.world_size, rank, (self.offset + j * m) % self.world_size)

    def piece(self, rank: int, t: int) -> tuple[int, int, int, int]:
        """(epoch, start, stop, t0): the run of epoch positions [start, stop) that holds the
        rank's ``t``-th sample, where rank index ``t0`` is position ``start``."""
        p_start, p_size = self.share(rank)
        if t < p_size:
            c = p_start + t
            i = bisect.bisect_right(self._starts, c) - 1
            e, a, _ = self.pending[i]
            lo, hi = max(p_start, self._starts[i]), min(p_start + p_size, self._starts[i + 1])
            return e, a + lo - self._starts[i], a + hi - self._starts[i], lo - p_start
        t2 = t - p_size
        hi = 1
        while self.fresh_count(rank, hi) <= t2:
            hi *= 2
        lo = 0  # smallest j with fresh_count(j + 1) > t2
        while lo < hi:
            mid = (lo + hi) // 2
            if self.fresh_count(rank, mid + 1) > t2:
                hi = mid
            else:
                lo = mid + 1
        start, size = self.fresh_range(rank, lo)
        return self.epoch + lo, start, start + size, p_size + self.fresh_count(rank, lo)

    def end_of_epoch(self, rank: int, epoch: int) -> int:
        """How many of the rank's samples belong to epochs up to ``epoch`` (pending included)."""
        _, p_size = self.share(rank)
        return p_size + (self.fresh_count(rank, epoch - self.epoch + 1) if epoch >= self.epoch else 0)

    def ranges(self, rank: int, t_from: int, t_to: int) -> Iterator[tuple[int, int, int]]:
        """(epoch, start, stop) runs of epoch positions for the rank's samples [t_from, t_to)."""
        t = t_from
        while t < t_to:
            e, a, b, t0 = self.piece(rank, t)
            n = min(t_to, t0 + b - a) - t
            yield e, a + t - t0, a + t - t0 + n
            t += n


@dataclass(frozen=True)
class GlobalLayout:
    """Elastic determinism: the epochs laid end to end as one global sequence of positions
    ``g = 0, 1, ...`` (epoch ``g // N``, epoch position ``g % N``), and global step ``s``
    trains on ``[start + s*G, start + (s+1)*G)`` whatever the world size. Rank ``r`` of ``W``
    takes the ``r``-th ``G/W`` of each step, micro batch ``j`` of its ``A = G/(m*W)`` being
    ``m`` consecutive positions; loader slot ``w`` of ``K`` reads micro batches ``w, w+K, ...``
    (the DataLoader's round robin), so the rank's ``t``-th sample (``t = q*K + w``) is element
    ``q % m`` of micro batch ``(q // m)*K + w``."""

    world_size: int
    num_samples: int
    global_batch: int
    micro_batch: int
    start: int = 0

    def __post_init__(self) -> None:
        if self.global_batch % (self.micro_batch * self.world_size):
            raise DataError(
                f"elastic determinism needs the global batch ({self.global_batch}) divisible by micro batch "
                f"({self.micro_batch}) x world size ({self.world_size})"
            )

    @classmethod
    def of(cls, position: dict, num_samples: int) -> GlobalLayout:
        layout = position["layout"]
        return cls(position["world_size"], num_samples, layout["global_batch"], layout["micro_batch"], layout["start"])

    def to_dict(self) -> dict:
        return {
            "order": "global",
            "start": self.start,
            "global_batch": self.global_batch,
            "micro_batch": self.micro_batch,
        }

    def positions(self, rank: int, slot: int, num_slots: int, q: np.ndarray) -> np.ndarray:
        """Global positions of slot ``slot``'s samples ``q`` (its rank indices ``q*K + slot``)."""
        m, per_rank = self.micro_batch, self.global_batch // self.world_size
        accum = per_rank // m
        b = (q // m) * num_slots + slot
        return self.start + (b // accum) * self.global_batch + rank * per_rank + (b % accum) * m + q % m


def _is_global(position: dict) -> bool:
    return (position.get("layout") or {}).get("order") == "global"


def _same_batches(a: dict, b: dict) -> bool:
    return (a["global_batch"], a["micro_batch"]) == (b["global_batch"], b["micro_batch"])


# --------------------------------------------------------------------------- position


def new_position(num_slots: int, world_size: int | None = None) -> dict:
    """The read position at the start: every slot at epoch 0, nothing read.

    ``world_size`` may be left out when the run never resumes on another world size: a
    position without one is taken to be from the world size it is resumed on."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    return {
        "version": POSITION_VERSION,
        "world_size": world_size,
        "num_slots": num_slots,
        "batches": 0,
        "slots": [[0, 0] for _ in range(num_slots)],
        "layout": None,
    }


def advance(position: dict, batch: Batch) -> None:
    """Record one consumed batch in a read position (in place)."""
    state = position["slots"][batch.slot]
    num_slots = position["num_slots"]
    for epoch, index in zip(batch.epochs, batch.indices):
        state[1] = max(state[1], index // num_slots + 1)
        state[0] = int(epoch)
    position["batches"] += 1


def _check_position(p: dict) -> None:
    if not isinstance(p, dict) or "slots" not in p or "num_slots" not in p:
        raise DataError(f"not a read position (made by new_position/advance): {str(p)[:200]}")
    if p.get("version") != POSITION_VERSION:
        raise DataError(
            f"the read position has version {p.get('version')!r}; this ptft-dist reads version {POSITION_VERSION}: "
            "it was saved by an older reader and cannot be resumed exactly (start from the exported model)"
        )
    if len(p["slots"]) != p["num_slots"]:
        raise DataError(f"the read position lists {len(p['slots'])} slots for num_slots={p['num_slots']}")


def _untouched(p: dict) -> bool:
    return p["batches"] == 0 and not p.get("layout") and all(u == 0 for _, u in p["slots"])


def rebase(positions: list[dict], num_samples: int, world_size: int, num_slots: int) -> dict:
    """The position that continues ``positions`` (one per rank of the old world, or one that
    stands for every rank) on ``world_size`` ranks with ``num_slots`` loader slots each.

    Every sample of the epochs in progress that no old rank consumed goes, once, into the new
    layout's pending ranges (read first, in epoch order); later epochs are laid out afresh.
    Every new rank computes the same result from the same positions."""
    p0 = positions[0]
    old_w, k = p0["world_size"], p0["num_slots"]
    if len(positions) not in (1, old_w):
        raise DataError(f"rebase needs one position per old rank ({old_w}) or a single one, got {len(positions)}")
    for p in positions:
        if p["world_size"] != old_w or p["num_slots"] != k or (p.get("layout") or None) != (p0.get("layout") or None):
            raise DataError(
                "the read positions of the old ranks disagree on world size, loader slots or layout: they are not "
                "from the same checkpoint"
            )
    per_rank = positions if len(positions) == old_w else positions * old_w
    layout = Layout.of(p0, num_samples)
    e_max = layout.epoch - 1
    consumed = []
    for r in range(old_w):
        u = np.array([s[1] for s in per_rank[r]["slots"]], dtype=np.int64)
        slots = np.arange(k)
        first_free = int((u * k + slots).min())
        end = int(((u - 1) * k + slots + 1)[u > 0].max()) if (u > 0).any() else 0
        if end:
            e_max = max(e_max, layout.piece(r, end - 1)[0])
        consumed.append((u, first_free, end))
    pieces: list[tuple[int, int, int]] = []
    for r, (u, first_free, end) in enumerate(consumed):
        free = [np.arange(u[w] * k + w, end, k) for w in range(k)]
        holes = np.sort(np.concatenate(free)) if free else np.empty(0, dtype=np.int64)
        runs = []
        if len(holes):
            cut = np.nonzero(np.diff(holes) > 1)[0]
            runs = list(zip(holes[np.r_[0, cut + 1]].tolist(), (holes[np.r_[cut, len(holes) - 1]] + 1).tolist()))
        runs.append((max(first_free, end), layout.end_of_epoch(r, e_max)))
        for x, y in runs:
            pieces.extend(layout.ranges(r, x, y))
    merged: list[list[int]] = []
    for e, a, b in sorted(pieces):
        if merged and merged[-1][0] == e and merged[-1][2] == a:
            merged[-1][2] = b
        elif b > a:
            merged.append([e, a, b])
    num_pending = sum(b - a for _, a, b in merged)
    new = Layout(world_size, num_samples, tuple(map(tuple, merged)), e_max + 1, num_pending % world_size)
    first_epoch = merged[0][0] if merged else e_max + 1
    log.info(
        "read position rebased from %d ranks x %d slots to %d x %d: %d samples of epochs in progress pending, then "
        "epoch %d",
        old_w,
        k,
        world_size,
        num_slots,
        new.num_pending,
        e_max + 1,
    )
    return {
        "version": POSITION_VERSION,
        "world_size": world_size,
        "num_slots": num_slots,
        "batches": 0,
        "slots": [[first_epoch, 0] for _ in range(num_slots)],
        "layout": new.to_dict(),
    }


def rebase_global(positions: list[dict], num_samples: int, world_size: int, num_slots: int, layout: dict) -> dict:
    """The global-order position that continues ``positions`` (one per old rank, or one that
    stands for every rank) on ``world_size`` ranks, ``num_slots`` loader slots and the global and
    micro batch of ``layout``: the old ranks consumed whole global steps, so the new layout starts
    where they ended."""
    p0 = positions[0]
    old_w, k = p0["world_size"], p0["num_slots"]
    per_rank = positions if len(positions) == old_w else positions * old_w
    old = GlobalLayout.of(p0, num_samples)
    consumed = [sum(u for _, u in p["slots"]) for p in per_rank]
    per_step = old.global_batch // old_w
    if (
        len(set(consumed)) != 1
        or consumed[0] % per_step
        or any(p["batches"] * old.micro_batch != consumed[0] for p in per_rank)
    ):
        raise DataError(
            f"the read positions of the old ranks (samples consumed per rank: {consumed}) do not end on a global step "
            f"of {old.global_batch}: they cannot be continued on another world size in global order"
        )
    new = GlobalLayout(
        world_size, num_samples, layout["global_batch"], layout["micro_batch"], old.start + sum(consumed)
    )
    log.info(
        "read position (global order) moved from %d ranks x %d slots to %d x %d at global sample %d (step %d)",
        old_w,
        k,
        world_size,
        num_slots,
        new.start,
        sum(consumed) // old.global_batch,
    )
    return {
        "version": POSITION_VERSION,
        "world_size": world_size,
        "num_slots": num_slots,
        "batches": 0,
        "slots": [[new.start // num_samples, 0] for _ in range(num_slots)],
        "layout": new.to_dict(),
    }


# --------------------------------------------------------------------------- epoch order


class _EpochOrder:
    """Positions of one epoch -> (shard, member): shard order seeded by (seed, epoch), then
    a permutation inside each window of ``window`` positions."""

    def __init__(self, sizes: np.ndarray, seed: int, epoch: int, window: int):
        self.seed, self.epoch, self.window = seed, epoch, window
        self.perm = np.random.default_rng([seed, epoch]).permutation(len(sizes))
        self.starts = np.concatenate([[0], np.cumsum(sizes[self.perm])])
        self.total = int(self.starts[-1])
        self._window_perm: tuple[int, np.ndarray] | None = None

    def unshuffle(self, positions: np.ndarray, k: int) -> np.ndarray:
        if self.window <= 1:
            return positions
        if self._window_perm is None or self._window_perm[0] != k:
            n = min(self.window, self.total - k * self.window)
            self._window_perm = (k, np.random.default_rng([self.seed, self.epoch, k, 1]).permutation(n))
        return k * self.window + self._window_perm[1][positions - k * self.window]

    def locate(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        i = np.searchsorted(self.starts, u, side="right") - 1
        return self.perm[i], u - self.starts[i]


# --------------------------------------------------------------------------- stream


class ShardStream(IterableDataset):
    """Endless stream of :class:`Item` for one rank, resumable by seeking.

    Batch it with :func:`collate`. The training loop records each consumed batch with
    :meth:`advance` and saves the position (:meth:`state_dict`) in every checkpoint.

    Args:
        dataset_dir: a directory made by ``ptft data build``, or its URL (``http(s)://``,
            ``s3://``, ... any fsspec URL): shards are read by ranged requests, not copied.
        split: ``train`` or ``valid``.
        rank, world_size: this rank's place among the data-parallel ranks.
        seed: seeds the shard order and the shuffle windows.
        shuffle_buffer: shuffle window in samples (0 or 1: shard order only).
        position: where to resume: a position from :func:`new_position`/:func:`advance`, or
            a list of them (one per rank of the old world). A position from another world
            size or loader-worker count is rebased (see module docs).
        num_loader_workers: DataLoader workers that will read this stream (0 = none). Needed
            only to rebase a position onto another worker count; by default the position's.
        on_error: ``raise`` (default) or ``skip`` bad shards and samples, counting them in
            :attr:`num_skipped_samples` and logging a warning that names each.
        verify: check each shard's size and sha256 when a process first opens it.
        manifest: the dataset's manifest when the caller has read it already.
        global_batch, micro_batch: set both for *elastic determinism* (:class:`GlobalLayout`):
            global step ``s`` (``global_batch`` samples, ``micro_batch`` per micro batch of
            every rank) reads the same samples whatever the world size. The training loop must
            then take exactly ``global_batch / world_size`` samples per step, in order.
    """

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle_buffer: int,
        position: dict | list[dict] | None = None,
        num_loader_workers: int | None = None,
        on_error: str = "raise",
        verify: bool = True,
        manifest: dict | None = None,
        global_batch: int | None = None,
        micro_batch: int | None = None,
    ):
        if (global_batch is None) != (micro_batch is None):
            raise ValueError("pass both global_batch and micro_batch (elastic determinism), or neither")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.dir = files.location(dataset_dir)
        self.manifest = manifest or read_manifest(self.dir)
        if split not in self.manifest["splits"]:
            raise DataError(f"{files.join(self.dir, MANIFEST)} has no split {split!r}")
        self.split = split
        self.shards = self.manifest["splits"][split]["shards"]
        self.sizes = np.array([s["num_samples"] for s in self.shards], dtype=np.int64)
        self.num_samples = int(self.sizes.sum())
        if self.num_samples == 0:
            raise DataError(f"{self.dir}: split {split!r} has no samples")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.seq_len = self.manifest["seq_len"]
        self.rank, self.world_size, self.seed = rank, world_size, seed % 2**63
        self.shuffle_buffer = shuffle_buffer
        self.on_error, self.verify = on_error, verify
        self._skipped = multiprocessing.Value("q", 0)
        if not files.is_remote(self.dir):
            self._check_local_files()
        self.position: dict | None = None
        self._num_slots_hint = None if num_loader_workers is None else max(1, num_loader_workers)
        self._global = None
        if global_batch is not None:
            self._global = GlobalLayout(world_size, self.num_samples, global_batch, micro_batch).to_dict()
        if position is not None:
            self.load_state_dict(position)

    # ---------------------------------------------------------------- state

    def load_state_dict(self, position: dict | list[dict]) -> None:
        """Start the next iteration at ``position`` (rebased when it comes from another
        world size or loader-worker count)."""
        positions = copy.deepcopy(position if isinstance(position, list) else [position])
        for p in positions:
            _check_position(p)
        old_w = positions[0].get("world_size") or (len(positions) if len(positions) > 1 else self.world_size)
        for p in positions:
            p["world_size"] = p.get("world_size") or old_w
        old_k = positions[0]["num_slots"]
        new_k = self._num_slots_hint or old_k
        if len(positions) > 1 and len(positions) != old_w:
            raise DataError(
                f"got {len(positions)} read positions for an old world of {old_w} ranks: pass one per old rank, or one"
            )
        if _untouched(positions[0]) and self._global is not None:
            self.position = self._fresh(new_k)
        elif _is_global(positions[0]) != (self._global is not None):
            was = "global" if _is_global(positions[0]) else "per-rank"
            raise DataError(
                f"the read position was saved in {was} order (data.elastic_determinism="
                f"{str(_is_global(positions[0])).lower()}); resume with the same data.elastic_determinism"
            )
        elif self._global is not None and not (
            old_w == self.world_size and old_k == new_k and _same_batches(positions[0]["layout"], self._global)
        ):
            self.position = rebase_global(positions, self.num_samples, self.world_size, new_k, self._global)
        elif old_w == self.world_size and old_k == new_k:
            self.position = positions[self.rank] if len(positions) > 1 else positions[0]
        else:
            self.position = rebase(positions, self.num_samples, self.world_size, new_k)

    def _fresh(self, num_slots: int) -> dict:
        position = new_position(num_slots, self.world_size)
        position["layout"] = copy.deepcopy(self._global)
        return position

    def state_dict(self) -> dict:
        """The read position: where the stream starts, advanced by every batch recorded
        with :meth:`advance`. Save it in checkpoints; hand it to ``position=`` to resume."""
        if self.position is None:
            self.position = self._fresh(self._num_slots_hint or 1)
        return copy.deepcopy(self.position)

    def advance(self, batch: Batch) -> None:
        """Record one consumed batch: the position moves past its samples."""
        if self.position is None:
            self.position = self._fresh(self._num_slots_hint or 1)
        advance(self.position, batch)

    @property
    def epoch(self) -> int:
        """The latest epoch any loader slot has consumed from (0 before the first batch)."""
        return max(e for e, _ in self.position["slots"]) if self.position is not None else 0

    @property
    def num_skipped_samples(self) -> int:
        """Samples left out because they or their shard were bad (``on_error='skip'``),
        summed over this stream's loader workers since it was created. Workers read ahead
        of training, so it can include samples a few batches ahead."""
        return int(self._skipped.value)

    def samples_per_epoch(self, rank: int | None = None) -> int:
        """Samples a rank reads of one fresh epoch: N // world_size or one more."""
        return _part(self.num_samples, self.world_size, self.rank if rank is None else rank, 0)[1]

    # ---------------------------------------------------------------- checks

    def _check_local_files(self) -> None:
        problems = []
        listed = set()
        for shard in self.shards:
            path = Path(self.dir, shard["file"])
            listed.add(shard["file"])
            problem = size_problem(str(path), shard, path.stat().st_size if path.is_file() else None)
            if problem:
                problems.append(problem)
        strays = sorted(p.name for p in Path(self.dir).glob(f"{self.split}-*.tar") if p.name not in listed)
        if strays:
            problems.append(
                f"{self.dir} holds {self.split} shards that {MANIFEST} does not list "
                f"({', '.join(strays[:5])}{', ...' if len(strays) > 5 else ''}): the manifest is from another build"
            )
        if not problems:
            return
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        if self.on_error == "raise":
            raise DataError(problems[0] + more)
        for p in problems:
            log.warning("%s; data.on_error=skip: its samples will be skipped", p)

    # ---------------------------------------------------------------- reading

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        worker, num_slots = (info.id, info.num_workers) if info else (0, 1)
        position = copy.deepcopy(self.position) if self.position is not None else self._fresh(num_slots)
        position["world_size"] = position.get("world_size") or self.world_size
        if position["num_slots"] != num_slots:
            if not _untouched(position):
                raise DataError(
                    f"the read position has {position['num_slots']} loader slots, this loader has {num_slots}: "
                    "resume with the same "
                    f"data.num_loader_workers, or pass num_loader_workers={num_slots if info else 0} to ShardStream "
                    "to rebase the position"
                )
            position = self._fresh(num_slots)
        if position["world_size"] != self.world_size:
            raise DataError(
                f"the read position is for world size {position['world_size']}, this stream has {self.world_size}: "
                "pass it as position= to rebase it"
            )
        slot = (worker + position["batches"]) % num_slots
        reader = ShardReader(
            self.dir,
            self.split,
            self.shards,
            seq_len=self.seq_len,
            dtype=self.dtype,
            rec_bytes=self.manifest["record_bytes"],
            verify=self.verify,
        )
        consumed = position["slots"][slot][1]
        try:
            if _is_global(position):
                layout = GlobalLayout.of(position, self.num_samples)
                yield from self._global_items(layout, slot, num_slots, consumed, reader)
            else:
                yield from self._slot_items(Layout.of(position, self.num_samples), slot, num_slots, consumed, reader)
        finally:
            reader.close()

    def _slot_items(
        self, layout: Layout, slot: int, num_slots: int, consumed: int, reader: ShardReader
    ) -> Iterator[Item]:
        window = self.shuffle_buffer if self.shuffle_buffer > 1 else 0
        chunk = window or READ_CHUNK
        orders: OrderedDict[int, _EpochOrder] = OrderedDict()
        bad: dict[int, ShardError] = {}
        t = consumed * num_slots + slot
        run = [0]  # samples skipped in a row: more than an epoch's worth means all are bad
        while True:
            epoch, a, b, t0 = layout.piece(self.rank, t)
            if epoch not in orders:
                orders[epoch] = _EpochOrder(self.sizes, self.seed, epoch, window)
                while len(orders) > 2:
                    orders.popitem(last=False)
            order = orders[epoch]
            while t < t0 + (b - a):
                o = a + (t - t0)
                k = o // chunk
                positions = np.arange(o, min((k + 1) * chunk, b), num_slots)
                yield from self._read(
                    slot, epoch, t, num_slots, order.locate(order.unshuffle(positions, k)), reader, bad, run
                )
                t += num_slots * len(positions)
                if run[0] > self.num_samples:
                    raise DataError(
                        f"{self.dir}: every sample of split {self.split!r} that this reader reached in the last "
                        f"{run[0]} was bad (data.on_error=skip); fix or rebuild the dataset"
                    )

    def _global_items(
        self, layout: GlobalLayout, slot: int, num_slots: int, consumed: int, reader: ShardReader
    ) -> Iterator[Item]:
        """The slot's samples in global order (:class:`GlobalLayout`), from its ``consumed``-th on."""
        window = self.shuffle_buffer if self.shuffle_buffer > 1 else 0
        chunk = max(layout.micro_batch, READ_CHUNK // num_slots)
        orders: OrderedDict[int, _EpochOrder] = OrderedDict()
        bad: dict[int, ShardError] = {}
        run = [0]
        q = consumed
        while True:
            qs = np.arange(q, q + chunk)
            g = layout.positions(self.rank, slot, num_slots, qs)
            epochs, where = g // self.num_samples, g % self.num_samples
            windows = where // window if window else np.zeros_like(where)
            cuts = np.nonzero((np.diff(epochs) != 0) | (np.diff(windows) != 0))[0] + 1
            for lo, hi in zip(np.r_[0, cuts].tolist(), np.r_[cuts, len(qs)].tolist()):
                epoch = int(epochs[lo])
                if epoch not in orders:
                    orders[epoch] = _EpochOrder(self.sizes, self.seed, epoch, window)
                    while len(orders) > 2:
                        orders.popitem(last=False)
                order = orders[epoch]
                located = order.locate(order.unshuffle(where[lo:hi], int(windows[lo])))
                yield from self._read(slot, epoch, int(qs[lo]) * num_slots + slot, num_slots, located, reader, bad, run)
                if run[0] > self.num_samples:
                    raise DataError(
                        f"{self.dir}: every sample of split {self.split!r} that this reader reached in the last "
                        f"{run[0]} was bad (data.on_error=skip); fix or rebuild the dataset"
                    )
            q += chunk

    def _read(
        self,
        slot: int,
        epoch: int,
        t_first: int,
        step: int,
        located: tuple[np.ndarray, np.ndarray],
        reader: ShardReader,
        bad: dict,
        run: list[int],
    ) -> Iterator:
        """Read the samples at the located (shard, member) places and yield them in the
        given order; bad ones raise, or are skipped and counted."""
        shard_ids, members = located
        items: list = [None] * len(shard_ids)
        for s in np.unique(shard_ids):
            s = int(s)
            where = np.nonzero(shard_ids == s)[0]
            order = np.argsort(members[where], kind="stable")
            where = where[order]
            try:
                if s in bad:
                    raise bad[s]
                got = reader.read(s, members[where])
            except ShardError as e:
                if self.on_error == "raise":
                    raise
                if s not in bad:
                    log.warning("skipping bad shard (data.on_error=skip): %s", e)
                    bad[s] = e
                got = [None] * len(where)
            for i, item in zip(where.tolist(), got):
                items[i] = item
        skipped = 0
        for i, item in enumerate(items):
            if item is None or isinstance(item, SampleError):
                if item is not None:
                    if self.on_error == "raise":
                        raise item
                    log.warning("skipping bad sample (data.on_error=skip): %s", item)
                skipped += 1
                run[0] += 1
                continue
            key, ids = item
            run[0] = 0
            yield Item(slot, epoch, key, ids, t_first + i * step)
        if skipped:
            with self._skipped.get_lock():
                self._skipped.value += skipped


def read_all(
    dataset_dir: str | Path, split: str, limit: int | None = None, *, verify: bool = True, manifest: dict | None = None
) -> tuple[list[str], np.ndarray]:
    """Keys and ids of a split in shard order (the held-out set for evaluation)."""
    loc = files.location(dataset_dir)
    manifest = manifest or read_manifest(loc)
    shards = manifest["splits"][split]["shards"]
    reader = ShardReader(
        loc,
        split,
        shards,
        seq_len=manifest["seq_len"],
        dtype=np.dtype(manifest["dtype"]),
        rec_bytes=manifest["record_bytes"],
        verify=verify,
    )
    keys: list[str] = []
    rows: list[np.ndarray] = []
    try:
        for s, shard in enumerate(shards):
            for start in range(0, shard["num_samples"], READ_CHUNK):
                members = np.arange(start, min(start + READ_CHUNK, shard["num_samples"]))
                for item in reader.read(s, members):
                    if isinstance(item, SampleError):
                        raise item
                    keys.append(item[0])
                    rows.append(item[1])
                    if limit is not None and len(rows) >= limit:
                        return keys, np.stack(rows)
    finally:
        reader.close()
    return keys, np.stack(rows)


def iter_shard(url: str, dtype: np.dtype, seq_len: int) -> Iterator[tuple[str, np.ndarray]]:
    """(key, token ids) of every sample in one tar shard, in order, read with WebDataset's
    own tar iterator: a check that shards stay plain WebDataset shards."""
    import webdataset as wds

    try:
        for sample in wds.tariterators.tarfile_samples([{"url": url}]):
            key = sample.get("__key__", "?")
            if "ids" not in sample:
                raise DataError(
                    f"shard {url}: sample {key!r} has no 'ids' field (fields: "
                    f"{sorted(k for k in sample if not k.startswith('__'))})"
                )
            ids = np.frombuffer(sample["ids"], dtype=dtype)
            if ids.size != seq_len:
                raise DataError(
                    f"shard {url}: sample {key!r} has {ids.size} tokens, the manifest says seq_len={seq_len}"
                )
            yield key, ids
    except DataError:
        raise
    except Exception as e:  # tarfile and I/O errors: name the shard
        raise DataError(f"shard {url}: cannot be read ({type(e).__name__}: {e})") from e
