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

.PHONY: setup test quickstart bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade setuptools wheel -c constraints.txt
	$(BIN)/pip install -q -c constraints.txt -e ".[all]"
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

quickstart: setup
	$(BIN)/python -m detectkit.quickstart

bench: setup
	for f in benchmarks/*.py; do $(BIN)/python $$f || exit 1; done

lint: setup
	$(BIN)/ruff check detectkit callbacks tests benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache
