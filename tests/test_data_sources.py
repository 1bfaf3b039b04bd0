"""Data from where users keep it: MongoDB collections (served in the test by nx-27017, a
MongoDB wire-protocol server, through the standard pymongo client) and existing WebDataset
tar corpora, each giving the same samples as the same documents in a plain file."""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptft_dist.config import DataBuildConfig, MongoSourceConfig, TokenizerConfig
from ptft_dist.data import mongo
from ptft_dist.data.build import DataError, build
from ptft_dist.data.labeled import read_examples, resolve_task

pymongo = pytest.importorskip("pymongo")

WORDS = "the city river north old house music war game film song team first second school station park".split()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory):
    """A MongoDB wire-protocol server (nx-27017, in memory) on a free loopback port: its base URI."""
    exe = shutil.which("nx-27017") or str(Path(sys.executable).with_name("nx-27017"))
    if not Path(exe).exists():
        pytest.skip("the nx-27017 test server is not installed (pip install nx-27017)")
    tmp = tmp_path_factory.mktemp("mongo")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--db", "memory", "--host", "127.0.0.1", "-p", str(port)]
        + ["--log-file", str(tmp / "server.log"), "--pid-file", str(tmp / "server.pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"mongodb://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            pymongo.MongoClient(uri, serverSelectionTimeoutMS=500).admin.command("ping")
            break
        except pymongo.errors.PyMongoError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the nx-27017 server did not start: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _documents(n: int, seed: int = 0) -> list[str]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [" ".join(WORDS[j] for j in rng.integers(0, len(WORDS), rng.integers(5, 40))) for _ in range(n)]


def _insert(uri: str, name: str, documents: list[dict]) -> str:
    db, coll = name.split(".")
    c = pymongo.MongoClient(uri)
    c[db][coll].drop()
    c[db][coll].insert_many(documents)
    c.close()
    return f"{uri}/{name}"


def _cfg(inputs, tokenizer, **kw):
    return DataBuildConfig(
        inputs=[str(i) for i in inputs],
        seq_len=32,
        samples_per_shard=40,
        validation_fraction=0.1,
        tokenizer=TokenizerConfig(path=str(tokenizer)),
        **kw,
    )


def _shards(m: dict) -> list[str]:
    return [sh["sha256"] for split in ("train", "valid") for sh in m["splits"][split]["shards"]]


# --------------------------------------------------------------------------- MongoDB


def test_a_collection_builds_sample_for_sample_like_its_jsonl_export(mongo_server, tiny_dataset, tmp_path):
    texts = _documents(900)
    langs = ["en" if i % 3 else "fr" for i in range(len(texts))]
    from bson import ObjectId

    ids = [ObjectId() for _ in texts]  # increasing, like the ids a client assigns on insert
    order = list(range(len(texts)))
    order = order[1::2] + order[::2]  # inserted out of _id order: the read sorts by _id
    loc = _insert(mongo_server, "corpus.docs", [{"_id": ids[i], "body": texts[i], "lang": langs[i]} for i in order])
    export = tmp_path / "export.jsonl"
    export.write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    tok = tiny_dataset / "tokenizer"
    ref = build(_cfg([export], tok, text_field="body"), tmp_path / "jsonl", progress=False)
    got = build(_cfg([loc], tok, text_field="body"), tmp_path / "mongo", progress=False)
    assert len(_shards(ref)) > 3 and _shards(got) == _shards(ref)
    entry = got["sources"][0]
    assert entry["num_documents"] == ref["sources"][0]["num_documents"]
    info = entry["mongodb"]
    assert (info["uri"], info["count"], info["filter"]) == (loc, 900, {})
    assert entry["records_read"] == 900, "what was read, next to what was asked for"
    assert (info["id_min"], info["id_max"]) == ({"$oid": str(ids[0])}, {"$oid": str(ids[-1])})

    en = tmp_path / "en.jsonl"
    en.write_text("".join(json.dumps({"body": t}) + "\n" for t, lang in zip(texts, langs) if lang == "en"))
    ref_en = build(_cfg([en], tok, text_field="body"), tmp_path / "jsonl_en", progress=False)
    got_en = build(
        _cfg([loc], tok, text_field="body", mongo=MongoSourceConfig(filter={"lang": "en"}, batch_size=50)),
        tmp_path / "mongo_en",
        progress=False,
    )
    assert _shards(got_en) == _shards(ref_en)
    assert got_en["sources"][0]["mongodb"]["filter"] == {"lang": "en"}
    assert got_en["sources"][0]["mongodb"]["count"] == 600


def test_id_ranges_split_a_collection_into_disjoint_reads(mongo_server):
    loc = _insert(mongo_server, "corpus.split", [{"_id": i, "text": f"document {i}"} for i in range(1000)])
    spec = mongo.parse(loc)
    parts = mongo.split_ranges(spec, 3)
    assert len(parts) == 3
    seen = [[d["_id"] for d in mongo.iter_documents(p)] for p in parts]
    assert sorted(sum(seen, [])) == list(range(1000)), "every document once"
    assert all(300 <= len(s) <= 400 for s in seen), [len(s) for s in seen]


def test_mongo_errors_name_the_uri_collection_and_id_never_the_password(
    mongo_server, tiny_dataset, tmp_path, caplog, monkeypatch
):
    tok = tiny_dataset / "tokenizer"
    host = mongo_server.removeprefix("mongodb://")

    def fails(location, match, **kw):
        with caplog.at_level(logging.DEBUG), pytest.raises(DataError, match=match) as e:
            build(_cfg([location], tok, **kw), tmp_path / f"o{len(list(tmp_path.iterdir()))}", progress=False)
        assert "hunter2" not in str(e.value) and "hunter2" not in caplog.text
        return str(e.value)

    dead = f"mongodb://reader:hunter2@127.0.0.1:{_free_port()}/corpus.docs"
    message = fails(
        dead,
        r"mongodb://reader:\*\*\*@127\.0\.0\.1:\d+/corpus\.docs \(collection corpus\.docs\): cannot "
        r"connect",
        mongo=MongoSourceConfig(timeout_ms=500),
    )
    assert "ServerSelectionTimeoutError" in message
    _insert(mongo_server, "corpus.docs", [{"_id": 1, "text": "fine words here"}])
    fails(f"mongodb://{host}/corpus.nope", r"database 'corpus' has no collection 'nope' \(it has: .*docs")
    _insert(mongo_server, "corpus.bad", [{"_id": 1, "text": "fine words here"}, {"_id": 2, "body": "no text"}])
    fails(
        f"mongodb://{host}/corpus.bad",
        r"collection corpus\.bad\): document _id=2 has no field 'text'; set data.text_field",
    )
    _insert(mongo_server, "corpus.typed", [{"_id": "a", "text": "fine words"}, {"_id": "b", "text": 42}])
    fails(f"mongodb://{host}/corpus.typed", r"document _id='b': field 'text' is int, not text")
    # the test server has no authentication: a login with credentials is refused, named, password hidden
    fails(f"mongodb://reader:hunter2@{host}/corpus.docs", r"mongodb://reader:\*\*\*@.*login failed")
    fails(f"mongodb://{host}/nodot", r"name the collection as mongodb://host:port/<database>\.<collection>")

    # credentials from the environment (a URI without them): used for the login, never shown
    monkeypatch.setenv("PTFT_MONGODB_USERNAME", "reader")
    monkeypatch.setenv("PTFT_MONGODB_PASSWORD", "hunter2")
    fails(
        f"mongodb://{host}/corpus.docs",
        r"mongodb://127\.0\.0\.1:\d+/corpus\.docs \(collection corpus\.docs\): login failed",
    )


def test_skipped_documents_are_counted_and_credentials_stay_out_of_the_manifest(mongo_server, tiny_dataset, tmp_path):
    docs = [{"_id": i, "text": t} for i, t in enumerate(_documents(300))]
    docs[5] = {"_id": 5, "text": 17}
    docs[6] = {"_id": 6, "title": "no text"}
    docs[7] = {"_id": 7, "text": "\x00\x01 binary \x02\x03"}
    loc = _insert(mongo_server, "corpus.skips", docs)
    m = build(_cfg([loc], tiny_dataset / "tokenizer", on_error="skip"), tmp_path / "o", progress=False)
    assert m["sources"][0]["skipped_records"] == {"malformed": 2, "garbage": 1}
    assert sum(m["sources"][0]["num_documents"].values()) == 297


def test_a_password_in_an_input_uri_is_redacted_where_the_config_is_written():
    from ptft_dist import config as C

    cfg = C.load("data", None, ["data.inputs=[mongodb://reader:hunter2@db.example:27017/corpus.docs]"])
    text = C.dump_yaml(cfg)
    assert "hunter2" not in text and "mongodb://reader:***@db.example:27017/corpus.docs" in text
    assert mongo.public_uri("mongodb+srv://u:p%40ss@h/db.c?tls=true") == "mongodb+srv://u:***@h/db.c?tls=true"


def test_labeled_tasks_from_collections(mongo_server, tmp_path):
    train = _insert(
        mongo_server,
        "tasks.train",
        [{"_id": i, "sentence": f"words number {i}", "label": i % 2} for i in range(40)],
    )
    test = _insert(mongo_server, "tasks.test", [{"_id": i, "sentence": f"test {i}", "label": 1} for i in range(8)])
    texts, labels = read_examples(train, "sentence", "label")
    assert texts[:2] == ["words number 0", "words number 1"] and labels[:3] == ["0", "1", "0"]
    from ptft_dist.config import TaskConfig

    task = resolve_task(TaskConfig(train_file=train, test_file=test, text_column="sentence"), tmp_path)
    assert task.train_file == train and task.test_file == test
    bad = _insert(mongo_server, "tasks.bad", [{"_id": 1, "sentence": 3, "label": 0}])
    with pytest.raises(DataError, match=r"collection tasks\.bad\), document _id=1: field 'sentence' is int"):
        read_examples(bad, "sentence", "label")
    with pytest.raises(DataError, match=r"document _id=0: no field 'text' \(fields: 'sentence', 'label'\)"):
        read_examples(train, "text", "label")


def test_task_mongo_settings_apply_to_task_collections(mongo_server, tmp_path, monkeypatch):
    """task.mongo reads task collections as data.mongo reads a corpus: the filter selects the
    examples (train, validation and test alike), the sort orders them (then _id), only the
    task's columns are fetched unless a projection is given, the batch size reaches the cursor,
    and credentials from the environment are used for the login (never shown)."""
    import dataclasses

    import pymongo.collection

    from ptft_dist import config as C
    from ptft_dist.classify import carve_splits

    rows = [  # zero-padded string _ids: the test server compares numeric _ids as text when sorting
        {"_id": f"{i:03d}", "sentence": f"words {i}", "label": "ab"[i % 2], "lang": "en" if i % 3 else "fr"}
        | {"rank": i % 5}
        for i in range(60)
    ]
    rows[3]["label"] = "fr-only"  # a label of a filtered-out document: must not count
    train = _insert(mongo_server, "tasks.m_train", [dict(r, extra="x" * 40) for r in rows])
    test = _insert(mongo_server, "tasks.m_test", [dict(r, _id=f"t{r['_id']}") for r in rows[:12]])
    overrides = [
        f"task.train_file={train}",
        f"task.test_file={test}",
        "task.text_column=sentence",
        "task.validation_fraction=0",
        "task.mongo.filter={lang: en}",
        "task.mongo.sort={rank: -1}",
        "task.mongo.batch_size=7",
    ]
    cfg = C.load("finetune", "finetune_tiny", overrides)
    assert cfg.task.mongo.filter == {"lang": "en"} and cfg.task.mongo.batch_size == 7

    seen = []
    find = pymongo.collection.Collection.find

    def spy(self, *args, **kwargs):
        seen.append((self.name, args[1] if len(args) > 1 else kwargs.get("projection"), kwargs.get("batch_size")))
        return find(self, *args, **kwargs)

    monkeypatch.setattr(pymongo.collection.Collection, "find", spy)
    task = resolve_task(cfg.task, tmp_path)  # the test labels are checked against the filtered training labels
    names, train_split, _, test_split = carve_splits(dataclasses.replace(cfg, task=task))
    en = [r for r in rows if r["lang"] == "en"]
    order = sorted(en, key=lambda r: (-r["rank"], r["_id"]))
    assert names == ["a", "b"], "the label of a filtered-out document is not a class"
    assert train_split.texts == [r["sentence"] for r in order]
    assert test_split.texts == [r["sentence"] for r in order if r["_id"] < "012"]
    reads = [s for s in seen if s[0] in ("m_train", "m_test") and s[2] == 7]
    assert reads and all(set(p) == {"sentence", "label"} for _, p, _ in reads), seen

    with pytest.raises(DataError, match=r"no field 'sentence'"):
        read_examples(train, "sentence", "label", mongo_settings=C.MongoSourceConfig(projection={"label": 1}))
    with pytest.raises(DataError, match=r"tasks\.m_train holds no examples the filter task\.mongo\.filter selects"):
        read_examples(train, "sentence", "label", mongo_settings=C.MongoSourceConfig(filter={"lang": "de"}))

    monkeypatch.setenv("PTFT_MONGODB_USERNAME", "reader")
    monkeypatch.setenv("PTFT_MONGODB_PASSWORD", "hunter2")
    with pytest.raises(
        DataError, match=r"mongodb://127\.0\.0\.1:\d+/tasks\.m_train \(collection tasks\.m_train\): login"
    ) as e:
        resolve_task(cfg.task, tmp_path)
    assert "hunter2" not in str(e.value)


def test_task_text_from_a_task_collection_is_its_training_split(mongo_server, tmp_path):
    """pretrain_on_task_text reads a task kept in collections like one kept in files: the texts
    added are the training split of the collection, not its test or validation documents."""
    import dataclasses

    from ptft_dist import config as C
    from ptft_dist import jobs
    from ptft_dist.classify import load_splits

    rows = [
        {"_id": f"{i:04d}", "sentence": f"question {i} about {WORDS[i % 7]}", "label": WORDS[i % 3]} for i in range(120)
    ]
    train = _insert(mongo_server, "tasks.tt_train", rows)
    test = _insert(mongo_server, "tasks.tt_test", [dict(r, _id=f"t{i}") for i, r in enumerate(rows[:9])])
    export = tmp_path / "train.jsonl"
    export.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_id"}) + "\n" for r in rows))
    common = ["pretrain_on_task_text=true", "finetune.0.task.text_column=sentence", "finetune.0.eval_every_steps=5"]
    common += ["finetune.0.task.validation_fraction=0.25", "data.text_field=body"]
    from_db = C.load("pipeline", "pipeline_tiny", [*common, f"finetune.0.task.train_file={train}"])
    from_file = C.load("pipeline", "pipeline_tiny", [*common, f"finetune.0.task.train_file={export}"])
    got = {}
    for name, cfg in (("db", from_db), ("file", from_file)):
        job = cfg.finetune[0]
        job = dataclasses.replace(job, task=resolve_task(job.task, tmp_path / name))
        _, entries = jobs.with_task_text(cfg, [job], tmp_path / name)
        got[name] = [json.loads(line)["body"] for line in Path(entries[0]["input"]).read_text().splitlines()]
        assert got[name] == load_splits(job)[1].texts
    assert got["db"] == got["file"] and 70 < len(got["db"]) < 90, "test (10%) and validation (25%) held out"
    assert entries[0]["task"] == str(export)

    job = dataclasses.replace(from_db.finetune[0], task=C.TaskConfig(train_file=train, test_file=test))
    job = dataclasses.replace(job, task=dataclasses.replace(job.task, text_column="sentence"))
    _, entries = jobs.with_task_text(from_db, [job], tmp_path / "with_test")
    assert entries[0]["task"] == train and entries[0]["num_texts"] == len(load_splits(job)[1])


def _tiny_base_model(tmp_path, tokenizer_dir) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    out = tmp_path / "base"
    BertForMaskedLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.dist
def test_finetune_from_collections_and_predictions_written_back(mongo_server, tiny_dataset, tmp_path, ray_session):
    from ptft_dist import config as C
    from ptft_dist import jobs
    from ptft_dist.adapters import classifier_meta

    rows = [(f"the river and the {w} near the city", "water") for w in WORDS] + [
        (f"a song of the {w} and the film", "music") for w in WORDS
    ]
    train = _insert(
        mongo_server, "ft.train", [{"_id": 1000 + i, "text": t, "topic": y} for i, (t, y) in enumerate(rows * 3)]
    )
    test = _insert(mongo_server, "ft.test", [{"_id": 5000 + i, "text": t, "topic": y} for i, (t, y) in enumerate(rows)])
    base = _tiny_base_model(tmp_path, tiny_dataset / "tokenizer")
    cfg = C.load(
        "finetune",
        "finetune_tiny",
        [
            f"base_model={base}",
            f"task.train_file={train}",
            f"task.test_file={test}",
            "task.label_column=topic",
            "task.max_length=16",
            "peft.method=full",
            "optim.max_steps=4",
            "optim.warmup_steps=0",
            f"run_dir={tmp_path / 'ft'}",
        ],
    )
    summary = jobs.finetune(cfg)
    assert summary["metrics"]["num_test_examples"] == len(rows), "the test set is the ft.test collection"
    model_dir = summary["artifacts"].get("adapter") or summary["artifacts"]["model"]
    out = f"{mongo_server}/ft.predictions"
    assert classifier_meta(model_dir) == {"pooling": "cls", "max_length": 16}, "predict truncates as trained"
    made = jobs.predict(model_dir, test, out)
    assert made["metrics"]["num_examples"] == len(rows)
    back = list(pymongo.MongoClient(mongo_server).ft.predictions.find().sort("_id", 1))
    assert [d["_id"] for d in back] == [5000 + i for i in range(len(rows))], "one document per input, with its _id"
    assert {d["prediction"] for d in back} <= {"water", "music"} and all(0 < d["probability"] <= 1 for d in back)
    assert [d["text"] for d in back] == [t for t, _ in rows]
    with pytest.raises(DataError, match="already holds documents"):
        jobs.predict(model_dir, test, out, max_length=16)


# --------------------------------------------------------------------------- WebDataset corpora


def _write_wds(pattern: str, texts: list[str], per_shard: int, kind: str) -> None:
    import webdataset as wds

    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0) as sink:
        for i, t in enumerate(texts):
            sample = {"__key__": f"doc{i:06d}"}
            if kind == "txt":
                sample["txt"] = t
            else:
                sample["json"] = {"text": t, "id": i}
            sample["cls"] = i % 3  # a non-text member next to the text
            sink.write(sample)


@pytest.mark.parametrize("kind", ["txt", "json"])
def test_a_webdataset_corpus_builds_like_the_same_documents_as_text(tmp_path, tiny_dataset, kind):
    texts = _documents(700, seed=3)
    (tmp_path / "wds").mkdir()
    _write_wds(str(tmp_path / "wds" / "corpus-%06d.tar"), texts, 250, kind)
    assert sorted(p.name for p in (tmp_path / "wds").iterdir()) == [f"corpus-{i:06d}.tar" for i in range(3)]
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(texts) + "\n")
    tok = tiny_dataset / "tokenizer"
    ref = build(_cfg([plain], tok), tmp_path / "ref", progress=False)
    got = build(_cfg([tmp_path / "wds" / "corpus-{000000..000002}.tar"], tok), tmp_path / "got", progress=False)
    assert len(_shards(ref)) > 3 and _shards(got) == _shards(ref)
    assert len(got["sources"][0]["files"]) == 3


