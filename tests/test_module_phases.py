"""The training module's phases called one at a time on a tiny module attached to a bare Trainer (no fit loop): each
phase's outputs, parameter updates and state changes against the same quantities recomputed here from the module's
random stream. Milliseconds per test, so `make mutation` runs them against every mutant of module.py; each
docstring names the wrong implementations it rules out."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from gmpi_lightning import module as module_mod
from gmpi_lightning.augment import PoseSafeAugment
from gmpi_lightning.errors import InputError
from gmpi_lightning.hparams import Architecture, Optimisation
from gmpi_lightning.io.gmpi_ckpt import load_gmpi_checkpoint
from gmpi_lightning.io.stylegan2_pkl import load_stylegan2_pkl
from gmpi_lightning.losses import stylegan2_ema_beta, torch_ema_beta
from gmpi_lightning.module import GMPIModule, StyleGAN2Module
from gmpi_lightning.networks import stylegan2_backbone
from gmpi_lightning.presets import get_preset
from gmpi_lightning.views import Images2D
from tests.conftest import max_err
from tests.test_module import SG2_ARGS, TINY, tiny

B = 4


def _attach(model, sgd: bool = True):
    """Attach a bare CPU Trainer and plain SGD(lr=1) optimisers (a step moves each parameter by minus its gradient)."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.strategy.connect(model)
    model.trainer = trainer
    if sgd:
        opts = [torch.optim.SGD([p for p in model.G.parameters()], lr=1.0),
                torch.optim.SGD(model.D.parameters(), lr=1.0)]
    else:
        opts = model.configure_optimizers()
    trainer.strategy.optimizers = opts
    return trainer, opts


def _gmpi(**over):
    """A tiny GMPIModule with visible noise (noise strengths start at 0), so that noise drawn from the wrong
    generator changes the fakes."""
    torch.manual_seed(0)
    model = GMPIModule(**tiny(**{"optim": dict(grad_clip=None), "shading": dict(enabled=False), **over}))
    with torch.no_grad():
        for net in (model.G, model.G_ema):
            for n, p in net.named_parameters():
                if n.endswith("noise_strength"):
                    p.fill_(0.5)
    return model


