"""The recipe's wiring, phase by phase: which tensor goes where, in which phase, with which sign. Each test records what
the networks actually receive during real training iterations (forward hooks, a recording shading function) and
checks it against the same quantity recomputed independently; each docstring names the wrong implementation it rules
out."""

import numpy as np
import pytest
import torch

from gmpi_lightning import cameras, views
from gmpi_lightning.module import GMPIModule
from gmpi_lightning.nn.alpha import instance_normalize
from gmpi_lightning.nn.gmpi import GMPIGenerator, positional_encoding, token_interpolation
from gmpi_lightning.nn.ops import upsample2d
from gmpi_lightning.render import render_mpi
from gmpi_lightning.scene import Scene
from tests.conftest import max_err
from tests.test_module import _dm, _trainer, tiny


class Recorded(GMPIModule):
    """GMPIModule whose phases, G outputs and D inputs are recorded (in order)."""

    def setup(self, stage):
        super().setup(stage)
        self.records, self.phase = [], None
        self.D.register_forward_hook(lambda m, inp, out: self.records.append(
            ("D", self.phase, inp[0].detach().clone(), None if inp[1] is None else inp[1].detach().clone(),
             out.detach().clone(), torch.is_grad_enabled())))
        self.G.register_forward_hook(lambda m, inp, out: self.records.append(
            ("G", self.phase, out.detach().clone(), inp[2].detach().clone(), inp[0].detach().clone(),
             torch.is_grad_enabled())))

    def d_step(self, batch, opt):
        self.phase = "d"
        return super().d_step(batch, opt)

    def g_step(self, b, opt):
        self.phase = "g"
        return super().g_step(b, opt)


def _run(shards, tmp_path, monkeypatch, **over):
    shaded = []
    real_shade = views.shade_mpi

    def recording_shade(mpi, depths, extents, light, ka, kd, blur):
        out = real_shade(mpi, depths, extents, light, ka, kd, blur)
        shaded.append((mpi.detach().clone(), out.detach().clone(), ka, kd))
        return out

    monkeypatch.setattr(views, "shade_mpi", recording_shade)
    torch.manual_seed(11)
    model = Recorded(**tiny(**{"max_iters": 1, "shading": dict(start=0, grow=1, schedule="ramp"), **over}))
    _trainer(tmp_path).fit(model, _dm(shards))
    return model, shaded


def _render(model, mpi, w2c_flat):
    c2w = cameras.invert_rigid(w2c_flat.reshape(-1, 4, 4).double()).float()
    planes = model.scene.planes
    return render_mpi(mpi, planes.depths, planes.extents, c2w, model.preset.fov_deg, model.preset.resolution,
                      model.preset.resolution, validate=False)["rgb"] * 2 - 1


def test_d_sees_the_shaded_render_of_each_fake_at_its_own_camera(shards, tmp_path, monkeypatch):
    """After shading.start, the fake D judges is render(shade(MPI)) at the camera D is told: rules out rendering the
    unshaded MPI after computing the shading, handing D another fake's camera (or a fixed one), and conditioning
    on the c2w instead of the w2c."""
    model, shaded = _run(shards, tmp_path, monkeypatch)
    d_calls = [r for r in model.records if r[0] == "D" and r[1] == "d"]
    real, fake = d_calls  # the D step judges the reals, then the fakes
    mpi, shaded_mpi, ka, kd = shaded[0]
    assert (ka, kd) != (1.0, 0.0)  # the shading changes the picture here
    expected = _render(model, shaded_mpi, fake[3])
    assert max_err(fake[2], expected) < 1e-5
    assert float((_render(model, mpi, fake[3]) - expected).abs().max()) > 1e-3  # unshaded would differ
    assert max_err(real[3], torch.stack([torch.as_tensor(np.asarray(w), dtype=torch.float32) for w in real[3]])) == 0
    # the condition is the w2c of a camera on the prior's sphere (its inverse is a rigid c2w looking at the centre)
    c2w = cameras.invert_rigid(fake[3].reshape(-1, 4, 4).double())
    centre = torch.tensor([0.0, 0.0, model.preset.sphere_center_z], dtype=torch.float64)
    assert max_err((c2w[:, :3, 3] - centre).norm(dim=1), torch.full((c2w.shape[0],), model.preset.sphere_r)) < 1e-5


