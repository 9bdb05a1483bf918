# unclip: every job is one target; `make help` lists them. The first target that needs Python creates .venv itself.
#
# The data set of any data, training or generation target: NAME=mine (configs/data/mine.yaml, else
# data/mine/data.yaml, which `make ingest` and `make download URL_LIST=...` write), or DATA=/CONFIG= a
# config's path; none given: the embedded default. SET="key=value ..." overrides config keys of the data
# and training jobs. A target refuses a variable it does not take (`make help` lists what each takes).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYSTEM ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FAISS ?= cpu
STAMP := $(VENV)/.installed-faiss-$(FAISS)
export NO_ALBUMENTATIONS_UPDATE := 1
export PYTHONUNBUFFERED := 1

# Variables a user may give a target; each target takes some of them (TAKES_<target> below).
USER_VARS := NAME DATA CONFIG SET CLIP REDO URL_LIST FOLDER SOURCE OUT CLIP_CONFIG PRIOR_CONFIG DECODER_CONFIG \
	UPSAMPLER_CONFIG MODELS SEED N STEPS GUIDANCE DECODER PROMPT PROMPTS PRIOR_GUIDANCE IMAGE A B FROM TO QUERY KEY \
	K KIND KNN_OUT EVAL_OPTS BEFORE AFTER SYSTEM JOB SUBMIT_PYTHON VIEW
GIVEN := $(foreach v,$(USER_VARS),$(if $(filter command line,$(origin $(v))),$(v)))
# The same names set in the shell's environment are never used: a target that takes one refuses it (below).
IN_ENVIRONMENT := $(foreach v,$(USER_VARS),$(if $(filter environment,$(origin $(v))),$(v)))
$(foreach v,$(IN_ENVIRONMENT),$(eval undefine $(v)))
DATA_GIVEN := $(filter NAME DATA CONFIG,$(GIVEN))
DATA_SET := $(or $(NAME),$(DATA),$(CONFIG))
DATA_OPT = $(if $(DATA_GIVEN),--config "$(DATA_SET)")
TRAIN_DATA = $(if $(DATA_GIVEN),--set "data=$(DATA_SET)")
SET_OPTS = $(foreach s,$(SET),--set "$(s)")
CLIP_CONFIG ?= configs/clip/shapes.yaml
PRIOR_CONFIG ?= configs/prior/small.yaml
DECODER_CONFIG ?= configs/decoder/small.yaml
UPSAMPLER_CONFIG ?= configs/decoder/upsampler-small.yaml

# The command line of each data and training job (python -m ...), run here by its target and on a
# cluster by `make submit JOB=...`; SET= adds --set overrides to either.
JOB_download = pipelines download $(DATA_OPT) $(if $(URL_LIST),--url-list "$(URL_LIST)" --name "$(NAME)") \
	$(if $(REDO),--redo "$(REDO)")
JOB_embed = pipelines embed $(DATA_OPT) $(if $(CLIP),--clip "$(CLIP)") $(if $(REDO),--redo "$(REDO)")
JOB_index = pipelines index $(DATA_OPT)
JOB_curate = pipelines curate $(DATA_OPT) --view "$(VIEW)"
JOB_export-clip-retrieval = pipelines export-clip-retrieval $(DATA_OPT)
JOB_train-clip = training clip --config $(CLIP_CONFIG) $(TRAIN_DATA)
JOB_train-prior = training prior --config $(PRIOR_CONFIG) $(TRAIN_DATA)
JOB_train-decoder = training decoder --config $(DECODER_CONFIG) $(TRAIN_DATA)
JOB_train-upsampler = training upsampler --config $(UPSAMPLER_CONFIG) $(TRAIN_DATA)

.PHONY: help setup lock test test-all format demo data download ingest embed reset-embeddings index curate knn \
	export-clip-retrieval import-clip-retrieval train-clip eval-clip train-prior sample-prior train-decoder export-diffusers \
	train-upsampler sample variations interpolate textdiff eval eval-compare submit bench-download bench-embed clean

help: ## list the targets and the variables each takes
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-22s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "Variables each target takes:"
	@$(foreach t,$(TARGETS),$(if $(TAKES_$(t)),printf "  %-22s %s\n" "$(t)" "$(TAKES_$(t))";))

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

