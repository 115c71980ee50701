"""The paper's ablation axes as one command: ``gmpi ablations --data synthetic`` (``make ablations``).

Every row of ``experiments/ablations/<row>.yaml`` holds only the ``model:`` keys it changes; the runner merges
it into the base experiment (``experiments/<data>.yaml``), points every output path of the run at
``OUT/<row>/`` and writes the resolved ``OUT/<row>/config.yaml`` (what was trained, exactly). Rows whose
resolved model/data settings equal an earlier row's (e.g. ``no_shading`` on a base without shading) are not
trained twice: the table marks them "same as <row>". Then every trained generator is evaluated with the same
settings (:mod:`gmpi_lightning.evaluation`) and the results land in ``OUT/results.{csv,md}`` plus
``OUT/samples.png`` (one row of views per ablation). Training resumes from ``OUT/<row>/checkpoints/last.ckpt``
and finished rows are skipped (``OUT/<row>/done.json``, written only after a successful training, holds the hash of
the settings it trained), so an interrupted run just continues. The evaluation settings (metrics, Inception file,
whether the base's data has ground-truth depth) are checked before anything is trained.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

from .tables import read_json

REPO = Path(__file__).resolve().parents[1]
ROW_ORDER = ["full", "no_pose_cond", "vanilla_alpha", "plane_tokens", "depth_to_alpha", "no_feature_norm",
             "no_shading", "with_shading", "random_view", "train_planes8", "train_planes16", "train_planes32"]
CPU_MAX_ITERS = {"synthetic": 800}  # the default run's length on this base; other bases keep their own
DONE_FILE = "done.json"  # OUT/<row>/done.json: the finished marker, {"config_sha256": ...}
DEPTH_METRICS = ("depth_fd", "pose", "depth")  # need ground-truth depth in the base's data (estimators train on it)


class AblationError(ValueError):
    """An ablation run that cannot go on (a failed row, settings that cannot be evaluated): ``gmpi`` prints the
    message as one line."""


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def list_rows(folder: Path = REPO / "experiments" / "ablations") -> list[str]:
    found = {p.stem for p in folder.glob("*.yaml")}
    return [r for r in ROW_ORDER if r in found] + sorted(found - set(ROW_ORDER))


def load_row(name: str, folder: Path = REPO / "experiments" / "ablations") -> dict:
    path = folder / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no ablation row {path}; available: {', '.join(list_rows(folder))}")
    row = yaml.safe_load(path.read_text()) or {}
    extra = set(row) - {"model", "data"}
    if extra or not isinstance(row.get("model", {}), dict):
        raise ValueError(f"{path}: an ablation row may only change `model:` (and `data:`) keys, found {sorted(extra)}")
    return row


def resolve_row(base: dict, row: dict, name: str, out: Path, max_iters: int | None = None,
                group: str = "ablations") -> dict:
    """The full training config of one row with every output path under ``out/<name>``."""
    cfg = _deep_merge(base, {k: v for k, v in row.items() if v})
    run = out / name
    trainer = cfg.setdefault("trainer", {})
    trainer["default_root_dir"] = str(run)
    for lg in trainer.get("logger") or []:
        args = lg.setdefault("init_args", {})
        if "save_dir" in args:
            args["save_dir"] = str(run)
        if lg.get("class_path", "").endswith("WandbLogger"):
            args.update(name=f"{group}-{name}", group=group)
    for cb in trainer.get("callbacks") or []:
        args = cb.setdefault("init_args", {})
        if cb.get("class_path", "").endswith("ModelCheckpoint"):
            args["dirpath"] = str(run / "checkpoints")
    cfg.setdefault("model", {})["export_path"] = str(run / "gmpi.pt")
    if max_iters:
        cfg["model"]["max_iters"] = int(max_iters)
    return cfg


def plan(data: str, rows: list[str], out: Path, max_iters: int | None = None) -> list[dict]:
    """[{name, config, same_as}] for the rows, deduplicated on the resolved model/data settings."""
    base_path = REPO / "experiments" / f"{data}.yaml"
    if not base_path.is_file():
        names = sorted(p.stem for p in (REPO / "experiments").glob("*.yaml"))
        raise FileNotFoundError(f"no base experiment {base_path} for --data {data}; available: {', '.join(names)}")
    base = yaml.safe_load(base_path.read_text())
    max_iters = max_iters or CPU_MAX_ITERS.get(data)
    planned, seen = [], {}
    for name in rows:
        cfg = resolve_row(base, load_row(name), name, out, max_iters, group=f"ablations-{data}")
        key = json.dumps({k: v for k, v in cfg["model"].items() if k != "export_path"} | {"data": cfg.get("data")},
                         sort_keys=True)
        planned.append({"name": name, "config": cfg, "same_as": seen.get(key)})
        seen.setdefault(key, name)
    return planned


def _without_length(cfg: dict) -> dict:
    out = copy.deepcopy(cfg)
    out.get("model", {}).pop("max_iters", None)
    return out


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def row_done(run: Path, cfg: dict) -> bool:
    """Whether ``run`` holds a finished training of exactly ``cfg``: ``gmpi.pt`` plus ``done.json`` with the hash of
    ``cfg`` (written only after a successful training). A row trained before ``done.json`` existed counts when its
    ``config.yaml`` equals ``cfg`` and ``gmpi.pt`` is newer than it (``config.yaml`` is written just before a
    training starts, so an older ``gmpi.pt`` is left over from a shorter run whose continuation did not finish)."""
    model, conf = run / "gmpi.pt", run / "config.yaml"
    if not model.is_file():
        return False
    done = read_json(run / DONE_FILE)
    if done is not None:
        return done.get("config_sha256") == config_hash(cfg)
    if not conf.is_file() or yaml.safe_load(conf.read_text()) != cfg:
        return False
    return model.stat().st_mtime_ns > conf.stat().st_mtime_ns


def train_rows(planned: list[dict], out: Path, dry_run: bool = False) -> None:
    for i, p in enumerate(planned):
        run = out / p["name"]
        if p["same_as"]:
            print(f"[{i + 1}/{len(planned)}] {p['name']}: same settings as {p['same_as']}, not trained again")
            continue
        if row_done(run, p["config"]):
            print(f"[{i + 1}/{len(planned)}] {p['name']}: done ({run / 'gmpi.pt'})")
            continue
        last = run / "checkpoints" / "last.ckpt"
        if dry_run:
            print(f"[{i + 1}/{len(planned)}] {p['name']}: would train into {run}"
                  f"{' (resuming from ' + str(last) + ')' if last.is_file() else ''}")
            continue
        old = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").is_file() else None
        if old is not None and _without_length(old) != _without_length(p["config"]):
            aside = run.with_name(f"{run.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            run.rename(aside)  # other settings: a different experiment, never resumed from these weights
            print(f"    {run} held a run with other settings: moved to {aside}")
        run.mkdir(parents=True, exist_ok=True)
        (run / DONE_FILE).unlink(missing_ok=True)
        if (run / "gmpi.pt").is_file():  # a shorter run's export: not this row's result until the training ends
            (run / "gmpi.pt").replace(run / "gmpi.previous.pt")
        (run / "config.yaml").write_text(yaml.safe_dump(p["config"], sort_keys=False))  # continue from last.ckpt
        cmd = [sys.executable, "-m", "gmpi_lightning", "fit", "--config", str(run / "config.yaml")]
        if last.is_file():
            cmd += ["--ckpt_path", str(last)]
        print(f"[{i + 1}/{len(planned)}] {p['name']}: {' '.join(cmd)}  (log: {run / 'train.log'})", flush=True)
        t0 = time.time()
        with open(run / "train.log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ))
        if rc != 0 or not (run / "gmpi.pt").is_file():
            raise AblationError(f"ablation row {p['name']} failed (exit {rc}); see {run / 'train.log'}. "
                                f"Re-running the same command resumes from {last}.")
        (run / DONE_FILE).write_text(json.dumps({"config_sha256": config_hash(p["config"]),
                                                 "seconds": round(time.time() - t0, 1),
                                                 "finished": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
        print(f"    trained in {time.time() - t0:.0f} s", flush=True)


COLUMNS = ["fid", "kid", "pose", "pose_yaw_slope", "depth", "depth_fd", "consistency_photo_l1", "consistency_depth_err",
           "semi_transparent", "depth_relief"]
PER_FAKE = {"pose": "pose_error", "depth": "depth_error", "consistency_photo_l1": "consistency_photo_l1",
            "consistency_depth_err": "consistency_depth_err", "semi_transparent": "semi_transparent",
            "depth_relief": "depth_relief"}  # table column -> details entry with the per-fake mean/std/n


def standard_errors(details: dict) -> dict[str, float]:
    """``<column>_se`` for every table column with a per-fake spread (std / sqrt(n)) or a bootstrap (depth FD)."""
    out = {}
    for col, key in PER_FAKE.items():
        d = details.get(key) or {}
        if d.get("n", 0) > 1 and d.get("std") is not None:
            out[f"{col}_se"] = round(d["std"] / (d["n"] - 1) ** 0.5, 5)  # population std -> sample SE
    se = (details.get("depth_fd") or {}).get("bootstrap_se")
    if se is not None:
        out["depth_fd_se"] = round(se, 5)
    return out


def row_description(name: str, folder: Path = REPO / "experiments" / "ablations") -> str:
    lines = (folder / f"{name}.yaml").read_text().splitlines()
    import re

    first = next((ln.lstrip("# ").strip() for ln in lines if ln.startswith("#")), name)
    return re.split(r"[:.(]", first)[0].strip()


def ensure_estimators(path: Path, data: str) -> Path:
    if not path.is_file():
        from .estimator_training import train_estimators

        print(f"training the pose/depth estimators on {data} -> {path}", flush=True)
        train_estimators(data, path)
    return path


def _identity(path: str | Path | None) -> str | None:
    if not path:
        return None
    st = Path(path).stat()
    return f"{Path(path).resolve()}:{st.st_size}-{st.st_mtime_ns}"


def eval_request(run: Path, data: str, metrics: list[str], num_samples: int, planes: int, inception, estimators,
                 device: str = "cpu") -> dict:
    """What a cached OUT/<row>/eval.json must have been computed with to be reused."""
    return {"metrics": metrics, "num_samples": num_samples, "planes": planes, "data": str(data),
            "generator": _identity(run / "gmpi.pt"), "inception": _identity(inception),
            "estimators": _identity(estimators), "device": str(device)}


def evaluate_rows(planned: list[dict], out: Path, metrics: list[str], num_samples: int, planes: int,
                  inception: str | None, estimators: str | None, device: str = "cpu") -> list[dict]:
    """Evaluate every trained row with the same settings; results cached in OUT/<row>/eval.json."""
    from .evaluation.evaluate import evaluate
    from .evaluation.fakes import FakeSettings
    from .inference import load_generator

    results, by_name = [], {}
    for i, p in enumerate(planned):
        src = p["same_as"] or p["name"]
        run = out / src
        data = str(REPO / p["config"]["data"]["data"])  # relative paths in the configs are relative to the repo
        if src not in by_name:
            cached = run / "eval.json"
            settings = FakeSettings(planes=planes, batch_size=8)
            want = eval_request(run, data, metrics, num_samples, planes, inception, estimators, device)
            blob = json.loads(cached.read_text()) if cached.is_file() else None
            if blob is None or blob.get("request") != want:
                print(f"[{i + 1}/{len(planned)}] evaluating {src}", flush=True)
                loaded = load_generator(run / "gmpi.pt", device=device)
                blob = evaluate(loaded.G, loaded.preset, metrics, num_samples, data, settings, inception,
                                estimators=estimators, device=device, show_progress=True)
                blob["request"] = want
                cached.write_text(json.dumps(blob, indent=2))
            by_name[src] = blob
        m = by_name[src]["metrics"]
        results.append({"row": p["name"], "setting": row_description(p["name"]), "same_as": p["same_as"] or "",
                        **{c: (round(m[c], 5) if c in m else "n/a") for c in COLUMNS},
                        **standard_errors(by_name[src].get("details", {}))})
    return results


def sample_figure(planned: list[dict], out: Path, path: Path, seeds=(0, 1), yaws=(-0.4, 0.0, 0.4),
                  planes: int = 96) -> Path:
    """One row per ablation: RGB for each seed x yaw, then the colour-mapped depth of the same views."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import torch

    from . import export
    from .evaluation.fakes import FakeSettings, generate, render
    from .inference import load_generator

    rows = []
    for p in planned:
        loaded = load_generator(out / (p["same_as"] or p["name"]) / "gmpi.pt")
        pr, res = loaded.preset, loaded.G.img_resolution
        mpi, pl = generate(loaded.G, pr, list(seeds), FakeSettings(planes=planes, noise_mode="const"))
        rgb, dep = [], []
        for yaw in yaws:
            v = render(mpi, pl, pr, torch.full((len(seeds),), yaw), torch.zeros(len(seeds)), res)
            for b in range(len(seeds)):
                rgb.append(export.to_uint8(v["rgb"][b]))
                dep.append(export.depth_to_color(v["depth"][b], pr.near, pr.far, v["alpha"][b]))
        rows.append((p["name"], np.concatenate(rgb + dep, axis=1)))
    fig, axes = plt.subplots(len(rows), 1, figsize=(rows[0][1].shape[1] / 40, 0.9 * len(rows) + 0.4))
    for ax, (name, img) in zip(np.atleast_1d(axes), rows):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"seeds {list(seeds)} x yaw {list(yaws)}: RGB, then depth (turbo: near -> far)", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def data_has_depth(folder: str | Path) -> bool | None:
    """Whether the samples of a ``gmpi data`` folder carry ground-truth depth (``<key>.depth.npy``), read from the
    first sample of its first shard; None when the folder, its dataset.json or that shard is not there (data not
    built yet, or kept on another machine)."""
    from datamodules.shards import read_card

    try:
        shards = read_card(folder).get("shards") or []
    except FileNotFoundError:
        return None
    first = Path(folder) / shards[0]["name"] if shards else None
    if first is None or not first.is_file():
        return None
    with tarfile.open(first) as tar:
        for n, member in enumerate(tar):
            if member.name.endswith(".depth.npy"):
                return True
            if n >= 11:  # a sample has at most 5 files: two whole samples seen
                break
    return False


