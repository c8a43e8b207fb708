# The README's commands. `make demo` sets everything up and runs the offline demo;
# `make test` sets up and runs the whole test suite; `make test-fast` all but the tests marked slow.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BASE_STAMP := $(VENV)/.installed-base

# Two workers (pytest-xdist); --dist loadfile keeps each file's tests, and its module-scoped fixtures, in one.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

.PHONY: setup demo lint format test test-fast bench bench-threads clean

setup: $(STAMP)

# torch==2.13.0 first: an unpinned torch would pull the newest CUDA build (GBs). The demo needs only pti
# itself; the tests add the extras (ONNX Runtime, Ray, the studio, Triton: about 1.5 GB more).
$(BASE_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e .
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(BASE_STAMP)
	$(BIN)/pti demo --out demo-out

# ruff (pinned in the test extra): the linter, then the formatter's check; `make format` applies it.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .

test: lint
	$(PYTEST) tests

test-fast: lint
	$(PYTEST) -m "not slow" tests

bench: setup
	$(BIN)/python -m benchmarks.bench_tune
	$(BIN)/python -m benchmarks.bench_render
	$(BIN)/python -m benchmarks.bench_export

bench-threads: setup
	$(BIN)/python -m benchmarks.bench_threads

clean:
	rm -rf $(VENV) demo-out