DEMO_PROMPTS := configs/demo-prompts.txt
# Wall-clock budgets of the demo's training stages (each stops at its step count or its budget, whichever
# comes first), sized so that on a machine twice as slow as the README's the demo stays within 30 minutes
# (README, "Results": measured here, and the estimate for such a machine).
DEMO_BUDGET_PRIOR := 00:04:30
DEMO_BUDGET_DECODER := 00:05:00
DEMO_BUDGET_UPSAMPLER := 00:02:30
DEMO_OUT := outputs/demo
# Each stage is its own make call, so an interrupted demo resumes: finished shards are skipped and
# trainers continue from their last checkpoint (`make clean` starts afresh). To stay short on 2 cores
# the demo trains the prior its default 600 steps, the decoders 800 (default 2 800) and the
# upsampler 400 (default 500); `make train-decoder` etc. afterwards continue them to the defaults.
# The prior skips its in-training validation (val_every beyond its 600 steps): the job's final evaluation
# measures the same 1 000 val pairs. Its prior, decoder and upsampler are in the form diffusers runs: it
# ends by exporting them.
demo: setup ## the whole pipeline on the embedded default (committed CLIP): data → ... → eval; results in outputs/demo/
	@start=$$(date +%s); stage() { s=$$(date +%s); $(MAKE) --no-print-directory "$$@" || exit 1; \
		echo "[demo] $$* done in $$(( $$(date +%s) - s )) s (total $$(( $$(date +%s) - start )) s)"; }; \
	stage data download embed index eval-clip && \
	stage train-prior SET="val_every=1000 max_time=$(DEMO_BUDGET_PRIOR)" && \
	stage train-decoder SET="max_steps=800 max_time=$(DEMO_BUDGET_DECODER)" && \
	stage train-upsampler SET="max_steps=400 max_time=$(DEMO_BUDGET_UPSAMPLER)" && \
	stage train-decoder DECODER_CONFIG=configs/decoder/text-small.yaml SET="max_steps=800 max_time=$(DEMO_BUDGET_DECODER)" && \
	stage sample PROMPTS=$(DEMO_PROMPTS) N=4 OUT=$(DEMO_OUT)/sample.png && \
	stage eval OUT=$(DEMO_OUT) && \
	stage knn QUERY="$$(head -1 $(DEMO_PROMPTS))" KNN_OUT=$(DEMO_OUT) && \
	stage export-diffusers OUT=$(DEMO_OUT)/diffusers && \
	echo "demo done in $$(( $$(date +%s) - start )) s. Results in $(DEMO_OUT)/:" && \
	echo "  sample.png (held-out prompts, 4 samples each)  samples-*-*.png (eval grids)  metrics.json  table.md" && \
	echo "  diversity_fidelity.png  guidance.png (accuracy, CLIP score, diversity against guidance)  losses.png  *.html (knn page)" && \
	echo "  diffusers/ (prior, decoder and upsampler as an UnCLIPPipeline folder: UnCLIPPipeline.from_pretrained)" && \
	echo "Models in models/synthetic/ (clip prior decoder upsampler decoder-text); data in data/synthetic/."

eval: setup ## unCLIP vs the GLIDE-like baseline on val and held-out captions: fidelity, open diversity, accuracy, CLIP score
	$(PY) -m training eval $(DATA_OPT) $(if $(MODELS),--models "$(MODELS)") $(if $(OUT),--out "$(OUT)") $(EVAL_OPTS)

eval-compare: setup ## BEFORE=dir AFTER=dir: two `make eval` folders of the same captions side by side (before → after, paired Δ with 95% intervals) [SYSTEM=glide_like] [OUT=file]
	@test -n "$(BEFORE)" -a -n "$(AFTER)" || { echo 'usage: make eval-compare BEFORE=outputs/eval-old AFTER=outputs/eval-new'; exit 2; }
	$(PY) -m training eval-compare --before "$(BEFORE)" --after "$(AFTER)" $(if $(SYSTEM),--system "$(SYSTEM)") $(if $(OUT),--out "$(OUT)")

data: setup ## render the synthetic source: data/<name>/urls.parquet and source/
	$(PY) -m pipelines data $(DATA_OPT) $(SET_OPTS)

download: setup ## download the data set's URL list with img2dataset on Ray into data/<name>/shards/ (URL_LIST=path NAME=new: a new data set)
	@test -z "$(URL_LIST)" -o -n "$(NAME)" || { echo "usage: make download URL_LIST=path/to/urls.parquet NAME=name"; exit 2; }
	$(PY) -m $(JOB_download) $(SET_OPTS)

ingest: setup ## shard a local folder of images with <stem>.txt captions into a data set: FOLDER=path [NAME=name]
	@test -n "$(FOLDER)" || { echo "usage: make ingest FOLDER=path/to/images [NAME=name]"; exit 2; }
	$(PY) -m pipelines ingest --folder "$(FOLDER)" $(if $(NAME),--name "$(NAME)") $(SET_OPTS)

embed: setup ## CLIP-embed the shards into data/<name>/embeddings/ (CLIP=folder or ARCH:WEIGHTS; default models/synthetic/clip)
	$(PY) -m $(JOB_embed) $(SET_OPTS)

