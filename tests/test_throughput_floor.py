"""A ptft step stays as fast as the same step under plain torch DDP. Slow: about 4 minutes.

Runs ``benchmarks/train_throughput.py`` (ptft pretraining on Ray Train with ZeRO-2 against
torch DDP, 2 processes x 1 thread, the same model, data and batch; 3 interleaved
rounds, the order rotating from round to round) and checks the ratio of their tokens/s, not a
time: the median over rounds of the ratio within each round, so that a machine that slows down
between rounds moves both sides of every ratio.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: ptft / DDP tokens/s. docs/performance.md measured 0.95 (best of 3 rounds) and 0.92 (median of the
#: rounds' ratios, on a machine that slowed down by a fifth during the run), 2026-12-07; below this
#: floor the stack costs more again.
FLOOR = 0.9


@pytest.mark.slow
def test_ptft_pretraining_is_as_fast_as_torch_ddp():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--steps", "25", "--repeats", "3"]
    cmd += ["--skip-memory", "--stages", "2", "--baselines", "ddp"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["median_ratio_ptft_vs_ddp"] >= FLOOR, figures
