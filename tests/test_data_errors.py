"""Bad shards and manifests: by default a clear error naming the shard (and sample key);
with on_error='skip' the bad samples are left out, counted and named in a warning."""

from __future__ import annotations

import collections
import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from dataset_helpers import UNEVEN_SIZES, write_dataset
from torch.utils.data import DataLoader

from ptft_dist.data.build import read_manifest
from ptft_dist.data.errors import DataError
from ptft_dist.data.shards import record_bytes
from ptft_dist.data.stream import ShardStream, collate, read_all

N = sum(UNEVEN_SIZES)
REC = record_bytes(16, 2)


@pytest.fixture()
def ds(tmp_path) -> Path:
    return write_dataset(tmp_path / "ds")


def _manifest(ds: Path) -> dict:
    return json.loads((ds / "manifest.json").read_text())


def _shard(ds: Path, i: int) -> tuple[Path, dict]:
    entry = _manifest(ds)["splits"]["train"]["shards"][i]
    return ds / entry["file"], entry


def _rehash(ds: Path) -> None:
    """Make the manifest agree with the files' bytes again (a build that wrote bad samples)."""
    import hashlib

    m = _manifest(ds)
    for entry in m["splits"]["train"]["shards"]:
        data = (ds / entry["file"]).read_bytes()
        entry["sha256"], entry["num_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (ds / "manifest.json").write_text(json.dumps(m))


def _epoch0_keys(ds, num_workers=0, **kw):
    stream = ShardStream(ds, "train", rank=0, world_size=1, seed=3, shuffle_buffer=6, **kw)
    loader = DataLoader(stream, batch_size=4, num_workers=num_workers, collate_fn=collate)
    it = iter(loader)
    keys = [k for _ in range(math.ceil(N / 4) + 2) for k, e in zip(*next(it)[2:0:-1]) if e == 0]
    return stream, keys


def _rename_member(path: Path, member: int, new_name: str) -> None:
    """Rewrite one member's tar header name (with a valid checksum)."""
    data = bytearray(path.read_bytes())
    off = member * REC
    header = bytearray(data[off : off + 512])
    header[0:100] = new_name.encode().ljust(100, b"\0")
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    data[off : off + 512] = header
    path.write_bytes(bytes(data))


def test_missing_shard(ds, caplog):
    path, entry = _shard(ds, 2)
    path.unlink()
    with pytest.raises(DataError, match=rf"shard {path} listed in .*manifest.json is missing"):
        ShardStream(ds, "train", rank=0, world_size=1, seed=0, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING):
        stream, keys = _epoch0_keys(ds, on_error="skip")
    assert len(keys) == len(set(keys)) == N - entry["num_samples"]
    assert stream.num_skipped_samples > 0 and stream.num_skipped_samples % entry["num_samples"] == 0
    assert path.name in caplog.text


def test_truncated_shard(ds):
    path, entry = _shard(ds, 4)
    path.write_bytes(path.read_bytes()[: 5 * REC + 100])
    with pytest.raises(
        DataError, match=rf"shard {path} is truncated: 5,220 bytes, manifest.json says {entry['num_bytes']:,}"
    ):
        ShardStream(ds, "train", rank=0, world_size=1, seed=0, shuffle_buffer=0)
    # a manifest without byte sizes (format version 1): the short read names the shard
    m = _manifest(ds)
    for e in m["splits"]["train"]["shards"]:
        del e["num_bytes"]
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=rf"shard {path} is truncated: samples \d+\.\.\d+ end at byte"):
        _epoch0_keys(ds, verify=False)
    stream, keys = _epoch0_keys(ds, on_error="skip", verify=False)
    assert len(keys) == len(set(keys)) == N - entry["num_samples"] + 5  # its 5 whole samples are read


def test_corrupt_tar(ds):
    path, entry = _shard(ds, 1)
    data = bytearray(path.read_bytes())
    data[3 * REC : 3 * REC + 700] = b"\x17" * 700  # garbage over sample 3's header and ids
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {path}: sha256 .* does not match manifest.json"):
        _epoch0_keys(ds)
    key = f"train-{entry['first_index'] + 3:09d}"
    with pytest.raises(DataError, match=rf"shard {path}: member 3 \(sample '{key}'\) has a corrupt tar header"):
        _epoch0_keys(ds, verify=False)
    stream, keys = _epoch0_keys(ds, verify=False, on_error="skip")
    assert key not in keys and len(keys) == len(set(keys)) == N - 1
    assert stream.num_skipped_samples >= 1


