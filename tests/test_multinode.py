"""Multi-node launch: `make train` through torchrun (2 "nodes" on 127.0.0.1, gloo), `make slurm` and
scripts/slurm_train.sh under a fake SLURM (srun/sbatch/scontrol stand-ins) with resume and auto-requeue, DRY=1,
and the Makefile's error messages. Every training run is a tiny config in a tmp folder; nothing writes to runs/."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from datamodules.converters import convert_synthetic
from tests.conftest import REPO

VENV = Path(sys.prefix)
TINY_MODEL = dict(preset="synthetic32", resolution=16, train_planes=6, views={"per_z": 2}, init_from=None,
                  export_path=None, max_iters=3,
                  arch=dict(z_dim=16, w_dim=16, mapping_layers=2, channel_base=256, channel_max=16))
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "EXP", "EXP_DIR", "GPUS", "NODES", "ARGS", "DRY",
               "SBATCH_ARGS", "GRES", "SLURM_LOGS", "VENV", "PY", "PYTHON")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return convert_synthetic(tmp_path_factory.mktemp("syn") / "s16", num=32, resolution=16, seed=3,
                             samples_per_shard=4)


def tiny_experiment(exp_dir: Path, shards: Path, run: Path, signal_at: int | None = None) -> Path:
    """experiments/synthetic.yaml shrunk to seconds: 16 px, tiny nets, checkpoint every iteration, a LaunchReport."""
    cfg = yaml.safe_load((REPO / "experiments" / "synthetic.yaml").read_text())
    cfg["trainer"].update(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=str(run),
        callbacks=[{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"dirpath": str(run / "checkpoints"), "every_n_train_steps": 2, "save_last": True,
                                  "save_top_k": -1}},
                   {"class_path": "tests.multinode_callbacks.LaunchReport",
                    "init_args": {"out": str(run), "signal_at": signal_at}}])
    cfg["model"].update(TINY_MODEL)
    cfg["data"].update(data=str(shards), batch_size=2, num_workers=0, shuffle_buffer=16)
    exp_dir.mkdir(parents=True, exist_ok=True)
    path = exp_dir / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run.mkdir(parents=True, exist_ok=True)
    return path


def clean_env(**extra) -> dict:
    """This environment without launcher/SLURM/make variables (a DDP test before us may have left some)."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCH_VARS and not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_"))}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", WANDB_MODE="disabled", PYTHONUNBUFFERED="1",
               PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(extra)
    return env


def make(*args: str) -> list[str]:
    """`make` for this checkout and interpreter; -o: never (re)install the venv from a test."""
    return ["make", "--no-print-directory", "-C", str(REPO), "-o", f"{VENV}/.installed", f"VENV={VENV}", *args]


def reports(run: Path, rank: int = 0) -> list[dict]:
    path = run / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------ torchrun, 2 nodes x 1 process