def default_metrics(has_depth: bool, inception: bool) -> list[str]:
    """The metrics an ablation table shows by default: the geometry ones where the data has depth (plus FID/KID when
    Inception weights are there), else FID/KID and the reprojection consistency."""
    if has_depth:
        return (["fid", "kid"] if inception else []) + ["consistency", *DEPTH_METRICS]
    return ["fid", "kid", "consistency"]


def find_inception(path: str | None, required: bool) -> str | None:
    """The Inception weights file for FID/KID: ``path`` (--inception, default $GMPI_INCEPTION_WEIGHTS) or torch.hub's
    cache. A ``path`` that is not a file is an error; none at all is one only when ``required``."""
    from .evaluation.inception import resolve_weights

    try:
        return str(resolve_weights(path))
    except FileNotFoundError as e:
        if path or required:
            raise FileNotFoundError(f"{e} (or leave fid,kid out of --metrics)") from e
        return None


def choose_metrics(requested: str | None, data: str | Path, has_depth: bool | None, synthetic: bool,
                   inception: bool) -> list[str]:
    """Parsed --metrics, or the default for the base's data. ``has_depth`` None (data not there yet): the default
    follows the base (``synthetic``: its generator writes depth) and depth metrics are not checked."""
    from .evaluation.evaluate import parse_metrics

    if requested is None:
        return default_metrics(synthetic if has_depth is None else has_depth, inception)
    metrics = parse_metrics(requested)
    need = [m for m in metrics if m in DEPTH_METRICS]
    if need and has_depth is False:
        keep = [m for m in metrics if m not in DEPTH_METRICS]
        raise AblationError(f"--metrics {','.join(need)} need ground-truth depth, but the samples of {data} have no "
                            f"depth.npy; drop them (e.g. --metrics {','.join(keep or ['fid', 'kid', 'consistency'])})")
    return metrics


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="gmpi ablations", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default="synthetic", help="base experiment: experiments/<data>.yaml")
    ap.add_argument("--rows", default="all", help="comma-separated rows of experiments/ablations/, or all")
    ap.add_argument("--out", help="output folder (default runs/ablations/<data>)")
    ap.add_argument("--max-iters", type=int, help=f"training length (default: {CPU_MAX_ITERS} else the base's)")
    ap.add_argument("--stage", default="all", choices=["train", "eval", "all"])
    ap.add_argument("--metrics", help="evaluation metrics, checked before training (default: where the base's data "
                                      "has depth consistency,depth_fd,pose,depth, plus fid,kid when Inception "
                                      "weights are found; otherwise fid,kid,consistency)")
    ap.add_argument("--num-samples", type=int, default=256, help="fakes per row")
    ap.add_argument("--planes", type=int, default=96, help="planes at inference for every row")
    ap.add_argument("--inception", default=os.environ.get("GMPI_INCEPTION_WEIGHTS") or None,
                    help="Inception weights for fid/kid (default: $GMPI_INCEPTION_WEIGHTS, else torch.hub's cache)")
    ap.add_argument("--estimators", help="pose/depth estimator file (default runs/estimators/<data>.pt; trained on "
                                         "the base's data when missing)")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu", help="evaluation device")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and commands, run nothing")
    args = ap.parse_args(argv)
    rows = list_rows() if args.rows == "all" else [r.strip() for r in args.rows.split(",") if r.strip()]
    rel = Path(args.out or f"runs/ablations/{args.data}")  # written into the configs: training runs with cwd=REPO
    out = rel if rel.is_absolute() else REPO / rel
    planned = plan(args.data, rows, rel, args.max_iters)
    evaluating = args.stage in ("eval", "all")
    if evaluating:  # every evaluation setting is checked before the first row trains
        cfg = planned[0]["config"]
        data = str(REPO / cfg["data"]["data"])  # relative paths in the configs are relative to the repo
        synthetic = str(cfg.get("model", {}).get("preset", "")).startswith("synthetic")
        has_depth = data_has_depth(data)
        inception = None
        if args.metrics is None and (synthetic if has_depth is None else has_depth):  # fid,kid only if found
            inception = find_inception(args.inception, required=False)
        metrics = choose_metrics(args.metrics, data, has_depth, synthetic, inception is not None)
        if {"fid", "kid"} & set(metrics):
            inception = find_inception(args.inception, required=True)
        print(f"evaluation: {','.join(metrics)} on {args.num_samples} fakes per row, {args.planes} planes"
              f"{', Inception ' + inception if inception and {'fid', 'kid'} & set(metrics) else ''}", flush=True)
    t0 = time.time()
    if args.stage in ("train", "all"):
        train_rows(planned, out, args.dry_run)
    if evaluating and not args.dry_run:
        from .tables import write_table

        est = None
        if {"pose", "depth"} & set(metrics):
            est = str(ensure_estimators(Path(args.estimators or REPO / "runs" / "estimators" / f"{Path(data).name}.pt"),
                                        data))
        rows = evaluate_rows(planned, out, metrics, args.num_samples, args.planes, inception, est, args.device)
        write_table(rows, out / "results.csv", out / "results.md", plus_minus={c: f"{c}_se" for c in COLUMNS},
                    title=f"Ablations on {args.data}: {args.num_samples} fakes per row, {args.planes} planes; "
                          f"± standard error over the fakes (depth FD: bootstrap)")
        fig = sample_figure(planned, out, out / "samples.png", planes=args.planes)
        print((out / "results.md").read_text())
        print(f"wrote {out / 'results.csv'}, {out / 'results.md'}, {fig} ({time.time() - t0:.0f} s)")
    return 0
