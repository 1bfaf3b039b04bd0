#!/usr/bin/env bash
# Stop a Ray job: Ray sends SIGTERM to the `ptft` driver (then SIGKILL after a grace period),
# which ends its training workers. Checkpoints already reported stay in the run directory.
#
#   launch/ray-stop.sh [--address URL] JOB_ID
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_ray_env.sh"

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
if [[ "${1:-}" == "--address" ]]; then address="$2"; shift 2; fi
ray_auth_for "$address"
if [[ $# -ne 1 ]]; then echo "usage: launch/ray-stop.sh [--address URL] JOB_ID" >&2; exit 2; fi

ray job stop --address "$address" "$1"
"$(dirname "${BASH_SOURCE[0]}")/ray-status.sh" --address "$address" "$1" || true
