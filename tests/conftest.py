"""Shared fixtures: a tiny real dataset built from WikiText-2, and one local Ray cluster."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """2,000 WikiText-2 documents -> WordPiece 1,000 -> 64-token samples in small shards."""
    from helpers import build_tiny_dataset

    return build_tiny_dataset(tmp_path_factory.mktemp("data") / "tiny")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray cluster (2 CPUs) for every distributed test."""
    from ptft_dist import launcher

    with launcher.session(num_cpus=2):
        yield


@pytest.fixture
def small_fs(tmp_path):
    """``small_fs("512k")``: a real tmpfs of that size, so that writes run out of space for
    real; unmounted after the test. Skips where mounting needs root."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        path = tmp_path / f"fs-{size}-{len(mounts)}"
        path.mkdir()
        if subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode:
            pytest.skip("mounting a small tmpfs needs root")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", str(path)])
