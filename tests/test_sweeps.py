"""W&B sweep files run locally: validation, grid/random expansion, wandb's ${args}, run folders, tables, real runs."""

import csv
import functools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gmpi_lightning import cli, runs, sweeps
from gmpi_lightning.commands import Seeds, parse_seeds
from gmpi_lightning.sweeps import SweepError
from tests.conftest import REPO, TINY_ARCH

BASE_COMMAND = ["${env}", "${interpreter}", "-m", "gmpi_lightning.sweeps", "fit", "--config",
                str(REPO / "experiments" / "synthetic.yaml"), "${args}"]


def _write(tmp_path, cfg, name="s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _sweep(**over):
    cfg = {"method": "grid", "metric": {"name": "val/loss_d", "goal": "maximize"},
           "parameters": {"model.optim.lr": {"values": [0.001, 0.002]}}, "command": list(BASE_COMMAND)}
    cfg.update(over)
    return cfg


# ------------------------------------------------------------------------------------------ validation
BAD = {
    "unknown top-level key": (dict(paramters={}), ["unknown key 'paramters'", "did you mean 'parameters'"]),
    "bad method": (dict(method="grdi"), ["`method`", "'grdi'", "did you mean 'grid'"]),
    "bad goal": (dict(metric={"name": "loss_d", "goal": "lowest"}), ["metric.goal", "'lowest'"]),
    "metric without name": (dict(metric={"goal": "minimize"}), ["`metric` needs a `name`"]),
    "bad distribution": (dict(parameters={"model.optim.lr": {"distribution": "unifrom", "min": 0.001, "max": 0.01}}),
                         ["'model.optim.lr'", "unknown distribution 'unifrom'", "did you mean 'uniform'"]),
    "server-only distribution": (dict(parameters={"model.optim.lr": {"distribution": "normal", "mu": 0, "sigma": 1}}),
                                 ["'model.optim.lr'", "'normal'", "W&B's controller", "make sweep"]),
    "server-only distribution 2": (
        dict(parameters={"model.optim.lr": {"distribution": "q_normal", "min": 0, "max": 1}}),
        ["'model.optim.lr'", "'q_normal'", "W&B's controller"]),
    "min > max": (dict(parameters={"model.optim.lr": {"min": 0.1, "max": 0.01}}),
                  ["'model.optim.lr'", "min (0.1) > max (0.01)"]),
    "missing values": (dict(parameters={"model.optim.lr": {"distribution": "categorical"}}),
                       ["'model.optim.lr'", "non-empty list `values"]),
    "empty values": (dict(parameters={"model.optim.lr": {"values": []}}),
                     ["'model.optim.lr'", "non-empty list `values"]),
    "nothing to sample": (dict(parameters={"model.optim.lr": {"q": 2}}), ["'model.optim.lr'", "needs `values: [...]`"]),
    "missing max": (dict(parameters={"model.optim.lr": {"distribution": "uniform", "min": 0.1}}),
                    ["'model.optim.lr'", "missing 'max'"]),
    "unknown param key": (dict(parameters={"model.optim.lr": {"vals": [1, 2]}}),
                          ["'model.optim.lr'", "unknown key 'vals'", "did you mean 'values'"]),
    "log bounds <= 0": (dict(method="random", parameters={"model.optim.lr": {"distribution": "log_uniform_values",
                                                                      "min": 0.0, "max": 0.1}}),
                        ["'model.optim.lr'", "needs min > 0"]),
    "int_uniform floats": (dict(parameters={"model.train_planes": {"distribution": "int_uniform", "min": 4,
                                                                   "max": 8.5}}),
                           ["'model.train_planes'", "integer min/max"]),
    "1e-4 read as text": (dict(parameters={"model.optim.lr": {"min": "1e-4", "max": 0.01}}),
                          ["'model.optim.lr'", "must be a number", "write 1.0e-4"]),
    "bad probabilities": (dict(method="random", parameters={"model.optim.lr": {"values": [1, 2],
                                                                        "probabilities": [0.5, 0.6]}}),
                          ["'model.optim.lr'", "`probabilities`"]),
    "nested parameters": (dict(parameters={"model": {"parameters": {"lr": {"values": [1]}}}}),
                          ["'model'", "nested `parameters`", "model.optim.lr"]),
    "no ${args}": (dict(command=BASE_COMMAND[:-1]), ["${args} exactly once"]),
    "hydra-style args": (dict(command=BASE_COMMAND[:-1] + ["${args_no_hyphens}"]),
                         ["${args_no_hyphens}", "use ${args}"]),
    "unknown macro": (dict(command=BASE_COMMAND + ["${foo}"]), ["uses ${foo}: sweep-local fills"]),
    "not gmpi fit": (dict(command=["${env}", "${interpreter}", "train.py", "${args}"]), ["must run `gmpi fit`"]),
    "program macro without program": (dict(command=["${env}", "${interpreter}", "${program}", "fit", "${args}"]),
                                      ["${program}", "no `program:`"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_invalid_sweep_files_name_the_file_and_field(case, tmp_path):
    over, expected = BAD[case]
    path = _write(tmp_path, _sweep(**over))
    with pytest.raises(SweepError) as err:
        sweeps.load_sweep(path)
    msg = str(err.value)
    assert str(path) in msg, msg
    for part in expected:
        assert part in msg, f"{part!r} not in: {msg}"


def test_method_specific_errors(tmp_path):
    cont = _write(tmp_path, _sweep(parameters={"model.optim.lr": {"min": 0.001, "max": 0.01}}), "grid.yaml")
    with pytest.raises(SweepError, match=r"grid.yaml: parameter 'model.optim.lr' is continuous \(uniform\)"):
        sweeps.expand(sweeps.load_sweep(cont))
    probs = _write(tmp_path, _sweep(parameters={"model.optim.lr": {"values": [1, 2], "probabilities": [0.5, 0.5]}}),
                   "p.yaml")
    with pytest.raises(SweepError, match="'model.optim.lr': `probabilities` are not allowed in a grid"):
        sweeps.expand(sweeps.load_sweep(probs))
    bayes = _write(tmp_path, _sweep(method="bayes"), "bayes.yaml")
    with pytest.raises(SweepError, match=r"bayes.yaml: method 'bayes' needs W&B's sweep controller.*make sweep"):
        sweeps.expand(sweeps.load_sweep(bayes))
    rnd = _write(tmp_path, _sweep(method="random"), "random.yaml")
    with pytest.raises(SweepError, match=r"random.yaml: a random sweep runs until stopped; give --count"):
        sweeps.expand(sweeps.load_sweep(rnd))
    assert len(sweeps.expand(sweeps.load_sweep(_write(tmp_path, _sweep(method="random", run_cap=3), "c.yaml")))) == 3


# ------------------------------------------------------------------------------------------- expansion
def test_grid_expansion_count_order_and_values(tmp_path):
    params = {"model.optim.r1_gamma": {"values": [1.0, 10.0, 100.0]},
              "model.optim.lr": {"values": [0.001, 0.002, 0.001]}, "model.shading.enabled": {"value": False},
              "model.train_planes": {"distribution": "int_uniform", "min": 2, "max": 4}}
    sw = sweeps.load_sweep(_write(tmp_path, _sweep(parameters=params)))
    runs = sweeps.expand(sw)
    assert len(runs) == 3 * 2 * 1 * 3 == 18  # the repeated lr value is visited once, as W&B's grid
    # names sorted (W&B's order), the last one varies fastest
    assert list(runs[0]) == ["model.optim.lr", "model.optim.r1_gamma", "model.shading.enabled", "model.train_planes"]
    assert runs[0] == {"model.optim.lr": 0.001, "model.optim.r1_gamma": 1.0, "model.shading.enabled": False,
                       "model.train_planes": 2}
    assert [r["model.train_planes"] for r in runs[:4]] == [2, 3, 4, 2]
    assert runs[3]["model.optim.r1_gamma"] == 10.0 and runs[9]["model.optim.lr"] == 0.002
    combos = {(r["model.optim.lr"], r["model.optim.r1_gamma"], r["model.train_planes"]) for r in runs}
    assert len(combos) == 18 and all(r["model.shading.enabled"] is False for r in runs)
    assert sweeps.expand(sw, count=5) == runs[:5]
    # q_uniform on a grid: numpy.arange(min, max, q) as W&B (max excluded)
    q = sweeps.load_sweep(_write(tmp_path, _sweep(parameters={"model.alpha.init_gain": {
        "distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25}}), "q.yaml"))
    assert [r["model.alpha.init_gain"] for r in sweeps.expand(q)] == [0.0, 0.25, 0.5, 0.75]


def test_random_expansion_is_seeded_and_within_bounds(tmp_path):
    params = {
        "model.optim.lr": {"distribution": "log_uniform_values", "min": 0.0001, "max": 0.01},
        "model.optim.r1_gamma": {"distribution": "uniform", "min": 1.0, "max": 10.0},
        "model.train_planes": {"distribution": "int_uniform", "min": 4, "max": 8},
        "model.alpha.init_gain": {"distribution": "q_uniform", "min": 0.0, "max": 1.0, "q": 0.25},
        "model.views.selection": {"values": ["worst", "random"]},
        "model.ema.kimg": {"distribution": "log_uniform", "min": -2.0, "max": 0.0},
        "model.max_iters": {"value": 5},
    }
    sw = sweeps.load_sweep(_write(tmp_path, _sweep(method="random", parameters=params)))
    runs = sweeps.expand(sw, count=400, seed=7)
    assert runs == sweeps.expand(sw, count=400, seed=7)  # reproducible
    assert runs != sweeps.expand(sw, count=400, seed=8)
    assert runs[:10] == sweeps.expand(sw, count=10, seed=7)  # a longer sweep starts with the shorter one
    lr = [r["model.optim.lr"] for r in runs]
    assert 1e-4 <= min(lr) and max(lr) <= 1e-2
    logs = [math.log10(x) for x in lr]
    # log-uniform over 2 decades: log10 uniform on [-4, -2] (mean -3, sd 0.577 -> s.e. 0.029 for 400 draws);
    # a uniform draw in value would put only 9% below 1e-3 and the mean log near -2.3
    assert sum(logs) / len(logs) == pytest.approx(-3.0, abs=0.12)
    assert sum(x < 1e-3 for x in lr) / len(lr) == pytest.approx(0.5, abs=0.1)
    assert min(logs) < -3.8 and max(logs) > -2.2
    r1 = [r["model.optim.r1_gamma"] for r in runs]
    assert 1.0 <= min(r1) and max(r1) <= 10.0 and sum(r1) / len(r1) == pytest.approx(5.5, abs=0.5)
    assert {r["model.train_planes"] for r in runs} == {4, 5, 6, 7, 8}
    assert all(isinstance(r["model.train_planes"], int) for r in runs)
    assert {r["model.alpha.init_gain"] for r in runs} <= {0.0, 0.25, 0.5, 0.75, 1.0}
    assert {r["model.views.selection"] for r in runs} == {"worst", "random"}
    ema = [r["model.ema.kimg"] for r in runs]  # log_uniform: min/max are natural-log exponents (W&B)
    assert math.exp(-2.0) <= min(ema) and max(ema) <= 1.0
    assert all(r["model.max_iters"] == 5 for r in runs)


# -------------------------------------------------------------------------------------------- commands
def test_args_and_command_identical_to_wandb_agent(tmp_path, monkeypatch):
    from wandb.sdk.launch.sweeps import utils as wandb_utils

    params = {"model.optim.lr": 1e-05, "model.optim.r1_gamma": 10.0, "model.train_planes": 16,
              "model.shading.enabled": True,
              "model.discriminator.pose_conditioning": False, "model.views.selection": "worst",
              "model.optim.betas": [0.0, 0.99],
              "model.optim.grad_clip": None, "model.alpha.init_gain": 0.30000000000000004}
    wandb_args = wandb_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    assert sweeps.format_args(params) == wandb_args["args"]
    assert sweeps.format_args(params)[:3] == ["--model.optim.lr=1e-05", "--model.optim.r1_gamma=10.0",
                              "--model.train_planes=16"]
    # the whole command, filled in the way wandb's agent does it (wandb_agent.Agent._command_run)
    monkeypatch.setenv("GMPI_SWEEP_TEST_CFG", "experiments/synthetic.yaml")
    command = ["${env}", "${interpreter}", "${program}", "fit", "--config", "${envvar:GMPI_SWEEP_TEST_CFG}", "${args}",
               "--trainer.devices=1"]
    sw = sweeps.load_sweep(_write(tmp_path, _sweep(program="gmpi_lightning/sweeps.py", command=command)))
    sweep_vars = dict(wandb_args, interpreter=["python"], program=[sw.program], env=["/usr/bin/env"])
    expected = []
    for c in wandb_utils.create_sweep_command(list(command)):
        expected += (sweep_vars.get(c[2:-1]) or []) if c.startswith("${") and c.endswith("}") else [c]
    assert sweeps.build_command(sw, params, interpreter="python") == expected
    assert expected[:6] == ["/usr/bin/env", "python", "gmpi_lightning/sweeps.py", "fit", "--config",
                            "experiments/synthetic.yaml"]
    assert sweeps.build_command(sw, params)[1] == sys.executable  # locally: this Python


def test_reroot_puts_every_output_in_the_run_folder():
    cfg = {"trainer": {"default_root_dir": "runs/x",
                       "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "runs/x", "name": "csv", "prefix": ""}},
                                  {"class_path": "lightning.pytorch.loggers.WandbLogger",
                                   "init_args": {"save_dir": "runs/x", "name": "x", "offline": True,
                                                 "project": "p"}}],
                       "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                      "init_args": {"dirpath": "runs/x/checkpoints", "save_last": True,
                                                    "every_n_train_steps": 400, "verbose": False}},
                                     {"class_path": "tests.nowhere.Media", "init_args": {"out_dir": "runs/x/media",
                                                                                        "other": "runs/xy"}}]},
           "model": {"export_path": "runs/x/gmpi.pt", "init_from": "runs/other/sg2.pt", "notes": "runs/x/n.txt"},
           "data": {"data": "data/synthetic32"}}
    before = json.dumps(cfg)
    out = runs.reroot(cfg, "OUT/run-002", name="s-run-002", group="s")
    assert json.dumps(cfg) == before  # a copy
    assert out["trainer"]["default_root_dir"] == "OUT/run-002"
    assert out["model"] == {"export_path": "OUT/run-002/gmpi.pt", "init_from": "runs/other/sg2.pt",
                            "notes": "OUT/run-002/n.txt"}  # inputs stay where they are
    assert out["data"] == {"data": "data/synthetic32"}
    csv_logger, wandb_logger = out["trainer"]["logger"]
    assert csv_logger["init_args"] == {"save_dir": "OUT/run-002", "name": "csv", "prefix": ""}
    assert wandb_logger["init_args"] == {"save_dir": "OUT/run-002", "name": "s-run-002", "offline": True,
                                         "project": "p", "group": "s"}
    ckpt, media = out["trainer"]["callbacks"]
    assert ckpt["init_args"] == {"dirpath": "OUT/run-002/checkpoints", "save_last": True, "every_n_train_steps": 400,
                                 "verbose": False}
    assert media["init_args"] == {"out_dir": "OUT/run-002/media", "other": "runs/xy"}  # runs/xy is not under runs/x
    w = runs.reroot(cfg, "R", offline=False, name=None)["trainer"]["logger"][1]["init_args"]
    assert w["offline"] is False and w["name"] is None
    # a model given as class_path + init_args (LightningCLI's subclass form) is rerooted the same way
    sub = runs.reroot({"trainer": {}, "model": {"class_path": "m.M", "init_args": {"export_path": "a/g.pt"}}}, "R")
    assert sub["model"]["init_args"]["export_path"] == "R/g.pt" and runs.options(sub) >= {"model.export_path"}


# ---------------------------------------------------------------------------------- checks against gmpi fit
def test_unknown_parameter_or_bad_value_fails_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "out"
    typo = _write(tmp_path, _sweep(parameters={"model.lrr": {"values": [0.001]}}), "typo.yaml")
    assert cli.main(["sweep-local", str(typo), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{typo}: parameter 'model.lrr' is not an option of `gmpi fit` (did you mean 'model.optim.lr'?)" in err, err
    bad = _write(tmp_path, _sweep(parameters={"model.optim.lr": {"values": [0.001, "fast"]}}), "bad.yaml")
    with pytest.raises(SweepError, match=r"bad.yaml: run-002 \(--model.optim.lr=fast\) would be refused by `gmpi fit`"
                                         r"[\s\S]*lr\b[\s\S]*fast"):  # jsonargparse names the key and the value
        sweeps.run_sweep(sweeps.load_sweep(bad), out=out)
    none = _write(tmp_path, _sweep(parameters={"model.optim.grad_clip": {"values": [None, 10.0]}}), "none.yaml")
    with pytest.raises(SweepError, match="write the string 'null'"):
        sweeps.run_sweep(sweeps.load_sweep(none), out=out)
    extra = _write(tmp_path, _sweep(), "extra.yaml")
    with pytest.raises(SweepError, match=r"extra.yaml: the sweep's command \(\+ extra overrides\) is refused"):
        sweeps.run_sweep(sweeps.load_sweep(extra), out=out, extra=["--model.no_such_option=1"])
    assert not out.exists()  # nothing ran, nothing was written
    # the W&B spelling of null as text is accepted
    ok = _write(tmp_path, _sweep(parameters={"model.optim.grad_clip": {"values": ["null", 10.0]}}), "ok.yaml")
    planned = sweeps.plan(sweeps.load_sweep(ok), out)
    assert "--model.optim.grad_clip=null" in planned[0].command
    assert runs.init_args(planned[0].config, "model")["optim"]["grad_clip"] is None


def test_shipped_sweeps_are_valid_and_isolate_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # their commands name experiments/synthetic.yaml relative to the repository
    files = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
    assert {p.stem for p in files} >= {"r1_lr", "train_planes", "shading"}
    # runs, distinct values per varied parameter
    expected = {"r1_lr": (9, {"model.optim.r1_gamma": 3, "model.optim.lr": 3}), "train_planes": (3,
                {"model.train_planes": 3}),
                "shading": (2, {"model.shading.enabled": 2}), "learning_curve": (2, {"config": 2}),
                "official_parts": (2, {"config": 2}),
                "where_3d": (6, {"model.optim.r1_gamma": 3, "model.alpha.init_logit": 2}), "suspects": (5,
                             {"config": 5}),
                "priors": (4, {"model.arch.channel_max": 2, "model.optim.lr": 2}), "small_data": (2,
                           {"model.augment.mode": 2})}
    for path in files:
        sw = sweeps.load_sweep(path)
        base = "experiments/synthetic_stylegan2.yaml" if sw.name == "priors" else "experiments/synthetic.yaml"
        assert base in sw.command and sw.metric in ("eval/depth_fd", "eval/pose_yaw_slope", "eval/est_fd")
        planned = sweeps.plan(sw, tmp_path / sw.name)
        if sw.name == "learning_curve":  # a `config` value is one more overlay: the official recipe's keys land
            official = [runs.init_args(r.config, "model") for r in planned if "official" in r.params["config"]][0]
            current = [runs.init_args(r.config, "model") for r in planned if "current" in r.params["config"]][0]
            assert (official["alpha"]["init_gain"], official["shading"]["enabled"]) == (1.0, True)
            assert (current["alpha"]["init_gain"], current["shading"]["enabled"]) == (0.3, False)
            assert official["max_iters"] == current["max_iters"] == 4000
        if sw.name == "small_data":  # the overlay's 500 images and a p that can move within the run
            model = [runs.init_args(r.config, "model") for r in planned]
            assert [m["augment"]["mode"] for m in model] == ["none", "ada"]
            assert {m["augment"]["kimg"] for m in model} == {10.0}
            assert {runs.init_args(r.config, "data")["data"] for r in planned} == {"data/synthetic32_500"}
        if sw.name in expected:
            n, varied = expected[sw.name]
            assert len(planned) == n and len({json.dumps(r.params) for r in planned}) == n
            assert {k: len({str(r.params[k]) for r in planned}) for k in varied} == varied
        for r in planned:
            cfg, run_dir = r.config, str(r.dir)
            trainer = cfg["trainer"]
            assert trainer["default_root_dir"] == run_dir
            export = "stylegan2" if "stylegan2" in base else "gmpi"
            assert runs.init_args(cfg, "model")["export_path"] == f"{run_dir}/{export}.pt"
            model = runs.init_args(cfg, "model")
            assert all(functools.reduce(dict.get, k.split(".")[1:], model) == v for k, v in r.params.items()
                       if k.startswith("model."))
            assert all(lg["init_args"]["save_dir"] == run_dir for lg in trainer["logger"])
            ckpt = [cb for cb in trainer["callbacks"] if "dirpath" in cb["init_args"]]  # the checkpoint callback
            assert ckpt and ckpt[0]["init_args"]["dirpath"] == f"{run_dir}/checkpoints"
            wandb_logger = [lg for lg in trainer["logger"] if lg["class_path"].endswith("WandbLogger")]
            assert wandb_logger[0]["init_args"]["name"] == f"{sw.name}-{r.name}"
            assert "runs/synthetic/" not in json.dumps(cfg)  # nothing left pointing at the base run
    # --dry-run prints every command and writes nothing
    assert cli.main(["sweep-local", str(REPO / "experiments" / "sweeps" / "shading.yaml"), "--dry-run",
                     "--out", str(tmp_path / "dry")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("-m gmpi_lightning.sweeps fit --config experiments/synthetic.yaml") == 2
    assert "--model.shading.enabled=False" in printed and "--model.shading.enabled=True" in printed
    assert not (tmp_path / "dry").exists()


def test_seed_axis_repeats_every_arm_and_summarises_mean_and_sd(tmp_path, capsys):
    """--seeds: each arm once per seed with seed_everything and data.seed set in the resolved config (rules out
    repeats that share a seed), arm-major order; summary.md's mean and sd are those of the seeds' values."""
    sw = sweeps.load_sweep(_write(tmp_path, _sweep()))
    planned = sweeps.plan(sw, tmp_path / "out", seeds=[0, 1, 2])
    assert [(r.params["model.optim.lr"], r.params["seed_everything"]) for r in planned] == [
        (a, s) for a in (0.001, 0.002) for s in (0, 1, 2)]
    for r in planned:
        assert r.config["seed_everything"] == r.params["seed_everything"] == r.params["data.seed"]
        assert runs.init_args(r.config, "data")["seed"] == r.params["data.seed"]
    rows = [{"run": r.name, "status": "finished", **r.params, "eval/x": v}
            for r, v in zip(planned, [1.0, 2.0, 3.0, 10.0, 10.0, None])]
    rows[5]["status"] = "failed (exit 1)"
    summary = sweeps.summarize_seeds(rows, ["model.optim.lr", *sweeps.SEED_KEYS], ["eval/x"])
    assert [(r["model.optim.lr"], r["n"], r["eval/x_mean"], r["eval/x_sd"]) for r in summary] == [
        (0.001, 3, 2.0, 1.0), (0.002, 2, 10.0, 0.0)]
    assert sweeps.summarize_seeds(rows[:1], ["model.optim.lr"], ["eval/x"]) == []  # no seed axis: no summary
    with pytest.raises(SweepError, match="repeats a seed"):
        sweeps.plan(sw, tmp_path / "out", seeds=[0, 0])
    clash = sweeps.load_sweep(_write(tmp_path, _sweep(parameters={"seed_everything": {"values": [1, 2]}}), "c.yaml"))
    with pytest.raises(SweepError, match="drop --seeds"):
        sweeps.plan(clash, tmp_path / "out", seeds=[0, 1])
    assert sweeps.Seeds is Seeds and parse_seeds("0-2,7") == (0, 1, 2, 7)  # the flag's type: ranges and numbers
    assert cli.main(["sweep-local", str(sw.path), "--seeds", "3-4", "--dry-run", "--out", str(tmp_path / "d")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--seed_everything=3 --data.seed=3") == 2 and "4 runs" in printed


def test_shipped_sweep_program_runs_as_a_file():
    programs = {sweeps.load_sweep(p).program for p in (REPO / "experiments" / "sweeps").glob("*.yaml")}
    assert programs == {"scripts/sweep_run.py"} and (REPO / "scripts" / "sweep_run.py").is_file()
    proc = subprocess.run([sys.executable, "scripts/sweep_run.py", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fit" in proc.stdout and "validate" in proc.stdout  # the LightningCLI subcommands of `gmpi fit`


def test_agent_wrapper_gives_each_wandb_run_its_folder(tmp_path):
    argv = ["fit", "--config", str(REPO / "experiments" / "synthetic.yaml"), "--model.optim.lr=0.004"]
    assert sweeps.agent_arguments(argv, env={}) == argv  # not under an agent: plain `gmpi fit`
    got = sweeps.agent_arguments(argv, env={"WANDB_SWEEP_ID": "ab12", "WANDB_RUN_ID": "run7"}, root=tmp_path)
    run_dir = str(tmp_path / "wandb-ab12" / "run7")
    assert got == ["fit", "--config", f"{run_dir}/config.yaml"]
    cfg = runs.resolve(got[1:])  # what `gmpi fit` then reads
    model = runs.init_args(cfg, "model")
    assert cfg["trainer"]["default_root_dir"] == run_dir and model["export_path"] == f"{run_dir}/gmpi.pt"
    wandb_logger = [lg for lg in cfg["trainer"]["logger"] if lg["class_path"].endswith("WandbLogger")][0]
    assert wandb_logger["init_args"]["offline"] is False and wandb_logger["init_args"]["save_dir"] == run_dir
    assert model["optim"]["lr"] == 0.004


# ------------------------------------------------------------------------------------------------ tables
def test_write_table_csv_markdown_and_sort_order(tmp_path):
    rows = [{"run": "run-001", "status": "finished", "model.optim.lr": 0.001, "fid": 12.5, "note": "a|b"},
            {"run": "run-002", "status": "failed (exit 1)", "model.optim.lr": 0.002, "fid": None, "log": "x/log.txt"},
            {"run": "run-003", "status": "finished", "model.optim.lr": 0.004, "fid": 9.25},
            {"run": "run-004", "status": "finished", "model.optim.lr": 0.008, "fid": "nan"},
            {"run": "run-005", "status": "finished", "model.optim.lr": 0.016, "fid": 30.0}]
    out = runs.write_table(rows, tmp_path / "t.csv", tmp_path / "t.md", sort_by="fid", goal="minimize",
                             title="Sweep t")
    assert [r["run"] for r in out] == ["run-003", "run-001", "run-005", "run-002", "run-004"]  # no number: last
    with open(tmp_path / "t.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert list(table[0]) == ["run", "status", "model.optim.lr", "fid", "note", "log"]  # first-seen column order
    assert [r["run"] for r in table] == ["run-003", "run-001", "run-005", "run-002", "run-004"]
    assert float(table[0]["fid"]) == 9.25 and table[3]["fid"] == "" and table[3]["log"] == "x/log.txt"
    assert table[1]["note"] == "a|b"
    md = (tmp_path / "t.md").read_text().splitlines()
    assert md[0] == "# Sweep t" and md[2] == "| run | status | model.optim.lr | fid | note | log |"
    assert md[3] == "|---|---|---:|---|---|---|"  # fid holds the text 'nan': not a numeric column
    assert md[4] == "| run-003 | finished | 0.004 | 9.25 |  |  |"
    assert md[5] == "| run-001 | finished | 0.001 | 12.5 | a\\|b |  |"
    assert md[7] == "| run-002 | failed (exit 1) | 0.002 |  |  | x/log.txt |"
    assert len(md) == 9
    best_first = runs.write_table(rows, None, tmp_path / "m.md", sort_by="fid", goal="maximize")
    assert [r["run"] for r in best_first] == ["run-005", "run-001", "run-003", "run-002", "run-004"]
    assert [r["run"] for r in runs.write_table(rows, tmp_path / "u.csv", None)] == [r["run"] for r in rows]
    with pytest.raises(ValueError, match="goal"):
        runs.write_table(rows, None, None, sort_by="fid", goal="lowest")


def test_mistyped_metric_name_is_reported(tmp_path):
    out = tmp_path / "out"
    typo = _write(tmp_path, _sweep(name="s", metric={"name": "val/los_d", "goal": "minimize"}), "typo.yaml")
    for r, loss in zip(sweeps.plan(sweeps.load_sweep(typo), out), (0.5, 0.25)):  # two finished runs
        (r.dir / "csv" / "version_0").mkdir(parents=True)
        (r.dir / "csv" / "version_0" / "metrics.csv").write_text(f"step,val/loss_d,train/r1\n9,{loss},0.1\n")
        r.seconds = 1.0
        runs.mark_done(r)  # as a real sweep leaves them: done.json with the hash of the run's config
    lines = []
    rc, rows = sweeps.run_sweep(sweeps.load_sweep(typo), out=out, echo=lines.append)
    warning = [line for line in lines if line.startswith("warning:")]
    assert rc == 0 and len(warning) == 1 and [r["val/los_d"] for r in rows] == [None, None]
    assert "metric 'val/los_d' (did you mean 'val/loss_d'?)" in warning[0] and str(typo) in warning[0]
    assert "have: step, train/r1, val/loss_d" in warning[0]
    lines.clear()
    good = _write(tmp_path, _sweep(name="s", metric={"name": "val/loss_d", "goal": "minimize"}), "good.yaml")
    rc, rows = sweeps.run_sweep(sweeps.load_sweep(good), out=out, echo=lines.append)
    assert not any(line.startswith("warning:") for line in lines)
    assert [r["val/loss_d"] for r in rows] == [0.5, 0.25]
    with open(out / "results.csv", newline="") as fh:
        assert [r["run"] for r in csv.DictReader(fh)] == ["run-002", "run-001"]  # sorted by it


# ---------------------------------------------------------------------------------------- real sweeps
def _tiny(shards):
    return [f"--data.data={shards}", "--data.batch_size=4", "--data.num_workers=0", "--model.init_from=null",
            "--model.resolution=16", TINY_ARCH, "--model.train_planes=6", "--model.views.per_z=2",
            "--model.max_iters=2", "--trainer.callbacks=[]", "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.log_every_n_steps=1", "--trainer.limit_val_batches=1",
            '--trainer.logger=[{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "x"}}]']


def test_real_local_sweep_two_runs(shards, tmp_path):
    path = _write(tmp_path, _sweep(metric={"name": "loss_d", "goal": "minimize"},
                                   parameters={"model.optim.r1_gamma": {"values": [0.5, 5.0]}}), "tiny.yaml")
    out = tmp_path / "out"
    lines = []
    rc, rows = sweeps.run_sweep(sweeps.load_sweep(path), out=out, parallel=2, extra=_tiny(shards), echo=lines.append)
    assert rc == 0, "\n".join(lines + [(out / r).joinpath("log.txt").read_text()[-3000:] for r in ("run-001",
                                                                                                   "run-002")])
    assert sum("finished in" in line for line in lines) == 2
    for name, gamma in (("run-001", 0.5), ("run-002", 5.0)):
        run = out / name
        assert json.loads((run / "done.json").read_text())["params"] == {"model.optim.r1_gamma": gamma}
        assert (run / "gmpi.pt").is_file() and (run / "log.txt").stat().st_size > 0
        assert len(list(run.rglob("metrics.csv"))) == 1
        config = yaml.safe_load((run / "config.yaml").read_text())  # what it trained, exactly
        assert runs.init_args(config, "model")["optim"]["r1_gamma"] == gamma
        assert config["trainer"]["default_root_dir"] == str(run)
        assert "--ckpt_path last" in (run / "log.txt").read_text()  # resumes when its last.ckpt is there
    with open(out / "results.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 2 and {float(r["model.optim.r1_gamma"]) for r in table} == {0.5, 5.0}
    losses = [float(r["loss_d"]) for r in table]
    assert all(math.isfinite(x) and 0 < x < 10 for x in losses) and losses == sorted(losses)  # minimize
    assert all(r["status"] == "finished" and float(r["train/iteration"]) == 2.0 for r in table)
    assert table[0]["train/r1"] != table[1]["train/r1"]  # each row read its own run's metrics
    md = (out / "results.md").read_text()
    assert "sorted by loss_d (minimize)" in md and md.count("| finished |") == 2
    # again: both runs are finished, nothing is trained, the table is rebuilt
    again = []
    rc2, rows2 = sweeps.run_sweep(sweeps.load_sweep(path), out=out, parallel=2, extra=_tiny(shards), echo=again.append)
    assert rc2 == 0 and sum("finished earlier" in line for line in again) == 2
    assert [r["loss_d"] for r in rows2] == [r["loss_d"] for r in rows]


def test_failed_runs_are_reported_not_dropped(tmp_path):
    false = shutil.which("false")
    if false is None:
        pytest.skip("no `false` program")
    path = _write(tmp_path, _sweep(), "fails.yaml")
    out = tmp_path / "out"
    lines = []
    rc, rows = sweeps.run_sweep(sweeps.load_sweep(path), out=out, interpreter=false, echo=lines.append)
    assert rc == 1 and len(rows) == 2
    assert [r["status"] for r in rows] == ["failed (exit 1)"] * 2
    assert [r["model.optim.lr"] for r in rows] == [0.001, 0.002]
    assert rows[0]["log"] == str(out / "run-001" / "log.txt") and (out / "run-001" / "log.txt").is_file()
    assert sum("FAILED (exit 1)" in line and "log.txt" in line for line in lines) == 2
    assert not (out / "run-002" / "done.json").exists() and (out / "run-002" / "config.yaml").is_file()
    assert (out / "results.md").read_text().count("failed (exit 1)") == 2
    lines.clear()  # a failed run is tried again, not skipped
    sweeps.run_sweep(sweeps.load_sweep(path), out=out, interpreter=false, echo=lines.append)
    assert not any("finished earlier" in line for line in lines) and sum("FAILED" in line for line in lines) == 2
    assert (out / "run-001" / "log.txt").read_text().count("### ") == 2  # the log is appended to
    # the same folder asked to hold another experiment: the old one is moved aside, never resumed from
    other = _write(tmp_path, _sweep(parameters={"model.optim.lr": {"values": [0.003]}}), "fails.yaml")
    sweeps.run_sweep(sweeps.load_sweep(other), out=out, interpreter=false, echo=lines.append)
    assert len(list(out.glob("run-001.old-*"))) == 1 and (out / "run-002").is_dir()
