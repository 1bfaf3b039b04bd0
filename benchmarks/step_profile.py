"""Where the time of a training step goes: ptft (Ray Train + DeepSpeed ZeRO) against torch DDP.

    python benchmarks/step_profile.py [--seconds 20] [--stage 2] [--native]

The model, data, global batch and masking of ``benchmarks/train_throughput.py`` (ModernBERT 256
x 4, 32 x 128 tokens per step, 2 ranks x 1 thread). Each setup trains until it is warm (15
steps), then py-spy samples every rank for ``--seconds`` (100 Hz, on-CPU samples) while the steps
are counted. The training thread's samples are sorted into causes by their stack
(data, masking, forward, backward, gradient reduction, optimizer step, the per-step flag
all-reduce, heartbeat / ledger / metrics) and turned into ms per step, mean of the ranks;
``waiting`` is the rest of the wall time per step (off CPU: blocked in a collective, sleeping).
Prints the table and, last, one JSON line.

py-spy sees Python frames (``--native`` adds C++ frames, slower): DDP's gradient buckets are
reduced in C++ autograd hooks, so without ``--native`` they count as its backward.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_throughput as tt  # noqa: E402

from ptft_dist import config as C  # noqa: E402
from ptft_dist import jobs  # noqa: E402
from ptft_dist.progress import STOP_FILE  # noqa: E402

PY_SPY = str(Path(sys.executable).with_name("py-spy"))
WARM_STEPS = 15

#: (cause, substrings of a stack's frames), first match wins; stacks are leaf-last
CAUSES = [
    ("data", ("dataloader.py", "data/stream.py", "data/shards.py", "collate")),
    ("masking", ("data/mlm.py", "_mask (")),
    ("flag all-reduce", ("agree (", "all_reduce_sum", "all_reduce_max")),
    ("heartbeat, ledger, metrics", ("heartbeat", "ledger.py", "tracking.py", "log_metrics")),
    ("gradient reduction", ("reduce_ipg", "average_tensor", "allreduce", "all_reduce", "reduce_scatter", "Reducer")),
    ("optimizer step", ("clip_grad", "optimizer", "adamw", "_optimizer_step", "step (torch/optim")),
    ("backward", ("backward",)),
    ("forward", ("forward",)),
]


def classify(stack: str) -> str:
    for cause, needles in CAUSES:
        if any(n in stack for n in needles):
            return cause
    return "other"


def _cpu_seconds(exclude: set[int]) -> dict[str, float]:
    """CPU seconds so far of every other process on this machine, by name (Ray's own processes:
    gcs_server, raylet, the dashboard, the Train controller, ...)."""
    import psutil

    out: collections.Counter = collections.Counter()
    for proc in psutil.process_iter(["pid", "name", "cmdline", "cpu_times"]):
        if proc.info["pid"] in exclude or proc.info["cpu_times"] is None:
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        name = proc.info["name"] or "?"
        if "ray::" in cmd or name.startswith("ray::"):
            name = cmd.split()[0] if cmd else name
        out[name[:40]] += proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return out


def record(pids: list[int], seconds: float, work: Path, tag: str, native: bool) -> list[Path]:
    outs, procs = [], []
    record.others_before = _cpu_seconds({*pids, os.getpid()})
    for pid in pids:
        out = work / f"{tag}-{pid}.txt"
        cmd = [PY_SPY, "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100", "--threads"]
        cmd += ["--format", "raw", "--output", str(out), "--nonblocking"] + (["--native"] if native else [])
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        outs.append(out)
    for p in procs:
        p.wait()
    after = _cpu_seconds({*pids, os.getpid(), *(p.pid for p in procs)})
    record.others = {k: v - record.others_before.get(k, 0.0) for k, v in after.items()}
    return outs


def others_ms_per_step(steps: int) -> dict[str, float]:
    """CPU ms per step that the other processes used during the sampling, the busiest first."""
    busy = {k: round(1000 * v / steps, 1) for k, v in record.others.items() if v > 0.05}
    return dict(sorted(busy.items(), key=lambda kv: -kv[1]))


def per_step_ms(files: list[Path], steps: int, seconds: float, marker: str) -> dict[str, float]:
    """ms per step and cause in the training thread (the one whose stacks hold ``marker``), mean
    of the ranks; ``waiting`` is the wall time per step the thread was not on a CPU."""
    totals: collections.Counter = collections.Counter()
    for f in files:
        threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for line in f.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            thread = stack.split(";", 1)[0]
            threads[thread][classify(stack)] += int(count)
            threads[thread]["__marker__"] += int(count) if marker in stack else 0
        main = max(threads.values(), key=lambda c: c["__marker__"])
        main.pop("__marker__")
        totals.update({k: v / len(files) for k, v in main.items()})
    scale = 10.0 / steps  # 100 Hz: a sample is 10 ms
    out = {k: round(v * scale, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}
    wall = 1000.0 * seconds / steps
    out["waiting"] = round(wall - sum(totals.values()) * scale, 1)
    out["total"] = round(wall, 1)
    return out


# --------------------------------------------------------------------------- ptft


def _beat(run_dir: Path, rank: int) -> dict:
    try:
        return json.loads((run_dir / "progress" / f"rank{rank}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def profile_ptft(dataset: Path, work: Path, seconds: float, stage: int, native: bool) -> dict:
    run_dir = work / f"ptft_z{stage}"
    cfg = C.load(
        "pretrain",
        "pretrain_tiny",
        [
            f"data.dataset_dir={dataset}",
            f"run_dir={run_dir}",
            *(f"model.{k}={v}" for k, v in tt.MODEL.items()),
            f"optim.global_batch_size={tt.GLOBAL_BATCH}",
            "optim.micro_batch_size_per_rank=16",
            "optim.max_steps=100000",
            f"zero.stage={stage}",
            "tracking.log_every_steps=1",
            "eval_every_steps=1000000",
            "data.num_eval_samples=32",
            f"data.mlm_probability={tt.MLM_P}",
        ],
    )
    runner = threading.Thread(target=lambda: jobs.pretrain(cfg), daemon=True)
    runner.start()
    while min(_beat(run_dir, r).get("step", 0) for r in (0, 1)) < WARM_STEPS:
        if not runner.is_alive():
            raise RuntimeError("the ptft run ended before it was warm")
        time.sleep(0.2)
    pids = [_beat(run_dir, r)["pid"] for r in (0, 1)]
    s0 = _beat(run_dir, 0)["step"]
    files = record(pids, seconds, work, "ptft", native)
    steps = _beat(run_dir, 0)["step"] - s0
    (run_dir / STOP_FILE).touch()  # checkpoint and stop
    runner.join(timeout=300)
    return {
        "steps": steps,
        "ms_per_step": per_step_ms(files, steps, seconds, "train_step"),
        "other_processes_cpu_ms_per_step": others_ms_per_step(steps),
    }


# --------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, dataset: str, progress: str) -> None:
    """train_throughput's DDP loop, endless, writing its step count until a stop file appears."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model, manifest = tt.make_model(Path(dataset), tt.MODEL)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    data = tt.train_samples(Path(dataset), tt.GLOBAL_BATCH * 40)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    micro = tt.GLOBAL_BATCH // world
    stop = Path(progress).with_suffix(".stop")
    step = 0
    while True:
        flag = torch.tensor([int(stop.exists())])
        dist.all_reduce(flag)  # every rank stops at the same step
        if flag.item():
            break
        lo = (step % 40) * tt.GLOBAL_BATCH + rank * micro
        inputs, labels = tt._mask(data[lo : lo + micro], manifest, step * world + rank)
        tt._timed_step(ddp, opt, inputs, labels, time.perf_counter())
        step += 1
        Path(f"{progress}.{rank}").write_text(f"{os.getpid()} {step}")
    dist.destroy_process_group()


