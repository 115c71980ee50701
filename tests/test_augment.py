"""Pose-safe adaptive augmentation: each transform against its definition, the pose-safety of the shift, the per-image
probability, the random stream, double differentiability, StyleGAN2-ADA's p controller, and the training hook."""

import math

import lightning.pytorch as pl
import pytest
import torch

from datamodules.posed_images import PosedImageDataModule
from gmpi_lightning.augment import OPS, AdaptiveP, PoseSafeAugment, check_ops
from gmpi_lightning.cameras import sphere_c2w
from gmpi_lightning.losses import r1_penalty
from gmpi_lightning.module import GMPIModule
from gmpi_lightning.planes import preset_planes
from gmpi_lightning.presets import get_preset
from gmpi_lightning.render import render_mpi
from tests.test_module import tiny


def _images(n=6, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _identity(aug, n, size=16):
    return aug.sample(n, size, size, torch.tensor(0.0), torch.Generator())


# ------------------------------------------------------------------------------------------------- transforms
def test_translation_is_the_same_camera_with_a_shifted_sensor():
    """A scene with parallax rendered by the labelled camera on a sensor 2m pixels wider (same focal length): every
    crop of it is what that camera sees with its principal point moved. The augmentation's shift of the ordinary
    render equals the crop it claims on every pixel that is not padding, so the w2c label stays true. Rules out a
    geometric transform that needs another camera (a rotation, a zoom, a fractional shift that resamples the picture)
    and a shift whose direction or size differs from its parameters."""
    preset, r, m = get_preset("synthetic32"), 32, 4
    planes = preset_planes(preset, 8)
    g = torch.Generator().manual_seed(1)
    mpi = torch.rand(1, 8, 4, 8, 8, generator=g)
    mpi = torch.nn.functional.interpolate(mpi[0], size=64, mode="bilinear")[None]  # smooth textures, 64 texels
    mpi[:, :, 3] = mpi[:, :, 3] * 0.6  # semi-opaque planes: the picture has parallax
    mpi[:, -1, 3] = 1.0
    c2w = sphere_c2w(torch.tensor([0.2]), torch.tensor([-0.1]), preset.sphere_center_z, preset.sphere_r)
    wide_fov = 2 * math.degrees(math.atan(math.tan(math.radians(preset.fov_deg) / 2) * (r + 2 * m) / r))
    small = render_mpi(mpi, planes.depths, planes.extents, c2w, preset.fov_deg, r, r, check_inside=False)["rgb"]
    wide = render_mpi(mpi, planes.depths, planes.extents, c2w, wide_fov, r + 2 * m, r + 2 * m,
                      check_inside=False)["rgb"]
    assert float((wide[..., m:m + r, m:m + r] - small).abs().max()) < 1e-5  # the same camera, a larger sensor
    aug = PoseSafeAugment(["translate"])
    for tx, ty in ((3, 0), (-2, 4), (1, -3)):
        params = _identity(aug, 1, r)
        params["translate"] = {"translate_x": torch.tensor([float(tx)]), "translate_y": torch.tensor([float(ty)])}
        shifted = aug.apply(small, params)
        sensor = wide[..., m - ty:m - ty + r, m - tx:m - tx + r]  # principal point moved by (tx, ty) pixels
        inner = (slice(None), slice(None), slice(max(ty, 0), r + min(ty, 0)), slice(max(tx, 0), r + min(tx, 0)))
        assert float((shifted[inner] - sensor[inner]).abs().max()) < 1e-5, (tx, ty)
        assert float((shifted[inner] - small[inner]).abs().mean()) > 0.01  # the picture did move


def test_colour_and_cutout_follow_their_parameters_in_minus_one_to_one_units():
    """Brightness adds its offset, contrast scales about mid-grey (0), cutout fills exactly its box with 0, and the
    identity parameters return the input bit for bit. Rules out kornia's default clamp to [0, 1] (it would cut off
    the lower half of [-1, 1] images), contrast about the image mean or about black, and a cutout filled with -1."""
    x = _images(2)
    aug = PoseSafeAugment(OPS)
    ident = _identity(aug, 2)
    assert torch.equal(aug.apply(x, ident), x)
    bright = PoseSafeAugment(["brightness"])
    out = bright.apply(x, {"brightness": {"brightness_factor": torch.tensor([1.3, 0.8])}})
    assert float((out - x - torch.tensor([0.3, -0.2])[:, None, None, None]).abs().max()) < 1e-6
    assert float(out.min()) < -0.9  # not clamped to [0, 1]
    contrast = PoseSafeAugment(["contrast"])
    out = contrast.apply(x, {"contrast": {"contrast_factor": torch.tensor([2.0, 0.5])}})
    assert float((out - x * torch.tensor([2.0, 0.5])[:, None, None, None]).abs().max()) < 1e-6
    cut = PoseSafeAugment(["cutout"])
    box = {"xs": torch.tensor([-3.0, 5.0]), "ys": torch.tensor([2.0, 12.0]), "widths": torch.tensor([8.0, 0.0]),
           "heights": torch.tensor([8.0, 0.0]), "values": torch.zeros(2)}
    out = cut.apply(x, {"cutout": box})
    want = x.clone()
    want[0, :, 2:10, 0:5] = 0.0  # the box [-3, 5) x [2, 10), clipped to the image
    assert torch.equal(out, want)


def test_p_is_each_transforms_per_image_probability():
    """4000 images at p = 0.3: each transform changes about 30 % of them, brightness and contrast together about 9 %
    (independent), p = 0 none and p = 1 all. Rules out p drawn once per batch (0 % or 100 %), one draw shared by
    every transform (30 % together), and p taken as the chance that some transform applies (7.5 % each)."""
    aug = PoseSafeAugment(["brightness", "contrast", "cutout"])
    g = torch.Generator().manual_seed(0)
    prm = aug.sample(4000, 16, 16, torch.tensor(0.3), g)
    b = prm["brightness"]["brightness_factor"] != 1
    c = prm["contrast"]["contrast_factor"] != 1
    k = prm["cutout"]["widths"] > 0
    for on in (b, c, k):
        assert float(on.float().mean()) == pytest.approx(0.3, abs=0.03)
    assert float((b & c).float().mean()) == pytest.approx(0.09, abs=0.02)
    assert not (aug.sample(500, 16, 16, torch.tensor(0.0), g)["brightness"]["brightness_factor"] != 1).any()
    assert (aug.sample(500, 16, 16, torch.tensor(1.0), g)["brightness"]["brightness_factor"] != 1).all()
    shifts = PoseSafeAugment(["translate"], translate=0.25).sample(4000, 16, 16, torch.tensor(1.0), g)["translate"]
    assert float(shifts["translate_x"].abs().max()) == 4 and float(shifts["translate_y"].abs().max()) == 4
    assert torch.equal(shifts["translate_x"], shifts["translate_x"].round())  # whole pixels only


def test_draws_come_from_the_given_stream_and_their_number_does_not_depend_on_p():
    """The same generator state gives the same augmentation whatever torch's global generator holds, and p = 0 and
    p = 1 advance the stream equally. Rules out drawing from the global generator (kornia's default: DDP ranks and
    resumed runs would not be reproducible) and a number of draws that depends on p (a resumed or differently
    adapted run would fall out of step)."""
    aug, x = PoseSafeAugment(OPS), _images(8)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    torch.manual_seed(0)
    a = aug(x, 0.7, g1)
    torch.manual_seed(1)
    b = aug(x, 0.7, g2)
    assert torch.equal(a, b) and not torch.equal(a, x)
    g0, g1 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    aug(x, 0.0, g0)
    aug(x, 1.0, g1)
    assert torch.equal(g0.get_state(), g1.get_state())


def test_r1_differentiates_through_every_transform():
    """R1 of D(A(x)) with respect to the un-augmented x, and its gradient with respect to D's weights, through all
    four transforms equal the same computed with a hand-written whole-pixel shift (symmetric padding), offset, scale
    and mask. Rules out an augmentation that cuts the graph or is not twice differentiable (R1 would lose the
    augmentation's Jacobian, or its weight gradient would be missing)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 2, 3)
    x = _images(2).requires_grad_(True)
    aug = PoseSafeAugment(OPS)
    tx, ty, bo, cf = [2.0, -1.0], [0.0, 3.0], [0.1, -0.2], [1.5, 0.7]
    box = {"xs": torch.tensor([4.0, 0.0]), "ys": torch.tensor([4.0, 8.0]), "widths": torch.tensor([6.0, 5.0]),
           "heights": torch.tensor([6.0, 5.0]), "values": torch.zeros(2)}
    params = {"translate": {"translate_x": torch.tensor(tx), "translate_y": torch.tensor(ty)},
              "brightness": {"brightness_factor": 1 + torch.tensor(bo)},
              "contrast": {"contrast_factor": torch.tensor(cf)}, "cutout": box}

    def by_hand(img):
        n = img.shape[-1]
        out = []
        for i in range(2):
            sym = lambda j: (j % (2 * n)) if (j % (2 * n)) < n else 2 * n - 1 - (j % (2 * n))  # noqa: E731
            rows = torch.tensor([sym(j - int(ty[i])) for j in range(n)])
            cols = torch.tensor([sym(j - int(tx[i])) for j in range(n)])
            y = (img[i][:, rows][:, :, cols] + bo[i]) * cf[i]
            mask = torch.ones(1, n, n)
            y0, x0, s = int(box["ys"][i]), int(box["xs"][i]), int(box["widths"][i])
            mask[:, y0:y0 + s, x0:x0 + s] = 0
            out.append(y * mask)
        return torch.stack(out)

    def r1_and_weight_grad(transform):
        logits = torch.tanh(conv(transform(x))).sum(dim=[1, 2, 3])[:, None]
        r1 = r1_penalty(logits, x, gamma=10.0)
        (gw,) = torch.autograd.grad(r1, conv.weight)
        return r1.detach(), gw

    r1, gw = r1_and_weight_grad(lambda img: aug.apply(img, params))
    r1_ref, gw_ref = r1_and_weight_grad(by_hand)
    assert float(r1_ref) > 0 and float(r1) == pytest.approx(float(r1_ref), rel=1e-5)
    assert float((gw - gw_ref).abs().max()) < 1e-4 * float(gw_ref.abs().max())


def test_flips_rotations_and_zooms_are_refused_with_the_reason():
    """The option names what to use instead. Rules out silently accepting a transform that falsifies the camera."""
    with pytest.raises(ValueError, match=r"augment.ops.*xflip.*--data.xflip"):
        check_ops(["translate", "xflip"])
    for op in ("rotate", "scale"):
        with pytest.raises(ValueError, match=f"augment.ops: '{op}' is not pose-safe"):
            PoseSafeAugment([op])
    with pytest.raises(ValueError, match="unknown transform 'blur'"):
        check_ops(["blur"])
    assert check_ops(["cutout", "translate"]) == ("translate", "cutout")  # applied in the documented order
    with pytest.raises(ValueError, match="augment.mode must be"):
        GMPIModule(**tiny(augment=dict(mode="adaptive")))


# ---------------------------------------------------------------------------------------------- p controller
def test_adaptive_p_moves_by_the_sign_of_the_real_logits():
    """r_t = 1 (every real logit positive) > 0.6 raises p by N / (kimg * 1000) for the N reals counted; r_t = 0
    lowers it by as much; p stays in [0, 1]; fixed mode never moves. Rules out p moving the wrong way, a step that
    ignores how many reals were seen, and p leaving [0, 1]."""
    ada = AdaptiveP(p=0.5, target=0.6, kimg=0.1)  # 100 reals move p from 0 to 1
    ada.observe(torch.full((8, 1), 3.0))
    ada.observe(torch.full((4, 1), 0.5))
    assert float(ada.update()) == 1.0 and float(ada.p) == pytest.approx(0.5 + 12 / 100)
    assert float(ada.signs.abs().sum()) == 0  # counting starts afresh
    ada.observe(torch.tensor([[1.0], [-1.0], [2.0], [-2.0]]))
    assert float(ada.update()) == 0.0 and float(ada.p) == pytest.approx(0.62 - 4 / 100)
    for _ in range(30):
        ada.observe(-torch.ones(8, 1))
        ada.update()
    assert float(ada.p) == 0.0
    fixed = AdaptiveP(p=0.3, adaptive=False)
    fixed.observe(torch.ones(8, 1))
    fixed.update()
    assert float(fixed.p) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="augment.p must"):
        AdaptiveP(p=1.5)
    with pytest.raises(ValueError, match="augment.target"):
        AdaptiveP(target=0.0)


def test_adaptive_p_uses_the_signs_of_every_rank():
    """On this rank every real logit is positive, on the other (the reduce adds its counts) every one negative:
    r_t over both is 0, so p falls by the 16 reals of both. Rules out rank-local statistics (p would rise here and
    the ranks' p would drift apart)."""
    ada = AdaptiveP(p=0.5, target=0.6, kimg=0.1)
    ada.observe(torch.ones(8, 1))
    other_rank = torch.tensor([-8.0, 8.0])
    assert float(ada.update(lambda t: t + other_rank)) == 0.0
    assert float(ada.p) == pytest.approx(0.5 - 16 / 100)


# ------------------------------------------------------------------------------------------- the training hook
def _fit(model, shards, tmp_path, callbacks=(), **kw):
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         enable_checkpointing=False, default_root_dir=tmp_path, callbacks=list(callbacks), **kw)
    trainer.fit(model, PosedImageDataModule(str(shards), batch_size=4, num_workers=0, seed=0, batches_per_epoch=50))
    return trainer


class DInputs(pl.Callback):
    """D's inputs and outputs of one iteration, the batch, and D as it was before the iteration."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        import copy

        self.batch, self.D_before, self.inputs, self.outputs = batch, copy.deepcopy(module.D), [], []
        self.hook = module.D.register_forward_hook(self.record)

    def record(self, module, args, output):
        self.inputs.append(args[0].detach().clone())
        self.outputs.append(output.detach().clone())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.hook.remove()
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


class Recognisable(torch.nn.Module):
    """A stand-in augmentation whose output is unmistakable: 2x + 100."""

    def forward(self, images, p, generator):
        return images * 2 + 100


def test_d_trains_on_augmented_reals_and_fakes_and_r1_goes_through_the_augmentation(shards, tmp_path):
    """One iteration with a recognisable augmentation (2x + 100): D's reals are exactly 2x + 100 of the batch, the D
    step's and the G step's fakes are augmented, the worst-view candidates are not, and the logged R1 is
    gamma/2 ||d D(A(x)) / dx||^2 of the un-augmented reals (4x what the augmented images as leaves would give).
    Rules out augmenting the reals only (D would learn that augmented means real, and G would copy the
    augmentation), leaving the G step's fakes un-augmented, and R1 on the augmented images."""
    torch.manual_seed(0)
    model = GMPIModule(**tiny(max_iters=1, optim=dict(r1_gamma=1.0, grad_clip=None), shading=dict(enabled=False),
                              augment=dict(mode="fixed", p=1.0)))
    model.d_augment = Recognisable()
    cap = DInputs()
    _fit(model, shards, tmp_path, [cap])
    real, fake, view0, view1, g_fake = cap.inputs
    assert torch.equal(real, cap.batch["image"] * 2 + 100)
    assert float(fake.mean()) > 90 and float(g_fake.mean()) > 90
    assert abs(float(view0.mean())) < 10 and abs(float(view1.mean())) < 10
    x = cap.batch["image"].clone().requires_grad_(True)
    want = r1_penalty(cap.D_before(x * 2 + 100, cap.batch["w2c"]), x, 1.0)
    leaf = (x.detach() * 2 + 100).requires_grad_(True)
    wrong = r1_penalty(cap.D_before(leaf, cap.batch["w2c"]), leaf, 1.0)
    assert cap.metrics["train/r1"] == pytest.approx(float(want), rel=1e-4)
    assert float(want) == pytest.approx(4 * float(wrong), rel=1e-4)


def test_adaptive_p_in_training_follows_the_real_logits_and_is_logged(shards, tmp_path):
    """4 iterations, p updated every 2 from the 8 reals seen (step 8 / 40 = 0.2): the final p equals the rule replayed
    on the real logits D produced, and train/augment_p and train/ada_rt (the last iteration's reals, logging every
    iteration) are logged. Rules out updating at the wrong iterations, p moving against r_t, and a logged p or r_t
    that is not the controller's."""
    torch.manual_seed(1)
    model = GMPIModule(**tiny(max_iters=4, augment=dict(mode="ada", p=0.5, interval=2, kimg=0.04)))

    class RealLogits(DInputs):
        def __init__(self):
            self.signs = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
            self.signs.append(self.outputs[0].sign())

    cap = RealLogits()
    _fit(model, shards, tmp_path, [cap], log_every_n_steps=1)
    p = 0.5
    for it in (1, 3):
        rt = float(torch.cat(cap.signs[it - 1:it + 1]).mean())
        p = min(1.0, max(0.0, p + math.copysign(0.2, rt - 0.6) if rt != 0.6 else p))
    assert float(model.ada.p) == pytest.approx(p, abs=1e-6)
    assert cap.metrics["train/augment_p"] == pytest.approx(p, abs=1e-6)
    assert cap.metrics["train/ada_rt"] == pytest.approx(float(cap.signs[-1].mean()), abs=1e-6)