reset-embeddings: setup ## remove data/<name>/embeddings/ and index/, to embed again with another CLIP
	$(PY) -m pipelines reset-embeddings $(DATA_OPT) $(SET_OPTS)

index: setup ## faiss image and text indices over the embeddings into data/<name>/index/
	$(PY) -m $(JOB_index) $(SET_OPTS)

curate: setup ## VIEW=name: which keys to train on (near and exact duplicates, filters) into data/<name>/views/<view>.parquet + .json
	@test -n "$(VIEW)" || { echo 'usage: make curate VIEW=clean [NAME=...] [SET="curate.near_duplicate=0.97"]'; exit 2; }
	$(PY) -m $(JOB_curate) $(SET_OPTS)

knn: setup ## nearest neighbours: QUERY="text" or IMAGE=path or KEY=key; prints a table and an HTML page
	@test -n "$(QUERY)$(IMAGE)$(KEY)" || { echo 'usage: make knn QUERY="a red circle" | IMAGE=path | KEY=key'; exit 2; }
	$(PY) -m pipelines knn $(DATA_OPT) $(SET_OPTS) $(if $(K),-k $(K)) $(if $(KIND),--kind $(KIND)) $(if $(KNN_OUT),--out-dir "$(KNN_OUT)") \
		$(if $(QUERY),--query "$(QUERY)") $(if $(IMAGE),--image "$(IMAGE)") $(if $(KEY),--key "$(KEY)")

export-clip-retrieval: setup ## write the embeddings in clip-retrieval's layout to data/<name>/clip_retrieval/ [OUT=dir]
	$(PY) -m $(JOB_export-clip-retrieval) $(SET_OPTS) $(if $(OUT),--out "$(OUT)")

import-clip-retrieval: setup ## read a clip-retrieval folder SOURCE=dir into data/<name>/embeddings/
	@test -n "$(SOURCE)" || { echo "usage: make import-clip-retrieval SOURCE=dir NAME=name"; exit 2; }
	$(PY) -m pipelines import-clip-retrieval $(DATA_OPT) $(SET_OPTS) --source "$(SOURCE)"

train-clip: setup ## train the small CLIP of CLIP_CONFIG on the data set's shards; exports models/<name>/clip/
	$(PY) -m $(JOB_train-clip) $(SET_OPTS)

train-prior: setup ## train the diffusion prior of PRIOR_CONFIG on the data set's embeddings; exports models/<name>/prior/
	$(PY) -m $(JOB_train-prior) $(SET_OPTS)

sample-prior: setup ## PROMPT="..." (or PROMPTS=file): sampled CLIP image embeddings, their nearest indexed images, a .npy
	@test -n "$(PROMPT)$(PROMPTS)" || { echo 'usage: make sample-prior PROMPT="a small red circle at the top left"'; exit 2; }
	$(PY) -m training sample-prior --config $(PRIOR_CONFIG) $(if $(DATA_GIVEN),--data "$(DATA_SET)") \
		$(if $(SEED),--seed $(SEED)) $(if $(STEPS),--steps $(STEPS)) $(if $(GUIDANCE),--guidance $(GUIDANCE)) \
		$(if $(K),-k $(K)) $(if $(PROMPT),--prompt "$(PROMPT)") $(if $(PROMPTS),--prompts "$(PROMPTS)")

# Options of the four generation commands: MODELS=folder (default models/<data set>) SEED=0 N=images
# STEPS=decoder steps GUIDANCE=decoder scale DECODER=decoder|decoder-text OUT=path.png
GEN_OPTS = $(if $(DATA_GIVEN),--data "$(DATA_SET)") $(if $(MODELS),--models "$(MODELS)") $(if $(SEED),--seed $(SEED)) \
	$(if $(N),-n $(N)) $(if $(STEPS),--steps $(STEPS)) $(if $(GUIDANCE),--guidance $(GUIDANCE)) \
	$(if $(DECODER),--decoder $(DECODER)) $(if $(OUT),--out "$(OUT)")

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
	$(PY) -m training clip-eval $(DATA_OPT) $(SET_OPTS)

bench-embed: setup ## embed job samples/s vs bare encoder throughput (and clip-retrieval, see bench/embed.py)
	$(PY) bench/embed.py $(DATA_OPT)

bench-download: setup ## images/s of data + download on a fresh copy of the data set
	$(PY) bench/download.py $(DATA_OPT)

