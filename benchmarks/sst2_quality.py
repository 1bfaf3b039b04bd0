"""Does masked-LM pretraining pay on SST-2? Pretrained vs random init, LoRA vs full finetuning,
as a function of the pretraining budget.

    python benchmarks/sst2_quality.py [--budgets 5 15 30] [--finetune-steps 600] [--out DIR]
                                      [--compare bert] [--sst2 ../shared/data/sst2]
                                      [--corpus wikitext2|wikitext2+wordnet]

1. Builds the unlabeled corpus once (preset ``data_wikitext2``: WikiText-2 raw train split,
   WordPiece 8192 trained on it, 128-token blocks; no SST-2 text). ``--corpus
   wikitext2+wordnet`` adds WordNet 3.0's glosses and usage examples, one document per synset
   (Debian package ``wordnet-base``: ``apt install wordnet-base``).
2. Pretrains preset ``pretrain_small`` once per budget (minutes of training wall time on this
   machine, ``time_budget_s``; the lr decay spans the budget), each from scratch, and exports it.
   ``--compare FAMILY`` also pretrains that model family, same sizes and schedule, at the
   smallest budget, for the accuracy-vs-time plot and one LoRA row.
3. Finetunes preset ``finetune_sst2`` (train on train, best step on dev, report test; fixed
   seeds) from every export and from a random-init model of the same architecture, with LoRA
   and with full finetuning, all with the same number of steps and batch.

Prints a table and, last, one JSON line of its figures; writes ``mlm_accuracy.png`` (validation
masked-token accuracy vs training wall time, one curve per pretraining run) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "disabled")

from ptft_dist import config as C  # noqa: E402
from ptft_dist import jobs, launcher  # noqa: E402

# Finetuning: what differs between the two methods (the rest is the finetune_sst2 preset).
METHODS = {"lora": ["peft.method=lora"], "full": ["peft.method=full", "optim.lr=3e-4"]}


CORPORA = {
    "wikitext2": "WikiText-2 raw train split",
    "wikitext2+wordnet": "WikiText-2 raw train split + WordNet 3.0 glosses and examples",
}


def wordnet_documents(src: Path):
    """One document per WordNet synset: its words, then its gloss and usage examples, e.g.
    ``complaisant, obliging: showing a cheerful willingness to do favors for others. the obliging
    waiter was in no hurry for us to leave.``"""
    import re

    for pos in ("noun", "verb", "adj", "adv"):
        path = src / f"data.{pos}"
        if not path.is_file():
            sys.exit(f"--wordnet-dir {src}: data.{pos} is missing (apt install wordnet-base)")
        for line in open(path, encoding="latin-1"):
            if line.startswith("  ") or " | " not in line:  # the license header
                continue
            head, gloss = line.split(" | ", 1)
            fields = head.split()
            n = int(fields[3], 16)  # word count, hex; then (word, lex_id) pairs
            words = [re.sub(r"\(.*\)$", "", w).replace("_", " ") for w in fields[4 : 4 + 2 * n : 2]]
            parts = [p.strip().strip('"').strip() for p in gloss.strip().split(";")]
            yield f"{', '.join(words)}: " + ". ".join(p for p in parts if p) + "."


def corpus_inputs(corpus: str, work: Path, wordnet_dir: Path) -> list[str]:
    """The data build's ``inputs`` for ``corpus`` (files written into ``work`` as needed)."""
    from ptft_dist.data.build import default_corpus

    inputs = default_corpus()
    if corpus == "wikitext2+wordnet":
        out = work / "wordnet.txt"
        if not out.is_file():
            work.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".tmp")
            tmp.write_text("\n".join(wordnet_documents(wordnet_dir)) + "\n", encoding="utf-8")
            tmp.rename(out)
        inputs.append(str(out))
    return inputs


def random_base(export: Path, out: Path, seed: int = 0) -> Path:
    """The same architecture and tokenizer as ``export``, with freshly initialised weights."""
    import torch
    from transformers import AutoConfig, AutoModelForMaskedLM, AutoTokenizer

    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(seed)
    model = AutoModelForMaskedLM.from_config(AutoConfig.from_pretrained(export))
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(export).save_pretrained(out)
    return out


def pretrain(name: str, dataset: Path, out: Path, minutes: float, overrides: list[str]) -> dict:
    run_dir = out / "pretrain" / name
    if not (run_dir / "summary.json").is_file():
        cfg = C.load(
            "pretrain",
            "pretrain_small",
            [f"data.dataset_dir={dataset}", f"run_dir={run_dir}", f"time_budget_s={minutes * 60}", *overrides],
        )
        jobs.pretrain(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())["metrics"]
    curve = [
        (r["train_time_s"], r["eval_mlm_accuracy"])
        for r in map(json.loads, open(run_dir / "metrics.jsonl"))
        if "eval_mlm_accuracy" in r and "train_time_s" in r
    ]
    return {
        "name": name,
        "minutes": minutes,
        "export": run_dir / "export",
        "steps": summary["steps"],
        "tokens_seen": summary["tokens_seen"],
        "eval_mlm_loss": summary["eval_mlm_loss"],
        "eval_mlm_accuracy": summary["eval_mlm_accuracy"],
        "curve": curve,
    }


