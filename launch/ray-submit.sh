#!/usr/bin/env bash
# Submit one `ptft` command to a running Ray cluster as a Ray job, and follow its logs.
#
#   export RAY_ADDRESS=http://<head>:8265          # the head's dashboard (Ray Jobs API)
#   launch/ray-submit.sh pipeline --config pipeline_tiny --run-dir /shared/runs/tiny
#   launch/ray-submit.sh --no-wait --job-id pre-1 pretrain --config my.yaml --run-dir /shared/runs/pre-1
#
# Options (before the ptft command):
#   --address URL     Ray Jobs API address (default: $RAY_ADDRESS, else http://127.0.0.1:8265)
#   --job-id ID       submission id (default: ptft-<command>-<date>-<time>); use it with
#                     launch/ray-logs.sh ID and launch/ray-stop.sh ID
#   --no-wait         return after submitting instead of following the logs
#   --env NAME        also pass this environment variable to the job (repeatable)
#   --python CMD      Python on the cluster that has ptft's dependencies (default: python)
#   --dry-run         check here and submit nothing: the ptft command's config and input files
#                     (`ptft ... --dry-run` with this checkout), a --config file inside the
#                     checkout, the runtime env; then print the `ray job submit` command
#
# What the job gets (runtime_env): launch/runtime-env.yaml (what the plain
# `ray job submit --working-dir . --runtime-env launch/runtime-env.yaml` uses), plus
#   working_dir  this checkout (minus .gitignore'd files: .venv, runs, caches), uploaded to the
#                cluster; the job runs `python -m ptft_dist.cli ...` from it, so every node runs
#                the code you submitted. The cluster's Python must have the dependencies
#                (pip install -e . in the image, or the same venv on a shared FS).
#   env_vars     the file's env_vars, and the variables below that are set here, with their values from here:
#                W&B (WANDB_API_KEY, WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY, WANDB_BASE_URL,
#                WANDB_DIR), DeepSpeed's JIT cache (TORCH_EXTENSIONS_DIR), DS_ACCELERATOR,
#                HF_HOME, PYTHONWARNINGS, NCCL_*/GLOO_SOCKET_IFNAME, and every --env NAME.
#                Paths must be valid on the cluster nodes. A WANDB_API_KEY passed this way is
#                visible to anyone who can read the job's runtime_env (dashboard, `ray job
#                list`); on shared clusters set it in the nodes' environment instead.
#
# --run-dir must be on storage every node sees (NFS, Lustre, a PVC): checkpoints, the export
# and summary.json are written by the workers, on whichever node they run.
#
# Exit status: 0 when the job SUCCEEDED; 1 when it FAILED or was STOPPED; 2 on bad usage.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_ray_env.sh"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
job_id=""
wait=1
dry_run=0
python="python"
extra_env=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --address) address="$2"; shift 2 ;;
        --job-id) job_id="$2"; shift 2 ;;
        --no-wait) wait=0; shift ;;
        --env) extra_env+=("$2"); shift 2 ;;
        --python) python="$2"; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        -*) echo "ray-submit.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [[ $# -eq 0 ]]; then
    echo "ray-submit.sh: no ptft command given, e.g. launch/ray-submit.sh pipeline --run-dir /shared/runs/x" >&2
    exit 2
fi
case "$1" in
    data|pretrain|finetune|pipeline) ;;
    *) echo "ray-submit.sh: '$1' is not a ptft command that runs on a cluster (data, pretrain, finetune, pipeline)" >&2; exit 2 ;;
esac

ray_auth_for "$address"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
job_id="${job_id:-ptft-$1-$(date +%Y%m%d-%H%M%S)}"

# Build the runtime_env JSON from the variables that are set here.
runtime_env="$(PTFT_EXTRA_ENV="${extra_env[*]:-}" "$RAY_PYTHON" - "$repo" <<'PY'
import json, os, re, sys

import yaml

path = os.path.join(sys.argv[1], "launch", "runtime-env.yaml")
try:
    with open(path) as f:
        base = yaml.safe_load(f) or {}
    if not isinstance(base, dict) or not isinstance(base.get("env_vars", {}), dict):
        raise ValueError("expected a mapping with an env_vars mapping")
except (OSError, ValueError, yaml.YAMLError) as e:
    sys.exit(f"ray-submit.sh: {path}: {e}")

names = ["WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL", "WANDB_DIR",
         "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "HF_HOME", "PYTHONWARNINGS", "GLOO_SOCKET_IFNAME"]
names += sorted(k for k in os.environ if re.match(r"NCCL_", k))
names += os.environ.get("PTFT_EXTRA_ENV", "").split()
env = {str(k): str(v) for k, v in (base.get("env_vars") or {}).items()}
env.update({k: os.environ[k] for k in names if k in os.environ})
print(json.dumps({**base, "working_dir": sys.argv[1], "env_vars": env}))
PY
)"

args=(job submit --address "$address" --submission-id "$job_id" --runtime-env-json "$runtime_env")
if [[ $dry_run -eq 1 ]]; then
    # A --config file is read on the cluster, relative to the uploaded checkout.
    prev=""
    for arg in "$@"; do
        if [[ "$prev" == --config && ( "$arg" == */* || "$arg" == *.yaml || "$arg" == *.yml ) ]]; then
            real="$(realpath -m "$arg")"
            if [[ "$real" != "$repo"/* ]]; then
                echo "ray-submit.sh: --config $arg is outside the checkout ($repo), the only files the job gets: copy it into the checkout (a path on the cluster's shared file system is not checked here: submit without --dry-run)" >&2
                exit 2
            fi
        fi
        prev="$arg"
    done
    # Config and input errors surface here (exit 2, one paragraph naming the field), not on the cluster.
    if ! (cd "$repo" && "$RAY_PYTHON" -m ptft_dist.cli "$@" --dry-run >/dev/null); then
        echo "ray-submit.sh: not submitted: 'ptft $*' does not check out (see above)" >&2
        exit 2
    fi
    echo "dry run: 'ptft $*' checks out; would run:"
    printf '%q ' ray "${args[@]}" -- "$python" -m ptft_dist.cli "$@"
    echo
    exit 0
fi
echo "submitting '$job_id' to $address: ptft $*"
if [[ $wait -eq 0 ]]; then
    ray "${args[@]}" --no-wait -- "$python" -m ptft_dist.cli "$@"
    echo "follow: launch/ray-logs.sh $job_id    stop: launch/ray-stop.sh $job_id"
    exit 0
fi
ray "${args[@]}" -- "$python" -m ptft_dist.cli "$@" || true
exec "$(dirname "${BASH_SOURCE[0]}")/ray-status.sh" --address "$address" "$job_id"
