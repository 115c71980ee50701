"""Checkpoints on the GMPI iteration counter (docs/TRAINING.md). Lightning's ``every_n_train_steps`` counts optimiser
steps: two per iteration (D and G) and none for a step skipped as non-finite, so saves would drift.

    - class_path: callbacks.checkpoint.IterationCheckpoint
      init_args: {dirpath: runs/x/checkpoints, every_n_iters: 400, save_last: true, save_top_k: -1}
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from callbacks.schedule import check_every, due
from gmpi_lightning.errors import InputError


class IterationCheckpoint(ModelCheckpoint):
    """Saves after every ``every_n_iters``-th iteration of the module's ``iteration`` and after the last (``max_iters``)
    as ``it<iteration, 6 digits>.ckpt`` (plus ``last.ckpt`` with ``save_last``); other ModelCheckpoint options apply."""

    def __init__(self, every_n_iters: int | None = None, filename: str | None = "it{iteration:06d}",
                 auto_insert_metric_name: bool = False, **kwargs):
        check_every(every_n_iters)
        for k in ("every_n_train_steps", "train_time_interval"):
            if kwargs.get(k):
                raise InputError(f"IterationCheckpoint counts iterations: use every_n_iters, not {k}")
        if kwargs.get("every_n_epochs") is None:  # None (also LightningCLI's default) would mean every epoch
            kwargs["every_n_epochs"] = 0  # epochs of a resampled stream mean nothing
        super().__init__(filename=filename, auto_insert_metric_name=auto_insert_metric_name, **kwargs)
        self.every_n_iters = every_n_iters
        self._last_iteration_saved: int | None = None

    def _monitor_candidates(self, trainer) -> dict:
        candidates = super()._monitor_candidates(trainer)
        candidates["iteration"] = torch.tensor(int(trainer.lightning_module.iteration))
        return candidates

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        it = int(pl_module.iteration)
        due_now = due(self.every_n_iters, it) or it >= pl_module.hparams.max_iters
        if not due_now or it == 0 or it == self._last_iteration_saved or self._should_skip_saving_checkpoint(trainer):
            return
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        self._last_iteration_saved = it
