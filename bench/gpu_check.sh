#!/usr/bin/env bash
# GPU smoke check of the training and inference paths, for a lent GPU machine (the device tool).
# One prepared script: a small demo-size dataset, the shipped model on GPU vs CPU, then the demo
# recipe cut to a few steps per stage with bf16 autocast on CUDA; every step's log lands in $OUT.
# Missing Python packages travel as wheels in .whl/ (see docs/training.md, "On a GPU").
#     bash bench/gpu_check.sh            (OUT defaults to /tmp/gpu_check)
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || echo "pip install of .whl failed (see pip.log)"
  export PYTHONPATH=/tmp/site:$PWD/.whl/site:$PWD  # .whl/site: pure-Python packages copied as folders
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 MEDREPORT_NO_EXT=1  # the compiled kernels are CPU-only
M="python3 -m app.cli"
step() { echo "== $(date +%T) $*"; }
STEPS0=${STEPS0:-60} STEPS1=${STEPS1:-60} STEPS2=${STEPS2:-10}

step environment
{ nvidia-smi -L; python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$OUT/env.txt"

step dataset
timeout 180 $M make-dataset --out /tmp/ds --n 96 --seed 5 --size demo --history-tokens 200:4000 \
  --phantom-version 2 --no-progress > "$OUT/dataset.log" 2>&1 \
  || { echo "dataset with audio failed (tail below); again without audio"; tail -5 "$OUT/dataset.log";
       rm -rf /tmp/ds; timeout 180 $M make-dataset --out /tmp/ds --n 96 --seed 5 --size demo --history-tokens 200:4000 \
         --phantom-version 2 --no-audio --no-progress >> "$OUT/dataset.log" 2>&1; }
tail -2 "$OUT/dataset.log"

if [ -z "${SKIP_MODEL_CHECK:-}" ]; then
  step "shipped model: GPU vs CPU"
  timeout 240 python3 -m bench.gpu_model_check --manifest /tmp/ds/manifest.jsonl --studies 8 \
    > "$OUT/model_check.json" 2> "$OUT/model_check.log"
  echo "rc $?"; cat "$OUT/model_check.json"; tail -3 "$OUT/model_check.log"
fi

step "demo recipe on CUDA, bf16 autocast ($STEPS0 + $STEPS1 + $STEPS2 steps)"
timeout 360 $M train --config configs/demo.json --manifest /tmp/ds/manifest.jsonl --out /tmp/run_gpu --no-progress \
  stages.0.steps=$STEPS0 stages.1.steps=$STEPS1 stages.2.steps=$STEPS2 data.cache_dir=/tmp/cache \
  eval.max_studies=8 eval.bleu_studies=4 eval.calibration_studies=16 save_every=50 \
  > "$OUT/train.log" 2>&1
echo "rc $?"; tail -4 "$OUT/train.log"
cp /tmp/run_gpu/metrics.jsonl "$OUT/metrics.jsonl" 2>/dev/null
cp /tmp/run_gpu/final_metrics.json "$OUT/final_metrics.json" 2>/dev/null
python3 - "$OUT/metrics.jsonl" <<'PY' 2>&1 | tee "$OUT/speed.txt"
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1]) if '"sec_per_step"' in l]
for st in dict.fromkeys(r["stage"] for r in rows):
    s = [r["sec_per_step"] for r in rows if r["stage"] == st][1:]  # the first includes warm-up
    last = [r for r in rows if r["stage"] == st][-1]
    print(f"{st}: median {statistics.median(s):.3f} s/step over {len(s)} logs; last loss {last.get('loss')}")
PY
step done
