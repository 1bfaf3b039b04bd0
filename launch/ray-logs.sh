#!/usr/bin/env bash
# Follow a Ray job's logs until it ends, then print its status (exit status as
# launch/ray-status.sh: 0 only if it SUCCEEDED). Ctrl-C stops following, not the job.
#
#   launch/ray-logs.sh [--address URL] JOB_ID
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_ray_env.sh"

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
if [[ "${1:-}" == "--address" ]]; then address="$2"; shift 2; fi
ray_auth_for "$address"
if [[ $# -ne 1 ]]; then echo "usage: launch/ray-logs.sh [--address URL] JOB_ID" >&2; exit 2; fi

ray job logs --address "$address" --follow "$1" || true
exec "$(dirname "${BASH_SOURCE[0]}")/ray-status.sh" --address "$address" "$1"
