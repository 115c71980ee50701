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
the run reports to its sweep. The sweep files in ``experiments/sweeps/`` use it as their program.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import itertools
import json
import math
import os
import random
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SWEEP_KEYS = ("name", "description", "program", "command", "method", "metric", "parameters", "early_terminate",
              "project", "entity", "run_cap")
METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
PARAM_KEYS = ("value", "values", "distribution", "min", "max", "q", "probabilities")
# W&B distributions that sweep-local samples, and the ones only W&B's controller knows
LOCAL_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                       "log_uniform_values", "q_log_uniform_values")
WANDB_ONLY_DISTRIBUTIONS = ("q_log_uniform", "inv_log_uniform", "inv_log_uniform_values", "normal", "q_normal",
                            "log_normal", "q_log_normal", "beta", "q_beta")
GRID_DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "q_uniform")  # what W&B's grid search accepts
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]  # wandb agent's default
UNSUPPORTED_ARG_MACROS = ("args_no_hyphens", "args_no_boolean_flags", "args_json", "args_json_file",
                          "args_no_equals", "args_append_hydra", "args_override_hydra")
STATUS_FILE = "status.json"  # the finished marker


class SweepError(ValueError):
    """A sweep file or invocation that cannot run; the message names the file and the field."""


# ----------------------------------------------------------------------------------------------- loading
@dataclass
class Param:
    name: str
    distribution: str
    spec: dict

    @property
    def continuous(self) -> bool:
        return self.distribution not in GRID_DISTRIBUTIONS


@dataclass
class Sweep:
    path: Path
    name: str
    method: str
    params: list[Param]
    command: list[str]
    program: str | None = None
    metric: str | None = None
    goal: str = "minimize"
    run_cap: int | None = None
    early_terminate: dict | None = None
    raw: dict = field(default_factory=dict)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _infer_distribution(spec: dict) -> str | None:
    """W&B's rule when ``distribution`` is left out."""
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    if "min" in spec and "max" in spec:
        return "int_uniform" if isinstance(spec["min"], int) and isinstance(spec["max"], int) else "uniform"
    return None


