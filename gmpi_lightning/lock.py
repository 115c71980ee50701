"""One live training run per run folder: ``<default_root_dir>/.run.lock`` holds the holder's pid, host, start time
and command while ``gmpi fit`` runs, so a second run started into the same folder (two ``make`` targets that both
train the 2D prior, a sweep started twice) stops at once naming the holder, instead of writing over the first.

A lock whose process is gone (same host, pid not alive), or left by an earlier attempt of the same SLURM job (a
requeued job restarts with a new pid, possibly on another node), is taken over with a note. Under DDP only global
rank 0 holds it; the other ranks are the same run.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import RunFolderBusy

LOCK_NAME = ".run.lock"


def _global_rank() -> int:
    """This process's global rank, or (under Lightning's own launcher, which starts the other ranks of a node with
    only LOCAL_RANK and NODE_RANK set) a number that is 0 exactly for global rank 0."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    ranks = [os.environ.get(k, "0") for k in ("LOCAL_RANK", "NODE_RANK")]
    return max(int(r) if r.isdigit() else 0 for r in ranks)


def holder(folder: str | os.PathLike) -> dict | None:
    """The lock's record, or None when the folder is free (no lock, or an unreadable one)."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return None


def _stale(record: dict) -> str | None:
    """Why a held lock may be taken over, or None when its holder may still be running."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and record.get("slurm_job_id") == job:
        return f"an earlier attempt of SLURM job {job}"
    if record.get("host") == socket.gethostname():
        try:
            os.kill(int(record.get("pid", -1)), 0)  # signal 0: only whether the process exists
        except ProcessLookupError:
            return f"process {record.get('pid')} is gone"
        except PermissionError:  # it exists, owned by someone else
            pass
    return None


def acquire(folder: str | os.PathLike, argv: list[str] | None = None, echo=print) -> Path | None:
    """Take ``folder``'s lock for this process (released at exit); None on ranks other than 0. Raises
    :class:`RunFolderBusy` when a live run holds it."""
    if _global_rank() != 0:
        return None
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "command": " ".join(argv or sys.argv)}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = holder(folder) or {}
            why = _stale(held)
            if why is None:
                raise RunFolderBusy(
                    f"{folder} is in use by another run: pid {held.get('pid')} on {held.get('host')}, started "
                    f"{held.get('started')}: {held.get('command')!r}. Wait for it to finish, stop it, or train into "
                    f"another folder (--trainer.default_root_dir=...). If that run is gone (e.g. its machine "
                    f"crashed), delete {path}.") from None
            echo(f"{path}: taking over the lock ({why})")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        atexit.register(release, path, os.getpid())
        return path
    raise RunFolderBusy(f"{path}: could not take the lock (another run took it at the same time)")


def release(path: str | os.PathLike, pid: int | None = None) -> None:
    """Remove the lock if this process (or ``pid``) holds it."""
    path = Path(path)
    record = holder(path.parent)
    if record is not None and record.get("pid") == (pid or os.getpid()):
        path.unlink(missing_ok=True)
