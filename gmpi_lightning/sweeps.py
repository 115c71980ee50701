"""W&B sweep files (experiments/sweeps/*.yaml, W&B's format) on :mod:`gmpi_lightning.runs`.

    make sweep SWEEP=experiments/sweeps/r1_lr.yaml          # W&B: `wandb sweep` (account + server), then
    make agent SWEEP_ID=entity/project/id COUNT=4           #      `wandb agent` on each worker
    make sweep-local SWEEP=experiments/sweeps/r1_lr.yaml PARALLEL=2   # here: grid / seeded random, no server

``gmpi sweep-local`` checks the file (keys, methods, distributions, ranges; every parameter and run against the
``gmpi fit`` parser) before anything runs, expands it, writes each run's command as ``wandb agent`` does
(``${args}`` -> ``--name=value``) and trains run N in OUT/run-NNN; the last value of every metric lands in
OUT/results.{csv,md}, sorted by the sweep's metric. ``python -m gmpi_lightning.sweeps fit ...`` (the files'
``command``; ``scripts/sweep_run.py`` is their ``program``) is ``gmpi fit`` that, under ``wandb agent``, trains in
runs/sweeps/wandb-<sweep>/<run> with an online WandbLogger.
"""

from __future__ import annotations

import argparse
import difflib
import itertools
import math
import os
import random
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import runs
from .runs import read_metrics, write_table

SWEEP_KEYS = ("name", "description", "program", "command", "method", "metric", "parameters", "early_terminate",
              "project", "entity", "run_cap")
PARAM_KEYS = ("value", "values", "distribution", "min", "max", "q", "probabilities")
GRID = ("constant", "categorical", "int_uniform", "q_uniform")  # what W&B's grid visits
LOCAL = GRID + ("uniform", "log_uniform", "log_uniform_values", "q_log_uniform_values")
WANDB_ONLY = ("q_log_uniform", "inv_log_uniform", "inv_log_uniform_values", "normal", "q_normal", "log_normal",
              "q_log_normal", "beta", "q_beta")
EXAMPLE = "[${env}, ${interpreter}, -m, gmpi_lightning.sweeps, fit, --config, experiments/synthetic.yaml, ${args}]"


class SweepError(ValueError):
    """A sweep file or invocation that cannot run; the message names the file and the field."""


@dataclass
class Sweep:
    path: Path
    name: str
    method: str
    params: dict[str, tuple[str, dict]]  # name -> (distribution, spec), names sorted as W&B orders them
    command: list[str]
    program: str | None = None
    metric: str | None = None
    goal: str = "minimize"
    run_cap: int | None = None
    early_terminate: dict | None = None