def test_a_webdataset_corpus_over_http_and_its_errors(tmp_path, tiny_dataset):
    import functools
    import http.server
    import threading

    texts = _documents(300, seed=4)
    _write_wds(str(tmp_path / "c-%03d.tar"), texts, 100, "txt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    tok = tiny_dataset / "tokenizer"
    try:
        url = f"http://127.0.0.1:{server.server_port}/c-{{000..002}}.tar"
        got = build(_cfg([url], tok), tmp_path / "http", progress=False)
        plain = tmp_path / "plain.txt"
        plain.write_text("\n".join(texts) + "\n")
        assert _shards(got) == _shards(build(_cfg([plain], tok), tmp_path / "ref", progress=False))
        with pytest.raises(DataError, match=r"c-003\.tar does not exist"):
            build(_cfg([url.replace("002", "009")], tok), tmp_path / "missing", progress=False)
    finally:
        server.shutdown()
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(DataError, match=r"junk\.tar: not a readable tar shard"):
        build(_cfg([tmp_path / "junk.tar"], tok), tmp_path / "junk", progress=False)


# --------------------------------------------------------------------------- the build on Ray


def _ray_build(out: Path, nodes: int, inputs: list, tokenizer: Path, settings: dict, **env) -> dict:
    """tests/_ray_build.py in a process of its own (one process joins one cluster)."""
    import os
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="ptft-rb-", dir="/tmp" if os.path.isdir("/tmp") else None)
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PTFT_TEST_BUILD=json.dumps(settings), **env)
    env.pop("RAY_ADDRESS", None)
    root = Path(__file__).resolve().parent.parent
    try:
        r = subprocess.run(
            [sys.executable, root / "tests" / "_ray_build.py", out, str(nodes), tokenizer, *map(str, inputs)],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            stdin=subprocess.DEVNULL,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    return json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith("{")))


