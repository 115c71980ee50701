"""W&B sweep files (experiments/sweeps/*.yaml, W&B's format) on :mod:`gmpi_lightning.runs` (docs/SWEEPS.md).

``gmpi sweep-local`` checks a file (keys, distributions, ranges; every parameter and run against the ``gmpi fit``
parser) before anything runs, writes each run's command as ``wandb agent`` does (``${args}`` -> ``--name=value``),
trains run N in OUT/run-NNN and tabulates every metric's last value in OUT/results.{csv,md}, sorted by the sweep's
metric. ``python -m gmpi_lightning.sweeps fit ...`` (the files' ``command``) is ``gmpi fit`` that, under ``wandb
agent``, trains in runs/sweeps/wandb-<sweep>/<run> with an online WandbLogger.
"""

import difflib
import itertools
import math
import os
import random
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from . import runs
from .commands import Seeds
from .errors import InputError
from .hparams import nested_option, warn_renamed

SWEEP_KEYS = ("name", "description", "program", "command", "method", "metric", "parameters", "early_terminate",
              "project", "entity", "run_cap")
PARAM_KEYS = ("value", "values", "distribution", "min", "max", "q", "probabilities")
DRAW = {  # one draw of each distribution sweep-local samples, with W&B's meaning (log_uniform: natural-log exponents)
    "constant": lambda s, rng: s["value"],
    "categorical": lambda s, rng: rng.choices(s["values"], weights=s["probabilities"])[0] if s.get("probabilities")
    else s["values"][rng.randrange(len(s["values"]))],
    "int_uniform": lambda s, rng: rng.randint(s["min"], s["max"]),
    "uniform": lambda s, rng: rng.uniform(s["min"], s["max"]),
    "log_uniform": lambda s, rng: math.exp(rng.uniform(s["min"], s["max"])),
    "log_uniform_values": lambda s, rng: math.exp(rng.uniform(math.log(s["min"]), math.log(s["max"]))),
}  # q_uniform, q_log_uniform_values: a draw of uniform, log_uniform_values rounded to a multiple of q
GRID = {  # what W&B's grid visits, each value once (q_uniform: numpy.arange(min, max, q))
    "constant": lambda s: [s["value"]],
    "categorical": lambda s: [v for i, v in enumerate(s["values"]) if v not in s["values"][:i]],
    "int_uniform": lambda s: list(range(s["min"], s["max"] + 1)),
    "q_uniform": lambda s: [s["min"] + i * s["q"] for i in range(max(0, math.ceil((s["max"] - s["min"]) / s["q"])))],
}
LOCAL = (*DRAW, "q_uniform", "q_log_uniform_values")
RANGES = LOCAL[2:]
WANDB_ONLY = ("q_log_uniform", "inv_log_uniform", "inv_log_uniform_values", "normal", "q_normal", "log_normal",
              "q_log_normal", "beta", "q_beta")
SPEC_RULES = (  # (distributions, ok(spec), message): checked in order, the first that fails is the error
    (("constant",), lambda s: "value" in s, "distribution 'constant' needs `value: x`"),
    (("categorical",), lambda s: isinstance(s.get("values"), list) and s["values"],
     "needs a non-empty list `values: [a, b, ...]`, got {values!r}"),
    (("categorical",), lambda s: s.get("probabilities") is None or isinstance(s["probabilities"], list) and len(
        s["probabilities"]) == len(s["values"]) and all(_number(p) and p >= 0 for p in s["probabilities"]) and
        math.isclose(sum(s["probabilities"]), 1.0, abs_tol=1e-6),
     "`probabilities` must be one non-negative number per value, summing to 1, got {probabilities!r}"),
    (LOCAL[:1] + RANGES, lambda s: "probabilities" not in s, "`probabilities` only applies to `values`"),
    (RANGES, lambda s: "min" in s and "max" in s, "distribution {d!r} needs `min:` and `max:` (missing {missing!r})"),
    (RANGES, lambda s: _number(s["min"]) and _number(s["max"]), "`min` and `max` must be a number each, got {min!r}, "
     "{max!r} (YAML reads 1e-4 as text: write 1.0e-4 or 0.0001)"),
    (RANGES, lambda s: s["min"] <= s["max"], "min ({min}) > max ({max}); swap them"),
    (("int_uniform",), lambda s: type(s["min"]) is int and type(s["max"]) is int,
     "'int_uniform' needs integer min/max, got {min!r}, {max!r}"),
    (("log_uniform_values", "q_log_uniform_values"), lambda s: s["min"] > 0,
     "{d!r} needs min > 0 (values sampled uniformly in log)"),
    (("q_uniform", "q_log_uniform_values"), lambda s: _number(s.get("q", 1)) and s.get("q", 1) > 0,
     "`q` must be a positive number, got {q!r}"),
)
SEED_KEYS = ("seed_everything", "data.seed")  # what a seed axis sets: the module's streams and the data order
EXAMPLE = "[${env}, ${interpreter}, -m, gmpi_lightning.sweeps, fit, --config, experiments/synthetic.yaml, ${args}]"


