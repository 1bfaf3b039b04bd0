"""Training throughput and ZeRO memory, side by side in one run.

    python benchmarks/train_throughput.py [--steps 40] [--repeats 2] [--skip-memory] [--stages 2 0]
        [--variant "OVERRIDES" ...]

Same model (ModernBERT masked LM, hidden 256, 4 layers, seq 128, vocab 8192), same data
(WikiText-2 shards built here), same global batch (32 x 128 tokens), same masking (30%):

  (a) ptft pretrain (Ray Train, 2 workers, DeepSpeed ZeRO-2)  vs  a plain single-process
      PyTorch AdamW loop (2 threads)  and  plain torch DDP with 2 processes (1 thread each);
      the row "ptft recipe without Ray" runs the same recipe in 2 spawned processes (a plain
      gloo process group, as torchrun starts it), which separates Ray's share from
      DeepSpeed's and the recipe's;
  (b) ptft  vs  HF Trainer + DataCollatorForLanguageModeling on the same samples;
  (c) per-rank memory of the model states (parameters, gradients, optimizer states: the bytes
      of every live tensor, at their peak after the 2nd backward, and after the 2nd step) for
      ZeRO stages 0-3 on a ~50M-parameter model with 2 ranks, fp32 and bf16, against ZeRO's
      theory (bf16 bytes per parameter at the peak: 16, 2+2+12/N, 2+(2+12)/N, 16/N).

Tokens/s count every input token of the steady-state steps (the first `--warmup` steps are
excluded), over the wall time of those steps as a whole in every setup: ptft logs its metrics
every `--warmup` steps (a run's own windows, as a user runs it; its default is 10) and the
first window is left out; the hand-written loops take the clock once the warm-up steps are
done. Every round runs every setup once, each round starting one setup later than the last
(the order rotates); the ptft rows run in a fresh Ray session after one untimed warm-up job.
"torch DDP, one bucket" is DDP without its overlap of the gradient all-reduce with the
backward, as DeepSpeed reduces on the CPU. Prints a table and, last, one JSON line of the
figures: each setup's best round, ptft's ratio to each baseline from those
(``ratio_ptft_vs_*``), and the median over rounds of the ratio within each round
(``median_ratio_ptft_vs_*``), which a machine that drifts between rounds moves less.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")
os.environ.setdefault("WANDB_MODE", "disabled")

from ptft_dist import config as C  # noqa: E402
from ptft_dist import jobs, models  # noqa: E402
from ptft_dist.data.build import read_manifest  # noqa: E402
from ptft_dist.data.mlm import mask_tokens  # noqa: E402

MODEL = dict(family="modernbert", hidden_size=256, num_layers=4, num_heads=4, intermediate_size=512)
GLOBAL_BATCH, SEQ_LEN, MLM_P = 32, 128, 0.3


def build_dataset(work: Path) -> Path:
    out = work / "data"
    jobs.build_data(
        C.load("data", overrides=[f"data.output_dir={out}", "data.samples_per_shard=2048"]).data, work / "build"
    )
    return out


def train_samples(dataset: Path, n: int) -> torch.Tensor:
    manifest = read_manifest(dataset)
    dtype = np.dtype(manifest["dtype"])
    rows = []
    from ptft_dist.data.stream import iter_shard

    for shard in manifest["splits"]["train"]["shards"]:
        for _, ids in iter_shard(str(dataset / shard["file"]), dtype, manifest["seq_len"]):
            rows.append(ids.astype(np.int64))
            if len(rows) == n:
                return torch.from_numpy(np.stack(rows))
    return torch.from_numpy(np.stack(rows))


def make_model(dataset: Path, model_kw: dict):
    manifest = read_manifest(dataset)
    cfg = C.ModelConfig(**model_kw)
    hf = models.mlm_config(cfg, vocab_size=manifest["vocab_size"], special_ids=manifest["tokenizer"]["special_ids"])
    return models.build_mlm(cfg, hf), manifest


def steady_tokens_per_s(step_times: list[float], tokens_per_step: int, warmup: int) -> float:
    timed = step_times[warmup:]
    return tokens_per_step * len(timed) / sum(timed)


# --------------------------------------------------------------------------- (a) ptft


def ptft_config(
    dataset: Path, work: Path, steps: int, warmup: int, stage: int = 2, name: str | None = None, extra: list[str] = ()
) -> C.PretrainConfig:
    """The ptft run of every ptft row: metrics every ``warmup`` steps, so that the first
    window is the warm-up."""
    return C.load(
        "pretrain",
        "pretrain_tiny",
        [
            f"data.dataset_dir={dataset}",
            f"run_dir={work / (name or f'ptft_z{stage}')}",
            *(f"model.{k}={v}" for k, v in MODEL.items()),
            f"optim.global_batch_size={GLOBAL_BATCH}",
            "optim.micro_batch_size_per_rank=16",
            f"optim.max_steps={steps}",
            f"zero.stage={stage}",
            f"tracking.log_every_steps={max(1, warmup)}",
            f"eval_every_steps={10 * steps}",
            "data.num_eval_samples=32",
            f"data.mlm_probability={MLM_P}",
            *extra,
        ],
    )


def window_tokens_per_s(run_dir: str | Path) -> float:
    """Tokens/s over a ptft run's metric windows after the first (the warm-up): the windows'
    steps over their wall time, each window timed whole by the run."""
    rows = [json.loads(line) for line in open(Path(run_dir, "metrics.jsonl")) if '"step_time_s"' in line]
    timed = rows[1:] if len(rows) > 1 else rows
    steps = [b["step"] - a["step"] for a, b in zip(rows, rows[1:])] if len(rows) > 1 else [rows[0]["step"]]
    seconds = sum(n * r["step_time_s"] for n, r in zip(steps, timed))
    return GLOBAL_BATCH * SEQ_LEN * sum(steps) / seconds


def run_ptft(
    dataset: Path, work: Path, steps: int, warmup: int, stage: int = 2, name: str | None = None, extra: list[str] = ()
) -> float:
    cfg = ptft_config(dataset, work, steps, warmup, stage, name, extra)
    jobs.pretrain(cfg)
    return window_tokens_per_s(cfg.run_dir)


# --------------------------------------------------------------------------- (a') ptft without Ray


def set_rank_env(rank: int, world: int, port: int) -> None:
    """What torchrun sets for a rank on this machine (and DeepSpeed's CPU accelerator)."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )


def _recipe_worker(rank: int, world: int, port: int, recipe: str, config_class: str, cfg: dict) -> None:
    """One rank of a ptft recipe in a plain gloo process group, set up as torchrun does."""
    import importlib

    import torch.distributed as dist

    from ptft_dist.world import World

    set_rank_env(rank, world, port)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    dist.init_process_group("gloo", rank=rank, world_size=world)
    importlib.import_module(f"ptft_dist.recipes.{recipe}").run(
        C.from_dict(getattr(C, config_class), cfg), World.from_env()
    )
    dist.destroy_process_group()


def run_recipe_spawned(recipe: str, cfg, nprocs: int = 2) -> None:
    """A ptft recipe on ``nprocs`` spawned processes, without Ray (``cfg`` resolved: absolute paths)."""
    jobs.prepare_run_dir(cfg.run_dir, cfg)
    args = (nprocs, free_port(), recipe, type(cfg).__name__, C.to_dict(cfg))
    torch.multiprocessing.spawn(_recipe_worker, args=args, nprocs=nprocs)


def run_ptft_without_ray(dataset: Path, work: Path, steps: int, warmup: int, stage: int = 2) -> float:
    cfg = jobs._resolve_pretrain(ptft_config(dataset, work, steps, warmup, stage, name=f"noray_z{stage}"))
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # the round before: its metrics, its checkpoint
    run_recipe_spawned("pretrain", cfg)
    return window_tokens_per_s(cfg.run_dir)


# --------------------------------------------------------------------------- plain loops


def _mask(ids: torch.Tensor, manifest: dict, seed: int):
    sp = manifest["tokenizer"]["special_ids"]
    return mask_tokens(
        ids,
        mlm_probability=MLM_P,
        mask_id=sp["mask"],
        vocab_size=manifest["vocab_size"],
        special_ids=[sp["cls"], sp["sep"], sp["pad"]],
        generator=torch.Generator().manual_seed(seed),
    )


def _train_step(model, opt, inputs: torch.Tensor, labels: torch.Tensor) -> None:
    """One AdamW step with clipping, the same in every hand-written loop."""
    loss = model(input_ids=inputs, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def run_plain(dataset: Path, work: Path, steps: int, warmup: int) -> float:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, manifest = make_model(dataset, MODEL)
    data = train_samples(dataset, GLOBAL_BATCH * steps)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for step in range(steps):
        t = time.perf_counter()
        inputs, labels = _mask(data[step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH], manifest, step)
        _train_step(model, opt, inputs, labels)
        times.append(time.perf_counter() - t)
    return steady_tokens_per_s(times, GLOBAL_BATCH * SEQ_LEN, warmup)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(
    rank: int, world: int, port: int, dataset: str, steps: int, warmup: int, out: str, bucket_cap_mb: float | None
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, manifest = make_model(Path(dataset), MODEL)
    ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=bucket_cap_mb)
    data = train_samples(Path(dataset), GLOBAL_BATCH * steps)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    micro = GLOBAL_BATCH // world
    for step in range(steps):
        if step == warmup:  # the clock starts with both ranks past the warm-up
            dist.barrier()
            started = time.perf_counter()
        lo = step * GLOBAL_BATCH + rank * micro
        inputs, labels = _mask(data[lo : lo + micro], manifest, step * world + rank)
        _train_step(ddp, opt, inputs, labels)
    dist.barrier()  # the last step is done on every rank
    if rank == 0:
        Path(out).write_text(json.dumps(GLOBAL_BATCH * SEQ_LEN * (steps - warmup) / (time.perf_counter() - started)))
    dist.destroy_process_group()


def run_ddp(dataset: Path, work: Path, steps: int, warmup: int, bucket_cap_mb: float | None = None) -> float:
    """Torch DDP as users run it (``bucket_cap_mb`` None): buckets of 25 MB after a first one of
    1 MB, each all-reduced as soon as the backward has filled it. (Any value given, even 25,
    makes the first bucket that size too.)"""
    out = work / "ddp_tokens_per_s.json"
    args = (2, free_port(), str(dataset), steps, warmup, str(out), bucket_cap_mb)
    torch.multiprocessing.spawn(_ddp_worker, args=args, nprocs=2)
    return json.loads(out.read_text())


def run_ddp_one_bucket(dataset: Path, work: Path, steps: int, warmup: int) -> float:
    """DDP without its overlap: every gradient in one bucket (the model's 19 MB of fp32
    gradients fit in 1 GB, and a given cap sizes the first bucket too), so the all-reduce
    starts when the backward is done, as DeepSpeed's CPU path reduces."""
    return run_ddp(dataset, work, steps, warmup, bucket_cap_mb=1024)


def run_hf_trainer(dataset: Path, work: Path, steps: int, warmup: int) -> float:
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, manifest = make_model(dataset, MODEL)
    model = models.unwrap(model)[0]
    tok = AutoTokenizer.from_pretrained(str(dataset / "tokenizer"))
    data = train_samples(dataset, GLOBAL_BATCH * steps)
    rows = [{"input_ids": r} for r in data.tolist()]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    args = TrainingArguments(
        output_dir=str(work / "hf"),
        per_device_train_batch_size=GLOBAL_BATCH,
        max_steps=steps,
        learning_rate=1e-3,
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=True,
    )
    Trainer(
        model=model,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForLanguageModeling(tok, mlm_probability=MLM_P),
        callbacks=[Clock()],
    ).train()
    return steady_tokens_per_s(times, GLOBAL_BATCH * SEQ_LEN, warmup)


BASELINES = {
    "plain": run_plain,
    "ddp": run_ddp,
    "ddp_one_bucket": run_ddp_one_bucket,
    "hf_trainer": run_hf_trainer,
    "noray": run_ptft_without_ray,
}
BASELINE_TITLES = {
    "plain": "plain PyTorch, 1 process, 2 threads",
    "ddp": "torch DDP, 2 processes x 1 thread",
    "ddp_one_bucket": "torch DDP, one bucket (no overlap)",
    "hf_trainer": "HF Trainer + DataCollatorForLanguageModeling",
    "noray": "ptft recipe without Ray (2 spawned processes)",
}


# --------------------------------------------------------------------------- (c) memory


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _live_tensor_mb() -> float:
    """Bytes of every tensor storage alive in this process (parameters, gradients, optimizer
    states, DeepSpeed's flat buffers), each storage counted once: unlike RSS, this does not
    see allocator caching."""
    import gc

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        except Exception:  # tensors without storage (meta, sparse)
            continue
    return total / 2**20


def _zero_worker(rank: int, world: int, port: int, dataset: str, stage: int, out: str, precision: str = "fp32") -> None:
    import torch.distributed as dist

    set_rank_env(rank, world, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from ptft_dist import engine as E
    from ptft_dist.world import World

    big = dict(MODEL, hidden_size=640, num_layers=10, num_heads=10, intermediate_size=1280)
    optim = C.OptimConfig(global_batch_size=4, micro_batch_size_per_rank=2, lr=1e-4, warmup_steps=1, max_steps=10)
    scaling = C.ScalingConfig(num_workers=world)
    E.init_distributed(World(rank=rank, world_size=world), scaling)
    ds = E.ds_config(optim, C.ZeroConfig(stage=stage, precision=precision), scaling, hidden_size=big["hidden_size"])
    manifest = read_manifest(Path(dataset))
    data = train_samples(Path(dataset), 8)
    before, before_live = _rss_mb(), _live_tensor_mb()
    with E.model_init_context(ds):
        model, _ = make_model(Path(dataset), big)
    engine = E.initialize(model, optim, ds)
    for step in range(2):
        inputs, labels = _mask(data[rank * 2 : rank * 2 + 2], manifest, step)
        out_ = engine(input_ids=inputs, labels=labels)
        engine.backward(out_.loss)
        del out_  # the graph is freed by backward; what is left is the model states
        if step == 1:  # the peak of the model states: gradients made, optimizer states held
            with_grads = _live_tensor_mb() - before_live
        engine.step()
    grown, live = _rss_mb() - before, _live_tensor_mb() - before_live
    if rank == 0:
        Path(out).write_text(
            json.dumps(
                {
                    "rss_growth_mb": grown,
                    "tensor_mb": live,
                    "tensor_mb_with_grads": with_grads,
                    "params": models.num_params(model),
                }
            )
        )
    dist.destroy_process_group()


def run_zero_memory(dataset: Path, work: Path, stages=(0, 1, 2, 3), precision: str = "fp32") -> dict:
    results = {}
    for stage in stages:
        out = work / f"zero{stage}_{precision}.json"
        torch.multiprocessing.spawn(
            _zero_worker, args=(2, free_port(), str(dataset), stage, str(out), precision), nprocs=2
        )
        results[stage] = json.loads(out.read_text())
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=[2],
        help="ZeRO stages of the ptft rows; the first is the one the ratios use",
    )
    p.add_argument(
        "--baselines",
        nargs="+",
        choices=list(BASELINES),
        default=list(BASELINES),
        help="the loops ptft is compared with (tests/test_throughput_floor.py runs DDP alone)",
    )
    p.add_argument("--repeats", type=int, default=2, help="rounds of every setup, interleaved; the best round counts")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="one more ptft row with these overrides, space-separated (e.g. 'zero.reduce_scatter=false'); repeatable",
    )
    a = p.parse_args()
    if not a.memory_only and a.steps <= a.warmup:
        p.error(f"--steps {a.steps} leaves no step to time after --warmup {a.warmup}")
    work = Path(tempfile.mkdtemp(prefix="ptft-bench-"))
    dataset = build_dataset(work)
    figures: dict = {}
    if not a.memory_only:
        throughput(dataset, work, a, figures)
    if not a.skip_memory:
        memory(dataset, work, figures)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))


