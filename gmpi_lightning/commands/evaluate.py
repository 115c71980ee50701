"""``gmpi evaluate``: every metric of a generator checkpoint in one pass over seeded fakes, written to JSON; under
``torchrun --nproc_per_node=N -m gmpi_lightning evaluate ...`` every rank renders its share of the seeds and rank 0
prints and writes the JSON (docs/EVALUATION.md)."""

from __future__ import annotations

import datetime
import json
import os
import sys
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist

from ..errors import InputError
from ..evaluation.evaluate import ALL_METRICS, default_inputs, evaluate, evaluate_references, json_safe, parse_metrics
from ..evaluation.fakes import FakeSettings
from ..evaluation.image_metrics import rank_world
from ..evaluation.inception import INCEPTION_FILE
from ..evaluation.reference import load_truth, parse_kinds
from ..inference import load_generator
from . import default_device, invocation


def init_distributed(device: str) -> str:
    """Under torchrun (WORLD_SIZE > 1) join the process group: gloo on CPU, NCCL with one GPU per rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def evaluate_command(ckpt: str, metrics: str = "consistency", data: str | None = None, num_samples: int = 1000,
                     num_real: int | None = None, planes: int = 96, truncation: float = 1.0,
                     noise_mode: Literal["random", "const", "none"] = "random", resolution: int | None = None,
                     batch_size: int = 4, plane_chunk: int | None = None, first_seed: int = 0,
                     inception: str | None = None, kid_subsets: int = 100, kid_subset_size: int = 1000,
                     estimators: str | None = None, cache_dir: str | None = None, no_cache: bool = False,
                     reference: str | None = None, config: str | None = None, preset: str | None = None,
                     device: str | None = None, out: str | None = None) -> int:
    """FID/KID, precision/recall, IS, 3D consistency, depth FD, pose/depth error, est_fd of a checkpoint -> JSON.

    Args:
        ckpt: our checkpoint (.pt or a training .ckpt), an official generator.pth/ema.pth, or a StyleGAN2 .pkl.
        metrics: comma-separated metrics (ALL_LIST) or all.
        data: real data (a `gmpi data` folder): needed by fid, kid, pr, depth_fd, est_fd (default: the shards the
            checkpoint was trained on, where it records them).
        num_samples: fakes (paper: 50000 for FID/KID, 1024 for 3D).
        num_real: real images for FID/KID/PR (default: all, as fid50k_full).
        planes: planes at inference (paper: 96).
        truncation: truncation psi (paper: 1.0).
        noise_mode: the generator's noise (random: seeded by each fake's seed).
        resolution: render resolution (default: the generator's).
        batch_size: fakes per batch.
        plane_chunk: generate/warp this many planes at a time (memory).
        first_seed: seed of the first fake.
        inception: local INCEPTION_FILE (or $GMPI_INCEPTION_WEIGHTS).
        kid_subsets: KID subsets.
        kid_subset_size: images per KID subset.
        estimators: estimator file for pose/depth/est_fd (default: runs/estimators/<data folder>.pt when it exists).
        cache_dir: real-feature cache (default $GMPI_CACHE or ~/.cache/gmpi-lightning).
        no_cache: recompute the real features.
        reference: also score reference rows on data with a renderable ground truth (the synthetic heads): a
            comma-separated list of renders, mpi, billboard, card_front, card_center, card_back, mpi_blur, or all.
        config: official runs: config.pth or JSON with the generator kwargs.
        preset: camera/plane preset (default: stored in the checkpoint, else by resolution).
        device: cuda or cpu (default: cuda when available).
        out: JSON file for the results (default: print only).
    """
    metrics, kinds = parse_metrics(metrics), parse_kinds(reference)
    device = init_distributed(device or default_device())
    rank, world = rank_world()
    log = print if rank == 0 else (lambda *a, **k: None)
    loaded = load_generator(ckpt, config, preset, device)
    data, estimators = default_inputs(metrics, data, estimators, loaded.training_data, log)
    truth_data = (data or loaded.training_data) if kinds else None
    if kinds and not truth_data:  # checked before the generator's evaluation, not after it
        raise InputError("--reference renders the data's ground truth: pass --data (a `gmpi data synthetic` folder)")
    if truth_data:
        load_truth(truth_data)  # refuses data whose ground truth cannot be rendered, naming its source
    settings = FakeSettings(planes=planes, truncation=truncation, noise_mode=noise_mode, resolution=resolution,
                            batch_size=batch_size, plane_chunk=plane_chunk)
    log(f"{loaded.kind} generator {loaded.source} | preset {loaded.preset.name} | metrics {','.join(metrics)} | "
        f"{num_samples} fakes, {settings.planes} planes, psi {settings.truncation}"
        f"{f' | {world} processes' if world > 1 else ''}", flush=True)
    try:
        result = evaluate(loaded.G, loaded.preset, metrics, num_samples, data, settings, inception, num_real,
                          kid_subsets, kid_subset_size, estimators, cache_dir, not no_cache, device, first_seed)
        if kinds:
            result["reference"] = evaluate_references(kinds, truth_data, loaded.preset, metrics, num_samples,
                                                      settings, estimators, device, first_seed)
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank != 0:
        return 0
    result = {"checkpoint": str(ckpt), "generator_kind": loaded.kind, "preset": loaded.preset.to_dict(),
              "data": data, **result, "command": invocation() or "evaluate() from Python",
              "date": datetime.datetime.now().isoformat(timespec="seconds")}
    rows = {"generator": result["metrics"], **{k: v["metrics"] for k, v in result.get("reference", {}).items()}}
    print(f"  {'':24s} " + " ".join(f"{k:>11s}" for k in rows))
    for name in result["metrics"]:
        print(f"  {name:24s} " + " ".join(f"{r[name]:11.5g}" if name in r else f"{'-':>11s}" for r in rows.values()))
    for w in result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(json_safe(result), indent=2, allow_nan=False))
        print(f"wrote {out}")
    return 0


evaluate_command.__doc__ = evaluate_command.__doc__.replace("ALL_LIST", ", ".join(ALL_METRICS)).replace(
    "INCEPTION_FILE", INCEPTION_FILE)
