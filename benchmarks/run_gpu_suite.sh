#!/usr/bin/env bash
# One-shot GPU suite for a bare single-GPU machine without network, within 8 minutes:
#   1. install the wheels of any missing distribution from $WHEELHOUSE (default .whl; build it with
#      launch/make_wheelhouse.sh) into /tmp/site, put it on PYTHONPATH;
#   2. the engine (benchmarks/throughput.py, ViT-B/16 224 px bf16 micro batch 256, the recipes' torch ops): our
#      engine as configured (ZeRO-1 without hooks) + the facebookresearch/mae loop, our plain torch loop, our engine
#      + torch.compile, ZeRO-2, DeepCompile,
#      each for MFF and MAE, each with the device idle time per step from the profiler; then the host-overhead
#      preset (engine vs plain loop at tiny widths, syncs per step); then MFF in each precision (one row each:
#      fp32, bf16, amp-bf16, fp16, amp-fp16; img/s, paired step-time ratio to bf16, resident and peak memory);
#   3. kernel benchmarks (benchmarks/kernels.py);
#   4. data on the GPU (step "data"): the CUDA decode tests; ~2,000 generated ImageNet-like JPEGs;
#      benchmarks/data_throughput.py --device cuda (decode: gpu with 4 workers vs the CPU path on every core),
#      then benchmarks/throughput.py --data (MFF training with those JPEGs vs synthetic inputs);
#   5. CUDA kernel tests (tests/test_kernels.py, tests/test_kernels_model.py: compiled kernels on the GPU), and the
#      precision tests (tests/test_engine_amp.py: amp-bf16 on 2 ranks, amp-fp16's loss scale, amp-fp16 on CUDA);
#   6. if time is left, the engine with the Triton kernels (kernels=auto) for the whole-step kernel comparison;
# then prints one summary table. Each step has its own timeout, so one hang does not eat the budget.
#   7. (only when asked: SUITE_STEPS=...,diagnose) the engine diagnosis: our model in a plain torch loop,
#      DeepSpeed ZeRO-0 vs ZeRO-2, and a profile of each, to locate the engine's overhead.
# SUITE_BUDGET (seconds, default 470) bounds the whole run; the steps share it. SUITE_STEPS (default
# "tests,kernels,throughput,data") picks the steps.
# Results go to $OUT if set, else benchmarks/results/. Run from anywhere: bash benchmarks/run_gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELHOUSE=${WHEELHOUSE:-.whl}
# $OUT (the device tool's folder) brings back at most 8 files: results go to a scratch folder and travel as one tarball
RES=${OUT:+/tmp/gpu_suite_results}
RES=${RES:-benchmarks/results}
[ -n "${OUT:-}" ] && rm -rf "$RES"
mkdir -p "$RES"
LOG="$RES/gpu_suite.log"
: > "$LOG"
T0=$(date +%s)
BUDGET=${SUITE_BUDGET:-470}
declare -a SUMMARY
STEPS=",${SUITE_STEPS:-tests,kernels,throughput,data},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
left() { local l=$(( BUDGET - ($(date +%s) - T0) - ${1:-0} )); [ "$l" -lt 20 ] && l=20; echo "$l"; }
cap() { local l; l=$(left "${2:-0}"); [ "$1" -lt "$l" ] && echo "$1" || echo "$l"; }  # min(want, left - reserve)

step() {  # name timeout_s command...
  local name=$1 to=$2; shift 2
  local t=$(date +%s)
  echo "=== $name (timeout ${to}s): $*" | tee -a "$LOG"
  timeout --kill-after=10 "$to" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  local st=ok; [ "$rc" = 0 ] || st="FAIL(rc=$rc)"; [ "$rc" = 124 ] && st="TIMEOUT"
  SUMMARY+=("$(printf '| %-22s | %-12s | %5ss |' "$name" "$st" "$(( $(date +%s) - t ))")")
}

# 1. wheels for missing distributions only (never shadow what the machine has, e.g. torch)
MISSING=""
if [ -d "$WHEELHOUSE" ]; then
  MISSING=$("$PY" - "$WHEELHOUSE" <<'PYEOF'
import sys, pathlib, re
from importlib import metadata
for w in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower()
    try:
        metadata.version(dist)
    except metadata.PackageNotFoundError:
        print(w)
PYEOF
)
fi
if [ -n "$MISSING" ]; then
  echo "installing from $WHEELHOUSE: $(echo "$MISSING" | xargs -n1 basename | tr '\n' ' ')" | tee -a "$LOG"
  # shellcheck disable=SC2086
  step "install wheels" 120 "$PY" -m pip install --quiet --no-index --no-deps --target /tmp/site $MISSING
else
  echo "nothing to install (wheelhouse $WHEELHOUSE absent or every distribution present)" | tee -a "$LOG"
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" | tee -a "$LOG"

unset TRITON_INTERPRET

