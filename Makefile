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

CLIP_CONFIG ?= configs/clip/shapes.yaml
K ?= 10

.PHONY: help setup lock test test-all demo data download ingest embed index knn export-clip-retrieval \
	import-clip-retrieval train-clip eval-clip train-prior sample-prior bench-download bench-embed clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-22s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

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

DEMO_PROMPT ?= a large red circle in the center on a black background

demo: setup ## every stage that exists, on the embedded default: data → download → embed → index → eval-clip → train-prior → sample-prior → knn
	$(MAKE) --no-print-directory data download embed index eval-clip train-prior CONFIG=$(CONFIG)
	$(MAKE) --no-print-directory sample-prior PROMPT="$(DEMO_PROMPT)"
	$(MAKE) --no-print-directory knn CONFIG=$(CONFIG) QUERY="$(DEMO_PROMPT)"
	@echo "demo done: shards data/synthetic/shards/, embeddings data/synthetic/embeddings/, index data/synthetic/index/,"
	@echo "           CLIP metrics outputs/clip-eval-synthetic.json, prior models/synthetic/prior/ and"
	@echo "           outputs/train-prior-synthetic/metrics.json, sampled embeddings outputs/sample-prior/, knn page outputs/knn/"

data: setup ## render the synthetic source: data/<name>/urls.parquet and source/ (CONFIG=configs/data/...)
	$(PY) -m pipelines data --config $(CONFIG)

download: setup ## download the config's URL list with img2dataset on Ray into data/<name>/shards/
	$(PY) -m pipelines download --config $(CONFIG)

ingest: setup ## shard a local folder of images with <stem>.txt captions: FOLDER=path [NAME=name]
	@test -n "$(FOLDER)" || { echo "usage: make ingest FOLDER=path/to/images [NAME=name]"; exit 2; }
	$(PY) -m pipelines ingest --folder "$(FOLDER)" $(if $(NAME),--name "$(NAME)")

embed: setup ## CLIP-embed the shards into data/<name>/embeddings/ (default CLIP: models/synthetic/clip)
	$(PY) -m pipelines embed --config $(CONFIG)

index: setup ## faiss image and text indices over the embeddings into data/<name>/index/
	$(PY) -m pipelines index --config $(CONFIG)

knn: setup ## nearest neighbours: QUERY="text" or IMAGE=path or KEY=key [K=10 KIND=image|text]; prints a table and an HTML page
	@test -n "$(QUERY)$(IMAGE)$(KEY)" || { echo 'usage: make knn QUERY="a red circle" | IMAGE=path | KEY=key'; exit 2; }
	$(PY) -m pipelines knn --config $(CONFIG) -k $(K) $(if $(KIND),--kind $(KIND)) \
		$(if $(QUERY),--query "$(QUERY)") $(if $(IMAGE),--image "$(IMAGE)") $(if $(KEY),--key "$(KEY)")

export-clip-retrieval: setup ## write the embeddings in clip-retrieval's layout to data/<name>/clip_retrieval/ [OUT=dir]
	$(PY) -m pipelines export-clip-retrieval --config $(CONFIG) $(if $(OUT),--out "$(OUT)")

import-clip-retrieval: setup ## read a clip-retrieval folder SOURCE=dir into data/<name>/embeddings/
	@test -n "$(SOURCE)" || { echo "usage: make import-clip-retrieval SOURCE=dir CONFIG=configs/data/NAME.yaml"; exit 2; }
	$(PY) -m pipelines import-clip-retrieval --config $(CONFIG) --source "$(SOURCE)"

train-clip: setup ## train the small CLIP of CLIP_CONFIG on its data set's shards; exports models/<name>/clip/
	$(PY) -m training clip --config $(CLIP_CONFIG)

PRIOR_CONFIG ?= configs/prior/small.yaml

train-prior: setup ## train the diffusion prior of PRIOR_CONFIG on its data set's embeddings; exports models/<name>/prior/
	$(PY) -m training prior --config $(PRIOR_CONFIG)

sample-prior: setup ## PROMPT="..." (or PROMPTS=file): sampled CLIP image embeddings, their nearest indexed images, a .npy
	@test -n "$(PROMPT)$(PROMPTS)" || { echo 'usage: make sample-prior PROMPT="a small red circle at the top left"'; exit 2; }
	$(PY) -m training sample-prior --config $(PRIOR_CONFIG) $(if $(PROMPT),--prompt "$(PROMPT)") $(if $(PROMPTS),--prompts "$(PROMPTS)")

eval-clip: setup ## zero-shot colour/shape accuracy and recall@10 of the val embeddings (after make embed)
	$(PY) -m training clip-eval --config $(CONFIG)

bench-embed: setup ## embed job samples/s vs bare encoder throughput (and clip-retrieval, see bench/embed.py)
	$(PY) bench/embed.py --config $(CONFIG)

bench-download: setup ## images/s of data + download on a fresh copy of the config's data set
	$(PY) bench/download.py --config $(CONFIG)

clean: ## remove generated data, models and outputs (keeps .venv)
	rm -rf data models outputs
