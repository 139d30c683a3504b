# The user's verbs. `make demo` sets everything up and runs the pipeline on the synthetic world (its own configs);
# `make test` runs the test suite. The stage verbs (ingest, label, audit, pretrain, export, transfer) are the
# real-data verbs: LUPerson, ViT-B/16 and the paper-row configs unless told otherwise; `make -n VERB ...` shows
# what a line runs. Variables: CORPUS, ROOT, SOURCE, FORMAT, CLIP, GPUS, CONFIG, TASK, DATASET, CKPT.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLASP := $(VENV)/bin/clasp
ROOT ?= data
# The stage verbs are the real-data verbs. CORPUS: the one named on the command line, else the one the last
# `make ingest` / `make label` under ROOT used ($(ROOT)/.clasp-corpus), else luperson. Only a corpus that was
# named or remembered is passed to pre-training: a Makefile default never overrides a YAML's own `data.corpus`.
CORPUS_FILE = $(ROOT)/.clasp-corpus
LAST_CORPUS := $(strip $(shell cat $(ROOT)/.clasp-corpus 2>/dev/null))
CORPUS ?= $(or $(LAST_CORPUS),luperson)
CORPUS_CHOSEN = $(if $(filter command line environment override,$(origin CORPUS)),$(CORPUS),$(LAST_CORPUS))
ROOT_CHOSEN = $(if $(filter command line environment override,$(origin ROOT)),$(ROOT),)
PRETRAIN_CONFIG ?= configs/pretrain/vit_b_luperson.yaml
GPUS ?= 1
OUT ?= runs/demo
# GPUS=n: n processes on this machine. Many machines: add NODES, NODE_RANK, MASTER_ADDR (same command on each).
NODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 29500
LAUNCH := $(VENV)/bin/accelerate launch --num_processes $$(( $(GPUS) * $(NODES) )) --num_machines $(NODES) \
	--machine_rank $(NODE_RANK) --main_process_ip $(MASTER_ADDR) --main_process_port $(MASTER_PORT) \
	$(if $(filter-out 1,$(GPUS))$(filter-out 1,$(NODES)),--multi_gpu,) -m pipeline.cli

.PHONY: install demo test test-all lint format bench synth ingest label clip-train audit pretrain export transfer ablation clean

install: $(VENV)/.install.stamp

# TORCH=auto|cpu|cuda|any: the torch + torchvision build put in first (tools/install_torch.py): auto =
# cuda when nvidia-smi lists a GPU, else cpu (PyTorch's CPU wheels from TORCH_CPU_INDEX; where that index
# cannot serve both, PyPI's build with a note). CLASP is then installed with that pair pinned, so no
# dependency can swap it. Reinstalls only when pyproject.toml or setup.py change.
TORCH ?= auto
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
$(VENV)/.install.stamp: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) tools/install_torch.py --build $(TORCH) --cpu-index $(TORCH_CPU_INDEX) --pins $(VENV)/torch-pins.txt
	$(PY) -m pip install --quiet -e '.[dev]' -c $(VENV)/torch-pins.txt
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
	for b in $(filter-out __init__,$(basename $(notdir $(wildcard benchmarks/*.py)))); do \
		echo "== benchmarks.$$b"; $(PY) -m benchmarks.$$b || exit 1; done

synth: install
	$(CLASP) synth --out $(ROOT)/synthetic-world --identities $(or $(IDENTITIES),200) --preview

# Stage 0: make ingest CORPUS=luperson SOURCE=/data/LUPerson FORMAT=folder|lmdb|list
ingest: install
	$(CLASP) ingest --source $(SOURCE) --format $(or $(FORMAT),folder) --corpus $(CORPUS) --root $(ROOT)
	echo $(CORPUS) > $(CORPUS_FILE)

# Stage 1: make label CORPUS=luperson [CLIP=ViT-B-16:openai | CLIP_CKPT=path] GPUS=8
# Every process takes a disjoint set of shards; a rerun skips finished shards.
label: install
	$(LAUNCH) label --corpus $(CORPUS) --root $(ROOT) $(if $(CLIP),--clip $(CLIP),) $(if $(CLIP_CKPT),--clip-checkpoint $(CLIP_CKPT),) $(ARGS)
	echo $(CORPUS) > $(CORPUS_FILE)

clip-train: install
	$(CLASP) clip-train --pairs $(PAIRS) --arch $(or $(ARCH),clasp-vit-tiny-8) --out $(or $(CLIP_OUT),runs/clip) $(ARGS)

audit: install
	$(CLASP) audit --corpus $(CORPUS) --root $(ROOT) --out runs/audit/$(CORPUS) $(if $(GT),--gt $(GT),) $(ARGS)

# Stage 2: make pretrain GPUS=8 [CONFIG=configs/pretrain/vit_s_luperson.yaml] [ARGS="optim.epochs=50"]
# ViT-B/16 on LUPerson by default; data.root / data.corpus are passed only when named or remembered (see CORPUS).
pretrain: install
	$(LAUNCH) pretrain --config $(or $(CONFIG),$(PRETRAIN_CONFIG)) $(if $(ROOT_CHOSEN),data.root=$(ROOT_CHOSEN),) $(if $(CORPUS_CHOSEN),data.corpus=$(CORPUS_CHOSEN),) $(ARGS)

export: install
	$(CLASP) export $(CKPT) --out $(OUT_DIR)

# Stage 3: make transfer TASK=reid DATASET=market1501 DATA=/data/Market-1501-v15.09.15 CKPT=runs/export/vit_b
# The paper row's config configs/transfer/<task>_<dataset>.yaml is used when it exists (TRANSFER_CONFIG=... to choose
# another); its batch sizes are global, so GPUS changes the per-process batch, not the recipe.
TRANSFER_CONFIG ?= $(wildcard configs/transfer/$(subst -,_,$(TASK))_$(DATASET).yaml)
transfer: install
	$(LAUNCH) transfer $(TASK) --data $(DATA) --dataset $(DATASET) --backbone $(CKPT) --out runs/transfer/$(TASK)-$(DATASET) $(if $(TRANSFER_CONFIG),--config $(TRANSFER_CONFIG),) $(ARGS)

ablation: install
	$(CLASP) ablate --config $(or $(CONFIG),configs/ablation_synthetic.yaml) $(ARGS)

clean:
	rm -rf runs $(VENV) *.egg-info