class SweepError(InputError):
    """A sweep file or invocation that cannot run; the message names the file and the field."""


@dataclass
class Sweep:
    """A checked sweep file; ``params``: name -> (distribution, spec), names sorted as W&B orders them."""
    path: Path
    name: str
    method: str
    params: dict[str, tuple[str, dict]]
    command: list[str]
    program: str | None = None
    metric: str | None = None
    goal: str = "minimize"
    run_cap: int | None = None
    early_terminate: dict | None = None


def _suggest(word, options) -> str:
    """The closest option by its last dotted part (``model.lrr``: ``model.optim.lr``), else by its whole name."""
    word, options = str(word), [str(o) for o in options]
    head, _, last = word.rpartition(".")
    by_last = {o.rpartition(".")[2]: o for o in options if o.startswith(head)}
    close = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)] or \
        difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check(ok, at: str, msg: str) -> None:
    if not ok:
        raise SweepError(f"{at}: {msg}")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _distribution(at: str, s) -> str:
    """A parameter spec's distribution (W&B's rule when it is left out), after checking the spec (SPEC_RULES)."""
    _check(isinstance(s, dict), at, f"expected a mapping such as {{values: [...]}}, {{value: x}} or {{min: a, max: b}}"
                                    f", got {s!r}")
    _check("parameters" not in s, at,
           "nested `parameters` are not supported; name the option with dots (model.optim.lr)")
    _check(s.get("distribution") not in WANDB_ONLY, at, f"distribution {s.get('distribution')!r} is sampled only by "
           f"W&B's controller (`make sweep`); sweep-local samples {', '.join(LOCAL)}")
    for k in s:
        _check(k in PARAM_KEYS, at, f"unknown key {k!r}{_suggest(k, PARAM_KEYS)}; allowed: {', '.join(PARAM_KEYS)}")
    d = s.get("distribution") or ("constant" if "value" in s else "categorical" if "values" in s else (
        "int_uniform" if type(s["min"]) is int and type(s["max"]) is int else "uniform") if "min" in s and "max" in s
        else None)
    _check(d is not None, at, f"needs `values: [...]`, `value: x` or `min:`/`max:`; found {', '.join(s) or 'nothing'}")
    _check(d in LOCAL, at, f"unknown distribution {d!r}{_suggest(d, LOCAL + WANDB_ONLY)}; use {', '.join(LOCAL)}")
    fields = {**dict.fromkeys(PARAM_KEYS), "q": 1, **s, "d": d, "missing": "max" if "min" in s else "min"}
    for applies, ok, msg in SPEC_RULES:
        _check(d not in applies or ok(s), at, msg.format(**fields))
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
    method, metric, params, cap = raw.get("method"), raw.get("metric"), raw.get("parameters"), raw.get("run_cap")
    _check(method in ("grid", "random", "bayes"), at, f"`method` must be grid, random or bayes, got {method!r}"
           f"{_suggest(method, ('grid', 'random', 'bayes'))}")
    _check(metric is not None or method != "bayes", at, "method 'bayes' needs a `metric: {name, goal}`")
    _check(metric is None or isinstance(metric, dict) and isinstance(metric.get("name"), str) and metric["name"], at,
           f"`metric` needs a `name` (a column of metrics.csv), got {metric!r}")
    _check(metric is None or not set(metric) - {"name", "goal", "target"} and metric.get("goal", "minimize") in (
        "minimize", "maximize"), at, f"`metric` takes name, goal and target; metric.goal must be minimize or maximize,"
        f" got {(metric or {}).get('goal')!r}")
    _check(isinstance(params, dict) and params, at, "`parameters` must be a non-empty mapping of option -> spec")
    _check(cap is None or type(cap) is int and cap > 0, at, f"`run_cap` must be a positive integer, got {cap!r}")
    _check(isinstance(raw.get("early_terminate") or {}, dict), at, "`early_terminate` must be a mapping")
    _check(isinstance(raw.get("command", []), list), at, f"`command` must be a list, e.g. {EXAMPLE}")
    command = [str(c) for c in raw.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]]
    for c in filter(lambda c: c.startswith("${") and c.endswith("}"), command):
        _check(c in ("${env}", "${interpreter}", "${program}", "${args}") or c.startswith("${envvar:"), at,
               f"`command` uses {c}: sweep-local fills ${{env}}, ${{interpreter}}, ${{program}}, ${{envvar:NAME}} and "
               "${args} (`gmpi fit` reads --name=value: use ${args})")
    _check(command.count("${args}") == 1, at, f"`command` must contain ${{args}} exactly once (the parameters, as "
           f"--name=value), found it {command.count('${args}')} times")
    _check("${program}" not in command or raw.get("program"), at, "`command` uses ${program}, there is no `program:`")
    _check("fit" in command[:command.index("${args}")], at, f"`command` must run `gmpi fit` (a `fit` before ${{args}}"
           f"), e.g. {EXAMPLE}; got {command}")
    renamed = {str(n): nested_option(str(n)) for n in params}  # flat model names of older sweeps
    warn_renamed(at, renamed)
    params = {renamed[str(n)]: s for n, s in params.items()}
    checked = {n: (_distribution(f"{at}: parameter {n!r}", s), s) for n, s in sorted(params.items())}
    return Sweep(path, str(raw.get("name") or path.stem), method, checked, command, raw.get("program"),
                 (metric or {}).get("name"), (metric or {}).get("goal", "minimize"), cap, raw.get("early_terminate"))


