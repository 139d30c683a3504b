# The user's verbs. `make demo` sets everything up and runs the pipeline on the synthetic world;
# `make test` runs the test suite. Variables: CORPUS, ROOT, SOURCE, FORMAT, CLIP, GPUS, CONFIG, TASK, DATASET, CKPT.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLASP := $(VENV)/bin/clasp
ROOT ?= data
CORPUS ?= synthetic
GPUS ?= 1
OUT ?= runs/demo
ACCELERATE := $(VENV)/bin/accelerate launch --num_processes $(GPUS) $(if $(filter-out 1,$(GPUS)),--multi_gpu,)

.PHONY: install demo test test-all lint format bench synth ingest label clip-train audit pretrain export transfer ablation clean

install: $(VENV)/.install.stamp

# torch/torchvision are plain ranges: pip takes the CUDA build on a GPU machine and whatever the
# local index/cap offers elsewhere. Reinstalls only when pyproject.toml changes.
$(VENV)/.install.stamp: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

demo: install
	$(CLASP) demo --out $(OUT)

test: install
	$(PY) -m pytest -q -m "not slow" tests

test-all: install
	$(PY) -m pytest -q tests

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: install
	for b in benchmarks/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

synth: install
	$(CLASP) synth --out $(ROOT)/synthetic-world --identities $(or $(IDENTITIES),200) --preview

clean:
	rm -rf runs $(VENV) *.egg-info
