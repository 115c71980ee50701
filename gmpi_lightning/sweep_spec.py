"""W&B sweep files: reading and checking them (W&B's format, checked against the ``gmpi fit`` parser), expanding
``grid`` and seeded ``random`` searches, and building each run's command as ``wandb agent`` does. Running them is
:mod:`gmpi_lightning.sweeps`."""

from __future__ import annotations

import difflib
import itertools
import math
import os
import random
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .tables import GOALS

SWEEP_KEYS = ("name", "description", "program", "command", "method", "metric", "parameters", "early_terminate",
              "project", "entity", "run_cap")
METHODS = ("grid", "random", "bayes")

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
