"""What the inversion and camera benchmarks share: their common flags, and the held-out heads' renderer and the
checkpoint they read (bench_invert.py, bench_poses.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from datamodules.synthetic import SyntheticConfig
from gmpi_lightning.inference import load_gmpi


def add_common_flags(ap: argparse.ArgumentParser, what: str) -> None:
    """--ckpt, --data, --estimators (the script's own flags follow, then :func:`add_run_flags`)."""
    ap.add_argument("--ckpt", default="runs/synthetic/gmpi.pt")
    ap.add_argument("--data", default="data/synthetic32", help="its dataset.json says which heads are held out")
    ap.add_argument("--estimators", help=f"pose estimator (default runs/estimators/<data name>.pt{what})")


def add_run_flags(ap: argparse.ArgumentParser, example: str, out: str) -> None:
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help=f"override an InvertSettings field, e.g. --set {example} (repeatable)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: fastest at 32 px next to other jobs)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=out)


def number(text: str):
    return float(text) if any(c in text for c in ".e") else int(text)


def overrides(items: list[str]) -> dict:
    """``["pose_lr=0.005", "steps=3"]`` -> ``{"pose_lr": 0.005, "steps": 3}``."""
    return {k: number(v) for k, v in (kv.split("=", 1) for kv in items)}


def setup(args) -> tuple[dict, SyntheticConfig, object]:
    """Threads set; the data's card (dataset.json), its renderer's settings, and the checkpoint, loaded."""
    torch.set_num_threads(args.threads)
    card = json.loads((Path(args.data) / "dataset.json").read_text())
    cfg = SyntheticConfig(card["resolution"], card["generator"]["supersample"], card["generator"]["seed"],
                          card["preset"])
    return card, cfg, load_gmpi(args.ckpt, args.device)