def _batch(model, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    c2w = model.fakes.sample(B, g)
    from gmpi_lightning import cameras

    return {"image": torch.rand(B, 3, 16, 16, generator=g) * 2 - 1,
            "w2c": cameras.flatten_w2c(c2w)}


def _stream_copy(model) -> torch.Generator:
    g = torch.Generator()
    g.set_state(model.rng.get_state())
    return g


def _params(net) -> dict:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


# ------------------------------------------------------------------------------------------ random draws
def test_latents_come_from_the_rank_stream_or_the_given_generator():
    """sample_z draws N(0, 1) latents from this rank's stream, or from the generator it is given: rules out the global
    RNG (every rank the same fakes), ignoring a given generator, and `generator and stream`."""
    model = _gmpi()
    ref = _stream_copy(model)
    assert max_err(model.sample_z(3), torch.randn(3, 16, generator=ref)) == 0
    assert max_err(model.rng.get_state().float(), ref.get_state().float()) == 0  # the stream moved by the draw
    g = torch.Generator().manual_seed(123)
    expected = torch.randn(3, 16, generator=torch.Generator().manual_seed(123))
    before = model.rng.get_state()
    assert max_err(model.sample_z(3, g), expected) == 0
    assert torch.equal(model.rng.get_state(), before)  # a given generator leaves the stream alone


def test_d_view_augments_with_the_current_p_from_the_stream():
    """With augmentation, D's view is PoseSafeAugment(images, p, this rank's stream); without, the images as they are:
    rules out skipping the augmentation, a p other than the controller's, and drawing from another generator."""
    model = _gmpi(augment=dict(mode="fixed", p=1.0))
    x = torch.rand(B, 3, 16, 16) * 2 - 1
    ref = _stream_copy(model)
    out = model.d_view(x)
    expected = PoseSafeAugment(("translate", "brightness", "contrast", "cutout"))(
        x, torch.tensor(1.0), ref)
    assert max_err(out, expected) == 0 and float((out - x).abs().max()) > 0.1
    model.ada.p.fill_(0.0)
    assert max_err(model.d_view(x), x) == 0  # p = 0: nothing applied
    assert _gmpi().d_view(x) is x


# ------------------------------------------------------------------------------------------ D step
def _d_reference(model, batch, gen, r1_active: bool):
    """The D step's loss, R1 and D gradient recomputed from a copy of the stream (hand-written, not the module's)."""
    f, hp = model.fakes, model.hparams.optim
    calls = f.shading_calls
    with torch.no_grad():
        cond = f.sample(B, gen)
        z = torch.randn(B, 16, generator=gen)
        fake = f.images(model.G, z, cond, gen, shade_at=model.iteration)
    f.shading_calls = calls  # the module's own call counts this one
    real = batch["image"].detach().clone().requires_grad_(True)
    D = model.D
    for p in D.parameters():
        p.grad = None
    real_logits = D(real, batch["w2c"])
    fake_logits = D(fake, f.condition(cond))
    loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    total = loss
    r1 = torch.zeros(())
    if r1_active:
        (grad,) = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
        r1 = hp.r1_gamma / 2 * grad.square().sum(dim=[1, 2, 3]).mean() * hp.r1_every
        total = loss + r1
    grads = torch.autograd.grad(total, list(D.parameters()))
    return (loss.detach(), r1.detach(), real_logits.detach(), fake_logits.detach(),
            {n: g for (n, _), g in zip(D.named_parameters(), grads)})


@pytest.mark.parametrize("r1_every,iteration,gamma,active", [(1, 0, 10.0, True), (2, 1, 10.0, False),
                                                              (2, 2, 10.0, True), (1, 0, 0.0, False)])
def test_d_step_is_the_logistic_loss_plus_lazy_r1_on_the_stream_draws(r1_every, iteration, gamma, active):
    """One D step: logistic loss on D(real | its w2c) and D(fake | the camera it was rendered from), plus
    r1_every * gamma/2 * ||grad D(real)||^2 on the iterations where `iteration % r1_every == 0` (and gamma > 0); the
    fakes, cameras and latents are the stream's next draws; D (not G) takes one step along the gradient of the sum;
    the logs name each quantity. Rules out real/fake swapped, loss - R1, R1 divided by r1_every or on every iteration,
    fakes of another batch size or from another generator, G stepping in the D phase, renamed log keys."""
    model = _gmpi(optim=dict(r1_every=r1_every, r1_gamma=gamma, grad_clip=None), shading=dict(start=0, schedule="ramp"))
    model.iteration = iteration
    _, (opt_g, opt_d) = _attach(model)
    batch = _batch(model)
    loss, r1, real_logits, fake_logits, grads = _d_reference(model, batch, _stream_copy(model), active)
    d_before, g_before = _params(model.D), _params(model.G)
    out = model.d_step(batch, opt_d)
    assert set(out) == {"loss_d", "r1", "logits_real", "logits_fake", "ada_rt"}
    assert float(out["loss_d"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(out["r1"]) == pytest.approx(float(r1), rel=1e-4, abs=1e-8)
    assert (float(out["r1"]) > 0) == active
    assert float(out["logits_real"]) == pytest.approx(float(real_logits.mean()), rel=1e-5, abs=1e-6)
    assert float(out["logits_fake"]) == pytest.approx(float(fake_logits.mean()), rel=1e-5, abs=1e-6)
    assert float(out["ada_rt"]) == pytest.approx(float(real_logits.sign().mean()))
    for n, p in model.D.named_parameters():
        assert max_err(d_before[n] - p.detach(), grads[n]) < 1e-4 * (1 + float(grads[n].abs().max())), n
    assert all(torch.equal(g_before[n], p) for n, p in model.G.named_parameters())


def test_every_parameter_gets_a_gradient_in_its_step():
    """Every parameter of D receives a gradient in a D step and every parameter of G in a G step (so `zero_grad`
    setting grads to zero instead of None changes nothing: the next backward fills each one)."""
    model = _gmpi()
    _, (opt_g, opt_d) = _attach(model)
    seen = {}
    orig = model.finish_step

    def record(opt, loss, net):
        seen[net is model.D] = [n for n, p in net.named_parameters() if p.grad is None]
        return orig(opt, loss, net)

    model.finish_step = record
    model.d_step(_batch(model), opt_d)
    model.g_step(B, opt_g)
    assert seen == {True: [], False: []}


# ------------------------------------------------------------------------------------------ G step
@pytest.mark.parametrize("split", [1, 2])
def test_g_step_chunks_sum_to_the_batch_loss_and_sync_once(split):
    """The G step renders the stream's worst view per latent, in `batch_split` chunks of B / split, with the loss
    divided by the chunk count, all chunks but the last inside the strategy's `block_backward_sync` (one all-reduce);
    G (not D) steps along the gradient of the summed loss. Rules out chunk bounds that overlap or overrun, loss times
    chunks, the chunk's condition dropped, a sync per chunk, and D stepping in the G phase."""
    model = _gmpi(optim=dict(batch_split=split, grad_clip=None))
    trainer, (opt_g, opt_d) = _attach(model)
    entered = []

    @contextlib.contextmanager
    def block_sync():
        entered.append(1)
        yield

    trainer.strategy.block_backward_sync = block_sync
    gen = _stream_copy(model)
    f = model.fakes
    z = torch.randn(B, 16, generator=gen)
    cond = f.g_step_condition(model.G, model.D, z, gen)
    for p in model.G.parameters():
        p.grad = None
    total, sizes = torch.zeros(()), []
    bounds = [(0, 4)] if split == 1 else [(0, 2), (2, 4)]
    for lo, hi in bounds:
        fake = f.images(model.G, z[lo:hi], cond[lo:hi], gen, shade_at=model.iteration)
        total = total + F.softplus(-model.D(fake, f.condition(cond[lo:hi]))).mean() / len(bounds)
    grads = dict(zip([n for n, _ in model.G.named_parameters()],
                     torch.autograd.grad(total, list(model.G.parameters()), allow_unused=True)))
    model.D.register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    g_before, d_before = _params(model.G), _params(model.D)
    out = model.g_step(B, opt_g)
    assert set(out) == {"loss_g"}
    assert float(out["loss_g"]) == pytest.approx(float(total.detach()), rel=1e-5)
    assert sizes == [B] * TINY["views"]["per_z"] + [hi - lo for lo, hi in bounds]
    assert len(entered) == split - 1
    for n, p in model.G.named_parameters():
        if grads[n] is not None:
            assert max_err(g_before[n] - p.detach(), grads[n]) < 1e-4 * (1 + float(grads[n].abs().max())), n
    assert all(torch.equal(d_before[n], p) for n, p in model.D.named_parameters())


def test_stylegan2_g_step_has_no_condition():
    """A 2D StyleGAN2's G step renders G(z) with no camera, in chunks: rules out slicing a missing condition."""
    torch.manual_seed(0)
    model = StyleGAN2Module(**{k: v for k, v in TINY.items() if k in SG2_ARGS},
                            optim=dict(batch_split=2, grad_clip=None))
    model.D.b4.mbstd.group_size = 2
    _, (opt_g, _) = _attach(model)
    gen = _stream_copy(model)
    z = torch.randn(B, 16, generator=gen)
    expected = sum(F.softplus(-model.D(model.G(z[lo:hi], None, noise_generator=gen), None)).mean() / 2
                   for lo, hi in ((0, 2), (2, 4)))
    assert float(model.g_step(B, opt_g)["loss_g"]) == pytest.approx(float(expected.detach()), rel=1e-5)


# ------------------------------------------------------------------------------------------ the step guard
def _net_with_grad(value: float):
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    net.weight.grad = torch.tensor([[value, 0.0]])
    return net


@pytest.mark.parametrize("clip,expected", [(None, 20.0), (10.0, 10.0)])
def test_finish_step_clips_the_total_gradient_norm(clip, expected):
    """A finite step clips the total gradient norm to grad_clip (None: unclipped) and steps: rules out no clipping, a
    clip that ignores the setting, and parameters without a gradient counted in."""
    model = _gmpi(optim=dict(grad_clip=clip))
    net = _net_with_grad(20.0)
    extra = torch.nn.Parameter(torch.ones(1))  # no gradient: must stay out of the norm and the step
    net.register_parameter("extra", extra)
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    assert model.finish_step(opt, torch.tensor(1.0), net) is True
    assert float(-net.weight[0, 0]) == pytest.approx(expected, rel=1e-5) and float(extra) == 1.0


def test_finish_step_skips_counts_and_stops_after_k_nonfinite_in_a_row():
    """A non-finite loss or gradient skips the step (gradients cleared, weights unchanged), counts it in a row and in
    total; a finite step resets the row; the K-th in a row raises with the count and the iteration. Rules out
    stepping on NaN, counting by other amounts, stopping one late, and a finite step that does not reset the row."""
    model = _gmpi(max_nonfinite=3)
    model.iteration = 7
    bad = _net_with_grad(float("nan"))
    opt = torch.optim.SGD(bad.parameters(), lr=1.0)
    assert model.finish_step(opt, torch.tensor(1.0), bad) is False
    assert bad.weight.grad is None and float(bad.weight.abs().sum()) == 0
    inf_loss = _net_with_grad(1.0)
    assert model.finish_step(torch.optim.SGD(inf_loss.parameters(), lr=1.0), torch.tensor(float("inf")),
                             inf_loss) is False
    assert (model.nonfinite_in_row, model.nonfinite_total) == (2, 2)
    good = _net_with_grad(1.0)
    assert model.finish_step(torch.optim.SGD(good.parameters(), lr=1.0), torch.tensor(1.0), good) is True
    assert (model.nonfinite_in_row, model.nonfinite_total) == (0, 2)
    for _ in range(2):
        assert model.finish_step(opt, torch.tensor(1.0), _net_with_grad(float("nan"))) is False
    assert (model.nonfinite_in_row, model.nonfinite_total) == (2, 4)
    with pytest.raises(FloatingPointError, match=r"^3 consecutive non-finite steps at iteration 7: lower the learning"):
        model.finish_step(opt, torch.tensor(1.0), _net_with_grad(float("nan")))
    assert model.nonfinite_total == 5


# ------------------------------------------------------------------------------------------ EMA
@pytest.mark.parametrize("rule", ["stylegan2", "torch_ema"])
def test_update_ema_uses_the_configured_rule(rule):
    """update_ema moves G_ema to lerp(G_ema, G, 1 - beta) with beta from the configured rule and its settings, and
    counts the update: rules out the other rule, a setting dropped, and a miscounted update."""
    model = _gmpi(ema=dict(kind=rule, kimg=0.05, rampup=0.5, decay=0.7))
    model.nimg, model.ema_updates = 40, 100  # torch_ema: past its warm-up, beta is the decay
    with torch.no_grad():
        for p in model.G.parameters():
            p.add_(0.1)
    before = _params(model.G_ema)
    beta = model.update_ema(8)
    expected = stylegan2_ema_beta(8, 40, 0.05, 0.5) if rule == "stylegan2" else torch_ema_beta(100, 0.7)
    other = torch_ema_beta(100, 0.7) if rule == "stylegan2" else stylegan2_ema_beta(8, 40, 0.05, 0.5)
    assert beta == pytest.approx(expected) and abs(expected - other) > 0.05
    assert expected != pytest.approx(stylegan2_ema_beta(8, 40, 0.05)) or rule == "torch_ema"
    assert model.ema_updates == 101
    for n, p in model.G_ema.named_parameters():
        assert max_err(p, before[n].lerp(dict(model.G.named_parameters())[n], 1 - expected)) < 1e-6


# ------------------------------------------------------------------------------------------ iteration
class _Log:
    def __init__(self, trainer):
        self.trainer, self.writes = trainer, []

    def due(self, trainer, iteration, max_iters):
        assert trainer is self.trainer
        return True

    def write(self, module, logs, batch_total, batch, **scalars):
        self.writes.append((logs, batch_total, batch, scalars))


def test_training_step_counts_logs_and_stops_at_max_iters(monkeypatch):
    """An iteration runs both phases, counts B x world images and one iteration, updates the EMA, logs the phases'
    values with the EMA beta, kimg, iteration, effective batch and the non-finite count, and asks the trainer to stop
    at max_iters (and does nothing past it). Rules out miscounted images, logs without their scalars, and stopping
    one iteration late."""
    model = _gmpi(max_iters=2)
    trainer, _ = _attach(model, sgd=False)
    monkeypatch.setattr(pl.Trainer, "world_size", property(lambda self: 2))  # as if one of two ranks
    model.log_iteration = log = _Log(trainer)
    model.nimg = 100
    batch = _batch(model)
    assert model.training_step(batch, 0) is None
    assert (model.iteration, model.nimg, model.ema_updates) == (1, 108, 1) and not trainer.should_stop
    logs, batch_total, b, scalars = log.writes[0]
    assert {"loss_d", "r1", "loss_g", "logits_real", "logits_fake", "ada_rt"} <= set(logs)
    assert (batch_total, b) == (8, 4)
    assert scalars == {"ema_beta": pytest.approx(stylegan2_ema_beta(8, 100, 10.0, 0.05)), "kimg": 0.108,
                       "iteration": 1, "nonfinite_total": 0, "effective_batch": 8, **model.fakes.logs()}
    model.training_step(batch, 1)
    assert model.iteration == 2 and trainer.should_stop
    trainer.should_stop = False
    model.training_step(batch, 2)  # past max_iters: no iteration
    assert model.iteration == 2 and trainer.should_stop and len(log.writes) == 2


def test_configure_optimizers_adam_settings_and_the_frozen_mapping():
    """Adam for G and D with the run's lr and betas and eps 1e-8; with train_mapping False, G's optimiser holds every
    synthesis parameter and no mapping parameter. Rules out a default lr/betas/eps and the mapping filter inverted."""
    for train_mapping in (True, False):
        model = _gmpi(optim=dict(lr=0.0123, betas=(0.3, 0.77), train_mapping=train_mapping, grad_clip=None))
        opt_g, opt_d = model.configure_optimizers()
        for opt in (opt_g, opt_d):
            group = opt.param_groups[0]
            assert (group["lr"], group["betas"], group["eps"]) == (0.0123, (0.3, 0.77), 1e-8)
        g_ids = {id(p) for p in opt_g.param_groups[0]["params"]}
        want = {id(p) for n, p in model.G.named_parameters() if train_mapping or not n.startswith("mapping.")}
        assert g_ids == want and len(want) < len(list(model.G.parameters())) + train_mapping
        assert [id(p) for p in opt_d.param_groups[0]["params"]] == [id(p) for p in model.D.parameters()]


# ------------------------------------------------------------------------------------------ validation
def test_validation_logs_d_on_reals_and_on_ema_fakes_without_moving_the_stream():
    """validation_step logs D's mean logit on the reals (with their w2c) and on G_ema's fakes (constant noise, a
    generator of the validation's own, the camera they were rendered from) and the logistic loss of the two;
    the training stream does not move. Rules out judging G instead of G_ema, random noise, the training stream,
    swapped logs."""
    model = _gmpi()
    with torch.no_grad():
        for p in model.G.parameters():
            p.mul_(1.1)  # G and G_ema differ
    batch = _batch(model)
    stream_state = model.rng.get_state()
    logged = {}
    model.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()}, kw=kw)
    rank1 = SimpleNamespace(world_size=2, global_rank=1)  # the validation stream is the rank's own
    model._trainer = rank1
    model.validation_step(batch, 2)
    g = model.streams.validation(model.device, rank1, 2)
    assert not torch.equal(g.get_state(), model.streams.validation(model.device, None, 2).get_state())
    f = model.fakes
    with torch.no_grad():
        cond = f.sample(B, g)
        fake = f.images(model.G_ema, torch.randn(B, 16, generator=g), cond, g, shade_at=None, noise_mode="const")
        real_logits, fake_logits = model.D(batch["image"], batch["w2c"]), model.D(fake, f.condition(cond))
    assert logged["val/logits_real"] == pytest.approx(float(real_logits.mean()), rel=1e-5)
    assert logged["val/logits_fake"] == pytest.approx(float(fake_logits.mean()), rel=1e-5)
    loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    assert logged["val/loss_d"] == pytest.approx(float(loss), rel=1e-5)
    assert logged["kw"] == {"batch_size": B, "sync_dist": True}
    assert torch.equal(model.rng.get_state(), stream_state)


# ------------------------------------------------------------------------------------------ hooks
def test_on_fit_start_refuses_fp16_and_says_what_the_run_is(monkeypatch):
    """16-mixed is refused with the alternatives named; otherwise one line says the preset, size, batch x devices,
    lr, iteration and the streams' seed. Rules out accepting fp16 and a summary with wrong numbers."""
    model = _gmpi(optim=dict(lr=0.0042, grad_clip=None), max_iters=9)
    model.iteration = 3
    lines = []
    monkeypatch.setattr(module_mod, "rank_zero_info", lines.append)
    monkeypatch.setattr(module_mod, "run_seed", lambda: 17)
    model._trainer = SimpleNamespace(world_size=2, precision="16-mixed", datamodule=SimpleNamespace(batch_size=6))
    with pytest.raises(InputError, match=r"^precision 16-mixed is not supported \(its loss scaling hides non-finite "
                                         r"steps from the guard and clipping\): use bf16-mixed or 32-true$"):
        model.on_fit_start()
    model._trainer.precision = "bf16-mixed"
    model.on_fit_start()
    assert lines == ["GMPIModule: synthetic32 16px, batch per device 6 x 2 devices, lr 0.0042 for G and D (no "
                     "scaling with the batch), iteration 3/9, random streams seeded 17 * 2 + rank"]
    model._trainer.datamodule = None
    model.on_fit_start()
    assert "batch per device ? x 2 devices" in lines[-1]


def test_setup_initialises_from_a_lightning_checkpoint_once(tmp_path):
    """init_from a .ckpt loads every weight in setup, once (a second setup, e.g. fit then test, keeps the trained
    weights); other files are read at construction and setup leaves the weights alone. Rules out loading on every
    setup, never loading, and treating any path as a checkpoint."""
    source = _gmpi()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": source.state_dict()}, ckpt)
    model = _gmpi(init_from=str(ckpt))
    assert max_err(model.D.b4.out.weight, source.D.b4.out.weight) > 0.1  # not loaded before setup
    model.setup("fit")
    assert all(torch.equal(p, source.state_dict()[n]) for n, p in model.state_dict().items())
    with torch.no_grad():
        model.D.b4.out.weight.add_(1.0)
    model.setup("test")
    assert max_err(model.D.b4.out.weight, source.D.b4.out.weight + 1.0) < 1e-6
    plain = _gmpi()
    before = _params(plain)
    plain.setup("fit")
    assert all(torch.equal(before[n], p) for n, p in plain.named_parameters())


def test_on_train_end_exports_on_rank_zero_only(tmp_path):
    """At the end of fit, rank zero (only) writes the inference file to export_path: rules out no export, every rank
    exporting, and the wrong path."""
    out = tmp_path / "gmpi.pt"
    model = _gmpi(export_path=str(out))
    model._trainer = SimpleNamespace(is_global_zero=False)
    model.on_train_end()
    assert not out.exists()
    model._trainer = SimpleNamespace(is_global_zero=True, datamodule=None)
    model.on_train_end()
    assert out.exists()


def _advanced(model):
    model.iteration, model.nimg, model.ema_updates, model.nonfinite_total = 5, 40, 4, 2
    model.fakes.shading_calls = 3
    model.sample_z(2)  # the stream is not at its start
    return model


def test_checkpoint_hooks_round_trip_counters_stream_and_ada():
    """on_save_checkpoint stores the counters, the fakes' state, the stream, ADA's p and per-rank signs, the run config,
    G_ema's kwargs and the mode; on_load_checkpoint into a fresh module restores them so the next draws are the
    ones the saved module would make. Rules out a counter or state left out, a stream restarted, and p/signs lost."""
    model = _advanced(_gmpi(augment=dict(mode="ada", p=0.2)))
    model.run_config = {"model": {"lr": 1}}
    model.ada.p.fill_(0.35)
    model.ada.signs.copy_(torch.tensor([3.0, 5.0]))
    ckpt = {}
    model.on_save_checkpoint(ckpt)
    assert ckpt["run_config"] == {"model": {"lr": 1}} and ckpt["model_mode"] == "gmpi"
    assert ckpt["generator_init_kwargs"] == model.G_ema.init_kwargs
    state = ckpt["gmpi_state"]
    assert {k: state[k] for k in ("iteration", "nimg", "ema_updates", "nonfinite_total", "shading_calls")} == {
        "iteration": 5, "nimg": 40, "ema_updates": 4, "nonfinite_total": 2, "shading_calls": 3}
    assert float(state["ada"]["p"]) == pytest.approx(0.35) and state["ada"]["signs"].tolist() == [[3.0, 5.0]]
    fresh = _gmpi(augment=dict(mode="ada", p=0.2))
    fresh.on_load_checkpoint(ckpt)
    assert (fresh.iteration, fresh.nimg, fresh.ema_updates, fresh.nonfinite_total) == (5, 40, 4, 2)
    assert fresh.fakes.shading_calls == 3 and fresh.nonfinite_in_row == 0
    assert float(fresh.ada.p) == pytest.approx(0.35) and fresh.ada.signs.tolist() == [3.0, 5.0]
    assert max_err(fresh.sample_z(3), model.sample_z(3)) == 0
    # signs saved by another number of ranks start afresh; a checkpoint without ADA keeps augment.p
    ckpt["gmpi_state"]["ada"]["signs"] = torch.ones(2, 2)
    other = _gmpi(augment=dict(mode="ada", p=0.2))
    other.on_load_checkpoint(ckpt)
    assert other.ada.signs.tolist() == [0.0, 0.0] and float(other.ada.p) == pytest.approx(0.35)
    plain = {}
    _advanced(_gmpi()).on_save_checkpoint(plain)
    assert "ada" not in plain["gmpi_state"] and "run_config" not in plain
    no_ada = _gmpi(augment=dict(mode="ada", p=0.2))
    no_ada.on_load_checkpoint(plain)
    assert float(no_ada.ada.p) == pytest.approx(0.2) and no_ada.iteration == 5


def test_a_stream_saved_before_its_first_draw_is_seeded_with_the_iteration():
    """A checkpoint written before the stream's first draw (e.g. a resumed run saved at once) holds the stream that
    the iteration would have started: rules out saving a stream seeded without the iteration."""
    model = _gmpi()
    model.iteration = 5
    ckpt = {}
    model.on_save_checkpoint(ckpt)
    expected = torch.Generator().manual_seed(model.streams.rank_seed(None) + 1_000_003 * 5)
    assert torch.equal(ckpt["gmpi_state"]["rng"]["states"][0], expected.get_state())


def test_each_rank_resumes_its_own_stream_and_signs():
    """Rank r of a world of N continues saved stream r and ADA signs r: rules out every rank taking rank 0's."""
    ckpt = {}
    _advanced(_gmpi(augment=dict(mode="ada"))).on_save_checkpoint(ckpt)
    states = [torch.Generator().manual_seed(s).get_state() for s in (1, 2)]
    ckpt["gmpi_state"]["rng"]["states"] = torch.stack(states)
    ckpt["gmpi_state"]["ada"]["signs"] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    model = _gmpi(augment=dict(mode="ada"))
    model._trainer = SimpleNamespace(world_size=2, global_rank=1,
                                     strategy=SimpleNamespace(root_device=torch.device("cpu")))
    model.on_load_checkpoint(ckpt)
    assert model.ada.signs.tolist() == [3.0, 4.0]
    assert torch.equal(model.rng.get_state(), states[1])


def test_every_rank_saves_every_ranks_stream_and_signs():
    """Checkpoints hold every rank's stream and ADA signs, gathered over the world (world x n): rules out saving only
    this rank's (a resumed rank r > 0 would continue rank 0's stream)."""
    model = _gmpi(augment=dict(mode="ada"))
    model.ada.signs.copy_(torch.tensor([3.0, 5.0]))
    gathered = []

    def all_gather(t):  # what rank 0 and this rank (1) hold
        gathered.append(t.clone())
        return torch.stack([torch.zeros_like(t), t])

    model._trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=SimpleNamespace(all_gather=all_gather))
    own = torch.Generator().manual_seed(model.streams.rank_seed(model._trainer)).get_state()
    ckpt = {}
    model.on_save_checkpoint(ckpt)
    states, signs = ckpt["gmpi_state"]["rng"]["states"], ckpt["gmpi_state"]["ada"]["signs"]
    assert states.shape == (2, own.numel()) and torch.equal(states[1], own) and len(gathered) == 2
    assert signs.tolist() == [[0.0, 0.0], [3.0, 5.0]]


