"""How long will a training pipeline take on *this* machine? A few timed iterations of each stage, scaled up.

    python benchmarks/estimate_time.py --data-images 10000 --config experiments/synthetic_stylegan2.yaml \\
        --config experiments/synthetic.yaml

(``make train`` runs this first.) For each ``--config`` (one training stage: its model, batch size and
``max_iters``), the same model is built and trained for ``warmup + iters`` iterations on 64 synthetic images of the
stage's resolution, without callbacks or loggers, and the median seconds per iteration is multiplied by
``max_iters``; a GMPI stage that starts from a 2D prior not yet trained is built from scratch with the prior's
architecture (same cost). ``--data-images N`` adds the synthetic data step (64 images timed). The periodic
callbacks (media, evaluation) are not timed: add about 10 %. Machines of the same kind differ by up to 3x, which is
why this measures instead of quoting.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def _model_args(cfg: dict) -> tuple[str, dict]:
    from gmpi_lightning import runs

    model = cfg.get("model") or {}
    cls = model.get("class_path", "gmpi_lightning.module.GMPIModule")
    args = dict(runs.init_args(cfg, "model"))
    return cls, args


def time_stage(config: str, data: Path, iters: int, warmup: int, prior_arch: dict | None) -> dict:
    """Seconds per iteration of one stage (median of ``iters`` after ``warmup``) and its planned length."""
    import lightning.pytorch as pl
    import torch
    from profiling import IterationProbe  # benchmarks/profiling.py, beside this script

    from datamodules.posed_images import PosedImageDataModule
    from gmpi_lightning import module as modules
    from gmpi_lightning import runs

    cfg = runs.resolve(["--config", config])
    cls_path, args = _model_args(cfg)
    planned = int(args.get("max_iters") or 0)
    init = args.get("init_from")
    if init and not Path(init).is_file():  # the prior is made by an earlier stage: same architecture, no weights
        args["init_from"] = None
        args["arch"] = {**(args.get("arch") or {}), **{k: v for k, v in (prior_arch or {}).items() if v is not None}}
    module, _, name = cls_path.rpartition(".")
    if module != modules.__name__ or not isinstance(getattr(modules, name, None), type):
        raise SystemExit(f"{config}: model.class_path {cls_path!r} is not a module of {modules.__name__}")
    model = getattr(modules, name)(**{**args, "max_iters": warmup + iters, "export_path": None})
    probe = IterationProbe(skip=warmup)
    dm_args = runs.init_args(cfg, "data")
    trainer = pl.Trainer(accelerator=cfg["trainer"].get("accelerator") or "auto", devices=1,
                         precision=cfg["trainer"].get("precision") or "32-true", max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[probe],
                         default_root_dir=tempfile.mkdtemp())
    dm = PosedImageDataModule(str(data), batch_size=dm_args.get("batch_size", 8), batches_per_epoch=1000,
                              num_workers=min(1, dm_args.get("num_workers") or 0), seed=0, shuffle_buffer=64)
    torch.manual_seed(0)
    trainer.fit(model, dm)
    secs = sorted(probe.seconds)
    per_iter = secs[len(secs) // 2]
    arch = dict(args.get("arch") or {})
    return {"config": config, "s_per_iter": per_iter, "iterations": planned, "seconds": per_iter * planned,
            "arch": arch}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", action="append", required=True, help="one training stage (repeat, in order)")
    ap.add_argument("--data-images", type=int, default=0, help="also time writing this many synthetic images")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args(argv)
    import logging
    import warnings

    import torch

    from datamodules.converters import convert_synthetic

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    lines, total = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        convert_synthetic(Path(tmp) / "warmup", num=8, resolution=args.resolution, seed=1, samples_per_shard=8)
        t = time.perf_counter()
        convert_synthetic(data, num=64, resolution=args.resolution, seed=0, samples_per_shard=32)
        if args.data_images:
            s = (time.perf_counter() - t) * args.data_images / 64
            lines.append(f"  synthetic data, {args.data_images} images: {s / 60:.1f} min")
            total += s
        prior = None
        for config in args.config:
            r = time_stage(config, data, args.iters, args.warmup, prior)
            prior = prior or r["arch"]
            lines.append(f"  {config}: {r['iterations']} iterations x {r['s_per_iter']:.3f} s = "
                         f"{r['seconds'] / 60:.1f} min")
            total += r["seconds"]
    print(f"estimated time on this machine ({torch.get_num_threads()} threads; measured in "
          f"{time.perf_counter() - t0:.0f} s):", *lines, f"  total: about {total / 60:.0f} min, "
          f"{total / 60 * 1.1:.0f} min with the callbacks (+10 %)", sep="\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
