# gmpi-lightning: `make help` lists the targets.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export WANDB_MODE ?= offline
export GLOO_SOCKET_IFNAME ?= lo

.DEFAULT_GOAL := help
.PHONY: help install test test-full lint clean data bench train

help:  ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(VENV)/.installed  ## create .venv and install the suite with dev tools (idempotent)


$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install -q -e ".[dev]"
	touch $@

test: install  ## fast test suite (slow tests excluded)
	$(PY) -m pytest -q

test-full: install  ## every test, slow ones included
	$(PY) -m pytest -q -m "slow or not slow"

DATA       ?= data/synthetic32
DATA_NUM   ?= 10000
DATA_RES   ?= 32
RUN        ?= runs/synthetic

data: $(DATA)/dataset.json  ## generate the default synthetic dataset (DATA, DATA_NUM, DATA_RES) + preview.png

$(DATA)/dataset.json: | install
	$(VENV)/bin/gmpi data synthetic --out $(DATA) --num $(DATA_NUM) --resolution $(DATA_RES) --overwrite

train: install  ## the default run on CPU: synthetic data -> 2D StyleGAN2 -> GMPI -> renders (see README)
	@test -f $(DATA)/dataset.json || $(MAKE) --no-print-directory data
	@test -f runs/synthetic_stylegan2/stylegan2.pt || $(VENV)/bin/gmpi fit --config experiments/synthetic_stylegan2.yaml
	$(VENV)/bin/gmpi fit --config experiments/synthetic.yaml
	$(VENV)/bin/gmpi render --ckpt $(RUN)/gmpi.pt --seeds 0-5 --planes 32 --yaw=-0.4,0,0.4 --video --frames 48 \
		--out $(RUN)/renders
	@echo "done: checkpoints $(RUN)/checkpoints, generator $(RUN)/gmpi.pt, metrics $(RUN)/csv,"
	@echo "      renders (views, depth, plane strips, yaw videos) $(RUN)/renders"

bench: install  ## speed benchmarks (renderer, generator, synthetic data) on this machine
	$(PY) benchmarks/bench_render.py
	$(PY) benchmarks/bench_synthetic.py

lint: install  ## ruff
	$(VENV)/bin/ruff check .

clean:  ## remove caches and build outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build *.egg-info **/__pycache__
