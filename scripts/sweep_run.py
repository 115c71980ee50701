#!/usr/bin/env python
"""``python scripts/sweep_run.py fit --config experiments/synthetic.yaml --model.optim.lr=0.002``: the ``program:``
of the sweep files in experiments/sweeps/, and the same entry point as their ``command`` (``python -m
gmpi_lightning.sweeps fit ...``): ``gmpi fit``, plus under ``wandb agent`` the run's own folder
(runs/sweeps/wandb-<sweep>/<run>) and an online WandbLogger. Run it from the repository root (config paths are
relative to it)."""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # gmpi_lightning, callbacks, datamodules
    from gmpi_lightning.sweeps import agent_main

    sys.exit(agent_main(sys.argv[1:]))
