"""``ptft doctor``: what this Python environment can run, checked for real.

Reports the versions that matter (torch and its CUDA build, NCCL, DeepSpeed and its ops, Ray,
transformers, peft, webdataset) against the versions ptft pins, the accelerators torch sees,
and the result of a one-process ``torch.distributed`` all-reduce over gloo (and over NCCL on a
GPU). Ends with what works here: ZeRO on CPU, GPU training, bf16, multi-node NCCL.

Nothing is imported at module level beyond the standard library: a missing or broken package
is a finding, not a crash. ``collect()`` returns the findings as data (``--json`` prints them);
``render()`` turns them into the table the CLI prints.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata as md
import io
import logging
import os
import platform
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass, field

log = logging.getLogger(__name__)

#: Distribution name -> import name, for the packages whose versions are reported.
PACKAGES = {
    "torch": "torch",
    "deepspeed": "deepspeed",
    "ray": "ray",
    "transformers": "transformers",
    "peft": "peft",
    "tokenizers": "tokenizers",
    "webdataset": "webdataset",
    "wandb": "wandb",
}


@dataclass
class Check:
    """One finding: ``status`` is ``ok``, ``warn`` (works, with a caveat) or ``fail``."""

    name: str
    status: str
    detail: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    works: dict[str, str] = field(default_factory=dict)

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for c in self.checks)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(c) for c in self.checks], "works": self.works}


def _pins() -> dict[str, str]:
    """Package -> the exact version ptft's metadata pins (empty when ptft is not installed)."""
    try:
        requires = md.requires("ptft-dist") or []
    except md.PackageNotFoundError:
        return {}
    pins = {}
    for req in requires:
        if "extra ==" in req:
            continue
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", req)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def _versions(report: Report) -> dict[str, str | None]:
    pins = _pins()
    found: dict[str, str | None] = {}
    for dist, module in PACKAGES.items():
        try:
            version = md.version(dist)
        except md.PackageNotFoundError:
            version = None
        found[dist] = version
        pinned = pins.get(dist)
        if version is None:
            report.add(dist, "fail", f"not installed{f' (ptft pins {pinned})' if pinned else ''}")
            continue
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                importlib.import_module(module)
        except Exception as e:  # a broken install is what this command is for
            report.add(dist, "fail", f"{version}, but `import {module}` fails: {type(e).__name__}: {e}")
            continue
        base = version.split("+")[0]
        if pinned and base != pinned.split("+")[0]:
            report.add(dist, "warn", f"{version} (ptft pins {pinned})")
        else:
            report.add(dist, "ok", version)
    return found