def test_networks_are_built_with_the_modules_settings():
    """Every GMPI setting of the module reaches the networks it builds (and the token depths are the preset's
    training planes): rules out a setting left at the networks' default."""
    alpha = dict(mode="learnable_tokens", pos_enc_multires=2, init_gain=0.0, init_logit=-3.0, depth_slope=2.0,
                 depth_center=0.3)
    model = _gmpi(alpha=alpha, train_planes=5, discriminator=dict(mbstd_group_size=2, pose_init="pretrained_logit"))
    kw = model.G.init_kwargs
    assert (kw["alpha_mode"], kw["pos_enc_multires"], kw["n_train_planes"], kw["alpha_init_gain"],
            kw["alpha_init_logit"], kw["alpha_depth_slope"], kw["alpha_depth_center"]) == (
        "learnable_tokens", 2, 5, 0.0, -3.0, 2.0, 0.3)
    assert max_err(model.G.token_depths, model.preset.normalized_plane_depths(5)) < 1e-6
    assert model.D.b4.mbstd.group_size == 2 and model.D.c_dim == 16
    assert float(model.D.mapping.weight.abs().max()) == 0  # the pretrained-logit start (official: random)
    assert float(_gmpi().D.mapping.weight.abs().max()) > 0
    flat = _gmpi(discriminator=dict(pose_conditioning=False, mbstd_group_size=2))
    assert flat.D.c_dim == 0 and flat.D.b4.mbstd.group_size == 2


