"""No garbage in silently: binary files named like text, garbage records, empty sources and
undecodable bytes are refused by name, or skipped and counted (data.on_error=skip)."""

from __future__ import annotations

import json
import logging
import random

import pytest

from ptft_dist.config import DataBuildConfig, TokenizerConfig
from ptft_dist.data.build import DataError, build
from ptft_dist.data.ingest import garbage

WORDS = "the river flows past the old mill and the village green where children play".split()


def _good(path, n=300, seed=0):
    rng = random.Random(seed)
    path.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 30))) + "\n" for _ in range(n)))
    return path


def _binary(path, size=40_000, seed=1):
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def _cfg(*inputs, **kw):
    kw.setdefault("tokenizer", TokenizerConfig(vocab_size=120))
    return DataBuildConfig(
        inputs=[str(p) for p in inputs], seq_len=16, samples_per_shard=50, validation_fraction=0.1, **kw
    )


def _samples(m):
    return m["splits"]["train"]["num_samples"], m["splits"]["valid"]["num_samples"]


def test_a_binary_file_named_txt_is_refused_by_name(tmp_path):
    good, bad = _good(tmp_path / "good.txt"), _binary(tmp_path / "photo.txt")
    with pytest.raises(DataError, match=r"photo\.txt: it holds NUL bytes.*not text.*data\.on_error=skip"):
        build(_cfg(good, bad), tmp_path / "o1", progress=False)
    assert not (tmp_path / "o1").exists(), "refused before anything was written"


