"""Training: losses with hand-computed values, phases, EMA, worst-view selection, resume, configs, precision."""

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from datamodules.posed_images import PosedImageDataModule
from gmpi_lightning import cameras, lock
from gmpi_lightning.losses import (
    d_logistic_loss,
    ema_update,
    g_nonsaturating_loss,
    r1_penalty,
    stylegan2_ema_beta,
    torch_ema_beta,
)
from gmpi_lightning.module import GMPIModule, StyleGAN2Module
from gmpi_lightning.trainer import run_lightning_cli
from tests.conftest import REPO, TINY_ARCH, max_err

SG2_ARGS = ("preset", "resolution", "arch")
ARCH = dict(z_dim=16, w_dim=16, mapping_layers=2, channel_base=256, channel_max=16)
TINY = dict(preset="synthetic32", resolution=16, arch=ARCH, train_planes=6, views=dict(per_z=2), max_iters=3,
            shading=dict(start=1, grow=2))


def tiny(**over) -> dict:
    """TINY with ``over``; a group given as a dict changes only the fields it names."""
    return {**TINY, **{k: {**TINY[k], **v} if isinstance(v, dict) and isinstance(TINY.get(k), dict) else v
                       for k, v in over.items()}}


def _trainer(tmp_path, **kw):
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=tmp_path, **kw)


def _dm(shards, **kw):
    kw = {"batches_per_epoch": 50, **kw}
    return PosedImageDataModule(str(shards), batch_size=4, num_workers=0, seed=0, **kw)


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
    model = GMPIModule(**tiny(max_iters=1, optim=dict(r1_gamma=0.0, grad_clip=None), shading=dict(enabled=False)))
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
    model = GMPIModule(**tiny(views=dict(per_z=5)))

    class YawD(torch.nn.Module):  # logit = the yaw encoded in the pose: the worst view is the leftmost camera
        def forward(self, img, c):
            w2c = c.reshape(-1, 4, 4)
            yaw, _ = cameras.yaw_pitch_from_w2c(w2c, 1.0)
            return yaw[:, None]

    model.D = YawD()
    state = model.rng.get_state()
    chosen = model.fakes.g_step_condition(model.G, model.D, torch.randn(3, 16), model.rng)
    model.rng.set_state(state)  # the candidates are the first draws of the module's stream
    all_poses = model.fakes.sample(15, model.rng).reshape(3, 5, 4, 4)
    yaws = torch.stack([cameras.yaw_pitch_from_w2c(cameras.invert_rigid(all_poses[:, k]), 1.0)[0] for k in range(5)], 1)
    picked = cameras.yaw_pitch_from_w2c(cameras.invert_rigid(chosen), 1.0)[0]
    assert max_err(picked, yaws.min(dim=1).values) < 1e-5


def test_shading_schedule_in_training(shards, tmp_path):
    torch.manual_seed(2)
    model = GMPIModule(**tiny(max_iters=3, shading=dict(start=1, grow=4, schedule="as_coded")))
    _trainer(tmp_path).fit(model, _dm(shards))
    # iterations 2 and 3 shade: 2 calls each (D step, G step) -> 4 calls -> full strength
    assert model.fakes.shading_calls == 4 and model.fakes.last_shading == pytest.approx(0.9 + 0.1)


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
    model = StyleGAN2Module(**{k: v for k, v in TINY.items() if k in SG2_ARGS}, max_iters=2, export_path=str(out))
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
        model.rng.manual_seed(9)
        z = model.sample_z(4)
        c2w = model.fakes.sample(4, model.rng)
        fake = model.fakes.images(model.G, z, c2w, noise_mode="const")
        real_logits = model.D(batch["image"], batch["w2c"])
        fake_logits = model.D(fake, model.fakes.condition(c2w))
        return float(d_logistic_loss(real_logits, fake_logits)), float(g_nonsaturating_loss(fake_logits))

    with torch.no_grad():
        ref = losses()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = losses()
    assert low[0] == pytest.approx(ref[0], rel=0.05, abs=0.02) and low[1] == pytest.approx(ref[1], rel=0.05, abs=0.02)


# ---------------------------------------------------------------------------- CLI, configs, resume
def _cli(args):
    return run_lightning_cli(args)


class KillAt(pl.Callback):
    """Dies like a killed job (no clean shutdown of anything after it) right after iteration ``at``."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if module.iteration == self.at:
            raise SystemExit(f"killed after iteration {self.at}")


def _flat(obj, prefix=""):
    """Every tensor and number of a (nested) checkpoint, by path."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in _flat(val, f"{prefix}{key}/").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, val in enumerate(obj) for k, v in _flat(val, f"{prefix}{i}/").items()}
    return {prefix.rstrip("/"): obj} if isinstance(obj, (torch.Tensor, int, float)) else {}