def test_the_recipe_trains_the_networks_it_is_given():
    """GANModule takes G, D and the fakes built before it and trains those very networks; G_ema is a copy, and the
    hyper-parameters hold the settings, never the networks: rules out a recipe that builds networks of its own, an
    EMA sharing G's tensors, and networks pickled into the checkpoint's hyper-parameters."""
    torch.manual_seed(0)
    preset = get_preset("synthetic32", resolution=16)
    G, D = stylegan2_backbone(None, preset, Architecture(**TINY["arch"]))
    D.b4.mbstd.group_size = 2
    model = module_mod.GANModule(G, D, Images2D(), preset, optim=dict(grad_clip=None), max_iters=2)
    assert model.G is G and model.D is D and model.preset is preset
    assert not {id(p) for p in model.G_ema.parameters()} & {id(p) for p in G.parameters()}
    assert {"G", "D", "fakes"}.isdisjoint(model.hparams) and model.hparams.max_iters == 2
    assert model.hparams.optim == Optimisation(grad_clip=None)
    _, (opt_g, opt_d) = _attach(model)
    g0, d0 = _params(G), _params(D)
    model.g_step(B, opt_g)
    assert any(not torch.equal(g0[n], p) for n, p in G.named_parameters())
    assert all(torch.equal(d0[n], p) for n, p in D.named_parameters())
    model.d_step({"image": torch.rand(B, 3, 16, 16) * 2 - 1}, opt_d)
    assert any(not torch.equal(d0[n], p) for n, p in D.named_parameters())
    assert all(torch.equal(g0[n], p) for n, p in model.G_ema.named_parameters())


