#!/usr/bin/env bash
# Every GPU check, on a GPU machine without network (README, "Benchmarks"), in one call:
#   bash bench/gpu_run.sh "$OUT" [SECONDS]
# That machine has torch, accelerate and transformers but not the rest: the wheels, the MiniLM
# tokenizer files and the tweets travel in .carry/ (made by bench/gpu_carry.sh here). Sections run
# in order of what is most wanted, each under its own time limit and each saved as it ends, so a call
# cut short still returns what it finished: at most 8 files come back, so only JSON and the log go to
# the output folder (bench/gpu_bench.py's markdown() rebuilds the tables from the JSON).
set -uo pipefail
out=${1:-bench/results/gpu}
total=${2:-540}
mkdir -p "$out"
began=$SECONDS
left() { echo $(( total - (SECONDS - began) )); }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=.:/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, accelerate, transformers, datasets, pyarrow; print('torch', torch.__version__, 'accelerate', accelerate.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
} 2>&1 | tee "$out/machine.txt"
tmp=$(mktemp -d)
section() {  # name, seconds at most
  local limit=$(( $2 < $(left) ? $2 : $(left) ))
  if (( limit < 20 )); then echo "[gpu run] $1 not run: $(left) s left"; return; fi
  echo "[gpu run] $1 (at most $limit s, $(left) s left)"
  timeout "$limit" python3 bench/gpu_bench.py --sections "$1" --out "$tmp" --tokenizer .carry/minilm_tok "${@:3}"
  echo "[gpu run] $1 exit $?"
  cp "$tmp"/*.json "$out"/ 2>/dev/null
}
section speed 300 --speed-budget 150
section engines 90
section tokens 170 --token-steps 4
# exactness on CUDA: the equivalence tests, whose train() runs on the GPU
limit=$(( $(left) < 70 ? $(left) : 70 ))
if (( limit >= 20 )); then
  timeout "$limit" python3 -m pytest -q -p no:cacheprovider tests/test_equivalence.py 2>&1 | tail -5
fi
section planner 600 --steps 10 --long-steps 40
echo "[gpu run] done in $(( SECONDS - began )) s"
