# unclip: every job is one target; `make help` lists them. Variables: CONFIG=path (a YAML under configs/),
# and the job's own (FOLDER, NAME, ...). The first target that needs Python creates .venv itself.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FAISS ?= cpu
STAMP := $(VENV)/.installed-faiss-$(FAISS)
CONFIG ?= configs/data/synthetic.yaml
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

.PHONY: help setup lock test test-all demo data download ingest bench-download clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[1m%-16s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

setup: $(STAMP) ## create .venv and install the project with pinned dependencies (FAISS=gpu for faiss-gpu)

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON_SYSTEM) -m venv $(VENV)
	$(PY) -m pip install -q pip==25.2
	$(PY) -m pip install -q -c requirements.lock setuptools
	@# faiss-cpu and faiss-gpu are the same module: remove the other build before installing this one
	$(PY) -m pip uninstall -q -y faiss-$(if $(filter gpu,$(FAISS)),cpu,gpu) 2>/dev/null || true
	$(PY) -m pip install -c requirements.lock --no-build-isolation -e ".[faiss-$(FAISS),test]"
	rm -f $(VENV)/.installed-faiss-*
	touch $@

lock: ## re-pin requirements.lock from the current .venv (after changing pyproject.toml)
	{ head -2 requirements.lock; $(PY) -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

test: setup ## run the default test suite (offline, CPU)
	$(PY) -m pytest

test-all: setup ## run every test, the slow quality floors included
	$(PY) -m pytest -m "not gpu"

demo: setup ## every stage that exists, on the embedded default: data → download
	$(MAKE) --no-print-directory data download CONFIG=$(CONFIG)
	@echo "demo done: URL list data/synthetic/urls.parquet, shards data/synthetic/shards/, summary data/synthetic/download.json"

data: setup ## render the synthetic source: data/<name>/urls.parquet and source/ (CONFIG=configs/data/...)
	$(PY) -m pipelines data --config $(CONFIG)

download: setup ## download the config's URL list with img2dataset on Ray into data/<name>/shards/
	$(PY) -m pipelines download --config $(CONFIG)

ingest: setup ## shard a local folder of images with <stem>.txt captions: FOLDER=path [NAME=name]
	@test -n "$(FOLDER)" || { echo "usage: make ingest FOLDER=path/to/images [NAME=name]"; exit 2; }
	$(PY) -m pipelines ingest --folder "$(FOLDER)" $(if $(NAME),--name "$(NAME)")

bench-download: setup ## images/s of data + download on a fresh copy of the config's data set
	$(PY) bench/download.py --config $(CONFIG)

clean: ## remove generated data, models and outputs (keeps .venv)
	rm -rf data models outputs