def _read_counts(entry: dict) -> tuple:
    return tuple(entry[k] for k in ("input", "num_documents", "records_read", "replaced_bytes", "skipped_records"))


@pytest.mark.dist
def test_a_ray_build_is_the_same_on_one_and_two_nodes_and_holds_the_local_builds_documents(
    tmp_path, tiny_dataset, mongo_server
):
    """data.engine=ray on ray.cluster_utils.Clusters of 1 and 2 nodes (1 CPU each), over every
    kind of part: byte ranges of a text file (with garbage lines, skipped), a JSONL file of
    weight 1.5 (two passes), WebDataset tar shards, _id ranges of a collection. The tasks run
    on both nodes; the manifest and every shard are byte for byte the same on 1 and 2 nodes,
    though on 2 the worker of part 0 dies after writing its first shard (run again, no shard
    twice, no temporary file left); against the local build: the same documents per split and
    source, the same input tokens and the same number of samples, the sample tokens equal up to
    the tail each build drops (under one sample)."""
    texts = _documents(4000, seed=5)
    lines = list(texts)
    lines[100] = "\x01\x02\x03\x04 binary \x05\x06\x07\x08"  # garbage: skipped and counted
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n")
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": t[::-1]}) + "\n" for t in texts[:900]))
    (tmp_path / "wds").mkdir()
    _write_wds(str(tmp_path / "wds" / "c-%03d.tar"), _documents(600, seed=8), 200, "txt")
    coll = _insert(mongo_server, "corpus.ray", [{"_id": i, "text": t} for i, t in enumerate(_documents(700, seed=9))])
    inputs = [corpus, extra, tmp_path / "wds" / "c-{000..002}.tar", coll]
    settings = dict(
        seq_len=32,
        samples_per_shard=150,
        validation_fraction=0.05,
        on_error="skip",
        input_weights=[1, 1.5, 1, 1],
        split_mb=0.1,
        split_documents=250,
    )
    tok = tiny_dataset / "tokenizer"
    two = _ray_build(tmp_path / "two", 2, inputs, tok, settings, PTFT_TEST_KILL_TASK="1")
    one = _ray_build(tmp_path / "one", 1, inputs, tok, settings, PTFT_TEST_SKIP_LOCAL="1")
    ray_m, local = two["ray"], two["local"]

    assert len(two["nodes"]) == 2 and two["task_nodes"] == two["nodes"], "tasks on both nodes"
    assert (tmp_path / "two" / "retried").exists(), "part 0 died once and ran again"
    assert ray_m["build"]["engine"] == "ray" and one["ray"] == ray_m, "the same manifest, shard hashes included"
    listed = {e["file"] for s in ("train", "valid") for e in ray_m["splits"][s]["shards"]}
    assert {f for f in two["files"] if f.endswith(".tar")} == listed and not [f for f in two["files"] if ".tmp" in f]
    parts = {f.split("-")[1] for f in listed}
    assert len(parts) > 15, f"ranges, passes, tar shards and _id ranges are parts of their own: {sorted(parts)}"

    for split in ("train", "valid"):
        r, lo = ray_m["splits"][split], local["splits"][split]
        assert (r["num_documents"], r["num_samples"]) == (lo["num_documents"], lo["num_samples"]), split
        diff = sum(abs(a - b) for a, b in zip(two["ray_tokens"][split], two["local_tokens"][split]))
        assert diff <= 2 * (settings["seq_len"] - 1), (split, diff)
    assert ray_m["build"]["input_tokens"] == local["build"]["input_tokens"]
    assert ray_m["build"]["input_text_bytes"] == local["build"]["input_text_bytes"]
    assert [_read_counts(e) for e in ray_m["sources"]] == [_read_counts(e) for e in local["sources"]]
    assert ray_m["sources"][0]["skipped_records"] == {"garbage": 1}
    assert ray_m["sources"][3]["mongodb"]["count"] == 700


