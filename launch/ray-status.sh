#!/usr/bin/env bash
# Print a Ray job's status and exit 0 only if it SUCCEEDED (1 if FAILED/STOPPED or unknown, 3 if
# still PENDING/RUNNING), so scripts and CI can branch on it.
#
#   launch/ray-status.sh [--address URL] JOB_ID
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_ray_env.sh"

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
if [[ "${1:-}" == "--address" ]]; then address="$2"; shift 2; fi
ray_auth_for "$address"
if [[ $# -ne 1 ]]; then echo "usage: launch/ray-status.sh [--address URL] JOB_ID" >&2; exit 2; fi

status="$("$RAY_PYTHON" - "$address" "$1" <<'PY'
import sys
from ray.job_submission import JobSubmissionClient

try:
    info = JobSubmissionClient(sys.argv[1]).get_job_info(sys.argv[2])
except Exception as e:  # no such job, cluster unreachable, authentication
    print("UNKNOWN", str(e).replace("\n", " ")[:500], sep="\t")
else:
    print(info.status.value, (info.message or "").replace("\n", " ")[:500], sep="\t")
PY
)"
state="${status%%$'\t'*}"
echo "job $1: $state  ${status#*$'\t'}"
case "$state" in
    SUCCEEDED) exit 0 ;;
    PENDING|RUNNING) exit 3 ;;
    *) exit 1 ;;
esac
