#!/usr/bin/env bash
# The GPU paths, on a lent GPU machine (the device tool; see README "GPU results").
# That machine has torch, accelerate and transformers but not the rest: the wheels, the
# tokenizer files and the tweets travel in .carry/ (made by bench/gpu_carry.sh here).
#   bash bench/gpu_run.sh "$OUT"
set -uo pipefail
out=${1:-bench/results/gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --find-links .carry/wheels datasets evaluate pydantic 2>&1 | tail -2
export PYTHONPATH=. HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/machine.txt"
python3 -c "import torch, accelerate, transformers; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'transformers', transformers.__version__)" | tee -a "$out/machine.txt"
# 1. exactness on CUDA: the equivalence tests, whose train() now runs on the GPU
python3 -m pytest -q -p no:cacheprovider tests/test_equivalence.py -s 2>&1 | grep -E "first gradient|passed|failed" | tee "$out/equivalence.txt"
# 2. real CUDA OOM probing and training in fp32, fp16, bf16
for precision in no fp16 bf16; do
  python3 scripts/train.py --config configs/gpu_gpt2.yaml --tokenizer .carry/minilm_tok \
    --train-file .carry/tweets/train.csv --eval-file .carry/tweets/eval.csv \
    --mixed-precision "$precision" --max-steps 12 --plan-cache "$out/plans.json" --output-dir "runs/gpu-$precision" \
    > "$out/train-$precision.log" 2>&1
  echo "train $precision exit $?" | tee -a "$out/summary.txt"
  cp "runs/gpu-$precision/metrics.json" "$out/metrics-$precision.json" 2>/dev/null
  grep -E "^probe|Effective batch|^step (1|6|12)/|final:" "$out/train-$precision.log" | tee -a "$out/summary.txt"
done
