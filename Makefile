# Two entry points for a fresh machine; each creates .venv and installs what it needs.
#   make demo   the main job: real functions on a local invoker, Fixed then the learned policy
#   make test   the test suite (what CI runs)
# Also: make sim-demo (every manager in the simulator), make model, make bench.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: demo sim-demo test test-all bench model clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.sim: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[sim]'
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[dev]'
	touch $@ $(VENV)/.sim

sim-demo: $(VENV)/.sim
	$(BIN)/faasrm sim eval --preset paper --managers fixed,greedy,ensure,vpa,oracle,learned \
		--seed 1 --json out/sim_eval.json --plots out/

# Real functions on a local invoker (root, cgroup v1): Fixed, then the sidecar's learned policy.
$(VENV)/.invoker: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[sim,invoker]'
	touch $@

demo: $(VENV)/.invoker
	$(BIN)/faasrm demo

test: $(VENV)/.dev
	$(BIN)/python -m pytest -q

test-all: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m ''

bench: $(VENV)/.dev
	$(BIN)/faasrm bench sim --json out/bench_sim.json

# Reproduces the shipped policy (models/default.onnx and MODEL_CARD.md); ~15 min on 2 cores.
RUN := runs/default
TRAIN_CMD := $(BIN)/faasrm train --preset paper --episode-decisions 4096 --num-steps 4096 \
	--num-envs 2 --num-minibatches 8 --learning-rate 3e-4 --total-timesteps 245760 \
	--init-from $(RUN)/bc.pt --checkpoint-every 5 --seed 7 --out-dir $(RUN) --no-progress
model: $(VENV)/.dev
	rm -rf $(RUN) && mkdir -p $(RUN)
	start=$$(date +%s); \
	$(BIN)/python -m training.pretrain --preset paper --episodes 6 --decisions 4096 --out $(RUN)/bc.pt && \
	$(TRAIN_CMD) && \
	echo $$(( $$(date +%s) - start )) > $(RUN)/wall_s
	$(BIN)/faasrm export $(RUN)/checkpoint.pt models/default.onnx
	for seed in 101 102; do \
		$(BIN)/faasrm sim eval --preset paper --seed $$seed \
			--managers fixed,greedy,ensure,vpa,oracle,learned --model models/default.onnx \
			--json $(RUN)/paper_seed$$seed.json || exit 1; \
	done
	$(BIN)/python -m training.card --run $(RUN) --model models/default.onnx \
		--eval $(RUN)/paper_seed101.json $(RUN)/paper_seed102.json --wall-s $$(cat $(RUN)/wall_s) \
		--notes models/NOTES.md \
		--command "make model  # python -m training.pretrain --preset paper --episodes 6 --decisions 4096, then $(subst $(BIN)/,,$(TRAIN_CMD))"

clean:
	rm -rf $(VENV) out *.egg-info
