# Two entry points for a fresh machine; each creates .venv and installs what it needs.
#   make demo   the main job on an embedded default (simulator evaluation of every manager)
#   make test   the test suite (what CI runs)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: demo test test-all bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.sim: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[sim]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.sim

demo: $(VENV)/.sim
	$(BIN)/faasrm sim eval --preset paper --managers fixed,greedy,ensure,vpa,oracle \
		--seed 1 --json out/sim_eval.json --plots out/

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

test-all: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m ''

bench: $(VENV)/.dev
	$(BIN)/faasrm bench sim --json out/bench_sim.json

clean:
	rm -rf $(VENV) out *.egg-info
