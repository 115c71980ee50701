"""W&B sweep files run without the W&B server: ``gmpi sweep-local experiments/sweeps/NAME.yaml`` (``make sweep-local``).

The same YAML serves both ways:

    make sweep SWEEP=experiments/sweeps/r1_lr.yaml          # W&B: `wandb sweep` (account + server), then
    make agent SWEEP_ID=entity/project/id COUNT=4           #      `wandb agent` on each worker
    make sweep-local SWEEP=experiments/sweeps/r1_lr.yaml PARALLEL=2   # here: grid / random, no server

``sweep-local`` reads W&B's sweep format (``method``, ``metric``, ``parameters``, ``command``), checks it before
anything runs (unknown keys, bad methods and distributions, empty ranges, and parameter names or values that
``gmpi fit`` would refuse), expands ``grid`` or seeded ``random`` searches, and builds every run's command the way
``wandb agent`` does (``${args}`` -> ``--name=value``). Each run gets its own folder ``OUT/run-NNN/`` (trainer root,
loggers, checkpoints and the exported generator are re-pointed there), its output goes to ``OUT/run-NNN/log.txt``,
and the last value of every metric in its ``metrics.csv`` lands in ``OUT/results.csv`` and ``OUT/results.md``,
sorted by the sweep's metric. Finished runs (``status.json``) are skipped when the sweep is run again; a run that
did not finish starts again (from its ``checkpoints/last.ckpt`` when it has one). ``bayes`` needs W&B's server.

``python -m gmpi_lightning.sweeps fit ...`` is ``gmpi fit`` plus, under ``wandb agent`` (``WANDB_SWEEP_ID`` and
``WANDB_RUN_ID`` set), the same per-run folder (``runs/sweeps/wandb-<sweep>/<run>``) and an online WandbLogger so
the run reports to its sweep. The sweep files in ``experiments/sweeps/`` run it in their ``command``; their
``program:`` is ``scripts/sweep_run.py``, the same entry point as a file (``python scripts/sweep_run.py fit ...``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sweep_spec import (  # noqa: F401 (also re-exported: gmpi_lightning.sweeps is the sweep API)
    FitParser,
    Sweep,
    SweepError,
    _suggest,
    build_command,
    expand,
    fit_arguments,
    format_args,
    load_sweep,
)
from .tables import format_cell, read_json, write_table

STATUS_FILE = "status.json"  # the finished marker

# ----------------------------------------------------------------------------------------- output paths
PATH_KEYS = ("save_dir", "root_dir", "log_dir")


def _under(value: Any, root: str | None) -> bool:
    if not isinstance(value, str) or not root or os.path.normpath(root) in (".", ""):
        return False
    v, r = os.path.normpath(value), os.path.normpath(root)
    return v == r or v.startswith(r + os.sep)


def _reroot(value: str, root: str, run_dir: str) -> str:
    rel = os.path.relpath(os.path.normpath(value), os.path.normpath(root))
    return run_dir if rel == "." else os.path.join(run_dir, rel)


def _without_defaults(entry: dict, keep: set[str] = frozenset()) -> dict:
    """``{class_path, init_args}`` without the init_args equal to the class's own defaults (shorter commands; the
    parsed result is the same), except ``keep``: values this module changed must be written even when they are the
    default, since jsonargparse merges a list entry with the earlier one of the same class."""
    import importlib
    import inspect

    try:
        module, _, name = str(entry.get("class_path", "")).rpartition(".")
        sig = inspect.signature(getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError, ValueError, TypeError):
        return entry
    args = {k: v for k, v in (entry.get("init_args") or {}).items()
            if k in keep or k not in sig.parameters or sig.parameters[k].default is inspect.Parameter.empty
            or type(sig.parameters[k].default) is not type(v) or sig.parameters[k].default != v}
    return {"class_path": entry["class_path"], "init_args": args}


def path_overrides(cfg: dict, run_dir: str | os.PathLike, wandb_name: str | None = None,
                   wandb_group: str | None = None, wandb_online: bool = False) -> list[str]:
    """``gmpi fit`` arguments that put every output of the run configured by ``cfg`` (a plain dict of the ``fit``
    config) under ``run_dir``: trainer root, each logger's save_dir, ModelCheckpoint's dirpath (``checkpoints/``),
    ``model.export_path`` (same file name), and any other path under the old trainer root."""
    run_dir = str(run_dir)
    trainer, model, data = cfg.get("trainer") or {}, cfg.get("model") or {}, cfg.get("data") or {}
    old_root = trainer.get("default_root_dir")
    out = [f"--trainer.default_root_dir={run_dir}"]

    def entries(value):
        if isinstance(value, dict):
            return [value]
        return list(value) if isinstance(value, list) else None

    loggers = entries(trainer.get("logger"))
    if loggers:
        new = []
        for lg in loggers:
            lg = json.loads(json.dumps(lg))
            args = lg.setdefault("init_args", {})
            changed = {k for k in PATH_KEYS if k in args}
            args.update({k: run_dir for k in changed})
            if str(lg.get("class_path", "")).endswith("WandbLogger"):
                if wandb_online:
                    args.update(offline=False, name=None)  # W&B names sweep runs
                    changed |= {"offline", "name"}
                if wandb_name:
                    args["name"] = wandb_name
                    changed.add("name")
                if wandb_group:
                    args["group"] = wandb_group
                    changed.add("group")
            new.append(_without_defaults(lg, changed))
        out.append(f"--trainer.logger={json.dumps(new)}")
    callbacks = entries(trainer.get("callbacks"))
    if callbacks:
        new = []
        for cb in callbacks:
            cb = json.loads(json.dumps(cb))
            args = cb.setdefault("init_args", {})
            changed = {k for k, v in args.items() if _under(v, old_root)}
            args.update({k: _reroot(args[k], old_root, run_dir) for k in changed})
            if str(cb.get("class_path", "")).endswith("ModelCheckpoint") and args.get("dirpath"):
                args["dirpath"] = os.path.join(run_dir, "checkpoints")
                changed.add("dirpath")
            new.append(_without_defaults(cb, changed))
        out.append(f"--trainer.callbacks={json.dumps(new)}")
    if model.get("export_path"):
        out.append(f"--model.export_path={os.path.join(run_dir, os.path.basename(model['export_path']))}")
    for section, values in (("model", model), ("data", data)):
        for k, v in values.items():
            if k != "export_path" and _under(v, old_root):
                out.append(f"--{section}.{k}={_reroot(v, old_root, run_dir)}")
    return out


# ------------------------------------------------------------------------------------------------ planning
@dataclass
class Run:
    index: int
    name: str
    dir: Path
    params: dict[str, Any]
    command: list[str]
    status: str = "pending"
    returncode: int | None = None
    seconds: float | None = None
    resume_from: str | None = None


def _parse_error(where: str, run: str, params: dict, err: Exception) -> SweepError:
    msg = str(err).strip()
    hint = ""
    if any(v is None for v in params.values()):
        hint = ("\n  hint: W&B passes None as the text 'None', which `gmpi fit` does not read as null; write the "
                "string 'null' in the YAML instead")
    shown = " ".join(format_args(params))
    return SweepError(f"{where}: {run} ({shown}) would be refused by `gmpi fit`:\n  {msg}{hint}")


def plan(sweep: Sweep, out: str | os.PathLike, count: int | None = None, seed: int = 0,
         extra: Sequence[str] = (), interpreter: str | None = None, check: bool = True) -> list[Run]:
    """Expand the sweep into runs with their commands, each writing to ``out/run-NNN``. With ``check`` every
    parameter name and every run's full argument list is parsed by the ``gmpi fit`` parser first, so a typo or a
    bad value stops the sweep before anything runs."""
    where = str(sweep.path)
    values = expand(sweep, count=count, seed=seed)
    out = Path(out)
    width = max(3, len(str(len(values))))
    if check:
        base = fit_arguments(build_command(sweep, {}, interpreter)) + list(extra)
        try:
            known = FitParser.known_options(base)
        except Exception as e:  # argparse.ArgumentError, a missing --config file, ...
            raise SweepError(f"{where}: the sweep's command (+ extra overrides) is refused by `gmpi fit`: "
                             f"{str(e).strip()}\n  (paths in `command` are relative to the folder you run from, "
                             f"normally the repository root)") from e
        for p in sweep.params:
            if p.name not in known:
                raise SweepError(f"{where}: parameter {p.name!r} is not an option of `gmpi fit`"
                                 f"{_suggest(p.name, known)}; list the options with `gmpi fit --config "
                                 f"<config> --print_config`")
    runs = []
    for i, params in enumerate(values, start=1):
        name = f"run-{i:0{width}d}"
        run_dir = out / name
        command = build_command(sweep, params, interpreter) + list(extra)
        if check:
            try:
                _, cfg = FitParser.parse(fit_arguments(command))
            except Exception as e:
                raise _parse_error(where, name, params, e) from e
            command += path_overrides(cfg, run_dir, wandb_name=f"{sweep.name}-{name}", wandb_group=sweep.name)
            if i == 1:  # the overrides have the same form in every run: checking the first one is enough
                try:
                    FitParser.parse(fit_arguments(command))
                except Exception as e:
                    raise _parse_error(where, name, params, e) from e
        runs.append(Run(index=i, name=name, dir=run_dir, params=params, command=command))
    return runs


# ------------------------------------------------------------------------------------------------ running
def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Last non-empty value of every column over the run's metrics.csv files (oldest first, so a resumed run's
    newer file wins); numbers as float."""
    files = sorted(Path(run_dir).rglob("metrics.csv"), key=lambda p: (p.stat().st_mtime, str(p)))
    last: dict[str, Any] = {}
    for f in files:
        with open(f, newline="") as fh:
            for row in csv.DictReader(fh):
                for k, v in row.items():
                    if k is None or v in (None, ""):
                        continue
                    try:
                        last[k] = float(v)
                    except ValueError:
                        last[k] = v
    return last