def _torch(report: Report) -> dict:
    import torch

    info: dict = {"cuda_build": torch.version.cuda, "gpus": [], "bf16_gpu": False}
    report.add(
        "torch build",
        "ok",
        f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build (no CUDA)",
    )
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append(f"{props.name} ({props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor})")
        info["bf16_gpu"] = bool(torch.cuda.is_bf16_supported())
        report.add("GPUs", "ok", f"{len(info['gpus'])}: " + "; ".join(info["gpus"]))
    elif torch.version.cuda:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        report.add(
            "GPUs",
            "warn",
            f"a CUDA build, but torch sees no GPU (driver missing or too old, or CUDA_VISIBLE_DEVICES={visible!r})",
        )
    else:
        report.add("GPUs", "ok", "none (CPU build)")
    import torch.distributed as dist

    info["nccl"] = None
    if dist.is_available() and dist.is_nccl_available() and torch.cuda.is_available():
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        report.add("NCCL", "ok", info["nccl"])
    else:
        report.add("NCCL", "ok" if not torch.version.cuda else "warn", "not available (gloo only)")
    report.add(
        "gloo", "ok" if dist.is_available() and dist.is_gloo_available() else "fail", "torch.distributed backend"
    )
    report.add("CPU threads", "ok", f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
    return info


def _all_reduce(backend: str, timeout_s: float = 60) -> str:
    """A one-process process group on loopback: init, all-reduce, destroy. Returns what it saw."""
    import datetime

    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        t = torch.ones(4, device="cuda" if backend == "nccl" else "cpu")
        dist.all_reduce(t)
        if backend == "nccl":
            torch.cuda.synchronize()
        assert t.sum().item() == 4.0
    finally:
        dist.destroy_process_group()
    return f"one-process all-reduce in {time.monotonic() - start:.2f} s"


def _collectives(report: Report, torch_info: dict) -> None:
    backends = ["gloo"] + (["nccl"] if torch_info.get("nccl") else [])
    for backend in backends:
        try:
            report.add(f"all-reduce ({backend})", "ok", _all_reduce(backend))
        except Exception as e:
            report.add(f"all-reduce ({backend})", "fail", f"{type(e).__name__}: {e}")


def _deepspeed(report: Report) -> dict:
    info: dict = {"accelerator": None, "ops": {}}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
        from deepspeed.ops.op_builder.builder import probe_is_compatible

        accel = get_accelerator()
        info["accelerator"] = f"{accel._name} ({accel.communication_backend_name()})"
        for name, builder in ALL_OPS.items():
            if name == "deepspeed_not_implemented":
                continue
            try:
                compatible = bool(probe_is_compatible(builder, False))
            except Exception:
                compatible = False
            info["ops"][name] = "prebuilt" if installed_ops.get(name) else ("JIT" if compatible else "no")
    report.add("DeepSpeed accelerator", "ok", info["accelerator"])
    ops = info["ops"]
    listed = ", ".join(f"{n}: {v}" for n, v in sorted(ops.items()))
    report.add("DeepSpeed ops", "ok", listed or "none listed")
    try:
        from torch.utils.cpp_extension import is_ninja_available

        ninja = is_ninja_available()
    except Exception:
        ninja = False
    needs_jit = any(v == "JIT" for v in ops.values())
    report.add(
        "JIT builds",
        "ok" if ninja or not needs_jit else "warn",
        ("ninja found" if ninja else "ninja missing: JIT-built ops (shm comm on CPU, fused Adam) cannot build")
        + f"; cache TORCH_EXTENSIONS_DIR={os.environ.get('TORCH_EXTENSIONS_DIR', '~/.cache/torch_extensions')}",
    )
    return info


def _ray(report: Report) -> None:
    try:
        md.version("aiohttp")
        dashboard = True
    except md.PackageNotFoundError:
        dashboard = False
    report.add(
        "Ray Jobs API",
        "ok" if dashboard else "warn",
        "ray[default] present: a head started here serves `ray job submit`"
        if dashboard
        else "ray[default] missing: a head started here has no dashboard, so no `ray job submit`",
    )


def collect(collectives: bool = True) -> Report:
    """Every check; never raises for a broken package (it becomes a ``fail`` finding)."""
    report = Report()
    report.add("python", "ok", f"{platform.python_version()} on {platform.platform()}")
    versions = _versions(report)
    torch_info: dict = {}
    ds_info: dict = {}
    if versions.get("torch") and all(c.status != "fail" for c in report.checks if c.name == "torch"):
        torch_info = _torch(report)
        if collectives:
            _collectives(report, torch_info)
    if versions.get("deepspeed") and all(c.status != "fail" for c in report.checks if c.name == "deepspeed"):
        try:
            ds_info = _deepspeed(report)
        except Exception as e:
            report.add("DeepSpeed accelerator", "fail", f"{type(e).__name__}: {e}")
    if versions.get("ray"):
        _ray(report)

    def failed(name: str) -> bool:
        return any(c.status == "fail" and c.name.startswith(name) for c in report.checks)

    base_ok = not (failed("torch") or failed("deepspeed") or failed("ray") or failed("all-reduce (gloo)"))
    report.works["ZeRO 0-3 on CPU (gloo), Ray Train"] = "yes" if base_ok else "no: see the failures above"
    gpus = torch_info.get("gpus") or []
    if gpus and base_ok and not failed("all-reduce (nccl)"):
        report.works["GPU training (scaling.use_gpu=true)"] = f"yes: {len(gpus)} GPU(s) on this node"
    elif torch_info.get("cuda_build"):
        report.works["GPU training (scaling.use_gpu=true)"] = "no: a CUDA build of torch, but no usable GPU here"
    else:
        report.works["GPU training (scaling.use_gpu=true)"] = (
            "no: CPU build of torch (`make install GPU=1` on a GPU node)"
        )
    report.works["bf16 (zero.precision=bf16)"] = (
        "yes, on the GPUs" if torch_info.get("bf16_gpu") else ("yes, on CPU (slow; for tests)" if base_ok else "no")
    )
    report.works["multi-node NCCL"] = (
        f"NCCL {torch_info['nccl']} present; set NCCL_SOCKET_IFNAME (docs/cluster-slurm.md)"
        if torch_info.get("nccl")
        else "no NCCL here: multi-node runs use gloo (CPU)"
    )
    if ds_info.get("accelerator"):
        report.works["DeepSpeed accelerator"] = ds_info["accelerator"]
    return report


def render(report: Report) -> str:
    width = max(len(c.name) for c in report.checks) + 2
    mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
    lines = [f"{mark[c.status]}  {c.name.ljust(width)}{c.detail}" for c in report.checks]
    lines.append("")
    lines.append("what works here:")
    wide = max(len(k) for k in report.works) + 2
    lines += [f"  {k.ljust(wide)}{v}" for k, v in report.works.items()]
    lines.append("")
    lines.append("doctor: all checks passed" if report.ok else "doctor: some checks FAILED (see FAIL above)")
    return "\n".join(lines)


if __name__ == "__main__":
    r = collect()
    print(render(r))
    sys.exit(0 if r.ok else 1)