def sample(d: str, s: dict, rng: random.Random):
    """One draw (DRAW); a q_ distribution's is a multiple of q, as W&B's (may leave [min, max] by up to q/2)."""
    if not d.startswith("q_"):
        return DRAW[d](s, rng)
    q = s.get("q", 1)
    x = round(DRAW[d[2:]](s, rng) / q) * q
    return int(x) if isinstance(q, int) else x


def expand(sweep: Sweep, count: int | None = None, seed: int = 0) -> list[dict]:
    """Each run's parameter values ({name: value}, names in W&B's order; in a grid the last one varies fastest)."""
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
    axes = [GRID[d]({"q": 1, **s}) for d, s in sweep.params.values()]
    grid = [dict(zip(sweep.params, v)) for v in itertools.product(*axes)]
    return grid[:n] if n else grid


def format_args(params: dict) -> list[str]:
    """``${args}`` exactly as wandb's agent writes it: ``--name=value`` with Python's str() of the value."""
    return [f"--{name}={value}" for name, value in params.items()]


def build_command(sweep: Sweep, params: dict, interpreter: str | None = None, env: dict | None = None) -> list[str]:
    """The sweep's ``command`` with W&B's macros filled in (``${interpreter}``: this Python, where wandb takes
    ``python`` from PATH; ``${envvar:NAME}``: the variable, or NAME when unset, as W&B)."""
    env = os.environ if env is None else env
    fill = {"${env}": ["/usr/bin/env"], "${interpreter}": [interpreter or sys.executable],
            "${program}": [str(sweep.program)], "${args}": format_args(params)}
    return [x for t in sweep.command for x in fill.get(t, [env.get(t[9:-1], t[9:-1]) if t[:9] == "${envvar:" else t])]


