"""Where the time of a training step goes: ptft (Ray Train + DeepSpeed ZeRO) against torch DDP.

    python benchmarks/step_profile.py [--seconds 20] [--stage 2] [--native]
    python benchmarks/step_profile.py --sched [--seconds 20] [--repeats 3] [--stage 2] [--dataset DIR]
    python benchmarks/step_profile.py --ray-cpu [--seconds 60] [--dataset DIR]

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

``--sched`` measures without a sampler (py-spy stops each rank 100 times a second): for torch
DDP, the ptft recipe without Ray (2 spawned processes in a plain gloo process group, as
torchrun starts them) and ptft on Ray Train, once warm, over ``--seconds``: wall ms per step,
and per rank and step the CPU ms in user and kernel mode, the context switches (voluntary:
the rank waited, e.g. in a collective; involuntary: another process took its core) and the
minor page faults, from ``/proc``; and the CPU ms per step of every other process. The
setups take turns for ``--repeats`` rounds; each figure is the median of its rounds.

``--ray-cpu`` measures instead what Ray's own processes take from the training: the same ptft
run twice, with the embedded cluster as Ray's defaults start it (``PTFT_RAY_DASHBOARD=1``) and
as ptft starts it (lean), and for each the CPU time (user + system) of every process of that
Ray session but the two training workers (gcs_server, raylet, the dashboard, the agents, every
``ray::`` actor, and the driver apart), in CPU ms per second of wall time over ``--seconds`` of
steady training. CPU time does not depend on how busy the machine is the way step times do.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
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


def ray_label(proc) -> str | None:
    """What a process of the Ray session is, by its command line; None for the training workers."""
    cmd = proc.info["cmdline"] or []
    head = cmd[0] if cmd else proc.info["name"] or "?"
    if head.startswith("ray::"):
        actor = head[5:].split(".")[0].split(" ")[0]
        return None if actor == "RayTrainWorker" else actor
    line = " ".join(cmd)
    for needle, label in (
        ("gcs_server", "gcs_server"),
        ("raylet", "raylet"),
        ("dashboard/dashboard.py", "dashboard head"),
        ("ray.dashboard", "dashboard head modules"),
        ("ray-dashboard-", "dashboard head modules"),
        ("dashboard/agent.py", "DashboardAgent"),
        ("runtime_env/agent", "RuntimeEnvAgent"),
        ("log_monitor.py", "log monitor"),
        ("autoscaler/_private/monitor.py", "autoscaler monitor"),
        ("default_worker.py", "worker starting"),
    ):
        if needle in line:
            return label
    return Path(head).name[:40]


def ray_cpu_seconds(root: int) -> dict[int, tuple[str, float]]:
    """pid -> (label, CPU seconds so far) of every process of the Ray session that ``root`` (the
    driver) started: its descendants, so another Ray cluster on the machine does not count. The
    training workers are left out; the driver itself is labelled ``driver``."""
    import psutil

    out = {}
    try:
        procs = [psutil.Process(root), *psutil.Process(root).children(recursive=True)]
    except psutil.NoSuchProcess:
        return out
    for proc in procs:
        try:
            with proc.oneshot():
                proc.info = {"cmdline": proc.cmdline(), "name": proc.name()}
                label = "driver" if proc.pid == root else ray_label(proc)
                times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        if label is not None:
            out[proc.pid] = (label, times.user + times.system)
    return out


def ray_cpu_window(seconds: float, root: int | None = None) -> dict[str, float]:
    """CPU ms per wall second of each kind of Ray process over the next ``seconds`` (processes
    that start inside the window count from zero); ``Ray total`` sums all but the driver."""
    root = root or os.getpid()
    before = ray_cpu_seconds(root)
    t0 = time.monotonic()
    time.sleep(seconds)
    after = ray_cpu_seconds(root)
    wall = time.monotonic() - t0
    by_label: collections.Counter = collections.Counter()
    for pid, (label, cpu) in after.items():
        by_label[label] += cpu - before.get(pid, (label, 0.0))[1]
    out = {k: round(1000 * v / wall, 1) for k, v in sorted(by_label.items(), key=lambda kv: -kv[1])}
    out["Ray total"] = round(sum(v for k, v in out.items() if k != "driver"), 1)
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


def _ptft_config(dataset: Path, run_dir: Path, stage: int):
    return C.load(
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


def _start_ptft(cfg, warm_steps: int) -> threading.Thread:
    """jobs.pretrain in a thread of this process (so its Ray session is this process's), once
    both ranks have done ``warm_steps`` steps."""

    def run() -> None:
        try:
            jobs.pretrain(cfg)
        except jobs.Preempted:  # the STOP file: checkpointed and stopped, as asked
            pass

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    while min(_beat(Path(cfg.run_dir), r).get("step", 0) for r in (0, 1)) < warm_steps:
        if not runner.is_alive():
            raise RuntimeError("the ptft run ended before it was warm")
        time.sleep(0.2)
    return runner


def profile_ptft(dataset: Path, work: Path, seconds: float, stage: int, native: bool) -> dict:
    run_dir = work / f"ptft_z{stage}"
    runner = _start_ptft(_ptft_config(dataset, run_dir, stage), WARM_STEPS)
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


def ray_cpu(dataset: Path, work: Path, seconds: float, stage: int) -> dict:
    """The ptft run with Ray's defaults and with ptft's lean embedded cluster, one after the
    other: CPU ms per wall second of each kind of Ray process, steps and wall seconds."""
    out = {}
    for name, dashboard in (("ray_defaults", "1"), ("lean", "0")):
        os.environ["PTFT_RAY_DASHBOARD"] = dashboard
        run_dir = work / f"ray_cpu_{name}"
        runner = _start_ptft(_ptft_config(dataset, run_dir, stage), 3)  # Ray's helpers are up by then
        s0 = _beat(run_dir, 0)["step"]
        cpu = ray_cpu_window(seconds)
        steps = _beat(run_dir, 0)["step"] - s0
        (run_dir / STOP_FILE).touch()
        runner.join(timeout=300)
        out[name] = {"steps": steps, "seconds": seconds, "cpu_ms_per_s": cpu}
    os.environ.pop("PTFT_RAY_DASHBOARD")
    return out


def print_ray_cpu(out: dict) -> None:
    names = list(out)
    labels = sorted({k for r in out.values() for k in r["cpu_ms_per_s"]} - {"Ray total", "driver"})
    labels.sort(key=lambda k: -out[names[0]]["cpu_ms_per_s"].get(k, 0.0))
    print(f"\nCPU ms per wall second, Ray's own processes ({out[names[0]]['seconds']:g} s of steady training)")
    print(f"{'process':<30}" + "".join(f"{n:>14}" for n in names))
    for label in [*labels, "Ray total", "driver"]:
        cells = [out[n]["cpu_ms_per_s"].get(label) for n in names]
        print(f"{label:<30}" + "".join(f"{'-' if c is None else f'{c:.1f}':>14}" for c in cells))
    print(f"{'steps in the window':<30}" + "".join(f"{out[n]['steps']:>14}" for n in names))


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
        tt._train_step(ddp, opt, inputs, labels)
        step += 1
        Path(f"{progress}.{rank}").write_text(f"{os.getpid()} {step}")
    dist.destroy_process_group()


def _start_ddp(dataset: Path, progress: Path):
    """The DDP loop on 2 spawned ranks, once both have done WARM_STEPS steps: (the spawn
    context, the ranks' pids, a function that reads rank 0's step)."""
    ctx = torch.multiprocessing.spawn(
        _ddp_worker, args=(2, tt.free_port(), str(dataset), str(progress)), nprocs=2, join=False
    )

    def beat(rank: int) -> tuple[int, int]:
        try:
            pid, step = Path(f"{progress}.{rank}").read_text().split()
            return int(pid), int(step)
        except (OSError, ValueError):
            return 0, 0

    while min(beat(r)[1] for r in (0, 1)) < WARM_STEPS:
        time.sleep(0.2)
    return ctx, [beat(r)[0] for r in (0, 1)], lambda: beat(0)[1]


def profile_ddp(dataset: Path, work: Path, seconds: float, native: bool) -> dict:
    progress = work / "ddp_progress"
    ctx, pids, step_of = _start_ddp(dataset, progress)
    s0 = step_of()
    files = record(pids, seconds, work, "ddp", native)
    steps = step_of() - s0
    progress.with_suffix(".stop").touch()
    ctx.join()
    return {
        "steps": steps,
        "ms_per_step": per_step_ms(files, steps, seconds, "_train_step"),
        "other_processes_cpu_ms_per_step": others_ms_per_step(steps),
    }


# --------------------------------------------------------------------------- --sched


def proc_counters(pid: int) -> dict[str, float]:
    """CPU ms (user, system), context switches and minor faults of a process so far, all its
    threads (``/proc/PID/status`` alone counts the main thread's switches, and under Ray Train
    the training loop runs in another thread)."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    with open(f"/proc/{pid}/stat") as fh:
        minflt = int(fh.read().rsplit(")", 1)[1].split()[7])
    switches = collections.Counter()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                    switches[key] += int(value)
        except OSError:  # a thread that ended meanwhile
            continue
    return {
        "user_ms": 1000 * times.user,
        "system_ms": 1000 * times.system,
        "voluntary_switches": switches["voluntary_ctxt_switches"],
        "involuntary_switches": switches["nonvoluntary_ctxt_switches"],
        "minor_faults": minflt,
    }


def sched_window(pids: list[int], step_of, seconds: float) -> dict:
    """Per step over the next ``seconds``: wall ms; per rank (mean of the ranks) the counters of
    :func:`proc_counters`; CPU ms of every other process, the busiest first."""
    before, others_before = [proc_counters(p) for p in pids], _cpu_seconds({*pids, os.getpid()})
    s0, t0 = step_of(), time.monotonic()
    time.sleep(seconds)
    steps, wall = step_of() - s0, time.monotonic() - t0
    after, others_after = [proc_counters(p) for p in pids], _cpu_seconds({*pids, os.getpid()})
    per_rank = {k: sum(a[k] - b[k] for a, b in zip(after, before)) / len(pids) / steps for k in before[0]}
    others = {k: 1000 * (v - others_before.get(k, 0.0)) / steps for k, v in others_after.items()}
    busy = {k: round(v, 1) for k, v in sorted(others.items(), key=lambda kv: -kv[1]) if v >= 0.1}
    return {
        "steps": steps,
        "wall_ms": round(1000 * wall / steps, 1),
        **{k: round(v, 1) for k, v in per_rank.items()},
        "others_cpu_ms": round(sum(busy.values()), 1),
        "others": dict(list(busy.items())[:6]),
    }


def sched_ddp(dataset: Path, work: Path, seconds: float) -> dict:
    progress = work / "sched_ddp_progress"
    ctx, pids, step_of = _start_ddp(dataset, progress)
    out = sched_window(pids, step_of, seconds)
    progress.with_suffix(".stop").touch()
    ctx.join()
    return out


def sched_ptft(dataset: Path, work: Path, seconds: float, stage: int, with_ray: bool) -> dict:
    run_dir = work / f"sched_{'ray' if with_ray else 'noray'}_z{stage}"
    cfg = _ptft_config(dataset, run_dir, stage)
    if with_ray:
        runner = _start_ptft(cfg, WARM_STEPS)
    else:
        resolved = jobs._resolve_pretrain(cfg)
        runner = threading.Thread(target=tt.run_recipe_spawned, args=("pretrain", resolved), daemon=True)
        runner.start()
        while min(_beat(run_dir, r).get("step", 0) for r in (0, 1)) < WARM_STEPS:
            if not runner.is_alive():
                raise RuntimeError("the ptft run without Ray ended before it was warm")
            time.sleep(0.2)
    out = sched_window([_beat(run_dir, r)["pid"] for r in (0, 1)], lambda: _beat(run_dir, 0)["step"], seconds)
    (run_dir / STOP_FILE).touch()  # checkpoint and stop
    runner.join(timeout=300)
    return out


SCHED_FIELDS = ("wall_ms", "user_ms", "system_ms", "voluntary_switches", "involuntary_switches", "minor_faults")


def sched(dataset: Path, work: Path, seconds: float, stage: int, repeats: int) -> None:
    """Every setup ``repeats`` times, the rounds interleaved; each figure is the median of its
    rounds (the machine's speed drifts by 10% within minutes: one window per setup does not
    resolve a few percent)."""
    setups = {
        "ddp": lambda r: sched_ddp(dataset, work / f"r{r}", seconds),
        f"ptft_noray_zero{stage}": lambda r: sched_ptft(dataset, work / f"r{r}", seconds, stage, with_ray=False),
        f"ptft_ray_zero{stage}": lambda r: sched_ptft(dataset, work / f"r{r}", seconds, stage, with_ray=True),
    }
    rounds: dict[str, list[dict]] = {name: [] for name in setups}
    for r in range(repeats):
        (work / f"r{r}").mkdir(parents=True, exist_ok=True)
        for name, measure in setups.items():
            rounds[name].append(measure(r))
    median = {
        name: {key: statistics.median(one[key] for one in runs) for key in (*SCHED_FIELDS, "others_cpu_ms")}
        for name, runs in rounds.items()
    }
    names = list(setups)
    print(f"\nper step, median of {repeats} rounds ({seconds:g} s each once warm; per rank: mean of the 2 ranks)")
    print(f"{'':<26}" + "".join(f"{n:>20}" for n in names))
    for key in (*SCHED_FIELDS, "others_cpu_ms"):
        print(f"{key:<26}" + "".join(f"{median[n][key]:>20.1f}" for n in names))
    print("wall ms per round: " + "; ".join(f"{n} {[one['wall_ms'] for one in rounds[n]]}" for n in names))
    for n in names:
        print(
            f"{n}, other processes (last round): " + ", ".join(f"{k} {v:g}" for k, v in rounds[n][-1]["others"].items())
        )
    print(json.dumps({"median": median, "rounds": rounds}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="--sched: rounds of every setup, interleaved")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--native", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--ray-cpu", action="store_true", help="CPU of Ray's own processes, defaults vs lean")
    parser.add_argument("--sched", action="store_true", help="CPU, switches and faults per step; DDP, no Ray, Ray")
    parser.add_argument("--dataset", type=Path, default=None, help="a dataset built before (default: build one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="ptft-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    dataset = args.dataset or tt.build_dataset(work)
    if args.sched:
        sched(dataset, work, args.seconds, args.stage, args.repeats)
        return 0
    if args.ray_cpu:
        out = ray_cpu(dataset, work, args.seconds, args.stage)
        print_ray_cpu(out)
        print(json.dumps(out))
        return 0
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
