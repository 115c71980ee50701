"""``PosedImageDataModule``: WebDataset shards of posed images for training (:class:`TrainStream`) and evaluation
(a finite pass reading every sample exactly once across ranks and workers). Batches: see :mod:`gmpi_lightning.data`.
"""

from __future__ import annotations

import itertools
import os
import zlib
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds

from gmpi_lightning.data import collate, decode_sample, eval_loader, resolve_shards

# Mirror of the world about x = 0 and of the camera's x axis: w2c' = S w2c S keeps a proper rotation.
_MIRROR = np.diag([-1.0, 1.0, 1.0, 1.0]).astype(np.float32)


def mirror_w2c(w2c: np.ndarray) -> np.ndarray:
    """Pose of the horizontally flipped image: the camera mirrored about the plane x = 0 (yaw -> -yaw)."""
    return _MIRROR @ w2c @ _MIRROR


def xflip(s: dict) -> dict:
    """The sample mirrored: image (and depth, mask) flipped left-right, pose mirrored (yaw -> -yaw)."""
    flipped = {k: s[k][:, ::-1].copy() for k in ("image", "depth", "mask") if k in s}
    return dict(s, **flipped, w2c=mirror_w2c(s["w2c"]), yaw=-s["yaw"])


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's training stream: epochs of ``batches_per_epoch`` batches (the same on every rank, so DDP never waits
    on uneven data) from the rank's own shards (with fewer shards than ranks, its own share of the samples: ranks
    never share a real), resampled with replacement, shuffled, optionally x-flipped (p = 0.5).

    Every random choice is a function of (seed, rank, worker, epoch); ``start_batch`` skips the batches a run already
    used, undecoded, so a resumed run sees exactly the uninterrupted run's batches. Batch j of a rank comes from
    loader worker j % num_workers (the DataLoader's in-order round robin).
    """

    def __init__(self, urls: list[str], batch_size: int, batches_per_epoch: int, shuffle_buffer: int, xflip: bool,
                 seed: int | None, rank: int = 0, world: int = 1, start_batch: int = 0):
        super().__init__()
        self.keep_share = world > 1 and len(urls) < world  # too few shards to split: split the samples by key
        self.urls = urls if world == 1 or self.keep_share else urls[rank::world]
        self.batch_size, self.batches_per_epoch, self.shuffle_buffer = batch_size, batches_per_epoch, shuffle_buffer
        self.xflip, self.seed, self.rank, self.world = xflip, seed, rank, world
        self.epoch, self.skip = divmod(start_batch, batches_per_epoch)

    def _keep(self, sample: dict) -> bool:
        return zlib.crc32(sample["__key__"].encode()) % self.world == self.rank

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        done = len(range(worker, self.skip, workers))  # this worker's batches of the epoch used before a resume
        count = len(range(worker, self.batches_per_epoch, workers)) - done
        epoch, skip = self.epoch, done * self.batch_size
        self.epoch, self.skip = self.epoch + 1, 0  # the next call is the next epoch (persistent workers keep this)
        seed = None if self.seed is None else wds.utils.make_seed(self.seed, self.rank, worker, epoch)
        shards = wds.ResampledShards(self.urls, seed=seed or 0, deterministic=seed is not None)
        shards.epoch = epoch - 1  # it counts its epochs from here
        samples = wds.tarfile_to_samples()(iter(shards))
        if self.keep_share:
            samples = filter(self._keep, samples)
        samples = wds.filters._shuffle(samples, self.shuffle_buffer, seed=seed)
        flips = np.random.default_rng(seed)
        samples = ((s, self.xflip and flips.random() < 0.5) for s in samples)  # drawn before the resume skip
        batch = []
        for raw, flip in itertools.islice(samples, skip, None):
            if count == 0:
                return
            s = decode_sample(raw)
            batch.append(xflip(s) if flip else s)
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch, count = [], count - 1


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
        self.batch_size, self.batches_per_epoch, self.num_workers = batch_size, batches_per_epoch, num_workers
        self.shuffle_buffer, self.xflip, self.seed = shuffle_buffer, xflip, seed
        self.eval_batch_size, self.train_batches_used = eval_batch_size or batch_size, 0

    def _export_rank(self) -> tuple[int, int]:
        """(rank, world size), exported for WebDataset: ddp_spawn workers see neither torch.distributed nor RANK."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        if trainer.world_size > 1:
            os.environ["RANK"], os.environ["WORLD_SIZE"] = str(trainer.global_rank), str(trainer.world_size)
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self):
        rank, world = self._export_rank()
        stream = TrainStream(self.urls, self.batch_size, self.batches_per_epoch, self.shuffle_buffer, self.xflip,
                             self.seed, rank, world, start_batch=self.train_batches_used)
        return wds.WebLoader(stream, batch_size=None, num_workers=self.num_workers,
                             persistent_workers=self.num_workers > 0)

    # The position in the training stream, saved in checkpoints so that a resumed run continues it.
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training:
            self.train_batches_used += 1
        return batch

    def state_dict(self) -> dict:
        return {"train_batches_used": self.train_batches_used}

    def load_state_dict(self, state: dict) -> None:
        self.train_batches_used = int(state.get("train_batches_used", 0))

    def eval_dataloader(self):
        """Every sample once; limit with Trainer(limit_val_batches=N): the pass is finite and has no length."""
        self._export_rank()
        return eval_loader(self.urls, self.eval_batch_size, self.num_workers)

    val_dataloader = test_dataloader = eval_dataloader


def write_preview(folder: str | Path, n: int = 8, path: str | Path | None = None) -> Path:
    """A grid PNG of the first n samples: RGB, and colour-mapped depth beside it where the shards have it."""
    from gmpi_lightning.export import depth_to_color, save_png
    from gmpi_lightning.presets import PRESETS, get_preset

    dm = PosedImageDataModule(str(folder), batch_size=n, num_workers=0, eval_batch_size=n)
    batch = next(iter(dm.eval_dataloader()))
    preset = get_preset(dm.card["preset"]) if dm.card and dm.card["preset"] in PRESETS else None
    tiles = []
    for i in range(batch["image"].shape[0]):
        rgb = ((batch["image"][i].permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()
        if "depth" in batch and preset is not None:
            rgb = np.concatenate([rgb, depth_to_color(batch["depth"][i], preset.near, preset.far)], axis=1)
        tiles.append(rgb)
    tiles += [np.zeros_like(tiles[0])] * (-len(tiles) % 4)  # rows of 4
    rows = [np.concatenate(tiles[r:r + 4], axis=1) for r in range(0, len(tiles), 4)]
    return save_png(path or Path(folder) / "preview.png", np.concatenate(rows, axis=0))
