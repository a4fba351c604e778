# accum: two commands on a fresh machine, `make train` and `make test`.
# Everything runs from .venv; `make install` is a dependency of every target and
# is instant once its stamp exists.

PYTHON      ?= python3
VENV        := .venv
PY          := $(VENV)/bin/python
# torch goes in first so that requirements.txt's range keeps it: a bare `torch`
# on this machine would fetch a multi-GB CUDA build. Override for another build,
# e.g. `make install TORCH_SPEC='torch==2.11.0'`.
TORCH_SPEC  ?= torch==2.13.0
STAMP       := $(VENV)/.stamp-install
# Offline: no model or dataset hub at run time.
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export TOKENIZERS_PARALLELISM=false

ACCEL_CONFIG ?= accelerate_configs/cpu.yaml
TRAIN_CONFIG ?= configs/default.yaml
PYTEST_ARGS  ?=

.PHONY: install train test test-fast sweep bench lint clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

train: install
	$(PY) -m accum launch --config_file $(ACCEL_CONFIG) scripts/train.py --config $(TRAIN_CONFIG)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

sweep: install
	$(PY) scripts/sweep.py --config configs/sweep.yaml

bench: install
	$(PY) scripts/bench.py

lint: install
	$(VENV)/bin/ruff check accum scripts tests examples

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
