#!/usr/bin/env bash
# The one prepared device check (an H100/H200, ~10 minutes): build the kernels, run tests/gpu, time
# the kernels, our model against transformers, the attention kernels, and three short runs of the
# real trainer (tohoku-bert-500m at 4,096 in bf16 and fp8; modernbert-ja-130m at 1,024 and 8,192). Every stage has
# its own time limit and log; OUT_DIR/gpu_check.json gathers what each printed as JSON.
#
#   bash bench/gpu_check.sh [OUT_DIR]              # on the GPU machine (default OUT_DIR: $OUT or runs/gpu_check)
#   bash bench/gpu_check.sh --rehearse [OUT_DIR]   # the same stages on CPU with the CPU fallbacks and
#                                                  # tiny shapes, to catch mistakes before device time is spent
set -uo pipefail
cd "$(dirname "$0")/.."
REHEARSE=0
if [ "${1:-}" = "--rehearse" ]; then REHEARSE=1; shift; fi
DIR=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$DIR"
: > "$DIR/stages.jsonl"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, keep its log, record its status
  local name=$1 limit=$2 begin rc
  shift 2
  begin=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$DIR/$name.log" 2>&1
  rc=$?
  tail -n 5 "$DIR/$name.log"
  printf '{"stage": "%s", "rc": %d, "seconds": %d}\n' "$name" "$rc" "$(( $(date +%s) - begin ))" >> "$DIR/stages.jsonl"
}

if [ "$REHEARSE" = 1 ]; then
  R=--rehearse
  stage build 600 "$PY" tools/check_csrc.py                  # the kernels compile (no GPU to load them)
  stage gpu_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/gpu   # all skip without CUDA
  stage kernels 60 "$PY" bench/kernels.py --dtype bf16 --iters 5 --repeats 1
  stage model_step 300 "$PY" bench/model_step.py --hidden 64 --layers 2 --seq 128 --batch 2 --vocab 1024 \
    --steps 1 --warmup 1
else
  R=
  export MAX_JOBS=${MAX_JOBS:-16} MEGATRON_JP_REQUIRE_KERNELS=1
  stage build 200 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
  stage gpu_tests 70 "$PY" -m pytest -q -p no:cacheprovider -x tests/gpu
  stage kernels 40 "$PY" bench/kernels.py --dtype bf16 --iters 20 --repeats 3 --no-compile
  stage model_step 60 "$PY" bench/model_step.py --device cuda --dtype bf16 --compile --hidden 1024 --layers 4 \
    --seq 4096 --batch 4 --vocab 99584 --steps 5 --warmup 2
fi
stage attention 40 "$PY" bench/attention.py $R --iters 10 --json "$DIR/attention.json"
stage train_tohoku_4k 100 "$PY" bench/train_synthetic.py $R --preset tohoku-bert-500m --seq 4096 --micro-batch 4 \
  --steps 20 --workdir "$DIR/work_tohoku" --json "$DIR/train_tohoku_4k.json"
stage train_tohoku_4k_fp8 100 "$PY" bench/train_synthetic.py $R --preset tohoku-bert-500m --seq 4096 \
  --micro-batch 4 --steps 20 --workdir "$DIR/work_tohoku_fp8" --json "$DIR/train_tohoku_4k_fp8.json" \
  -- --train.precision fp8   # MFU against the FP8 peak; compare tokens_per_second with train_tohoku_4k
stage train_modernbert_1k 60 "$PY" bench/train_synthetic.py $R --preset modernbert-ja-130m --seq 1024 \
  --micro-batch 32 --steps 20 --workdir "$DIR/work_mb1k" --json "$DIR/train_modernbert_1k.json"
stage train_modernbert_8k 60 "$PY" bench/train_synthetic.py $R --preset modernbert-ja-130m --seq 8192 \
  --micro-batch 4 --steps 20 --workdir "$DIR/work_mb8k" --json "$DIR/train_modernbert_8k.json"
rm -rf "$DIR"/work_*

"$PY" - "$DIR" <<'EOF'
import json, pathlib, sys
folder = pathlib.Path(sys.argv[1])
summary = {"stages": [json.loads(line) for line in (folder / "stages.jsonl").read_text().splitlines()]}
for path in sorted(folder.glob("*.json")):
    if path.name != "gpu_check.json":
        summary[path.stem] = json.loads(path.read_text())
for name in ("model_step", "kernels", "gpu_tests"):
    log = folder / f"{name}.log"
    if log.exists():
        summary[f"{name}_tail"] = log.read_text().splitlines()[-12:]
(folder / "gpu_check.json").write_text(json.dumps(summary, indent=1) + "\n")
print(json.dumps(summary["stages"]))
EOF