def test_resume_is_bit_identical(shards, tmp_path):
    """6 iterations straight vs. killed after 4, resumed from the iteration-3 checkpoint to 6: every weight, optimiser
    moment, counter, random stream, the augmentation probability and the data position end identical. Shading, lazy
    R1, batch_split, x-flip, adaptive augmentation (p updated every 2 iterations: the checkpoint holds signs counted
    mid-interval) and an epoch boundary of the data stream (4 batches per epoch) are all in play."""
    def run(name, *extra, kill=None):
        ckdir = tmp_path / name
        args = ["fit", "--config", str(REPO / "experiments" / "synthetic.yaml"), f"--data.data={shards}",
                "--data.batch_size=4", "--data.num_workers=0", "--data.batches_per_epoch=4", "--data.xflip=true",
                "--model.init_from=null", "--model.resolution=16", TINY_ARCH,
                "--model.train_planes=6", "--model.views.per_z=2", "--model.optim.batch_split=2",
                "--model.optim.r1_every=2",
                "--model.shading.enabled=true", "--model.shading.start=2", "--model.shading.grow=3",
                "--model.max_iters=6",
                "--model.augment.mode=ada", "--model.augment.p=0.5", "--model.augment.interval=2",
                "--model.augment.kimg=0.05",
                "--model.export_path=null", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={ckdir}", *extra]
        callbacks = [{"class_path": "callbacks.checkpoint.IterationCheckpoint",
                      "init_args": {"dirpath": str(ckdir), "every_n_iters": 3, "save_last": True, "save_top_k": -1}}]
        if kill:
            callbacks.append({"class_path": "tests.test_module.KillAt", "init_args": {"at": kill}})
        try:
            _cli([*args, f"--trainer.callbacks={json.dumps(callbacks)}"])
        except SystemExit as e:
            assert kill and "killed" in str(e)
        finally:  # each run is a process of its own in reality: its exit releases the run-folder lock
            lock.release(ckdir / lock.LOCK_NAME)
        return ckdir

    straight = run("straight")
    killed = run("killed", kill=4)
    assert sorted(p.name for p in killed.glob("it*.ckpt")) == ["it000003.ckpt"]  # died after it, before 6
    ck3 = torch.load(killed / "it000003.ckpt", weights_only=True)  # plain data: loads without running code
    assert ck3["gmpi_state"]["iteration"] == 3 and ck3["PosedImageDataModule"]["train_batches_used"] == 3
    assert "per_z: 2" in ck3["run_config"] and "batch_size: 4" in ck3["run_config"]  # the resolved config
    run("killed", f"--ckpt_path={killed / 'it000003.ckpt'}")
    a = _flat(torch.load(straight / "it000006.ckpt", weights_only=True))
    b = _flat(torch.load(killed / "it000006.ckpt", weights_only=True))
    compared = [k for k in a if k.split("/")[0] in ("state_dict", "optimizer_states", "gmpi_state",
                                                      "PosedImageDataModule")]
    assert compared and set(compared) <= set(b)
    assert any(k.startswith("optimizer_states/1/state/") for k in compared)  # D's Adam moments are compared
    assert any(k.startswith("gmpi_state/rng/states") for k in compared)
    assert "gmpi_state/ada/p" in compared and any(k.startswith("gmpi_state/ada/signs") for k in compared)
    diff = {k: float((a[k].double() - b[k].double()).abs().max()) if isinstance(a[k], torch.Tensor)
            else abs(a[k] - b[k]) for k in compared}
    assert max(diff.values()) == 0, {k: v for k, v in diff.items() if v}
    assert a["gmpi_state/iteration"] == 6 and a["gmpi_state/shading_calls"] == 2 * 4 + 4  # D + G (2 chunks) x 4 its
    # the run moved: iteration 3 and 6 differ (a resume that restored nothing would still match itself)
    a3 = _flat(torch.load(straight / "it000003.ckpt", weights_only=True))
    assert max(float((a3[k] - a[k]).abs().max()) for k in a if k.startswith("state_dict/G.")) > 0
    assert float(a3["gmpi_state/ada/signs"].abs().sum()) > 0  # 4 reals counted since the update at iteration 2
    assert {float(a3["gmpi_state/ada/p"]), float(a["gmpi_state/ada/p"])} != {0.5}  # p moved (by 0.16 per update)


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "experiments").glob("*.yaml")))
def test_every_experiment_config_runs_fast_dev_run(name, shards, tmp_path):
    args = ["fit", "--config", str(REPO / "experiments" / f"{name}.yaml"), f"--data.data={shards}",
            "--data.batch_size=4", "--data.num_workers=0", "--model.init_from=null", "--model.resolution=16",
            TINY_ARCH, "--model.optim.batch_split=2",
            "--model.export_path=null", "--trainer.logger=false", "--trainer.callbacks=[]",
            "--trainer.fast_dev_run=1",
            "--trainer.enable_progress_bar=false", "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path}"]
    if name != "synthetic_stylegan2":  # GMPIModule's own arguments (the 2D module takes none of them)
        args += ["--model.train_planes=6", "--model.views.per_z=2"]
    cli = _cli(args)
    assert cli.model.iteration == 1
    assert np.isfinite(float(cli.trainer.callback_metrics["loss_d"]))