def throughput(dataset: Path, work: Path, a, figures: dict) -> None:
    """Every setup ``--repeats`` times, the rounds interleaved (each round runs every setup
    once); each figure is the best round (the least disturbed by the other jobs of a shared
    machine). The ptft rows of a round run in a fresh Ray session, after one untimed warm-up
    run: the first training job of a fresh Ray session measured 10-15% slow, whatever its
    config, while Ray's own processes were still starting up. The other setups run while no
    Ray session is up."""
    from ptft_dist import launcher

    rounds: dict[str, list[float]] = {}

    def best(key: str, value: float) -> None:
        rounds.setdefault(key, []).append(round(value))
        figures[key] = max(figures.get(key, 0.0), value)

    rows = [(f"ptft_zero{stage}_tokens_per_s", dict(stage=stage)) for stage in a.stages]
    rows += [
        (f"ptft_variant{i}_tokens_per_s", dict(name=f"variant{i}", extra=variant.split()))
        for i, variant in enumerate(a.variant)
    ]

    def ptft_rows(r: int) -> None:
        with launcher.session(num_cpus=2):
            run_ptft(dataset, work, 10, a.warmup, name=f"warmup_r{r}")
            for key, kw in rows:
                best(key, run_ptft(dataset, work, a.steps, a.warmup, **{**kw, "name": f"{kw.get('name', key)}_r{r}"}))

    def baseline(name: str):
        return lambda r: best(f"{name}_tokens_per_s", BASELINES[name](dataset, work, a.steps, a.warmup))

    setups = [*(baseline(name) for name in a.baselines), ptft_rows]
    for r in range(a.repeats):
        # each round starts one setup later, so that a drift of the machine falls on every setup alike
        for i in range(len(setups)):
            setups[(i + r) % len(setups)](r)
    figures["rounds"] = rounds
    ptft_key = f"ptft_zero{a.stages[0]}_tokens_per_s"
    figures["ptft_tokens_per_s"] = figures[ptft_key]

    def median_of_rounds(key: str) -> float:
        """ptft / this setup, paired within each round (a drift between rounds moves both sides)."""
        return statistics.median(p / b for p, b in zip(rounds[ptft_key], rounds[key]))

    for name in a.baselines:
        figures[f"ratio_ptft_vs_{name}"] = figures["ptft_tokens_per_s"] / figures[f"{name}_tokens_per_s"]
        figures[f"median_ratio_ptft_vs_{name}"] = median_of_rounds(f"{name}_tokens_per_s")
    print(f"\n{'setup':<46} {'tokens/s':>10} {'ptft / it':>10} {'median of rounds':>17}")
    for name, key in (
        *((f"ptft pretrain (Ray, 2 workers, ZeRO-{st})", f"ptft_zero{st}_tokens_per_s") for st in a.stages),
        *((f"ptft {v}", f"ptft_variant{i}_tokens_per_s") for i, v in enumerate(a.variant)),
        *((BASELINE_TITLES[b], f"{b}_tokens_per_s") for b in a.baselines),
    ):
        ratio, paired = figures["ptft_tokens_per_s"] / figures[key], median_of_rounds(key)
        print(f"{name:<46} {figures[key]:>10.0f} {ratio:>10.2f} {paired:>17.2f}")