def _check_param(where: str, name: str, spec: Any) -> Param:
    at = f"{where}: parameter {name!r}"
    if not isinstance(spec, dict):
        raise SweepError(f"{at}: expected a mapping such as {{values: [...]}}, {{value: x}} or {{min: a, max: b}}, "
                         f"got {spec!r}")
    if "parameters" in spec:
        raise SweepError(f"{at}: nested `parameters` are not supported; name the option with dots instead "
                         f"(e.g. model.lr), which is what `gmpi fit` reads")
    if spec.get("distribution") in WANDB_ONLY_DISTRIBUTIONS:
        raise SweepError(f"{at}: distribution {spec['distribution']!r} is sampled only by W&B's controller "
                         f"(`make sweep`); sweep-local samples {', '.join(LOCAL_DISTRIBUTIONS)}")
    unknown = [k for k in spec if k not in PARAM_KEYS]
    if unknown:
        raise SweepError(f"{at}: unknown key {unknown[0]!r}{_suggest(str(unknown[0]), PARAM_KEYS)}; "
                         f"allowed: {', '.join(PARAM_KEYS)}")
    dist = spec.get("distribution") or _infer_distribution(spec)
    if dist is None:
        raise SweepError(f"{at}: needs `values: [...]`, `value: x` or `min:`/`max:`; found only "
                         f"{', '.join(spec) or 'nothing'}")
    if dist not in LOCAL_DISTRIBUTIONS:
        raise SweepError(f"{at}: unknown distribution {dist!r}"
                         f"{_suggest(str(dist), LOCAL_DISTRIBUTIONS + WANDB_ONLY_DISTRIBUTIONS)}; "
                         f"use one of {', '.join(LOCAL_DISTRIBUTIONS)}")
    if dist == "constant":
        if "value" not in spec:
            raise SweepError(f"{at}: distribution 'constant' needs `value: x`")
    elif dist == "categorical":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{at}: needs a non-empty list `values: [a, b, ...]`, got {values!r}")
        probs = spec.get("probabilities")
        if probs is not None:
            if (not isinstance(probs, list) or len(probs) != len(values) or not all(_is_number(p) and p >= 0
                                                                                   for p in probs)
                    or not math.isclose(sum(probs), 1.0, abs_tol=1e-6)):
                raise SweepError(f"{at}: `probabilities` must be {len(values)} non-negative numbers summing to 1, "
                                 f"got {probs!r}")
    else:
        for key in ("min", "max"):
            if key not in spec:
                raise SweepError(f"{at}: distribution {dist!r} needs `min:` and `max:` (missing {key!r})")
            if not _is_number(spec[key]):
                hint = (" (YAML reads 1e-4 as text: write 1.0e-4 or 0.0001)" if isinstance(spec[key], str) else "")
                raise SweepError(f"{at}: `{key}` must be a number, got {spec[key]!r}{hint}")
        lo, hi = spec["min"], spec["max"]
        if lo > hi:
            raise SweepError(f"{at}: min ({lo}) > max ({hi}); swap them")
        if dist == "int_uniform" and not (isinstance(lo, int) and isinstance(hi, int)):
            raise SweepError(f"{at}: 'int_uniform' needs integer min/max, got {lo!r}, {hi!r}")
        if dist in ("log_uniform_values", "q_log_uniform_values") and lo <= 0:
            raise SweepError(f"{at}: {dist!r} needs min > 0 (the bounds are values, sampled uniformly in log), "
                             f"got min {lo}")
        if dist.startswith("q_"):
            q = spec.get("q", 1)
            if not _is_number(q) or q <= 0:
                raise SweepError(f"{at}: `q` must be a positive number, got {q!r}")
    if "probabilities" in spec and dist != "categorical":
        raise SweepError(f"{at}: `probabilities` only applies to `values`")
    return Param(name=name, distribution=dist, spec=spec)


