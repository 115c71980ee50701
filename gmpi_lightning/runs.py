"""Runs: the one layer under ``gmpi sweep-local``, ``gmpi ablations``, W&B agent runs and SLURM restarts.

A run is a base experiment + overlays + overrides, resolved exactly as ``gmpi fit`` parses them (:func:`resolve`),
with every output in one folder (:func:`reroot`). :func:`train` runs ``gmpi fit --config RUN/config.yaml --ckpt_path
last`` (resuming from RUN/checkpoints/last*.ckpt, or fresh) and marks success in RUN/done.json with the config's hash;
a folder whose config.yaml is another experiment (more than ``model.max_iters`` differs) is moved aside, never resumed
from. ``python -m gmpi_lightning.runs resume fit ARGS`` prints the checkpoint a SLURM job restarts from.
"""

import csv
import functools
import hashlib
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .data import write_atomic
from .errors import InputError
from .hparams import migrate_argv
from .run_paths import entries, fill_run_paths

CONFIG, DONE, PARAMS = "config.yaml", "done.json", "params.json"


@functools.cache
def parser():
    from .trainer import fit_parser

    return fit_parser()


def resolve(args: list[str]) -> dict:
    """``gmpi fit ARGS``'s config as a plain dict, nulls included; a bad argument raises ``ArgumentError``."""
    cfg = parser().parse_args(["fit", *migrate_argv(args)])
    return yaml.safe_load(parser().dump(cfg, skip_unset=False, skip_validation=True))["fit"]


def init_args(cfg: dict, key: str) -> dict:
    """The arguments of section ``key`` (model, data), written plainly or as class_path + init_args."""
    section = cfg.get(key) or {}
    return section.setdefault("init_args", {}) if "class_path" in section else section


def options(cfg: dict, prefix: str = "") -> set[str]:
    """Dotted option names of a resolved config (``model.optim.lr``, also when ``model`` has a class_path)."""
    names = {f"{prefix}{k}" for k in cfg if k != "init_args"}
    for k, v in cfg.items():
        names |= options(v, prefix if k == "init_args" else f"{prefix}{k}.") if isinstance(v, dict) else set()
    return names


def reroot(cfg: dict, run_dir: str | os.PathLike, **wandb) -> dict:
    """A copy of ``cfg`` with every output under ``run_dir``: trainer root, loggers' save_dir, the checkpoint
    callback's dirpath (``checkpoints/``), model.export_path (same name) and any other path under the old root;
    ``wandb`` updates the WandbLogger's arguments (name, group, offline)."""
    run, old = str(run_dir), os.path.normpath(str((cfg.get("trainer") or {}).get("default_root_dir") or "."))

    def walk(v):
        if isinstance(v, (dict, list)):
            return {k: walk(x) for k, x in v.items()} if isinstance(v, dict) else [walk(x) for x in v]
        if old != "." and isinstance(v, str) and (os.path.normpath(v) + os.sep).startswith(old + os.sep):
            return os.path.normpath(os.path.join(run, os.path.relpath(os.path.normpath(v), old)))
        return v

    cfg = walk(cfg)
    trainer = cfg.setdefault("trainer", {})
    trainer["default_root_dir"] = run
    for entry in entries(trainer.get("logger")) + entries(trainer.get("callbacks")):
        args = entry.setdefault("init_args", {})
        if "save_dir" in args:
            args["save_dir"] = run
        if args.get("dirpath"):  # a checkpoint callback
            args["dirpath"] = os.path.join(run, "checkpoints")
        if str(entry.get("class_path")).endswith("WandbLogger"):
            args.update(wandb)
    model = init_args(cfg, "model")
    if model.get("export_path"):
        model["export_path"] = os.path.join(run, os.path.basename(model["export_path"]))
    return fill_run_paths(cfg)  # and the paths the config leaves to the root, spelled out in the run's config.yaml


@dataclass
class Run:
    """``config`` is resolved and rerooted to ``dir``; ``params`` (what the run varies) go to tables, ``command`` is
    how it was written down; a run ``same_as`` an earlier one has its settings and is not trained twice."""
    name: str
    dir: Path
    config: dict
    params: dict = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    same_as: str | None = None
    status: str = "pending"
    seconds: float | None = None


