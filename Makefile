# framecap: `make demo` runs the whole pipeline on a real video; `make test` runs the tests.
# Both do the set-up they need (system packages when run as root, the .venv) themselves.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch comes from the PyPI wheel; this pin is the one that works with torchvision here.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: help setup system-deps demo test test-unit test-integration faults lint bench bench-web bench-caption bench-pipeline bench-edge bench-listing bench-scaleout clean

help:
	@echo "make demo    - start the local stack and caption a real video end to end"
	@echo "make test    - run the whole test suite (unit + integration, real servers)"
	@echo "make faults  - fault tests against the real servers; writes docs/faults.md"
	@echo "make setup   - system packages (as root) and the .venv with every extra"
	@echo "make lint    - ruff and mypy"
	@echo "make bench   - benchmarks in bench/ (make bench-web: search at 1M captions)"

system-deps:
	@bash deploy/scripts/system-deps.sh

$(BIN)/framecap: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[edge,cloud,stack,web,dev]'
	@touch $(BIN)/framecap

setup: system-deps $(BIN)/framecap

demo: setup
	$(BIN)/framecap demo $(DEMO_ARGS)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest -q -m "not integration" $(PYTEST_ARGS)

test-integration: setup
	$(BIN)/python -m pytest -q -m integration $(PYTEST_ARGS)

# The fault tests (tests/faults, ~6 min: three 30 s outages) and their table in docs/faults.md.
# FRAMECAP_FAULT_OUTAGE_S=10 shortens the outages for a local run (the table says so).
faults: setup
	FRAMECAP_REQUIRE_STACK=1 FRAMECAP_FAULTS_TABLE=docs/faults.md \
		$(BIN)/python -m pytest -q -s tests/faults $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check edge cloud common tests bench
	$(BIN)/mypy edge cloud common

# Decoding variants (beam x length penalty) of the default model on cached val features:
# BLEU-4, CIDEr and time per image, with time ratios against the first variant of the same run.
BENCH_DATA ?= data/flickr8k-lite0
bench: setup
	@test -f $(BENCH_DATA)/val_features.npy || { echo "make bench needs cached features in $(BENCH_DATA):" \
		"run 'framecap data prepare ... --output-dir $(BENCH_DATA) --cache-features' (docs/model.md)"; exit 1; }
	$(BIN)/python bench/caption_decoding.py --checkpoint cloud/models/default.pt --data-dir $(BENCH_DATA) \
		--beams 1 3 5 --length-penalties 0 0.7

# framecap web at scale: index BENCH_CAPTIONS synthetic captions, then search p50/p95 through the
# API vs the raw FTS5 query, filtered vs unfiltered, a timeline page, live delay (ratios, one run).
BENCH_CAPTIONS ?= 1000000
bench-web: setup
	$(BIN)/python bench/web_search.py --captions $(BENCH_CAPTIONS)

# Captioning speed (docs/performance.md): jpg -> caption against a per-image loop and batched beam
# search against one image at a time, ratios against baselines of the same run, captions compared.
# BENCH_CAPTION_ARGS='--images DIR' for another folder of JPEGs (default: the Flickr8k images).
bench-caption: setup
	$(BIN)/python bench/caption_throughput.py --count 200 --threads 2 $(BENCH_CAPTION_ARGS)

# The pipeline on a private local stack (docs/performance-pipeline.md): capture -> caption at the
# edge at 1 frame/s (p50/p95), 4 devices at 10 frames/s, the worker saturated against the model
# alone, edge -> S3 frames/s against a plain paho + boto3 loop; ratios against baselines of the run.
bench-pipeline: setup
	$(BIN)/python bench/pipeline_latency.py $(BENCH_PIPELINE_ARGS)

# The edge's CPU per frame (every frame sampled) against decode + JPEG encode, and its peak RSS.
bench-edge: setup
	$(BIN)/python bench/edge_cost.py $(BENCH_EDGE_ARGS)

# The worker's periodic listing pass against its full pass and the old all-keys scan, at 20k and 200k objects.
bench-listing: setup
	$(BIN)/python bench/worker_listing.py $(BENCH_LISTING_ARGS)

# Scale-out (docs/performance.md): 1, 2, 4 ingest processes and 1, 2 worker processes on a private
# stack, rates and ratios against one replica of the same run. The latency/throughput-vs-load plot:
# make bench-pipeline BENCH_PIPELINE_ARGS='--modes sweep --plot docs/performance-load.png'
bench-scaleout: setup
	$(BIN)/python bench/pipeline_scaleout.py $(BENCH_SCALEOUT_ARGS)

clean:
	rm -rf .state .pytest_cache .mypy_cache .ruff_cache