def test_ray_parts_are_fixed_by_the_data_and_partition_every_source(tmp_path, mongo_server):
    """The plan of a Ray build depends on the data and the split sizes only; the byte ranges of
    a file (lines longer than a range, CRLF, a last line without newline) read every line once,
    and the _id ranges of a collection every document once."""
    from ptft_dist.data import ingest, raybuild

    texts = _documents(500, seed=11)
    texts[7] = "long " * 400  # longer than a range: ranges in it are empty
    path = tmp_path / "c.txt"
    path.write_bytes(("\r\n".join(texts)).encode())
    coll = _insert(mongo_server, "corpus.plan", [{"_id": i, "text": t} for i, t in enumerate(texts)])
    sources = ingest.resolve_sources([str(path), coll], [1.5, 1])
    parts = raybuild.plan(sources, 700, 120)
    assert parts == raybuild.plan(ingest.resolve_sources([str(path), coll], [1.5, 1]), 700, 120)
    assert [p.index for p in parts] == list(range(len(parts)))
    ranges = [p for p in parts if p.source == 0 and p.source_pass == 0]
    assert len(ranges) == -(-path.stat().st_size // 700) and all(isinstance(p.unit, ingest.FileRange) for p in ranges)
    assert sum(p.source == 0 for p in parts) == 2 * len(ranges), "a weight of 1.5 reads the file twice"
    read = dict(text_field="text", min_chars=1)
    got = [d for p in ranges for d in ingest.iter_source_documents(sources[0], p.unit, **read)]
    assert got == list(ingest.iter_source_documents(sources[0], path, **read)) == [t.strip() for t in texts]
    ids = [p for p in parts if p.source == 1]
    assert len(ids) == 5
    got = [d for p in ids for d in ingest.iter_source_documents(sources[1], p.unit, **read)]
    assert got == [t.strip() for t in texts]
    shares = [p.source for p in parts[:8]]
    assert 0 in shares and 1 in shares, f"sources interleaved in the plan: {shares}"


def test_a_ray_part_with_a_bad_record_reports_it_by_name(tmp_path, tiny_dataset):
    """A task's DataError (garbage, a malformed record) comes back as its message, not retried."""
    from ptft_dist.data import ingest, raybuild

    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine words"}) + "\n" + '{"text": 3}\n')
    source = ingest.resolve_sources([str(path)])[0]
    part = raybuild.plan([source], 1000, 1000)[0]
    settings = dict(
        tokenizer_json=(tiny_dataset / "tokenizer" / "tokenizer.json").read_text(),
        sep=3,
        cls=2,
        out_dir=str(tmp_path),
        dtype="<u2",
        seq_len=32,
        samples_per_shard=10,
        text_field="text",
        min_chars=1,
        fraction=0.1,
        on_error="raise",
    )
    got = raybuild.run_part(part, source, settings)
    assert got == {"error": f"{path}:2: field 'text' is int, not text"}


# --------------------------------------------------------------------------- progress


def test_build_progress_off_a_terminal_is_log_lines_per_phase_and_nothing_else(tmp_path, capfd, caplog, monkeypatch):
    """Each phase said, its share of the input with an ETA, and nothing on stdout/stderr (no
    bar redraws or blank lines in a log file)."""
    from ptft_dist.data import build as B

    monkeypatch.setattr(B, "PROGRESS_EVERY_S", 0.0)
    source = tmp_path / "c.txt"
    source.write_text("\n".join(_documents(3000, seed=6)) + "\n")
    cfg = DataBuildConfig(inputs=[str(source)], seq_len=32, samples_per_shard=200, num_proc=0)
    cfg.tokenizer.vocab_size = 200
    with caplog.at_level(logging.INFO, logger="ptft_dist"):
        build(cfg, tmp_path / "o", progress=True)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out[-500:], err[-500:])
    lines = [r.getMessage() for r in caplog.records]
    size = source.stat().st_size
    assert size > 1e5 and f"train tokenizer: reading {size / 1e6:,.1f} MB" in lines, lines[:3]
    assert any(line.startswith("tokenize + pack: ") and "% (" in line and ", ETA " in line for line in lines), lines
    assert any(line.startswith("tokenize + pack: done in") for line in lines)
    assert lines.index("write manifest") > max(i for i, x in enumerate(lines) if x.startswith("tokenize + pack"))


