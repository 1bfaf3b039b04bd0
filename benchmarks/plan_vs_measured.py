"""The planner (ptft_dist/plan.py) against measurement, on CPU: peak memory per rank and step time.

    python benchmarks/plan_vs_measured.py [--sizes mini small medium] [--stages 0 1 2 3] [--micro 2 4]
        [--steps 3] [--calibrate small:0:4]

Three BERT sizes (BERT-mini, -small, -medium of the presets: hidden 256/512/512, 4/4/8 layers,
dropout 0.1, vocabulary 8192, sequence 128, 15% masked) x ZeRO stages 0-3 x two micro batches,
each on 2 ranks spawned with gloo (fp32, one thread per rank, the project's derived DeepSpeed
config, global batch = micro x 2). Random token ids: memory and time do not depend on their values.

- Memory: the bytes of every live tensor storage in rank 0 (as ``train_throughput.py
  --memory-only`` measures it), over the live tensors before the model was built, at two points
  of the second step: the end of the forward (model states + the activations kept for backward +
  the output) and the end of the backward (model states with gradients). Measured peak = the
  larger of the two; the planned peak is the same maximum of the planned terms.
- Time: the median of ``--steps`` timed optimizer steps on rank 0 (all ranks start each step
  together). The planner's CPU rate (FLOP/s per rank) is calibrated on one point
  (``--calibrate size:stage:micro``); its gloo bandwidth and per-collective latency are measured
  here by an all-reduce of 16 MB and of 4 bytes, its optimizer rate by AdamW steps over 4M
  parameters, and (when stage 3 is measured) ZeRO-3's host work per module, partitioned tensor,
  persistent tensor and reduce bucket by stacks of 8 and 40 tiny linears under ZeRO-3 (the
  slopes; ``_zero3_worker``). Every other point is a prediction.

Prints the table and, last, one JSON line of every figure. About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning,ignore::DeprecationWarning")

from ptft_dist import config as C  # noqa: E402
from ptft_dist import plan as P  # noqa: E402

SIZES = {
    "mini": dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048),
    "medium": dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=2048),
}
VOCAB, SEQ_LEN, MLM_P, WORLD, DROPOUT = 8192, 128, 0.15, 2, 0.1
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage alive in this process, each storage counted once."""
    gc.collect()
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
    return total


def _env(rank: int, port: int) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        DS_ACCELERATOR="cpu",
    )


def _model_config(size: str) -> C.ModelConfig:
    return C.ModelConfig(family="bert", dropout=DROPOUT, max_position_embeddings=512, **SIZES[size])


