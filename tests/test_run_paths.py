"""One flag moves a whole run (gmpi_lightning/run_paths.py): outputs an experiment leaves out follow
``trainer.default_root_dir``, explicit ones win; and FID without Inception weights stops `gmpi fit` before any logger
has started."""

import os

import pytest
import yaml

from datamodules.converters import convert_synthetic
from gmpi_lightning import runs
from gmpi_lightning.cli import main as gmpi_main
from gmpi_lightning.run_paths import fill_run_paths
from gmpi_lightning.trainer import run_lightning_cli
from tests.conftest import TINY_ARCH

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FFHQ = os.path.join(REPO, "experiments", "ffhq256.yaml")
TINY = ["--model.init_from=null", "--model.resolution=16", TINY_ARCH, "--model.train_planes=6",
        "--model.views.per_z=2", "--model.max_iters=2", "--data.batch_size=4", "--data.num_workers=0",
        "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--trainer.devices=1",
        "--trainer.accelerator=cpu"]


def _outputs(cfg: dict) -> dict:
    trainer = cfg["trainer"]
    return {"loggers": [e["init_args"]["save_dir"] for e in trainer["logger"]],
            "checkpoints": [e["init_args"]["dirpath"] for e in trainer["callbacks"]
                            if e["class_path"].endswith("IterationCheckpoint")],
            "export": cfg["model"]["init_args"]["export_path"]}


def test_ffhq256_outputs_follow_the_run_root(tmp_path):
    """experiments/ffhq256.yaml with --trainer.default_root_dir=DIR puts loggers, checkpoints and gmpi.pt under DIR;
    an explicit path still wins; an experiment that spells its paths out keeps them. Rules out paths fixed when the
    YAML is read (before the flag), and a fill that overrides what the user wrote."""
    root = str(tmp_path / "elsewhere")
    moved = _outputs(fill_run_paths(runs.resolve(["--config", FFHQ, f"--trainer.default_root_dir={root}"])))
    assert moved == {"loggers": [root, root], "checkpoints": [os.path.join(root, "checkpoints")],
                     "export": os.path.join(root, "gmpi.pt")}
    assert _outputs(fill_run_paths(runs.resolve(["--config", FFHQ]))) == {
        "loggers": ["runs/ffhq256", "runs/ffhq256"], "checkpoints": ["runs/ffhq256/checkpoints"],
        "export": "runs/ffhq256/gmpi.pt"}
    mine = _outputs(fill_run_paths(runs.resolve(["--config", FFHQ, f"--trainer.default_root_dir={root}",
                                                 "--model.export_path=/keep/g.pt"])))
    assert mine["export"] == "/keep/g.pt"
    spelled = tmp_path / "spelled.yaml"  # a path written out in full: used as given
    spelled.write_text("trainer:\n  callbacks:\n    - class_path: callbacks.checkpoint.IterationCheckpoint\n"
                       "      init_args: {dirpath: runs/mine/checkpoints, every_n_iters: 5}\n")
    cfg = runs.resolve(["--config", os.path.join(REPO, "experiments", "synthetic.yaml"), "--config", f"{spelled}",
                        f"--trainer.default_root_dir={root}"])
    assert _outputs(fill_run_paths(cfg))["checkpoints"] == ["runs/mine/checkpoints"]
    # the sweep/ablation layer moves both kinds of file into its run folder
    for exp in ([FFHQ], [os.path.join(REPO, "experiments", "synthetic.yaml"), "--config", str(spelled)]):
        out = _outputs(fill_run_paths(runs.reroot(runs.resolve(["--config", *exp]), str(tmp_path / "run"))))
        assert out["checkpoints"] == [str(tmp_path / "run" / "checkpoints")]
        assert out["export"].startswith(str(tmp_path / "run")) and set(out["loggers"]) == {str(tmp_path / "run")}


def test_fit_writes_everything_under_the_root_and_resumes_from_it(tmp_path, monkeypatch):
    """A real `gmpi fit` of experiments/ffhq256.yaml (tiny networks, its own loggers and checkpoint callback) with
    only --trainer.default_root_dir: metrics, the offline W&B run, checkpoints and gmpi.pt are under DIR and nothing
    under the working directory's runs/; `--ckpt_path last` resolution (runs.resume_checkpoint) finds DIR's
    last.ckpt. Rules out a checkpoint folder left to Lightning's versioned logger folder (resume would miss it)."""
    shards = convert_synthetic(tmp_path / "s16", num=32, resolution=16, seed=3, samples_per_shard=8)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    root = tmp_path / "moved"
    checkpoint = '[{"class_path": "callbacks.checkpoint.IterationCheckpoint", "init_args": {"save_last": true}}]'
    args = ["--config", FFHQ, f"--trainer.default_root_dir={root}", f"--data.data={shards}", *TINY,
            f"--trainer.callbacks={checkpoint}"]
    cli = run_lightning_cli(["fit", *args])
    cli.trainer.loggers[1].experiment.finish()
    assert cli.model.iteration == 2
    assert (root / "checkpoints" / "last.ckpt").is_file() and (root / "gmpi.pt").is_file()
    assert (root / "csv" / "version_0" / "metrics.csv").is_file() and list((root / "wandb").glob("offline-run-*"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "wandb").exists()
    assert runs.resume_checkpoint(runs.resolve(args)) == root / "checkpoints" / "last.ckpt"


def test_fid_without_inception_stops_before_any_logger(tmp_path, monkeypatch, capsys):
    """experiments/ffhq256.yaml logs FID: without the Inception file `gmpi fit` stops with the instructions before
    the CSV or W&B logger has written anything. Rules out checking only in the callback's setup, which Lightning
    calls after it has started the loggers (an empty offline W&B run was left behind)."""
    monkeypatch.delenv("GMPI_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "run"
    shards = convert_synthetic(tmp_path / "s16", num=16, resolution=16, seed=3, samples_per_shard=8)
    rc = gmpi_main(["fit", "--config", FFHQ, f"--trainer.default_root_dir={root}", f"--data.data={shards}", *TINY])
    err = capsys.readouterr().err
    assert rc == 1 and "weights-inception-2015-12-05-6726825d.pth" in err and "GMPI_INCEPTION_WEIGHTS" in err
    assert not (root / "wandb").exists() and not (root / "csv").exists() and not (tmp_path / "wandb").exists()


def test_yaml_of_the_dataset_experiments_spell_out_no_output_path():
    """The dataset experiments name only their root; every output follows it."""
    for name in ("ffhq256", "ffhq512", "ffhq1024", "afhqcat512", "metfaces1024"):
        text = open(os.path.join(REPO, "experiments", f"{name}.yaml")).read()
        cfg = yaml.safe_load(text)
        assert text.count(f"runs/{name}") == 1 and cfg["trainer"]["default_root_dir"] == f"runs/{name}"
        assert cfg["model"]["export_path"] == "gmpi.pt"


@pytest.mark.parametrize("value", [None, "."])
def test_a_logger_left_at_the_default_follows_the_root(value):
    """Lightning's own default save_dir ('.') counts as left out; a written one does not."""
    cfg = {"trainer": {"default_root_dir": "R", "logger": [
        {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": value}},
        {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "mine"}}]}}
    assert [e["init_args"]["save_dir"] for e in fill_run_paths(cfg)["trainer"]["logger"]] == ["R", "mine"]