def profile_ddp(dataset: Path, work: Path, seconds: float, native: bool) -> dict:
    progress = work / "ddp_progress"
    ctx = torch.multiprocessing.spawn(
        _ddp_worker, args=(2, tt._free_port(), str(dataset), str(progress)), nprocs=2, join=False
    )

    def beat(rank: int) -> tuple[int, int]:
        try:
            pid, step = Path(f"{progress}.{rank}").read_text().split()
            return int(pid), int(step)
        except (OSError, ValueError):
            return 0, 0

    while min(beat(r)[1] for r in (0, 1)) < WARM_STEPS:
        time.sleep(0.2)
    pids = [beat(r)[0] for r in (0, 1)]
    s0 = beat(0)[1]
    files = record(pids, seconds, work, "ddp", native)
    steps = beat(0)[1] - s0
    progress.with_suffix(".stop").touch()
    ctx.join()
    return {
        "steps": steps,
        "ms_per_step": per_step_ms(files, steps, seconds, "_timed_step"),
        "other_processes_cpu_ms_per_step": others_ms_per_step(steps),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--native", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ptft-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    dataset = tt.build_dataset(work)
    out = {
        "ddp": profile_ddp(dataset, work, args.seconds, args.native),
        f"ptft_zero{args.stage}": profile_ptft(dataset, work, args.seconds, args.stage, args.native),
    }
    causes = sorted({c for r in out.values() for c in r["ms_per_step"]} - {"total"})
    names = list(out)
    print(f"\nms per step (training thread, mean of 2 ranks; {args.seconds:g} s sampled at 100 Hz)")
    print(f"{'cause':<28}" + "".join(f"{n:>14}" for n in names))
    for cause in [*causes, "total"]:
        print(f"{cause:<28}" + "".join(f"{out[n]['ms_per_step'].get(cause, 0.0):>14.1f}" for n in names))
    print(f"{'steps sampled':<28}" + "".join(f"{out[n]['steps']:>14}" for n in names))
    for n in names:
        top = list(out[n]["other_processes_cpu_ms_per_step"].items())[:6]
        print(f"\n{n}: other processes, CPU ms per step: " + ", ".join(f"{k} {v:g}" for k, v in top))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
