"""Print the checkpoint a (re)started run should resume from, or nothing for a fresh start.

    python scripts/resume_ckpt.py fit --config experiments/ffhq256.yaml [--trainer.x=... --model.x=...]

The arguments are those of ``gmpi fit``; the config they resolve to (YAML + overrides, as ``--print_config`` shows
it) names the checkpoint folders. Candidates are ``last*.ckpt`` in every ModelCheckpoint ``dirpath`` and the
``hpc_ckpt_N.ckpt`` files Lightning's SLURM auto-requeue writes into ``trainer.default_root_dir`` when SLURM sends
the requeue signal. The newest one (modification time) wins: after a requeue that is the hpc checkpoint, after a
normal finish or a resubmission it is ``last.ckpt``. Used by ``scripts/slurm_train.sh``; what was found and
why goes to stderr, the path (absolute) alone to stdout.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import yaml


def resolved_config(fit_args: list[str]) -> dict:
    """The config ``gmpi fit <fit_args>`` would run with (LightningCLI's ``--print_config``, in this process)."""
    from gmpi_lightning.trainer import run_lightning_cli

    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when both args= and sys.argv carry arguments
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            run_lightning_cli([*fit_args, "--print_config"])
    finally:
        sys.argv = argv
    config = yaml.safe_load(out.getvalue())
    if not isinstance(config, dict) or "trainer" not in config:
        raise SystemExit(f"resume_ckpt.py: could not resolve the config of: gmpi {' '.join(fit_args)}")
    return config


def checkpoint_dirs(config: dict) -> list[Path]:
    callbacks = config["trainer"].get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    dirs = []
    for cb in callbacks:
        if isinstance(cb, dict) and str(cb.get("class_path", "")).endswith("ModelCheckpoint"):
            dirpath = (cb.get("init_args") or {}).get("dirpath")
            if dirpath is None:
                print("resume_ckpt.py: a ModelCheckpoint has no dirpath (it follows the logger's version folder); "
                      "its last.ckpt is not looked for", file=sys.stderr)
            else:
                dirs.append(Path(dirpath))
    return dirs


def resume_checkpoint(config: dict) -> Path | None:
    """Newest of ``<dirpath>/last*.ckpt`` (each ModelCheckpoint) and ``<default_root_dir>/hpc_ckpt_*.ckpt``."""
    candidates = [p for d in checkpoint_dirs(config) for p in d.glob("last*.ckpt")]
    candidates += Path(config["trainer"].get("default_root_dir") or ".").glob("hpc_ckpt_*.ckpt")
    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name)).resolve()


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "fit":
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    sys.path[0] = str(Path.cwd())  # as for `python -m gmpi_lightning`: class paths may name the checkout's modules
    config = resolved_config(argv)
    ckpt = resume_checkpoint(config)
    dirs = ", ".join(str(d) for d in checkpoint_dirs(config)) or "none"
    if ckpt is None:
        print(f"resume_ckpt.py: no checkpoint to resume from (checkpoint dirs: {dirs}; hpc checkpoints in "
              f"{config['trainer'].get('default_root_dir') or '.'}): starting fresh", file=sys.stderr)
    else:
        print(f"resume_ckpt.py: resuming from {ckpt}", file=sys.stderr)
        print(ckpt)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
