# Every target sets up .venv first when needed; pins come from constraints.txt.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Test processes (pytest-xdist, one file per worker so module fixtures are built once); 2 = CI's cores.
TEST_WORKERS ?= 2
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := offline
export PYTHONUNBUFFERED := 1

# Comparison environment: detectkit plus ultralytics (the version the parity fixtures were made
# with), for benchmarks/bench_peers.py only; detectkit itself never imports ultralytics.
PEERS     := .venv-peers
PEERS_BIN := $(PEERS)/bin
PEERS_STAMP := $(PEERS)/.installed
PEERS_ARGS ?= --readme README.md

.PHONY: setup test wheel wheel-check quickstart bench bench-peers bench-recipe bench-gpu lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade setuptools wheel -c constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e ".[all]"
	touch $(STAMP)

# --max-worker-restart=0: a worker that dies fails the run at once, naming its test (tests/worker_watch.py);
# with restarts, pytest-xdist 3.8's loadfile scheduler can wait forever after a crash (xdist #784, #1378).
test: setup
	DETECTKIT_STRICT_SKIPS=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --max-worker-restart=0

# sdist + wheel into dist/ (the wheel is built from the sdist)
wheel: setup
	$(BIN)/python -m build --outdir dist .

# the wheel as a pip user gets it: a fresh venv without extras, used from outside the checkout
wheel-check: setup
	BUILD_PY=$(BIN)/python .ci/wheel-check $(PY)

quickstart: setup
	$(BIN)/python -m detectkit.cli.quickstart

bench: setup
	for f in benchmarks/bench_*.py; do [ $$f = benchmarks/bench_peers.py ] || $(BIN)/python $$f || exit 1; done

$(PEERS_STAMP): pyproject.toml setup.py constraints.txt
	$(PY) -m venv $(PEERS)
	$(PEERS_BIN)/pip install -q --upgrade setuptools wheel -c constraints.txt
	$(PEERS_BIN)/pip install -q -c constraints.txt -e ".[all]" ultralytics onnxslim
	touch $(PEERS_STAMP)

$(PEERS): $(PEERS_STAMP)

# Side by side, interleaved, pinned; rewrites the README table: make bench-peers
# (a subset, README untouched: make bench-peers PEERS_ARGS="--only data --runs 10")
bench-peers: $(PEERS_STAMP)
	YOLO_OFFLINE=1 $(PEERS_BIN)/python benchmarks/bench_peers.py $(PEERS_ARGS)

# detectkit's laptop recipe vs ultralytics' yolov8s.yaml from scratch on raccoon_voc, one core each,
# scored by one pycocotools evaluator: make bench-recipe RECIPE_ARGS="--epochs 8 --imgsz 320"
RECIPE_ARGS ?=
bench-recipe: setup $(PEERS_STAMP)
	YOLO_OFFLINE=1 $(BIN)/python benchmarks/bench_recipe.py $(RECIPE_ARGS)

# One lent GPU in one call (about 10 minutes at most): train step img/s + MFU, TensorRT FP16/INT8
# latency, serve throughput; a table and one JSON line (results in benchmarks/gpu_results).
# Check it on a CPU first in under a minute: make bench-gpu GPU_ARGS=--dry-run
GPU_ARGS ?=
bench-gpu: setup
	PYTHON=$(BIN)/python bash benchmarks/gpu_suite.sh $(GPU_ARGS)

# ruff, then the layer contracts of docs/architecture.md ([tool.importlinter] in pyproject.toml)
lint: setup
	$(BIN)/ruff check detectkit callbacks tests benchmarks
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) $(PEERS) runs .pytest_cache build dist *.egg-info
