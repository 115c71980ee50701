"""One live run per run folder (gmpi_lightning/lock.py): a second ``gmpi fit`` into a folder a live run holds stops
at once and names the holder; a dead holder's lock is taken over; other DDP ranks take no lock."""

import json
import os
import subprocess
import sys

import pytest

from gmpi_lightning import lock
from gmpi_lightning.cli import main
from tests.conftest import REPO


def test_a_live_holder_refuses_a_second_run_and_a_dead_one_is_taken_over(tmp_path, monkeypatch):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / lock.LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename,
                                                            "started": "earlier", "command": "gmpi fit A"}))
        with pytest.raises(lock.RunFolderBusy, match=f"pid {sleeper.pid}.*gmpi fit A"):
            lock.acquire(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    notes = []
    path = lock.acquire(tmp_path, ["gmpi", "fit", "B"], echo=notes.append)  # the holder is gone: taken over
    assert notes and "is gone" in notes[0] and lock.holder(tmp_path)["pid"] == os.getpid()
    with pytest.raises(lock.RunFolderBusy):  # this live process holds it now
        lock.acquire(tmp_path)
    lock.release(path)
    assert lock.holder(tmp_path) is None
    monkeypatch.setenv("RANK", "1")  # a DDP rank other than 0 is the same run: no lock
    assert lock.acquire(tmp_path) is None and lock.holder(tmp_path) is None


def test_ranks_started_by_lightnings_launcher_take_no_lock(tmp_path, monkeypatch):
    """`gmpi fit --trainer.devices=2` on one node: Lightning starts rank 1 with LOCAL_RANK=1 (no RANK); it must not
    try to take the lock rank 0 holds. Rules out reading only RANK/SLURM_PROCID (rank 1 would stop the run)."""
    for key in ("RANK", "SLURM_PROCID", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert lock.acquire(tmp_path) is None and lock.holder(tmp_path) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    path = lock.acquire(tmp_path)
    assert lock.holder(tmp_path)["pid"] == os.getpid()
    lock.release(path)


def test_requeued_slurm_job_takes_its_own_lock_over(tmp_path, monkeypatch):
    (tmp_path / lock.LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "node-elsewhere", "slurm_job_id": "77"}))
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    with pytest.raises(lock.RunFolderBusy, match="node-elsewhere"):  # another job: cannot tell, refuse
        lock.acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    path = lock.acquire(tmp_path, echo=lambda m: None)
    assert lock.holder(tmp_path)["pid"] == os.getpid()
    lock.release(path)


def test_gmpi_fit_into_a_held_folder_stops_before_training(tmp_path, capsys):
    root = tmp_path / "run"
    root.mkdir()
    (root / lock.LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename,
                                                    "started": "now", "command": "gmpi fit (the first run)"}))
    rc = main(["fit", "--config", str(REPO / "experiments" / "synthetic_stylegan2.yaml"),
               f"--trainer.default_root_dir={root}", "--data.data=/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 1 and "is in use by another run" in err and "the first run" in err
    assert sorted(p.name for p in root.iterdir()) == [lock.LOCK_NAME]  # nothing written into the folder