def test_print_config_and_saved_config(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _cli(["fit", "--config", str(REPO / "experiments" / "ffhq256.yaml"), "--print_config"])
    out = capsys.readouterr().out
    assert "    r1_gamma: 10.0" in out and "    per_z: 4" in out and "  train_planes: 32" in out  # nested groups
    assert Path(REPO / "experiments" / "ffhq256.yaml").read_text().count("lr: 0.002") == 1


def test_hparams_are_in_checkpoints(shards, tmp_path):
    torch.manual_seed(6)
    model = GMPIModule(**dict(TINY, max_iters=1))
    trainer = _trainer(tmp_path)
    trainer.fit(model, _dm(shards))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ck = torch.load(tmp_path / "m.ckpt", weights_only=True)  # plain data
    assert ck["hyper_parameters"]["train_planes"] == 6 and ck["gmpi_state"]["rng"]["states"].shape[0] == 1
    again = GMPIModule.load_from_checkpoint(tmp_path / "m.ckpt")  # the subclass's arguments are in the hparams
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())
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


def test_two_process_ddp_ranks_draw_their_own_data_and_stay_in_sync(shards, tmp_path):
    """2 CPU processes (gloo), batch_split 2, adaptive augmentation: no image the discriminator sees on rank 0 (real
    or fake) is also seen on rank 1, and yet G, D and G_ema end identical on both ranks, which only the gradient
    all-reduce (including the G step's accumulation under block_backward_sync) can achieve when the ranks' data
    differ; the augmentation probability, updated every iteration from both ranks' signs, is the same on both and
    moved by whole steps of the 8 reals of both ranks (8 / 80 = 0.1; rank-local counts would give steps of 0.05)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK",
                                                              "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "gmpi_lightning", "fit", "--config", str(REPO / "experiments" / "synthetic.yaml"),
           f"--data.data={shards}", "--data.batch_size=4", "--data.num_workers=0", "--model.init_from=null",
           "--model.resolution=16", TINY_ARCH, "--model.train_planes=6", "--model.views.per_z=2",
           "--model.optim.batch_split=2", "--model.max_iters=3", "--model.export_path=null", "--trainer.logger=false",
           "--model.augment.mode=ada", "--model.augment.p=0.5", "--model.augment.interval=1",
           "--model.augment.kimg=0.08",
           "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu",
           "--trainer.devices=2", f"--trainer.default_root_dir={tmp_path}",
           "--trainer.callbacks=tests.ddp_callbacks.RankReport", f"--trainer.callbacks.out={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2 and r0["iteration"] == r1["iteration"] == 3
    # 3 iterations x (4 reals + 4 fakes + 2 x 4 candidate views + 4 G-step fakes) images per rank
    assert r0["seen"].shape[0] == r1["seen"].shape[0] == 3 * 20
    assert not set(r0["keys"]) & set(r1["keys"]) and len(r0["keys"]) == 12  # disjoint reals
    nearest = torch.cdist(r0["seen"].double(), r1["seen"].double()).min()  # closest pair across the ranks
    assert nearest > 1.0, f"rank 0 and rank 1 saw an image in common (distance {float(nearest):.3g})"
    for k, v in r0["weights"].items():
        if k.endswith("mapping.w_avg"):  # rank-local running mean of each rank's own w (NVlabs: no buffer sync)
            assert not torch.equal(v, r1["weights"][k])
        else:
            assert torch.equal(v, r1["weights"][k]), f"{k} differs between ranks"
    assert torch.equal(r0["augment_p"], r1["augment_p"])
    steps = (float(r0["augment_p"]) - 0.5) / 0.1
    assert abs(steps - round(steps)) < 1e-5 and round(steps) % 2 == 1  # 3 updates of +-0.1 (none reaches 0 or 1)


def test_an_iteration_reads_back_one_value_per_optimiser_step(shards, tmp_path):
    """Host reads of tensor values (each one a device synchronisation on a GPU) per iteration, counted from batch start
    to the next batch start: our code reads exactly one per optimiser step (the finiteness of gradient norm + loss),
    plus one transfer of the logged values on logging iterations (every 4th here). Adaptive augmentation is on: its
    draws, r_t and p's updates stay on the device."""
    from benchmarks.profiling import IterationProbe

    torch.manual_seed(8)
    model = GMPIModule(**tiny(max_iters=8, optim=dict(batch_split=2), shading=dict(start=1),
                              augment=dict(mode="ada", p=0.3, interval=2)))
    probe = IterationProbe(skip=1, where=True)
    _trainer(tmp_path, callbacks=[probe], log_every_n_steps=4).fit(model, _dm(shards))
    assert len(probe.project_reads) == 7  # iterations 2..8
    logging = [it % 4 == 0 or it == 8 for it in range(2, 9)]
    assert probe.project_reads == [3 if log else 2 for log in logging], probe.sites


