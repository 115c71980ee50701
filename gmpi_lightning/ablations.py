"""The paper's ablation axes as one command: ``gmpi ablations --data synthetic`` (``make ablations``).

Row ``experiments/ablations/<row>.yaml`` is an overlay of the ``model:`` keys it changes on experiments/<data>.yaml,
trained by :mod:`gmpi_lightning.runs` in OUT/<row>/ (resumed from last.ckpt); a row whose resolved settings equal an
earlier row's is trained once ("same as <row>"). Every generator is evaluated alike (:mod:`.evaluation.compare`,
settings checked before any training) into OUT/results.{csv,md} and OUT/samples.png (docs/ABLATIONS.md).
"""

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Literal

import yaml

from . import runs
from .errors import InputError
from .evaluation import compare
from .inference import load_generator

REPO = Path(__file__).resolve().parents[1]
ROWS = REPO / "experiments" / "ablations"
ROW_ORDER = ["full", "no_pose_cond", "vanilla_alpha", "plane_tokens", "depth_to_alpha", "no_feature_norm",
             "no_shading", "with_shading", "random_view", "train_planes8", "train_planes16", "train_planes32"]
CPU_MAX_ITERS = {"synthetic": 800}  # the default run's length on this base; other bases keep their own


class AblationError(InputError):
    """An ablation run that cannot go on (a failed row, a row not trained yet): one line from ``gmpi``."""


def list_rows(folder: Path = ROWS) -> list[str]:
    found = {p.stem for p in folder.glob("*.yaml")}
    return [r for r in ROW_ORDER if r in found] + sorted(found - set(ROW_ORDER))


def load_row(name: str, folder: Path = ROWS) -> dict:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no ablation row {path}; available: {', '.join(list_rows(folder))}")
    row = yaml.safe_load(path.read_text()) or {}
    if set(row) - {"model", "data"} or not isinstance(row.get("model", {}), dict):
        raise InputError(f"{path}: an ablation row may only change `model:` (and `data:`) keys, found {sorted(row)}")
    return row