def test_the_backbone_is_the_presets_at_the_datas_resolution_from_the_given_file(tmp_path):
    """Both modules start from ``backbone``: the preset at its own resolution unless one is given, the networks of
    ``init_from`` (weights equal to the file's), and an unknown architecture field named under model.arch: rules out
    always overriding the resolution, ignoring init_from, and an error that does not say which group."""
    preset, G, _ = module_mod.backbone("synthetic32", None, None, TINY["arch"])
    assert preset.resolution == 32 and G.img_resolution == 32
    preset, G, _ = module_mod.backbone("synthetic32", 16, None, TINY["arch"])
    assert preset.resolution == 16 and G.img_resolution == 16 and G.z_dim == TINY["arch"]["z_dim"]
    torch.manual_seed(0)
    sg2 = StyleGAN2Module(**{k: v for k, v in TINY.items() if k in SG2_ARGS})
    with torch.no_grad():
        for q in sg2.G_ema.parameters():
            q.add_(0.25)
    path = sg2.export(tmp_path / "sg2.pt")
    _, G, D = module_mod.backbone("synthetic32", 16, str(path), {})
    assert all(torch.equal(q, sg2.G_ema.state_dict()[n]) for n, q in G.state_dict().items())
    assert all(torch.equal(q, sg2.D.state_dict()[n]) for n, q in D.state_dict().items())
    with pytest.raises(InputError, match=r"model\.arch: unknown \['depth'\]"):
        module_mod.backbone("synthetic32", 16, None, {"depth": 3})