def finetune(
    base: Path,
    name: str,
    method: str,
    out: Path,
    steps: int,
    sst2: Path,
    train_examples: int | None = None,
    seed: int = 0,
) -> dict:
    """One finetune (cached in its run dir). ``seed`` changes the head and adapter init, the batch
    order and the ``train_examples`` sample; the encoder is the same."""
    run_dir = (
        out
        / "finetune"
        / (f"{name}-{method}" + (f"-{train_examples}ex" if train_examples else "") + (f"-s{seed}" if seed else ""))
    )
    if not (run_dir / "summary.json").is_file():
        limit = ([f"task.train_examples={train_examples}"] if train_examples else []) + [f"optim.seed={seed}"]
        if not name.startswith(("random", "modernbert")):
            limit.append("pooling=cls")  # mean pooling is ModernBERT's; BERT/RoBERTa classify from [CLS]
        cfg = C.load(
            "finetune",
            "finetune_sst2",
            [
                f"base_model={base}",
                f"run_dir={run_dir}",
                f"optim.max_steps={steps}",
                *METHODS[method],
                *limit,
                *(
                    f"task.{k}_file={sst2 / (k if k != 'validation' else 'dev')}.tsv"
                    for k in ("train", "validation", "test")
                ),
            ],
        )
        jobs.finetune(cfg)
    m = json.loads((run_dir / "summary.json").read_text())["metrics"]
    return {
        "test_accuracy": m["test_accuracy"],
        "dev_accuracy": m["best_val_accuracy"],
        "train_time_s": m["train_time_s"],
    }