def _execute(run: Run, env: dict[str, str], procs: dict, lock: threading.Lock, stop: threading.Event) -> Run:
    if stop.is_set():
        run.status = "not started (interrupted)"
        return run
    run.dir.mkdir(parents=True, exist_ok=True)
    command = list(run.command)
    last = run.dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        run.resume_from = str(last)
        command.append(f"--ckpt_path={last}")
    (run.dir / "run.json").write_text(json.dumps({"name": run.name, "params": run.params, "command": run.command},
                                                 indent=1, default=str))
    t0 = time.perf_counter()
    with open(run.dir / "log.txt", "a") as log:
        log.write(f"### {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(command)}\n")
        log.flush()
        with lock:
            if stop.is_set():
                run.status = "not started (interrupted)"
                return run
            try:
                proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            except OSError as e:  # e.g. the program does not exist
                log.write(f"could not start: {e}\n")
                proc = None
            else:
                procs[run.name] = proc
        rc = proc.wait() if proc is not None else 127
        with lock:
            procs.pop(run.name, None)
    run.seconds, run.returncode = time.perf_counter() - t0, rc
    run.status = "finished" if rc == 0 else f"failed (exit {rc})"
    (run.dir / STATUS_FILE).write_text(json.dumps({"status": "finished" if rc == 0 else "failed", "returncode": rc,
                                                   "seconds": round(run.seconds, 2), "params": run.params},
                                                  indent=1, default=str))
    return run