def _suggest(word: Any, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check(ok: bool, at: str, msg: str) -> None:
    if not ok:
        raise SweepError(f"{at}: {msg}")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _distribution(at: str, s: Any) -> str:
    """A parameter spec's distribution (W&B's rule when it is left out), after checking the spec."""
    _check(isinstance(s, dict), at, f"expected a mapping such as {{values: [...]}}, {{value: x}} or {{min: a, max: b}}"
                                    f", got {s!r}")
    _check("parameters" not in s, at, "nested `parameters` are not supported; name the option with dots (model.lr)")
    _check(s.get("distribution") not in WANDB_ONLY, at, f"distribution {s.get('distribution')!r} is sampled only by "
           f"W&B's controller (`make sweep`); sweep-local samples {', '.join(LOCAL)}")
    for k in s:
        _check(k in PARAM_KEYS, at, f"unknown key {k!r}{_suggest(k, PARAM_KEYS)}; allowed: {', '.join(PARAM_KEYS)}")
    lo, hi, q = s.get("min"), s.get("max"), s.get("q", 1)
    d = s.get("distribution") or ("constant" if "value" in s else "categorical" if "values" in s else (
        "int_uniform" if type(lo) is int and type(hi) is int else "uniform") if "min" in s and "max" in s else None)
    _check(d is not None, at, f"needs `values: [...]`, `value: x` or `min:`/`max:`; found {', '.join(s) or 'nothing'}")
    _check(d in LOCAL, at, f"unknown distribution {d!r}{_suggest(d, LOCAL + WANDB_ONLY)}; use {', '.join(LOCAL)}")
    _check("probabilities" not in s or d == "categorical", at, "`probabilities` only applies to `values`")
    if d == "constant":
        _check("value" in s, at, "distribution 'constant' needs `value: x`")
    elif d == "categorical":
        values, probs = s.get("values"), s.get("probabilities")
        _check(isinstance(values, list) and values, at, f"needs a non-empty list `values: [a, b, ...]`, got {values!r}")
        _check(probs is None or isinstance(probs, list) and len(probs) == len(values) and all(
            _number(p) and p >= 0 for p in probs) and math.isclose(sum(probs), 1.0, abs_tol=1e-6), at,
            f"`probabilities` must be {len(values)} non-negative numbers summing to 1, got {probs!r}")
    else:
        for key in ("min", "max"):
            _check(key in s, at, f"distribution {d!r} needs `min:` and `max:` (missing {key!r})")
            _check(_number(s[key]), at, f"`{key}` must be a number, got {s[key]!r}" + (
                " (YAML reads 1e-4 as text: write 1.0e-4 or 0.0001)" if isinstance(s[key], str) else ""))
        _check(lo <= hi, at, f"min ({lo}) > max ({hi}); swap them")
        _check(d != "int_uniform" or type(lo) is int and type(hi) is int, at, f"'int_uniform' needs integer min/max, "
               f"got {lo!r}, {hi!r}")
        _check(not d.endswith("_values") or lo > 0, at, f"{d!r} needs min > 0 (values sampled uniformly in log)")
        _check(not d.startswith("q_") or _number(q) and q > 0, at, f"`q` must be a positive number, got {q!r}")
    return d


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a W&B sweep YAML (its structure; :func:`plan` checks it against ``gmpi fit``)."""
    path = Path(path)
    at = str(path)
    _check(path.is_file(), f"sweep file {path}", "not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{at}: not valid YAML: {e}") from e
    _check(isinstance(raw, dict), at, "expected a mapping with method, metric, parameters and command")
    for k in raw:
        _check(k in SWEEP_KEYS, at, f"unknown key {k!r}{_suggest(k, SWEEP_KEYS)}; W&B's are {', '.join(SWEEP_KEYS)}")
    method, metric, params = raw.get("method"), raw.get("metric"), raw.get("parameters")
    _check(method in ("grid", "random", "bayes"), at, f"`method` must be grid, random or bayes, got {method!r}"
           f"{_suggest(method, ('grid', 'random', 'bayes'))}")
    _check(metric is not None or method != "bayes", at, "method 'bayes' needs a `metric: {name, goal}`")
    _check(metric is None or isinstance(metric, dict) and isinstance(metric.get("name"), str) and metric["name"], at,
           f"`metric` needs a `name` (a column of metrics.csv), got {metric!r}")
    _check(metric is None or not set(metric) - {"name", "goal", "target"} and metric.get("goal", "minimize") in (
        "minimize", "maximize"), at, f"`metric` takes name, goal and target; metric.goal must be minimize or maximize,"
        f" got {(metric or {}).get('goal')!r}")
    _check(isinstance(params, dict) and params, at, "`parameters` must be a non-empty mapping of option -> spec")
    _check(isinstance(raw.get("command", []), list), at, f"`command` must be a list, e.g. {EXAMPLE}")
    command = [str(c) for c in raw.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]]
    for c in command:
        macro = c[2:-1] if c.startswith("${") and c.endswith("}") else "env"
        _check(not macro.startswith("args_"), at, f"`command` uses {c}; `gmpi fit` reads --name=value: use ${{args}}")
        _check(macro in ("env", "interpreter", "program", "args") or macro.startswith("envvar:"), at, f"`command` has "
               f"an unknown macro {c}; W&B knows ${{env}}, ${{interpreter}}, ${{program}}, ${{args}}, ${{envvar:NAME}}")
    _check(command.count("${args}") == 1, at, f"`command` must contain ${{args}} exactly once (the parameters, as "
           f"--name=value), found it {command.count('${args}')} times")
    _check("${program}" not in command or raw.get("program"), at, "`command` uses ${program}, there is no `program:`")
    _check("fit" in command[:command.index("${args}")], at, f"`command` must run `gmpi fit` (a `fit` before ${{args}}"
           f"), e.g. {EXAMPLE}; got {command}")
    cap, et = raw.get("run_cap"), raw.get("early_terminate")
    _check(cap is None or type(cap) is int and cap > 0, at, f"`run_cap` must be a positive integer, got {cap!r}")
    _check(et is None or isinstance(et, dict), at, "`early_terminate` must be a mapping (e.g. {type: hyperband})")
    checked = {str(n): (_distribution(f"{at}: parameter {str(n)!r}", s), s) for n, s in sorted(
        params.items(), key=lambda kv: str(kv[0]))}
    return Sweep(path, str(raw.get("name") or path.stem), method, checked, command, raw.get("program"),
                 (metric or {}).get("name"), (metric or {}).get("goal", "minimize"), cap, et)


def grid_values(d: str, s: dict) -> list:
    """The values W&B's grid visits (each once; int_uniform: min..max; q_uniform: ``numpy.arange(min, max, q)``)."""
    if d == "int_uniform":
        return list(range(s["min"], s["max"] + 1))
    if d == "q_uniform":
        return [s["min"] + i * s.get("q", 1) for i in range(max(0, math.ceil((s["max"] - s["min"]) / s.get("q", 1))))]
    return list(dict.fromkeys(s["values"])) if "values" in s else [s["value"]]


def sample(d: str, s: dict, rng: random.Random) -> Any:
    """One draw, with W&B's meaning of each distribution (log_uniform: min/max are natural-log exponents)."""
    if d == "constant":
        return s["value"]
    if d == "categorical":
        probs = s.get("probabilities")
        return rng.choices(s["values"], weights=probs)[0] if probs else s["values"][rng.randrange(len(s["values"]))]
    lo, hi, q = s["min"], s["max"], s.get("q", 1)
    if d == "int_uniform":
        return rng.randint(lo, hi)
    if d in ("uniform", "q_uniform"):
        x = rng.uniform(lo, hi)
    elif d == "log_uniform":
        x = math.exp(rng.uniform(lo, hi))
    else:  # log_uniform_values, q_log_uniform_values
        x = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    if not d.startswith("q_"):
        return x
    x = round(x / q) * q  # a multiple of q, as W&B (may leave [min, max] by up to q/2)
    return int(x) if isinstance(q, int) else x


def expand(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Each run's parameter values ({name: value}, names in W&B's order)."""
    at, n = str(sweep.path), count or sweep.run_cap
    _check(count is None or count >= 1, "--count", f"must be >= 1, got {count}")
    _check(sweep.method != "bayes", at, f"method 'bayes' needs W&B's sweep controller (a server): run `make sweep "
           f"SWEEP={at}` then `make agent SWEEP_ID=...`; sweep-local runs grid and random sweeps")
    if sweep.method == "random":
        _check(n, at, "a random sweep runs until stopped; give --count N (or `run_cap:` in the file)")
        rng = random.Random(seed)
        return [{k: sample(d, s, rng) for k, (d, s) in sweep.params.items()} for _ in range(n)]
    for k, (d, s) in sweep.params.items():
        _check(d in GRID, at, f"parameter {k!r} is continuous ({d}); a grid needs `values: [...]` (or int_uniform / "
               f"q_uniform), or use `method: random`")
        _check("probabilities" not in s, at, f"parameter {k!r}: `probabilities` are not allowed in a grid")
    grid = [dict(zip(sweep.params, v)) for v in itertools.product(*(grid_values(*p) for p in sweep.params.values()))]
    return grid[:n] if n else grid


def format_args(params: dict[str, Any]) -> list[str]:
    """``${args}`` exactly as wandb's agent writes it: ``--name=value`` with Python's str() of the value."""
    return [f"--{name}={value}" for name, value in params.items()]


def build_command(sweep: Sweep, params: dict[str, Any], interpreter: str | None = None,
                  env: dict[str, str] | None = None) -> list[str]:
    """The sweep's ``command`` with W&B's macros filled in (``${interpreter}``: this Python, where wandb takes
    ``python`` from PATH; ``${envvar:NAME}``: the variable, or NAME when unset, as W&B)."""
    env = os.environ if env is None else env
    fill = {"${env}": ["/usr/bin/env"], "${interpreter}": [interpreter or sys.executable],
            "${program}": [str(sweep.program)], "${args}": format_args(params)}
    return [x for t in sweep.command for x in fill.get(t, [env.get(t[9:-1], t[9:-1]) if t[:9] == "${envvar:" else t])]


def fit_arguments(command: list[str]) -> list[str]:
    """What ``gmpi fit`` parses: everything after the first ``fit``."""
    return command[command.index("fit") + 1:]


def plan(sweep: Sweep, out: str | os.PathLike, count: int | None = None, seed: int = 0, extra: Sequence[str] = (),
         interpreter: str | None = None) -> list[runs.Run]:
    """The runs, each resolved by the ``gmpi fit`` parser (a typo or a bad value stops the sweep here, before
    anything runs) and rerooted to OUT/run-NNN."""
    at, values = str(sweep.path), expand(sweep, count=count, seed=seed)
    try:
        known = runs.options(runs.resolve(fit_arguments(build_command(sweep, {}, interpreter)) + list(extra)))
    except Exception as e:  # argparse.ArgumentError, a missing --config file, ...
        raise SweepError(f"{at}: the sweep's command (+ extra overrides) is refused by `gmpi fit`: {str(e).strip()}"
                         f"\n  (paths in `command` are relative to the folder you run from: the repository)") from e
    for k in sweep.params:
        _check(k in known, at, f"parameter {k!r} is not an option of `gmpi fit`{_suggest(k, known)}; list them with "
               f"`gmpi fit --config <config> --print_config`")
    planned = []
    for i, params in enumerate(values, start=1):
        name, command = f"run-{i:0{max(3, len(str(len(values))))}d}", build_command(sweep, params, interpreter)
        try:
            config = runs.resolve(fit_arguments(command) + list(extra))
        except Exception as e:
            hint = ("\n  hint: W&B passes None as the text 'None', which `gmpi fit` does not read as null; write "
                    "the string 'null' in the YAML instead") if None in params.values() else ""
            raise SweepError(f"{at}: {name} ({' '.join(format_args(params))}) would be refused by `gmpi fit`:\n  "
                             f"{str(e).strip()}{hint}") from e
        config = runs.reroot(config, Path(out) / name, name=f"{sweep.name}-{name}", group=sweep.name)
        planned.append(runs.Run(name, Path(out) / name, config, params, command + list(extra)))
    return planned


def run_sweep(sweep: Sweep, out: str | os.PathLike | None = None, parallel: int = 1, count: int | None = None,
              seed: int = 0, extra: Sequence[str] = (), dry_run: bool = False, interpreter: str | None = None,
              echo=print) -> tuple[int, list[dict]]:
    """Plan, train what is not done (``parallel`` at a time), write OUT/results.{csv,md}.
    Returns (0 when every run finished, else 1; the table's rows)."""
    _check(parallel >= 1, "--parallel", f"must be >= 1, got {parallel}")
    out = Path(out or Path("runs") / "sweeps" / sweep.name)
    planned = plan(sweep, out, count=count, seed=seed, extra=extra, interpreter=interpreter)
    echo(f"sweep {sweep.name} ({sweep.path}): {sweep.method}, {len(planned)} runs" + (
        f", metric {sweep.metric} ({sweep.goal})" if sweep.metric else "") + f" -> {out}" + (
        "\n  note: early_terminate is ignored locally (every run trains to its end)" if sweep.early_terminate else ""))
    if dry_run:
        for r in planned:
            echo(f"{r.name}: {shlex.join(r.command)}")
        return 0, []
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.yaml").write_text(sweep.path.read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SWEEP_ID", "WANDB_RUN_ID")}
    if parallel > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    runs.train(planned, lambda r: r.command[:r.command.index("fit") + 1], parallel, env=env, echo=echo)
    metrics = {r.name: read_metrics(r.dir) for r in planned}
    columns = sorted({c for m in metrics.values() for c in m} - {sweep.metric})
    finished = [metrics[r.name] for r in planned if r.status == "finished"]
    if sweep.metric and finished and not any(sweep.metric in m for m in finished):  # a typo: blank, unsorted column
        echo(f"warning: no finished run logged the sweep's metric {sweep.metric!r}{_suggest(sweep.metric, columns)} "
             f"(metric.name in {sweep.path}), so its column is empty and the table is not sorted by it; the runs' "
             f"metrics.csv have: {', '.join(columns) or 'no metrics at all'}")
    rows = []
    for r in planned:
        m = metrics[r.name]
        rows.append({"run": r.name, "status": r.status, **r.params, **({sweep.metric: m.get(sweep.metric)} if
                     sweep.metric else {}), **{c: m.get(c) for c in columns}, "seconds": r.seconds and round(
                     r.seconds, 1), "log": str(r.dir / "log.txt")})
    write_table(rows, out / "results.csv", out / "results.md", sort_by=sweep.metric, goal=sweep.goal,
                title=f"Sweep {sweep.name}: {sweep.method} over {', '.join(sweep.params)}"
                      + (f"; sorted by {sweep.metric} ({sweep.goal})" if sweep.metric else ""))
    failed = sum(r.status != "finished" for r in planned)
    echo(f"results: {out / 'results.md'} and {out / 'results.csv'} ({len(planned) - failed} finished, {failed} failed)")
    return int(failed > 0), rows


