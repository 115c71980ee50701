"""Every output of a training run under its root, ``trainer.default_root_dir``, so that one flag moves a whole run
(``gmpi fit --config experiments/ffhq256.yaml --trainer.default_root_dir=/scratch/ffhq256``). An output path the
config leaves out follows the run root (ROOT); one that is spelled out is used as given:

* a logger's ``save_dir`` left out of a :class:`RunCSVLogger` (Lightning's CSVLogger requires one) or left at
  Lightning's default ``"."`` (WandbLogger, TensorBoardLogger) -> ROOT;
* the ``dirpath`` of ``callbacks.checkpoint.IterationCheckpoint`` -> ROOT/checkpoints (not Lightning's versioned
  logger folder, so ``--ckpt_path last`` finds the run's last.ckpt after a restart);
* ``model.export_path`` given as a bare file name (``gmpi.pt``) -> ROOT/gmpi.pt.

Media and evaluation files already follow the first logger's folder. :func:`fill_run_paths` is applied by ``gmpi fit``
before anything is instantiated and by :mod:`gmpi_lightning.runs` wherever it reads a run's paths.
"""

from __future__ import annotations

import os

from lightning.pytorch.loggers import CSVLogger

CHECKPOINT_CALLBACKS = ("callbacks.checkpoint.IterationCheckpoint",)


class RunCSVLogger(CSVLogger):
    """Lightning's CSVLogger with ``save_dir`` optional: left out, ``gmpi fit`` puts it at the run root (alone, in
    Python, it is the working directory, as Lightning's own default loggers)."""

    def __init__(self, save_dir: str | None = None, name: str | None = "csv", version: int | str | None = None,
                 prefix: str = "", flush_logs_every_n_steps: int = 100):
        super().__init__(save_dir if save_dir is not None else ".", name, version, prefix, flush_logs_every_n_steps)


def entries(value) -> list:
    """The class_path entries of a config's logger or callbacks value (one, a list, or none: None, a bool)."""
    if value is None or isinstance(value, (bool, str)):
        return []
    return [value] if hasattr(value, "get") else [v for v in value if hasattr(v, "get")]


def _args(entry):
    args = entry.get("init_args")
    if args is None:
        entry["init_args"] = args = {}
    return args


def fill_run_paths(cfg):
    """Fill the output paths ``cfg`` (a resolved fit config: a dict or jsonargparse Namespace, changed in place)
    leaves out, from its ``trainer.default_root_dir`` (module docstring). Returns ``cfg``."""
    trainer = cfg.get("trainer")
    if trainer is None:
        return cfg
    root = str(trainer.get("default_root_dir") or ".")
    for entry in entries(trainer.get("logger")):
        if _args(entry).get("save_dir") in (None, "", "."):
            _args(entry)["save_dir"] = root
    for entry in entries(trainer.get("callbacks")):
        if str(entry.get("class_path")) in CHECKPOINT_CALLBACKS and not _args(entry).get("dirpath"):
            _args(entry)["dirpath"] = os.path.join(root, "checkpoints")
    model = cfg.get("model")
    if hasattr(model, "get"):  # a dict or Namespace, not None
        model = model.get("init_args") if model.get("class_path") and model.get("init_args") is not None else model
        export = model.get("export_path")
        if export and os.path.basename(str(export)) == str(export):
            model["export_path"] = os.path.join(root, str(export))
    return cfg