def test_before_shading_start_d_sees_the_unshaded_render(shards, tmp_path, monkeypatch):
    """Rules out shading from the first iteration (an off-by-one or an ignored shading.start)."""
    model, shaded = _run(shards, tmp_path, monkeypatch, shading=dict(start=5, grow=1, schedule="ramp"))
    assert shaded == []
    mpi = next(r for r in model.records if r[0] == "G" and r[1] == "d")[2]
    fake = [r for r in model.records if r[0] == "D" and r[1] == "d"][1]
    assert max_err(fake[2], _render(model, mpi, fake[3])) < 1e-5


def test_g_step_trains_on_the_worst_candidate_view(shards, tmp_path, monkeypatch):
    """The G step renders, for each latent, the candidate camera the current D scored lowest, and D judges it at that
    camera: rules out the highest logit (argmax), the first candidate, or scoring one view and training another."""
    model, _ = _run(shards, tmp_path, monkeypatch, views=dict(per_z=3), shading=dict(enabled=False))
    g_calls = [r for r in model.records if r[0] == "D" and r[1] == "g"]
    scoring, training = [r for r in g_calls if not r[5]], [r for r in g_calls if r[5]]
    assert len(scoring) == 3 and len(training) == 1
    logits = torch.stack([r[4][:, 0] for r in scoring], 1)  # B x 3
    conds = torch.stack([r[3] for r in scoring], 1)          # B x 3 x 16
    worst = conds[torch.arange(len(logits)), logits.argmin(1)]
    assert max_err(training[0][3], worst) == 0
    assert float((conds[torch.arange(len(logits)), logits.argmax(1)] - worst).abs().max()) > 0  # a real choice
    mpi = [r for r in model.records if r[0] == "G" and r[1] == "g" and r[5]][0][2]
    assert max_err(training[0][2], _render(model, mpi, training[0][3])) < 1e-5


def test_generator_gets_normalised_depths_and_the_renderer_metric_ones(shards, tmp_path, monkeypatch):
    """Rules out handing the alpha branch metric depths (z in [near, far] instead of [0, 1]) or the renderer the
    normalised ones."""
    seen = []
    import gmpi_lightning.scene as scene_module

    real_render = scene_module.render_mpi
    monkeypatch.setattr(scene_module, "render_mpi", lambda mpi, d, e, *a, **k: seen.append(d.clone()) or
                        real_render(mpi, d, e, *a, **k))
    model, _ = _run(shards, tmp_path, monkeypatch, shading=dict(enabled=False))
    planes = model.scene.planes
    for r in (r for r in model.records if r[0] == "G"):
        assert max_err(r[3], planes.normalized) == 0
    assert seen and all(max_err(d, planes.depths) == 0 for d in seen)
    assert float(planes.normalized[0]) == 0.0 and float(planes.depths[0]) == pytest.approx(model.preset.near)


