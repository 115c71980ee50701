"""Training: losses with hand-computed values, phases, EMA, worst-view selection, resume, configs, precision."""

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from datamodules.converters import convert_synthetic
from datamodules.posed_images import PosedImageDataModule
from gmpi_lightning import cameras
from gmpi_lightning.losses import (
    d_logistic_loss,
    ema_update,
    g_nonsaturating_loss,
    r1_penalty,
    stylegan2_ema_beta,
    torch_ema_beta,
)
from gmpi_lightning.module import GMPIModule
from gmpi_lightning.trainer import run_lightning_cli
from tests.conftest import REPO, max_err

TINY = dict(preset="synthetic32", resolution=16, z_dim=16, w_dim=16, mapping_layers=2, channel_base=256,
            channel_max=16, train_planes=6, views_per_z=2, max_iters=3, shading_start=1, shading_grow=2)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return convert_synthetic(tmp_path_factory.mktemp("syn") / "s16", num=96, resolution=16, seed=3,
                             samples_per_shard=8)


def _trainer(tmp_path, **kw):
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, default_root_dir=tmp_path, **kw)


def _dm(shards, **kw):
    return PosedImageDataModule(str(shards), batch_size=4, batches_per_epoch=50, num_workers=0, seed=0, **kw)


# ------------------------------------------------------------------------------------------ losses
def test_losses_hand_computed():
    real, fake = torch.tensor([[0.0], [2.0]]), torch.tensor([[-1.0], [1.0]])
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    assert float(d_logistic_loss(real, fake)) == pytest.approx((sp(0) + sp(-2)) / 2 + (sp(-1) + sp(1)) / 2)
    assert float(g_nonsaturating_loss(fake)) == pytest.approx((sp(1) + sp(-1)) / 2)
    # R1 of a linear D(x) = <w, x>: the input gradient is w for every sample -> gamma/2 * ||w||^2
    w = torch.randn(1, 3, 4, 4)
    x = torch.randn(5, 3, 4, 4, requires_grad=True)
    logits = (x * w).sum(dim=[1, 2, 3])[:, None]
    assert float(r1_penalty(logits, x, gamma=10.0)) == pytest.approx(5.0 * float(w.square().sum()), rel=1e-5)
    # a quadratic D(x) = sum x^2: gradient 2x -> gamma/2 * mean ||2x||^2, and it is differentiable
    x2 = torch.randn(3, 1, 2, 2, requires_grad=True)
    r1 = r1_penalty(x2.square().sum(dim=[1, 2, 3])[:, None], x2, gamma=2.0)
    assert float(r1) == pytest.approx(float((2 * x2).square().sum(dim=[1, 2, 3]).mean()), rel=1e-5)
    r1.backward()
    assert max_err(x2.grad, 2 * 4 * x2.detach() / 3) < 1e-5


def test_ema_formulas_and_update():
    # StyleGAN2-ADA: half-life of ema_kimg*1000 images, ramped up by the images seen
    assert stylegan2_ema_beta(32, 10_000_000, 10.0, None) == pytest.approx(0.5 ** (32 / 10_000))
    assert stylegan2_ema_beta(32, 1000, 10.0, 0.05) == pytest.approx(0.5 ** (32 / 50))
    assert torch_ema_beta(0) == pytest.approx(2 / 11)  # torch_ema warm-up: (1+t)/(10+t) with t = 1
    assert torch_ema_beta(100_000, 0.999) == 0.999
    ema, live = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    ema.register_buffer("stat", torch.zeros(2))
    live.register_buffer("stat", torch.ones(2))
    before = ema.weight.detach().clone()
    ema_update(ema, live, 0.9)
    assert max_err(ema.weight, 0.9 * before + 0.1 * live.weight.detach()) < 1e-6
    assert max_err(ema.stat, torch.ones(2)) == 0  # buffers are copied


# -------------------------------------------------------------------------------------------- phases
class Capture(pl.Callback):
    def __init__(self):
        self.records = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.hooks = [module.D.register_forward_hook(lambda m, i, o: self.records.append(o.detach().clone()))]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        for h in self.hooks:
            h.remove()
        self.after = {n: p.detach().clone() for n, p in module.named_parameters()}
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_one_iteration_losses_and_adam_steps(shards, tmp_path):
    torch.manual_seed(0)
    model = GMPIModule(**dict(TINY, max_iters=1, r1_gamma=0.0, grad_clip=None, shading=False))
    cap = Capture()
    _trainer(tmp_path, callbacks=[cap]).fit(model, _dm(shards))
    # D forward calls: real, fake (D step), 2 view scores (selection), fake (G step)
    real, fake, view0, view1, g_fake = cap.records
    assert real.shape == (4, 1) and len(cap.records) == 5
    assert cap.metrics["loss_d"] == pytest.approx(float(d_logistic_loss(real, fake)), rel=1e-5)
    assert cap.metrics["loss_g"] == pytest.approx(float(g_nonsaturating_loss(g_fake)), rel=1e-5)
    # first Adam step with beta1 = 0: every parameter with a gradient moves by about lr (sign of the gradient)
    moved = [float((cap.after[n] - cap.before[n]).abs().max()) for n in cap.before if n.startswith("D.")]
    assert max(moved) == pytest.approx(0.002, rel=0.05)
    assert model.iteration == 1 and model.nimg == 4


