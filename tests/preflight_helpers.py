"""A real tiny Hugging Face model directory (ModernBERT or BERT weights + the tiny dataset's
tokenizer) for the checks that run before Ray starts, and a runner of the CLI in a child
process that says whether Ray or torch were imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = (
    "import sys, json\n"
    "from ptft_dist.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print(json.dumps({'ray': 'ray' in sys.modules, 'torch': 'torch' in sys.modules}), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def ptft_child(*args: str, cwd: str | Path | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    """Run ``ptft ARGS`` in a fresh interpreter; returns the process and which heavy modules
    it imported (``{"ray": bool, "torch": bool}``, read from the last stderr line)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "{}"
    try:
        imported = json.loads(last)
    except ValueError:
        imported = {}
    return proc, imported


def make_model_dir(out: Path, tokenizer_dir: Path, family: str = "modernbert", vocab_size: int | None = None) -> Path:
    """Save a 2-layer, 32-wide classifier-ready encoder with ``tokenizer_dir``'s tokenizer."""
    from transformers import AutoModelForMaskedLM, BertConfig, ModernBertConfig

    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    size = vocab_size or len(tok["model"]["vocab"])
    common = dict(vocab_size=size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    hf = ModernBertConfig(**common, pad_token_id=0) if family == "modernbert" else BertConfig(**common)
    model = AutoModelForMaskedLM.from_config(hf)
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out
