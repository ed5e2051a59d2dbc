#!/usr/bin/env bash
# Write a .deepspeed_env (KEY=VALUE lines) from the current environment. The deepspeed launcher reads
# ./.deepspeed_env and ~/.deepspeed_env (or the file named by DS_ENV_FILE) and exports every line on each node
# it reaches over pdsh/ssh; by itself it forwards only PYTHON*, MLFLOW*, UCX* and MV2* variables.
#   launch/slurm/deepspeed_env.sh [FILE [EXTRA_VAR ...]]     FILE default: ./.deepspeed_env
set -euo pipefail
out=${1:-.deepspeed_env}
shift || true
vars=(PATH PYTHONPATH LD_LIBRARY_PATH DS_ACCELERATOR OMP_NUM_THREADS CUDA_HOME HF_HOME MFF_DS_CACHE
      $(compgen -e | grep -E '^(NCCL_|GLOO_|MFF_DS_|TORCH_)' || true) "$@")
tmp=$(mktemp "$out.XXXXXX")
declare -A seen=()
for v in "${vars[@]}"; do
    [[ -n "${seen[$v]:-}" || -z "${!v+x}" || "${!v}" == *$'\n'* ]] && continue  # unset, repeated, or multi-line
    seen[$v]=1
    printf '%s=%s\n' "$v" "${!v}"
done > "$tmp"
mv -f "$tmp" "$out"
