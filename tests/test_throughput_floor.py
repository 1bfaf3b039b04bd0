"""A ptft step stays as fast as the same step under plain torch DDP. Slow: about 4 minutes.

Runs ``benchmarks/train_throughput.py`` (ptft pretraining on Ray Train with ZeRO-2 against
torch DDP, 2 processes x 1 thread, the same model, data and batch; the best of 2 interleaved
rounds each) and checks the ratio of their tokens/s, not a time: both run side by side on the
same machine, so a slower machine moves both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: ptft / DDP tokens/s. docs/performance.md measured 0.95 (best of 3 rounds, 2026-12-07) on 2 idle cores,
#: where rounds of one setup differ by up to 15%; below this floor the stack costs more again.
FLOOR = 0.9


@pytest.mark.slow
def test_ptft_pretraining_is_as_fast_as_torch_ddp():
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--steps", "25", "--repeats", "2"]
    cmd += ["--skip-memory", "--stages", "2", "--baselines", "ddp"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["ratio_ptft_vs_ddp"] >= FLOOR, figures
