# Two commands on a fresh machine: `make run` (the main job) and `make test` (the whole test suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test files run on this many processes: most tests are single-threaded subprocess chains (dvc repro, torchrun).
TEST_WORKERS ?= 2

.PHONY: setup browser run test bench docs docs-serve check-repro clean

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

# Does this machine reproduce the committed results byte for byte? The pipeline of the last commit in a temporary
# clone, its outputs compared with dvc.lock and metrics.json stage by stage (ARGS="--until pretrain" for a quick
# look, ARGS="-S train.portable=false" to see what the CPU's own kernels change).
check-repro: setup
	$(BIN)/python -m pipeline.check_repro $(ARGS)

test: setup
	QT_QPA_PLATFORM=offscreen $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

bench: setup
	$(BIN)/python -m bench.loss_step
	$(BIN)/python -m bench.evaluate
	$(BIN)/python -m bench.data
	$(BIN)/python -m bench.train_step

# The documentation site (mkdocs.yml, pages in docs/): built strictly into site/, so a broken link or an API symbol
# that no longer exists is an error here as in the tests; docs-serve rebuilds on every change, on this machine only.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

docs-serve: setup
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

clean:
	rm -rf $(VENV)
