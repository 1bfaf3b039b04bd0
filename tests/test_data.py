"""Building datasets: formats, compression, mixing weights, shard sizes, packing, the
manifest, the tokenizer hash; and masking."""

import csv
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ptft_dist.config import DataBuildConfig, TokenizerConfig
from ptft_dist.data.build import DataError, build, check_tokenizer, is_validation, read_manifest
from ptft_dist.data.ingest import _keeps_extra_copy
from ptft_dist.data.mlm import mask_tokens
from ptft_dist.data.shards import record_bytes
from ptft_dist.data.stream import iter_shard, read_all

WORDS = "the city river north old house music war game film song team first second school station park".split()


def _documents(n: int, seed: int = 0, tag: str = "") -> list[str]:
    rng = np.random.default_rng(seed)
    return [
        " ".join([tag] * bool(tag) + [WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(5, 40))])
        for i in range(n)
    ]


def _write(path: Path, docs: list[str]) -> Path:
    """The same documents in the format (and compression) that the file name says."""
    name = path.name
    opener = open
    if name.endswith(".gz"):
        opener, name = gzip.open, name[:-3]
    elif name.endswith(".zst"):
        import zstandard

        opener, name = zstandard.open, name[:-4]
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), path, row_group_size=100)
        return path
    with opener(path, "wt", encoding="utf-8", newline="") as fh:
        if name.endswith(".txt"):
            fh.write("\n".join(docs) + "\n")
        elif name.endswith(".jsonl"):
            fh.write("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
        else:
            writer = csv.writer(fh, delimiter="\t" if name.endswith(".tsv") else ",")
            writer.writerow(["id", "body"])
            writer.writerows([i, d] for i, d in enumerate(docs))
    return path


def test_round_trip_manifest_counts_equal_samples_read(tiny_dataset):
    m = read_manifest(tiny_dataset)
    assert m["seq_len"] == 64 and m["vocab_size"] == 1000 and m["dtype"] == "<u2"
    cls_id = m["tokenizer"]["special_ids"]["cls"]
    for split in ("train", "valid"):
        total = 0
        for shard in m["splits"][split]["shards"]:
            path = tiny_dataset / shard["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            assert path.stat().st_size == shard["num_bytes"]
            samples = list(iter_shard(str(path), np.dtype(m["dtype"]), m["seq_len"]))
            assert len(samples) == shard["num_samples"]
            assert [k for k, _ in samples] == [f"{split}-{shard['first_index'] + i:09d}" for i in range(len(samples))]
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


def test_packing_joins_documents_with_sep_and_no_padding(tmp_path, tiny_dataset):
    from transformers import AutoTokenizer

    docs = _documents(300, seed=5)
    src = _write(tmp_path / "c.txt", docs)
    cfg = DataBuildConfig(
        inputs=[str(src)],
        seq_len=24,
        samples_per_shard=30,
        validation_fraction=0.1,
        tokenizer=TokenizerConfig(path=str(tiny_dataset / "tokenizer")),
    )
    m = build(cfg, tmp_path / "out", progress=False)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    ids = m["tokenizer"]["special_ids"]
    expected = [
        t
        for d in docs
        if not is_validation(d, 0.1)
        for t in tok(d, add_special_tokens=False)["input_ids"] + [ids["sep"]]
    ]
    _, samples = read_all(tmp_path / "out", "train")
    assert (samples[:, 0] == ids["cls"]).all() and not (samples == ids["pad"]).any()
    body = samples[:, 1:].reshape(-1).tolist()
    assert body == expected[: len(body)] and len(expected) - len(body) < 23  # only the tail is dropped


def test_validation_split_is_by_stable_hash():
    docs = [f"document number {i}" for i in range(4000)]
    picked = [d for d in docs if is_validation(d, 0.05)]
    assert 120 < len(picked) < 280
    assert picked == [d for d in reversed(docs) if is_validation(d, 0.05)][::-1]


def test_masking_statistics():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 128))
    ids[:, 0] = 2  # [CLS]
    ids[:, -1] = 3  # [SEP]
    inputs, labels = mask_tokens(
        ids, mlm_probability=0.15, mask_id=4, vocab_size=1000, special_ids=[2, 3, 0], generator=gen
    )
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
    again, _ = mask_tokens(
        ids,
        mlm_probability=0.15,
        mask_id=4,
        vocab_size=1000,
        special_ids=[2, 3, 0],
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(again, inputs)


def test_jsonl_and_gz_inputs(tmp_path):
    lines = [
        json.dumps({"body": f"sentence {i} about the {w} of things"})
        for i, w in enumerate(["shape", "colour", "size"] * 200)
    ]
    src = tmp_path / "corpus.jsonl.gz"
    with gzip.open(src, "wt") as fh:
        fh.write("\n".join(lines))
    cfg = DataBuildConfig(
        inputs=[str(tmp_path / "*.jsonl.gz")],
        text_field="body",
        seq_len=16,
        samples_per_shard=50,
        validation_fraction=0.1,
        tokenizer=TokenizerConfig(vocab_size=200, kind="bpe"),
    )
    m = build(cfg, tmp_path / "out", progress=False)
    assert m["splits"]["train"]["num_samples"] > 0


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(DataError, match="matches no file"):
        build(DataBuildConfig(inputs=[str(tmp_path / "*.txt")]), tmp_path / "o1", progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"other": 1}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no field 'text'"):
        build(
            DataBuildConfig(inputs=[str(bad)], tokenizer=TokenizerConfig(vocab_size=100)),
            tmp_path / "o2",
            progress=False,
        )
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short\n")
    with pytest.raises(DataError, match="no complete sample"):
        build(
            DataBuildConfig(inputs=[str(tiny)], tokenizer=TokenizerConfig(vocab_size=100)),
            tmp_path / "o3",
            progress=False,
        )


def test_build_refuses_to_overwrite(tiny_dataset):
    with pytest.raises(DataError, match="already holds a dataset"):
        build(DataBuildConfig(max_documents=10), tiny_dataset, progress=False)


@pytest.mark.parametrize("name", ["c.jsonl", "c.csv.gz", "c.tsv.zst", "c.parquet", "c.txt.zst", "c.jsonl.gz"])
def test_every_format_gives_the_same_shards(tmp_path, tiny_dataset, name):
    """The same documents as .txt and as another format/compression: byte-identical shards."""
    docs = _documents(600) + ['a "quoted", comma\tand tab field']
    tok = str(tiny_dataset / "tokenizer")

    def shards(src: Path, out: str) -> list[str]:
        cfg = DataBuildConfig(
            inputs=[str(src)],
            text_field="body",
            seq_len=32,
            samples_per_shard=40,
            validation_fraction=0.1,
            tokenizer=TokenizerConfig(path=tok),
        )
        m = build(cfg, tmp_path / out, progress=False)
        return [sh["sha256"] for sh in m["splits"]["train"]["shards"] + m["splits"]["valid"]["shards"]]

    reference = shards(_write(tmp_path / "c.txt", docs), "ref")
    assert len(reference) > 3
    assert shards(_write(tmp_path / name, docs), "other") == reference


def test_tokenizer_processes_do_not_change_the_shards(tmp_path, tiny_dataset):
    src = _write(tmp_path / "c.txt", _documents(3000))  # 3 batches: the last two go to the processes
    out = {}
    for num_proc in (0, 2):
        cfg = DataBuildConfig(
            inputs=[str(src)],
            seq_len=32,
            samples_per_shard=200,
            tokenizer=TokenizerConfig(path=str(tiny_dataset / "tokenizer")),
            num_proc=num_proc,
        )
        out[num_proc] = [
            sh["sha256"] for sh in build(cfg, tmp_path / f"p{num_proc}", progress=False)["splits"]["train"]["shards"]
        ]
    assert out[0] == out[2]


def test_mixing_weights_repeat_and_subsample_sources(tmp_path, tiny_dataset):
    a = _write(tmp_path / "a.txt", _documents(400, seed=1, tag="alpha"))
    b = _write(tmp_path / "b.jsonl", _documents(400, seed=2, tag="beta"))
    cfg = DataBuildConfig(
        inputs=[str(a), str(b)],
        input_weights=[2, 0.5],
        text_field="body",
        seq_len=32,
        samples_per_shard=200,
        validation_fraction=0.1,
        tokenizer=TokenizerConfig(path=str(tiny_dataset / "tokenizer")),
    )
    m = build(cfg, tmp_path / "mix", progress=False)
    src_a, src_b = m["sources"]
    docs_a = [d for d in _documents(400, seed=1, tag="alpha") if not is_validation(d, 0.1)]
    docs_b = [d for d in _documents(400, seed=2, tag="beta") if not is_validation(d, 0.1)]
    assert src_a["weight"] == 2.0 and src_a["num_documents"]["train"] == 2 * len(docs_a)
    assert src_b["num_documents"]["train"] == sum(_keeps_extra_copy(d, 0.5, 1) for d in docs_b)
    assert 0.35 * len(docs_b) < src_b["num_documents"]["train"] < 0.65 * len(docs_b)
    # held-out documents are written once, whatever the weight
    assert src_a["num_documents"]["valid"] == 400 - len(docs_a)
    # the sources are interleaved: the first and the last shards hold both
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp_path / "mix" / "tokenizer"))
    shards = m["splits"]["train"]["shards"]
    for shard in (shards[0], shards[-1]):
        text = " ".join(
            tok.decode(ids.tolist())
            for _, ids in iter_shard(str(tmp_path / "mix" / shard["file"]), np.dtype(m["dtype"]), 32)
        )
        assert "alpha" in text and "beta" in text


