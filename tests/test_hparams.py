"""The typed hyper-parameter groups and the flat names of older configs: every old name lands on the nested field it
meant (written out by hand here, not derived from the table), with one deprecation line per file or command line;
checkpoints hold the groups as plain data and rebuild the same typed module."""

from __future__ import annotations

import io

import pytest
import torch
import yaml

from gmpi_lightning import hparams as hp
from gmpi_lightning import runs, sweeps
from gmpi_lightning.errors import InputError
from gmpi_lightning.hparams import FLAT_NAMES, GROUPS, group, migrate_argv, migrate_model, plain
from gmpi_lightning.module import GMPIModule
from tests.test_module import tiny

# every flat name with a value that is not its default, and where it must land
FLAT = dict(z_dim=16, w_dim=24, mapping_layers=3, channel_base=512, channel_max=32, lr=0.003, betas=[0.1, 0.8],
            train_mapping=False, r1_gamma=2.5, r1_every=3, grad_clip=4.0, batch_split=2, ema="torch_ema",
            ema_kimg=2.0, ema_rampup=0.1, ema_decay=0.9, augment="ada", augment_p=0.2, augment_ops=["cutout"],
            ada_target=0.5, ada_interval=5, ada_kimg=50.0, alpha_mode="add_z", pos_enc_multires=2,
            alpha_init_gain=0.3, alpha_init_logit=-1.0, alpha_depth_slope=20.0, alpha_depth_center=0.15,
            pose_conditioning=False, d_pose_init="pretrained_logit", mbstd_group_size=2, views_per_z=3,
            view_selection="random", shading=False, shading_schedule="ramp", shading_start=7, shading_grow=9)
NESTED = dict(
    arch=dict(z_dim=16, w_dim=24, mapping_layers=3, channel_base=512, channel_max=32),
    optim=dict(lr=0.003, betas=[0.1, 0.8], train_mapping=False, r1_gamma=2.5, r1_every=3, grad_clip=4.0,
               batch_split=2),
    ema=dict(kind="torch_ema", kimg=2.0, rampup=0.1, decay=0.9),
    augment=dict(mode="ada", p=0.2, ops=["cutout"], target=0.5, interval=5, kimg=50.0),
    alpha=dict(mode="add_z", pos_enc_multires=2, init_gain=0.3, init_logit=-1.0, depth_slope=20.0, depth_center=0.15),
    discriminator=dict(pose_conditioning=False, pose_init="pretrained_logit", mbstd_group_size=2),
    views=dict(per_z=3, selection="random"),
    shading=dict(enabled=False, schedule="ramp", start=7, grow=9))


def test_every_flat_name_lands_on_its_field():
    warned = []
    assert migrate_model(dict(FLAT, preset="synthetic32"), "old.yaml", warned.append) == dict(NESTED,
                                                                                             preset="synthetic32")
    assert len(warned) == 1 and warned[0].startswith("old.yaml: flat model names are deprecated; write ")
    assert "model.shading.start for model.shading_start" in warned[0] and warned[0].count(" for ") == len(FLAT)
    assert sorted(FLAT_NAMES) == sorted(FLAT)
    assert {f"{g}.{f}" for g, cls in GROUPS.items() for f in cls.__dataclass_fields__} == set(FLAT_NAMES.values())


