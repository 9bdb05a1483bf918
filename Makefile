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
# SET="key=value ..." overrides config keys of the data and training jobs (and of make submit).
SET ?=
SET_OPTS = $(foreach s,$(SET),--set "$(s)")
PRIOR_CONFIG ?= configs/prior/small.yaml
DECODER_CONFIG ?= configs/decoder/small.yaml
UPSAMPLER_CONFIG ?= configs/decoder/upsampler-small.yaml
# The command line of each data and training job (python -m ...), run here by its target and on a
# cluster by `make submit JOB=...`; SET= adds --set overrides to either.
JOB_download = pipelines download --config $(CONFIG)
JOB_embed = pipelines embed --config $(CONFIG)
JOB_index = pipelines index --config $(CONFIG)
JOB_export-clip-retrieval = pipelines export-clip-retrieval --config $(CONFIG)
JOB_train-clip = training clip --config $(CLIP_CONFIG)
JOB_train-prior = training prior --config $(PRIOR_CONFIG)
JOB_train-decoder = training decoder --config $(DECODER_CONFIG)
JOB_train-upsampler = training upsampler --config $(UPSAMPLER_CONFIG)

.PHONY: help setup lock test test-all format demo data download ingest embed index knn export-clip-retrieval \
	import-clip-retrieval train-clip eval-clip train-prior sample-prior train-decoder train-upsampler sample variations \
	interpolate textdiff eval submit bench-download bench-embed clean

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

format: setup ## format the code with ruff (make test checks that it is formatted)
	$(PY) -m ruff format .

DEMO_PROMPTS ?= configs/demo-prompts.txt
DEMO_OUT ?= outputs/demo
# Each stage is its own make call, so an interrupted demo resumes: finished shards are skipped and
# trainers continue from their last checkpoint (`make clean` starts afresh). To fit 30 minutes on 2 cores
# the demo trains the prior 1 200 steps (default 1 500), the decoders 800 (default 2 800) and the
# upsampler 400 (default 500); `make train-decoder` etc. afterwards continue them to the defaults.
demo: setup ## the whole pipeline on the embedded default (committed CLIP): data → ... → eval; results in outputs/demo/
	@start=$$(date +%s); stage() { s=$$(date +%s); $(MAKE) --no-print-directory "$$@" || exit 1; \
		echo "[demo] $$* done in $$(( $$(date +%s) - s )) s (total $$(( $$(date +%s) - start )) s)"; }; \
	stage data download embed index eval-clip CONFIG=$(CONFIG) && \
	stage train-prior SET=max_steps=1200 && stage train-decoder SET=max_steps=800 && stage train-upsampler SET=max_steps=400 && \
	stage train-decoder DECODER_CONFIG=configs/decoder/text-small.yaml SET=max_steps=800 && \
	stage sample PROMPTS=$(DEMO_PROMPTS) N=4 OUT=$(DEMO_OUT)/sample.png && \
	stage eval OUT=$(DEMO_OUT) && \
	stage knn QUERY="$$(head -1 $(DEMO_PROMPTS))" KNN_OUT=$(DEMO_OUT) && \
	echo "demo done in $$(( $$(date +%s) - start )) s. Results in $(DEMO_OUT)/:" && \
	echo "  sample.png (held-out prompts, 4 samples each)  samples-*-*.png (eval grids)  metrics.json  table.md" && \
	echo "  guidance.png (accuracy, CLIP score, diversity against guidance)  losses.png (training curves)  *.html (knn page)" && \
	echo "Models in models/synthetic/ (clip prior decoder upsampler decoder-text); data in data/synthetic/."

EVAL_OPTS ?=
eval: setup ## unCLIP vs the GLIDE-like baseline on val and held-out captions: accuracy, CLIP score, Fréchet, diversity [OUT=dir]
	$(PY) -m training eval --config $(CONFIG) --models $(MODELS) $(if $(OUT),--out "$(OUT)") $(EVAL_OPTS)