def test_lazy_r1_keeps_the_plain_learning_rate(shards, tmp_path):
    """R1 folded into the D step every r1_every iterations: Adam keeps lr and betas (StyleGAN2's rescaling is for R1
    as an extra step). With beta1 = 0 the first Adam step moves every D parameter with a gradient by about lr."""
    torch.manual_seed(0)
    model = GMPIModule(**tiny(max_iters=1, optim=dict(r1_gamma=1.0, r1_every=4, grad_clip=None),
                       shading=dict(enabled=False)))
    cap = Capture()
    _trainer(tmp_path, callbacks=[cap]).fit(model, _dm(shards))
    opt_g, opt_d = model.trainer.optimizers
    assert opt_d.param_groups[0]["lr"] == 0.002 and tuple(opt_d.param_groups[0]["betas"]) == (0.0, 0.9)
    moved = [float((cap.after[n] - cap.before[n]).abs().max()) for n in cap.before if n.startswith("D.")]
    assert max(moved) == pytest.approx(0.002, rel=0.02)  # not 0.002 * 4 / 5
    assert cap.metrics["train/r1"] > 0  # iteration 0 % 4 == 0: R1 was in this step


def test_checkpoints_count_iterations_not_optimiser_steps(shards, tmp_path):
    """every_n_iters: 2 over 5 iterations (10 optimiser steps): it000002, it000004 and the final it000005, each
    holding the iteration its name says (Lightning's every_n_train_steps: 2 would save every iteration)."""
    from callbacks.checkpoint import IterationCheckpoint

    torch.manual_seed(3)
    model = GMPIModule(**dict(TINY, max_iters=5))
    # every_n_epochs=None is what LightningCLI passes; with 3 batches per epoch an epoch-end save would add it000003
    ck = IterationCheckpoint(dirpath=tmp_path / "ck", every_n_iters=2, save_last=True, save_top_k=-1,
                             every_n_epochs=None)
    _trainer(tmp_path, callbacks=[ck], enable_checkpointing=True).fit(model, _dm(shards, batches_per_epoch=3))
    names = sorted(p.name for p in (tmp_path / "ck").glob("*.ckpt"))
    assert names == ["it000002.ckpt", "it000004.ckpt", "it000005.ckpt", "last.ckpt"]
    for name, it in (("it000002.ckpt", 2), ("it000004.ckpt", 4), ("last.ckpt", 5)):
        saved = torch.load(tmp_path / "ck" / name, weights_only=True)
        assert saved["gmpi_state"]["iteration"] == it and saved["global_step"] == 2 * it
    with pytest.raises(ValueError, match="every_n_iters"):
        IterationCheckpoint(every_n_train_steps=400)


def test_init_from_a_checkpoint_never_runs_its_code(shards, tmp_path):
    """A .ckpt whose pickle would call a function when loaded with weights_only=False is refused with the file
    named; the function never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state_dict": {}, "evil": Payload()}, tmp_path / "evil.ckpt")
    model = GMPIModule(**dict(TINY, init_from=str(tmp_path / "evil.ckpt")))
    with pytest.raises(ValueError, match="evil.ckpt"):
        model.setup("fit")
    assert not marker.exists()
