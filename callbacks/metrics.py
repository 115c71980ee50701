"""Periodic evaluation during training (docs/EVALUATION.md): ``gmpi evaluate``'s code on a few fakes of the EMA
generator, with constant noise (``gmpi evaluate``: random, seeded per fake) and the training planes unless ``planes``.

    trainer:
      callbacks:
        - class_path: callbacks.metrics.EvaluationCallback
          init_args: {every_n_iters: 200, metrics: [consistency, depth_fd], num_samples: 64}

Runs every ``every_n_iters`` GMPI iterations (the module's counter, not ``global_step``; None: never) and at the end
of training. Under DDP every rank renders its share and the results are gathered once; rank 0 logs ``eval/<metric>``
to every logger and appends a line to ``<run>/eval.jsonl``. Inception metrics (fid, kid, pr, is) need the weights
file: a missing one is an error when the callback is made, so ``gmpi fit`` stops before any logger starts.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import lightning.pytorch as pl

from callbacks.media import is_2d, run_dir
from callbacks.schedule import check_every, due
from gmpi_lightning.errors import InputError
from gmpi_lightning.evaluation.evaluate import (
    INCEPTION_METRICS,
    NEEDS_DATA,
    NEEDS_ESTIMATORS,
    evaluate,
    json_safe,
    parse_metrics,
)
from gmpi_lightning.evaluation.fakes import IMAGE_METRICS, FakeSettings, iter_images_2d


class EvaluationCallback(pl.Callback):
    """Evaluates the EMA generator on a schedule (see the module docstring)."""

    def __init__(self, every_n_iters: int | None = 1000, metrics: list[str] | str = "consistency",
                 num_samples: int = 64, planes: int | None = None, truncation: float = 1.0, batch_size: int = 4,
                 data: str | None = None, num_real: int | None = None, inception: str | None = None,
                 estimators: str | None = None, kid_subset_size: int = 1000, at_end: bool = True):
        self.every, self.metrics, self.num_samples = check_every(every_n_iters), parse_metrics(metrics), num_samples
        self.planes, self.truncation, self.batch_size, self.data = planes, truncation, batch_size, data
        self.num_real, self.inception, self.estimators = num_real, inception, estimators
        self.kid_subset_size, self.at_end = kid_subset_size, at_end
        self._last = -1
        if INCEPTION_METRICS & set(self.metrics):  # now, when `gmpi fit` builds its callbacks: before any logger starts
            from gmpi_lightning.evaluation.inception import resolve_weights

            resolve_weights(self.inception)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if is_2d(pl_module) and set(self.metrics) - set(IMAGE_METRICS):
            raise InputError(f"EvaluationCallback: a 2D StyleGAN2 run has images, no 3D: metrics "
                             f"{sorted(set(self.metrics) - set(IMAGE_METRICS))} do not apply; use {IMAGE_METRICS}")
        if self.data is None and NEEDS_DATA & set(self.metrics):
            dm = trainer.datamodule
            self.data = getattr(getattr(dm, "hparams", None), "data", None) if dm is not None else None
            if not isinstance(self.data, str):
                raise InputError(f"EvaluationCallback: metrics {sorted(NEEDS_DATA & set(self.metrics))} need the real "
                                 f"data folder; set init_args.data")
        if NEEDS_ESTIMATORS & set(self.metrics) and isinstance(self.estimators, str) \
                and not Path(self.estimators).is_file():  # fail now, not at the first evaluation
            raise FileNotFoundError(f"EvaluationCallback: metrics pose/depth need the estimator file "
                                    f"{self.estimators}, which is not there: `make estimators` writes "
                                    f"runs/estimators/synthetic32.pt (or drop pose,depth from the metrics)")

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        settings = FakeSettings(planes=self.planes or getattr(pl_module.hparams, "train_planes", 32),
                                truncation=self.truncation, batch_size=self.batch_size, noise_mode="const")
        was_training = pl_module.G_ema.training
        pl_module.G_ema.eval()
        G, source = pl_module.G_ema, None
        if is_2d(pl_module):  # a 2D generator: its images, scored by the image metrics only
            G, source = None, partial(iter_images_2d, pl_module.G_ema, pl_module.preset)
        try:
            result = evaluate(G, pl_module.preset, self.metrics, self.num_samples, self.data,
                              settings, self.inception, self.num_real, kid_subset_size=self.kid_subset_size,
                              estimators=self.estimators, device=pl_module.device, show_progress=False,
                              source=source)
        finally:
            pl_module.G_ema.train(was_training)
        self._last = pl_module.iteration
        if trainer.is_global_zero:
            values = {f"eval/{k}": float(v) for k, v in result["metrics"].items()}
            values["eval/iteration"] = float(pl_module.iteration)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)
            out = run_dir(trainer) / "eval.jsonl"  # not trainer.log_dir: a collective, and only rank 0 is here
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(out, "a") as f:
                line = {"iteration": pl_module.iteration, "kimg": pl_module.nimg / 1000, **result}
                f.write(json.dumps(json_safe(line), allow_nan=False) + "\n")
        return result

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        it = pl_module.iteration
        if due(self.every, it) and it != self._last:
            self.run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end and pl_module.iteration != self._last:
            self.run(trainer, pl_module)
