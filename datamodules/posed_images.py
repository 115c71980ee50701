"""``PosedImageDataModule``: WebDataset shards of posed images for training and evaluation.

Training: an infinite resampled stream (shards drawn with replacement, per-rank/worker streams),
shuffled, decoded and batched in the workers; ``WebLoader(...).with_epoch(n)`` makes every rank
yield exactly ``n`` batches per epoch, so DDP never hangs on uneven data. Evaluation: a finite pass
that reads every sample exactly once across ranks and workers (shards split by node, then worker).

A batch is a dict: ``image`` float32 B x 3 x R x R in [-1, 1], ``w2c`` B x 16 (flattened row-major,
the discriminator's pose condition), ``yaw``/``pitch`` B, ``key`` (list), plus ``depth`` B x 1 x R x R and
``mask`` B x 1 x R x R when the shards carry ground truth.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import lightning.pytorch as pl
import numpy as np
import webdataset as wds

from gmpi_lightning.data import collate, decode_sample, eval_loader, read_samples, resolve_shards  # noqa: F401

# Mirror of the world about x = 0 and of the camera's x axis: w2c' = S w2c S keeps a proper rotation.
_MIRROR = np.diag([-1.0, 1.0, 1.0, 1.0]).astype(np.float32)


def mirror_w2c(w2c: np.ndarray) -> np.ndarray:
    """Pose of the horizontally flipped image: the camera mirrored about the plane x = 0 (yaw -> -yaw)."""
    return _MIRROR @ w2c @ _MIRROR


class RandomXFlip:
    """Mirror image and pose together with probability p (GMPI trains without flips: off by default)."""

    def __init__(self, p: float = 0.5, seed: int | None = None):
        self.p, self.rng = p, np.random.default_rng(seed)

    def __call__(self, s: dict) -> dict:
        if self.rng.random() >= self.p:
            return s
        s = dict(s, image=s["image"][:, ::-1].copy(), w2c=mirror_w2c(s["w2c"]), yaw=-s["yaw"])
        for k in ("depth", "mask"):
            if k in s:
                s[k] = s[k][:, ::-1].copy()
        return s


def _shuffle_seed(seed: int | None) -> int | None:
    """Per-rank shuffle seed (workers differ through their resampled shard streams); None: random."""
    if seed is None:
        return None
    return seed * 1_000_003 + wds.utils.pytorch_worker_info()[0]


class PosedImageDataModule(pl.LightningDataModule):
    """Posed-image shards for GMPI.

    Args:
        data: a folder written by ``gmpi data`` (reads its dataset.json), a brace pattern or a list of shard URLs.
        batch_size: per device.
        batches_per_epoch: training batches every rank yields per epoch.
        num_workers: loader workers per rank.
        shuffle_buffer: samples in the shuffle buffer of each worker.
        xflip: mirror images and poses with probability 0.5 (off, as GMPI).
        seed: seed the shard resampling and shuffles for reproducible runs (None: random).
    """

    def __init__(self, data: str | list[str], batch_size: int = 8, batches_per_epoch: int = 1000,
                 num_workers: int = 2, shuffle_buffer: int = 1000, xflip: bool = False, seed: int | None = None,
                 eval_batch_size: int | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.urls, self.card = resolve_shards(data)
        self.resolution = self.card["resolution"] if self.card else None
        self.batch_size, self.batches_per_epoch = batch_size, batches_per_epoch
        self.num_workers, self.shuffle_buffer = num_workers, shuffle_buffer
        self.xflip, self.seed = xflip, seed
        self.eval_batch_size = eval_batch_size or batch_size

    def _export_rank(self) -> None:
        """ddp_spawn workers see neither torch.distributed nor RANK: give WebDataset the rank explicitly."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.world_size > 1:
            os.environ["RANK"], os.environ["WORLD_SIZE"] = str(trainer.global_rank), str(trainer.world_size)

    def train_dataset(self):
        seed = self.seed
        shards = wds.ResampledShards(self.urls, seed=seed or 0, deterministic=seed is not None)
        stages = [shards, wds.tarfile_to_samples(), wds.shuffle(self.shuffle_buffer, seed=_shuffle_seed(seed)),
                  wds.map(decode_sample)]
        if self.xflip:
            stages.append(wds.map(RandomXFlip(seed=seed)))
        stages.append(wds.batched(self.batch_size, collation_fn=collate, partial=False))
        return wds.DataPipeline(*stages)

    def train_dataloader(self):
        self._export_rank()
        loader = wds.WebLoader(self.train_dataset(), batch_size=None, num_workers=self.num_workers,
                               persistent_workers=self.num_workers > 0)
        return loader.with_epoch(self.batches_per_epoch)

    def eval_dataset(self):
        """Every sample exactly once across ranks (split by node) and workers (split by worker)."""
        return read_samples(self.urls, self.eval_batch_size, split=True)

    def eval_dataloader(self):
        self._export_rank()
        return eval_loader(self.urls, self.eval_batch_size, self.num_workers)

    def iter_eval(self) -> Iterator[dict]:
        yield from self.eval_dataloader()

    def val_dataloader(self):  # limit with Trainer(limit_val_batches=N): the pass is finite and has no length
        return self.eval_dataloader()

    def test_dataloader(self):
        return self.eval_dataloader()