def plan(sweep: Sweep, out: str | os.PathLike, count: int | None = None, seed: int = 0, extra=(),
         interpreter: str | None = None, seeds: list[int] | None = None) -> list[runs.Run]:
    """The runs, each resolved by the ``gmpi fit`` parser (a typo or a bad value stops the sweep here, before
    anything runs) and rerooted to OUT/run-NNN; with ``seeds``, each arm once per seed (``seed_everything`` and
    ``data.seed`` set to it; arm-major, so an arm's repeats are neighbours)."""
    at = str(sweep.path)
    clash = sorted(set(SEED_KEYS) & set(sweep.params)) if seeds else []
    _check(not clash, at, f"the sweep varies {clash} itself; drop --seeds or that parameter")
    values = expand(sweep, count=count, seed=seed)
    if seeds:
        _check(len(set(seeds)) == len(seeds), "--seeds", f"repeats a seed: {seeds}")
        values = [{**params, **dict.fromkeys(SEED_KEYS, s)} for params in values for s in seeds]
    fit_args = lambda command: command[command.index("fit") + 1:] + list(extra)  # what `gmpi fit` parses
    try:
        known = runs.options(runs.resolve(fit_args(build_command(sweep, {}, interpreter))))
    except Exception as e:  # argparse.ArgumentError, a missing --config file, ...
        raise SweepError(f"{at}: the sweep's command (+ extra overrides) is refused by `gmpi fit`: {str(e).strip()}"
                         f"\n  (paths in `command` are relative to the folder you run from: the repository)") from e
    for k in sweep.params:  # `config`: one more --config file per run (an overlay: a recipe as one sweep value)
        _check(k in known or k == "config", at,
               f"parameter {k!r} is not an option of `gmpi fit`{_suggest(k, known)}; list them with "
               f"`gmpi fit --config <config> --print_config`")
    planned = []
    for i, params in enumerate(values, start=1):
        name, command = f"run-{i:0{max(3, len(str(len(values))))}d}", build_command(sweep, params, interpreter)
        try:
            config = runs.resolve(fit_args(command))
        except Exception as e:
            hint = ("\n  hint: W&B passes None as the text 'None', which `gmpi fit` does not read as null; write "
                    "the string 'null' in the YAML instead") if None in params.values() else ""
            raise SweepError(f"{at}: {name} ({' '.join(format_args(params))}) would be refused by `gmpi fit`:\n  "
                             f"{str(e).strip()}{hint}") from e
        config = runs.reroot(config, Path(out) / name, name=f"{sweep.name}-{name}", group=sweep.name)
        planned.append(runs.Run(name, Path(out) / name, config, params, command + list(extra)))
    return planned


