# Two entry points for a fresh machine; each creates .venv and installs what it needs.
#   make demo   the main job: real functions on a local invoker, Fixed then the learned policy
#   make test   the test suite (what CI runs)
# Also: make sim-demo (every manager in the simulator), make model / model-invoker, make bench.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --disable-pip-version-check

.PHONY: demo sim-demo test test-all lint bench model model-invoker card card-invoker clean

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

# Real functions on a local invoker (root, cgroup v1): Fixed, then the sidecar's learned policy,
# with a trainer service receiving its trajectories (its online learner needs torch: [train]).
$(VENV)/.invoker: pyproject.toml | $(BIN)/python
	$(PIP) -e '.[train,invoker]'
	touch $@ $(VENV)/.sim

demo: $(VENV)/.invoker
	$(BIN)/faasrm demo

test: $(VENV)/.dev lint
	$(BIN)/python -m pytest -q

lint: $(VENV)/.dev
	$(BIN)/ruff check sidecar training tests
	$(BIN)/ruff format --check sidecar training tests

test-all: $(VENV)/.dev
	$(BIN)/python -m pytest -q -m ''

bench: $(VENV)/.dev
	$(BIN)/faasrm bench sim --json out/bench_sim.json

# Reproduces a shipped policy and its card: `make model` = models/default.onnx (paper preset,
# 8-core invokers: ~26 min of training and ~60 min of evaluation on 2 cores, capacity on one
# seed); `make model-invoker` = models/invoker.onnx (invoker preset, 2-core hosts like the
# demo's: ~28 min of training, ~4 min of evaluation). `make card` / `make card-invoker` only
# re-score the shipped model under the code's current defaults and rewrite its card, keeping
# the training facts already in its metadata.
model card: NAME := default
model card: PRESET := paper
model card: CARD := models/MODEL_CARD.md
model card: NOTES := models/NOTES.md
model card: CAP_SEEDS := 101
model-invoker card-invoker: NAME := invoker
model-invoker card-invoker: PRESET := invoker
model-invoker card-invoker: CARD := models/INVOKER_CARD.md
model-invoker card-invoker: NOTES := models/INVOKER_NOTES.md
model-invoker card-invoker: CAP_SEEDS := 101,102,103
RUN = runs/$(NAME)
BC_ARGS = --preset $(PRESET) --episodes 6 --decisions 4096 --out $(RUN)/bc.pt
TRAIN_CMD = faasrm train --preset $(PRESET) --episode-decisions 4096 --num-steps 4096 \
	--num-envs 2 --num-minibatches 8 --learning-rate 3e-4 --total-timesteps 245760 \
	--init-from $(RUN)/bc.pt --checkpoint-every 5 --seed 7 --out-dir $(RUN) --no-progress
SCORES = --eval $(RUN)/$(PRESET)_seeds101-103.json $(RUN)/$(PRESET)_seed1.json \
	--capacity $(RUN)/$(PRESET)_capacity.json
define SCORE
	mkdir -p $(RUN)
	EVAL="--preset $(PRESET) --managers fixed,rule,smallest,vpa,oracle_in_box,oracle,learned \
		--model models/$(NAME).onnx"; \
	$(BIN)/faasrm sim eval $$EVAL --seeds 101,102,103 --json $(RUN)/$(PRESET)_seeds101-103.json && \
	$(BIN)/faasrm sim eval $$EVAL --seeds 1 --json $(RUN)/$(PRESET)_seed1.json
	$(BIN)/faasrm sim capacity --preset $(PRESET) --seeds $(CAP_SEEDS) \
		--managers fixed,rule,smallest,oracle,learned --model models/$(NAME).onnx \
		--json $(RUN)/$(PRESET)_capacity.json
endef
model model-invoker: $(VENV)/.dev
	rm -rf $(RUN) && mkdir -p $(RUN)
	start=$$(date +%s); \
	$(BIN)/python -m training.pretrain $(BC_ARGS) && \
	$(BIN)/$(TRAIN_CMD) && \
	echo $$(( $$(date +%s) - start )) > $(RUN)/wall_s
	$(BIN)/faasrm export $(RUN)/checkpoint.pt models/$(NAME).onnx
	$(SCORE)
	$(BIN)/python -m training.card --run $(RUN) --model models/$(NAME).onnx --preset $(PRESET) \
		$(SCORES) --wall-s $$(cat $(RUN)/wall_s) --notes $(NOTES) --card $(CARD) \
		--command "make $@  # python -m training.pretrain $(BC_ARGS), then $(TRAIN_CMD), then faasrm export $(RUN)/checkpoint.pt models/$(NAME).onnx"

card card-invoker: $(VENV)/.dev
	$(SCORE)
	$(BIN)/python -m training.card --model models/$(NAME).onnx --preset $(PRESET) $(SCORES) \
		--notes $(NOTES) --card $(CARD)

clean:
	rm -rf $(VENV) out *.egg-info