def main(argv: list[str]) -> int:
    """gmpi sweep-local SWEEP.yaml [--out DIR] [--parallel N] [--count N] [--seed S] [--dry-run] [-- overrides]"""
    cut = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="gmpi sweep-local", description="Run a W&B sweep file (grid or random) here, "
                                "without the W&B server: one `gmpi fit` per run in OUT/run-NNN, then OUT/results.csv "
                                "and .md sorted by the sweep's metric. Arguments after `--` go to every run.")
    p.add_argument("sweep", help="sweep YAML in W&B's format, e.g. experiments/sweeps/r1_lr.yaml")
    p.add_argument("--out", help="output folder (default: runs/sweeps/<sweep name>)")
    p.add_argument("--parallel", type=int, default=1, help="runs at the same time (default: 1)")
    p.add_argument("--count", type=int, help="number of runs (random: required unless the file has run_cap; "
                                             "grid: only the first N)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random search (default: 0)")
    p.add_argument("--dry-run", action="store_true", help="check the sweep and print every run's command")
    args = p.parse_args(argv[:cut])
    try:
        return run_sweep(load_sweep(args.sweep), args.out, args.parallel, args.count, args.seed, argv[cut + 1:],
                         args.dry_run, echo=lambda msg: print(msg, flush=True))[0]
    except KeyboardInterrupt:
        return 130