def _check_command(where: str, command: Any, program: Any) -> list[str]:
    if command is None:
        command = list(DEFAULT_COMMAND)
    if not isinstance(command, list) or not command:
        raise SweepError(f"{where}: `command` must be a list, e.g. [${{env}}, ${{interpreter}}, -m, "
                         f"gmpi_lightning.sweeps, fit, --config, experiments/synthetic.yaml, ${{args}}]")
    command = [str(c) for c in command]
    for c in command:
        if c.startswith("${") and c.endswith("}"):
            macro = c[2:-1]
            if macro in UNSUPPORTED_ARG_MACROS:
                raise SweepError(f"{where}: `command` uses {c}; `gmpi fit` (LightningCLI) reads --name=value, so "
                                 f"use ${{args}}")
            if macro not in ("env", "interpreter", "program", "args") and not macro.startswith("envvar:"):
                raise SweepError(f"{where}: `command` has an unknown macro {c}; W&B knows ${{env}}, "
                                 f"${{interpreter}}, ${{program}}, ${{args}} and ${{envvar:NAME}}")
    if command.count("${args}") != 1:
        raise SweepError(f"{where}: `command` must contain ${{args}} exactly once (where the parameters go as "
                         f"--name=value), found it {command.count('${args}')} times")
    if "${program}" in command and not program:
        raise SweepError(f"{where}: `command` uses ${{program}} but the sweep has no `program:`")
    if "fit" not in command[:command.index("${args}")]:
        raise SweepError(f"{where}: `command` must run `gmpi fit` (a `fit` before ${{args}}), e.g. "
                         f"[${{env}}, ${{interpreter}}, -m, gmpi_lightning.sweeps, fit, --config, "
                         f"experiments/synthetic.yaml, ${{args}}]; got {command}")
    return command


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a W&B sweep YAML (structure only; :func:`plan` also checks names against ``gmpi fit``)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise SweepError(f"{path}: expected a mapping with method/metric/parameters/command, got {type(raw).__name__}")
    where = str(path)
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    if unknown:
        raise SweepError(f"{where}: unknown key {unknown[0]!r}{_suggest(str(unknown[0]), SWEEP_KEYS)}; "
                         f"a W&B sweep has {', '.join(SWEEP_KEYS)}")
    method = raw.get("method")
    if method not in METHODS:
        raise SweepError(f"{where}: `method` must be one of {', '.join(METHODS)}, got {method!r}"
                         f"{_suggest(str(method), METHODS)}")
    metric, goal = None, "minimize"
    if raw.get("metric") is not None:
        m = raw["metric"]
        if not isinstance(m, dict) or not isinstance(m.get("name"), str) or not m["name"]:
            raise SweepError(f"{where}: `metric` needs a `name` (a column of metrics.csv, e.g. val/loss_d), "
                             f"got {m!r}")
        extra = [k for k in m if k not in ("name", "goal", "target")]
        if extra:
            raise SweepError(f"{where}: `metric` has unknown key {extra[0]!r}; allowed: name, goal, target")
        metric, goal = m["name"], m.get("goal", "minimize")
        if goal not in GOALS:
            raise SweepError(f"{where}: `metric.goal` must be minimize or maximize, got {goal!r}")
    elif method == "bayes":
        raise SweepError(f"{where}: method 'bayes' needs a `metric: {{name, goal}}`")
    params = raw.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{where}: `parameters` must be a non-empty mapping of option name -> "
                         f"{{values|value|min,max}}")
    checked = [_check_param(where, str(name), spec) for name, spec in sorted(params.items(), key=lambda kv: str(kv[0]))]
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or isinstance(run_cap, bool) or run_cap < 1):
        raise SweepError(f"{where}: `run_cap` must be a positive integer, got {run_cap!r}")
    et = raw.get("early_terminate")
    if et is not None and not isinstance(et, dict):
        raise SweepError(f"{where}: `early_terminate` must be a mapping (e.g. {{type: hyperband, min_iter: 3}})")
    return Sweep(path=path, name=str(raw.get("name") or path.stem), method=method, params=checked,
                 command=_check_command(where, raw.get("command"), raw.get("program")),
                 program=raw.get("program"), metric=metric, goal=goal, run_cap=run_cap, early_terminate=et, raw=raw)


# --------------------------------------------------------------------------------------------- expansion
def grid_values(p: Param) -> list:
    """The values a grid visits for one parameter, as W&B's grid search (int_uniform: min..max inclusive;
    q_uniform: min, min+q, ... below max, i.e. ``numpy.arange(min, max, q)``)."""
    s = p.spec
    if p.distribution == "constant":
        return [s["value"]]
    if p.distribution == "categorical":
        out = []
        for v in s["values"]:  # W&B de-duplicates repeated values
            if v not in out:
                out.append(v)
        return out
    if p.distribution == "int_uniform":
        return list(range(s["min"], s["max"] + 1))
    if p.distribution == "q_uniform":
        q = s.get("q", 1)
        n = max(0, math.ceil((s["max"] - s["min"]) / q))
        return [s["min"] + i * q for i in range(n)]
    raise SweepError(f"parameter {p.name!r} is continuous ({p.distribution}): a grid needs `values: [...]` "
                     f"(or int_uniform / q_uniform); use method: random for continuous ranges")


def sample(p: Param, rng: random.Random) -> Any:
    """One draw of a parameter, with W&B's meaning of each distribution."""
    s = p.spec
    d = p.distribution
    if d == "constant":
        return s["value"]
    if d == "categorical":
        if s.get("probabilities"):
            return rng.choices(s["values"], weights=s["probabilities"])[0]
        return s["values"][rng.randrange(len(s["values"]))]
    lo, hi = s["min"], s["max"]
    if d == "int_uniform":
        return rng.randint(lo, hi)
    if d == "uniform":
        return rng.uniform(lo, hi)
    if d == "log_uniform":  # W&B: min/max are natural-log exponents
        return math.exp(rng.uniform(lo, hi))
    if d == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    q = s.get("q", 1)
    x = rng.uniform(lo, hi) if d == "q_uniform" else math.exp(rng.uniform(math.log(lo), math.log(hi)))
    x = round(x / q) * q  # rounded to a multiple of q, as W&B (may leave [min, max] by up to q/2)
    return int(x) if isinstance(q, int) else x


