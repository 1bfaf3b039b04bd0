"""`ptft doctor` on this machine (CPU): what it finds, for real; and the GPU install path's files
(the Dockerfile the KubeRay manifests name, `make install GPU=1`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _doctor(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ptft_dist.cli", "doctor", *args],
        cwd=ROOT,
        env=env or dict(os.environ, DS_ACCELERATOR="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )


def test_doctor_on_cpu_reports_versions_a_real_all_reduce_and_what_works():
    r = _doctor("--json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    found = json.loads(r.stdout)
    checks = {c["name"]: c for c in found["checks"]}
    assert found["ok"] is True
    assert checks["torch"]["detail"] == torch.__version__
    assert checks["all-reduce (gloo)"]["status"] == "ok" and "all-reduce" in checks["all-reduce (gloo)"]["detail"]
    assert checks["DeepSpeed accelerator"]["detail"] == "cpu (gloo)"
    assert "cpu_adam" in checks["DeepSpeed ops"]["detail"]
    if torch.version.cuda is None:
        assert checks["torch build"]["detail"] == "CPU-only build (no CUDA)"
        assert found["works"]["GPU training (scaling.use_gpu=true)"].startswith("no: CPU build of torch")
    assert found["works"]["ZeRO 0-3 on CPU (gloo), Ray Train"] == "yes"


def test_doctor_names_a_broken_package_and_exits_1(tmp_path):
    broken = tmp_path / "webdataset"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('webdataset is broken here')\n")
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    r = _doctor(env=env)
    assert r.returncode == 1, r.stdout[-3000:]
    assert re.search(
        r"^FAIL  webdataset .*`import webdataset` fails: ImportError: webdataset is broken here", r.stdout, re.M
    )
    assert "what works here:" in r.stdout
    assert r.stdout.rstrip().endswith("doctor: some checks FAILED (see FAIL above)")


def test_the_gpu_image_is_the_one_the_kuberay_manifests_name_on_ray_2_60():
    dockerfile = (ROOT / "Dockerfile").read_text()
    pins = (ROOT / "pyproject.toml").read_text()
    tag = re.search(r"docker build -t (\S+) \.", dockerfile).group(1)
    for manifest in (ROOT / "cluster" / "kuberay").glob("ray*.yaml"):
        for image in re.findall(r"image: (\S+)", manifest.read_text()):
            assert image == tag, f"{manifest.name} names {image}, the Dockerfile builds {tag}"
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pins).group(1)
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray_pin}-py311-gpu" in dockerfile
    for pin in re.findall(r'"((?:torch|deepspeed)==[\d.]+)"', pins):
        assert f'"{pin}"' in dockerfile, f"the Dockerfile does not install {pin}"
    assert "RUN ptft doctor" in dockerfile


def test_make_install_gpu_installs_the_cuda_build_of_the_same_pins():
    r = subprocess.run(
        ["make", "-n", "install", "GPU=1", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert "pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in r.stdout
    assert "deepspeed==0.19.8" in r.stdout and "/nonexistent-venv/bin/ptft doctor" in r.stdout
    cpu = subprocess.run(["make", "-n", "install", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True, text=True)
    assert "download.pytorch.org" not in cpu.stdout and "ptft doctor" not in cpu.stdout