def _worker(rank: int, port: int, points: list, steps: int, out: str) -> None:
    """Every point in turn in the same two processes (one process group): build, measure, free."""
    import torch.distributed as dist

    _env(rank, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from ptft_dist import engine as E
    from ptft_dist.world import World

    scaling = C.ScalingConfig(num_workers=WORLD)
    E.init_distributed(World(rank=rank, world_size=WORLD), scaling)
    results = []
    for size, stage, micro in points:
        results.append(_measure_point(dist, size, stage, micro, steps, rank))
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _measure_point(dist, size: str, stage: int, micro: int, steps: int, rank: int) -> dict:
    from ptft_dist import engine as E
    from ptft_dist import models

    cfg = _model_config(size)
    optim = C.OptimConfig(global_batch_size=micro * WORLD, micro_batch_size_per_rank=micro, warmup_steps=1)
    ds = E.ds_config(optim, C.ZeroConfig(stage=stage), C.ScalingConfig(num_workers=WORLD), cfg.hidden_size)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(10, VOCAB, (micro, SEQ_LEN), generator=gen)
    labels = torch.where(torch.rand(micro, SEQ_LEN, generator=gen) < MLM_P, ids, torch.full_like(ids, -100))
    before = _live_tensor_bytes()
    with E.model_init_context(ds):
        model = models.build_mlm(cfg, models.mlm_config(cfg, vocab_size=VOCAB, special_ids=SPECIAL))
    engine = E.initialize(model, optim, ds)
    wall, cpu, forward_end, backward_end = [], [], 0, 0
    for step in range(2 + steps):
        dist.barrier()
        started, started_cpu = time.perf_counter(), time.process_time()
        out_ = engine(input_ids=ids, labels=labels)
        if step == 1:
            forward_end = _live_tensor_bytes() - before
        engine.backward(out_.loss)
        if step == 1:
            del out_
            backward_end = _live_tensor_bytes() - before
        engine.step()
        if step >= 2:
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    result = {
        "point": [size, stage, micro],
        "forward_end_bytes": forward_end,
        "backward_end_bytes": backward_end,
        "step_s": statistics.median(wall),
        "step_cpu_s": statistics.median(cpu),
        "num_params": models.num_params(model),
    }
    engine.destroy()
    del engine, model, out_
    gc.collect()
    return result


def _bandwidth_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    _env(rank, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    big, small = torch.ones(4 * 2**20), torch.ones(1)
    for t in (big, small):
        dist.all_reduce(t)
    figures = {}
    for clock, name in ((time.perf_counter, ""), (time.process_time, "_cpu")):
        started = clock()
        for _ in range(5):
            dist.all_reduce(big)
        big_s = (clock() - started) / 5
        started = clock()
        for _ in range(50):
            dist.all_reduce(small)
        latency_s = (clock() - started) / 50
        sent = 2 * big.numel() * 4 * (WORLD - 1) / WORLD  # ring all-reduce, bytes per rank
        figures[f"gbs{name}"] = sent / max(big_s - latency_s, 1e-9) / 1e9
        figures[f"latency{name}_s"] = latency_s
    # AdamW over 4M parameters: the rate at which a rank updates parameters (memory-bound)
    param = torch.nn.Parameter(torch.zeros(4 * 2**20))
    param.grad = torch.ones_like(param)
    opt = torch.optim.AdamW([param], lr=1e-4)
    opt.step()
    for clock, name in ((time.perf_counter, ""), (time.process_time, "_cpu")):
        started = clock()
        for _ in range(5):
            opt.step()
        figures[f"adam_params_per_s{name}"] = 5 * param.numel() / (clock() - started)
    if rank == 0:
        Path(out).write_text(json.dumps(figures))
    dist.destroy_process_group()


#: The ZeRO-3 micro-benchmark: stacks of Linear(64, 64, bias=False), few and many, timed per step.
ZERO3_WIDTH, ZERO3_BLOCKS, ZERO3_STEPS = 64, (8, 40), 8


def _zero3_step_cpu_s(dist, blocks: int, identity: bool, one_bucket: bool, bias: bool) -> float:
    """Median CPU seconds of rank 0 per ZeRO-3 step of ``blocks`` tiny linears (the derived config with
    hidden size 64: each weight is partitioned, gathered alone and reduced in a bucket of its own),
    with a parameterless module after each (``identity``), with all gradients in one bucket, and with a
    bias each (64 elements: a persistent tensor)."""
    from ptft_dist import engine as E

    d = ZERO3_WIDTH
    optim = C.OptimConfig(global_batch_size=2 * WORLD, micro_batch_size_per_rank=2, warmup_steps=1)
    ds = E.ds_config(optim, C.ZeroConfig(stage=3), C.ScalingConfig(num_workers=WORLD), d)
    if one_bucket:
        ds["zero_optimization"]["reduce_bucket_size"] = 10 * blocks * d * d
    with E.model_init_context(ds):
        layers = []
        for _ in range(blocks):
            layers += [torch.nn.Linear(d, d, bias=bias)] + ([torch.nn.Identity()] if identity else [])
        model = torch.nn.Sequential(*layers)
    engine = E.initialize(model, optim, ds)
    x = torch.randn(2, d)
    times = []
    for step in range(2 + ZERO3_STEPS):
        dist.barrier()
        started = time.process_time()
        engine.backward(engine(x).pow(2).mean())
        engine.step()
        if step >= 2:
            times.append(time.process_time() - started)
    engine.destroy()
    del engine, model
    gc.collect()
    return statistics.median(times)


def _zero3_worker(rank: int, port: int, out: str) -> None:
    """ZeRO-3's host work per module, per parameter and per gradient bucket, from the slopes of
    three stacks (``blocks`` = 4 and 36): per block, a plain stack runs one module, one parameter,
    one all-gather and one reduce bucket; with an Identity after each linear, one module more;
    with one bucket for all gradients, one reduce bucket less; with a bias too (one bucket), one
    persistent tensor more (all-gathered after the step). Each slope also holds the collectives'
    latency (measured separately, subtracted here). Tiny tensors: no compute, no bytes."""
    import torch.distributed as dist

    _env(rank, port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from ptft_dist import engine as E
    from ptft_dist.world import World

    E.init_distributed(World(rank=rank, world_size=WORLD), C.ScalingConfig(num_workers=WORLD))
    few, many = ZERO3_BLOCKS
    slopes = {}
    variants = (
        ("plain", False, False, False),
        ("identity", True, False, False),
        ("one_bucket", False, True, False),
        ("one_bucket_bias", False, True, True),
    )
    for name, identity, one_bucket, bias in variants:
        t_few = _zero3_step_cpu_s(dist, few, identity, one_bucket, bias)
        t_many = _zero3_step_cpu_s(dist, many, identity, one_bucket, bias)
        slopes[name] = (t_many - t_few) / (many - few)
    if rank == 0:
        Path(out).write_text(json.dumps({f"zero3_slope_{k}_cpu_s": v for k, v in slopes.items()}))
    dist.destroy_process_group()


def zero3_costs(slopes: dict, latency_s: float) -> dict:
    """Per module, partitioned and persistent tensor and bucket (CPU seconds) from the four slopes:
    plain = module + tensor + bucket + 2 latencies, identity = plain + module,
    one bucket = module + tensor + 1 latency, one bucket with bias = one bucket + persistent + 1 latency."""
    names = ("plain", "identity", "one_bucket", "one_bucket_bias")
    plain, ident, one, one_bias = (slopes[f"zero3_slope_{k}_cpu_s"] for k in names)
    module = ident - plain
    return {
        "module_s": module,
        "param_s": one - latency_s - module,
        "persistent_s": one_bias - one - latency_s,
        "bucket_s": plain - one - latency_s,
    }


def measure(points: list, steps: int, work: Path) -> dict:
    out = work / "points.json"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), points, steps, str(out)), nprocs=WORLD)
    return {tuple(r["point"]): r for r in json.loads(out.read_text())}