def run_sweep(sweep: Sweep, out: str | os.PathLike | None = None, parallel: int = 1, count: int | None = None,
              seed: int = 0, extra=(), dry_run: bool = False, interpreter: str | None = None,
              echo=print, seeds: list[int] | None = None) -> tuple[int, list[dict]]:
    """Plan, train what is not done (``parallel`` at a time), write OUT/results.{csv,md} (and, where runs repeat
    an arm with other seeds, OUT/summary.{csv,md}: mean and standard deviation per arm).
    Returns (0 when every run finished, else 1; the table's rows)."""
    _check(parallel >= 1, "--parallel", f"must be >= 1, got {parallel}")
    out, metric = Path(out or Path("runs") / "sweeps" / sweep.name), sweep.metric
    planned = plan(sweep, out, count=count, seed=seed, extra=extra, interpreter=interpreter, seeds=seeds)
    echo(f"sweep {sweep.name} ({sweep.path}): {sweep.method}, {len(planned)} runs" + (
        f", metric {metric} ({sweep.goal})" if metric else "") + f" -> {out}" + (
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
    metrics = {r.name: runs.read_metrics(r.dir) for r in planned}
    columns = sorted({c for m in metrics.values() for c in m} - {metric})
    measured = [metric] * bool(metric) + columns
    finished = [metrics[r.name] for r in planned if r.status == "finished"]
    if metric and finished and not any(metric in m for m in finished):  # a typo: blank, unsorted column
        echo(f"warning: no finished run logged the sweep's metric {metric!r}{_suggest(metric, columns)} "
             f"(metric.name in {sweep.path}), so its column is empty and the table is not sorted by it; the runs' "
             f"metrics.csv have: {', '.join(columns) or 'no metrics at all'}")
    rows = [{"run": r.name, "status": r.status, **r.params, **{c: metrics[r.name].get(c) for c in measured},
             "seconds": r.seconds and round(r.seconds, 1), "log": str(r.dir / "log.txt")} for r in planned]
    runs.write_table(rows, out / "results.csv", out / "results.md", sort_by=metric, goal=sweep.goal,
                     title=f"Sweep {sweep.name}: {sweep.method} over {', '.join(sweep.params)}"
                     + (f"; sorted by {metric} ({sweep.goal})" if metric else ""))
    failed = sum(r.status != "finished" for r in planned)
    echo(f"results: {out / 'results.md'} and {out / 'results.csv'} ({len(planned) - failed} finished, {failed} failed)")
    summary = summarize_seeds(rows, list(sweep.params) + [k for k in SEED_KEYS if seeds], measured)
    if summary:
        runs.write_table(summary, out / "summary.csv", out / "summary.md", sort_by=metric and f"{metric}_mean",
                         goal=sweep.goal, plus_minus={f"{c}_mean": f"{c}_sd" for c in measured},
                         title=f"Sweep {sweep.name}: mean ± sd over seeds, per arm (finished runs)")
        echo(f"per arm over seeds: {out / 'summary.md'}")
    return int(failed > 0), rows


def summarize_seeds(rows: list[dict], params: list[str], metrics: list[str]) -> list[dict]:
    """One row per arm (the parameter values other than the seeds) with ``n`` finished seeds and each metric's
    ``_mean`` and ``_sd`` (sample standard deviation; blank for one seed). Empty when no seed parameter varies."""
    seed_params = [k for k in params if k in SEED_KEYS]
    if not seed_params or len({tuple(r.get(k) for k in seed_params) for r in rows}) < 2:
        return []
    arms: dict[tuple, list[dict]] = {}
    for r in rows:
        arms.setdefault(tuple((k, r.get(k)) for k in params if k not in SEED_KEYS), []).append(r)
    out = []
    for arm, members in arms.items():
        done = [r for r in members if r.get("status") == "finished"]
        row = {**dict(arm), "n": len(done), "seeds": " ".join(str(r.get(seed_params[0])) for r in done)}
        for c in metrics:
            values = [v for v in (runs._number(r.get(c)) for r in done) if v is not None]
            if values:
                mean = sum(values) / len(values)
                sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
                row[f"{c}_mean"], row[f"{c}_sd"] = mean, sd
        out.append(row)
    return out


def sweep_local(sweep: str, out: str | None = None, parallel: int = 1, count: int | None = None, seed: int = 0,
                seeds: Seeds | None = None, dry_run: bool = False, overrides: list[str] = ()) -> int:
    """Run a W&B sweep file (grid or random) here, without the W&B server: one `gmpi fit` per run in OUT/run-NNN, then
    OUT/results.csv and .md sorted by the sweep's metric. Arguments after `--` go to every run.

    Args:
        sweep: sweep YAML in W&B's format, e.g. experiments/sweeps/r1_lr.yaml.
        out: output folder (default: runs/sweeps/<sweep name>).
        parallel: runs at the same time.
        count: runs (random: required unless the file has run_cap; grid: the first N).
        seed: seed of the random search.
        seeds: repeat every run with these seeds (seed_everything and data.seed), e.g. 0,1,2 or 0-2; OUT/summary.md
            then gives mean ± sd per arm.
        dry_run: check the sweep and print every run's command.
    """
    try:
        return run_sweep(load_sweep(sweep), out, parallel, count, seed, list(overrides), dry_run,
                         echo=lambda msg: print(msg, flush=True), seeds=list(seeds) if seeds else None)[0]
    except KeyboardInterrupt:
        return 130


def agent_arguments(argv: list[str], env: dict | None = None, root: str | os.PathLike = "runs/sweeps") -> list[str]:
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
