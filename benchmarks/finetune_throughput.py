"""Finetuning throughput, side by side in one run. Three comparisons:

    python benchmarks/finetune_throughput.py [--steps 60] [--base DIR]
    python benchmarks/finetune_throughput.py --vs-ddp [--steps 60] [--repeats 3] [--base DIR] [--sst2 DIR]
    python benchmarks/finetune_throughput.py --one-process [--steps 60] [--repeats 3] [--base DIR] [--sst2 DIR]

Default, LoRA vs full finetuning: examples/s and peak memory per rank. Same model (a
ModernBERT encoder, hidden 256, 4 layers: a pretraining export given with --base, else a
freshly initialised one with the WikiText-2 tokenizer), same data (TREC-6, max 64 tokens),
same global batch (32 = 16 per rank x 2 Ray workers, ZeRO-2), same number of steps.
Examples/s are measured over the steady-state steps (the first log interval is excluded);
peak memory is rank 0's peak RSS.

``--vs-ddp``, the LoRA path against a plain loop: ``ptft finetune`` with preset
``finetune_sst2`` (Ray Train, 2 workers, ZeRO-2, LoRA r=16 on every encoder linear, mean
pooling, max 64 tokens, global batch 32) against the same peft model in torch DDP, 2
processes x 1 thread, AdamW with clipping: the same SST-2 examples in the same global
batches (ptft's length-bucketed order), each micro batch tokenized and padded to its longest
the same way. The row "without Ray" runs the same finetune recipe in 2 spawned processes
(a plain gloo process group, as torchrun starts it): Ray's share apart from DeepSpeed's and
the recipe's. Every setup runs ``--repeats`` times, interleaved; the best round counts.
Examples/s over steps 11 to the end.

``--one-process``, the recipe's step against a plain step on the same model in one process
(1 thread, no collectives): ``finetune.train_step`` (the DeepSpeed engine's forward, backward
and step; ZeRO-0, since ZeRO-2's gradient hooks own the model's gradients) against
``loss.backward()``, ``clip_grad_norm_`` and ``torch.optim.AdamW`` on the engine's own module,
the same 16-example micro batches, tokenized the same way; ms per step, alternating, best of
``--repeats``.

Each prints a table and, last, one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("WANDB_MODE", "disabled")

import train_throughput as tt  # noqa: E402

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


# --------------------------------------------------------------------------- --vs-ddp

WARMUP_STEPS = 10  # not timed: the first log window of the ptft run


def sst2_overrides(base: Path, run_dir: Path, sst2: Path, steps: int) -> list[str]:
    return [
        f"base_model={base}",
        f"run_dir={run_dir}",
        *(f"task.{k}_file={sst2 / v}.tsv" for k, v in {"train": "train", "validation": "dev", "test": "test"}.items()),
        f"optim.max_steps={steps}",
        f"tracking.log_every_steps={WARMUP_STEPS}",
        "eval_every_steps=0",  # validation once, after the timed steps
    ]


def steady_examples_per_s(run_dir: Path) -> float:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"examples_per_s"' in line]
    steady = rows[1:]  # windows of WARMUP_STEPS steps each: the overall rate is the harmonic mean
    return len(steady) / sum(1 / r["examples_per_s"] for r in steady)


def run_ptft_lora(base: Path, work: Path, sst2: Path, steps: int, name: str, extra: list[str] = ()) -> float:
    cfg = C.load("finetune", "finetune_sst2", [*sst2_overrides(base, work / name, sst2, steps), *extra])
    jobs.finetune(cfg)
    return steady_examples_per_s(work / name)


def run_ptft_lora_without_ray(base: Path, work: Path, sst2: Path, steps: int, name: str) -> float:
    """The same finetune recipe in 2 spawned processes (a plain gloo process group): no Ray."""
    cfg = jobs._resolve_finetune(C.load("finetune", "finetune_sst2", sst2_overrides(base, work / name, sst2, steps)))
    tt.run_recipe_spawned("finetune", cfg)
    return steady_examples_per_s(work / name)


def _peft_ddp_worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    """The plain loop: the peft model of the ptft run in torch DDP, one thread per process."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from ptft_dist import adapters
    from ptft_dist.classify import GlobalBatches, load_splits

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = jobs._resolve_finetune(C.load("finetune", "finetune_sst2", overrides))
    tok = AutoTokenizer.from_pretrained(cfg.base_model)
    names, train, _, _ = load_splits(cfg)
    torch.manual_seed(cfg.optim.seed)
    model, _ = adapters.build_classifier(cfg, names, {"zero_optimization": {"stage": 0}})
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    micro, steps = cfg.optim.micro_batch_size_per_rank, cfg.optim.max_steps
    # ptft's batches, made before the loop as a sampler would
    batches = GlobalBatches(np.array([len(t) for t in train.texts]), cfg.optim.global_batch_size, cfg.optim.seed)
    mine = [batches.of_step(step)[1][rank * micro : (rank + 1) * micro].tolist() for step in range(1, steps + 1)]
    for step, ids in enumerate(mine, start=1):
        if step == WARMUP_STEPS + 1:
            started = time.perf_counter()
        enc = tok(
            [train.texts[i] for i in ids],
            truncation=True,
            max_length=cfg.task.max_length,
            padding=True,
            return_tensors="pt",
        )
        labels = torch.tensor([train.labels[i] for i in ids])
        loss = ddp(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # what a loop that logs its loss does
    elapsed = time.perf_counter() - started
    if rank == 0:
        Path(out).write_text(json.dumps(cfg.optim.global_batch_size * (steps - WARMUP_STEPS) / elapsed))
    dist.destroy_process_group()


def run_peft_ddp(base: Path, work: Path, sst2: Path, steps: int, name: str) -> float:
    import torch

    out = work / f"{name}.json"
    overrides = sst2_overrides(base, work / name, sst2, steps)
    torch.multiprocessing.spawn(_peft_ddp_worker, args=(2, tt.free_port(), overrides, str(out)), nprocs=2)
    return json.loads(out.read_text())


def vs_ddp(base: Path, work: Path, sst2: Path, steps: int, repeats: int, variants: list[str]) -> None:
    """Each round: DDP and the recipe without Ray while no Ray session is up, then the ptft
    rows in a fresh Ray session after an untimed warm-up job (a fresh session's first job is
    slow)."""
    titles = {
        "ptft": "ptft finetune (Ray, 2 workers, ZeRO-2)",
        "noray": "ptft finetune recipe without Ray (2 processes)",
        "ddp": "peft + torch DDP, 2 processes x 1 thread",
    }
    titles.update({f"variant{i}": f"ptft {v}" for i, v in enumerate(variants)})
    rounds: dict[str, list[float]] = {k: [] for k in titles}
    for r in range(repeats):
        rounds["ddp"].append(run_peft_ddp(base, work, sst2, steps, f"ddp_r{r}"))
        rounds["noray"].append(run_ptft_lora_without_ray(base, work, sst2, steps, f"noray_r{r}"))
        with launcher.session(num_cpus=2):
            run_ptft_lora(base, work, sst2, WARMUP_STEPS + 10, f"warmup_r{r}")
            rounds["ptft"].append(run_ptft_lora(base, work, sst2, steps, f"ptft_r{r}"))
            for i, v in enumerate(variants):
                rounds[f"variant{i}"].append(run_ptft_lora(base, work, sst2, steps, f"variant{i}_r{r}", v.split()))
    best = {k: max(v) for k, v in rounds.items()}
    print(f"\n{'setup (LoRA, SST-2, global batch 32)':<48} {'examples/s':>10} {'vs DDP':>7}  rounds")
    for key, title in titles.items():
        print(f"{title:<48} {best[key]:>10.1f} {best[key] / best['ddp']:>7.2f}  {[round(x, 1) for x in rounds[key]]}")
    figures = {
        "ptft_lora_examples_per_s": best["ptft"],
        "peft_ddp_examples_per_s": best["ddp"],
        "ptft_lora_without_ray_examples_per_s": best["noray"],
        **{f"ptft_{k}_examples_per_s": best[k] for k in titles if k.startswith("variant")},
        "rounds": rounds,
        "ratio_ptft_vs_peft_ddp": best["ptft"] / best["ddp"],
        "ratio_without_ray_vs_peft_ddp": best["noray"] / best["ddp"],
    }
    print(json.dumps(figures))


# --------------------------------------------------------------------------- --one-process


def one_process(base: Path, work: Path, sst2: Path, steps: int, repeats: int) -> None:
    import torch

    from ptft_dist import engine
    from ptft_dist.recipes import finetune
    from ptft_dist.world import World

    overrides = sst2_overrides(base, work / "one", sst2, steps)
    overrides += ["scaling.num_workers=1", "optim.global_batch_size=16", "zero.stage=0"]
    cfg = jobs._resolve_finetune(C.load("finetune", "finetune_sst2", overrides))
    engine.init_distributed(World(), cfg.scaling)  # a process group of one, in memory
    s = finetune.setup(cfg, World())
    s.engine.train()
    model = s.engine.module
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr)

    def plain(step: int) -> None:
        ids = s.batches.of_step(step)[1].tolist()
        labels = torch.tensor([s.train.labels[i] for i in ids])
        loss = model(**finetune.encode(s, s.train, ids), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()

    def ms_per_step(step_fn) -> float:
        started = time.perf_counter()
        for step in range(1, steps + 1):
            step_fn(step)
        return 1000 * (time.perf_counter() - started) / steps

    ms_per_step(lambda step: finetune.train_step(s, step))  # warm-up
    rounds: dict[str, list[float]] = {"recipe": [], "plain": []}
    for _ in range(repeats):
        rounds["recipe"].append(ms_per_step(lambda step: finetune.train_step(s, step)))
        rounds["plain"].append(ms_per_step(plain))
    best = {k: min(v) for k, v in rounds.items()}
    print(f"\n{'one process, LoRA, micro batch 16':<48} {'ms/step':>8}  rounds")
    for key, title in (("recipe", "finetune.train_step (DeepSpeed engine)"), ("plain", "plain peft step")):
        print(f"{title:<48} {best[key]:>8.2f}  {[round(x, 2) for x in rounds[key]]}")
    print(json.dumps({"recipe_ms_per_step": best["recipe"], "plain_ms_per_step": best["plain"], "rounds": rounds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--base", help="HF directory to finetune (default: a random-init ModernBERT)")
    p.add_argument("--vs-ddp", action="store_true", help="ptft's LoRA path against peft + torch DDP, on SST-2")
    p.add_argument("--repeats", type=int, default=3, help="--vs-ddp: rounds of each setup, interleaved")
    p.add_argument("--variant", action="append", default=[], help="--vs-ddp: one more ptft row with these overrides")
    p.add_argument("--one-process", action="store_true", help="the recipe's step vs a plain step, one process")
    p.add_argument(
        "--sst2", default=str(ROOT.parent / "shared" / "data" / "sst2"), help="SST-2 TSVs (--vs-ddp, --one-process)"
    )
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ptft-ft-bench-"))
    base = Path(a.base) if a.base else random_base(work)
    if a.vs_ddp:
        vs_ddp(base, work, Path(a.sst2).resolve(), a.steps, a.repeats, a.variant)
        return
    if a.one_process:
        one_process(base, work, Path(a.sst2).resolve(), a.steps, a.repeats)
        return
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
