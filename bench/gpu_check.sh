#!/usr/bin/env bash
# The one prepared device check (an H100/H200, under the device's 10-minute command limit): build the
# kernels, run tests/gpu, time the fused kernels against eager and compiled references, our model
# against transformers, the attention kernels, and three short runs of the real trainer
# (tohoku-bert-500m at 4,096 in bf16 and in fp8; modernbert-ja-130m at 1,024 and 8,192). Every stage has its own time
# limit, and all of them together at most GPU_CHECK_BUDGET seconds (default 570): a stage that would
# start past the budget is recorded as not run. It ends with one table (stage, status, seconds,
# headline figure) and exits 1 when any stage failed, timed out or was skipped for time.
#
#   bash bench/gpu_check.sh [--only STAGE,...] [OUT_DIR]             # on the GPU machine
#   bash bench/gpu_check.sh --rehearse [--only STAGE,...] [OUT_DIR]  # the same scripts and flags on CPU,
#                                                                    # tiny shapes, before device time is spent
#
# OUT_DIR (default $OUT, else runs/gpu_check) receives two files, within the device's return limits:
# gpu_check.json (every stage's status, figures and log tail) and gpu_check_logs.tar.gz (full logs).
# With the device tool: rehearse on CPU first, then run `bash bench/gpu_check.sh` with timeout_s 600
# (the budget keeps it under that); a lease of 15 minutes leaves room to rerun only what failed,
# `--only STAGE,...`, after a fix.
# Stages: build gpu_tests kernels model_step attention train_tohoku_4k train_tohoku_4k_fp8
# train_modernbert_1k train_modernbert_8k. PYTHON names the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
ONLY=
while [ $# -gt 0 ]; do
  case $1 in
    --rehearse) REHEARSE=1; shift ;;
    --only) ONLY=,$2,; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0" | cut -c3-; exit 0 ;;
    -*) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
DIR=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$DIR" || { echo "error: cannot create $DIR" >&2; exit 2; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")  # logs and figures; only the report goes to $DIR
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-570}
SCALE=1  # a rehearsal's CPU is slower than the device, and no lease runs out: its limits stretch
if [ "$REHEARSE" = 1 ]; then SCALE=${GPU_CHECK_LIMIT_SCALE:-5}; BUDGET=${GPU_CHECK_BUDGET:-3600}; fi
START=$(date +%s)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

stage() {  # stage NAME SECONDS COMMAND...: run within its limit and the budget, keep its log and status
  local name=$1 limit=$(( $2 * SCALE )) left begin rc
  shift 2
  if [ -n "$ONLY" ] && [[ $ONLY != *",$name,"* ]]; then return; fi
  left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 5 ]; then
    printf '{"stage": "%s", "rc": null, "seconds": 0, "limit": %d, "note": "no time left in the %ds budget"}\n' \
      "$name" "$limit" "$BUDGET" >> "$WORK/stages.jsonl"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  begin=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  rc=$?
  tail -n 3 "$WORK/$name.log"
  printf '{"stage": "%s", "rc": %d, "seconds": %d, "limit": %d}\n' \
    "$name" "$rc" "$(( $(date +%s) - begin ))" "$limit" >> "$WORK/stages.jsonl"
}

# Only device and shapes differ between the real check and its rehearsal.
if [ "$REHEARSE" = 1 ]; then
  R=--rehearse
  MODEL_STEP=(--device cpu --dtype fp32 --hidden 64 --layers 2 --seq 128 --batch 2 --vocab 1024 --steps 1 --warmup 1)
else
  R=
  export MAX_JOBS=${MAX_JOBS:-16} MEGATRON_JP_REQUIRE_KERNELS=1
  MODEL_STEP=(--device cuda --dtype bf16 --hidden 1024 --layers 4 --seq 4096 --batch 4 --vocab 99584 --steps 5 --warmup 2)
fi
: > "$WORK/stages.jsonl"
stage build 150 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
stage gpu_tests 70 "$PY" -m pytest -q -p no:cacheprovider -x tests/gpu
stage kernels 90 "$PY" bench/fused_kernels.py $R --dtype bf16 --iters 20 --repeats 3 --json "$WORK/kernels.json"
stage model_step 60 "$PY" bench/model_step.py "${MODEL_STEP[@]}" --compile --json "$WORK/model_step.json"
stage attention 30 "$PY" bench/attention.py $R --iters 10 --json "$WORK/attention.json"
stage train_tohoku_4k 85 "$PY" bench/train_synthetic.py $R --preset tohoku-bert-500m --seq 4096 --micro-batch 4 \
  --steps 20 --workdir "$WORK/work_tohoku" --json "$WORK/train_tohoku_4k.json"
stage train_tohoku_4k_fp8 85 "$PY" bench/train_synthetic.py $R --preset tohoku-bert-500m --seq 4096 \
  --micro-batch 4 --steps 20 --workdir "$WORK/work_tohoku_fp8" --json "$WORK/train_tohoku_4k_fp8.json" \
  -- --train.precision fp8   # MFU against the FP8 peak; compare tokens_per_second with train_tohoku_4k
stage train_modernbert_1k 45 "$PY" bench/train_synthetic.py $R --preset modernbert-ja-130m --seq 1024 \
  --micro-batch 32 --steps 20 --workdir "$WORK/work_mb1k" --json "$WORK/train_modernbert_1k.json"
stage train_modernbert_8k 45 "$PY" bench/train_synthetic.py $R --preset modernbert-ja-130m --seq 8192 \
  --micro-batch 4 --steps 20 --workdir "$WORK/work_mb8k" --json "$WORK/train_modernbert_8k.json"
rm -rf "$WORK"/work_*

"$PY" bench/gpu_check_report.py "$WORK" "$DIR"
