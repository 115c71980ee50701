"""Training entry point: LightningCLI with the GAN-specific defaults (``gmpi fit|validate|test``; runbook in
docs/TRAINING.md). With more than one device the default strategy is DDP with ``find_unused_parameters`` (the G step
leaves D without gradients and vice versa) and rank-local buffers (``broadcast_buffers=False``), as the official code.
"""

from __future__ import annotations

from jsonargparse import capture_parser
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import DDPStrategy

from datamodules.posed_images import PosedImageDataModule

from . import lock
from .errors import USER_ERRORS
from .hparams import migrate_argv
from .module import GANModule
from .run_paths import fill_run_paths


class GMPICLI(LightningCLI):
    """``model:`` takes the init args of GMPIModule directly (the default class), or ``class_path:`` another
    GANModule (``gmpi_lightning.module.StyleGAN2Module`` for 2D pretraining) with its ``init_args``."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.set_defaults({"model": {"class_path": "gmpi_lightning.module.GMPIModule"}})

    def _parse_ckpt_path(self) -> None:
        """Resuming keeps the run's YAML/CLI configuration (LightningCLI would overwrite it with the hparams saved
        in the checkpoint), so that e.g. ``--model.max_iters`` can extend a finished run."""

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg["trainer"]
        devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
        many = nodes > 1 or (isinstance(devices, int) and devices > 1) or (isinstance(devices, str) and
                                                                             devices not in ("auto", "1"))
        if trainer.get("strategy") in (None, "auto") and many:
            trainer["strategy"] = DDPStrategy(find_unused_parameters=True, broadcast_buffers=False)
        fill_run_paths(cfg)  # outputs the config leaves out go under trainer.default_root_dir (run_paths.py)
        if self.subcommand == "fit" and trainer.get("default_root_dir"):
            lock.acquire(trainer["default_root_dir"])  # one live run per run folder (lock.py)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:  # jsonargparse wraps what a constructor raised: a user's error keeps its own message
            cause = e
            while cause is not None and not isinstance(cause, USER_ERRORS):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            raise cause from None
        self.model.run_config = self.parser.dump(self.config, skip_none=False, skip_check=True)  # into checkpoints


def run_lightning_cli(argv: list[str] | None, **parser_kwargs) -> GMPICLI:
    """``gmpi fit|validate|test ARGV`` (flat model names of older configs nested, with a deprecation notice)."""
    return GMPICLI(GANModule, PosedImageDataModule, subclass_mode_model=True,
                   args=None if argv is None else migrate_argv(argv), save_config_kwargs={"overwrite": True},
                   trainer_defaults={"max_epochs": -1, "log_every_n_steps": 10, "num_sanity_val_steps": 0},
                   parser_kwargs={"default_env": True, **parser_kwargs})


def fit_parser():
    """The parser of ``gmpi fit|validate|test`` exactly as above, built without parsing or instantiating anything;
    a bad argument raises ``argparse.ArgumentError``. Sweeps, ablations and resume resolve every run with it."""
    return capture_parser(run_lightning_cli, None, exit_on_error=False)