def agent_arguments(argv: list[str], env: dict[str, str] | None = None,
                    root: str | os.PathLike = Path("runs") / "sweeps") -> list[str]:
    """Under ``wandb agent`` (WANDB_SWEEP_ID, WANDB_RUN_ID set): ``fit --config RUN/config.yaml`` for the run folder
    root/wandb-<sweep>/<run> (``argv`` resolved and rerooted, the WandbLogger online and named by W&B); every DDP
    rank gets the same one. Otherwise ``argv`` unchanged."""
    env = os.environ if env is None else env
    sweep_id, run_id = env.get("WANDB_SWEEP_ID"), env.get("WANDB_RUN_ID")
    if not (argv[:1] == ["fit"] and sweep_id and run_id):
        return list(argv)
    run_dir = Path(root) / f"wandb-{sweep_id.replace('/', '-')}" / run_id
    config = runs.reroot(runs.resolve(argv[1:]), run_dir, offline=False, name=None)
    return ["fit", "--config", str(runs.write_config(runs.Run(run_id, run_dir, config)))]


def agent_main(argv: list[str]) -> int:
    """``python -m gmpi_lightning.sweeps fit ...``: ``gmpi fit``, under ``wandb agent`` in the run's own folder."""
    from .trainer import run_lightning_cli

    run_lightning_cli(agent_arguments(argv))
    return 0


if __name__ == "__main__":
    sys.exit(agent_main(sys.argv[1:]))
