"""The DeepSpeed ZeRO step of ptft's engine against the torch DDP step, alternating step by step
in the same 2 processes, and the pieces that differ between them.

    python benchmarks/paired_step.py [--steps 40] [--stages 2 0]
    python benchmarks/paired_step.py --pieces [--repeats 12]

The model, data and batch of ``benchmarks/train_throughput.py`` (ModernBERT 256 x 4, 16 x 128
tokens per rank, 2 ranks x 1 thread, gloo). Each rank holds one model per setup, all from the
same initial weights: torch DDP (AdamW as torch defaults it, and fused), and DeepSpeed engines
built by ptft's ``engine.initialize`` with the ds config of a run (ZeRO stage ``--stages``,
ptft's CPU defaults: the direct all-gather and fused AdamW), plus ZeRO-2 with each of those
turned back. Every step runs every setup once on the same micro batch, in an order that
reverses from step to step, each between two barriers. A machine whose speed drifts by 10% in
minutes moves all setups alike here, so a few percent resolve: the table gives the median ms
per step (after 5 warm-up steps) and the median of the per-step ratios DDP / setup. No Ray, no
data pipeline and no recipe: the engine's step alone (``train_throughput.py`` has the rest).

``--pieces``: what differs, alone, on 2 gloo ranks: the all-reduce of all gradients (DDP's and
ZeRO-2's), the all-gather of the updated halves (ZeRO-2's) by gloo and by
``world.direct_all_gather``, and AdamW over one rank's half in torch's default loop and fused.
Medians of ``--repeats``.

Prints a table and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_throughput as tt  # noqa: E402

from ptft_dist import engine as E  # noqa: E402
from ptft_dist.data.build import read_manifest  # noqa: E402
from ptft_dist.world import World, direct_all_gather  # noqa: E402

WORLD, WARMUP = 2, 5


def _engine_setup(dataset: Path, cfg, stage: int, *, direct: bool, fused: bool):
    """One step of a DeepSpeed engine as ptft's recipe runs it (forward, loss.item(), backward,
    step), with the all-gather and AdamW asked for."""
    torch.manual_seed(0)
    model, _ = tt.make_model(dataset, tt.MODEL)
    ds = E.ds_config(
        cfg.optim, dataclasses.replace(cfg.zero, stage=stage), cfg.scaling, hidden_size=tt.MODEL["hidden_size"]
    )
    engine = E.initialize(model, cfg.optim, ds, fused=fused)

    def step(inputs, labels) -> None:
        E.use_direct_all_gather(direct)  # process-wide: set before every step
        loss = engine(input_ids=inputs, labels=labels).loss
        loss.item()
        engine.backward(loss)
        engine.step()

    return step


def _ddp_setup(dataset: Path, *, fused: bool):
    torch.manual_seed(0)
    model, _ = tt.make_model(dataset, tt.MODEL)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3, fused=fused or None)
    return lambda inputs, labels: tt._train_step(ddp, opt, inputs, labels)


def _steps_worker(rank: int, port: int, dataset: str, work: str, steps: int, stages: list[int]) -> None:
    tt.set_rank_env(rank, WORLD, port)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    data_dir = Path(dataset)
    cfg = tt.ptft_config(data_dir, Path(work), steps, WARMUP)
    E.init_distributed(World(rank=rank, local_rank=rank, world_size=WORLD), cfg.scaling, cfg.zero)
    setups = {
        "torch DDP": _ddp_setup(data_dir, fused=False),
        "torch DDP, fused AdamW": _ddp_setup(data_dir, fused=True),
    }
    for stage in stages:
        setups[f"ZeRO-{stage} (ptft's defaults)"] = _engine_setup(data_dir, cfg, stage, direct=True, fused=True)
    if 2 in stages:
        setups["ZeRO-2, gloo's all-gather"] = _engine_setup(data_dir, cfg, 2, direct=False, fused=True)
        setups["ZeRO-2, torch's default AdamW"] = _engine_setup(data_dir, cfg, 2, direct=True, fused=False)
        setups["ZeRO-2, neither (before)"] = _engine_setup(data_dir, cfg, 2, direct=False, fused=False)
    manifest = read_manifest(data_dir)
    samples = tt.train_samples(data_dir, tt.GLOBAL_BATCH * 40)
    micro = tt.GLOBAL_BATCH // WORLD
    times: dict[str, list[float]] = {name: [] for name in setups}
    names = list(setups)
    for step in range(steps):
        lo = (step % 40) * tt.GLOBAL_BATCH + rank * micro
        inputs, labels = tt._mask(samples[lo : lo + micro], manifest, step * WORLD + rank)
        for name in names if step % 2 == 0 else names[::-1]:
            dist.barrier()
            t = time.perf_counter()
            setups[name](inputs, labels)
            dist.barrier()
            times[name].append(time.perf_counter() - t)
    if rank == 0:
        ddp = times["torch DDP"][WARMUP:]
        out = {
            name: {
                "ms": round(1000 * statistics.median(t[WARMUP:]), 1),
                "ddp_over_it": round(statistics.median(d / s for d, s in zip(ddp, t[WARMUP:])), 4),
            }
            for name, t in times.items()
        }
        Path(work, "paired.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t)
    return round(1000 * statistics.median(times[2:]), 2)


def _pieces_worker(rank: int, port: int, work: str, repeats: int, numel: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    grads, half, gathered = torch.randn(numel), torch.randn(numel // WORLD), torch.empty(numel // WORLD * WORLD)
    out = {
        f"all-reduce of the gradients ({4 * numel / 1e6:.0f} MB)": _median_ms(lambda: dist.all_reduce(grads), repeats),
        "all-gather of the halves, gloo": _median_ms(lambda: dist.all_gather_into_tensor(gathered, half), repeats),
        "all-gather of the halves, direct": _median_ms(lambda: direct_all_gather(gathered, half), repeats),
    }
    for name, fused in (("AdamW over a half, torch's default", None), ("AdamW over a half, fused", True)):
        param = torch.nn.Parameter(torch.randn(numel // WORLD))
        param.grad = torch.randn_like(param)
        out[name] = _median_ms(torch.optim.AdamW([param], lr=1e-3, fused=fused).step, repeats)
    if rank == 0:
        Path(work, "pieces.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 0])
    parser.add_argument("--pieces", action="store_true", help="the collectives and AdamW alone")
    parser.add_argument("--repeats", type=int, default=12, help="--pieces: repeats of each")
    a = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ptft_paired_") as tmp:
        work = Path(tmp)
        if a.pieces:
            numel = sum(p.numel() for p in tt.make_model(tt.build_dataset(work), tt.MODEL)[0].parameters())
            args = (tt.free_port(), str(work), a.repeats, numel)
            torch.multiprocessing.spawn(_pieces_worker, args=args, nprocs=WORLD)
            figures = json.loads((work / "pieces.json").read_text())
            print(f"\n{'on 2 gloo ranks, 1 thread each':<48} {'ms, median':>10}")
            for name, ms in figures.items():
                print(f"{name:<48} {ms:>10.2f}")
        else:
            args = (tt.free_port(), str(tt.build_dataset(work)), str(work), a.steps, a.stages)
            torch.multiprocessing.spawn(_steps_worker, args=args, nprocs=WORLD)
            figures = json.loads((work / "paired.json").read_text())
            print(f"\n{'setup':<34} {'ms per step':>12} {'DDP / it, median of steps':>26}")
            for name, row in figures.items():
                print(f"{name:<34} {row['ms']:>12.1f} {row['ddp_over_it']:>26.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