SUBMIT_PYTHON ?= python
submit: setup ## JOB=embed|download|index|curate|export-clip-retrieval|train-prior|train-decoder|train-upsampler as a Ray batch job at RAY_ADDRESS=http://head:8265
	@test -n "$(JOB_$(JOB))" -a -n "$(RAY_ADDRESS)" || { echo 'usage: make submit JOB=embed RAY_ADDRESS=http://head:8265 [NAME=...] [SET="data_root=/mnt/shared/data"]'; \
		echo '  JOB: download embed index curate export-clip-retrieval train-clip train-prior train-decoder train-upsampler'; exit 2; }
	$(VENV)/bin/ray job submit --address "$(RAY_ADDRESS)" --working-dir . -- \
		$(SUBMIT_PYTHON) -m $(JOB_$(JOB)) $(SET_OPTS)

export-diffusers: setup ## OUT=dir: models/<name>/ as an UnCLIPPipeline folder diffusers loads (a prior alone: KandinskyV22PriorPipeline) [MODELS=folder]
	@test -n "$(OUT)" || { echo 'usage: make export-diffusers OUT=exports/mine [MODELS=models/mine]'; exit 2; }
	$(PY) -m training export-diffusers $(if $(DATA_GIVEN),--data "$(DATA_SET)") $(if $(MODELS),--models "$(MODELS)") \
		--out "$(OUT)"

# The committed default CLIP (models/synthetic/clip) stays.
clean: ## remove generated data, outputs and trained models (keeps .venv and the committed CLIP)
	rm -rf data outputs $(filter-out models/synthetic,$(wildcard models/*)) \
		$(filter-out models/synthetic/clip,$(wildcard models/synthetic/*))

# What each target takes; a variable given on the command line that a target does not take is refused.
DATA_VARS := NAME DATA CONFIG
GEN_VARS := $(DATA_VARS) MODELS SEED N STEPS GUIDANCE DECODER OUT
TAKES_data := $(DATA_VARS) SET
TAKES_download := $(DATA_VARS) SET REDO URL_LIST
TAKES_ingest := FOLDER NAME SET
TAKES_embed := $(DATA_VARS) SET CLIP REDO
TAKES_reset-embeddings := $(DATA_VARS) SET
TAKES_index := $(DATA_VARS) SET
TAKES_curate := $(DATA_VARS) SET VIEW
TAKES_knn := $(DATA_VARS) SET QUERY IMAGE KEY K KIND KNN_OUT
TAKES_export-clip-retrieval := $(DATA_VARS) SET OUT
TAKES_import-clip-retrieval := $(DATA_VARS) SET SOURCE
TAKES_eval-clip := $(DATA_VARS) SET
TAKES_train-clip := $(DATA_VARS) SET CLIP_CONFIG
TAKES_train-prior := $(DATA_VARS) SET PRIOR_CONFIG
TAKES_train-decoder := $(DATA_VARS) SET DECODER_CONFIG
TAKES_train-upsampler := $(DATA_VARS) SET UPSAMPLER_CONFIG
TAKES_sample-prior := $(DATA_VARS) PRIOR_CONFIG PROMPT PROMPTS SEED STEPS GUIDANCE K
TAKES_sample := $(GEN_VARS) PROMPT PROMPTS PRIOR_GUIDANCE
TAKES_variations := $(GEN_VARS) IMAGE
TAKES_interpolate := $(GEN_VARS) A B
TAKES_textdiff := $(GEN_VARS) IMAGE FROM TO
TAKES_eval := $(DATA_VARS) MODELS OUT EVAL_OPTS
TAKES_eval-compare := BEFORE AFTER SYSTEM OUT
TAKES_export-diffusers := $(DATA_VARS) MODELS OUT
TAKES_bench-embed := $(DATA_VARS)
TAKES_bench-download := $(DATA_VARS)
TAKES_submit = JOB SUBMIT_PYTHON $(TAKES_$(JOB))
TARGETS := $(sort $(patsubst TAKES_%,%,$(filter TAKES_%,$(.VARIABLES))))
refused = $(filter-out $(TAKES_$(1)),$(GIVEN))
$(foreach goal,$(MAKECMDGOALS),$(if $(call refused,$(goal)),$(error make $(goal) does not take $(call refused,$(goal)); \
	it takes: $(or $(TAKES_$(goal)),no variables) (make help lists them))))
$(foreach goal,$(MAKECMDGOALS),$(if $(filter $(TAKES_$(goal)),$(IN_ENVIRONMENT)),$(error \
	$(filter $(TAKES_$(goal)),$(IN_ENVIRONMENT)) set in the environment: make takes it on its command line, \
	make $(goal) $(firstword $(filter $(TAKES_$(goal)),$(IN_ENVIRONMENT)))=...; unset it first)))
$(if $(word 2,$(DATA_GIVEN)),$(error give the data set once: NAME=, DATA= or CONFIG=, not $(DATA_GIVEN)))