def config_hash(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()


def is_done(run: Run) -> bool:
    """RUN/done.json holds this config's hash (a missing, half-written or other run's marker is not done)."""
    try:
        return json.loads((run.dir / DONE).read_text()).get("config_sha256") == config_hash(run.config)
    except (OSError, ValueError, AttributeError):
        return False


def mark_done(run: Run) -> None:
    (run.dir / DONE).write_text(json.dumps({"config_sha256": config_hash(run.config), "params": run.params,
                                            "seconds": round(run.seconds or 0.0, 1)}, indent=1, default=str))


def _experiment(cfg: dict) -> dict:
    cfg = json.loads(json.dumps({k: cfg.get(k) for k in ("seed_everything", "trainer", "model", "data")}, default=str))
    init_args(cfg, "model").pop("max_iters", None)  # a longer run of the same experiment continues the shorter one
    return cfg


def write_config(run: Run, echo=print) -> Path:
    """RUN/config.yaml, atomically (DDP ranks may write it at once); a folder of another experiment is moved aside."""
    path = run.dir / CONFIG
    if path.is_file() and _experiment(yaml.safe_load(path.read_text()) or {}) != _experiment(run.config):
        aside = run.dir.with_name(f"{run.dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        echo(f"{run.dir} held a run with other settings: moved to {aside}")
        run.dir.rename(aside)
    return write_atomic(path, lambda tmp: tmp.write_text(yaml.safe_dump(run.config, sort_keys=False)))


def train(planned: list[Run], program, parallel: int = 1, log: str = "log.txt", cwd=None, env=None,
          echo=print) -> list[Run]:
    """Train every run that is not done (nor the same as an earlier one), ``parallel`` at a time:
    ``program(run)`` (a command ending in ``fit``) ``--config RUN/config.yaml --ckpt_path last``, its output appended
    to RUN/``log``; RUN/done.json when it exits 0. Ctrl-C reaches the training processes too (one process group):
    they stop, their last.ckpt stays, nothing new starts."""
    todo, stop = [], threading.Event()
    for r in planned:
        if r.same_as or is_done(r):
            r.status = f"same settings as {r.same_as}" if r.same_as else "finished"
            echo(f"[skip] {r.name}: {r.status if r.same_as else 'finished earlier'}")
        else:
            todo.append(r)

    def one(r: Run) -> Run:
        if stop.is_set():
            return r
        echo(f"[start] {r.name} -> {r.dir} (log: {r.dir / log})")
        command = [*program(r), "--config", str(write_config(r, echo).resolve()), "--ckpt_path", "last"]
        (r.dir / DONE).unlink(missing_ok=True)
        (r.dir / PARAMS).write_text(json.dumps(r.params, indent=1, default=str))  # what it varies, from the start
        t0 = time.perf_counter()
        with open(r.dir / log, "a") as fh:
            print(f"### {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}", file=fh, flush=True)
            try:
                rc = subprocess.call(command, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd, env=env)
            except OSError as e:  # e.g. the program does not exist
                fh.write(f"could not start: {e}\n")
                rc = 127
        r.seconds, r.status = time.perf_counter() - t0, "finished" if rc == 0 else f"failed (exit {rc})"
        if rc == 0:
            mark_done(r)
        return r

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        try:
            for i, fut in enumerate(as_completed([pool.submit(one, r) for r in todo]), start=1):
                r = fut.result()
                echo(f"[{i}/{len(todo)}] {r.name} " + (f"finished in {r.seconds:.1f} s" if r.status == "finished" else
                     f"{r.status.replace('failed', 'FAILED')} after {r.seconds or 0:.1f} s  log: {r.dir / log}"))
        except KeyboardInterrupt:
            stop.set()
            echo("interrupted: run the same command again to continue")
            raise
    return planned


def resume_checkpoint(cfg: dict) -> Path | None:
    """The newest of the checkpoint callbacks' last*.ckpt (what ``--ckpt_path last`` finds) and the hpc_ckpt_N.ckpt
    that SLURM auto-requeue writes into the trainer root (which Lightning on SLURM loads by itself, even when
    older): after a requeue that is the hpc checkpoint, after a resubmission last.ckpt."""
    cfg = fill_run_paths(json.loads(json.dumps(cfg, default=str)))  # paths the config leaves out: under its root
    trainer = cfg.get("trainer") or {}
    dirs = [(e.get("init_args") or {}).get("dirpath") for e in entries(trainer.get("callbacks"))]
    found = [p for d in dirs if d for p in Path(d).glob("last*.ckpt")]
    found += Path(trainer.get("default_root_dir") or ".").glob("hpc_ckpt_*.ckpt")
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name), default=None)