def test_worst_view_selection_picks_min_logit(shards, tmp_path):
    torch.manual_seed(1)
    model = GMPIModule(**dict(TINY, views_per_z=5))

    class YawD(torch.nn.Module):  # logit = the yaw encoded in the pose: the worst view is the leftmost camera
        def forward(self, img, c):
            w2c = c.reshape(-1, 4, 4)
            yaw, _ = cameras.yaw_pitch_from_w2c(w2c, 1.0)
            return yaw[:, None]

    model.D = YawD()
    torch.manual_seed(7)
    chosen = model.select_views(torch.randn(3, 16))
    torch.manual_seed(7)
    torch.randn(3, 16)
    all_poses = model.sample_c2w(15).reshape(3, 5, 4, 4)
    yaws = torch.stack([cameras.yaw_pitch_from_w2c(cameras.invert_rigid(all_poses[:, k]), 1.0)[0] for k in range(5)], 1)
    picked = cameras.yaw_pitch_from_w2c(cameras.invert_rigid(chosen), 1.0)[0]
    assert max_err(picked, yaws.min(dim=1).values) < 1e-5


def test_shading_schedule_in_training(shards, tmp_path):
    torch.manual_seed(2)
    model = GMPIModule(**dict(TINY, max_iters=3, shading_start=1, shading_grow=4, shading_schedule="as_coded"))
    _trainer(tmp_path).fit(model, _dm(shards))
    # iterations 2 and 3 shade: 2 calls each (D step, G step) -> 4 calls -> full strength
    assert model.shading_calls == 4 and model._last_shading == pytest.approx(0.9 + 0.1)


def test_nonfinite_steps_are_skipped_then_stop(shards, tmp_path):
    torch.manual_seed(3)
    model = GMPIModule(**dict(TINY, max_iters=10, max_nonfinite=3))
    with torch.no_grad():
        model.D.b4.out.bias.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite"):
        _trainer(tmp_path).fit(model, _dm(shards))
    assert model.nonfinite_total == 3 and model.iteration == 1


def test_stylegan2_mode_trains_and_exports(shards, tmp_path):
    torch.manual_seed(4)
    out = tmp_path / "sg2.pt"
    model = GMPIModule(**dict(TINY, mode="stylegan2", max_iters=2, export_path=str(out)))
    model.D.b4.mbstd.group_size = 4
    _trainer(tmp_path).fit(model, _dm(shards))
    from gmpi_lightning.io import load_stylegan2_pkl

    nets = load_stylegan2_pkl(out)
    z = torch.randn(2, 16)
    with torch.no_grad():
        assert max_err(nets["G_ema"](z, None, noise_mode="const"), model.G_ema(z, None, noise_mode="const")) < 1e-6
    # ... and GMPI fine-tuning initialises from that export
    gm = GMPIModule(**dict(TINY, init_from=str(out)))
    assert max_err(gm.G.synthesis.b16.conv1.weight, model.G_ema.synthesis.b16.conv1.weight) == 0
    assert gm.D.b4.out.weight.shape[0] == 16


def test_bf16_autocast_losses_close_to_fp32(shards):
    torch.manual_seed(5)
    model = GMPIModule(**TINY).eval()
    batch = next(iter(_dm(shards).train_dataloader()))

    def losses():
        torch.manual_seed(9)
        z = model.sample_z(4)
        c2w = model.sample_c2w(4)
        fake = model.fake_images(model.G, z, c2w, shade=False, noise_mode="const")
        real_logits = model.D(batch["image"], batch["w2c"])
        fake_logits = model.D(fake, model.d_condition(c2w))
        return float(d_logistic_loss(real_logits, fake_logits)), float(g_nonsaturating_loss(fake_logits))

    with torch.no_grad():
        ref = losses()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = losses()
    assert low[0] == pytest.approx(ref[0], rel=0.05, abs=0.02) and low[1] == pytest.approx(ref[1], rel=0.05, abs=0.02)


# ---------------------------------------------------------------------------- CLI, configs, resume
def _cli(args):
    return run_lightning_cli(args)