def test_loading_a_checkpoint_without_state_starts_the_counters_at_zero():
    """A checkpoint without our state (e.g. written by other code) starts every counter at 0."""
    model = _advanced(_gmpi())
    with pytest.warns(UserWarning, match="every rank starts a new stream"):
        model.on_load_checkpoint({})
    assert (model.iteration, model.nimg, model.ema_updates, model.nonfinite_total) == (0, 0, 0, 0)


# ------------------------------------------------------------------------------------------ exports
def test_gmpi_export_writes_g_ema_d_preset_and_the_training_data(tmp_path):
    """The GMPI export holds G_ema (not G), D, the preset, the iteration and kimg, and the training shards' path when
    the datamodule has one: rules out exporting G, dropping D or the counters, and kimg off by 1000."""
    model = _advanced(_gmpi())
    with torch.no_grad():
        for p in model.G.parameters():
            p.mul_(1.1)
    model._trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams={"data": "data/shards"}))
    blob = load_gmpi_checkpoint(model.export(tmp_path / "g.pt"))
    assert blob["extra"] == {"iteration": 5, "kimg": 0.04, "data": "data/shards"}
    assert blob["preset"] == model.preset.to_dict()
    for n, p in blob["G"].state_dict().items():
        assert torch.equal(p, model.G_ema.state_dict()[n]), n
    assert all(torch.equal(p, model.D.state_dict()[n]) for n, p in blob["D"].state_dict().items())
    model._trainer = None
    assert "data" not in load_gmpi_checkpoint(model.export(tmp_path / "h.pt"))["extra"]


def test_stylegan2_export_holds_g_d_and_g_ema(tmp_path):
    """The 2D export holds G, D and G_ema under their names with their classes and kwargs: rules out G saved as G_ema
    and a missing network."""
    torch.manual_seed(0)
    model = StyleGAN2Module(**{k: v for k, v in TINY.items() if k in SG2_ARGS})
    with torch.no_grad():
        for p in model.G.parameters():
            p.mul_(1.1)
    nets = load_stylegan2_pkl(model.export(tmp_path / "sg2.pt"))
    for key in ("G", "D", "G_ema"):
        mine = getattr(model, key).state_dict()
        assert all(torch.equal(p, mine[n]) for n, p in nets[key].state_dict().items()), key
        assert type(nets[key]).__name__ == type(getattr(model, key)).__name__