# 2. the engine: as configured (+ official loop), plain loop, compiled; idle time from a 2-step profile each
if want throughput; then
  E=(--kernels torch --steps 12 --warmup 3 --profile 2)
  step "engine as configured" "$(cap 75 330)" "$PY" benchmarks/throughput.py "${E[@]}" --out-dir "$RES/engine"
  step "plain loop" "$(cap 50 280)" "$PY" benchmarks/throughput.py "${E[@]}" --engine plain --no-baseline --out-dir "$RES/plain"
  step "engine + compile" "$(cap 120 230)" "$PY" benchmarks/throughput.py "${E[@]}" --compile --no-baseline --out-dir "$RES/compiled"
  # the other DeepSpeed paths (docs/ENGINE.md "Which path"): ZeRO-2 with its hooks, and DeepCompile
  step "engine zero2" "$(cap 50 200)" "$PY" benchmarks/throughput.py "${E[@]}" --zero-stage 2 --no-baseline --out-dir "$RES/zero2"
  step "engine deepcompile" "$(cap 120 180)" "$PY" benchmarks/throughput.py "${E[@]}" --deepcompile --no-baseline --out-dir "$RES/deepcompile"
  step "host overhead" "$(cap 30 200)" "$PY" benchmarks/throughput.py --preset overhead --steps 40 --out-dir "$RES"
  step "precisions" "$(cap 90 170)" "$PY" benchmarks/throughput.py --kernels torch --precisions bf16,fp32,amp-bf16,fp16,amp-fp16 \
    --steps 8 --warmup 2 --out-dir "$RES"
fi

# 3. kernel benchmarks (writes kernels.json / kernels.md), torch.compile baseline included
if ! want kernels; then :
elif "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  step "kernel benchmarks" "$(cap 100 150)" "$PY" benchmarks/kernels.py --out-dir "$RES" --reps 50
else  # no GPU: smoke test only
  step "kernel benchmarks" 240 "$PY" benchmarks/kernels.py --out-dir "$RES" --device cpu --quick
fi

# 4. data on the GPU (alone: SUITE_STEPS=data)
if want data; then
  JPEGS=/tmp/mff_ds_jpegs
  rm -rf "$JPEGS"
  step "data cuda tests" "$(cap 30 120)" "$PY" -m pytest -q -p no:cacheprovider tests/test_data.py -k cuda \
    -o addopts="" --timeout=30 --junitxml="$RES/data_tests.xml"
  step "data throughput" "$(cap 50 80)" "$PY" benchmarks/data_throughput.py --device cuda --images 2000 \
    --data-dir "$JPEGS" --gpu-workers 4 --json "$RES/data_throughput_cuda.json"
  [ -d "$JPEGS" ] && step "throughput real data" "$(cap 60 40)" "$PY" benchmarks/throughput.py --data "$JPEGS" \
    --workers 4 --decode gpu --no-baseline --steps 10 --warmup 3 --out-dir "$RES/real_data"
fi

# 5. kernel tests, compiled on the GPU (interpreter off)
want tests && step "kernel tests" "$(cap 60 0)" "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_kernels_model.py \
  -o addopts="" --timeout=90 -s --junitxml="$RES/kernel_tests.xml"
want tests && step "precision tests" "$(cap 120 0)" "$PY" -m pytest -q -p no:cacheprovider tests/test_engine_amp.py \
  -o addopts="" --timeout=300 -s --junitxml="$RES/amp_tests.xml"

# 6. the whole step with the Triton kernels, if time is left
if want throughput && [ "$(left)" -gt 60 ]; then
  step "engine triton kernels" "$(cap 60 5)" "$PY" benchmarks/throughput.py --kernels auto --no-baseline \
    --steps 12 --warmup 3 --out-dir "$RES/triton"
fi
if want diagnose; then
  D=(--no-baseline --steps 10 --warmup 3 --kernels torch)
  step "diag plain loop" "$(cap 90 5)" "$PY" benchmarks/throughput.py "${D[@]}" --engine plain --out-dir "$RES/plain" --profile 2
  step "diag zero0" "$(cap 90 5)" "$PY" benchmarks/throughput.py "${D[@]}" --zero-stage 0 --out-dir "$RES/zero0" --profile 2
  step "diag zero2" "$(cap 90 5)" "$PY" benchmarks/throughput.py "${D[@]}" --zero-stage 2 --out-dir "$RES/zero2" --profile 2
fi

echo
echo "## GPU suite summary ($(( $(date +%s) - T0 ))s total; log $LOG)" | tee -a "$LOG"
{ echo "| step                   | status       | time   |"; echo "|---|---|---|"; printf '%s\n' "${SUMMARY[@]}"; } | tee -a "$LOG"
for f in "$RES/kernels.md" "$RES/kernels_quick.md" "$RES"/*/throughput_*.md "$RES"/overhead_*.md "$RES"/precisions_*.md \
         "$RES/data_throughput_cuda.json"; do [ -f "$f" ] && { echo; cat "$f"; }; done | tee -a "$LOG"
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_results.tgz" -C "$RES" . && cp "$LOG" "$OUT/" && echo "results: \$OUT/gpu_results.tgz"
fi
