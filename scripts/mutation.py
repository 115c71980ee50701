#!/usr/bin/env python
"""Mutation testing of the recipe's files: ``make mutation`` (all of SELECTION) or ``make mutation FILES=a.py,b.py``.

    python scripts/mutation.py [FILE ...] [--jobs N] [--fresh] [--summary-only]

Each file is mutated by mutmut in a work folder of its own, ``build/mutation/<module>/``, against its own fast test
selection (SELECTION below, the one place that says which tests guard which file). mutmut imports torch and runs the
selection once to learn which tests reach which function, then forks one worker per mutant from that warm process and
runs only the tests that reach the mutated function: a mutant costs its tests' time, not a fresh interpreter.

Resumable: a file's verdicts are kept in its work folder, and a second run tests only the mutants without one
(an interrupted run goes on where it stopped). Survivors and mutants no test reached are tried again on every run,
so a test added to kill one counts at once; the test-to-function map is rebuilt every run. A changed selection, or
``--fresh``, starts the file over.

Writes ``build/mutation/summary.md`` (and ``summary.json``) over every file that has results: counts per file, the
score ``killed / (mutants - equivalent)``, and every survivor as file:line with its change. Survivors that match an
entry of ``scripts/mutation_equivalents.toml`` (same file and function; the change took its ``old`` text out and put
its ``new`` in) are listed with their kind and reason and leave the denominator. docs/TESTING.md quotes this summary.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tokenize
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "mutation"
EQUIVALENTS = ROOT / "scripts" / "mutation_equivalents.toml"
PACKAGES = ("gmpi_lightning", "datamodules", "callbacks")  # copied into each work folder; only the target is mutated

# file -> the pytest arguments (test files or node ids) whose tests guard it. Fast tests only: mutmut runs, per
# mutant, the tests of this selection that reach the mutated function, so a slow test here is paid per mutant.
SELECTION: dict[str, list[str]] = {
    "gmpi_lightning/cameras.py": [
        "tests/test_cameras_planes.py", "tests/test_render.py", "tests/test_geometry_kornia.py",
        "tests/test_properties_cameras.py", "tests/test_geometry_contracts.py",
    ],
    "gmpi_lightning/planes.py": [
        "tests/test_cameras_planes.py", "tests/test_render.py", "tests/test_properties_planes_render.py",
        "tests/test_geometry_contracts.py",
    ],
    "gmpi_lightning/render.py": [
        "tests/test_render.py", "tests/test_properties_planes_render.py", "tests/test_render_contracts.py",
    ],
    "gmpi_lightning/losses.py": [
        "tests/test_losses.py",
        "tests/test_module.py::test_losses_hand_computed", "tests/test_module.py::test_ema_formulas_and_update",
    ],
    "gmpi_lightning/nn/discriminator.py": [
        "tests/test_stylegan2.py", "tests/test_discriminator.py",
        "tests/test_gmpi.py::test_discriminator_parity_and_contract",
        "tests/test_gmpi.py::test_pose_conditioned_d_from_pretrained",
        "tests/test_gmpi.py::test_pose_d_official_start_is_the_2d_logit_times_a_random_gain",
        "tests/test_gmpi.py::test_pose_d_pretrained_logit_start_keeps_the_verdict_and_can_learn_the_pose",
    ],
    "gmpi_lightning/module.py": [
        "tests/test_module.py::test_one_iteration_losses_and_adam_steps",
        "tests/test_module.py::test_worst_view_selection_picks_min_logit",
        "tests/test_module.py::test_shading_schedule_in_training",
        "tests/test_module.py::test_lazy_r1_keeps_the_plain_learning_rate",
        "tests/test_module_phases.py",
        "tests/test_hparams.py::test_checkpoint_holds_plain_groups_and_rebuilds_the_typed_module",
    ],  # tests/test_wiring.py trains a module per test (seconds each): its slips are checked one by one instead
        # (scripts/break_properties.py --only wiring), not per mutant
    "gmpi_lightning/scene.py": [
        "tests/test_scene.py",
        "tests/test_reference.py::test_ground_truth_mpi_renders_its_input_view_back",
        "tests/test_reference.py::test_ground_truth_mpi_turns_like_the_head_and_the_billboard_does_not",
        "tests/test_media.py::test_grid_layout_depth_tiles_and_fixed_cameras",
        "tests/test_invert.py",
        "tests/test_wiring.py::test_generator_gets_normalised_depths_and_the_renderer_metric_ones",
    ],
    "gmpi_lightning/hparams.py": [
        "tests/test_hparams.py", "tests/test_module_phases.py",
    ],
    "gmpi_lightning/nn/gmpi.py": [
        "tests/test_gmpi.py", "tests/test_gmpi_contracts.py",
        "tests/test_wiring.py::test_every_alpha_mode_matches_a_naive_reference",
    ],
}

# mutmut exit codes per mutant -> our categories. A timeout or a crash of the test process is a detection.
KILLED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -11: "crashed", -9: "crashed"}
RETRY = {None, 0, 5, 33, 35}  # not checked, survived, no tests (5, 33), suspicious: tried again on every run


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def work_dir(path: str) -> Path:
    return WORK / module_name(path)


def mutmut_config(path: str, selection: list[str]) -> str:
    """The [tool.mutmut] table for one file (TOML strings written as JSON strings, which TOML accepts)."""
    lst = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"  # noqa: E731
    return "\n".join([
        "", "[tool.mutmut]",
        f"source_paths = {lst(PACKAGES)}",
        f"only_mutate = {lst([path])}",
        f"pytest_add_cli_args_test_selection = {lst(selection)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]',
        "use_git_change_detection = false",  # the work folder is not the repository; we invalidate ourselves
        "",
    ])


# Lightning's save_hyperparameters reads the constructor's arguments from the call stack, from every frame named
# __init__ up the subclass chain; a mutated function runs as "x...__mutmut_orig" behind mutmut's trampoline, so the
# arguments are lost (AttributeError: no attribute 'init_from'). In files that define LightningModules the __init__
# methods are therefore left unmutated (a "pragma: no mutate block" on their def line, in the work folder's copy).
_KEEPS_INIT_FRAMES = re.compile(r"save_hyperparameters|LightningModule")


def _copy_for_mutmut(path: str, dst: Path) -> None:
    """The target's copy mutmut reads, with its __init__ methods kept unmutated where Lightning needs their frames
    (same line numbers: the pragma is a trailing comment after the def's colon; the repository file's times)."""
    source = (ROOT / path).read_text()
    if not _KEEPS_INIT_FRAMES.search(source):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    i = _header_colon_line(lines, item.lineno - 1)
                    lines[i] = lines[i].rstrip("\n") + "  # pragma: no mutate block\n"
    target = dst / path
    target.write_text("".join(lines))
    stat = (ROOT / path).stat()
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _header_colon_line(lines: list[str], start: int) -> int:
    """Index of the line holding the colon that ends the def starting at lines[start] (mutmut reads a function's
    pragma from the comment after that colon)."""
    depth = 0
    tokens = tokenize.generate_tokens(iter(lines[start:]).__next__)
    for tok in tokens:
        if tok.type == tokenize.OP and tok.string in "([{":
            depth += 1
        elif tok.type == tokenize.OP and tok.string in ")]}":
            depth -= 1
        elif tok.type == tokenize.OP and tok.string == ":" and depth == 0:
            return start + tok.start[0] - 1
    raise ValueError(f"no end of the def header after line {start + 1}")


def prepare(path: str, fresh: bool) -> Path:
    """Set up (or refresh) the work folder of ``path``; reset the verdicts that must be tried again."""
    selection = SELECTION[path]
    work = work_dir(path)
    work.mkdir(parents=True, exist_ok=True)
    for name in PACKAGES:  # copied afresh every run (times kept: mutmut regenerates only changed files)
        folder = work / name
        if folder.is_symlink():
            folder.unlink()
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(ROOT / name, folder, ignore=shutil.ignore_patterns("__pycache__"))
    _copy_for_mutmut(path, work)
    if not (work / "tests").is_symlink():
        (work / "tests").symlink_to(ROOT / "tests", target_is_directory=True)
    (work / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + mutmut_config(path, selection))
    key = {"selection": selection, "mutmut": _mutmut_version()}
    stamp = work / "selection.json"
    if fresh or not stamp.exists() or json.loads(stamp.read_text()) != key:
        shutil.rmtree(work / "mutants", ignore_errors=True)
    stamp.write_text(json.dumps(key, indent=1))
    mutants = work / "mutants"
    (mutants / "mutmut-stats.json").unlink(missing_ok=True)  # rebuilt each run: tests may have changed
    meta = mutants / (path + ".meta")
    if meta.exists():
        data = json.loads(meta.read_text())
        data["exit_code_by_key"] = {k: (None if v in RETRY else v) for k, v in data["exit_code_by_key"].items()}
        meta.write_text(json.dumps(data, indent=4))
    if mutants.exists():  # mutmut copies the tests once per run, but never deletes a removed one
        shutil.rmtree(mutants / "tests", ignore_errors=True)
    return work


def _mutmut_version() -> str:
    from importlib.metadata import version

    return version("mutmut")


def run_file(path: str, jobs: int, fresh: bool, only: list[str] | None = None) -> float:
    work = prepare(path, fresh)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MUTANT_UNDER_TEST")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONDONTWRITEBYTECODE="1",
               HYPOTHESIS_PROFILE="mutation")  # tests/conftest.py: failing properties are not shrunk
    mutmut = Path(sys.executable).parent / "mutmut"
    start = time.monotonic()
    with open(work / "mutmut.log", "w") as log:
        names = [f"{module_name(path)}.{pattern}" for pattern in only or []]
        rc = subprocess.call([str(mutmut), "run", "--max-children", str(jobs), *names], cwd=work, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    seconds = time.monotonic() - start
    (work / "last_run.json").write_text(json.dumps({"seconds": round(seconds, 1), "jobs": jobs, "rc": rc}))
    if rc != 0:
        tail = (work / "mutmut.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"mutmut failed on {path} (exit {rc}); end of {work / 'mutmut.log'}:\n{tail}")
    return seconds


# ----------------------------------------------------------------------------------------------- the summary
@dataclass
class Survivor:
    name: str
    function: str  # qualified: Class.method or function
    line: int
    old: str
    new: str
    status: str
    why: str | None = None  # set when declared equivalent
    kind: str = ""  # equivalent | host-only | precision-only (see scripts/mutation_equivalents.toml)


@dataclass
class FileResult:
    path: str
    counts: dict[str, int] = field(default_factory=dict)
    survivors: list[Survivor] = field(default_factory=list)
    seconds: float | None = None
    mutant_seconds: float = 0.0

    @property
    def equivalent(self) -> int:
        return sum(s.why is not None for s in self.survivors)

    @property
    def killed(self) -> int:
        return sum(self.counts.get(k, 0) for k in ("killed", "timeout", "crashed"))

    @property
    def tested(self) -> int:
        return sum(v for k, v in self.counts.items() if k not in ("not checked", "skipped"))

    @property
    def score(self) -> float | None:
        denominator = self.tested - self.equivalent
        return 100.0 * self.killed / denominator if denominator else None


_MUTANT_DEF = re.compile(r"^(x_(?P<func>.+)|xǁ(?P<cls>[^ǁ]+)ǁ(?P<meth>.+))__mutmut_(?P<k>\d+|orig)$")


def _functions(tree: ast.AST) -> dict[str, ast.FunctionDef]:
    """Qualified name (Class.method, function) -> def node, for top-level functions and methods."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            out.update({f"{node.name}.{n.name}": n for n in node.body
                        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)})
    return out