def test_shard_size_by_target_megabytes(tmp_path, tiny_dataset):
    src = _write(tmp_path / "c.txt", _documents(2000))
    cfg = DataBuildConfig(
        inputs=[str(src)],
        seq_len=64,
        shard_size_mb=0.1,
        tokenizer=TokenizerConfig(path=str(tiny_dataset / "tokenizer")),
    )
    m = build(cfg, tmp_path / "out", progress=False)
    rec = record_bytes(64, 2)
    assert m["record_bytes"] == rec and m["build"]["samples_per_shard"] == 100_000 // rec
    shards = m["splits"]["train"]["shards"]
    assert len(shards) > 2
    for shard in shards:
        size = (tmp_path / "out" / shard["file"]).stat().st_size
        assert size == shard["num_bytes"] <= 100_000 + 10_240  # target + the tar end record
    assert all(sh["num_samples"] == 100_000 // rec for sh in shards[:-1])


def test_shards_are_webdataset_readable_and_match_the_reader(tiny_dataset):
    import webdataset as wds

    m = read_manifest(tiny_dataset)
    keys, ids = read_all(tiny_dataset, "valid")
    urls = [str(tiny_dataset / sh["file"]) for sh in m["splits"]["valid"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node))
    assert [s["__key__"] for s in samples] == keys
    assert all(np.array_equal(np.frombuffer(s["ids"], "<u2"), row) for s, row in zip(samples, ids))


def test_tokenizer_hash_ties_data_to_model(tiny_dataset, tmp_path):
    import shutil

    check_tokenizer(tiny_dataset, tiny_dataset / "tokenizer")  # the same tokenizer passes
    other = tmp_path / "model"
    shutil.copytree(tiny_dataset / "tokenizer", other)
    check_tokenizer(tiny_dataset, tmp_path)  # a directory without tokenizer files is not judged
    spec = json.loads((other / "tokenizer.json").read_text())
    spec["model"]["vocab"]["zebra"] = len(spec["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"tokenizer of the model .*model.* is not the one .* was built with"):
        check_tokenizer(tiny_dataset, other)


def test_bad_input_files_are_named(tmp_path):
    cases = {
        "no_col.csv": ("id,text\n1,hello\n", r"no_col\.csv: no column 'body' in the header \(columns: id, text\)"),
        "short_row.tsv": ("id\tbody\n1\n", r"short_row\.tsv:2: the row has 1 fields"),
        "notes.md": ("hello\n", r"notes\.md: unsupported type"),
        "bad.jsonl": ('{"body": 3}\n', r"bad\.jsonl:1: field 'body' is int, not text"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        with pytest.raises(DataError, match=message):
            build(
                DataBuildConfig(
                    inputs=[str(tmp_path / name)], text_field="body", tokenizer=TokenizerConfig(vocab_size=100)
                ),
                tmp_path / f"o_{name}",
                progress=False,
            )
    whole = gzip.compress(("some words here\n" * 5000).encode())
    (tmp_path / "cut.txt.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.txt\.gz: cannot be read to the end"):
        build(
            DataBuildConfig(inputs=[str(tmp_path / "cut.txt.gz")], tokenizer=TokenizerConfig(vocab_size=100)),
            tmp_path / "o_cut",
            progress=False,
        )
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DataError, match=r"ints\.parquet: column 'body' is int64, not text"):
        build(
            DataBuildConfig(
                inputs=[str(tmp_path / "ints.parquet")], text_field="body", tokenizer=TokenizerConfig(vocab_size=100)
            ),
            tmp_path / "o_pq",
            progress=False,
        )
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(DataError, match="Parquet is compressed inside the file"):
        build(DataBuildConfig(inputs=[str(tmp_path / "x.parquet.gz")]), tmp_path / "o_pqgz", progress=False)
    with pytest.raises(DataError, match=r"input_weights\[0\] = -1.0"):
        build(
            DataBuildConfig(inputs=[str(tmp_path / "no_col.csv")], input_weights=[-1]), tmp_path / "o_w", progress=False
        )