def run_sweep(sweep: Sweep, out: str | os.PathLike | None = None, parallel: int = 1, count: int | None = None,
              seed: int = 0, extra: Sequence[str] = (), dry_run: bool = False, interpreter: str | None = None,
              echo=print) -> tuple[int, list[dict]]:
    """Plan, (re)run what is not finished, N at a time, and write ``OUT/results.{csv,md}``.
    Returns (exit code: 0 when every run finished, else 1; the table rows)."""
    if parallel < 1:
        raise SweepError(f"--parallel must be >= 1, got {parallel}")
    out = Path(out) if out else Path("runs") / "sweeps" / sweep.name
    runs = plan(sweep, out, count=count, seed=seed, extra=extra, interpreter=interpreter)
    head = (f"sweep {sweep.name} ({sweep.path}): {sweep.method}, {len(runs)} runs"
            + (f", metric {sweep.metric} ({sweep.goal})" if sweep.metric else "") + f" -> {out}")
    if sweep.early_terminate:
        head += "\n  note: early_terminate is ignored locally (every run trains to its end)"
    echo(head)
    if dry_run:
        for r in runs:
            echo(f"{r.name}: {shlex.join(r.command)}")
        return 0, []
    todo = []
    for r in runs:
        status = read_json(r.dir / STATUS_FILE)
        previous = read_json(r.dir / "run.json")
        if previous is not None and fit_arguments(previous.get("command") or ["fit"]) != fit_arguments(r.command):
            raise SweepError(f"{r.dir} holds a run with another command or other parameters "
                             f"({previous.get('params')}); use another --out, or delete that folder")
        if status and status.get("status") == "finished":
            r.status, r.returncode, r.seconds = "finished", 0, status.get("seconds")
            echo(f"[skip] {r.name} finished earlier")
        else:
            todo.append(r)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(sweep.path.read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SWEEP_ID", "WANDB_RUN_ID")}
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    procs: dict[str, subprocess.Popen] = {}
    lock, stop = threading.Lock(), threading.Event()
    done = len(runs) - len(todo)
    pool = ThreadPoolExecutor(max_workers=parallel)
    futures = [pool.submit(_execute, r, env, procs, lock, stop) for r in todo]
    try:
        for fut in as_completed(futures):
            r = fut.result()
            done += 1
            shown = " ".join(f"{k}={format_cell(v)}" for k, v in r.params.items())
            if r.returncode == 0:
                value = read_metrics(r.dir).get(sweep.metric) if sweep.metric else None
                score = f"  {sweep.metric}={format_cell(value)}" if sweep.metric else ""
                resumed = f" (resumed from {r.resume_from})" if r.resume_from else ""
                echo(f"[{done}/{len(runs)}] {r.name} finished in {r.seconds:.1f} s{resumed}  {shown}{score}")
            else:
                echo(f"[{done}/{len(runs)}] {r.name} FAILED (exit {r.returncode}) after {r.seconds:.1f} s  "
                     f"{shown}  log: {r.dir / 'log.txt'}")
    except KeyboardInterrupt:
        stop.set()
        with lock:
            for p in procs.values():
                p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)
        echo("interrupted: the running runs were stopped; run the same command again to continue")
        raise
    pool.shutdown()
    rows = results_rows(sweep, runs)
    warning = missing_metric_warning(sweep, runs)
    if warning:
        echo(warning)
    write_table(rows, out / "results.csv", out / "results.md", sort_by=sweep.metric, goal=sweep.goal,
                title=f"Sweep {sweep.name}: {sweep.method} over {', '.join(p.name for p in sweep.params)}"
                      + (f"; sorted by {sweep.metric} ({sweep.goal})" if sweep.metric else ""))
    failed = [r for r in runs if r.returncode != 0]
    echo(f"results: {out / 'results.md'} and {out / 'results.csv'} ({len(runs) - len(failed)} finished, "
         f"{len(failed)} failed)")
    return (1 if failed else 0), rows


