#!/usr/bin/env bash
# One GPU session's check of the block-sparse attention (issue 21), under 8 minutes on
# one H100 / H200. Run from the repository root:
#
#     OUT=/some/folder bash scripts/gpu_check.sh      # default OUT: benchmarks/results
#
# Stages, each bounded by `timeout` so a slow stage cannot eat the next one's time:
#   1. benchmarks/attention.py: correctness of our op (Triton, dispatch, dense+bias) and
#      FlexAttention against the float64 reference on small and `small`-encoder layouts,
#      a no-sync check (CUDA sync-debug "error" mode), then the timed rows: the `base`
#      and `small` encoders' layouts and two synthetic grids, with FlexAttention until
#      --flex-budget-s. Writes attention-<device>-<date>.json after every row.
#   2. pytest -m gpu tests/test_triton_kernels.py (bf16/fp16/fp32, d=128, T=16, dense).
#   3. benchmarks/train_step.py for `small` up to batch 32 (volumes/s with the new op),
#      if at least 100 s are left.
# Exit status: non-zero if stage 1 or 2 failed (stage 3 is informational).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
BUDGET_S="${BUDGET_S:-470}"
LOG="$OUT/gpu_check.log"
status=0

left() { echo $(( BUDGET_S - SECONDS )); }
{
  echo "# gpu_check.sh $(date -u +%FT%TZ)"
  nvidia-smi -L || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOG"

echo "== 1. attention benchmark (correctness, no-sync, timed rows)" | tee -a "$LOG"
timeout 300 "$PY" benchmarks/attention.py --out "$OUT" --suite all --grids 14x14x10,28x28x20 \
    --repeats 30 --flex kv64,create128 --flex-budget-s 120 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}; echo "stage 1 exit $rc (124 = timed out; the JSON holds the rows done)" | tee -a "$LOG"
[ "$rc" -ne 0 ] && status=1

echo "== 2. GPU kernel tests ($(left) s left)" | tee -a "$LOG"
t=$(( $(left) - 110 )); [ "$t" -gt 150 ] && t=150; [ "$t" -lt 30 ] && t=30
timeout "$t" "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_triton_kernels.py 2>&1 | tee "$OUT/gpu-tests.txt" | tee -a "$LOG"
rc=${PIPESTATUS[0]}; echo "stage 2 exit $rc" | tee -a "$LOG"
[ "$rc" -ne 0 ] && status=1

if [ "$(left)" -ge 100 ]; then
  echo "== 3. train_step small ($(left) s left)" | tee -a "$LOG"
  timeout $(( $(left) - 10 )) "$PY" benchmarks/train_step.py --out "$OUT" --sizes small --max-batch 32 --no-merlin 2>&1 | tee -a "$LOG"
  echo "stage 3 exit ${PIPESTATUS[0]}" | tee -a "$LOG"
else
  echo "== 3. train_step skipped: $(left) s left" | tee -a "$LOG"
fi
echo "gpu_check.sh done in ${SECONDS} s, status $status" | tee -a "$LOG"
exit $status
