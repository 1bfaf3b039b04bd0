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
#
# What the job gets (runtime_env):
#   working_dir  this checkout (minus .gitignore'd files: .venv, runs, caches), uploaded to the
#                cluster; the job runs `python -m ptft_dist.cli ...` from it, so every node runs
#                the code you submitted. The cluster's Python must have the dependencies
#                (pip install -e . in the image, or the same venv on a shared FS).
#   env_vars     the variables below that are set here, with their values from here:
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
python="python"
extra_env=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --address) address="$2"; shift 2 ;;
        --job-id) job_id="$2"; shift 2 ;;
        --no-wait) wait=0; shift ;;
        --env) extra_env+=("$2"); shift 2 ;;
        --python) python="$2"; shift 2 ;;
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

names = ["WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_BASE_URL", "WANDB_DIR",
         "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "HF_HOME", "PYTHONWARNINGS", "GLOO_SOCKET_IFNAME"]
names += sorted(k for k in os.environ if re.match(r"NCCL_", k))
names += os.environ.get("PTFT_EXTRA_ENV", "").split()
env = {k: os.environ[k] for k in names if k in os.environ}
print(json.dumps({
    "working_dir": sys.argv[1],
    # .gitignore'd paths are skipped by Ray already; these keep a checkout without one small.
    "excludes": [".git", ".venv", "runs", ".cache", "wandb", "*.egg-info", "__pycache__"],
    "env_vars": env,
}))
PY
)"

echo "submitting '$job_id' to $address: ptft $*"
args=(job submit --address "$address" --submission-id "$job_id" --runtime-env-json "$runtime_env")
if [[ $wait -eq 0 ]]; then
    ray "${args[@]}" --no-wait -- "$python" -m ptft_dist.cli "$@"
    echo "follow: launch/ray-logs.sh $job_id    stop: launch/ray-stop.sh $job_id"
    exit 0
fi
ray "${args[@]}" -- "$python" -m ptft_dist.cli "$@" || true
exec "$(dirname "${BASH_SOURCE[0]}")/ray-status.sh" --address "$address" "$job_id"
