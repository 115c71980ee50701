"""Ablation rows: every row is a real, runnable variant of one base; dedup; the results table."""

import json
import tarfile

import numpy as np
import pytest
import torch
import yaml

from gmpi_lightning import ablations, cli, runs
from gmpi_lightning.ablations import evaluate_rows, list_rows, load_row, plan, train_rows
from gmpi_lightning.evaluation import compare
from gmpi_lightning.evaluation.compare import COLUMNS, evaluation_request
from gmpi_lightning.trainer import run_lightning_cli
from tests.conftest import REPO, TINY_ARCH

ROWS = list_rows()


def test_rows_cover_the_paper_axes_and_only_change_the_model():
    assert set(ROWS) >= {"full", "no_pose_cond", "vanilla_alpha", "plane_tokens", "depth_to_alpha",
                         "no_feature_norm", "no_shading", "random_view", "train_planes8", "train_planes16",
                         "train_planes32"}
    changed = {r: load_row(r).get("model", {}) for r in ROWS}
    assert changed["full"] == {} and changed["no_pose_cond"] == {"discriminator": {"pose_conditioning": False}}
    assert changed["vanilla_alpha"] == {"alpha": {"mode": "vanilla"}}
    assert changed["train_planes8"] == {"train_planes": 8}


def _overlay(base: dict, row: dict) -> dict:
    """``row`` on ``base`` as the config parser merges them: a group's fields one by one."""
    return {**base, **{k: {**base.get(k, {}), **v} if isinstance(v, dict) else v for k, v in row.items()}}