def test_sha256_mismatch_in_loader_workers(ds):
    path, _ = _shard(ds, 0)
    data = bytearray(path.read_bytes())
    data[REC + 600] ^= 0xFF  # one flipped bit-pattern in sample 1's token ids
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"shard {path}: sha256 [0-9a-f]{{16}}\.\.\. does not match manifest.json"):
        _epoch0_keys(ds, num_workers=2)
    _, keys = _epoch0_keys(ds, num_workers=2, on_error="skip")
    assert len(keys) == len(set(keys)) == N - UNEVEN_SIZES[0]


def test_sample_with_a_missing_field(ds):
    path, entry = _shard(ds, 1)
    key = f"train-{entry['first_index'] + 7:09d}"
    _rename_member(path, 7, f"{key}.txt")
    _rehash(ds)
    with pytest.raises(
        DataError, match=rf"shard {path}: sample '{key}' has no 'ids' field \(its member is '{key}.txt'\)"
    ):
        _epoch0_keys(ds)
    stream, keys = _epoch0_keys(ds, on_error="skip")
    assert keys and key not in keys and len(set(keys)) == N - 1


def test_manifest_that_does_not_match_the_files(ds, tmp_path):
    # a shard file from elsewhere, with a manifest edited to its size and hash
    a, _ = _shard(ds, 3)
    b, entry_b = _shard(ds, 6)
    shutil.copy(a, b)
    _rehash(ds)
    with pytest.raises(
        DataError,
        match=rf"shard {b}: member 0 is 'train-\d+\.ids' where manifest.json expects sample "
        rf"'train-{entry_b['first_index']:09d}': the shard does not match the manifest",
    ):
        _epoch0_keys(ds)
    # a shard file on disk that the manifest does not list
    fresh = write_dataset(tmp_path / "fresh")
    shutil.copy(a, fresh / "train-000099.tar")
    with pytest.raises(DataError, match=r"holds train shards that manifest.json does not list \(train-000099.tar\)"):
        ShardStream(fresh, "train", rank=0, world_size=1, seed=0, shuffle_buffer=0)
    # counts that do not add up, and no manifest at all
    m = _manifest(fresh)
    m["splits"]["train"]["num_samples"] += 1
    (fresh / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"splits.train.num_samples is 63 but its shards hold 62"):
        read_manifest(fresh)
    (fresh / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match=r"manifest.json: not valid JSON"):
        ShardStream(fresh, "train", rank=0, world_size=1, seed=0, shuffle_buffer=0)
    (fresh / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"manifest.json does not exist"):
        read_all(fresh, "valid")


def test_all_bad_stops_instead_of_spinning(ds):
    for i in range(len(UNEVEN_SIZES)):
        _shard(ds, i)[0].unlink()
    stream = ShardStream(ds, "train", rank=0, world_size=1, seed=0, shuffle_buffer=0, on_error="skip")
    with pytest.raises(DataError, match="every sample of split 'train' that this reader reached .* was bad"):
        next(iter(stream))


def test_bad_held_out_shard_is_named(ds):
    entry = _manifest(ds)["splits"]["valid"]["shards"][0]
    (ds / entry["file"]).write_bytes(b"")
    with pytest.raises(DataError, match=rf"shard {ds / entry['file']} is truncated: 0 bytes"):
        read_all(ds, "valid")


def test_skip_counts_are_exact_over_one_epoch(ds):
    """With one reader and no shuffle, the stream's counter equals the bad samples it met."""
    path, entry = _shard(ds, 5)
    path.unlink()
    stream = ShardStream(ds, "train", rank=0, world_size=1, seed=0, shuffle_buffer=0, on_error="skip")
    seen = collections.Counter()
    for _, e, key, _, _ in stream:
        if e > 0:
            break
        seen[key] += 1
    assert sum(seen.values()) == len(seen) == N - entry["num_samples"]
    assert stream.num_skipped_samples in (entry["num_samples"], 2 * entry["num_samples"])  # + epoch 1's read-ahead