def test_mongo_sort_and_projection(mongo_server, tiny_dataset, tmp_path):
    """data.mongo.sort orders the documents (then _id); a projection that names the text field
    reads only it; the build equals the JSONL in that order."""
    texts = _documents(400, seed=7)
    ranks = [(i * 37) % 100 for i in range(len(texts))]  # many ties: _id breaks them
    loc = _insert(
        mongo_server,
        "corpus.sorted",
        [{"_id": f"d{i:05d}", "body": t, "rank": r, "extra": "x" * 50} for i, (t, r) in enumerate(zip(texts, ranks))],
    )
    order = sorted(range(len(texts)), key=lambda i: (-ranks[i], f"d{i:05d}"))
    export = tmp_path / "sorted.jsonl"
    export.write_text("".join(json.dumps({"body": texts[i]}) + "\n" for i in order))
    tok = tiny_dataset / "tokenizer"
    ref = build(_cfg([export], tok, text_field="body"), tmp_path / "ref", progress=False)
    settings = MongoSourceConfig(sort={"rank": -1}, projection={"body": 1})
    got = build(_cfg([loc], tok, text_field="body", mongo=settings), tmp_path / "got", progress=False)
    assert _shards(got) == _shards(ref)
    assert got["sources"][0]["mongodb"]["sort"] == [["rank", -1], ["_id", 1]]
    spec = mongo.parse(loc, projection={"body": 1})
    assert set(next(mongo.iter_documents(spec))) == {"_id", "body"}