def describe_mutants(path: str, mutated_source: str) -> dict[str, tuple[str, int, str, str]]:
    """mutant key suffix (x_f__mutmut_3) -> (qualified function, line in the real file, removed text, added text)."""
    real = _functions(ast.parse((ROOT / path).read_text()))
    segments: dict[str, dict[str, list[str]]] = {}
    source_lines = mutated_source.splitlines()
    for node in ast.walk(ast.parse(mutated_source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (m := _MUTANT_DEF.match(node.name)):
            qual = m["func"] or f"{m['cls']}.{m['meth']}"
            lines = source_lines[node.lineno - 1:node.end_lineno]
            lines[0] = lines[0].replace(node.name, "__F__", 1)
            segments.setdefault(qual, {})[m["k"]] = lines
    out = {}
    for qual, versions in segments.items():
        orig = versions.get("orig", [])
        first = real[qual].lineno if qual in real else 0
        prefix = f"x_{qual}" if "." not in qual else "xǁ{}ǁ{}".format(*qual.split("."))
        for k, lines in versions.items():
            if k == "orig":
                continue
            matcher = difflib.SequenceMatcher(a=orig, b=lines, autojunk=False)
            ops = [op for op in matcher.get_opcodes() if op[0] != "equal"]
            if not ops:
                out[f"{prefix}__mutmut_{k}"] = (qual, first, "", "")
                continue
            _, i1, i2, j1, j2 = ops[0]
            i2, j2 = max(op[2] for op in ops), max(op[4] for op in ops)
            name = qual.rpartition(".")[2]
            old = " ".join(s.strip() for s in orig[i1:i2]).replace("__F__", name)
            new = " ".join(s.strip() for s in lines[j1:j2]).replace("__F__", name)
            out[f"{prefix}__mutmut_{k}"] = (qual, first + i1, old, new)
    return out


KINDS = ("equivalent", "host-only", "precision-only")


def load_equivalents() -> list[dict]:
    if not EQUIVALENTS.exists():
        return []
    entries = tomllib.loads(EQUIVALENTS.read_text()).get("equivalent", [])
    for e in entries:
        missing = {"file", "function", "old", "new", "why"} - set(e)
        if missing:
            raise SystemExit(f"{EQUIVALENTS}: an entry lacks {sorted(missing)}: {e}")
        if e.get("kind", "equivalent") not in KINDS:
            raise SystemExit(f"{EQUIVALENTS}: kind must be one of {KINDS}: {e}")
    return entries


def _matches(e: dict, path: str, s: Survivor) -> bool:
    """Same file and function, and the mutation took ``old`` out and put ``new`` in."""
    return (e["file"] == path and e["function"] == s.function and e["old"] in s.old and e["old"] not in s.new
            and e["new"] in s.new)


def file_result(path: str, equivalents: list[dict]) -> FileResult | None:
    work = work_dir(path)
    meta = work / "mutants" / (path + ".meta")
    if not meta.exists():
        return None
    from mutmut.stats import status_by_exit_code

    data = json.loads(meta.read_text())
    res = FileResult(path)
    described = describe_mutants(path, (work / "mutants" / path).read_text())
    for key, code in data["exit_code_by_key"].items():
        status = KILLED.get(code) or status_by_exit_code[code]
        res.counts[status] = res.counts.get(status, 0) + 1
        if status in ("survived", "no tests", "suspicious"):
            qual, line, old, new = described.get(key.rpartition(".")[2], ("?", 0, "?", "?"))
            s = Survivor(key.rpartition(".")[2], qual, line, old, new, status)
            entry = next((e for e in equivalents if _matches(e, path, s)), None)
            if entry is not None:
                s.why, s.kind = entry["why"], entry.get("kind", "equivalent")
            res.survivors.append(s)
    res.survivors.sort(key=lambda s: (s.why is not None, s.line))
    res.mutant_seconds = sum(v for v in data.get("durations_by_key", {}).values() if v)
    last = work / "last_run.json"
    if last.exists():
        res.seconds = json.loads(last.read_text())["seconds"]
    return res


def _code(text: str) -> str:
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def write_summary(results: list[FileResult]) -> Path:
    lines = ["# Mutation testing summary (`make mutation`)", "",
             "| file | mutants | killed | survived | declared | score: killed / (mutants - declared) | last run |",
             "|---|---|---|---|---|---|---|"]
    total, complete = FileResult("total"), 0
    for r in results:
        survived = len(r.survivors) - r.equivalent
        score = "n/a" if r.score is None else f"{r.score:.1f} %"
        secs = "" if r.seconds is None else f"{r.seconds / 60:.1f} min"
        partial = f" (partial: {r.counts['not checked']} not tested)" if r.counts.get("not checked") else ""
        row = [f"{r.path}{partial}", r.tested, r.killed, survived, r.equivalent, score, secs]
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
        if partial:
            continue
        complete += 1
        for k, v in r.counts.items():
            total.counts[k] = total.counts.get(k, 0) + v
        total.survivors += r.survivors
        total.seconds = (total.seconds or 0) + (r.seconds or 0)
    if complete > 1:
        score = "n/a" if total.score is None else f"{total.score:.1f} %"
        lines.append(f"| **all fully tested files** | {total.tested} | {total.killed} | "
                     f"{len(total.survivors) - total.equivalent} | {total.equivalent} | {score} | "
                     f"{(total.seconds or 0) / 60:.1f} min |")
    for r in results:
        lines += ["", f"## {r.path}", ""]
        other = {k: v for k, v in r.counts.items() if k not in ("killed", "survived")}
        if other:
            lines += ["Other verdicts: " + ", ".join(f"{k} {v}" for k, v in sorted(other.items())), ""]
        if not r.survivors:
            lines.append("No survivors.")
            continue
        lines += ["| line | function | change | status |", "|---|---|---|---|"]
        for s in r.survivors:
            status = f"{s.kind}: {s.why}" if s.why else f"**{s.status}**"
            lines.append(f"| {r.path}:{s.line} | {s.function} | {_code(s.old)} → {_code(s.new)} | {status} |")
    WORK.mkdir(parents=True, exist_ok=True)
    out = WORK / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    (WORK / "summary.json").write_text(json.dumps([
        {"file": r.path, "counts": r.counts, "killed": r.killed, "tested": r.tested, "equivalent": r.equivalent,
         "score": r.score, "seconds": r.seconds, "mutant_seconds": round(r.mutant_seconds, 1),
         "survivors": [vars(s) for s in r.survivors]} for r in results], indent=1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("files", nargs="*", help=f"files to mutate (default: all of SELECTION): {', '.join(SELECTION)}")
    p.add_argument("--jobs", type=int, default=1, help="mutants tested at a time (mutmut --max-children)")
    p.add_argument("--fresh", action="store_true", help="forget earlier verdicts of these files")
    p.add_argument("--summary-only", action="store_true", help="only rewrite the summary from earlier results")
    p.add_argument("--only", action="append", metavar="GLOB",
                   help="test only the mutants whose name (in the file's module) matches, e.g. 'x_seed_latents*' or "
                        "'xǁScene*' (a short check; repeatable)")
    args = p.parse_args(argv)
    files = [f for arg in args.files for f in arg.split(",") if f] or list(SELECTION)
    unknown = [f for f in files if f not in SELECTION]
    if unknown:
        p.error(f"no test selection for {unknown}; add it to SELECTION in {Path(__file__).relative_to(ROOT)} "
                f"(known: {', '.join(SELECTION)})")
    equivalents = load_equivalents()
    if not args.summary_only:
        for path in files:
            print(f"mutation: {path} (selection: {' '.join(SELECTION[path])})", flush=True)
            seconds = run_file(path, args.jobs, args.fresh, args.only)
            r = file_result(path, equivalents)
            score = "n/a" if r.score is None else f"{r.score:.1f} %"
            print(f"  {r.tested} mutants, {r.killed} killed, {len(r.survivors) - r.equivalent} survived, "
                  f"{r.equivalent} equivalent: {score} in {seconds / 60:.1f} min", flush=True)
    results = [r for r in (file_result(f, equivalents) for f in SELECTION) if r is not None]
    out = write_summary(results)
    print(f"summary: {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