def missing_metric_warning(sweep: Sweep, runs: list[Run]) -> str | None:
    """A warning when finished runs exist but none logged the sweep's ``metric.name`` (a typo leaves its column
    blank and the table unsorted); it names the columns that were found."""
    finished = [r for r in runs if r.returncode == 0]
    if not sweep.metric or not finished:
        return None
    found: list[str] = []
    for r in finished:
        metrics = read_metrics(r.dir)
        if sweep.metric in metrics:
            return None
        found += [k for k in metrics if k not in found]
    hint = _suggest(sweep.metric, found)
    return (f"warning: no finished run logged the sweep's metric {sweep.metric!r}{hint} (metric.name in "
            f"{sweep.path}), so its column is empty and the table is not sorted by it; the runs' metrics.csv have: "
            f"{', '.join(sorted(found)) or 'no metrics at all'}")


def results_rows(sweep: Sweep, runs: list[Run]) -> list[dict]:
    metrics = {r.name: read_metrics(r.dir) for r in runs}
    columns: list[str] = []
    for m in metrics.values():
        columns += [k for k in m if k not in columns]
    rest = sorted(c for c in columns if c != sweep.metric)
    rows = []
    for r in runs:
        row: dict[str, Any] = {"run": r.name, "status": r.status}
        row.update({p.name: r.params.get(p.name) for p in sweep.params})
        if sweep.metric:
            row[sweep.metric] = metrics[r.name].get(sweep.metric)
        row.update({c: metrics[r.name].get(c) for c in rest})
        row["seconds"] = round(r.seconds, 1) if r.seconds is not None else None
        row["log"] = str(r.dir / "log.txt")
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- CLIs
def main(argv: list[str]) -> int:
    """gmpi sweep-local SWEEP.yaml [--out DIR] [--parallel N] [--count N] [--seed S] [--dry-run] [-- overrides]"""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(
        prog="gmpi sweep-local",
        usage="gmpi sweep-local SWEEP.yaml [--out DIR] [--parallel N] [--count N] [--seed S] [--dry-run] "
              "[-- OVERRIDES...]",
        description="Run a W&B sweep file (grid or random) here, without the W&B server: one `gmpi fit` per run "
                    "in OUT/run-NNN, then OUT/results.csv and OUT/results.md sorted by the sweep's metric. "
                    "Arguments after `--` are appended to every run (e.g. -- --model.max_iters=50).")
    p.add_argument("sweep", help="sweep YAML in W&B's format, e.g. experiments/sweeps/r1_lr.yaml")
    p.add_argument("--out", help="output folder (default: runs/sweeps/<sweep name>)")
    p.add_argument("--parallel", type=int, default=1, help="runs at the same time (default: 1)")
    p.add_argument("--count", type=int, help="number of runs (random: required unless the file has run_cap; "
                                             "grid: only the first N)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random search (default: 0)")
    p.add_argument("--dry-run", action="store_true", help="check the sweep and print every run's command")
    args = p.parse_args(argv)
    sweep = load_sweep(args.sweep)

    def echo(msg):
        print(msg, flush=True)

    try:
        rc, _ = run_sweep(sweep, out=args.out, parallel=args.parallel, count=args.count, seed=args.seed,
                          extra=extra, dry_run=args.dry_run, echo=echo)
    except KeyboardInterrupt:
        return 130
    return rc


