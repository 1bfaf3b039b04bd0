"""cluster/kuberay manifests: valid against KubeRay's own CRD schemas, consistent with each
other, and running `ptft` commands that the installed ptft accepts.

No Kubernetes API server runs here. The CRDs' OpenAPI v3 schemas (``../shared/schemas/kuberay``
beside the checkout) are checked with jsonschema the way ``kubectl apply`` checks by default
(strict field validation): an unknown field is an error, not silently dropped.
"""

from __future__ import annotations

import copy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "cluster" / "kuberay"
SCHEMAS = ROOT.parent / "shared" / "schemas" / "kuberay"
SHARED_MOUNT = "/mnt/shared"


def _strict(schema):
    """Close every object schema that lists its properties (as strict validation does)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict:
    """(apiVersion, kind) -> a jsonschema validator, for every served version of each CRD."""
    jsonschema = pytest.importorskip("jsonschema")
    if not SCHEMAS.is_dir():
        pytest.skip(
            f"KubeRay CRD schemas not found at {SCHEMAS} (expected ../shared/schemas/kuberay beside the checkout)"
        )
    validators = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 2 MB each
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served"):
                schema = _strict(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    assert {k for _, k in validators} >= {"RayCluster", "RayJob"}, sorted(validators)
    return validators


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def _errors(validators: dict, name: str, doc: dict) -> list[str]:
    """Schema errors of one manifest, each naming the file and the field."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in validators:
        return [f"{name}: no CRD schema for apiVersion={key[0]!r} kind={key[1]!r}"]
    errors = sorted(validators[key].iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{name}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def _ray_docs() -> list[tuple[str, dict]]:
    return [(n, d) for n, d in _documents() if d.get("kind") in ("RayCluster", "RayJob")]


def _cluster_spec(doc: dict) -> dict | None:
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec")


def _pod_specs(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    return [(name, g["template"]["spec"]) for name, g in groups]


def _gpus_per_pod(group: dict) -> int:
    return sum(
        int(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
        for c in group["template"]["spec"]["containers"]
    )


def test_there_are_ray_clusters_and_ray_jobs_for_pretraining_and_finetuning():
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in _ray_docs()}
    assert any(k == "RayCluster" for k, _ in kinds), kinds
    jobs = {n for k, n in kinds if k == "RayJob"}
    assert any("pretrain" in n for n in jobs) and any("finetune" in n for n in jobs), jobs


def test_every_manifest_validates_against_the_kuberay_crds(crd_validators):
    errors = [e for name, doc in _ray_docs() for e in _errors(crd_validators, name, doc)]
    assert not errors, "\n".join(errors)


def test_the_validation_rejects_typos_and_wrong_types(crd_validators):
    """The check above can fail: a misspelt field, a wrong type, a missing required field."""
    name, cluster = next((n, d) for n, d in _ray_docs() if d["kind"] == "RayCluster")
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["minReplica"] = 1
    assert any(
        "spec.workerGroupSpecs.0: Additional properties are not allowed ('minReplica'" in e
        for e in _errors(crd_validators, name, typo)
    )
    wrong = copy.deepcopy(cluster)
    wrong["spec"]["workerGroupSpecs"][0]["maxReplicas"] = "4"
    assert any(
        "spec.workerGroupSpecs.0.maxReplicas: '4' is not of type 'integer'" in e
        for e in _errors(crd_validators, name, wrong)
    )
    missing = copy.deepcopy(cluster)
    del missing["spec"]["workerGroupSpecs"][0]["groupName"]
    assert any("'groupName' is a required property" in e for e in _errors(crd_validators, name, missing))
    container = copy.deepcopy(cluster)
    container["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    assert any(
        "containers.0: Additional properties are not allowed ('resource'" in e
        for e in _errors(crd_validators, name, container)
    )


def test_shared_storage_secret_and_gpu_groups_are_wired_everywhere():
    pvcs = {d["metadata"]["name"]: d for _, d in _documents() if d.get("kind") == "PersistentVolumeClaim"}
    assert pvcs, "a PersistentVolumeClaim for the shared run directories"
    assert all("ReadWriteMany" in p["spec"]["accessModes"] for p in pvcs.values()), (
        "ranks on different nodes write one run dir"
    )
    clusters = {d["metadata"]["name"] for _, d in _ray_docs() if d["kind"] == "RayCluster"}
    for name, doc in _ray_docs():
        spec = _cluster_spec(doc)
        if spec is None:  # a RayJob on an existing cluster
            selected = doc["spec"]["clusterSelector"]["ray.io/cluster"]
            assert selected in clusters, f"{name}: clusterSelector names {selected!r}, not one of {sorted(clusters)}"
            continue
        for group, pod in _pod_specs(spec):
            where = f"{name}: {group}"
            claims = {
                v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in pod.get("volumes", [])
                if "persistentVolumeClaim" in v
            }
            assert set(claims.values()) <= set(pvcs) and claims, f"{where}: mounts no claim of {sorted(pvcs)}"
            for c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert mounts.get(SHARED_MOUNT) in claims, (
                    f"{where}: {c['name']} does not mount the shared claim at {SHARED_MOUNT}"
                )
                env = {e["name"]: e for e in c.get("env", [])}
                assert "secretKeyRef" in env.get("WANDB_API_KEY", {}).get("valueFrom", {}), (
                    f"{where}: WANDB_API_KEY must come from a Secret"
                )
                res = c.get("resources", {})
                assert res.get("requests") and res.get("limits"), (
                    f"{where}: {c['name']} needs resource requests and limits"
                )
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], (
                f"{name}: {group['groupName']} replicas"
            )
            assert _gpus_per_pod(group) > 0, f"{name}: worker group {group['groupName']} has no GPUs"


def _dry_run(entrypoint: str) -> dict:
    """Run the manifest's ptft command with --dry-run; returns its resolved config."""
    argv = shlex.split(entrypoint)
    if argv[0] == "ptft":
        argv = argv[1:]
    elif argv[:3] in (["python", "-m", "ptft_dist.cli"], ["python3", "-m", "ptft_dist.cli"]):
        argv = argv[3:]
    else:
        raise AssertionError(f"entrypoint does not run ptft: {entrypoint!r}")
    r = subprocess.run(
        [sys.executable, "-m", "ptft_dist.cli", *argv, "--dry-run", "--fields-only"],  # its files are on the PVC
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, f"`ptft {' '.join(argv)} --dry-run` failed:\n{r.stderr[-3000:]}"
    resolved = r.stdout.split("# resolved config\n", 1)[1].split("\n# ", 1)[0]
    return yaml.safe_load(resolved)


def test_every_ray_job_entrypoint_is_a_ptft_command_that_parses():
    jobs = [(n, d) for n, d in _ray_docs() if d["kind"] == "RayJob"]
    assert jobs
    clusters = {d["metadata"]["name"]: d["spec"] for _, d in _ray_docs() if d["kind"] == "RayCluster"}
    for name, doc in jobs:
        cfg = _dry_run(doc["spec"]["entrypoint"])
        assert cfg["run_dir"].startswith(SHARED_MOUNT + "/"), (
            f"{name}: --run-dir {cfg['run_dir']} is not on the shared PVC ({SHARED_MOUNT})"
        )
        scaling = cfg["scaling"]
        assert scaling["use_gpu"] is True, f"{name}: the manifest's workers have GPUs; set scaling.use_gpu=true"
        spec = doc["spec"].get("rayClusterSpec") or clusters[doc["spec"]["clusterSelector"]["ray.io/cluster"]]
        groups = spec["workerGroupSpecs"]
        if "rayClusterSpec" in doc["spec"]:
            gpus = sum(g["replicas"] * _gpus_per_pod(g) for g in groups)
            assert scaling["num_workers"] == gpus, (
                f"{name}: scaling.num_workers={scaling['num_workers']} but its cluster has {gpus} GPUs"
            )
        else:
            most = sum(g["maxReplicas"] * _gpus_per_pod(g) for g in groups)
            assert scaling["num_workers"] <= most, (
                f"{name}: scaling.num_workers={scaling['num_workers']} but the cluster grows to {most} GPUs"
            )