#: Bytes per parameter per rank, 2 ranks, at the peak of the model states (after backward,
#: before the optimizer step: gradients made, optimizer states held). bf16 is the ZeRO paper's
#: mixed precision: parameters 2 + gradients 2 + fp32 master, momentum and variance 12,
#: partitioned by stage. fp32: parameters 4 + gradients 4 + Adam 8, and under ZeRO DeepSpeed
#: also keeps a separate fp32 master partition (4, partitioned).
THEORY_WITH_GRADS = {
    "fp32": {0: 16, 1: 4 + 4 + (4 + 8) / 2, 2: 4 + (4 + 4 + 8) / 2, 3: (4 + 4 + 4 + 8) / 2},
    "bf16": {0: 16, 1: 2 + 2 + 12 / 2, 2: 2 + (2 + 12) / 2, 3: 16 / 2},
}
#: The same after the step, when the gradients are freed (stage 3 keeps its gradient partition
#: buffer, stage 0 in fp32 its gradients).
THEORY = {
    "fp32": {0: 12, 1: 4 + (4 + 8) / 2, 2: 4 + (4 + 8) / 2, 3: (4 + 4 + 8 + 4) / 2},
    "bf16": {0: 14, 1: 2 + 12 / 2, 2: 2 + 12 / 2, 3: (2 + 2 + 12) / 2},
}