def test_make_train_two_nodes_torchrun(shards, tmp_path):
    """Two `make train NODES=2 NODE_RANK=r` (the target itself, torchrun static rendezvous on 127.0.0.1)."""
    run = tmp_path / "run"
    tiny_experiment(tmp_path / "exp", shards, run)
    port = free_port()
    procs, logs = [], []
    for rank in (0, 1):
        logs.append(open(tmp_path / f"node{rank}.log", "w+"))
        cmd = make("train", "EXP=tiny", f"EXP_DIR={tmp_path / 'exp'}", "GPUS=1", "NODES=2", f"NODE_RANK={rank}",
                   "MASTER_ADDR=127.0.0.1", f"MASTER_PORT={port}", "ARGS=--model.max_iters=2 --data.seed=5")
        procs.append(subprocess.Popen(cmd, cwd=tmp_path, env=clean_env(), stdout=logs[-1], stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    out = []
    for f in logs:
        f.seek(0)
        out.append(f.read())
        f.close()
    assert codes == [0, 0], "\n\n".join(o[-3000:] for o in out)
    # the target ran torchrun with the documented rendezvous, once per node
    for rank, o in enumerate(out):
        assert (f"torchrun --nnodes=2 --node_rank={rank} --nproc_per_node=1 --master_addr=127.0.0.1 "
                f"--master_port={port} -m gmpi_lightning fit --config {tmp_path / 'exp'}/tiny.yaml "
                f"--trainer.devices=1 --trainer.num_nodes=2 --model.max_iters=2 --data.seed=5") in o
    (r0,), (r1,) = reports(run, 0), reports(run, 1)
    for rank, r in enumerate((r0, r1)):
        assert r["rank"] == rank and r["node_rank"] == rank and r["local_rank"] == 0
        assert r["world"] == 2 and r["num_nodes"] == 2 and r["num_devices"] == 1
        assert r["cluster_env"] == "TorchElasticEnvironment"
        assert r["start_iteration"] == 0 and r["iteration"] == 2 and r["global_step"] == 4
        assert r["G"] != r["G_start"]  # it trained
    for net in ("G", "D", "G_ema"):
        assert r0[net] == r1[net], f"{net} differs between the two nodes"
    assert not set(r0["keys"]) & set(r1["keys"])  # each node read its own samples


# --------------------------------------------------------------------------------------- fake SLURM
FAKE_SRUN = """#!/bin/bash
# records its arguments (one per line), drops srun's own options, runs the task in this process
n=$(ls "$FAKE_SLURM_LOG" | grep -c '^srun' || true)
printf '%s\\n' "$@" > "$FAKE_SLURM_LOG/srun$n.args"
while [[ $1 == -* ]]; do shift; done
exec "$@"
"""
FAKE_SBATCH = """#!/bin/bash
# records its arguments, then runs the batch script right here (the test has set the SLURM_* variables)
printf '%s\\n' "$@" > "$FAKE_SLURM_LOG/sbatch.args"
while [[ $1 == -* ]]; do shift; done
exec bash "$@"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_SLURM_LOG/scontrol.log"
"""


def fake_slurm(tmp_path: Path, **extra) -> dict:
    bin_dir, log = tmp_path / "fakebin", tmp_path / "slurmlog"
    bin_dir.mkdir(exist_ok=True)
    log.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("sbatch", FAKE_SBATCH), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = clean_env(SLURM_JOB_ID="4242", SLURM_JOB_NAME="gmpi-tiny", SLURM_NNODES="1", SLURM_NTASKS="1",
                    SLURM_NTASKS_PER_NODE="1", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0",
                    SLURM_NODELIST="127.0.0.1", SLURM_JOB_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=str(REPO),
                    MASTER_PORT=str(free_port()), FAKE_SLURM_LOG=str(log), **extra)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def srun_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "slurmlog"
    return [(log / f"srun{i}.args").read_text().splitlines() for i in range(len(list(log.glob("srun*.args"))))]


def test_slurm_submit_resume_and_auto_requeue(shards, tmp_path):
    """make slurm -> sbatch -> slurm_train.sh -> srun -> Lightning's SLURMEnvironment; a second start resumes from
    last.ckpt; SIGUSR1 (what --signal=SIGUSR1@90 sends) -> hpc checkpoint + `scontrol requeue $SLURM_JOB_ID`."""
    run = tmp_path / "run"
    exp = tiny_experiment(tmp_path / "exp", shards, run, signal_at=4)
    ckdir = run / "checkpoints"

    # 1. submitted through the make target (the fake sbatch runs the batch script in place): a fresh start
    proc = subprocess.run(make("slurm", "EXP=tiny", f"EXP_DIR={exp.parent}", "NODES=1", "GPUS=1",
                               f"SLURM_LOGS={tmp_path / 'logs'}", "ARGS=--model.max_iters=3"),
                          cwd=tmp_path, env=fake_slurm(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    sbatch = (tmp_path / "slurmlog" / "sbatch.args").read_text().splitlines()
    assert sbatch == ["--job-name=gmpi-tiny", "--nodes=1", "--ntasks-per-node=1", "--gres=gpu:1",
                      f"--output={tmp_path / 'logs'}/%x-%j.out", "scripts/slurm_train.sh", str(exp),
                      "--model.max_iters=3"]
    assert (tmp_path / "logs").is_dir()
    assert "no checkpoint to resume from" in proc.stderr
    (srun1,) = srun_calls(tmp_path)
    assert srun1[0] == "--kill-on-bad-exit=1" and srun1[1].endswith("python") and srun1[2:4] == ["-m", "gmpi_lightning"]
    assert srun1[4:] == ["fit", "--config", str(exp), "--trainer.num_nodes=1", "--trainer.devices=1",
                         "--model.max_iters=3"]  # no --ckpt_path: nothing to resume
    (first,) = reports(run)
    assert first["cluster_env"] == "SLURMEnvironment" and first["auto_requeue"] is True
    assert first["requeue_signal"] == int(signal.SIGUSR1) and first["sigusr1_handler"] == "_HandlersCompose"
    assert first["world"] == 1 and first["start_iteration"] == 0 and first["iteration"] == 3
    assert first["ckpt_path"] is None
    assert torch.load(ckdir / "last.ckpt", weights_only=False)["gmpi_state"]["iteration"] == 3
    assert not (tmp_path / "slurmlog" / "scontrol.log").exists()

    # 2. started again with more iterations: resumes from last.ckpt; at iteration 4 SLURM "sends" SIGUSR1
    proc = subprocess.run(["bash", str(REPO / "scripts" / "slurm_train.sh"), str(exp), "--model.max_iters=5"],
                          cwd=tmp_path, env=fake_slurm(tmp_path, SLURM_RESTART_COUNT="1"), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming from {ckdir / 'last.ckpt'}" in proc.stderr and "job 4242 (restart 1)" in proc.stderr
    srun2 = srun_calls(tmp_path)[1]
    assert srun2[4:] == ["fit", "--config", str(exp), "--trainer.num_nodes=1", "--trainer.devices=1",
                         "--model.max_iters=5", f"--ckpt_path={ckdir / 'last.ckpt'}"]
    second = reports(run)[1]
    assert second["ckpt_path"] == str(ckdir / "last.ckpt")
    assert second["start_iteration"] == 3 and second["iteration"] == 5 and second["global_step"] == 10  # continued
    assert second["G_start"] == first["G"] and second["G"] != first["G"]  # from the saved weights, then trained
    # Lightning's auto-requeue: the checkpoint of the moment of the signal, then the requeue of this job
    assert (tmp_path / "slurmlog" / "scontrol.log").read_text().split() == ["requeue", "4242"]
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", weights_only=False)
    assert hpc["gmpi_state"]["iteration"] == 4 and hpc["global_step"] == 8


def test_resume_picks_the_newest_checkpoint(tmp_path):
    """`python -m gmpi_lightning.runs resume`: dirs from the resolved config (YAML + overrides, as `gmpi fit`); the
    newest of last*.ckpt (Lightning's `--ckpt_path last`) and hpc_ckpt_N (SLURM auto-requeue)."""
    from gmpi_lightning import runs

    run = tmp_path / "run"
    exp = tiny_experiment(tmp_path / "exp", tmp_path / "no-data-needed", run)
    config = runs.resolve(["--config", str(exp), f"--trainer.default_root_dir={tmp_path / 'root'}"])
    assert config["trainer"]["default_root_dir"] == str(tmp_path / "root")  # the override, not the YAML's
    assert runs.resume_checkpoint(config) is None
    (run / "checkpoints").mkdir()
    (tmp_path / "root").mkdir()
    files = {"last": run / "checkpoints" / "last.ckpt", "hpc1": tmp_path / "root" / "hpc_ckpt_1.ckpt",
             "hpc2": tmp_path / "root" / "hpc_ckpt_2.ckpt", "lastv1": run / "checkpoints" / "last-v1.ckpt",
             "other": run / "checkpoints" / "epoch=0-step=9.ckpt"}
    for f in files.values():
        f.write_bytes(b"x")

    def order(*names):  # mtimes in this order, 10 s apart
        for i, name in enumerate(names):
            os.utime(files[name], ns=(10**9 * (1000 + 10 * i),) * 2)
        return runs.resume_checkpoint(config)

    assert order("hpc1", "hpc2", "lastv1", "other", "last") == files["last"]  # resubmitted after a finish
    assert order("last", "lastv1", "hpc1", "other", "hpc2") == files["hpc2"]  # requeued
    assert order("hpc1", "hpc2", "last", "other", "lastv1") == files["lastv1"]
    proc = subprocess.run([sys.executable, "-m", "gmpi_lightning.runs", "resume", "validate"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "usage" in proc.stderr


def test_slurm_script_errors(tmp_path):
    script = str(REPO / "scripts" / "slurm_train.sh")
    proc = subprocess.run(["bash", script, "nope"], cwd=REPO, env=fake_slurm(tmp_path), capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 2 and "no experiment config 'experiments/nope.yaml'" in proc.stderr
    assert "ffhq256" in proc.stderr and not list((tmp_path / "slurmlog").glob("srun*"))
    env = fake_slurm(tmp_path)
    del env["SLURM_NTASKS_PER_NODE"]
    proc = subprocess.run(["bash", script, "ffhq256"], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "--ntasks-per-node" in proc.stderr


# ---------------------------------------------------------------------------------- DRY=1, errors
def test_dry_run_prints_command_and_resolved_config(tmp_path):
    proc = subprocess.run(make("train", "EXP=ffhq256", "GPUS=8", "NODES=4", "NODE_RANK=3", "MASTER_ADDR=10.0.0.1",
                               "ARGS=--model.max_iters=7 --model.optim.r1_gamma=2.5", "DRY=1"),
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "# command (node 3 of 4; run it on every node with its NODE_RANK):"
    assert lines[1] == (f"{VENV}/bin/torchrun --nnodes=4 --node_rank=3 --nproc_per_node=8 --master_addr=10.0.0.1 "
                        "--master_port=29500 -m gmpi_lightning fit --config experiments/ffhq256.yaml "
                        "--trainer.devices=8 --trainer.num_nodes=4 --model.max_iters=7 --model.optim.r1_gamma=2.5")
    assert lines[2] == "# resolved config:"
    config = yaml.safe_load("\n".join(lines[3:]))
    assert int(config["trainer"]["devices"]) == 8 and config["trainer"]["num_nodes"] == 4
    assert config["model"]["class_path"] == "gmpi_lightning.module.GMPIModule"  # the default model class
    model = config["model"]["init_args"]
    assert model["max_iters"] == 7 and model["optim"]["r1_gamma"] == 2.5
    assert model["train_planes"] == 32  # the rest comes from experiments/ffhq256.yaml
    assert {"trainer", "model", "data"} <= set(config) and "Initializing distributed" not in proc.stderr  # not run


def test_dry_run_commands_without_running(tmp_path):
    """The launcher each GPUS/NODES combination picks (make -n: the commands, without the config dump)."""
    def cmd(*args):
        proc = subprocess.run(make("-n", "train", "EXP=ffhq256", *args), cwd=tmp_path, env=clean_env(),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert cmd() == f"{VENV}/bin/python -m gmpi_lightning fit --config experiments/ffhq256.yaml"
    assert cmd("GPUS=1", "ARGS=--model.optim.lr=0.001") == (f"{VENV}/bin/python -m gmpi_lightning fit --config "
                                                      "experiments/ffhq256.yaml --trainer.devices=1 "
                                                      "--trainer.num_nodes=1 --model.optim.lr=0.001")
    assert cmd("GPUS=8") == (f"{VENV}/bin/torchrun --standalone --nproc_per_node=8 -m gmpi_lightning fit --config "
                             "experiments/ffhq256.yaml --trainer.devices=8 --trainer.num_nodes=1")


def test_slurm_dry_run(tmp_path):
    """DRY=1 for `make slurm`: the sbatch line and the config command (make -n: listed, not run; the config dump
    itself is the same `--print_config` as the train test above checks)."""
    proc = subprocess.run(make("-n", "slurm", "EXP=ffhq512", "NODES=4", "GPUS=8", "SBATCH_ARGS=--time=2-0",
                               "ARGS=--model.max_iters=9", "DRY=1"),
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[:2] == ["# command:", "sbatch --job-name=gmpi-ffhq512 --nodes=4 --ntasks-per-node=8 --gres=gpu:8 "
                         "--output=runs/slurm/%x-%j.out --time=2-0 scripts/slurm_train.sh experiments/ffhq512.yaml "
                         "--model.max_iters=9"]
    assert lines[2].startswith("# resolved config")
    assert lines[3].split() == [f"{VENV}/bin/python", "-m", "gmpi_lightning", "fit", "--config",
                                "experiments/ffhq512.yaml", "--trainer.num_nodes=4", "--trainer.devices=8",
                                "--model.max_iters=9", "--print_config"]
    assert not any(line.startswith(("sbatch", "mkdir")) for line in lines[3:])  # DRY: nothing submitted
    header = (REPO / "scripts" / "slurm_train.sh").read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in header and "#SBATCH --requeue" in header


@pytest.mark.parametrize("args, message", [
    (["train", "EXP=nope"], "unknown experiment EXP=nope: there is no experiments/nope.yaml. Experiments in "
                            "experiments/: afhqcat512 ffhq1024 ffhq256 ffhq512"),
    (["slurm", "EXP=nope", "DRY=1"], "unknown experiment EXP=nope"),
    (["slurm", "NODES=2", "GPUS=8"], "EXP=NAME is required. Experiments in experiments/: afhqcat512"),
    (["train", "EXP=ffhq256", "NODES=2", "NODE_RANK=0", "MASTER_ADDR=h"], "NODES=2 needs GPUS=<processes per node>"),
    (["train", "EXP=ffhq256", "NODES=2", "GPUS=8", "NODE_RANK=0"], "NODES=2 needs MASTER_ADDR="),
    (["train", "EXP=ffhq256", "NODES=2", "GPUS=8", "MASTER_ADDR=h"], "NODES=2 needs NODE_RANK=0..1"),
    (["train", "EXP=ffhq256", "NODES=2", "GPUS=8", "MASTER_ADDR=h", "NODE_RANK=2"], "got '2'"),
    (["train", "EXP=ffhq256", "GPUS=0"], "GPUS=0: expected a number"),
    (["train", "EXP=ffhq256", "NODES=two", "GPUS=8"], "NODES=two: expected a number"),
    (["ablations", "DATA=data/ffhq256"], "make ablations: DATA=data/ffhq256 is not a base experiment. Use "
                                         "DATA=synthetic or one of experiments/*.yaml: afhqcat512 ffhq1024 ffhq256"),
    (["ablations", "DATA=nope", "DRY=1"], "make ablations: DATA=nope is not a base experiment"),
])
def test_make_errors(tmp_path, args, message):
    proc = subprocess.run(make(*args), cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "gmpi_lightning" not in proc.stdout  # nothing was launched


def makefile_targets() -> tuple[set[str], set[str]]:
    """(names on the Makefile's .PHONY lines, names of its plain `name:` rules, i.e. not files or patterns)."""
    text = (REPO / "Makefile").read_text()
    phony = {t for line in text.splitlines() if line.startswith(".PHONY:") for t in line.split(":", 1)[1].split()}
    rules = set(re.findall(r"^([A-Za-z][A-Za-z0-9_-]*):(?!=)", text, flags=re.M))
    return phony, rules


def test_help_lists_the_targets():
    proc = subprocess.run(make("help"), env=clean_env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    described = {}
    for line in re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout).splitlines():
        name, _, text = line.strip().partition(" ")
        described[name] = text.strip()
    phony, rules = makefile_targets()
    assert {"train", "slurm", "test", "install", "ablations", "sweep-local", "help"} <= phony
    assert rules == phony  # every command target is .PHONY, and every .PHONY name has a rule
    assert sorted(t for t in phony if not described.get(t)) == []  # each with a `## description` in make help


def fake_venv(path: Path, refuse_dry_run: bool = False) -> Path:
    """A VENV whose bin/gmpi and bin/python only log their arguments (one line per call), so a recipe that would
    build data or train runs nothing; with refuse_dry_run, `gmpi ... --dry-run` fails as on a bad sweep file."""
    (path / "bin").mkdir(parents=True)
    (path / ".installed").touch()
    fail = 'case " $* " in *" --dry-run "*) exit 2;; esac\n' if refuse_dry_run else ""
    for name in ("gmpi", "python"):
        tool = path / "bin" / name
        tool.write_text(f'#!/bin/sh\necho "{name} $*" >> "{path}/calls.log"\n{fail}exit 0\n')
        tool.chmod(0o755)
    return path


def fake_make(venv: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = ["make", "--no-print-directory", "-C", str(REPO), "-o", f"{venv}/.installed", f"VENV={venv}", *args]
    return subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=60)


def calls(venv: Path) -> list[str]:
    log = venv / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("args, expected", [
    (["ablations", "DATA=data/synthetic32", "DRY=1"], "gmpi ablations --data synthetic --dry-run"),
    (["ablations", "DATA=ffhq256", "DRY=1", "ARGS=--rows full"], "gmpi ablations --data ffhq256 --dry-run --rows full"),
    (["sweep-local", "DRY=1", "SWEEP=experiments/sweeps/shading.yaml"],
     "gmpi sweep-local experiments/sweeps/shading.yaml --parallel 1 --dry-run"),
])
def test_dry_ablations_and_sweeps_build_nothing(tmp_path, args, expected):
    venv = fake_venv(tmp_path / "venv")
    proc = fake_make(venv, *args)
    assert proc.returncode == 0, proc.stderr
    assert calls(venv) == [expected.strip()]  # the one dry-run call: no data, no 2D StyleGAN2 training


def test_sweep_local_checks_the_sweep_before_building(tmp_path):
    venv = fake_venv(tmp_path / "venv", refuse_dry_run=True)
    proc = fake_make(venv, "sweep-local", "ARGS=--count 2")
    assert proc.returncode != 0
    assert calls(venv) == ["gmpi sweep-local experiments/sweeps/r1_lr.yaml --dry-run --count 2"]  # stopped there
    listed = fake_make(fake_venv(tmp_path / "venv2"), "-n", "sweep-local").stdout.splitlines()
    check = next(i for i, line in enumerate(listed) if "--dry-run" in line)
    build = next(i for i, line in enumerate(listed) if "synthetic32/.ready" in line)
    assert check < build < len(listed) - 1
    assert listed[-1].rstrip().endswith("/gmpi sweep-local experiments/sweeps/r1_lr.yaml --parallel 1")


# ------------------------------------------------------------------------ a W&B sweep run on 2 processes
def test_sweep_agent_run_with_two_ddp_processes(shards, tmp_path):
    """What `wandb agent` starts for a sweep whose command adds --trainer.devices=2: the program with the sweep's
    parameter on its command line and WANDB_SWEEP_ID/WANDB_RUN_ID set. Lightning re-runs that command for rank 1,
    so both ranks must get the parameter (from argv, not wandb.config) and the same per-run folder."""
    run = tmp_path / "yaml-run"
    exp = tiny_experiment(tmp_path / "exp", shards, run)
    env = clean_env(WANDB_SWEEP_ID="sw1", WANDB_RUN_ID="r7", WANDB_MODE="offline")
    cmd = [sys.executable, str(REPO / "scripts" / "sweep_run.py"), "fit", "--config", str(exp),
           "--trainer.devices=2", "--model.max_iters=2", "--model.optim.lr=0.0005"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    agent_dir = tmp_path / "runs" / "sweeps" / "wandb-sw1" / "r7"
    (r0,), (r1,) = reports(agent_dir, 0), reports(agent_dir, 1)
    assert r0["world"] == r1["world"] == 2 and r0["iteration"] == r1["iteration"] == 2
    assert r0["G"] == r1["G"] and r0["G"] != r0["G_start"]  # one lr on both ranks, or the weights would differ
    ckpt = torch.load(agent_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["hyper_parameters"]["optim"]["lr"] == 0.0005
    assert not (run / "rank0.jsonl").exists()  # nothing went to the YAML's own folder


def test_make_estimators_needs_the_data_only(tmp_path):
    """`make estimators` trains the pose/depth CNNs from the data's ground truth: it must not train a 2D StyleGAN2
    first (nor any `gmpi fit`), which would also race a `make train` into the same run folder."""
    proc = subprocess.run(make("-n", "estimators"), cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "gmpi estimators train --data data/synthetic32" in proc.stdout
    assert "fit" not in proc.stdout and "stylegan2" not in proc.stdout
