# prefloop — one command for each thing a person does.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export GX_ANALYTICS_ENABLED := false
export PREFECT_HOME ?= $(CURDIR)/.prefect
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-all bench reliability gpu-check own-model server lint clean install

install: $(STAMP)

# Re-installs only when the project's metadata changes. torch is pinned and installed first: it
# takes the CPU wheel, where a plain requirement would pull several GB of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/prefloop run --config configs/demo.yaml --name demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu"

test-all: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/store_write.py
	$(PY) benchmarks/prefect_overhead.py

# Bad inputs, SIGKILLs mid-run, concurrent writers with gc, offline: about 25 minutes on 2 cores.
reliability: $(STAMP)
	$(PY) benchmarks/reliability.py

# On a CUDA worker: vLLM venv + CUDA torch, then every GPU check (10 min budget); elsewhere one line, exit 0.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out gpu-check.json

# The loop on "your own" model: a locally built chat model, prompts and reward-model pairs written as a
# user's files (prefloop example own-model), then iterative DPO labeled by a reward model and by the verifier.
own-model: $(STAMP)
	$(VENV)/bin/prefloop example own-model .prefloop/own-model
	$(VENV)/bin/prefloop run --config configs/own_model.yaml
	$(VENV)/bin/prefloop run --config configs/own_model_verifier.yaml
	$(VENV)/bin/prefloop compare own-model own-model-verifier

server: $(STAMP)
	$(VENV)/bin/prefloop server --port 4200

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf .prefloop .prefect