def test_flat_and_nested_configs_resolve_to_the_same_run(tmp_path, capfd):
    """`gmpi fit`'s parser on a YAML with flat keys plus flat command-line overrides = the nested YAML."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"model": {"preset": "synthetic32", "init_from": None}, "data": {"data": "d"}}))
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text(yaml.safe_dump({"model": {k: v for k, v in FLAT.items() if k != "lr"}}))
    nested.write_text(yaml.safe_dump({"model": NESTED}))
    old = runs.resolve(["--config", str(base), "--config", str(flat), "--model.lr=0.003"])
    err = capfd.readouterr().err.strip().splitlines()
    new = runs.resolve(["--config", str(base), "--config", str(nested)])
    assert capfd.readouterr().err == ""  # nothing to warn about
    assert old["model"] == new["model"]
    assert runs.init_args(new, "model")["shading"] == NESTED["shading"]
    assert len(err) == 2 and err[0].startswith(f"gmpi: warning: {flat}: flat model names are deprecated; write ")
    assert err[1] == "gmpi: warning: arguments: flat model names are deprecated; write model.optim.lr for model.lr"


def test_argv_forms(tmp_path):
    said = []
    argv = ["fit", "--model.shading_start", "5", "--model.init_args.lr=0.1", "--model.optim.lr=0.2",
            "--model.preset=FFHQ256", "--model.arch", "--data.lr=1", "--model.max_iters"]
    assert migrate_argv(argv, said.append) == [
        "fit", "--model.shading.start=5", "--model.optim.lr=0.1", "--model.optim.lr=0.2", "--model.preset=FFHQ256",
        "--model.arch", "--data.lr=1", "--model.max_iters"]  # an option is never taken for a value
    assert said == ["arguments: flat model names are deprecated; write model.shading.start for model.shading_start, "
                    "model.optim.lr for model.init_args.lr"]
    # null of one field of a group, with `=` or as the next argument, the argument after it kept
    assert migrate_argv(["--model.optim.grad_clip=null", "--model.arch.channel_base", "null", "--model.grad_clip",
                         "null", "--model.init_args.alpha.mode", "add_z"]) == [
        '--model.optim={"grad_clip": null}', '--model.arch={"channel_base": null}', '--model.optim={"grad_clip": null}',
        "--model.init_args.alpha.mode=add_z"]
    quiet = []
    assert migrate_argv(["fit", "--model.optim.lr=0.2"], quiet.append) == ["fit", "--model.optim.lr=0.2"] and not quiet
    # config files: flat ones (plain, class_path + init_args, under a subcommand) become their migrated text with one
    # line each, nested and missing ones stay paths
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text(yaml.safe_dump({"model": {"lr": 0.1}}))
    nested.write_text(yaml.safe_dump({"model": {"optim": {"lr": 0.1}}}))
    sub = tmp_path / "sub.yaml"
    sub.write_text(yaml.safe_dump({"fit": {"model": {"class_path": "gmpi_lightning.module.StyleGAN2Module",
                                                     "init_args": {"ema": "torch_ema", "ema_decay": 0.9}}},
                                   "validate": {"model": {"lr": 0.3}}, "test": {"model": {"r1_gamma": 1.0}}}))
    said = []
    out = migrate_argv(["--config", str(flat), f"--config={nested}", "--config", str(sub), "--config=missing.yaml"],
                       said.append)
    assert [yaml.safe_load(o.removeprefix("--config=")) for o in out[::2]] == [
        {"model": {"optim": {"lr": 0.1}}},
        {"fit": {"model": {"class_path": "gmpi_lightning.module.StyleGAN2Module",
                           "init_args": {"ema": {"kind": "torch_ema", "decay": 0.9}}}},
         "validate": {"model": {"optim": {"lr": 0.3}}}, "test": {"model": {"optim": {"r1_gamma": 1.0}}}}]
    assert out[1::2] == [f"--config={nested}", "--config=missing.yaml"]
    assert said == [f"{flat}: flat model names are deprecated; write model.optim.lr for model.lr",
                    f"{sub}: flat model names are deprecated; write model.ema.kind for model.ema, "
                    "model.ema.decay for model.ema_decay",
                    f"{sub}: flat model names are deprecated; write model.optim.lr for model.lr",
                    f"{sub}: flat model names are deprecated; write model.optim.r1_gamma for model.r1_gamma"]
    assert migrate_model({"class_path": "M", "init_args": None}, "x") == {"class_path": "M", "init_args": {}}
    assert migrate_model({"shading_start": 5, "shading": {"grow": 3}}, "x", said.append) == {
        "shading": {"start": 5, "grow": 3}}


def test_a_flat_sweep_parameter_is_renamed(tmp_path, capfd):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"model.r1_gamma": {"values": [1.0, 2.0]},
                                                                     "model.max_iters": {"value": 3}},
                                    "command": ["${env}", "${interpreter}", "-m", "gmpi_lightning", "fit", "${args}"]}))
    s = sweeps.load_sweep(path)
    assert sorted(s.params) == ["model.max_iters", "model.optim.r1_gamma"]
    assert f"{path}: flat model names are deprecated; write model.optim.r1_gamma for model.r1_gamma" in \
        capfd.readouterr().err


def test_groups_check_their_values():
    for bad, message in (
            (lambda: hp.Views(selection="best"), "views.selection must be one of 'worst', 'random'; got 'best'"),
            (lambda: hp.Views(per_z=0), "views.per_z must be >= 1, got 0"),
            (lambda: hp.Shading(schedule="linear"), "shading.schedule must be one of 'as_coded', 'ramp'; got 'linear'"),
            (lambda: hp.Optimisation(r1_every=0), "optim.r1_every must be >= 1, got 0"),
            (lambda: hp.Optimisation(batch_split=0), "optim.batch_split must be >= 1, got 0"),
            (lambda: hp.EMA(kind="ema"), "ema.kind must be one of 'stylegan2', 'torch_ema'; got 'ema'"),
            (lambda: hp.Augmentation(mode="on"), "augment.mode must be one of 'none', 'ada', 'fixed'; got 'on'"),
            (lambda: hp.Augmentation(interval=0), "augment.interval must be >= 1, got 0"),
            (lambda: hp.PoseDiscriminator(pose_init="zero"),
             "discriminator.pose_init must be one of 'official', 'pretrained_logit'; got 'zero'")):
        with pytest.raises(InputError) as err:
            bad()
        assert str(err.value) == message
    # the smallest allowed values pass
    assert (hp.Views(per_z=1, selection="random").per_z, hp.Augmentation(interval=1, mode="fixed").interval) == (1, 1)
    assert hp.Optimisation(r1_every=1, batch_split=1).r1_every == 1
    with pytest.raises(InputError, match=r"model.alpha: unknown \['gain'\]; its fields are"):
        group(hp.Alpha, {"gain": 1.0}, "alpha")
    with pytest.raises(InputError, match="model.alpha must be a mapping"):
        group(hp.Alpha, 3, "alpha")
    assert group(hp.Alpha, {"init_gain": 0.5}, "alpha") == hp.Alpha(init_gain=0.5)
    # a module's hyper-parameters: every group typed, each bad one named by its own key
    assert hp.typed({"alpha": {"init_gain": 0.5}, "lr_note": 1}) == {"alpha": hp.Alpha(init_gain=0.5), "lr_note": 1}
    with pytest.raises(InputError, match=r"^model.shading: unknown \['begin'\]"):
        hp.typed({"alpha": {}, "shading": {"begin": 3}})


def test_checkpoint_holds_plain_groups_and_rebuilds_the_typed_module():
    torch.manual_seed(0)
    model = GMPIModule(**tiny(shading=dict(start=4, schedule="ramp"), optim=dict(lr=0.004, betas=(0.1, 0.8))))
    assert isinstance(model.hparams.shading, hp.Shading) and model.hparams.shading.start == 4
    assert model.fakes.shading.schedule == "ramp" and model.configure_optimizers()[0].defaults["betas"] == (0.1, 0.8)
    ckpt = {"hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(ckpt)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)["hyper_parameters"]  # plain data only
    assert saved["shading"] == {"enabled": True, "schedule": "ramp", "start": 4, "grow": 2}
    assert saved["optim"]["betas"] == [0.1, 0.8]
    again = GMPIModule(**saved)
    assert again.hparams.shading == model.hparams.shading and again.hparams.optim.lr == 0.004
    assert model.hparams_initial["views"] == {"per_z": 2, "selection": "worst"}  # what loggers record
    assert plain(hp.Optimisation()) == {"lr": 0.002, "betas": [0.0, 0.9], "train_mapping": True, "r1_gamma": 10.0,
                                     "r1_every": 1, "grad_clip": 10.0, "batch_split": 1}


def test_defaults_are_the_official_recipe():
    """A default is the official code's value (docs/TRAINING.md's table) or StyleGAN2's where GMPI has none; a
    changed default changes every run that leaves it out, so it must change here too."""
    assert {g: plain(cls()) for g, cls in GROUPS.items()} == {
        "arch": {"z_dim": 512, "w_dim": 512, "mapping_layers": 8, "channel_base": None, "channel_max": None},
        "optim": {"lr": 0.002, "betas": [0.0, 0.9], "train_mapping": True, "r1_gamma": 10.0, "r1_every": 1,
                  "grad_clip": 10.0, "batch_split": 1},
        "ema": {"kind": "stylegan2", "kimg": 10.0, "rampup": 0.05, "decay": 0.999},
        "augment": {"mode": "none", "p": 0.0, "ops": ["translate", "brightness", "contrast", "cutout"], "target": 0.6,
                    "interval": 4, "kimg": 100.0},
        "alpha": {"mode": "normalize_add_z", "pos_enc_multires": 0, "init_gain": 1.0, "init_logit": 0.0,
                  "depth_slope": 0.0, "depth_center": 0.0},
        "discriminator": {"pose_conditioning": True, "pose_init": "official", "mbstd_group_size": 1},
        "views": {"per_z": 4, "selection": "worst"},
        "shading": {"enabled": True, "schedule": "as_coded", "start": 1000, "grow": 1000}}
    torch.manual_seed(0)
    model = GMPIModule(preset="synthetic32", train_planes=4, arch=dict(z_dim=16, w_dim=16, mapping_layers=2))
    assert {g: plain(model.hparams[g]) for g in GROUPS if g != "arch"} == {g: plain(cls()) for g, cls in
                                                                          GROUPS.items() if g != "arch"}