data: setup ## render the synthetic source: data/<name>/urls.parquet and source/ (CONFIG=configs/data/...)
	$(PY) -m pipelines data --config $(CONFIG)

download: setup ## download the config's URL list with img2dataset on Ray into data/<name>/shards/
	$(PY) -m $(JOB_download) $(SET_OPTS)

ingest: setup ## shard a local folder of images with <stem>.txt captions: FOLDER=path [NAME=name SET="image_size=128 ..."]
	@test -n "$(FOLDER)" || { echo "usage: make ingest FOLDER=path/to/images [NAME=name]"; exit 2; }
	$(PY) -m pipelines ingest --folder "$(FOLDER)" $(if $(NAME),--name "$(NAME)") $(SET_OPTS)

embed: setup ## CLIP-embed the shards into data/<name>/embeddings/ (default CLIP: models/synthetic/clip)
	$(PY) -m $(JOB_embed) $(SET_OPTS)

index: setup ## faiss image and text indices over the embeddings into data/<name>/index/
	$(PY) -m $(JOB_index) $(SET_OPTS)

knn: setup ## nearest neighbours: QUERY="text" or IMAGE=path or KEY=key [K=10 KIND=image|text]; prints a table and an HTML page
	@test -n "$(QUERY)$(IMAGE)$(KEY)" || { echo 'usage: make knn QUERY="a red circle" | IMAGE=path | KEY=key'; exit 2; }
	$(PY) -m pipelines knn --config $(CONFIG) -k $(K) $(if $(KIND),--kind $(KIND)) $(if $(KNN_OUT),--out-dir "$(KNN_OUT)") \
		$(if $(QUERY),--query "$(QUERY)") $(if $(IMAGE),--image "$(IMAGE)") $(if $(KEY),--key "$(KEY)")

export-clip-retrieval: setup ## write the embeddings in clip-retrieval's layout to data/<name>/clip_retrieval/ [OUT=dir]
	$(PY) -m $(JOB_export-clip-retrieval) $(if $(OUT),--out "$(OUT)")

import-clip-retrieval: setup ## read a clip-retrieval folder SOURCE=dir into data/<name>/embeddings/
	@test -n "$(SOURCE)" || { echo "usage: make import-clip-retrieval SOURCE=dir CONFIG=configs/data/NAME.yaml"; exit 2; }
	$(PY) -m pipelines import-clip-retrieval --config $(CONFIG) --source "$(SOURCE)"

train-clip: setup ## train the small CLIP of CLIP_CONFIG on its data set's shards; exports models/<name>/clip/
	$(PY) -m $(JOB_train-clip) $(SET_OPTS)

train-prior: setup ## train the diffusion prior of PRIOR_CONFIG on its data set's embeddings; exports models/<name>/prior/
	$(PY) -m $(JOB_train-prior) $(SET_OPTS)

sample-prior: setup ## PROMPT="..." (or PROMPTS=file): sampled CLIP image embeddings, their nearest indexed images, a .npy
	@test -n "$(PROMPT)$(PROMPTS)" || { echo 'usage: make sample-prior PROMPT="a small red circle at the top left"'; exit 2; }
	$(PY) -m training sample-prior --config $(PRIOR_CONFIG) $(if $(PROMPT),--prompt "$(PROMPT)") $(if $(PROMPTS),--prompts "$(PROMPTS)")

MODELS ?= models/synthetic
SEED ?= 0
# Options of the four generation commands: SEED=0 N=images STEPS=decoder steps GUIDANCE=decoder scale
# DECODER=decoder|decoder-text OUT=path.png
GEN_OPTS = --models "$(MODELS)" --seed $(SEED) $(if $(N),-n $(N)) $(if $(STEPS),--steps $(STEPS)) \
	$(if $(GUIDANCE),--guidance $(GUIDANCE)) $(if $(DECODER),--decoder $(DECODER)) $(if $(OUT),--out "$(OUT)")