def plot(runs: list[dict], path: Path, corpus: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        xs, ys = zip(*r["curve"]) if r["curve"] else ((), ())
        ax.plot(
            [x / 60 for x in xs], [100 * y for y in ys], marker=".", label=f"{r['name']} ({r['minutes']:g} min budget)"
        )
    ax.set_xlabel("training wall time (minutes, 2 CPU workers)")
    ax.set_ylabel("validation masked-token accuracy (%)")
    ax.set_title(f"MLM pretraining on {corpus}: accuracy vs time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--budgets",
        type=float,
        nargs="+",
        default=[5, 15, 30],
        help="pretraining budgets, minutes of training wall time",
    )
    p.add_argument("--finetune-steps", type=int, default=600)
    p.add_argument(
        "--low-data",
        type=int,
        default=1000,
        help="also finetune on this many training examples (random init and the largest budget; 0: skip)",
    )
    p.add_argument(
        "--low-data-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="finetune seeds of the low-data rows (each also draws its own sample); the table gives their mean",
    )
    p.add_argument(
        "--compare",
        nargs="*",
        default=[],
        help="other model families to pretrain at the smallest budget (bert, roberta)",
    )
    p.add_argument("--corpus", choices=sorted(CORPORA), default="wikitext2", help="the unlabeled pretraining text")
    p.add_argument(
        "--wordnet-dir",
        default="/usr/share/wordnet",
        help="WordNet 3.0 data.{noun,verb,adj,adv} (Debian: wordnet-base)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="runs and cache (default runs/sst2_quality, or runs/sst2_quality-<corpus> for another corpus)",
    )
    p.add_argument(
        "--sst2",
        default=str(ROOT.parent / "shared" / "data" / "sst2"),
        help="directory with train.tsv, dev.tsv, test.tsv",
    )
    a = p.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    default_out = (
        ROOT / "runs" / ("sst2_quality" if a.corpus == "wikitext2" else f"sst2_quality-{a.corpus.replace('+', '-')}")
    )
    out, sst2 = Path(a.out or default_out).resolve(), Path(a.sst2).resolve()
    for split in ("train", "dev", "test"):
        if not (sst2 / f"{split}.tsv").is_file():
            sys.exit(f"--sst2 {sst2}: {split}.tsv is missing")
    started = time.time()
    with launcher.session(num_cpus=2):
        dataset = out / "data" / "data"
        if not (dataset / "manifest.json").is_file():
            inputs = corpus_inputs(a.corpus, out / "data", Path(a.wordnet_dir))
            jobs.build_data(
                C.load(
                    "data", "data_wikitext2", [f"data.output_dir={dataset}", f"data.inputs={json.dumps(inputs)}"]
                ).data,
                out / "data",
            )
        manifest = json.loads((dataset / "manifest.json").read_text())
        runs = [pretrain(f"modernbert-{m:g}min", dataset, out, m, []) for m in a.budgets]
        runs += [
            pretrain(f"{fam}-{min(a.budgets):g}min", dataset, out, min(a.budgets), [f"model.family={fam}"])
            for fam in a.compare
        ]
        random_dir = random_base(runs[0]["export"], out / "random_init")
        rows = {("random", m): finetune(random_dir, "random", m, out, a.finetune_steps, sst2) for m in METHODS}
        for r in runs:
            for m in METHODS if r["name"].startswith("modernbert") else ["lora"]:
                rows[(r["name"], m)] = finetune(r["export"], r["name"], m, out, a.finetune_steps, sst2)
        low = {}
        if a.low_data:
            largest = next(r for r in runs if r["minutes"] == max(a.budgets))
            for name, base in (("random", random_dir), (largest["name"], largest["export"])):
                for m in METHODS:
                    low[(name, m)] = [
                        finetune(base, name, m, out, a.finetune_steps, sst2, a.low_data, seed)["test_accuracy"]
                        for seed in a.low_data_seeds
                    ]
    plot(runs, out / "mlm_accuracy.png", CORPORA[a.corpus])

    train = manifest["splits"]["train"]
    print(
        f"\nCorpus: {CORPORA[a.corpus]}: {train['num_documents']:,} documents, {train['num_tokens']:,} training "
        f"tokens in {train['num_samples']:,} samples of {manifest['seq_len']}"
    )
    print(
        f"Finetuning: SST-2 train ({a.finetune_steps} steps x 32), best step on dev, test accuracy; same for every row"
    )
    print(
        f"\n{'pretraining':<22} {'steps':>6} {'MLM loss':>9} {'mask acc':>9} {'LoRA test':>10} {'full test':>10} "
        f"{'LoRA gain':>10} {'full gain':>10}"
    )
    lora0, full0 = rows[("random", "lora")]["test_accuracy"], rows[("random", "full")]["test_accuracy"]
    print(
        f"{'none (random init)':<22} {'-':>6} {'-':>9} {'-':>9} {100 * lora0:>9.1f}% {100 * full0:>9.1f}% {'-':>10} "
        f"{'-':>10}"
    )
    figures: dict = {"random_lora_test": lora0, "random_full_test": full0, "finetune_steps": a.finetune_steps}
    for r in runs:
        lora, full = rows[(r["name"], "lora")]["test_accuracy"], rows.get((r["name"], "full"), {}).get("test_accuracy")
        fmt = lambda v: f"{100 * v:>9.1f}%" if v is not None else f"{'-':>10}"  # noqa: E731
        gain = lambda v, b: f"{100 * (v - b):>+9.1f}p" if v is not None else f"{'-':>10}"  # noqa: E731
        print(
            f"{r['name']:<22} {r['steps']:>6} {r['eval_mlm_loss']:>9.2f} {100 * r['eval_mlm_accuracy']:>8.1f}% "
            f"{fmt(lora)} {fmt(full)} {gain(lora, lora0)} {gain(full, full0)}"
        )
        figures[r["name"]] = {
            "budget_min": r["minutes"],
            "steps": r["steps"],
            "tokens_seen": r["tokens_seen"],
            "eval_mlm_loss": r["eval_mlm_loss"],
            "eval_mlm_accuracy": r["eval_mlm_accuracy"],
            "lora_test": lora,
            "full_test": full,
            "lora_gain": lora - lora0,
            "full_gain": None if full is None else full - full0,
            "lora_minus_random_full": lora - full0,
        }
    if low:
        import statistics

        print(
            f"\nLow data: {a.low_data} training examples (stratified sample, one per seed), same steps; seeds "
            f"{a.low_data_seeds}"
        )
        for (name, m), accs in low.items():
            sd = f" (sd {100 * statistics.stdev(accs):.1f})" if len(accs) > 1 else ""
            gain = (
                ""
                if name == "random"
                else f"  gain vs random {100 * (statistics.mean(accs) - statistics.mean(low[('random', m)])):+.1f}p"
            )
            print(
                f"{name:<22} {m:<5} test {100 * statistics.mean(accs):.1f}%{sd}  "
                f"[{' '.join(f'{100 * x:.1f}' for x in accs)}]{gain}"
            )
            figures[f"low_data_{name}_{m}_test"] = statistics.mean(accs)
            figures[f"low_data_{name}_{m}_test_per_seed"] = accs
        figures["low_data_examples"] = a.low_data
    best = max((v for k, v in rows.items() if k[0] != "random"), key=lambda v: v["test_accuracy"])
    figures["best_pretrained_test"] = best["test_accuracy"]
    figures["bert_tiny_reference_test"] = 0.832
    figures["wall_minutes"] = (time.time() - started) / 60
    figures["corpus"], figures["corpus_train_tokens"] = a.corpus, train["num_tokens"]
    print(
        f"\nBest pretrained row: {100 * best['test_accuracy']:.1f}% test (BERT-Tiny, pretrained on billions of "
        f"words: 83.2%). Plot: {out / 'mlm_accuracy.png'}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