def memory(dataset: Path, work: Path, figures: dict, precisions=("fp32", "bf16")) -> None:
    for precision in precisions:
        mem = run_zero_memory(dataset, work, precision=precision)
        n = mem[0]["params"]
        theory = THEORY[precision]
        peak = THEORY_WITH_GRADS[precision]
        print(
            f"\nZeRO per-rank memory, {precision}, {n / 1e6:.1f}M parameters, 2 ranks: live tensor MB at the peak of "
            "the model states (after the 2nd backward) and after the 2nd step"
        )
        print(
            f"{'stage':<6} {'peak MB':>8} {'vs 0':>5} {'theory':>7} {'vs 0':>5} {'after step':>11} {'vs 0':>5} "
            f"{'theory':>7} {'vs 0':>5} {'RSS MB':>7}"
        )
        for stage, r in mem.items():
            print(
                f"{stage:<6} {r['tensor_mb_with_grads']:>8.0f} "
                f"{r['tensor_mb_with_grads'] / mem[0]['tensor_mb_with_grads']:>5.2f} {n * peak[stage] / 2**20:>7.0f} "
                f"{peak[stage] / peak[0]:>5.2f}"
                f" {r['tensor_mb']:>11.0f} {r['tensor_mb'] / mem[0]['tensor_mb']:>5.2f} "
                f"{n * theory[stage] / 2**20:>7.0f} {theory[stage] / theory[0]:>5.2f} {r['rss_growth_mb']:>7.0f}"
            )
            figures[f"{precision}_zero{stage}_rank_memory_mb"] = r["tensor_mb_with_grads"]
            figures[f"{precision}_zero{stage}_rank_memory_after_step_mb"] = r["tensor_mb"]
            figures[f"{precision}_zero{stage}_rank_rss_growth_mb"] = r["rss_growth_mb"]
        figures[f"{precision}_ratio_zero3_vs_zero0_memory"] = (
            mem[3]["tensor_mb_with_grads"] / mem[0]["tensor_mb_with_grads"]
        )
        figures[f"{precision}_ratio_zero3_vs_zero0_memory_after_step"] = mem[3]["tensor_mb"] / mem[0]["tensor_mb"]
        figures["memory_model_params"] = n


if __name__ == "__main__":
    main()
