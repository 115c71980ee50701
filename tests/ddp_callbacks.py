"""A callback for the 2-process DDP test: each rank writes what it saw and a fingerprint of its weights."""

import json
from pathlib import Path

import lightning.pytorch as pl


class RankReport(pl.Callback):
    def __init__(self, out: str):
        self.out, self.keys = Path(out), []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += list(batch["key"])

    def on_train_end(self, trainer, pl_module):
        report = {"rank": trainer.global_rank, "world": trainer.world_size, "keys": self.keys,
                  "iteration": pl_module.iteration,
                  "G": [float(p.double().sum()) for p in pl_module.G.parameters()],
                  "D": [float(p.double().sum()) for p in pl_module.D.parameters()],
                  "G_ema": [float(p.double().sum()) for p in pl_module.G_ema.parameters()]}
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))