def agent_arguments(argv: list[str], env: dict[str, str] | None = None,
                    root: str | os.PathLike = Path("runs") / "sweeps") -> list[str]:
    """Under ``wandb agent`` (WANDB_SWEEP_ID and WANDB_RUN_ID set): ``argv`` + the arguments that give the run its
    own folder ``root/wandb-<sweep>/<run>`` and an online WandbLogger. Otherwise ``argv`` unchanged."""
    env = os.environ if env is None else env
    sweep_id, run_id = env.get("WANDB_SWEEP_ID"), env.get("WANDB_RUN_ID")
    if not (argv[:1] == ["fit"] and sweep_id and run_id):
        return list(argv)
    _, cfg = FitParser.parse(argv[1:])
    run_dir = Path(root) / f"wandb-{sweep_id.replace('/', '-')}" / run_id
    return list(argv) + path_overrides(cfg, run_dir, wandb_online=True)


def agent_main(argv: list[str]) -> int:
    """``python -m gmpi_lightning.sweeps fit ...`` and ``python scripts/sweep_run.py fit ...``: ``gmpi fit`` with,
    under ``wandb agent``, the run's own folder and an online WandbLogger (:func:`agent_arguments`)."""
    from .trainer import run_lightning_cli

    run_lightning_cli(agent_arguments(argv))
    return 0


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