def _number(v) -> float | None:
    """``v`` as a finite float (numbers and numeric text; not bools), else None."""
    try:
        x = None if isinstance(v, bool) or v is None else float(v)
    except (TypeError, ValueError):
        return None
    return x if x is not None and math.isfinite(x) else None


def read_metrics(run_dir: str | os.PathLike) -> dict:
    """The last value of every column of the run's metrics.csv files (oldest first: a resumed run's newer file
    wins); numbers as float."""
    last = {}
    for f in sorted(Path(run_dir).rglob("metrics.csv"), key=lambda p: (p.stat().st_mtime, str(p))):
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                last.update({k: v if _number(v) is None else float(v) for k, v in row.items() if k and v})
    return last


def write_table(rows: list[dict], csv_path: str | os.PathLike | None, md_path: str | os.PathLike | None,
                sort_by: str | None = None, goal: str = "minimize", title: str | None = None,
                plus_minus: dict[str, str] | None = None) -> list[dict]:
    """``rows`` as CSV and markdown (columns in first-seen order), sorted by ``sort_by`` (``goal`` minimize:
    ascending; rows without a finite number there last, in order); ``plus_minus`` maps a column to its error
    column, shown as ``value ± error`` in the markdown. Returns the rows in the written order."""
    if goal not in ("minimize", "maximize"):
        raise InputError(f"goal must be minimize or maximize, got {goal!r}")
    columns, sign = list(dict.fromkeys(k for r in rows for k in r)), -1 if goal == "maximize" else 1
    if sort_by:
        rows = sorted(rows, key=lambda r: (_number(r.get(sort_by)) is None, sign * (_number(r.get(sort_by)) or 0)))
    for path in filter(None, (csv_path, md_path)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    if csv_path is not None:
        with open(csv_path, "w", newline="") as fh:
            csv.writer(fh).writerows([columns, *(["" if r.get(c) is None else r[c] for c in columns] for r in rows)])
    if md_path is not None:
        pm = plus_minus or {}

        def cell(r, c):
            v, err = r.get(c), _number(r.get(pm.get(c))) if _number(r.get(c)) is not None else None
            text = f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)
            return text.replace("|", "\\|").replace("\n", " ") + ("" if err is None else f" ± {err:.4g}")

        line, shown = lambda cells: "| " + " | ".join(cells) + " |", [c for c in columns if c not in pm.values()]
        filled = {c: [r[c] for r in rows if r.get(c) not in (None, "")] for c in shown}
        align = ["---:" if v and all(_number(x) is not None for x in v) else "---" for v in filled.values()]
        lines = ([f"# {title}", ""] if title else []) + [line(shown), f"|{'|'.join(align)}|"]
        Path(md_path).write_text("\n".join(lines + [line(cell(r, c) for c in shown) for r in rows]) + "\n")
    return rows


if __name__ == "__main__":  # python -m gmpi_lightning.runs resume fit ARGS: the path to stdout, the story to stderr
    if sys.argv[1:3] != ["resume", "fit"]:
        sys.exit("usage: python -m gmpi_lightning.runs resume fit --config CONFIG [overrides...]")
    ckpt = resume_checkpoint(resolve(sys.argv[3:]))
    print(f"resuming from {ckpt.resolve()}" if ckpt else "no checkpoint to resume from: starting fresh",
          file=sys.stderr)
    print(ckpt.resolve() if ckpt else "", end="\n" if ckpt else "")
