# Two commands on a fresh machine: `make run` (the main job) and `make test` (the whole test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup browser run test bench clean

setup: $(STAMP) browser

# Headless Chromium for the tests that look at pages (dvc plots show offline); they skip without it. Installed
# where we are root (CI on a fresh machine); elsewhere a note.
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq chromium >/dev/null) || echo "note: chromium is not installed; the page tests skip"

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
