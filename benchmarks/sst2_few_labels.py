"""Few labels plus the task's own unlabeled text: does pretraining pay on SST-2?

    python benchmarks/sst2_few_labels.py [--labels 500 1000 4000] [--seeds 0 1 2]
                                         [--wiki-steps 3000] [--task-steps 3000] [--continued-steps 750]
                                         [--finetune-steps 200] [--finetune-override KEY=VALUE ...]
                                         [--methods lora full] [--out DIR] [--sst2 ../shared/data/sst2]

1. Two corpora, one tokenizer. WikiText-2 raw train split (preset ``data_wikitext2``, its
   WordPiece 8192 trained on it), and the in-domain text: every SST-2 training sentence, labels
   dropped (``classify.training_texts``, the whole training split: what a pipeline with
   ``pretrain_on_task_text`` and ``task_text_examples: training_split`` adds), tokenized with
   the WikiText-2 tokenizer so that every row shares a vocabulary. No dev or test sentence.
2. Three pretrainings of preset ``pretrain_small`` on Ray Train (2 workers, ZeRO-2), each a
   fixed number of steps, so that the budgets hold however busy the machine is (0.4-0.55 s per
   step on 2 idle cores of the current machine: 3,000 steps in 20-28 min): WikiText-2 only;
   in-domain only (self-pretraining, from scratch); WikiText-2 then in-domain (the WikiText-2
   export, continued with ``model.init_from`` for a quarter of its steps).
3. Finetunes preset ``finetune_sst2`` from each export and from a random-init model of the same
   architecture, with LoRA and with full finetuning, on 500 / 1,000 / 4,000 labels (a stratified
   sample of SST-2 train per seed: ``task.train_examples``, ``optim.seed``), the same steps and
   batch in every row; best step on dev, test accuracy reported. The finetunes run the finetune
   recipe in one process each (no Ray; two at a time, one core each): the same code as
   ``ptft finetune``, without the cluster's start-up per job.

Prints the table (mean +- sd over seeds), writes ``few_labels.png`` (test accuracy vs labels, one
line per row and method) and ``results.json`` into --out (with ``--finetune-override``, their
names and the finetunes' run directories carry the overrides), and prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "disabled")

from sst2_quality import METHODS, random_base  # noqa: E402  (the same two methods, the same random init)

from ptft_dist import config as C  # noqa: E402
from ptft_dist import jobs, launcher  # noqa: E402

ROWS = {
    "random": "random init",
    "wiki": "WikiText-2",
    "task": "in-domain (SST-2 text)",
    "wiki+task": "WikiText-2 then in-domain",
}


def build_corpora(out: Path, sst2: Path) -> tuple[Path, Path]:
    """The WikiText-2 dataset and the in-domain dataset (SST-2 training text, same tokenizer)."""
    from ptft_dist.classify import training_texts
    from ptft_dist.data.build import tokenizer_dir

    wiki = out / "data" / "wiki"
    if not (wiki / "manifest.json").is_file():
        cfg = C.load("data", "data_wikitext2", [f"data.output_dir={wiki}"])
        jobs.build_data(cfg.data, out / "data" / "wiki_build")
    task = out / "data" / "task"
    if not (task / "manifest.json").is_file():
        texts = training_texts(finetune_config(out / "unused", sst2, []), "training_split")
        corpus = out / "data" / "sst2_train_text.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        cfg = C.load(
            "data",
            "data_wikitext2",
            [
                f"data.output_dir={task}",
                f"data.inputs={json.dumps([str(corpus)])}",
                f"data.tokenizer.path={tokenizer_dir(wiki)}",
                "data.shard_size_mb=0.25",  # a small corpus: still several shards to shuffle
            ],
        )
        jobs.build_data(cfg.data, out / "data" / "task_build")
    return wiki, task


def pretrain(name: str, dataset: Path, out: Path, steps: int, overrides: list[str]) -> dict:
    """One pretraining of ``steps`` steps, cached in a run directory named by the row and its budget."""
    run_dir = out / "pretrain" / f"{name}-{steps}"
    if not (run_dir / "summary.json").is_file():
        cfg = C.load(
            "pretrain",
            "pretrain_small",
            [
                f"data.dataset_dir={dataset}",
                f"run_dir={run_dir}",
                "time_budget_s=null",
                f"optim.max_steps={steps}",
                *overrides,
            ],
        )
        jobs.pretrain(cfg)
    m = json.loads((run_dir / "summary.json").read_text())["metrics"]
    return {
        "export": run_dir / "export",
        "steps": m["steps"],
        "train_time_s": m["train_time_s"],
        "tokens_seen": m["tokens_seen"],
        "eval_mlm_accuracy": m["eval_mlm_accuracy"],
    }


def finetune_config(run_dir: Path, sst2: Path, overrides: list[str]):
    splits = {"train": "train", "validation": "dev", "test": "test"}
    return C.load(
        "finetune",
        "finetune_sst2",
        [
            f"run_dir={run_dir}",
            *(f"task.{k}_file={sst2 / v}.tsv" for k, v in splits.items()),
            # one process of one core (two finetunes at a time on two cores)
            "scaling.num_workers=1",
            "scaling.cpus_per_worker=1",
            "optim.micro_batch_size_per_rank=32",  # the global batch in one micro batch
            *overrides,
        ],
    )


def _finetune_one(run_dir: str, sst2: str, overrides: list[str]) -> dict:
    """One finetune in this (spawned) process: the finetune recipe on a process group of one."""
    import logging

    import transformers

    from ptft_dist.recipes import finetune as recipe
    from ptft_dist.world import World

    logging.basicConfig(level=logging.WARNING)
    transformers.logging.set_verbosity_error()  # each load's report of the new head, 72 times
    summary = Path(run_dir) / "summary.json"
    if not summary.is_file():
        cfg = jobs._resolve_finetune(finetune_config(Path(run_dir), Path(sst2), overrides))
        jobs.prepare_run_dir(cfg.run_dir, cfg)
        recipe.run(cfg, World())
    m = json.loads(summary.read_text())["metrics"]
    return {"test": m["test_accuracy"], "dev": m["best_val_accuracy"], "train_time_s": m["train_time_s"]}


def plot(table: dict, labels: list[int], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    if len(labels) == 1:  # one label count: a bar per row and method
        (n,) = labels
        for method, shift in (("lora", -0.2), ("full", 0.2)):
            if method not in methods:
                continue
            accs = [table[(row, method, n)] for row in ROWS]
            means = [100 * statistics.mean(a) for a in accs]
            sds = [100 * statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
            ax.bar([i + shift for i in range(len(ROWS))], means, 0.4, yerr=sds, capsize=3, label=method)
        ax.set_xticks(range(len(ROWS)), list(ROWS.values()), fontsize=8)
        ax.set_ylim(50, None)
        ax.set_ylabel(f"SST-2 test accuracy (%), {n:,} labels, mean +- sd")
        ax.set_title("Pretraining with few labels: ModernBERT 256x4 on 2 CPU cores")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    for row, title in ROWS.items():
        for method, style in (("lora", "-"), ("full", "--")):
            if method not in methods:
                continue
            accs = [table[(row, method, n)] for n in labels]
            means = [100 * statistics.mean(a) for a in accs]
            sds = [100 * statistics.stdev(a) if len(a) > 1 else 0.0 for a in accs]
            ax.errorbar(labels, means, yerr=sds, linestyle=style, marker="o", capsize=3, label=f"{title}, {method}")
    ax.set_xscale("log")
    ax.minorticks_off()  # only the label counts measured
    ax.set_xticks(labels, [f"{n:,}" for n in labels])
    ax.set_xlabel("labeled SST-2 training examples")
    ax.set_ylabel("SST-2 test accuracy (%), mean +- sd over seeds")
    ax.set_title("Pretraining with few labels: ModernBERT 256x4 on 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, nargs="+", default=[500, 1000, 4000])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--wiki-steps", type=int, default=3000, help="WikiText-2 pretraining steps (x32 x128 tokens)")
    p.add_argument("--task-steps", type=int, default=3000, help="in-domain pretraining steps, from scratch")
    p.add_argument("--continued-steps", type=int, default=750, help="in-domain steps after the WikiText-2 run")
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--finetune-eval-every", type=int, default=50)
    p.add_argument(
        "--finetune-override",
        action="append",
        default=[],
        help="a finetune config override for every row (e.g. pooling=mean), before each method's own; repeatable. "
        "The finetunes' run directories carry it, so each recipe is cached apart",
    )
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--parallel", type=int, default=2, help="finetunes at a time (one core each)")
    p.add_argument("--out", default=str(ROOT / "runs" / "sst2_few_labels"))
    p.add_argument("--sst2", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    a = p.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    out, sst2 = Path(a.out).resolve(), Path(a.sst2).resolve()
    for split in ("train", "dev", "test"):
        if not (sst2 / f"{split}.tsv").is_file():
            sys.exit(f"--sst2 {sst2}: {split}.tsv is missing")
    started = time.time()

    # 1-2. The corpora and the three pretrainings (Ray Train, 2 workers).
    with launcher.session(num_cpus=2):
        wiki_data, task_data = build_corpora(out, sst2)
        pre = {"wiki": pretrain("wiki", wiki_data, out, a.wiki_steps, [])}
        pre["task"] = pretrain("task", task_data, out, a.task_steps, [])
        pre["wiki+task"] = pretrain(
            f"wiki{a.wiki_steps}+task", task_data, out, a.continued_steps, [f"model.init_from={pre['wiki']['export']}"]
        )
    bases = {"random": random_base(pre["wiki"]["export"], out / "random_init")}
    bases.update({name: r["export"] for name, r in pre.items()})

    # 3. The finetunes: rows x methods x label counts x seeds, the same budget in each.
    runs = {}
    # a recipe's own run directories and files: its overrides, and its steps when not the default
    tag = "".join(f"-{o.replace('=', '_')}" for o in a.finetune_override)
    if a.finetune_steps != p.get_default("finetune_steps"):
        tag += f"-steps{a.finetune_steps}"
    with ProcessPoolExecutor(a.parallel, mp_context=get_context("spawn")) as pool:
        for row, base in bases.items():
            for method in a.methods:
                for n in a.labels:
                    for seed in a.seeds:
                        run_dir = out / "finetune" / f"{row}-{method}-{n}-s{seed}{tag}"
                        overrides = [
                            f"base_model={base}",
                            f"optim.max_steps={a.finetune_steps}",
                            f"eval_every_steps={a.finetune_eval_every}",
                            f"task.train_examples={n}",
                            f"optim.seed={seed}",
                            *a.finetune_override,
                            *METHODS[method],
                        ]
                        runs[(row, method, n, seed)] = pool.submit(_finetune_one, str(run_dir), str(sst2), overrides)
        results = {k: f.result() for k, f in runs.items()}
    table = {
        (row, method, n): [results[(row, method, n, s)]["test"] for s in a.seeds]
        for row in bases
        for method in a.methods
        for n in a.labels
    }
    plot(table, a.labels, a.methods, out / f"few_labels{tag}.png")

    # The table, then the goal's comparison at 1,000 labels.
    def cell(accs: list[float]) -> str:
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        return f"{100 * statistics.mean(accs):5.1f} +- {100 * sd:3.1f}"

    print(
        f"\nSST-2 test accuracy (%), mean +- sd over seeds {a.seeds}; {a.finetune_steps} finetune steps x 32"
        + "".join(f", {o}" for o in a.finetune_override)
    )
    print(f"{'pretraining':<28} {'method':<6} " + " ".join(f"{f'{n:,} labels':>15}" for n in a.labels))
    for row, title in ROWS.items():
        for method in a.methods:
            print(f"{title:<28} {method:<6} " + " ".join(f"{cell(table[(row, method, n)]):>15}" for n in a.labels))
    for name, r in pre.items():
        print(
            f"pretraining {ROWS[name]}: {r['steps']} steps in {r['train_time_s'] / 60:.1f} min, "
            f"masked-token accuracy {100 * r['eval_mlm_accuracy']:.1f}%"
        )
    figures: dict = {
        "test_accuracy": {f"{row}/{method}/{n}": accs for (row, method, n), accs in table.items()},
        "pretraining": {k: {kk: v for kk, v in r.items() if kk != "export"} for k, r in pre.items()},
        "finetune_steps": a.finetune_steps,
        "finetune_overrides": a.finetune_override,
        "seeds": a.seeds,
    }
    if 1000 in a.labels and set(a.methods) == set(METHODS):
        mean = {k: statistics.mean(v) for k, v in table.items() if k[2] == 1000}
        best = max(("wiki", "task", "wiki+task"), key=lambda r: mean[(r, "lora", 1000)])
        figures["goal_1000"] = {
            "best_pretrained_lora_row": best,
            "lora_minus_random_full": mean[(best, "lora", 1000)] - mean[("random", "full", 1000)],
            "lora_minus_random_lora": mean[(best, "lora", 1000)] - mean[("random", "lora", 1000)],
        }
        g = figures["goal_1000"]
        print(
            f"\n1,000 labels: best pretrained LoRA row ({ROWS[best]}) vs random init + full "
            f"{100 * g['lora_minus_random_full']:+.1f} points (goal +8), vs random init + LoRA "
            f"{100 * g['lora_minus_random_lora']:+.1f} points (goal +10)"
        )
    figures["wall_minutes"] = (time.time() - started) / 60
    (out / f"results{tag}.json").write_text(json.dumps(figures, indent=1))
    print(f"Plot: {out / f'few_labels{tag}.png'}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
