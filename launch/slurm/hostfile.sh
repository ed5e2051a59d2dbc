#!/usr/bin/env bash
# Write a DeepSpeed hostfile for the current SLURM allocation: one "HOST slots=N" line per node, leaving out the
# hosts MFF_EXCLUDE names (space-separated; pretrain.sbatch: hosts lost in an earlier attempt of the job).
#   launch/slurm/hostfile.sh OUT [SLOTS]     SLOTS default: GPUs per node from SLURM, else 1
set -euo pipefail
out=${1:?usage: hostfile.sh OUT [SLOTS]}
slots=${2:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-1}}}
slots=${slots##*:}  # "a100:8" -> 8
[ -n "${SLURM_JOB_NODELIST:-}" ] || { echo "hostfile.sh: SLURM_JOB_NODELIST is not set (not inside a SLURM job)" >&2; exit 2; }
[[ "$slots" =~ ^[1-9][0-9]*$ ]] || { echo "hostfile.sh: SLOTS: expected a positive integer, got '$slots'" >&2; exit 2; }
tmp=$(mktemp "$out.XXXXXX")
scontrol show hostnames "$SLURM_JOB_NODELIST" | awk -v s="$slots" -v skip="${MFF_EXCLUDE:-}" \
    'BEGIN {n = split(skip, x, " "); for (i = 1; i <= n; i++) out[x[i]] = 1} NF && !($1 in out) {print $1 " slots=" s}' \
    > "$tmp"
mv -f "$tmp" "$out"