def test_losses_move_the_logits_their_way(shards, tmp_path):
    """One step of each phase with a large learning rate: the D step widens D's margin between the reals and the
    fakes it saw (real logits up relative to fake ones); the G step raises D's logit on G's images of the same latents
    and cameras. Rules out swapped real/fake arguments in the D loss, the D loss used for G, and a G step that steps
    D's optimiser. (Adam's first step is nearly sign-based, so the margin, not each side alone, is what must move.)"""
    torch.manual_seed(5)
    model = Recorded(**tiny(max_iters=1, shading=dict(enabled=False), optim=dict(lr=0.02, grad_clip=None,
                     r1_gamma=0.0)))
    before_D = [p.detach().clone() for p in model.D.parameters()]
    _trainer(tmp_path).fit(model, _dm(shards))
    real, fake = [r for r in model.records if r[0] == "D" and r[1] == "d"]
    after = {k: v.detach().clone() for k, v in model.D.state_dict().items()}
    with torch.no_grad():
        for p, q in zip(model.D.parameters(), before_D):
            p.copy_(q)
        old_real, old_fake = model.D(real[2], real[3]), model.D(fake[2], fake[3])
        model.D.load_state_dict(after)
        new_real, new_fake = model.D(real[2], real[3]), model.D(fake[2], fake[3])
    margin = lambda r, f: float(r.mean() - f.mean())  # noqa: E731
    assert margin(new_real, new_fake) > margin(old_real, old_fake) + 0.1
    # the G step raised the (fixed, updated) D's verdict on G's images of the same latents and cameras; the noise
    # strengths start at 0, so constant noise redraws the step's own images
    g_in = next(r for r in model.records if r[0] == "G" and r[1] == "g" and r[5])
    g_out = next(r for r in model.records if r[0] == "D" and r[1] == "g" and r[5])
    with torch.no_grad():
        mpi = model.G(g_in[4], None, g_in[3], noise_mode="const")
        before, after = model.D(g_out[2], g_out[3]), model.D(_render(model, mpi, g_out[3]), g_out[3])
    assert float(after.mean() - before.mean()) > 0


def test_ema_is_lerp_with_the_logged_beta(shards, tmp_path):
    """After an iteration, G_ema = lerp(G_ema before, G, 1 - beta) with beta the rule's value for the images seen, and
    buffers copied: rules out lerp(..., beta) (the weights swapped), an EMA of D, or an EMA before G's step."""
    torch.manual_seed(6)
    model = GMPIModule(**tiny(max_iters=1, ema=dict(kind="torch_ema"), shading=dict(enabled=False)))
    before = {k: v.detach().clone() for k, v in model.G_ema.named_parameters()}
    _trainer(tmp_path).fit(model, _dm(shards))
    beta = min(0.999, 2 / 11)  # torch_ema after the first update: (1 + t) / (10 + t), t = 1
    for k, p in model.G_ema.named_parameters():
        g = dict(model.G.named_parameters())[k].detach()
        assert max_err(p, before[k] + (1 - beta) * (g - before[k])) < 1e-6, k
    for (k, b), (_, b2) in zip(model.G_ema.named_buffers(), model.G.named_buffers()):
        assert max_err(b, b2) == 0, k


class LinearD(torch.nn.Module):
    """D(x, c) = <a, x> (+ 0 * c): its input gradient is ``a`` for every image."""

    def __init__(self, res):
        super().__init__()
        self.a = torch.nn.Parameter(torch.randn(1, 3, res, res) * 0.1)
        self.b4 = torch.nn.Module()

    def forward(self, x, c=None):
        return (x * self.a).sum(dim=[1, 2, 3])[:, None] + (0.0 if c is None else 0.0 * c.sum(1, keepdim=True))


@pytest.mark.parametrize("r1_every", [1, 2])
def test_r1_has_the_size_of_gamma_over_2_grad_squared_times_its_interval(shards, tmp_path, r1_every):
    """With a linear D the R1 term is exactly r1_every * gamma / 2 * |a|^2 on the iterations it runs and 0 on the
    others: rules out R1 on the fakes, a missing 1/2, R1 computed after the augmentation as a new leaf, and the lazy
    weight (r1_every) left out or applied every iteration."""
    torch.manual_seed(7)
    model = GMPIModule(**tiny(max_iters=2, shading=dict(enabled=False), optim=dict(r1_gamma=3.0, r1_every=r1_every),
                            views=dict(per_z=1)))
    model.D = LinearD(16)
    seen = []
    step = model.d_step
    model.d_step = lambda batch, opt: seen.append(step(batch, opt)) or seen[-1]
    a0 = model.D.a.detach().clone()
    _trainer(tmp_path).fit(model, _dm(shards))
    assert len(seen) == 2
    assert float(seen[0]["r1"]) == pytest.approx(r1_every * 3.0 / 2 * float(a0.square().sum()), rel=1e-5)
    if r1_every == 2:
        assert float(seen[1]["r1"]) == 0.0