def test_resume_continues_counters_and_ema(shards, tmp_path):
    ckdir = tmp_path / "ck"
    common = ["--config", str(REPO / "experiments" / "synthetic.yaml"), f"--data.data={shards}",
              "--data.batch_size=4", "--data.num_workers=0", "--model.init_from=null", "--model.preset=synthetic32",
              "--model.resolution=16", "--model.z_dim=16", "--model.w_dim=16", "--model.mapping_layers=2",
              "--model.channel_base=256", "--model.channel_max=16", "--model.train_planes=6",
              "--model.views_per_z=2", "--model.export_path=null", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0",
              f"--trainer.default_root_dir={tmp_path}",
              "--trainer.callbacks=lightning.pytorch.callbacks.ModelCheckpoint",
              f"--trainer.callbacks.dirpath={ckdir}", "--trainer.callbacks.every_n_train_steps=4",
              "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=-1"]
    # "killed" after 3 iterations: the last checkpoint holds iteration 2 (4 optimiser steps)
    cli = _cli(["fit", *common, "--model.max_iters=3"])
    first = cli.model
    ck = torch.load(ckdir / "epoch=0-step=4.ckpt", weights_only=False)
    assert ck["gmpi_state"]["iteration"] == 2 and ck["gmpi_state"]["ema_updates"] == 2
    assert "views_per_z: 2" in ck["run_config"] and "batch_size: 4" in ck["run_config"]  # the resolved config
    from gmpi_lightning.inference import load_generator

    assert load_generator(ckdir / "epoch=0-step=4.ckpt").training_data == str(shards)  # gmpi evaluate's --data
    saved_ema = {k: v for k, v in ck["state_dict"].items() if k.startswith("G_ema.")}
    resumed = _cli(["fit", *common, "--model.max_iters=5", f"--ckpt_path={ckdir / 'epoch=0-step=4.ckpt'}"]).model
    assert resumed.iteration == 5 and resumed.ema_updates == 5 and resumed.nimg == 5 * 4  # no reset, no repeat
    assert first.iteration == 3
    assert any(max_err(resumed.state_dict()[k], v) > 0 for k, v in saved_ema.items())  # EMA kept moving
    # loading restores exactly what was saved
    again = GMPIModule.load_from_checkpoint(ckdir / "epoch=0-step=4.ckpt", weights_only=False)
    assert all(max_err(again.state_dict()[k], v) == 0 for k, v in saved_ema.items())


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "experiments").glob("*.yaml")))
def test_every_experiment_config_runs_fast_dev_run(name, shards, tmp_path):
    args = ["fit", "--config", str(REPO / "experiments" / f"{name}.yaml"), f"--data.data={shards}",
            "--data.batch_size=4", "--data.num_workers=0", "--model.init_from=null", "--model.resolution=16",
            "--model.z_dim=16", "--model.w_dim=16", "--model.mapping_layers=2", "--model.channel_base=256",
            "--model.channel_max=16", "--model.train_planes=6", "--model.views_per_z=2", "--model.batch_split=2",
            "--model.export_path=null", "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.fast_dev_run=1",
            "--trainer.enable_progress_bar=false", "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}"]
    cli = _cli(args)
    assert cli.model.iteration == 1
    assert np.isfinite(float(cli.trainer.callback_metrics["loss_d"]))


def test_print_config_and_saved_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(["fit", "--config", str(REPO / "experiments" / "ffhq256.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "r1_gamma: 10.0" in out and "views_per_z: 4" in out and "train_planes: 32" in out
    assert Path(REPO / "experiments" / "ffhq256.yaml").read_text().count("lr: 0.002") == 1


def test_hparams_are_in_checkpoints(shards, tmp_path):
    torch.manual_seed(6)
    model = GMPIModule(**dict(TINY, max_iters=1))
    trainer = _trainer(tmp_path)
    trainer.fit(model, _dm(shards))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ck = torch.load(tmp_path / "m.ckpt", weights_only=False)
    assert ck["hyper_parameters"]["train_planes"] == 6 and "torch_rng" in ck["gmpi_state"]
    # gmpi render reads training checkpoints directly: their G_ema, with the run's preset
    from gmpi_lightning.inference import load_generator

    loaded = load_generator(tmp_path / "m.ckpt")
    assert loaded.kind == "gmpi" and loaded.preset.resolution == 16
    assert loaded.training_data is None  # fitted without LightningCLI: no run config to read it from
    assert load_generator(model.export(tmp_path / "g.pt")).training_data == str(shards)  # the export records it
    codes = model.preset.normalized_plane_depths(5)
    z = torch.randn(2, 16)
    with torch.no_grad():
        assert max_err(loaded.G(z, None, codes), model.G_ema(z, None, codes)) == 0


def test_two_process_ddp_keeps_ranks_in_sync(shards, tmp_path):
    """2 CPU processes (gloo): after training, G, D and G_ema are identical on both ranks; data differ."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK",
                                                              "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "gmpi_lightning", "fit", "--config", str(REPO / "experiments" / "synthetic.yaml"),
           f"--data.data={shards}", "--data.batch_size=2", "--data.num_workers=0", "--model.init_from=null",
           "--model.resolution=16", "--model.z_dim=16", "--model.w_dim=16", "--model.mapping_layers=2",
           "--model.channel_base=256", "--model.channel_max=16", "--model.train_planes=6", "--model.views_per_z=2",
           "--model.max_iters=3", "--model.export_path=null", "--trainer.logger=false",
           "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu",
           "--trainer.devices=2", f"--trainer.default_root_dir={tmp_path}",
           "--trainer.callbacks=tests.ddp_callbacks.RankReport", f"--trainer.callbacks.out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["iteration"] == r1["iteration"] == 3
    for net in ("G", "D", "G_ema"):
        assert r0[net] == r1[net], f"{net} differs between ranks"
    assert r0["keys"] != r1["keys"]  # each rank saw its own samples
