"""Ablation rows: every row is a real, runnable variant of one base; dedup; the results table."""

import json

import numpy as np
import pytest
import torch
import yaml

from gmpi_lightning.ablations import COLUMNS, eval_request, evaluate_rows, list_rows, load_row, plan
from gmpi_lightning.sweeps import write_table
from gmpi_lightning.trainer import run_lightning_cli
from tests.conftest import REPO

ROWS = list_rows()


def test_rows_cover_the_paper_axes_and_only_change_the_model():
    assert set(ROWS) >= {"full", "no_pose_cond", "vanilla_alpha", "plane_tokens", "depth_to_alpha",
                         "no_feature_norm", "no_shading", "random_view", "train_planes8", "train_planes16",
                         "train_planes32"}
    changed = {r: load_row(r).get("model", {}) for r in ROWS}
    assert changed["full"] == {} and changed["no_pose_cond"] == {"pose_conditioning": False}
    assert changed["vanilla_alpha"] == {"alpha_mode": "vanilla"} and changed["train_planes8"] == {"train_planes": 8}


def test_plan_redirects_outputs_and_deduplicates(tmp_path):
    planned = plan("synthetic", ROWS, tmp_path, max_iters=7)
    by = {p["name"]: p for p in planned}
    base = yaml.safe_load((REPO / "experiments" / "synthetic.yaml").read_text())
    for p in planned:
        cfg, run = p["config"], str(tmp_path / p["name"])
        assert cfg["model"]["export_path"] == f"{run}/gmpi.pt" and cfg["trainer"]["default_root_dir"] == run
        assert cfg["model"]["max_iters"] == 7
        for lg in cfg["trainer"]["logger"]:
            assert lg["init_args"]["save_dir"] == run
        ckpt = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
        assert ckpt[0]["init_args"]["dirpath"] == f"{run}/checkpoints"
        assert "runs/synthetic" not in json.dumps(cfg).replace("runs/synthetic_stylegan2", "")
    # the synthetic base trains without shading and with 32 planes: those rows are the full model
    assert not base["model"]["shading"] and base["model"]["train_planes"] == 32
    assert by["no_shading"]["same_as"] == "full" and by["train_planes32"]["same_as"] == "full"
    assert by["with_shading"]["same_as"] is None and by["with_shading"]["config"]["model"]["shading"] is True
    assert by["no_pose_cond"]["config"]["model"]["pose_conditioning"] is False
    with pytest.raises(FileNotFoundError, match="available"):
        plan("nope", ROWS, tmp_path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from datamodules.converters import convert_synthetic

    return convert_synthetic(tmp_path_factory.mktemp("abl") / "d", num=16, resolution=16, seed=1, samples_per_shard=8)


@pytest.mark.parametrize("row", ROWS)
def test_every_row_runs_fast_dev_run(row, data, tmp_path):
    cfg = plan("synthetic", [row], tmp_path / "out")[0]["config"]
    if "train_planes" not in load_row(row).get("model", {}):
        cfg["model"]["train_planes"] = 6  # small and fast; the planes rows keep theirs
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = run_lightning_cli([
        "fit", "--config", str(path), f"--data.data={data}", "--data.batch_size=4", "--data.num_workers=0",
        "--model.init_from=null", "--model.resolution=16", "--model.z_dim=16", "--model.w_dim=16",
        "--model.mapping_layers=2", "--model.channel_base=256", "--model.channel_max=16", "--model.views_per_z=2",
        "--model.export_path=null", "--trainer.logger=false", "--trainer.callbacks=[]", "--trainer.fast_dev_run=1",
        "--trainer.enable_progress_bar=false"])
    assert cli.model.iteration == 1 and np.isfinite(float(cli.trainer.callback_metrics["loss_d"]))
    want = load_row(row).get("model", {})
    assert all(getattr(cli.model.hparams, k) == v for k, v in want.items())


def test_results_table_from_fabricated_evaluations(tmp_path):
    rows = ["full", "no_pose_cond", "no_shading"]
    planned = plan("synthetic", rows, tmp_path)
    fake = {"full": {"pose": 0.01, "depth_fd": 2.0}, "no_pose_cond": {"pose": 0.09, "depth_fd": 80.0}}
    for name, m in fake.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "gmpi.pt").write_bytes(b"x")  # only its path, size and time key the cached evaluation
        request = eval_request(tmp_path / name, str(REPO / "data" / "synthetic32"), ["pose", "depth_fd"], 10, 96,
                               None, None)
        (tmp_path / name / "eval.json").write_text(json.dumps({"metrics": m, "request": request}))
    out = evaluate_rows(planned, tmp_path, ["pose", "depth_fd"], 10, 96, None, None)
    assert [r["row"] for r in out] == rows
    assert out[2]["same_as"] == "full" and out[2]["pose"] == 0.01  # deduplicated rows reuse the evaluation
    assert out[1]["depth_fd"] == 80.0 and out[0]["fid"] == "n/a"
    write_table(out, tmp_path / "r.csv", tmp_path / "r.md", title="t")
    md = (tmp_path / "r.md").read_text().splitlines()
    header = [c.strip() for c in md[2].strip("|").split("|")]
    assert header[:3] == ["row", "setting", "same_as"] and header[3:] == COLUMNS
    assert md[4].startswith("| full | Full GMPI") and "| no_pose_cond |" in md[5]
    csv = (tmp_path / "r.csv").read_text().splitlines()
    assert len(csv) == 4 and csv[2].split(",")[0] == "no_pose_cond"


def test_unconditional_d_export_reloads(tmp_path):
    """The no_pose_cond row exports a plain (unconditional) D; the file must load back as that class."""
    from gmpi_lightning.inference import load_generator
    from gmpi_lightning.io import load_gmpi_checkpoint
    from gmpi_lightning.module import GMPIModule
    from gmpi_lightning.nn.discriminator import Discriminator, PoseConditionedDiscriminator
    from tests.test_module import TINY

    module = GMPIModule(**dict(TINY, pose_conditioning=False))
    module.export(tmp_path / "g.pt")
    blob = load_gmpi_checkpoint(tmp_path / "g.pt")
    assert type(blob["D"]) is Discriminator and not isinstance(blob["D"], PoseConditionedDiscriminator)
    assert all(torch.equal(a, b) for a, b in zip(blob["D"].state_dict().values(), module.D.state_dict().values()))
    assert load_generator(tmp_path / "g.pt").kind == "gmpi"


def test_dry_run_touches_nothing(tmp_path, capsys):
    from gmpi_lightning.ablations import train_rows

    planned = plan("synthetic", ["full", "no_pose_cond", "no_shading"], tmp_path)
    train_rows(planned, tmp_path, dry_run=True)
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == [] and out.count("would train") == 2 and "same settings as full" in out
