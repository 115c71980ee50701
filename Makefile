# gmpi-lightning: `make help` lists the targets.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export WANDB_MODE ?= offline
export GLOO_SOCKET_IFNAME ?= lo

.DEFAULT_GOAL := help
.PHONY: help install test test-full lint clean data bench bench-train train mutation

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

# No --overwrite: this runs only when $(DATA)/dataset.json is missing, and a folder without one is not ours to replace.
$(DATA)/dataset.json: | install
	$(VENV)/bin/gmpi data synthetic --out $(DATA) --num $(DATA_NUM) --resolution $(DATA_RES)

# Experiment runs (README "Multi-GPU and multi-node"): `make train EXP=NAME` trains experiments/NAME.yaml.
#   GPUS unset          one `gmpi fit` process, devices as the YAML says (`devices: auto` = every visible GPU)
#   GPUS=N (N > 1)      torchrun --standalone, N processes on this node
#   NODES=M GPUS=N      torchrun rendezvous at MASTER_ADDR:MASTER_PORT; run it on every node with its NODE_RANK
# Multi-process runs always go through torchrun, not Lightning's own launcher: one launch path for 1 and M nodes,
# torchrun ends every rank when one fails, --standalone picks a free port, and TorchElastic is the environment
# Lightning trusts first, so `make train GPUS=8` also works inside an interactive SLURM allocation (Lightning's
# launcher would read the allocation's SLURM variables and wait for srun-started ranks).
# ARGS="--model.x=1 --trainer.y=2" goes to `gmpi fit` verbatim; DRY=1 prints the command and the resolved config.
EXP         ?=
EXP_DIR     ?= experiments
GPUS        ?=
NODES       ?= 1
NODE_RANK   ?=
MASTER_ADDR ?=
MASTER_PORT ?= 29500
ARGS        ?=
DRY         ?=
SBATCH_ARGS ?=
SLURM_LOGS  ?= runs/slurm
GRES        ?= gpu:$(or $(GPUS),1)
EXP_YAML     = $(EXP_DIR)/$(EXP).yaml
EXP_NAMES    = $(sort $(basename $(notdir $(wildcard $(EXP_DIR)/*.yaml))))
FIT          = fit --config $(EXP_YAML)$(if $(GPUS), --trainer.devices=$(GPUS) --trainer.num_nodes=$(NODES)) $(ARGS)
ifneq ($(NODES),1)
LAUNCH       = $(VENV)/bin/torchrun --nnodes=$(NODES) --node_rank=$(NODE_RANK) --nproc_per_node=$(GPUS) \
               --master_addr=$(MASTER_ADDR) --master_port=$(MASTER_PORT) -m gmpi_lightning
else ifneq ($(filter-out 1,$(GPUS)),)
LAUNCH       = $(VENV)/bin/torchrun --standalone --nproc_per_node=$(GPUS) -m gmpi_lightning
else
LAUNCH       = $(PY) -m gmpi_lightning
endif
is_count     = $(shell [ "$(1)" -ge $(or $(2),1) ] 2>/dev/null && echo y)
exp_check    = $(if $(EXP),,$(error EXP=NAME is required. Experiments in $(EXP_DIR)/: $(or $(EXP_NAMES),none)))$(if \
               $(wildcard $(EXP_YAML)),,$(error unknown experiment EXP=$(EXP): there is no $(EXP_YAML). \
               Experiments in $(EXP_DIR)/: $(or $(EXP_NAMES),none)))$(if $(call is_count,$(NODES)),,$(error \
               NODES=$(NODES): expected a number of nodes >= 1))$(if $(GPUS),$(if $(call is_count,$(GPUS)),,$(error \
               GPUS=$(GPUS): expected a number of processes (GPUs) per node >= 1)))
node_check   = $(if $(GPUS),,$(error NODES=$(NODES) needs GPUS=<processes per node>))$(if $(MASTER_ADDR),,$(error \
               NODES=$(NODES) needs MASTER_ADDR=<address of the NODE_RANK=0 node, reachable from every node>))$(if \
               $(and $(call is_count,$(NODE_RANK),0),$(shell [ "$(NODE_RANK)" -lt "$(NODES)" ] && echo y)),,$(error \
               NODES=$(NODES) needs NODE_RANK=0..$(shell echo $$(($(NODES)-1))) (this node's rank), got '$(NODE_RANK)'))
dry          = $(filter 1 yes true,$(DRY))

train: install  ## default CPU pipeline (see README); EXP=NAME [GPUS=8] [NODES=4 NODE_RANK=r MASTER_ADDR=h] [ARGS=..] [DRY=1]
ifeq ($(strip $(EXP)),)
	$(if $(dry),$(error DRY=1 needs EXP=NAME; `make -n train` lists the default pipeline's commands without running them))
	@$(PY) benchmarks/estimate_time.py $(if $(wildcard $(DATA)/dataset.json),,--data-images $(DATA_NUM)) \
		$(if $(wildcard runs/synthetic_stylegan2/stylegan2.pt),,--config experiments/synthetic_stylegan2.yaml) \
		--config experiments/synthetic.yaml || echo "(no time estimate; training anyway)"
	@test -f $(DATA)/dataset.json || $(MAKE) --no-print-directory data
	@test -f runs/synthetic_stylegan2/stylegan2.pt || $(VENV)/bin/gmpi fit --config experiments/synthetic_stylegan2.yaml
	$(VENV)/bin/gmpi fit --config experiments/synthetic.yaml
	$(VENV)/bin/gmpi render --ckpt $(RUN)/gmpi.pt --seeds 0-5 --planes 32 --yaw=-0.4,0,0.4 --video --frames 48 \
		--out $(RUN)/renders
	@echo "done: checkpoints $(RUN)/checkpoints, generator $(RUN)/gmpi.pt, metrics $(RUN)/csv,"
	@echo "      renders (views, depth, plane strips, yaw videos) $(RUN)/renders"
else ifneq ($(dry),)
	$(exp_check)$(if $(filter-out 1,$(NODES)),$(node_check))
	$(info # command$(if $(filter-out 1,$(NODES)), (node $(NODE_RANK) of $(NODES); run it on every node with its NODE_RANK)):)
	$(info $(LAUNCH) $(FIT))
	$(info # resolved config:)
	@$(PY) -m gmpi_lightning $(FIT) --print_config
else
	$(exp_check)$(if $(filter-out 1,$(NODES)),$(node_check))
	$(LAUNCH) $(FIT)
endif

.PHONY: slurm
SBATCH = sbatch --job-name=gmpi-$(subst /,-,$(EXP)) --nodes=$(NODES) --ntasks-per-node=$(or $(GPUS),1) $(if $(GRES),--gres=$(GRES)) \
         --output=$(SLURM_LOGS)/%x-%j.out $(SBATCH_ARGS) scripts/slurm_train.sh $(EXP_YAML) $(ARGS)

slurm: install  ## submit scripts/slurm_train.sh: EXP=NAME NODES=4 GPUS=8 [SBATCH_ARGS="-p gpu -t 2-0"] [ARGS=..] [DRY=1]
	$(exp_check)
ifneq ($(dry),)
	$(info # command:)
	$(info $(SBATCH))
	$(info # resolved config (as each task runs it; resume from the newest last.ckpt / hpc_ckpt is decided at start):)
	@$(PY) -m gmpi_lightning fit --config $(EXP_YAML) --trainer.num_nodes=$(NODES) --trainer.devices=$(or $(GPUS),1) $(ARGS) --print_config
else
	@command -v sbatch >/dev/null || { echo "make slurm: sbatch not found; run this on a SLURM login node" >&2; exit 2; }
	@mkdir -p $(SLURM_LOGS)
	$(SBATCH)
endif

bench: install  ## speed benchmarks (renderer, generator, synthetic data, training iteration) on this machine
	$(PY) benchmarks/bench_render.py
	$(PY) benchmarks/bench_synthetic.py
	$(PY) benchmarks/bench_train.py

BENCH_ARGS ?=
bench-train: install  ## one full training iteration: img/s, s/iter, peak memory, host reads (BENCH_ARGS="--profile")
	$(PY) benchmarks/bench_train.py $(BENCH_ARGS)

# Sweeps: experiments/sweeps/*.yaml in W&B's sweep format (README "Sweeps"). `make sweep` creates the sweep on the
# W&B server (account, `wandb login`, WANDB_MODE=online) and prints its SWEEP_ID; `make agent SWEEP_ID=..` runs COUNT
# of its runs here (one agent per GPU/node). `make sweep-local` runs a grid/random sweep without any server, PARALLEL
# runs at a time, into runs/sweeps/<name>/run-NNN + results.md; ARGS go to `gmpi sweep-local` (--count 8,
# -- --model.max_iters=50 for every run). It checks SWEEP first, then builds the synthetic data and the 2D StyleGAN2
# the synthetic base needs; DRY=1 (= --dry-run) only prints every run's command and builds nothing.
SWEEP    ?= experiments/sweeps/r1_lr.yaml
SWEEP_ID ?=
COUNT    ?= 1
PARALLEL ?= 1
.PHONY: sweep agent sweep-local
wandb_online_check = @case "$(WANDB_MODE)" in offline|disabled|dryrun) \
	echo "make $@: WANDB_MODE=$(WANDB_MODE), but W&B sweeps live on the W&B server: run \`wandb login\`, then add" \
	"WANDB_MODE=online (or, without an account: make sweep-local SWEEP=$(SWEEP))" >&2; exit 2;; esac

sweep: install  ## create a W&B sweep from SWEEP (W&B account; WANDB_MODE=online); prints the SWEEP_ID for `make agent`
	$(wandb_online_check)
	$(VENV)/bin/wandb sweep $(SWEEP)

agent: install  ## run COUNT runs of the W&B sweep SWEEP_ID=entity/project/id on this machine (WANDB_MODE=online)
	@test -n "$(SWEEP_ID)" || { echo "make agent: give SWEEP_ID=entity/project/id (printed by make sweep)" >&2; exit 2; }
	$(wandb_online_check)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(VENV)/bin/wandb agent $(SWEEP_ID) --count $(COUNT)

sweep-local: install  ## run SWEEP here, no W&B server: PARALLEL=N ARGS="--count 8" [DRY=1] -> runs/sweeps/<name>
ifeq ($(strip $(dry)$(findstring --dry-run,$(ARGS))),)
	@$(VENV)/bin/gmpi sweep-local $(SWEEP) --dry-run $(ARGS) >/dev/null  # check the file before building anything
	$(if $(shell grep -l "experiments/synthetic.yaml" $(SWEEP) 2>/dev/null),@$(MAKE) --no-print-directory \
	  $(SYN_DATA)/.ready DATA=$(SYN_DATA))
endif
	$(VENV)/bin/gmpi sweep-local $(SWEEP) --parallel $(PARALLEL)$(if $(dry), --dry-run) $(ARGS)

.PHONY: estimators evaluate ablations
CKPT    ?= $(RUN)/gmpi.pt
METRICS ?= consistency,depth_fd,pose,depth
N       ?= 256
REF     ?= all
# `make ablations DATA=synthetic` (or DATA=ffhq256 ...: the base is experiments/$(DATA).yaml); DATA=data/synthetic*
# (the default DATA) also means the synthetic base
BASES    = $(sort $(basename $(notdir $(wildcard experiments/*.yaml))))
ABL_BASE = $(if $(filter synthetic data/synthetic%,$(DATA)),synthetic,$(if $(wildcard experiments/$(DATA).yaml),$(DATA)))
ABLATE   = $(or $(ABL_BASE),$(error make ablations: DATA=$(DATA) is not a base experiment. Use DATA=synthetic or one \
           of experiments/*.yaml: $(or $(BASES),none)))
SYN_DATA = data/synthetic32

$(SYN_DATA)/.ready: | install
	test -f $(SYN_DATA)/dataset.json || $(VENV)/bin/gmpi data synthetic --out $(SYN_DATA) --num 10000 --resolution 32
	test -f runs/synthetic_stylegan2/stylegan2.pt || $(VENV)/bin/gmpi fit --config experiments/synthetic_stylegan2.yaml
	touch $@

# the estimators learn from the data's ground truth alone: no 2D StyleGAN2 needed
estimators: | install  ## train the small pose/depth CNNs on the synthetic ground truth -> runs/estimators/synthetic32.pt
	test -f $(SYN_DATA)/dataset.json || $(VENV)/bin/gmpi data synthetic --out $(SYN_DATA) --num 10000 --resolution 32
	$(VENV)/bin/gmpi estimators train --data $(SYN_DATA) --out runs/estimators/synthetic32.pt $(ARGS)

evaluate: install  ## evaluate CKPT (default run) on METRICS with N fakes + reference rows REF -> runs/synthetic/eval.json
	@test -f runs/estimators/synthetic32.pt || ! echo "$(METRICS)" | grep -qE "pose|depth" || $(MAKE) --no-print-directory estimators DATA=$(SYN_DATA)
	$(VENV)/bin/gmpi evaluate --ckpt $(CKPT) --data $(SYN_DATA) --metrics $(METRICS) --num-samples $(N) \
		--estimators runs/estimators/synthetic32.pt$(if $(REF), --reference $(REF)) --out $(RUN)/eval.json $(ARGS)

ablations: install  ## DATA=synthetic|ffhq256.. [DRY=1]: train + evaluate experiments/ablations/* -> runs/ablations/<DATA>
	$(if $(and $(filter synthetic,$(ABLATE)),$(if $(dry),,y)),@$(MAKE) --no-print-directory $(SYN_DATA)/.ready \
	  DATA=$(SYN_DATA))
	$(VENV)/bin/gmpi ablations --data $(ABLATE)$(if $(dry), --dry-run) $(ARGS)

# Mutation testing (docs/TESTING.md): mutmut mutates each file of scripts/mutation.py's SELECTION and runs that file's
# fast tests against every mutant; resumable (build/mutation/<module>/ keeps the verdicts). Not part of `make test`.
FILES ?=
JOBS  ?= 1
FRESH ?=
mutation: install  ## mutation testing of the recipe's files [FILES=a.py,b.py] [JOBS=2] [FRESH=1] -> build/mutation/summary.md
	$(PY) scripts/mutation.py $(FILES) --jobs $(JOBS)$(if $(filter 1 yes true,$(FRESH)), --fresh)

lint: install  ## ruff
	$(VENV)/bin/ruff check .

clean:  ## remove caches and build outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache build *.egg-info **/__pycache__
