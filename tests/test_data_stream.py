"""The reader: exactly once per epoch on any (world size, loader workers), resume by seeking,
resume on another world size, and shards streamed over HTTP."""

from __future__ import annotations

import collections
import functools
import http.server
import json
import math
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_helpers import UNEVEN_SIZES, index_of, write_dataset
from torch.utils.data import DataLoader

from ptft_dist.data.mlm import mask_tokens
from ptft_dist.data.shards import record_bytes
from ptft_dist.data.stream import Layout, ShardStream, advance, collate, new_position

N = sum(UNEVEN_SIZES)
BATCH = 4


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("uneven") / "ds")


def _loader(dataset, rank, world_size, num_workers, *, position=None, seed=7, shuffle=5, **kw):
    stream = ShardStream(
        dataset, "train", rank=rank, world_size=world_size, seed=seed, shuffle_buffer=shuffle, position=position, **kw
    )
    return stream, DataLoader(stream, batch_size=BATCH, num_workers=num_workers, collate_fn=collate)


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _check_ids(batch):
    keys, ids = batch.keys, batch.input_ids
    for key, row in zip(keys, ids):
        assert row[0].item() == index_of(key) % 60000, "a sample came with another sample's ids"


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_every_sample_exactly_once_per_epoch(uneven, world_size, num_workers):
    """A ledger of sample keys over all (rank, loader worker): epoch 0 holds every key once,
    each rank reads N // W or one more of it, and every rank gets the same number of batches
    (the stream goes on into epoch 1 instead of running dry)."""
    per_rank = math.ceil(N / world_size)
    num_batches = math.ceil(per_rank / BATCH) + 2 * max(1, num_workers) + 1
    ledger = collections.defaultdict(collections.Counter)
    for rank in range(world_size):
        _, loader = _loader(uneven, rank, world_size, num_workers)
        batches = _take(loader, num_batches)
        assert len(batches) == num_batches
        epoch0 = 0
        for batch in batches:
            _check_ids(batch)
            for e, key in zip(batch[1], batch[2]):
                ledger[int(e)][key] += 1
                epoch0 += e == 0
        assert epoch0 in (N // world_size, N // world_size + 1)
    assert sorted(ledger[0]) == [f"train-{i:09d}" for i in range(N)]
    assert set(ledger[0].values()) == {1}
    assert all(set(ledger[e].values()) == {1} for e in ledger), "later epochs must not repeat a sample either"


def test_layout_is_balanced_and_partitions_each_epoch():
    for num_samples, world_size in [(62, 3), (7, 4), (3, 5), (100, 7)]:
        layout = Layout(world_size, num_samples)
        for j in range(6):
            covered = sorted(
                i for r in range(world_size) for i in range(*[(s, s + n) for s, n in [layout.fresh_range(r, j)]][0])
            )
            assert covered == list(range(num_samples))
            counts = [layout.fresh_count(r, j + 1) for r in range(world_size)]
            assert max(counts) - min(counts) <= 1, "no rank drifts more than one sample ahead"
            assert sum(counts) == num_samples * (j + 1)


def test_order_is_a_pure_function_of_seed_epoch_and_world(uneven):
    def keys(seed, rank=0, world_size=2, num_workers=0):
        _, loader = _loader(uneven, rank, world_size, num_workers, seed=seed)
        return [k for b in _take(loader, 20) for k in b[2]]

    first = keys(1)
    assert keys(1) == first
    assert keys(2) != first
    assert keys(1, rank=1) != first
    single = keys(1, world_size=1)  # 80 samples: epoch 0, then the start of epoch 1
    assert sorted(single[:N]) == sorted(set(single[:N])) and single[N:] != single[: len(single) - N], (
        "each epoch has its own order"
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_equals_the_uninterrupted_order(uneven, num_workers):
    _, loader = _loader(uneven, 1, 2, num_workers)
    total = 3 * math.ceil(N / 2 / BATCH) + 2  # crosses two epoch boundaries
    reference = _take(loader, total)
    assert max(int(e) for b in reference for e in b[1]) >= 2
    for stop in (1, 4, total // 2, total - 3):
        position = new_position(max(1, num_workers), world_size=2)
        for batch in reference[:stop]:
            advance(position, batch)
        position = json.loads(json.dumps(position))  # as saved in a checkpoint
        _, resumed = _loader(uneven, 1, 2, num_workers, position=position)
        for expected, got in zip(reference[stop:], _take(resumed, total - stop)):
            assert got[2] == expected[2] and got[0] == expected[0]
            assert torch.equal(got[3], expected[3])


def test_stream_state_dict_round_trip(uneven):
    stream, loader = _loader(uneven, 0, 1, 0)
    reference = _take(loader, 12)
    stream2, loader2 = _loader(uneven, 0, 1, 0)
    it = iter(loader2)
    for _ in range(5):
        stream2.advance(next(it))
    state = stream2.state_dict()
    stream3 = ShardStream(uneven, "train", rank=0, world_size=1, seed=7, shuffle_buffer=5)
    stream3.load_state_dict(state)
    resumed = _take(DataLoader(stream3, batch_size=BATCH, collate_fn=collate), 7)
    assert [b[2] for b in resumed] == [b[2] for b in reference[5:]]


def test_resume_seeks_without_reading_consumed_samples(uneven, tmp_path):
    """Resume at ~90% of an epoch on a copy whose consumed samples are zeroed out: had the
    reader parsed any of them (or opened a shard it no longer needs) it would fail."""
    import shutil

    per_epoch = N  # one rank
    _, loader = _loader(uneven, 0, 1, 0, shuffle=8)
    batches = _take(loader, math.ceil(per_epoch / BATCH))
    stop = int(0.9 * len(batches))
    consumed = {k for b in batches[:stop] for k in b[2]}
    remaining = [k for b in batches[stop:] for k, e in zip(b[2], b[1]) if e == 0]
    assert consumed.isdisjoint(remaining) and len(consumed) + len(remaining) == N
    copy = tmp_path / "zeroed"
    shutil.copytree(uneven, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    rec = record_bytes(16, 2)
    for shard in manifest["splits"]["train"]["shards"]:
        data = bytearray((copy / shard["file"]).read_bytes())
        for m in range(shard["num_samples"]):
            if f"train-{shard['first_index'] + m:09d}" in consumed:
                data[m * rec : (m + 1) * rec] = bytes(rec)
        (copy / shard["file"]).write_bytes(bytes(data))
    position = new_position(1)
    for batch in batches[:stop]:
        advance(position, batch)
    resumed, _ = _loader(copy, 0, 1, 0, shuffle=8, position=position, verify=False)
    it = iter(resumed)  # item by item: the next epoch may need the zeroed samples again
    assert [next(it)[2] for _ in remaining] == remaining


def _run(dataset, world_size, num_workers, num_batches, position=None, **kw):
    """Each rank takes num_batches batches (lockstep, as training does); returns the items
    and every rank's position afterwards."""
    items, positions = [], []
    kw.setdefault("num_loader_workers", num_workers)
    for rank in range(world_size):
        stream, loader = _loader(dataset, rank, world_size, num_workers, position=position, **kw)
        pos = stream.state_dict()
        for batch in _take(loader, num_batches):
            advance(pos, batch)
            items += list(zip(batch.epochs, batch.keys, batch.indices))
        positions.append(json.loads(json.dumps(pos)))
    return items, positions


@pytest.mark.parametrize("new_world,new_workers,single", [(3, 1, False), (1, 0, False), (3, 2, True)])
def test_resume_on_another_world_size_loses_and_repeats_nothing(uneven, new_world, new_workers, single):
    before, positions = _run(uneven, 2, 2, 3)  # 2 ranks x 2 loader workers, 3 batches each: mid epoch 0
    assert all(e == 0 for e, _, _ in before)
    resume_from = positions[0] if single else positions
    consumed = len(before)
    need = math.ceil(((N - consumed) / new_world + N / new_world + 2) / BATCH) + 2 * max(1, new_workers)
    after, later = _run(uneven, new_world, new_workers, need, position=resume_from, num_loader_workers=new_workers)
    epoch0 = collections.Counter(k for e, k, _ in before + after if e == 0)
    epoch1 = collections.Counter(k for e, k, _ in after if e == 1)
    assert len(epoch0) == N and set(epoch0.values()) == {1}
    assert len(epoch1) == N and set(epoch1.values()) == {1}
    # in every rank's stream the remaining samples of epoch 0 come before any of epoch 1
    for rank_items in _per_rank(after, new_world, need):
        epochs = [e for e, _, _ in sorted(rank_items, key=lambda item: item[2])]
        assert epochs == sorted(epochs)
    # and a second change of world size continues from there
    again, _ = _run(uneven, 2, 0, math.ceil(N / BATCH) + 2, position=later, num_loader_workers=0)
    epoch1_all = collections.Counter(k for e, k, _ in after + again if e == 1)
    assert set(epoch1_all.values()) == {1} and len(epoch1_all) == N


def _per_rank(items, world_size, num_batches):
    n = len(items) // world_size
    return [items[r * n : (r + 1) * n] for r in range(world_size)]


def test_position_from_an_older_format_is_refused(uneven):
    from ptft_dist.data.errors import DataError

    with pytest.raises(DataError, match="older reader"):
        ShardStream(
            uneven,
            "train",
            rank=0,
            world_size=1,
            seed=0,
            shuffle_buffer=0,
            position={"num_slots": 1, "batches": 3, "slots": [[0, 24]]},
        )


# --------------------------------------------------------------------------- HTTP


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that honours single byte ranges, as object stores do."""

    def log_message(self, *args):
        pass

    def send_head(self):
        rng = self.headers.get("Range")
        path = self.translate_path(self.path)
        if not rng or not os.path.isfile(path):
            return super().send_head()
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
        size = os.path.getsize(path)
        start, end = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
        if start >= size:
            self.send_error(416)
            return None
        fh = open(path, "rb")
        fh.seek(start)
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return _Limited(fh, end - start + 1)


class _Limited:
    def __init__(self, fh, n):
        self.fh, self.n = fh, n

    def read(self, size=-1):
        size = self.n if size < 0 else min(size, self.n)
        data = self.fh.read(size)
        self.n -= len(data)
        return data

    def close(self):
        self.fh.close()


@pytest.fixture()
def http_root(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 from a thread; yields (root dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_RangeHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_shards_stream_resume_and_train(tiny_dataset, http_root):
    import shutil

    from ptft_dist import models
    from ptft_dist.config import ModelConfig
    from ptft_dist.data.build import load_tokenizer, read_manifest, tokenizer_sha256
    from ptft_dist.data.stream import read_all

    root, base = http_root
    shutil.copytree(tiny_dataset, root / "tiny")
    url = f"{base}/tiny"
    manifest = read_manifest(url)
    assert manifest == read_manifest(tiny_dataset)
    # the recipe builds Path(dataset_dir, "tokenizer"): a URL must survive it
    assert tokenizer_sha256(Path(url, "tokenizer")) == manifest["tokenizer"]["sha256"]
    tok = load_tokenizer(Path(url, "tokenizer"))
    assert tok.mask_token_id == manifest["tokenizer"]["special_ids"]["mask"]

    local = _take(_loader(tiny_dataset, 1, 2, 0, shuffle=64)[1], 12)
    remote = _take(_loader(url, 1, 2, 0, shuffle=64)[1], 12)
    assert [b[2] for b in remote] == [b[2] for b in local]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(local, remote))
    position = new_position(1, world_size=2)
    for batch in remote[:7]:
        advance(position, batch)
    resumed = _take(_loader(url, 1, 2, 0, shuffle=64, position=position)[1], 5)
    assert [b[2] for b in resumed] == [b[2] for b in local[7:]]
    assert read_all(url, "valid", limit=10)[0] == read_all(tiny_dataset, "valid", limit=10)[0]

    # train a tiny masked LM from the HTTP stream, two loader workers reading by ranged requests
    special = manifest["tokenizer"]["special_ids"]
    cfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    model = models.build_mlm(cfg, models.mlm_config(cfg, vocab_size=manifest["vocab_size"], special_ids=special))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    _, loader = _loader(url, 0, 1, 2, shuffle=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: spinning threads only slow it on a shared machine
    try:
        for step, ids in zip(range(40), (b.input_ids for b in loader)):
            inputs, labels = mask_tokens(
                ids,
                mlm_probability=0.3,
                mask_id=special["mask"],
                vocab_size=manifest["vocab_size"],
                special_ids=[special["cls"], special["sep"], special["pad"]],
                generator=torch.Generator().manual_seed(step),
            )
            loss = model(input_ids=inputs, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses


def test_http_missing_and_corrupt_shards_are_named(uneven, http_root):
    import shutil

    from ptft_dist.data.errors import DataError

    root, base = http_root
    shutil.copytree(uneven, root / "ds")
    manifest = json.loads((root / "ds" / "manifest.json").read_text())
    victim = manifest["splits"]["train"]["shards"][0]["file"]
    data = (root / "ds" / victim).read_bytes()
    (root / "ds" / victim).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"{victim} is truncated"):
        _take(_loader(f"{base}/ds", 0, 1, 0)[1], 30)
    (root / "ds" / victim).unlink()
    with pytest.raises(DataError, match=rf"shard {re.escape(base)}/ds/{victim} listed in manifest.json is missing"):
        _take(_loader(f"{base}/ds", 0, 1, 0)[1], 30)
    stream, loader = _loader(f"{base}/ds", 0, 1, 0, on_error="skip")
    keys = [k for b in _take(loader, math.ceil(N / BATCH) + 2) for k, e in zip(b[2], b[1]) if e == 0]
    assert len(keys) == N - UNEVEN_SIZES[0] == len(set(keys))
    assert stream.num_skipped_samples >= UNEVEN_SIZES[0]


# --------------------------------------------------------------------------- elastic determinism

GLOBAL = 24  # samples per global step: micro batch BATCH=4 x accumulation x world size 1, 2, 3 or 6


def _global_steps(dataset, world_size, num_workers, steps, *, position=None):
    """Per global step, the sorted (epoch, sample key) pairs all ranks read (each rank takes GLOBAL / W samples,
    i.e. GLOBAL / (W x BATCH) micro batches, per step), and each rank's position after them."""
    per_step = GLOBAL // (world_size * BATCH)
    keys = [[] for _ in range(steps)]
    positions = []
    for rank in range(world_size):
        stream, loader = _loader(
            dataset,
            rank,
            world_size,
            num_workers,
            position=position,
            num_loader_workers=num_workers,
            global_batch=GLOBAL,
            micro_batch=BATCH,
        )
        for i, batch in enumerate(_take(loader, steps * per_step)):
            _check_ids(batch)
            keys[i // per_step] += [(int(e), k) for e, k in zip(batch.epochs, batch.keys)]
            stream.advance(batch)
        positions.append(json.loads(json.dumps(stream.state_dict())))
    return [sorted(k) for k in keys], positions


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (3, 2), (6, 1)])
def test_elastic_determinism_gives_each_step_the_same_samples_at_any_world_size(uneven, world_size, num_workers):
    """Global order: step t trains on the same multiset of samples whatever the world size and
    loader workers, and every sample comes once per epoch (steps run on across epochs)."""
    steps = 2 * N // GLOBAL + 2
    reference, _ = _global_steps(uneven, 1, 0, steps)
    got, _ = _global_steps(uneven, world_size, num_workers, steps)
    assert got == reference
    by_epoch = collections.defaultdict(list)
    for step in reference:
        for e, k in step:
            by_epoch[e].append(k)
    every = [f"train-{i:09d}" for i in range(N)]
    assert sorted(by_epoch[0]) == every and sorted(by_epoch[1]) == every, "every sample once per epoch"


def test_elastic_determinism_across_world_size_changes(uneven):
    """2 ranks for 2 steps, then 3 ranks (and other loader workers) for 3, then 1: the steps are
    those of a fixed single-rank run, and a position saved in one order is refused in the other."""
    from ptft_dist.data.errors import DataError

    reference, _ = _global_steps(uneven, 1, 0, 2 + 3 + 4)
    first, positions = _global_steps(uneven, 2, 2, 2)
    second, positions = _global_steps(uneven, 3, 0, 3, position=positions)
    third, _ = _global_steps(uneven, 1, 1, 4, position=positions[0])  # a single position stands for all ranks
    assert first + second + third == reference
    with pytest.raises(DataError, match="elastic_determinism"):
        ShardStream(uneven, "train", rank=0, world_size=1, seed=7, shuffle_buffer=5, position=positions[0])
    with pytest.raises(DataError, match="do not end on a global step"):
        stream, loader = _loader(uneven, 0, 2, 0, global_batch=GLOBAL, micro_batch=BATCH)
        stream.advance(next(iter(loader)))  # one micro batch of three: mid step
        _loader(uneven, 0, 3, 0, position=[stream.state_dict()] * 2, global_batch=GLOBAL, micro_batch=BATCH)