train-decoder: setup ## train the CLIP-image-embedding decoder of DECODER_CONFIG on shards + embeddings; exports models/<name>/decoder/
	$(PY) -m $(JOB_train-decoder) $(SET_OPTS)

train-upsampler: setup ## train the 4x upsampler of UPSAMPLER_CONFIG; exports models/<name>/upsampler/
	$(PY) -m $(JOB_train-upsampler) $(SET_OPTS)

sample: setup ## text → image: PROMPT="..." (or PROMPTS=file) through prior, decoder, upsampler; writes a PNG grid
	@test -n "$(PROMPT)$(PROMPTS)" || { echo 'usage: make sample PROMPT="a small red circle at the top left"'; exit 2; }
	$(PY) -m training sample $(GEN_OPTS) $(if $(PROMPT),--prompt "$(PROMPT)") $(if $(PROMPTS),--prompts "$(PROMPTS)") \
		$(if $(PRIOR_GUIDANCE),--prior-guidance $(PRIOR_GUIDANCE))

variations: setup ## IMAGE=path: its CLIP image embedding decoded with fresh noise; writes a PNG grid
	@test -n "$(IMAGE)" || { echo 'usage: make variations IMAGE=path/to/image.jpg'; exit 2; }
	$(PY) -m training variations $(GEN_OPTS) --image "$(IMAGE)"

interpolate: setup ## A=path B=path: decodings of slerp between the two images' embeddings; writes a PNG grid
	@test -n "$(A)" -a -n "$(B)" || { echo 'usage: make interpolate A=path/a.jpg B=path/b.jpg'; exit 2; }
	$(PY) -m training interpolate $(GEN_OPTS) --a "$(A)" --b "$(B)"

textdiff: setup ## IMAGE=path FROM="a red circle" TO="a blue circle": the embedding moved along the text diff; PNG grid
	@test -n "$(IMAGE)" -a -n "$(FROM)" -a -n "$(TO)" || { echo 'usage: make textdiff IMAGE=path FROM="a red circle" TO="a blue circle"'; exit 2; }
	$(PY) -m training textdiff $(GEN_OPTS) --image "$(IMAGE)" --from "$(FROM)" --to "$(TO)"

eval-clip: setup ## zero-shot colour/shape accuracy and recall@10 of the val embeddings (after make embed)
	$(PY) -m training clip-eval --config $(CONFIG)

bench-embed: setup ## embed job samples/s vs bare encoder throughput (and clip-retrieval, see bench/embed.py)
	$(PY) bench/embed.py --config $(CONFIG)

bench-download: setup ## images/s of data + download on a fresh copy of the config's data set
	$(PY) bench/download.py --config $(CONFIG)

SUBMIT_PYTHON ?= python
submit: setup ## JOB=embed|download|index|export-clip-retrieval|train-prior|train-decoder|train-upsampler as a Ray batch job at RAY_ADDRESS=http://head:8265 [SET="data_root=/shared/data ..."]
	@test -n "$(JOB_$(JOB))" -a -n "$(RAY_ADDRESS)" || { echo 'usage: make submit JOB=embed RAY_ADDRESS=http://head:8265 [CONFIG=...] [SET="data_root=/mnt/shared/data"]'; \
		echo '  JOB: download embed index export-clip-retrieval train-clip train-prior train-decoder train-upsampler'; exit 2; }
	$(VENV)/bin/ray job submit --address "$(RAY_ADDRESS)" --working-dir . -- \
		$(SUBMIT_PYTHON) -m $(JOB_$(JOB)) $(SET_OPTS)

# The committed default CLIP (models/synthetic/clip) stays.
clean: ## remove generated data, outputs and trained models (keeps .venv and the committed CLIP)
	rm -rf data outputs $(filter-out models/synthetic,$(wildcard models/*)) \
		$(filter-out models/synthetic/clip,$(wildcard models/synthetic/*))
