#!/usr/bin/env bash
# Submit one `ptft` command to Slurm (cluster/slurm/ptft.sbatch: Ray across the allocation),
# after checking it here, so a typo fails in a second rather than after the queue wait.
#
#   launch/slurm-submit.sh [--wait] [sbatch options ...] -- <ptft command and arguments>
#   launch/slurm-submit.sh --nodes=4 --gpus-per-node=4 --partition=gpu -- \
#       pretrain --config my_pretrain.yaml --run-dir /shared/runs/pre-1 scaling.use_gpu=true scaling.num_workers=16
#   launch/slurm-submit.sh --wait --nodes=1 --cpus-per-task=2 -- pipeline --config pipeline_tiny --run-dir /shared/runs/tiny
#
#   --wait   follow the job: print its output as it grows, and exit 0 only if Slurm says
#            COMPLETED and the output ends with "ptft exited with 0" (1 otherwise)
#
# sbatch options override the #SBATCH lines of cluster/slurm/ptft.sbatch. The job runs this
# checkout (PTFT_REPO) with the environment you submit from (sbatch --export=ALL): set
# PTFT_VENV, PTFT_IFNAME, WANDB_* there. Prints the job id, then where its output goes.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

wait=0
sbatch_opts=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wait) wait=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; break ;;
        *) sbatch_opts+=("$1"); shift ;;
    esac
done
if [[ $# -eq 0 ]]; then
    echo "slurm-submit.sh: no ptft command after '--', e.g. launch/slurm-submit.sh -- pipeline --run-dir /shared/runs/x" >&2
    exit 2
fi
case "$1" in
    data|pretrain|finetune|pipeline) ;;
    *) echo "slurm-submit.sh: '$1' is not a ptft command that runs on a cluster (data, pretrain, finetune, pipeline)" >&2; exit 2 ;;
esac
command -v sbatch >/dev/null || { echo "slurm-submit.sh: sbatch is not on PATH: run this on a Slurm login node" >&2; exit 2; }

# The Python that will run the job: PTFT_VENV's (default: this checkout's .venv), else PATH's.
venv="${PTFT_VENV-$repo/.venv}"
py="python3"
[[ -n "$venv" && -x "$venv/bin/python" ]] && py="$venv/bin/python"
# Config and input errors surface here (exit 2, one paragraph naming the field), not in the job.
if ! (cd "$repo" && "$py" -m ptft_dist.cli "$@" --dry-run >/dev/null); then
    echo "slurm-submit.sh: not submitted: 'ptft $*' does not check out (see above)" >&2
    exit 2
fi

out="$(sbatch --parsable --export=ALL,PTFT_REPO="$repo" "${sbatch_opts[@]}" "$repo/cluster/slurm/ptft.sbatch" "$@")"
job_id="${out%%;*}"
output_file="$(scontrol show job "$job_id" | sed -n 's/^ *StdOut=//p')"
echo "submitted Slurm job $job_id: ptft $*"
echo "output: $output_file    status: squeue -j $job_id    cancel: scancel $job_id"
[[ $wait -eq 1 ]] || exit 0

# Follow: print the output as it grows until the job leaves the queue.
printed=0
show_new_output() {
    [[ -f "$output_file" ]] || return 0
    local size
    size=$(wc -c < "$output_file")
    if (( size > printed )); then
        tail -c +$((printed + 1)) "$output_file" | head -c $((size - printed))
        printed=$size
    fi
}
while [[ -n "$(squeue -h -j "$job_id" -o %T 2>/dev/null)" ]]; do
    show_new_output
    sleep 2
done
show_new_output
state="$(scontrol show job "$job_id" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')"
rc_line="$(grep -a '^ptft exited with ' "$output_file" 2>/dev/null | tail -1 || true)"
echo "Slurm job $job_id: ${state:-unknown (no longer known to slurmctld)}; ${rc_line:-no 'ptft exited with' line in $output_file}"
[[ "$state" == COMPLETED && "$rc_line" == "ptft exited with 0" ]]
