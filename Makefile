# Two commands do everything on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint typecheck check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall when the project metadata changes.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,fast]'
	touch $(STAMP)

run: $(STAMP)
	mkdir -p var/spool var/run
	$(BIN)/spoold run --config config/spoold.toml

# Two tests at a time: most of a daemon test is waiting (fsync, sockets,
# child processes), so two share two cores well (a third of the time of one
# at a time).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# The inner loop: all but the tests marked `daemon` (those that start
# processes: the daemon, the CLI, a child Python), spread over the cores
# (bytecode kept between runs: collection is a third of the time otherwise).
test-fast: $(STAMP)
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -m "not daemon" -n auto

lint: $(STAMP)
	$(BIN)/ruff check spoold tests bench
	$(BIN)/ruff format --check spoold tests bench

typecheck: $(STAMP)
	$(BIN)/mypy --strict spoold

check: test lint typecheck

bench: $(STAMP)
	$(BIN)/python bench/store_enqueue.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
