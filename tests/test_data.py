import gzip
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ptft_dist.config import DataBuildConfig, TokenizerConfig
from ptft_dist.data.build import DataError, build, is_validation, read_manifest
from ptft_dist.data.stream import ShardStream, advance, iter_shard, mask_tokens, new_position, shards_for


def _keys_of_epoch(dataset, split, rank, world_size, num_workers, epoch=0):
    stream = ShardStream(dataset, split, rank=rank, world_size=world_size, seed=3, shuffle_buffer=16)
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers)
    keys = []
    # every (rank, worker) reads its own shards; stop once every slot moved past the epoch
    done = set()
    for slot, ep, key, _ in loader:
        if ep > epoch:
            done.add(slot)
            if len(done) == max(1, num_workers):
                break
            continue
        keys.append(key)
    return keys


def test_round_trip_manifest_counts_equal_samples_read(tiny_dataset):
    m = read_manifest(tiny_dataset)
    assert m["seq_len"] == 64 and m["vocab_size"] == 1000 and m["dtype"] == "<u2"
    cls_id = m["tokenizer"]["special_ids"]["cls"]
    for split in ("train", "valid"):
        total = 0
        for shard in m["splits"][split]["shards"]:
            path = tiny_dataset / shard["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            samples = list(iter_shard(str(path), np.dtype(m["dtype"]), m["seq_len"]))
            assert len(samples) == shard["num_samples"]
            assert all(ids[0] == cls_id and ids.size == 64 for _, ids in samples)
            total += len(samples)
        assert total == m["splits"][split]["num_samples"]
        assert m["splits"][split]["num_tokens"] == total * 64


def test_packing_keeps_the_text(tiny_dataset):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dataset / "tokenizer"))
    m = read_manifest(tiny_dataset)
    _, ids = next(iter_shard(str(tiny_dataset / m["splits"]["train"]["shards"][0]["file"]), np.dtype("<u2"), 64))
    text = tok.decode(ids.tolist(), skip_special_tokens=True)
    assert len(text.split()) > 20  # real words, not padding


def test_validation_split_is_by_stable_hash():
    docs = [f"document number {i}" for i in range(4000)]
    picked = [d for d in docs if is_validation(d, 0.05)]
    assert 120 < len(picked) < 280
    assert picked == [d for d in reversed(docs) if is_validation(d, 0.05)][::-1]


@pytest.mark.parametrize("world_size,num_workers", [(1, 1), (2, 1), (2, 2), (3, 1)])
def test_shard_assignment_partitions_every_epoch(world_size, num_workers):
    for epoch in range(3):
        seen = []
        for rank in range(world_size):
            for worker in range(num_workers):
                seen += shards_for(11, seed=0, epoch=epoch, rank=rank, world_size=world_size, worker=worker, num_workers=num_workers)
        assert sorted(seen) == list(range(11))
    assert shards_for(11, seed=0, epoch=0, rank=0, world_size=1, worker=0, num_workers=1) != shards_for(11, seed=0, epoch=1, rank=0, world_size=1, worker=0, num_workers=1)


@pytest.mark.parametrize("world_size,num_workers", [(1, 0), (2, 0), (2, 2)])
def test_every_sample_once_per_epoch(tiny_dataset, world_size, num_workers):
    m = read_manifest(tiny_dataset)
    keys = []
    for rank in range(world_size):
        keys += _keys_of_epoch(tiny_dataset, "train", rank, world_size, num_workers)
    assert len(keys) == len(set(keys)) == m["splits"]["train"]["num_samples"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_the_same_order(tiny_dataset, num_workers):
    def batches(position):
        stream = ShardStream(tiny_dataset, "train", rank=0, world_size=1, seed=1, shuffle_buffer=32, position=position)
        loader = DataLoader(stream, batch_size=8, num_workers=num_workers, collate_fn=lambda items: (items[0][0], [i[1] for i in items], [i[2] for i in items]))
        return iter(loader)

    it = batches(None)
    n = read_manifest(tiny_dataset)["splits"]["train"]["num_samples"] // 8 + 12
    reference = [next(it) for _ in range(n)]  # crosses an epoch boundary
    assert max(e for _, eps, _ in reference for e in eps) >= 1
    for stop in (3, n // 2, n - 6):
        position = new_position(max(1, num_workers))
        for slot, epochs, _ in reference[:stop]:
            advance(position, slot, epochs)
        resumed = batches(json.loads(json.dumps(position)))  # survives a JSON round trip
        for expected in reference[stop:]:
            assert next(resumed)[2] == expected[2]


def test_masking_statistics():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 128))
    ids[:, 0] = 2  # [CLS]
    ids[:, -1] = 3  # [SEP]
    inputs, labels = mask_tokens(ids, mlm_probability=0.15, mask_id=4, vocab_size=1000, special_ids=[2, 3, 0], generator=gen)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    rate = chosen.float().mean().item() * 128 / 126
    assert 0.14 < rate < 0.16
    assert torch.equal(labels[chosen], ids[chosen])
    as_mask = (inputs[chosen] == 4).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert 0.78 < as_mask < 0.82
    assert 0.08 < kept < 0.12  # the 10% kept (+ random draws that hit the same id, ~0.1%)
    assert torch.equal(inputs[~chosen], ids[~chosen])
    again, _ = mask_tokens(ids, mlm_probability=0.15, mask_id=4, vocab_size=1000, special_ids=[2, 3, 0], generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, inputs)


def test_jsonl_and_gz_inputs(tmp_path):
    lines = [json.dumps({"body": f"sentence {i} about the {w} of things"}) for i, w in enumerate(["shape", "colour", "size"] * 200)]
    src = tmp_path / "corpus.jsonl.gz"
    with gzip.open(src, "wt") as fh:
        fh.write("\n".join(lines))
    cfg = DataBuildConfig(inputs=[str(tmp_path / "*.jsonl.gz")], text_field="body", seq_len=16, samples_per_shard=50, validation_fraction=0.1, tokenizer=TokenizerConfig(vocab_size=200, kind="bpe"))
    m = build(cfg, tmp_path / "out", progress=False)
    assert m["splits"]["train"]["num_samples"] > 0


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        build(DataBuildConfig(inputs=[str(tmp_path / "*.txt")]), tmp_path / "o1", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no field 'text'"):
        build(DataBuildConfig(inputs=[str(bad)], tokenizer=TokenizerConfig(vocab_size=100)), tmp_path / "o2", progress=False)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short\n")
    with pytest.raises(DataError, match="no complete sample"):
        build(DataBuildConfig(inputs=[str(tiny)], tokenizer=TokenizerConfig(vocab_size=100)), tmp_path / "o3", progress=False)


def test_missing_and_corrupt_shards_are_named(tiny_dataset, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset, copy)
    m = read_manifest(copy)
    victim = copy / m["splits"]["train"]["shards"][1]["file"]
    victim.write_bytes(victim.read_bytes()[:3000])  # truncated tar
    with pytest.raises(DataError, match=victim.name):
        list(iter_shard(str(victim), np.dtype("<u2"), 64))
    victim.unlink()
    with pytest.raises(DataError, match=f"{victim.name}.*missing"):
        ShardStream(copy, "train", rank=0, world_size=1, seed=0, shuffle_buffer=0)
    (copy / "manifest.json").unlink()
    with pytest.raises(DataError, match="manifest.json does not exist"):
        read_manifest(copy)


def test_build_refuses_to_overwrite(tiny_dataset):
    with pytest.raises(DataError, match="already holds a dataset"):
        build(DataBuildConfig(max_documents=10), tiny_dataset, progress=False)
