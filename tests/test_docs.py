"""Documentation that runs: every ```python and ```bash block of the README and of docs/*.md is executed here, in a
folder laid out as `make train` leaves it (tiny networks, a few synthetic heads, tiny estimators), unless its info
string says why not (```bash skip: needs FFHQ and GPUs). A refactor that breaks a documented command or snippet
fails this test; a block that cannot run must say so, with a reason.

How a line runs: `gmpi ...` through the CLI's `main` in this process (the same parser and code as the console
script, without a new interpreter per line); `python script.py ...` and `python -c ...` likewise; `VAR=value cmd`
and `export VAR=value` set the variable; `make ...` as `make --dry-run` in the repository (the target exists and
its variables pass the Makefile's checks; nothing trains). Commands that would take minutes on the tiny sandbox get
smaller budgets appended (BUDGET): the flags are the documented ones, only their counts shrink."""

from __future__ import annotations

import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(python|bash)([^\n]*)\n(.*?)^```", re.M | re.S)
ASSIGN = re.compile(r"^[A-Z_][A-Z0-9_]*=")

# Flags appended (argparse keeps the last value) so the sandbox's run stays in seconds; `gmpi poses` also keeps every
# camera (the sandbox's untrained generator is never confident, which the documented threshold rightly rejects).
BUDGET = {
    "benchmarks/bench_invert.py": ["--num", "2", "--steps", "3", "--pti-steps", "2", "--figure-heads", "2"],
    "benchmarks/bench_poses.py": ["--num", "2", "--steps", "3", "--search", "steps=2", "--reader-set", "samples=64",
                                  "--reader-set", "steps=5"],
    "invert": ["--steps", "3", "--pti-steps", "2", "--search-steps", "2"],
    "poses": ["--steps", "3", "--search-steps", "2", "--min-confidence", "0"],
    "evaluate": ["--num-samples", "8"],
}


def blocks() -> list[tuple[str, int, str, str, str]]:
    """(page, line, language, info, code) of every python/bash block."""
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            out.append((page.relative_to(REPO).as_posix(), text[:m.start()].count("\n") + 1, m.group(1),
                        m.group(2).strip(), m.group(3)))
    return out


def commands(code: str) -> list[str]:
    """The shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\s*\\\n\s*", " ", code)
    return [c for c in (line.split(" #")[0].strip() for line in joined.splitlines()) if c and not c.startswith("#")]


RUNNABLE = [b for b in blocks() if not b[3].startswith("skip")]


def test_every_skipped_block_says_why():
    """Rules out a block silently left out of the test: ``skip`` needs a reason after it."""
    bad = [f"{p}:{line}" for p, line, _, info, _ in blocks() if info.startswith("skip") and
           len(info.split(":", 1)[-1].strip()) < 8]
    assert bad == [], f"blocks marked skip without a reason: {bad}"
    readme = [b for b in RUNNABLE if b[0] == "README.md"]
    assert len(readme) >= 7 and len(RUNNABLE) >= 20  # the README's flows and most of docs/ run


def test_commands_join_continuations_and_drop_comments():
    code = "gmpi render --ckpt a.pt \\\n    --seeds 0-1   # two\n# a comment\n\nmake ablations DRY=1\n"
    assert commands(code) == ["gmpi render --ckpt a.pt --seeds 0-1", "make ablations DRY=1"]


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory, shards):
    """A working folder as `make train` leaves it, with tiny stand-ins: runs/synthetic_stylegan2/stylegan2.pt,
    runs/synthetic/gmpi.pt (also as the ablations' full row), data/synthetic32, runs/estimators/synthetic32.pt, an
    image, a photo folder, and an NVlabs pickle under the name the docs use (the repository's fixture)."""
    from datamodules.converters import convert_synthetic
    from datamodules.synthetic import HeadTruth, SyntheticConfig
    from gmpi_lightning.estimator_training import train_estimators
    from gmpi_lightning.export import save_png, to_uint8
    from gmpi_lightning.io import save_converted, save_gmpi_checkpoint
    from gmpi_lightning.nn import Discriminator, Generator
    from gmpi_lightning.nn.gmpi import GMPIGenerator
    from gmpi_lightning.presets import get_preset

    root = tmp_path_factory.mktemp("docs")
    for name in ("experiments", "benchmarks", "scripts"):
        (root / name).symlink_to(REPO / name)
    (root / "ffhq-res256-mirror-paper256-noaug.pkl").symlink_to(
        REPO / "tests" / "fixtures" / "stylegan2_ada" / "network-snapshot-000000.pkl")
    torch.manual_seed(0)
    synth = dict(channel_base=256, channel_max=16, num_fp16_res=0, conv_clamp=None)
    G = Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=32, img_channels=3,
                  mapping_kwargs=dict(num_layers=2), synthesis_kwargs=synth)
    D = Discriminator(c_dim=0, img_resolution=32, img_channels=3, **synth)
    kw = {k: {"class_name": type(m).__name__, "init_kwargs": m.init_kwargs} for k, m in (("G", G), ("D", D),
                                                                                          ("G_ema", G))}
    save_converted({"G": G, "D": D, "G_ema": G, "kwargs": kw}, root / "runs" / "synthetic_stylegan2" / "stylegan2.pt")
    gmpi = GMPIGenerator.from_stylegan2(G, alpha_init_gain=0.3, alpha_init_logit=-1.0).eval()
    for run in ("synthetic", "ablations/synthetic/full"):
        save_gmpi_checkpoint(root / "runs" / run / "gmpi.pt", gmpi, preset=get_preset("synthetic32").to_dict(),
                             extra={"data": "data/synthetic32"})
    data = convert_synthetic(root / "data" / "synthetic32", num=48, resolution=32, seed=5, samples_per_shard=16)
    train_estimators(data, root / "runs" / "estimators" / "synthetic32.pt", steps=10, batch_size=16, pose_width=4,
                     depth_width=2, progress_bar=False)
    truth = HeadTruth(SyntheticConfig(resolution=32, seed=9, preset="synthetic32"), 0)
    views = truth.views([0, 1], torch.tensor([0.2, -0.2]), torch.tensor([0.0, 0.05]))
    save_png(root / "head.png", to_uint8(views["rgb"][0]))
    for folder in ("photos", "my_faces"):
        for i in range(2):
            save_png(root / folder / f"p{i}.png", to_uint8(views["rgb"][i]))
    return root


def _exit_code(call) -> int:
    try:
        result = call()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return result if isinstance(result, int) else 0


def run_line(cmd: str, monkeypatch) -> tuple[int, str]:
    """Run one documented shell line as described in the module docstring; (exit code, what to show on failure)."""
    argv = shlex.split(cmd)
    if argv[0] == "export":
        argv = argv[1:]
    while argv and ASSIGN.match(argv[0]):
        key, value = argv.pop(0).split("=", 1)
        monkeypatch.setenv(key, value)
    if not argv:
        return 0, ""
    prog, args = argv[0], argv[1:]
    if prog in ("gmpi", ".venv/bin/gmpi"):
        from gmpi_lightning.cli import main

        return _exit_code(lambda: main(args + BUDGET.get(args[0], []))), ""
    if prog in ("python", "python3") and args[:1] == ["-c"]:
        exec(compile(args[1], cmd, "exec"), {"__name__": "__main__"})
        return 0, ""
    if prog in ("python", "python3"):
        script, rest = args[0], args[1:] + BUDGET.get(args[0], [])
        monkeypatch.setattr(sys, "argv", [script, *rest])
        monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(script)))  # as `python script.py` does
        return _exit_code(lambda: runpy.run_path(script, run_name="__main__")), ""
    if prog == "make":
        proc = subprocess.run(["make", "--dry-run", "--no-print-directory", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "MAKEFLAGS": ""})
        return proc.returncode, proc.stdout[-1500:] + proc.stderr[-1500:]
    pytest.fail(f"don't know how to run `{cmd}`: mark its block ```bash skip: <why it cannot run here>")


@pytest.mark.parametrize("page,line,lang,info,code", RUNNABLE, ids=[f"{b[0]}:{b[1]}" for b in RUNNABLE])
def test_documented_block_runs(page, line, lang, info, code, sandbox, tmp_path, monkeypatch):
    """Rules out a documented command or snippet that no longer works (a renamed flag, a moved function, a path that
    changed): each runs as written, in its own copy of the sandbox (blocks do not see each other's outputs), and must
    succeed."""
    work = tmp_path / "work"
    shutil.copytree(sandbox, work, symlinks=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.syspath_prepend(str(REPO))
    if lang == "python":
        exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__doc_block__"})
        return
    for cmd in commands(code):
        code_, shown = run_line(cmd, monkeypatch)
        assert code_ == 0, f"{page}:{line}: `{cmd}` exited with {code_}\n{shown}"