def expand(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Each run's parameter values ({name: value}, names sorted as W&B orders them)."""
    where = str(sweep.path)
    if count is not None and count < 1:
        raise SweepError(f"--count must be >= 1, got {count}")
    if sweep.method == "bayes":
        raise SweepError(f"{where}: method 'bayes' needs W&B's sweep controller (a server): run "
                         f"`make sweep SWEEP={where}` then `make agent SWEEP_ID=...`; sweep-local runs grid "
                         f"and random sweeps")
    if sweep.method == "grid":
        axes = []
        for p in sweep.params:
            if p.continuous:
                raise SweepError(f"{where}: parameter {p.name!r} is continuous ({p.distribution}); a grid needs "
                                 f"`values: [...]` (or int_uniform / q_uniform), or use `method: random`")
            if p.spec.get("probabilities"):
                raise SweepError(f"{where}: parameter {p.name!r}: `probabilities` are not allowed in a grid")
            axes.append(grid_values(p))
        runs = [dict(zip([p.name for p in sweep.params], combo)) for combo in itertools.product(*axes)]
        cap = count or sweep.run_cap
        return runs[:cap] if cap else runs
    n = count or sweep.run_cap
    if not n:
        raise SweepError(f"{where}: a random sweep runs until stopped; give --count N (or `run_cap:` in the file)")
    rng = random.Random(seed)
    return [{p.name: sample(p, rng) for p in sweep.params} for _ in range(n)]


# ----------------------------------------------------------------------------------------------- commands
def format_args(params: dict[str, Any]) -> list[str]:
    """``${args}`` exactly as wandb's agent writes it: ``--name=value`` with Python's str() of the value."""
    return [f"--{name}={value}" for name, value in params.items()]


def build_command(sweep: Sweep, params: dict[str, Any], interpreter: str | None = None,
                  env: dict[str, str] | None = None) -> list[str]:
    """The sweep's ``command`` with W&B's macros filled in: ``${env}`` -> /usr/bin/env, ``${interpreter}`` -> this
    Python (wandb: ``python`` from PATH), ``${program}``, ``${args}``, ``${envvar:NAME}`` (whole tokens only)."""
    env = os.environ if env is None else env
    out: list[str] = []
    for tok in sweep.command:
        if tok.startswith("${") and tok.endswith("}"):
            macro = tok[2:-1]
            if macro == "env":
                out.append("/usr/bin/env")
            elif macro == "interpreter":
                out.append(interpreter or sys.executable)
            elif macro == "program":
                out.append(str(sweep.program))
            elif macro == "args":
                out += format_args(params)
            else:  # envvar:NAME; W&B leaves the name when the variable is unset
                out.append(env.get(macro[len("envvar:"):], macro[len("envvar:"):]))
        else:
            out.append(tok)
    return out


def fit_arguments(command: list[str]) -> list[str]:
    """What ``gmpi fit`` parses: everything after the first ``fit``."""
    return command[command.index("fit") + 1:]


class _ParserReady(Exception):
    def __init__(self, parser):
        super().__init__("parser ready")
        self.parser = parser


class FitParser:
    """The ``gmpi fit`` LightningCLI parser, built without parsing or instantiating anything (about 0.1 s after
    the imports); ``parse`` checks a run's arguments exactly as ``gmpi fit`` will and returns the config."""

    _parser = None
    _lock = threading.Lock()

    @classmethod
    def get(cls):
        with cls._lock:
            if cls._parser is None:
                from . import trainer

                base = trainer.GMPICLI

                class Probe(base):
                    def init_parser(self, **kwargs):
                        return super().init_parser(**{**kwargs, "exit_on_error": False})

                    def parse_arguments(self, parser, args):
                        raise _ParserReady(parser)

                trainer.GMPICLI = Probe  # run_lightning_cli's own arguments build the parser
                try:
                    trainer.run_lightning_cli([])
                except _ParserReady as ready:
                    cls._parser = ready.parser
                finally:
                    trainer.GMPICLI = base
                if cls._parser is None:
                    raise RuntimeError("could not build the `gmpi fit` parser")
            return cls._parser

    @classmethod
    def parse(cls, args: list[str]):
        """(namespace, plain dict) of ``gmpi fit ARGS``; raises ``argparse.ArgumentError`` on a bad argument."""
        parser = cls.get()
        cfg = parser.parse_args(["fit", *args])
        plain = yaml.safe_load(parser.dump(cfg, skip_validation=True))["fit"]
        return cfg["fit"], plain

    @classmethod
    def known_options(cls, args: list[str]) -> list[str]:
        ns, _ = cls.parse(args)
        return list(ns.keys())


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


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return ""
    return str(v)


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
        status = _read_json(r.dir / STATUS_FILE)
        previous = _read_json(r.dir / "run.json")
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
            shown = " ".join(f"{k}={_fmt(v)}" for k, v in r.params.items())
            if r.returncode == 0:
                value = read_metrics(r.dir).get(sweep.metric) if sweep.metric else None
                score = f"  {sweep.metric}={_fmt(value)}" if sweep.metric else ""
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
    write_table(rows, out / "results.csv", out / "results.md", sort_by=sweep.metric, goal=sweep.goal,
                title=f"Sweep {sweep.name}: {sweep.method} over {', '.join(p.name for p in sweep.params)}"
                      + (f"; sorted by {sweep.metric} ({sweep.goal})" if sweep.metric else ""))
    failed = [r for r in runs if r.returncode != 0]
    echo(f"results: {out / 'results.md'} and {out / 'results.csv'} ({len(runs) - len(failed)} finished, "
         f"{len(failed)} failed)")
    return (1 if failed else 0), rows


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


# -------------------------------------------------------------------------------------------------- tables
def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def write_table(rows: list[dict], csv_path: str | os.PathLike | None, md_path: str | os.PathLike | None,
                sort_by: str | None = None, goal: str = "minimize", title: str | None = None) -> list[dict]:
    """Write ``rows`` (dicts; columns in first-seen order) as CSV and as a markdown table. With ``sort_by``
    both are sorted by that column (``goal`` minimize: ascending, maximize: descending); rows without a finite
    number there keep their order at the end. Returns the rows in the written order."""
    if goal not in GOALS:
        raise ValueError(f"goal must be minimize or maximize, got {goal!r}")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    ordered = list(rows)
    if sort_by:
        sign = -1.0 if goal == "maximize" else 1.0
        scored = [(i, _number(r.get(sort_by))) for i, r in enumerate(ordered)]
        ordered = [rows[i] for i, x in sorted(scored, key=lambda t: (t[1] is None, sign * (t[1] or 0.0), t[0]))]
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in ordered:
                w.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
    if md_path is not None:
        def cell(v):
            return _fmt(v).replace("|", "\\|").replace("\n", " ")

        numeric = [all(_number(r.get(c)) is not None or r.get(c) in (None, "") for r in ordered)
                   and any(_number(r.get(c)) is not None for r in ordered) for c in columns]
        lines = [f"# {title}", ""] if title else []
        lines.append("| " + " | ".join(cell(c) for c in columns) + " |")
        lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in ordered]
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text("\n".join(lines) + "\n")
    return ordered


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


def _agent_main(argv: list[str]) -> int:
    from .trainer import run_lightning_cli

    run_lightning_cli(agent_arguments(argv))
    return 0


if __name__ == "__main__":
    sys.exit(_agent_main(sys.argv[1:]))
