# Two commands on a fresh machine: `make run` (the main job) and `make test` (the whole test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: setup
	$(BIN)/python -m pipeline.main

test: setup
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python -m bench.loss_step
	$(BIN)/python -m bench.evaluate
	$(BIN)/python -m bench.data
	$(BIN)/python -m bench.train_step

clean:
	rm -rf $(VENV)