def test_skip_leaves_the_binary_file_out_and_counts_it(tmp_path, caplog):
    good, bad = _good(tmp_path / "good.txt"), _binary(tmp_path / "photo.txt")
    alone = build(_cfg(good), tmp_path / "alone", progress=False)
    with caplog.at_level(logging.WARNING):
        m = build(_cfg(str(tmp_path / "*.txt"), on_error="skip"), tmp_path / "mixed", progress=False)
    assert "photo.txt" in caplog.text
    source = m["sources"][0]
    assert [f["file"] for f in source["skipped_files"]] == [str(bad)]
    assert source["files"] == [str(good)]
    assert _samples(m) == _samples(alone), "not one sample of the binary file"
    vocab = json.loads((tmp_path / "mixed" / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    letters = set(good.read_text())
    junk = [t for t in vocab if not t.startswith("[") and not set(t.removeprefix("##")) <= letters]
    assert not junk, f"no junk tokens in the vocabulary: {junk[:5]}"


def test_utf16_and_control_characters_are_refused(tmp_path):
    good = _good(tmp_path / "good.txt")
    utf16 = tmp_path / "notes.txt"
    utf16.write_text(good.read_text(), encoding="utf-16")
    with pytest.raises(DataError, match=r"notes\.txt: it holds NUL bytes \(binary data, or UTF-16\)"):
        build(_cfg(utf16), tmp_path / "o1", progress=False)
    ctrl = tmp_path / "ctrl.txt"
    ctrl.write_bytes(b"\x01\x02\x03\x1b[0m ab \xff\xfe" * 2000)
    with pytest.raises(DataError, match=r"ctrl\.txt: \d+% of the characters of its first 26,000 bytes are control"):
        build(_cfg(ctrl), tmp_path / "o2", progress=False)
    escaped = tmp_path / "ctrl.jsonl"  # JSON escapes them (\u0001): the documents are checked one by one
    escaped.write_text("".join(json.dumps({"text": "\x01\x02\x03\x1b[0m ab" * 20}) + "\n" for _ in range(50)))
    with pytest.raises(DataError, match=r"ctrl\.jsonl:1: 40% of its characters are control or undecodable"):
        build(_cfg(escaped), tmp_path / "o3", progress=False)


def test_a_garbage_record_past_the_sniffed_start_is_named_or_counted(tmp_path):
    path = _good(tmp_path / "long.txt", n=3000)
    assert path.stat().st_size > 64 << 10
    with open(path, "ab") as fh:
        fh.write(b"ok words \x00\x01\x02 then binary " + bytes(range(1, 9)) * 8 + b"\n")
        fh.write(b"the river flows on\n")
    lines = path.read_bytes().count(b"\n")
    with pytest.raises(DataError, match=rf"long\.txt:{lines - 1}: it holds NUL bytes"):
        build(_cfg(path), tmp_path / "o1", progress=False)
    m = build(_cfg(path, on_error="skip"), tmp_path / "o2", progress=False)
    assert m["sources"][0]["skipped_records"] == {"garbage": 1}
    docs = m["splits"]["train"]["num_documents"] + m["splits"]["valid"]["num_documents"]
    assert docs == 3001


def test_replaced_bytes_are_counted_per_source(tmp_path):
    good = _good(tmp_path / "good.txt")
    mixed = tmp_path / "latin.txt"
    mixed.write_bytes(good.read_bytes() + b"caf\xe9 au lait and cr\xe8me br\xfbl\xe9e in the village\n")
    m = build(_cfg(good, mixed), tmp_path / "o", progress=False)
    assert [s["replaced_bytes"] for s in m["sources"]] == [0, 4]


def test_an_empty_source_is_a_warning_naming_it(tmp_path, caplog):
    good = _good(tmp_path / "good.txt")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with caplog.at_level(logging.INFO):
        m = build(_cfg(good, empty), tmp_path / "o", progress=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("empty.jsonl yields no documents" in w for w in warnings)
    assert m["sources"][1]["num_documents"] == {"train": 0, "valid": 0}
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("source ")]
    assert any("good.txt: 300 documents" in line for line in summary), summary


def test_an_input_that_is_only_garbage_says_so(tmp_path):
    bad = _binary(tmp_path / "a.txt")
    with pytest.raises(DataError, match=r"no usable documents .*1 input file\(s\) refused as not text .*a\.txt"):
        build(_cfg(bad, on_error="skip"), tmp_path / "o1", progress=False)
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"text": "\x00 nul " * 3}) + "\n" for _ in range(20)) + "not json\n")
    with pytest.raises(
        DataError, match=r"no usable documents .*: 20 garbage records skipped, 1 malformed records skipped"
    ):
        build(_cfg(records, on_error="skip"), tmp_path / "o2", progress=False)
    with pytest.raises(DataError, match=r"no usable documents"):  # a given tokenizer: the full pass says it
        build(
            _cfg(records, on_error="skip", tokenizer=TokenizerConfig(path=str(_tokenizer(tmp_path)))),
            tmp_path / "o3",
            progress=False,
        )


def _tokenizer(tmp_path):
    m = build(_cfg(_good(tmp_path / "for_tok.txt")), tmp_path / "tok", progress=False)
    assert m["vocab_size"] > 0
    return tmp_path / "tok" / "tokenizer"


def test_malformed_records_raise_by_default_and_are_counted_with_skip(tmp_path):
    path = tmp_path / "c.jsonl"
    good = _good(tmp_path / "g.txt").read_text().splitlines()
    rows = [json.dumps({"text": t}) for t in good]
    rows[10] = "{broken"
    rows[20] = json.dumps({"other": "x"})
    rows[30] = json.dumps({"text": 7})
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"c\.jsonl:11: not valid JSON"):
        build(_cfg(path), tmp_path / "o1", progress=False)
    m = build(_cfg(path, on_error="skip"), tmp_path / "o2", progress=False)
    assert m["sources"][0]["skipped_records"] == {"malformed": 3}
    assert m["splits"]["train"]["num_documents"] + m["splits"]["valid"]["num_documents"] == 297


def test_garbage_rule():
    assert garbage("plain words, tabs\tand\nnewlines") is None
    assert garbage("caf\ufffd au lait, a fine village morning") is None  # one bad character in 40
    assert "NUL" in garbage("a\x00b")
    assert "control or undecodable" in garbage("\ufffd\ufffd\x01ab")