def test_plan_redirects_outputs_and_deduplicates(tmp_path):
    planned = plan("synthetic", ROWS, tmp_path, max_iters=7)
    by = {r.name: r for r in planned}
    base = yaml.safe_load((REPO / "experiments" / "synthetic.yaml").read_text())
    for r in planned:
        cfg, run, model = r.config, str(tmp_path / r.name), runs.init_args(r.config, "model")
        assert r.dir == tmp_path / r.name
        assert model["export_path"] == f"{run}/gmpi.pt" and cfg["trainer"]["default_root_dir"] == run
        assert model["max_iters"] == 7
        for lg in cfg["trainer"]["logger"]:
            assert lg["init_args"]["save_dir"] == run
        ckpt = [c for c in cfg["trainer"]["callbacks"] if "dirpath" in c["init_args"]]  # the checkpoint callback
        assert ckpt[0]["init_args"]["dirpath"] == f"{run}/checkpoints"
        assert "runs/synthetic" not in json.dumps(cfg).replace("runs/synthetic_stylegan2", "")
        # the row is an overlay: the base's settings, then the row's
        want = dict(_overlay(base["model"], load_row(r.name)["model"]), export_path=f"{run}/gmpi.pt", max_iters=7)
        want = {k: {**model[k], **v} if isinstance(v, dict) else v for k, v in want.items()}  # + group defaults
        assert all(model[k] == v for k, v in want.items()), r.name
    # the synthetic base trains without shading and with 32 planes: those rows are the full model
    assert not base["model"]["shading"]["enabled"] and base["model"]["train_planes"] == 32
    assert by["no_shading"].same_as == "full" and by["train_planes32"].same_as == "full"
    with_shading = runs.init_args(by["with_shading"].config, "model")["shading"]
    assert by["with_shading"].same_as is None and with_shading["enabled"]
    assert runs.init_args(by["no_pose_cond"].config, "model")["discriminator"]["pose_conditioning"] is False
    assert runs.init_args(by["with_shading"].config, "model")["shading"]["start"] == base["model"]["shading"]["start"]
    with pytest.raises(FileNotFoundError, match="available"):
        plan("nope", ROWS, tmp_path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from datamodules.converters import convert_synthetic

    return convert_synthetic(tmp_path_factory.mktemp("abl") / "d", num=16, resolution=16, seed=1, samples_per_shard=8)


@pytest.mark.parametrize("row", ROWS)
def test_every_row_runs_fast_dev_run(row, data, tmp_path):
    cfg = plan("synthetic", [row], tmp_path / "out")[0].config
    if "train_planes" not in load_row(row).get("model", {}):
        runs.init_args(cfg, "model")["train_planes"] = 6  # small and fast; the planes rows keep theirs
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = run_lightning_cli([
        "fit", "--config", str(path), f"--data.data={data}", "--data.batch_size=4", "--data.num_workers=0",
        "--model.init_from=null", "--model.resolution=16", TINY_ARCH, "--model.views.per_z=2",
        "--model.export_path=null", "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.fast_dev_run=1",
        "--trainer.enable_progress_bar=false"])
    assert cli.model.iteration == 1 and np.isfinite(float(cli.trainer.callback_metrics["loss_d"]))
    want = load_row(row).get("model", {})
    assert all(getattr(cli.model.hparams[k], f) == x for k, v in want.items() for f, x in v.items()) if \
        "train_planes" not in want else cli.model.hparams.train_planes == want["train_planes"]


def test_results_table_from_fabricated_evaluations(tmp_path, monkeypatch):
    rows = ["full", "no_pose_cond", "no_shading"]
    planned = plan("synthetic", rows, tmp_path)
    with pytest.raises(ablations.AblationError, match="row full has not finished training"):
        evaluate_rows(planned, ["pose", "depth_fd"], 10, 96, None, None)
    fake = {"full": {"pose": 0.01, "depth_fd": 2.0, "precision": 0.75, "recall": 0.5, "is": 1.25},
            "no_pose_cond": {"pose": 0.09, "depth_fd": 80.0}}
    for r, (name, m) in zip(planned, fake.items()):
        (tmp_path / name).mkdir()
        runs.mark_done(r)
        (tmp_path / name / "gmpi.pt").write_bytes(b"x")  # only its path, size and time key the cached evaluation
        request = evaluation_request(tmp_path / name / "gmpi.pt", str(REPO / "data" / "synthetic32"),
                                     ["pose", "depth_fd"], 10, 96, None, None)
        details = {"pose_error": {"mean": m["pose"], "std": 0.03, "n": 10, "n_invalid": 0},
                   "depth_fd": {"bootstrap_se": 0.25}}
        (tmp_path / name / "eval.json").write_text(json.dumps({"metrics": m, "details": details,
                                                                "request": request}))
    out = evaluate_rows(planned, ["pose", "depth_fd"], 10, 96, None, None)
    assert [r["row"] for r in out] == rows
    assert out[2]["same_as"] == "full" and out[2]["pose"] == 0.01  # deduplicated rows reuse the evaluation
    assert out[1]["depth_fd"] == 80.0 and out[0]["fid"] == "n/a"
    assert (out[0]["precision"], out[0]["recall"], out[0]["is"]) == (0.75, 0.5, 1.25) and out[1]["is"] == "n/a"
    assert out[0]["pose_se"] == 0.01 and out[0]["depth_fd_se"] == 0.25  # 0.03 / sqrt(10 - 1); the bootstrap
    runs.write_table(out, tmp_path / "r.csv", tmp_path / "r.md", title="t", plus_minus={c: f"{c}_se" for c in COLUMNS})
    md = (tmp_path / "r.md").read_text().splitlines()
    header = [c.strip() for c in md[2].strip("|").split("|")]
    assert header[:3] == ["row", "setting", "same_as"] and header[3:] == COLUMNS  # the _se columns fold into cells
    assert md[4].startswith("| full | Full GMPI") and "| no_pose_cond |" in md[5]
    assert "| 0.01 ± 0.01 |" in md[4] and "| 80 ± 0.25 |" in md[5] and "| n/a |" in md[4]
    csv = (tmp_path / "r.csv").read_text().splitlines()
    assert len(csv) == 4 and csv[2].split(",")[0] == "no_pose_cond" and "pose_se" in csv[0].split(",")

    def load_generator(*a, **k):  # a cache hit never loads the generator
        raise LookupError("evaluated again")

    monkeypatch.setattr("gmpi_lightning.inference.load_generator", load_generator)
    assert evaluate_rows(planned, ["pose", "depth_fd"], 10, 96, None, None, device="cpu") == out
    with pytest.raises(LookupError, match="evaluated again"):  # the device is part of the cache key
        evaluate_rows(planned, ["pose", "depth_fd"], 10, 96, None, None, device="cuda")


def test_unconditional_d_export_reloads(tmp_path):
    """The no_pose_cond row exports a plain (unconditional) D; the file must load back as that class."""
    from gmpi_lightning.inference import load_generator
    from gmpi_lightning.io import load_gmpi_checkpoint
    from gmpi_lightning.module import GMPIModule
    from gmpi_lightning.nn.discriminator import Discriminator, PoseConditionedDiscriminator
    from tests.test_module import tiny

    module = GMPIModule(**tiny(discriminator=dict(pose_conditioning=False)))
    module.export(tmp_path / "g.pt")
    blob = load_gmpi_checkpoint(tmp_path / "g.pt")
    assert type(blob["D"]) is Discriminator and not isinstance(blob["D"], PoseConditionedDiscriminator)
    assert all(torch.equal(a, b) for a, b in zip(blob["D"].state_dict().values(), module.D.state_dict().values()))
    assert load_generator(tmp_path / "g.pt").kind == "gmpi"


def test_dry_run_touches_nothing(tmp_path, capsys):
    planned = plan("synthetic", ["full", "no_pose_cond", "no_shading"], tmp_path)
    train_rows(planned, dry_run=True)
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [] and out.count("would train") == 2 and "same settings as full" in out


def _fake_fit(calls, rc=0):
    """Stands in for subprocess.call of `gmpi fit --config C --ckpt_path last`: records C's max_iters; exports gmpi.pt
    when rc == 0."""
    def call(cmd, **kw):
        model = runs.init_args(yaml.safe_load(open(cmd[cmd.index("--config") + 1]).read()), "model")
        calls.append((model["max_iters"], cmd[cmd.index("--ckpt_path") + 1]))
        if rc == 0:
            open(model["export_path"], "wb").write(b"trained %d" % model["max_iters"])
        return rc
    return call


def test_rows_resume_continue_and_are_done_only_for_their_settings(tmp_path, capsys, monkeypatch):
    """A row trained for 400 iterations, continued to 800 and killed: it is not done, resumes (Lightning's
    --ckpt_path last), and once finished is done for 800 only. Another experiment in its folder is moved aside."""
    longer = plan("synthetic", ["full"], tmp_path, max_iters=800)
    shorter = plan("synthetic", ["full"], tmp_path, max_iters=400)
    calls = []
    monkeypatch.setattr(runs.subprocess, "call", _fake_fit(calls))
    train_rows(shorter)
    assert calls == [(400, "last")] and runs.is_done(shorter[0]) and not runs.is_done(longer[0])
    monkeypatch.setattr(runs.subprocess, "call", _fake_fit(calls, rc=-9))  # killed
    with pytest.raises(ablations.AblationError, match=r"ablation row full failed \(exit -9\); see .*train.log"):
        train_rows(longer)
    assert calls[-1] == (800, "last") and not runs.is_done(longer[0]) and not runs.is_done(shorter[0])
    capsys.readouterr()
    train_rows(longer, dry_run=True)
    assert "full: would train" in capsys.readouterr().out
    monkeypatch.setattr(runs.subprocess, "call", _fake_fit(calls))
    train_rows(longer)
    assert calls[-1] == (800, "last") and (tmp_path / "full" / "gmpi.pt").read_bytes() == b"trained 800"
    done = json.loads((tmp_path / "full" / "done.json").read_text())
    assert done["config_sha256"] == runs.config_hash(longer[0].config)
    assert list(tmp_path.iterdir()) == [tmp_path / "full"]
    train_rows(longer)
    assert len(calls) == 3  # done: not trained again
    other = plan("synthetic", ["no_pose_cond"], tmp_path)[0]  # another experiment in the same folder
    other.dir = tmp_path / "full"
    runs.write_config(other)
    assert len(list(tmp_path.glob("full.old-*"))) == 1 and not (tmp_path / "full" / "gmpi.pt").exists()


def test_failed_row_is_a_one_line_cli_error(tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(runs.subprocess, "call", _fake_fit(calls, rc=3))
    assert cli.main(["ablations", "--rows", "full", "--stage", "train", "--max-iters", "5",
                     "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert calls == [(5, "last")] and len(err) == 1
    assert err[0].startswith("gmpi ablations: error: ablation row full failed (exit 3); see ")


def test_evaluation_settings_fail_before_any_training(tmp_path, capsys, monkeypatch):
    trained = []
    monkeypatch.setattr(ablations, "train_rows", lambda *a, **k: trained.append(a))
    monkeypatch.setattr(runs.subprocess, "call", lambda *a, **k: trained.append(a) or 0)
    monkeypatch.setattr(compare, "data_has_depth", lambda folder: True)
    base = ["ablations", "--rows", "full", "--out", str(tmp_path)]
    assert cli.main([*base, "--metrics", "consistency,fdi"]) == 1
    assert "unknown metric(s) ['fdi']" in capsys.readouterr().err
    assert cli.main([*base, "--metrics", "fid,consistency", "--inception", str(tmp_path / "nope.pth")]) == 1
    err = capsys.readouterr().err
    assert f"Inception weights not found at {tmp_path / 'nope.pth'}" in err and "leave fid,kid,pr,is out" in err
    monkeypatch.setattr(compare, "data_has_depth", lambda folder: False)
    assert cli.main([*base, "--metrics", "consistency,depth_fd,pose"]) == 1
    err = capsys.readouterr().err
    assert "--metrics depth_fd,pose need ground-truth depth" in err and "--metrics consistency)" in err
    assert trained == [] and list(tmp_path.iterdir()) == []
    # a good setting reaches training (here the stand-in), after printing what will be evaluated
    monkeypatch.setattr(compare, "data_has_depth", lambda folder: True)
    monkeypatch.delenv("GMPI_INCEPTION_WEIGHTS", raising=False)
    assert cli.main([*base, "--dry-run"]) == 0
    assert len(trained) == 1 and "evaluation: consistency,depth_fd,pose,depth on 256 fakes" in capsys.readouterr().out


def test_default_metrics_follow_the_data(data, tmp_path):
    assert compare.data_has_depth(data) is True and compare.data_has_depth(tmp_path / "absent") is None
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "x.png").write_bytes(b"png")
    with tarfile.open(flat / "shard-000000.tar", "w") as tar:
        tar.add(flat / "x.png", arcname="000000.png")
    (flat / "dataset.json").write_text(json.dumps({"shards": [{"name": "shard-000000.tar"}]}))
    assert compare.data_has_depth(flat) is False
    choose = compare.choose_metrics
    assert choose(None, data, True, True, False) == ["consistency", "depth_fd", "pose", "depth"]
    assert choose(None, data, True, True, True) == ["fid", "kid", "pr", "is", "consistency", "depth_fd", "pose",
                                                    "depth"]
    assert choose(None, flat, False, False, True) == ["fid", "kid", "pr", "is", "consistency"]
    assert choose(None, flat, None, False, False) == ["fid", "kid", "pr", "is", "consistency"]  # FFHQ not here
    assert choose(None, flat, None, True, False) == ["consistency", "depth_fd", "pose", "depth"]
    assert choose("pose", flat, None, False, False) == ["pose"]  # data not there: not checked
    with pytest.raises(ValueError, match=f"samples of {flat} have no depth.npy"):
        choose("depth", flat, False, False, False)
