"""LoRA vs full finetuning: examples/s and peak memory per rank, side by side in one run.

    python benchmarks/finetune_throughput.py [--steps 60] [--base DIR]

Same model (a ModernBERT encoder, hidden 256, 4 layers: a pretraining export given with
--base, else a freshly initialised one with the WikiText-2 tokenizer), same data (TREC-6,
max 64 tokens), same global batch (32 = 16 per rank x 2 Ray workers, ZeRO-2), same number of
steps. Examples/s are measured over the steady-state steps (the first log interval is
excluded); peak memory is rank 0's peak RSS. Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "disabled")

from ptft_dist import config as C  # noqa: E402
from ptft_dist import jobs, launcher, models  # noqa: E402


def random_base(work: Path) -> Path:
    """An HF masked-LM directory with random weights and the WikiText-2 tokenizer."""
    from ptft_dist.data.build import load_tokenizer, read_manifest, special_ids

    jobs.build_data(
        C.load("data", overrides=[f"data.output_dir={work / 'data'}", "data.max_documents=3000"]).data, work / "build"
    )
    manifest = read_manifest(work / "data")
    tok = load_tokenizer(work / "data" / "tokenizer")
    cfg = C.ModelConfig(family="modernbert", hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
    model = models.build_mlm(
        cfg, models.mlm_config(cfg, vocab_size=manifest["vocab_size"], special_ids=special_ids(tok))
    )
    return models.save_hf(model, model.state_dict(), tok, work / "base")


def run(method: str, base: Path, work: Path, steps: int) -> dict:
    cfg = C.load(
        "finetune",
        "finetune_tiny",
        [
            f"base_model={base}",
            f"run_dir={work / method}",
            f"peft.method={method}",
            f"optim.max_steps={steps}",
            "optim.lr=3e-4" if method == "full" else "optim.lr=2e-3",
            "tracking.log_every_steps=10",
            "task.max_length=64",
        ],
    )
    summary = jobs.finetune(cfg)
    rows = [json.loads(line) for line in open(work / method / "metrics.jsonl") if '"examples_per_s"' in line]
    steady = rows[1:] or rows
    return {
        "examples_per_s": sum(r["examples_per_s"] for r in steady) / len(steady),
        "peak_memory_mb": max(r["peak_memory_mb"] for r in rows),
        "trainable_params": summary["metrics"]["trainable_params"],
        "total_params": summary["metrics"]["total_params"],
        "test_accuracy": summary["metrics"]["test_accuracy"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--base", help="HF directory to finetune (default: a random-init ModernBERT)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ptft-ft-bench-"))
    base = Path(a.base) if a.base else random_base(work)
    with launcher.session(num_cpus=2):
        results = {m: run(m, base, work, a.steps) for m in ("lora", "full")}
    print(f"\n{'method':<6} {'trainable':>12} {'examples/s':>11} {'peak MB (rank 0)':>17} {'test acc':>9}")
    for m, r in results.items():
        print(
            f"{m:<6} {r['trainable_params']:>12,} {r['examples_per_s']:>11.0f} {r['peak_memory_mb']:>17.0f} "
            f"{r['test_accuracy']:>9.3f}"
        )
    figures = {f"{m}_{k}": v for m, r in results.items() for k, v in r.items()}
    figures["ratio_lora_vs_full_examples_per_s"] = results["lora"]["examples_per_s"] / results["full"]["examples_per_s"]
    figures["ratio_lora_vs_full_peak_memory"] = results["lora"]["peak_memory_mb"] / results["full"]["peak_memory_mb"]
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