def planned(size: str, stage: int, micro: int, cpu: P.Device) -> dict:
    """The planner's terms for this point, from the same config objects the CLI would use."""
    cfg = C.PretrainConfig(
        model=_model_config(size),
        optim=C.OptimConfig(global_batch_size=micro * WORLD, micro_batch_size_per_rank=micro),
        zero=C.ZeroConfig(stage=stage),
        scaling=C.ScalingConfig(num_workers=WORLD),
        data=C.PretrainDataConfig(mlm_probability=MLM_P),
    )
    target = P.Target(cpu, 1, WORLD, 24.0)
    plan = P.make_plan(cfg, target, seq_len=SEQ_LEN, vocab_size=VOCAB, use_measured=False)
    row = plan.configured
    return {
        "forward_end_bytes": row.states.forward_end + row.activations.kept,
        "backward_end_bytes": row.states.with_grads,
        "peak_bytes": row.peak_bytes,
        "step_s": row.step_s,
        "compute_s": row.compute_s,
        "comm_s": row.comm_s,
        "num_params": plan.total_params,
        "flops_per_step": row.compute_s * plan.target.device.peak_tflops * 1e12,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    p.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    p.add_argument("--micro", nargs="+", type=int, default=[2, 4])
    p.add_argument("--steps", type=int, default=3, help="timed steps per point (after 2 untimed)")
    p.add_argument("--calibrate", default="small:0:4", help="size:stage:micro of the point the CPU rate comes from")
    p.add_argument(
        "--results",
        help="folder of an earlier run (bandwidth.json, points.json): compare its measurements anew, measure nothing",
    )
    a = p.parse_args()
    points = [(s, st, m) for s in a.sizes for st in a.stages for m in a.micro]
    cal_size, cal_stage, cal_micro = a.calibrate.split(":")
    cal = (cal_size, int(cal_stage), int(cal_micro))
    if cal not in points:
        points.insert(0, cal)
    started = time.perf_counter()
    if a.results:
        work = Path(a.results)
        measured = {tuple(r["point"]): r for r in json.loads((work / "points.json").read_text())}
        points = [pt for pt in points if pt in measured]
    else:
        work = Path(tempfile.mkdtemp(prefix="ptft-plan-"))
        torch.multiprocessing.spawn(_bandwidth_worker, args=(_free_port(), str(work / "bandwidth.json")), nprocs=WORLD)
        if any(pt[1] == 3 for pt in points):
            torch.multiprocessing.spawn(_zero3_worker, args=(_free_port(), str(work / "zero3.json")), nprocs=WORLD)
        print(f"measuring {len(points)} points; results in {work}", flush=True)
        measured = measure(points, a.steps, work)
    bw = json.loads((work / "bandwidth.json").read_text())
    if "adam_params_per_s_cpu" not in bw:  # results of an older version of this script: measure the rate once
        if not (work / "rates.json").is_file():
            torch.multiprocessing.spawn(_bandwidth_worker, args=(_free_port(), str(work / "rates.json")), nprocs=WORLD)
        rates = json.loads((work / "rates.json").read_text())
        bw.update({k: v for k, v in rates.items() if k.startswith("adam")})
    if any(pt[1] == 3 for pt in points) and "zero3_slope_plain_cpu_s" not in bw:  # ZeRO-3's host work, once
        if not (work / "zero3.json").is_file():
            torch.multiprocessing.spawn(_zero3_worker, args=(_free_port(), str(work / "zero3.json")), nprocs=WORLD)
        bw.update(json.loads((work / "zero3.json").read_text()))
    zero3 = zero3_costs(bw, bw["latency_cpu_s"]) if "zero3_slope_plain_cpu_s" in bw else None
    # Calibration: the CPU rate that makes the planned step time of one point equal its measurement,
    # once for CPU seconds (what the rank itself spends: robust to a loaded machine) and once for wall time.
    devices = {}
    for name in ("_cpu", ""):
        cpu = replace(
            P.CPU,
            intra_node_gbs=bw[f"gbs{name}"],
            latency_s=bw[f"latency{name}_s"],
            optimizer_params_per_s=bw.get(f"adam_params_per_s{name}", P.CPU.optimizer_params_per_s),
        )
        if zero3:  # measured in CPU seconds only: the same figures for the wall-time plan
            cpu = replace(cpu, zero3_module_s=zero3["module_s"], zero3_param_s=zero3["param_s"])
            cpu = replace(cpu, zero3_persistent_s=zero3["persistent_s"], zero3_bucket_s=zero3["bucket_s"])
        probe = planned(*cal, cpu)
        compute_s = measured[cal][f"step{name}_s"] - (probe["step_s"] - probe["compute_s"])  # less comm + optimizer
        devices[name] = replace(cpu, peak_tflops=probe["flops_per_step"] / compute_s / 1e12)
    rows = []
    for point in points:
        plan_, meas = planned(*point, devices["_cpu"]), measured[point]
        plan_wall = planned(*point, devices[""])
        peak = max(meas["forward_end_bytes"], meas["backward_end_bytes"])
        rows.append(
            {
                "size": point[0],
                "stage": point[1],
                "micro": point[2],
                "params": meas["num_params"],
                "planned_params": plan_["num_params"],
                "planned_peak_mb": plan_["peak_bytes"] / 2**20,
                "measured_peak_mb": peak / 2**20,
                "memory_error": plan_["peak_bytes"] / peak - 1,
                "planned_forward_end_mb": plan_["forward_end_bytes"] / 2**20,
                "measured_forward_end_mb": meas["forward_end_bytes"] / 2**20,
                "planned_backward_end_mb": plan_["backward_end_bytes"] / 2**20,
                "measured_backward_end_mb": meas["backward_end_bytes"] / 2**20,
                "planned_step_cpu_s": plan_["step_s"],
                "measured_step_cpu_s": meas["step_cpu_s"],
                "time_error": plan_["step_s"] / meas["step_cpu_s"] - 1,
                "planned_step_wall_s": plan_wall["step_s"],
                "measured_step_wall_s": meas["step_s"],
                "wall_time_error": plan_wall["step_s"] / meas["step_s"] - 1,
                "calibration_point": point == cal,
            }
        )
    rate = devices["_cpu"].peak_tflops * 1e3
    print(
        f"\nCPU rate (calibrated on {a.calibrate}): {rate:.1f} GFLOP/s per rank in CPU seconds, "
        f"{devices[''].peak_tflops * 1e3:.1f} in wall time; gloo {bw['gbs_cpu']:.2f} GB/s per rank and "
        f"{bw['latency_cpu_s'] * 1e6:.0f} us per collective in CPU seconds ({bw['gbs']:.2f} GB/s, "
        f"{bw['latency_s'] * 1e6:.0f} us wall); measured in {time.perf_counter() - started:.0f} s"
    )
    if zero3:
        print(
            f"ZeRO-3 host work, CPU seconds: {zero3['module_s'] * 1e6:.0f} us per module, {zero3['param_s'] * 1e6:.0f} "
            f"us per partitioned tensor, {zero3['persistent_s'] * 1e6:.0f} us per persistent tensor, "
            f"{zero3['bucket_s'] * 1e6:.0f} us per reduce bucket (micro-benchmark)"
        )
    print(
        f"{'size':<7} {'stage':>5} {'micro':>5} {'params M':>8} {'peak MB plan':>12} {'measured':>9} {'err':>6} "
        f"{'fwd-end plan/meas':>18} {'bwd-end plan/meas':>18} {'CPU s plan':>10} {'measured':>9} {'err':>6} "
        f"{'wall s plan':>11} {'measured':>9} {'err':>6}"
    )
    for r in rows:
        print(
            f"{r['size']:<7} {r['stage']:>5} {r['micro']:>5} {r['params'] / 1e6:>8.2f} {r['planned_peak_mb']:>12.1f} "
            f"{r['measured_peak_mb']:>9.1f} {r['memory_error']:>+6.1%} "
            f"{r['planned_forward_end_mb']:>8.1f}/{r['measured_forward_end_mb']:<9.1f} "
            f"{r['planned_backward_end_mb']:>8.1f}/{r['measured_backward_end_mb']:<9.1f} "
            f"{r['planned_step_cpu_s']:>10.3f} {r['measured_step_cpu_s']:>9.3f} {r['time_error']:>+6.1%} "
            f"{r['planned_step_wall_s']:>11.3f} {r['measured_step_wall_s']:>9.3f} {r['wall_time_error']:>+6.1%}"
            + (" (calibration)" if r["calibration_point"] else "")
        )
    others = [r for r in rows if not r["calibration_point"]]
    for label, group in (
        ("stages 0-2", [r for r in others if r["stage"] < 3]),
        ("stage 3", [r for r in others if r["stage"] == 3]),
    ):
        if group:
            errors = [abs(r["time_error"]) for r in group]
            print(
                f"step time, CPU seconds, {label}: median |error| {statistics.median(errors):.1%}, largest "
                f"{max(errors):.1%}, mean error {statistics.mean(r['time_error'] for r in group):+.1%} "
                f"({len(group)} points)"
            )
    summary = {
        "cpu_gflops_per_rank": rate,
        "cpu_gflops_per_rank_wall": devices[""].peak_tflops * 1e3,
        "gloo": bw,
        "zero3_host_s": zero3,
        "max_abs_memory_error": max(abs(r["memory_error"]) for r in rows),
        "max_abs_time_error": max(abs(r["time_error"]) for r in others) if others else None,
        "median_abs_time_error": statistics.median(abs(r["time_error"]) for r in others) if others else None,
        "max_abs_wall_time_error": max(abs(r["wall_time_error"]) for r in others) if others else None,
        "rows": rows,
    }
    print(
        f"\nmemory: largest |planned/measured - 1| = {summary['max_abs_memory_error']:.1%} (goal <= 10%); step time "
        f"(other points, CPU seconds): largest {summary['max_abs_time_error']:.1%}, median "
        f"{summary['median_abs_time_error']:.1%}, wall: largest {summary['max_abs_wall_time_error']:.1%} (goal <= 25%)"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