def plan(data: str, rows: list[str], out: str | Path, max_iters: int | None = None) -> list[runs.Run]:
    """The rows as runs in ``out/<row>`` (relative paths in their configs are relative to the repository, where
    they train), each marked ``same_as`` the first row with the same resolved model/data settings."""
    base = REPO / "experiments" / f"{data}.yaml"
    if not base.is_file():
        names = sorted(p.stem for p in base.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no base experiment {base} for --data {data}; available: {', '.join(names)}")
    length = max_iters or CPU_MAX_ITERS.get(data)
    planned, seen = [], {}
    for name in rows:
        load_row(name)
        config = runs.resolve(["--config", str(base), "--config", str(ROWS / f"{name}.yaml")]
                              + ([f"--model.max_iters={length}"] if length else []))
        config = runs.reroot(config, Path(out) / name, name=f"ablations-{data}-{name}", group=f"ablations-{data}")
        key = json.dumps([{k: v for k, v in runs.init_args(config, "model").items() if k != "export_path"},
                          runs.init_args(config, "data")], sort_keys=True, default=str)
        planned.append(runs.Run(name, REPO / out / name, config, same_as=seen.get(key)))
        seen.setdefault(key, name)
    return planned


def train_rows(planned: list[runs.Run], dry_run: bool = False) -> None:
    if dry_run:
        for r in planned:
            last = r.dir / "checkpoints" / "last.ckpt"
            print(f"{r.name}: " + (f"same settings as {r.same_as}" if r.same_as else "done" if runs.is_done(r) else
                                   f"would train into {r.dir}" + (f", resuming from {last}" if last.is_file() else "")))
        return
    runs.train(planned, lambda r: [sys.executable, "-m", "gmpi_lightning", "fit"], log="train.log", cwd=REPO,
               echo=lambda msg: print(msg, flush=True))
    for r in planned:
        if r.status.startswith("failed"):
            raise AblationError(f"ablation row {r.name} {r.status}; see {r.dir / 'train.log'}. Re-running the same "
                                f"command resumes from its last.ckpt.")


def evaluate_rows(planned: list[runs.Run], metrics: list[str], num_samples: int, planes: int, inception: str | None,
                  estimators: str | None, device: str = "cpu") -> list[dict]:
    """The table: every trained row evaluated alike (a row "same as" another reuses its evaluation); its setting is
    the first comment of its file, up to the first ``:``, ``.`` or ``(``."""
    by_name, table = {r.name: r for r in planned}, []
    for r in planned:
        src = by_name[r.same_as or r.name]
        if not runs.is_done(src):
            raise AblationError(f"row {src.name} has not finished training (no {src.dir / runs.DONE} for these "
                                f"settings): run --stage train first")
        data = str(REPO / runs.init_args(src.config, "data")["data"])
        blob = compare.evaluate_cached(src.dir / "gmpi.pt", src.dir / "eval.json", data, metrics, num_samples, planes,
                                       inception, estimators, device)
        lines = (ROWS / f"{r.name}.yaml").read_text().splitlines()
        setting = re.split(r"[:.(]", next((ln.lstrip("# ") for ln in lines if ln.startswith("#")), r.name))[0]
        table.append({"row": r.name, "setting": setting.strip(), "same_as": r.same_as or "", **compare.table_row(blob)})
    return table


def ablations(data: str = "synthetic", rows: str = "all", out: str | None = None, max_iters: int | None = None,
              stage: Literal["train", "eval", "all"] = "all", metrics: str | None = None, num_samples: int = 256,
              planes: int = 96, inception: str | None = None, estimators: str | None = None, device: str | None = None,
              dry_run: bool = False) -> int:
    """Train and evaluate the paper's ablation rows (experiments/ablations/) on one base into one table.

    Args:
        data: base experiment: experiments/<data>.yaml.
        rows: comma-separated rows of experiments/ablations/, or all.
        out: output folder (default runs/ablations/<data>).
        max_iters: training length (default: the CPU length of the synthetic base, else the base's).
        stage: train, eval or all.
        metrics: checked before training (default: consistency,depth_fd,pose,depth where the base's data has depth,
            plus fid,kid,pr,is when Inception weights are found; else fid,kid,pr,is,consistency).
        num_samples: fakes per row.
        planes: planes at inference for every row.
        inception: Inception weights for fid/kid (default: $GMPI_INCEPTION_WEIGHTS, else torch.hub's cache).
        estimators: pose/depth estimators (default runs/estimators/<data>.pt; trained if none).
        device: evaluation device (default: cuda when available).
        dry_run: print the plan, run nothing.
    """
    from .commands import default_device

    base, device = data, device or default_device()
    inception = inception or os.environ.get("GMPI_INCEPTION_WEIGHTS") or None
    names = list_rows() if rows == "all" else [r.strip() for r in rows.split(",") if r.strip()]
    planned = plan(base, names, out or f"runs/ablations/{base}", max_iters)
    out, t0, model = planned[0].dir.parent, time.time(), runs.init_args(planned[0].config, "model")
    data = str(REPO / runs.init_args(planned[0].config, "data")["data"])
    if stage != "train":  # every evaluation setting is checked before the first row trains
        metrics, inception = compare.check_settings(metrics, data, str(model.get("preset", "")).startswith(
            "synthetic"), inception)
        print(f"evaluation: {','.join(metrics)} on {num_samples} fakes per row, {planes} planes"
              + (f", Inception {inception}" if inception else ""), flush=True)
    if stage != "eval":
        train_rows(planned, dry_run)
    if stage == "train" or dry_run:
        return 0
    est = Path(estimators or REPO / "runs" / "estimators" / f"{Path(data).name}.pt")
    est = est if {"pose", "depth"} & set(metrics) else None
    if est and not est.is_file():
        from .estimator_training import train_estimators

        print(f"training the pose/depth estimators on {data} -> {est}", flush=True)
        train_estimators(data, est)
    table = evaluate_rows(planned, metrics, num_samples, planes, inception, est and str(est), device)
    table += compare.reference_rows(data, load_generator(planned[0].dir / "gmpi.pt").preset, metrics, num_samples,
                                    planes, est and str(est), out / "reference.json", device)
    runs.write_table(table, out / "results.csv", out / "results.md", title=f"Ablations on {base}: "
                     f"{num_samples} fakes per row, {planes} planes; ± standard error over the fakes "
                     f"(depth FD: bootstrap)", plus_minus={c: f"{c}_se" for c in compare.COLUMNS})
    fig = compare.sample_figure([(r.name, r.dir.with_name(r.same_as or r.name) / "gmpi.pt") for r in planned],
                                out / "samples.png", planes=planes, data=data)
    print((out / "results.md").read_text())
    print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {fig} ({time.time() - t0:.0f} s)")
    return 0
