"""A callback for the 2-process DDP test: each rank writes every image its discriminator saw, the keys of its reals,
its final weights and its augmentation probability."""

from pathlib import Path

import lightning.pytorch as pl
import torch


class RankReport(pl.Callback):
    def __init__(self, out: str):
        self.out, self.keys, self.seen = Path(out), [], []

    def on_fit_start(self, trainer, pl_module):
        # every D call of a training iteration: reals, the D step's fakes, the candidate views, the G step's fakes
        pl_module.D.register_forward_pre_hook(lambda m, args: self.seen.append(args[0].detach().flatten(1).clone())
                                              if pl_module.trainer.training else None)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.keys += list(batch["key"])

    def on_train_end(self, trainer, pl_module):
        torch.save({"rank": trainer.global_rank, "world": trainer.world_size, "keys": self.keys,
                    "iteration": pl_module.iteration, "seen": torch.cat(self.seen),
                    "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "augment_p": None if pl_module.ada is None else pl_module.ada.p.detach().clone()},
                   self.out / f"rank{trainer.global_rank}.pt")
