# The two commands a new user needs: `make demo` and `make test`. Both create .venv and install the
# pinned dependency set (requirements/constraints.txt) into it on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PIP    := $(BIN)/python -m pip

.PHONY: demo test test-fast lint format bench install clean

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	$(PIP) install --quiet -c requirements/constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/relic demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/hadolint docker/Dockerfile docker/Dockerfile.cpu

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python -m benchmarks.shard_build
	$(BIN)/python -m benchmarks.pipeline
	$(BIN)/python -m benchmarks.train_step
	$(BIN)/python -m benchmarks.ray_overhead
	$(BIN)/python -m benchmarks.gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
