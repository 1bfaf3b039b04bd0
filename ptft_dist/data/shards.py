"""The shard format: USTAR tar files whose members are fixed-size samples.

Every member is ``<key>.ids`` with exactly ``seq_len`` little-endian token ids, so every
member occupies the same number of bytes (``record_bytes``: a 512-byte header plus the ids
padded to 512). Member ``i`` of a shard therefore starts at byte ``i * record_bytes``: a reader
seeks straight to any sample, locally or with one ranged request on a remote store, which is
what makes resuming free. The files stay plain tar, readable by ``tar`` and WebDataset.

:class:`ShardWriter` writes a split's shards (hashing while writing); :class:`ShardReader`
reads given members of given shards, checking size, sha256 (on first open, optional) and
each member's header against the manifest, with errors that name the shard and sample key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import files
from .errors import DataError

log = logging.getLogger(__name__)

HEADER_BYTES = 512
BLOCK_BYTES = 512
#: tar ends with two zero blocks, then pads to a multiple of 20 blocks (what `tarfile` does)
END_BYTES = 2 * BLOCK_BYTES
TAR_RECORD_BYTES = 20 * BLOCK_BYTES
KEY_DIGITS = 9


def record_bytes(seq_len: int, itemsize: int) -> int:
    """Bytes one sample occupies in a shard: header + ids padded to whole 512-byte blocks."""
    return HEADER_BYTES + -(-seq_len * itemsize // BLOCK_BYTES) * BLOCK_BYTES


def shard_file_bytes(num_samples: int, rec_bytes: int) -> int:
    used = num_samples * rec_bytes + END_BYTES
    return -(-used // TAR_RECORD_BYTES) * TAR_RECORD_BYTES


def sample_key(split: str, index: int, part: str | None = None) -> str:
    """``<split>-<index>``, or ``<split>-<part>-<index>`` for a shard written by one part of a
    build spread over a cluster (its samples are numbered within the part)."""
    return f"{split}-{part}-{index:0{KEY_DIGITS}d}" if part else f"{split}-{index:0{KEY_DIGITS}d}"


def entry_key(split: str, entry: dict, member: int) -> str:
    """The key of member ``member`` of the shard a manifest entry describes: from the entry's
    ``key_prefix`` and ``key_first`` when it has them (a part's shard), else from its place in
    the split (``first_index``)."""
    if "key_prefix" in entry:
        return f"{entry['key_prefix']}{entry['key_first'] + member:0{KEY_DIGITS}d}"
    return sample_key(split, entry.get("first_index", 0) + member)


def _header_template(split: str, data_bytes: int, part: str | None = None) -> tuple[bytes, int]:
    """A ustar header for ``<split>-<digits>.ids`` and the checksum of all but the name."""
    name = sample_key(split, 0, part) + ".ids"
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = data_bytes, 0, 0o644
    header = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    assert len(header) == HEADER_BYTES
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    return bytes(header), sum(header) - sum(name.encode())


@dataclass
class ShardWriter:
    """Writes the samples of one split into shards of ``samples_per_shard`` samples.

    A shard is written to ``<name>.tmp`` and renamed when complete, so a shard file is whole
    or absent. Its sha256 is computed from the bytes as they are written (no second read).

    ``part`` (a build spread over a cluster): the shards are ``<split>-<part>-NNNNNN.tar``, the
    keys ``<split>-<part>-<index in the part>``, each written under a temporary name of its own
    (two attempts of one task never write one file), and each entry says its ``key_prefix``
    and ``key_first``; ``first_index`` is then the part's, the build renumbers it.
    """

    out_dir: Path
    split: str
    seq_len: int
    dtype: np.dtype
    samples_per_shard: int
    shards: list[dict] = field(default_factory=list)
    num_samples: int = 0
    _fh: object = None
    _hash: object = None
    _count: int = 0
    _bytes: int = 0
    part: str | None = None

    def __post_init__(self) -> None:
        self.data_bytes = self.seq_len * self.dtype.itemsize
        self.record_bytes = record_bytes(self.seq_len, self.dtype.itemsize)
        self._template, self._base_sum = _header_template(self.split, self.data_bytes, self.part)
        self._name_len = len(sample_key(self.split, 0, self.part)) + len(".ids")
        self._tmp_suffix = f".{os.getpid()}-{os.urandom(4).hex()}.tmp" if self.part else ".tmp"

    def add(self, samples: np.ndarray) -> None:
        """Append samples (a [n, seq_len] array of token ids) in order."""
        samples = np.ascontiguousarray(samples, dtype=self.dtype)
        start = 0
        while start < len(samples):
            if self._fh is None:
                self._open()
            take = min(len(samples) - start, self.samples_per_shard - self._count)
            self._write(samples[start : start + take])
            start += take
            if self._count == self.samples_per_shard:
                self.close_shard()

    def _open(self) -> None:
        stem = f"{self.split}-{self.part}" if self.part else self.split
        self._name = f"{stem}-{len(self.shards):06d}.tar"
        self._fh = open(self.out_dir / (self._name + self._tmp_suffix), "wb")
        self._hash = hashlib.sha256()
        self._count, self._bytes, self._first = 0, 0, self.num_samples

    def _write(self, rows: np.ndarray) -> None:
        n = len(rows)
        if self.num_samples + n > 10**KEY_DIGITS:
            raise DataError(f"split {self.split!r} has more than {10**KEY_DIGITS} samples: keys would not be unique")
        records = np.zeros((n, self.record_bytes), dtype=np.uint8)
        records[:, HEADER_BYTES : HEADER_BYTES + self.data_bytes] = rows.view(np.uint8).reshape(n, self.data_bytes)
        template = bytearray(self._template)
        for i in range(n):
            name = (sample_key(self.split, self.num_samples + i, self.part) + ".ids").encode()
            template[: self._name_len] = name
            template[148:156] = b"%06o\x00 " % (self._base_sum + sum(name))
            records[i, :HEADER_BYTES] = np.frombuffer(template, dtype=np.uint8)
        buf = records.tobytes()
        self._fh.write(buf)
        self._hash.update(buf)
        self._bytes += len(buf)
        self._count += n
        self.num_samples += n

    def close_shard(self) -> None:
        if self._fh is None:
            return
        end = shard_file_bytes(self._count, self.record_bytes) - self._bytes
        tail = bytes(end)
        self._fh.write(tail)
        self._hash.update(tail)
        self._fh.close()
        self._fh = None
        tmp = self.out_dir / (self._name + self._tmp_suffix)
        os.replace(tmp, self.out_dir / self._name)
        entry = {
            "file": self._name,
            "first_index": self._first,
            "num_samples": self._count,
            "num_tokens": self._count * self.seq_len,
            "num_bytes": self._bytes + end,
            "sha256": self._hash.hexdigest(),
        }
        if self.part:
            entry |= {"key_prefix": f"{self.split}-{self.part}-", "key_first": self._first}
        self.shards.append(entry)


def size_problem(url: str, entry: dict, size: int | None) -> str | None:
    """What is wrong with a shard of ``size`` bytes (None: the file is missing), measured
    against its manifest entry; None when nothing is."""
    if size is None:
        return f"shard {url} listed in manifest.json is missing"
    expected = entry.get("num_bytes")
    if expected is None or size == expected:
        return None
    kind = "truncated" if size < expected else "larger than the manifest says"
    return f"shard {url} is {kind}: {size:,} bytes, manifest.json says {expected:,}"


class ShardError(DataError):
    """A problem with a whole shard (missing, truncated, wrong hash, unreadable)."""


class SampleError(DataError):
    """A problem with one sample of a shard (bad header, missing field)."""


class ShardReader:
    """Reads members of the shards of one split; one per process (file handles are not shared).

    Args:
        base: dataset directory or URL.
        split, shards: the split name and its manifest shard entries.
        seq_len, dtype, rec_bytes: from the manifest.
        verify: check each shard's sha256 the first time this reader opens it (one extra
            sequential read of the shard).
    """

    MAX_OPEN = 8

    def __init__(
        self, base: str, split: str, shards: list[dict], *, seq_len: int, dtype: np.dtype, rec_bytes: int, verify: bool
    ):
        self.base, self.split, self.shards = base, split, shards
        self.seq_len, self.dtype, self.rec_bytes, self.verify = seq_len, dtype, rec_bytes, verify
        self.data_bytes = seq_len * dtype.itemsize
        self._open: OrderedDict[int, object] = OrderedDict()
        self._size_field = _header_template(split, self.data_bytes)[0][124:136]

    def url(self, shard: int) -> str:
        return files.join(self.base, self.shards[shard]["file"])

    def close(self) -> None:
        for fh in self._open.values():
            fh.close()
        self._open.clear()

    def _handle(self, shard: int):
        fh = self._open.get(shard)
        if fh is not None:
            self._open.move_to_end(shard)
            return fh
        entry, url = self.shards[shard], self.url(shard)
        try:
            fh = files.open_binary(url)
        except FileNotFoundError:
            raise ShardError(size_problem(url, entry, None)) from None
        except OSError as e:
            raise ShardError(f"shard {url} cannot be opened ({type(e).__name__}: {e})") from None
        try:
            size = files.size_bytes(fh, url)
            problem = size_problem(url, entry, size) if size is not None else None
            if problem:
                raise ShardError(problem)
            if self.verify and entry.get("sha256"):
                digest = _sha256(fh)
                if digest != entry["sha256"]:
                    raise ShardError(
                        f"shard {url}: sha256 {digest[:16]}... does not match manifest.json "
                        f"({entry['sha256'][:16]}...): the file is corrupt or from another build"
                    )
        except BaseException:
            fh.close()
            raise
        self._open[shard] = fh
        while len(self._open) > self.MAX_OPEN:
            self._open.popitem(last=False)[1].close()
        return fh

    def _read_span(self, shard: int, first: int, count: int) -> bytes:
        fh = self._handle(shard)
        offset, length = first * self.rec_bytes, count * self.rec_bytes
        try:
            if hasattr(fh, "fileno") and not files.is_remote(self.base):
                data = os.pread(fh.fileno(), length, offset)
            else:
                fh.seek(offset)
                data = fh.read(length)
        except OSError as e:
            raise ShardError(
                f"shard {self.url(shard)} cannot be read at byte {offset:,} ({type(e).__name__}: {e})"
            ) from None
        if len(data) != length:
            raise ShardError(
                f"shard {self.url(shard)} is truncated: samples {first}..{first + count - 1} end at byte "
                f"{offset + length:,}, the file ends before"
            )
        return data

    def read(self, shard: int, members: np.ndarray) -> list[tuple[str, np.ndarray] | SampleError]:
        """(key, ids) of the given members (sorted member indices) of one shard; a member
        whose header is wrong comes back as a SampleError. Raises ShardError."""
        entry = self.shards[shard]
        out: list[tuple[str, np.ndarray] | SampleError] = []
        for start, stop in _runs(members, max_gap=32):
            buf = self._read_span(shard, int(start), int(stop - start))
            base = int(start)
            for m in members[(members >= start) & (members < stop)]:
                m = int(m)
                off = (m - base) * self.rec_bytes
                key = entry_key(self.split, entry, m)
                name = buf[off : off + 100]
                if name[: len(key) + 5] != (key + ".ids\x00").encode():
                    out.append(self._bad_name(shard, m, key, name))
                    continue
                if buf[off + 124 : off + 136] != self._size_field:
                    out.append(
                        SampleError(
                            f"shard {self.url(shard)}: sample {key!r}: header size field "
                            f"{buf[off + 124 : off + 136]!r}, expected {self.data_bytes} bytes ({self.seq_len} "
                            f"tokens of {self.dtype.str})"
                        )
                    )
                    continue
                out.append((key, np.frombuffer(buf, dtype=self.dtype, count=self.seq_len, offset=off + HEADER_BYTES)))
        return out

    def _bad_name(self, shard: int, member: int, key: str, raw: bytes) -> SampleError:
        name = raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace")
        url = self.url(shard)
        if name.startswith(key + "."):
            return SampleError(f"shard {url}: sample {key!r} has no 'ids' field (its member is {name!r})")
        if not name or not name.isprintable():
            return SampleError(
                f"shard {url}: member {member} (sample {key!r}) has a corrupt tar header (name field {raw[:16]!r}...)"
            )
        return SampleError(
            f"shard {url}: member {member} is {name!r} where manifest.json expects sample {key!r}: the shard does "
            "not match the manifest"
        )


def _sha256(fh) -> str:
    h = hashlib.sha256()
    fh.seek(0)
    while chunk := fh.read(4 << 20):
        h.update(chunk)
    return h.hexdigest()


def _runs(members: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Sorted member indices -> [start, stop) spans, merging gaps of up to max_gap records."""
    if len(members) == 0:
        return []
    breaks = np.nonzero(np.diff(members) > max_gap + 1)[0]
    starts = np.concatenate([[members[0]], members[breaks + 1]])
    stops = np.concatenate([members[breaks] + 1, [members[-1] + 1]])
    return list(zip(starts.tolist(), stops.tolist()))