def _naive_alpha(G, z, depths):
    """Alpha of every plane computed the long way: per plane and block, the ToAlpha layer applied to (normalised)
    features plus the plane's embedding, B x L x C x R x R materialised; the blocks' logits summed as StyleGAN2's skip
    outputs; the final activation. Independent of the per-plane-scalar shortcut the generator uses."""
    feats = []
    blocks = [b for b in G.synthesis.blocks()]
    real_features = type(blocks[0]).alpha_features

    def record(block, x, w_conv1, w_rgba):
        feats.append((block, x.float(), w_conv1, w_rgba))
        return real_features(block, x, w_conv1, w_rgba)

    type(blocks[0]).alpha_features = record
    try:
        with torch.no_grad():
            G(z, plane_depths=depths)
    finally:
        type(blocks[0]).alpha_features = real_features
    mode, code = G.alpha_mode, positional_encoding(depths, G.pos_enc_multires)
    acc = None
    for block, x, w_conv1, w_rgba in feats:
        if acc is not None:
            acc = upsample2d(acc, block.resample_filter)
        if not block.gen_alpha:
            continue
        if mode in ("vanilla", "depth2alpha"):
            y = (block.toalpha if mode == "vanilla" else block.todepth)(x, w_rgba)
        else:
            if mode == "learnable_tokens":
                emb = (token_interpolation(depths, G.token_depths) @ block.plane_tokens[0])[None].expand(len(z), -1, -1)
            else:
                emb = block.pos_enc_embed(code, w_conv1)  # B x L x C
            h = (instance_normalize(x) if mode != "add_z" else x)[:, None] + emb[..., None, None]  # B x L x C x R x R
            b, n = h.shape[:2]
            y = block.toalpha(h.flatten(0, 1), w_rgba.repeat_interleave(n, 0)).reshape(b, n, *h.shape[-2:])
        acc = y if acc is None else acc + y
    if mode == "depth2alpha":
        surface = (torch.tanh(acc) + 1) / 2
        return ((depths[None, :, None, None] - surface) / (2 * G.depth2alpha_delta) + 0.5).clamp(0, 1)
    return (torch.tanh(acc) + 1) / 2


@pytest.mark.parametrize("mode", ["normalize_add_z", "add_z", "learnable_tokens", "vanilla", "depth2alpha"])
def test_every_alpha_mode_matches_a_naive_reference(mode):
    """Each alpha branch against the long-way computation above: rules out add_z normalising its features (or
    normalize_add_z not), tokens not interpolated, the vanilla channels permuted, and depth2alpha's step reversed."""
    torch.manual_seed(8)
    G = GMPIGenerator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, mapping_kwargs=dict(num_layers=2),
                      synthesis_kwargs=dict(channel_base=256, channel_max=32), alpha_mode=mode, n_train_planes=6,
                      background_alpha_full=False).eval()
    depths = Scene(GMPIModule.__init__.__globals__["get_preset"]("FFHQ256"), 6).planes.normalized
    z = torch.randn(2, 16)
    with torch.no_grad():
        mpi = G(z, plane_depths=depths)
    ref = _naive_alpha(G, z, depths)
    assert max_err(mpi[:, :, 3], ref) < 1e-4
    if mode == "add_z":  # the same weights normalised would differ
        G2 = GMPIGenerator(**{**G.init_kwargs, "alpha_mode": "normalize_add_z"}).eval()
        G2.load_state_dict(G.state_dict())
        with torch.no_grad():
            assert float((G2(z, plane_depths=depths)[:, :, 3] - ref).abs().max()) > 1e-3
