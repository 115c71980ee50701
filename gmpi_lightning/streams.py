"""Per-rank random streams (docs/TRAINING.md): every random draw of a training iteration comes from one
``torch.Generator`` per rank on the rank's device, seeded ``seed * world_size + rank`` (StyleGAN2-ADA's convention;
``seed`` is ``seed_everything``'s). Checkpoints keep every rank's stream; a run resumed on another number of processes
starts new streams seeded with the iteration too (with a warning).
"""

from __future__ import annotations

import os

import torch
from lightning.pytorch.utilities import rank_zero_warn

VALIDATION_STREAM = 7_919  # validation batches draw from their own generators, never from the training stream


def run_seed() -> int:
    """seed_everything's seed, else this process's initial seed."""
    seed = os.environ.get("PL_GLOBAL_SEED")
    return int(seed) if seed is not None else torch.initial_seed() % 2**31


def world_rank(trainer) -> tuple[int, int]:
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


def gather_per_rank(trainer, state: torch.Tensor, device) -> torch.Tensor:
    """Every rank's copy of a 1-d ``state`` (world x n, on the CPU); a collective under DDP."""
    if trainer is None or trainer.world_size == 1:
        return state[None]
    return trainer.strategy.all_gather(state.to(device)).reshape(trainer.world_size, -1).cpu()


class RankStreams:
    """This rank's training stream, created on first use on the module's device."""

    def __init__(self):
        self._gen: torch.Generator | None = None
        self._pending: torch.Tensor | None = None  # a resumed state, applied when the generator is made

    def rank_seed(self, trainer) -> int:
        world, rank = world_rank(trainer)
        return run_seed() * world + rank

    def generator(self, device, trainer, iteration: int) -> torch.Generator:
        if self._gen is None or self._gen.device != device:
            self._gen = torch.Generator(device)
            self._gen.manual_seed(self.rank_seed(trainer) + 1_000_003 * iteration)  # iteration > 0: a changed world
            if self._pending is not None:
                self._gen.set_state(self._pending)
                self._pending = None
        return self._gen

    def state(self, device, trainer, iteration: int) -> dict:
        """Every rank's stream (a collective: checkpoints are saved on every rank)."""
        return {"device_type": device.type,
                "states": gather_per_rank(trainer, self.generator(device, trainer, iteration).get_state(), device)}

    def load(self, saved: dict | None, trainer, device_type: str) -> None:
        """Continue this rank's saved stream, or start anew (with a warning) when the run's shape changed."""
        world, rank = world_rank(trainer)
        if saved and len(saved["states"]) == world and saved["device_type"] == device_type:
            self._pending = saved["states"][rank].clone()
        else:
            rank_zero_warn(f"the checkpoint's random streams were saved by {len(saved['states']) if saved else 0} "
                           f"{saved['device_type'] if saved else ''} processes, this run has {world} on "
                           f"{device_type}: every rank starts a new stream, seeded with the iteration too (the run "
                           f"goes on, but not bit-identically)")
            self._pending = None
        self._gen = None

    def validation(self, device, trainer, batch_idx: int) -> torch.Generator:
        """A generator of its own for validation batch ``batch_idx``: validating does not move the training stream."""
        g = torch.Generator(device)
        g.manual_seed(self.rank_seed(trainer) * VALIDATION_STREAM + batch_idx)
        return g
