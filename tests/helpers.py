"""What several test modules share: the tiny model and dataset every distributed test trains, the runner
of the ``tests/_*.py`` cluster scripts, and readers of W&B's offline run files. Test modules
import from here, never from each other."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

#: The model of every distributed test: a 2-layer, 64-wide encoder (seconds per step on CPU).
TINY_MODEL = ["model.hidden_size=64", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=128"]


def build_tiny_dataset(out: Path) -> Path:
    """2,000 WikiText-2 documents -> WordPiece 1,000 -> 64-token samples in small shards."""
    from ptft_dist.config import DataBuildConfig, TokenizerConfig
    from ptft_dist.data.build import build

    cfg = DataBuildConfig(
        max_documents=2000,
        seq_len=64,
        samples_per_shard=100,
        validation_fraction=0.05,
        tokenizer=TokenizerConfig(vocab_size=1000),
    )
    build(cfg, out, progress=False)
    return out


def run_cluster_script(script: str, *args, timeout: float = 1200, env: dict | None = None) -> tuple[dict, str]:
    """Run ``tests/<script>`` (a ``ray.cluster_utils.Cluster`` of its own) in a process of its
    own, with a private RAY_TMPDIR (Cluster records its address there, where no other
    ``ray.init()`` on this machine looks); returns its last JSON line and its output."""
    ray_tmp = tempfile.mkdtemp(prefix="ptft-cl-", dir="/tmp" if os.path.isdir("/tmp") else None)
    full_env = dict(os.environ, RAY_TMPDIR=ray_tmp, **(env or {}))
    full_env.pop("RAY_ADDRESS", None)
    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(
            [sys.executable, here / script, *map(str, args)],
            cwd=here.parent,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"exit {r.returncode}\n{out[-8000:]}"
    return json.loads(next(line for line in reversed(r.stdout.splitlines()) if line.startswith("{"))), out


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file, checksums verified.

    The file is W&B's transaction log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0),
    then LevelDB-log framing: 32 KiB blocks of chunks, each ``<crc32 u32, length u16, type
    u8>`` + data, where type 1 is a whole record and 2/3/4 are its first/middle/last parts.
    Each record is a ``wandb_internal.Record`` message.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), "not a W&B transaction log"
    block, pos, parts, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the end of the block
            pos += block - pos % block
            continue
        if pos + 7 + length > len(data):
            break  # still being written
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad checksum at byte {pos}"
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def finished_run(part: Path, timeout_s: float = 30.0) -> list:
    """The records of one offline run folder once W&B wrote its exit record: W&B's service
    process writes the log asynchronously, so it may lag ``finish()`` by a moment."""
    (path,) = part.glob("*.wandb")
    deadline = time.monotonic() + timeout_s
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def history(records) -> list[dict]:
    return [
        {item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]


def run_record(records):
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run
