"""Training modules: the GAN recipe (:class:`GANModule`), plain 2D StyleGAN2 (:class:`StyleGAN2Module`) and GMPI
(:class:`GMPIModule`). One iteration: a D step (R1 every ``optim.r1_every``), a G step (GMPI: at the prior camera
of ``views.per_z`` that D scores lowest, in ``optim.batch_split`` chunks) and an EMA update of G (docs/METHOD.md §6).

Fakes and D's condition live in ``self.fakes`` (:mod:`.views`), the random streams in :mod:`.streams`, the starting
networks in :mod:`.networks`, logging in :mod:`.training_log`. Every random draw of an iteration comes from this rank's
stream (``self.rng``): N GPUs draw N different batches of fakes, a resumed run continues bit-identically. An iteration
reads one value back from the device per optimiser step (gradient norm + loss, checked finite), plus the logged
scalars every ``log_every_n_steps`` iterations.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import AttributeDict, rank_zero_info

from . import hparams
from .augment import AdaptiveP, PoseSafeAugment
from .errors import InputError
from .hparams import EMA, Alpha, Architecture, Augmentation, Optimisation, PoseDiscriminator, Shading, Views
from .losses import d_logistic_loss, ema_update, g_nonsaturating_loss, r1_penalty, stylegan2_ema_beta, torch_ema_beta
from .networks import gmpi_networks, load_checkpoint_weights, stylegan2_backbone
from .presets import Preset, get_preset
from .scene import Scene
from .streams import RankStreams, gather_per_rank, run_seed, world_rank
from .training_log import IterationLog
from .views import Images2D, PosedViews


class GANModule(pl.LightningModule):
    """The phases every GAN here shares (manual optimisation), on networks built before it and passed in.

    :class:`StyleGAN2Module` and :class:`GMPIModule` build G, D and ``fakes`` from their own arguments; those arguments
    and the ones below are ``self.hparams`` (the groups are typed dataclasses in :mod:`.hparams`, nested on the command
    line: ``--model.optim.lr``).

    Args:
        G, D: the networks to train; G_ema starts as a copy of G.
        fakes: how fakes are made and how D judges them (:mod:`.views`).
        preset: the run's preset (``gmpi_lightning.presets``).
        optim: Adam, R1, clipping and the G step's chunks.
        ema: the exported average of G.
        augment: pose-safe augmentation of every image D trains on (docs/SMALL_DATA.md; R1 is taken before it).
        max_iters: stop after this many iterations (one D + one G step; Lightning's global_step counts both).
        max_nonfinite: stop with an error after this many consecutive non-finite steps (each is skipped).
        export_path: at the end of fit, write the inference file there (``gmpi render`` reads it).
    """

    mode = "gan"
    COUNTERS = ("iteration", "nimg", "ema_updates", "nonfinite_total")

    def __init__(self, G: torch.nn.Module, D: torch.nn.Module, fakes: Images2D, preset: Preset,
                 optim: Optimisation = Optimisation(), ema: EMA = EMA(), augment: Augmentation = Augmentation(),
                 max_iters: int = 5000, max_nonfinite: int = 20, export_path: str | None = None):
        super().__init__()
        self.save_hyperparameters(ignore=["G", "D", "fakes"])  # and the concrete module's arguments (its frame)
        self.hparams.update(hparams.typed(self.hparams))  # mappings (a checkpoint's, a YAML's) as typed groups
        aug = self.hparams.augment
        self.automatic_optimization = False
        self.preset = preset
        self.G, self.D = (net.train().requires_grad_(True) for net in (G, D))
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self._fakes = fakes
        self.d_augment = PoseSafeAugment(aug.ops) if aug.mode != "none" else None
        self.ada = AdaptiveP(aug.p, aug.target, aug.kimg, adaptive=aug.mode == "ada") if self.d_augment else None
        self.iteration = self.nimg = self.ema_updates = self.nonfinite_in_row = self.nonfinite_total = 0  # counters
        self.streams, self.log_iteration = RankStreams(), IterationLog()
        self._signs_since_log: torch.Tensor | None = None  # (sum of sign(D(real)), count) for the logged r_t

    def export(self, path: str | Path) -> Path:
        raise NotImplementedError

    @property
    def fakes(self) -> Images2D:
        """How this GAN's fakes are made and judged (:mod:`.views`), on this module's device."""
        return self._fakes.to(self.device)

    # ------------------------------------------------------------------------------------------ randomness
    @property
    def rng(self) -> torch.Generator:
        """This rank's stream on this module's device: every random draw of a training iteration uses it."""
        return self.streams.generator(self.device, self._trainer, self.iteration)

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.G.z_dim, device=self.device, generator=generator or self.rng)

    # ------------------------------------------------------------------------------------------ the recipe
    def d_view(self, images: torch.Tensor) -> torch.Tensor:
        """What D trains on: ``images`` augmented with the current p (draws from this rank's stream), or as they are."""
        return images if self.d_augment is None else self.d_augment(images, self.ada.p, self.rng)

    def d_step(self, batch: dict, opt) -> dict:
        hp, f = self.hparams.optim, self.fakes
        real = batch["image"].detach().requires_grad_(hp.r1_gamma > 0 and self.iteration % hp.r1_every == 0)
        b = real.shape[0]
        with torch.no_grad():
            cond = f.sample(b, self.rng)
            fake = f.images(self.G, self.sample_z(b), cond, self.rng, shade_at=self.iteration)
        with self.toggled_optimizer(opt):
            real_logits = self.D(self.d_view(real), f.real_condition(batch))  # R1: gradient w.r.t. `real`
            fake_logits = self.D(self.d_view(fake), f.condition(cond))
            loss = d_logistic_loss(real_logits, fake_logits)
            r1 = r1_penalty(real_logits, real, hp.r1_gamma) * hp.r1_every if real.requires_grad else \
                torch.zeros((), device=self.device)
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss + r1)
            self.finish_step(opt, (loss + r1).detach(), self.D)
        return {"loss_d": loss.detach(), "r1": r1.detach(), "logits_real": real_logits.detach().mean(),
                "logits_fake": fake_logits.detach().mean(), **self.observe_real_logits(real_logits)}

    def g_step(self, b: int, opt) -> dict:
        f, z = self.fakes, self.sample_z(b)
        cond = f.g_step_condition(self.G, self.D, z, self.rng)
        chunks = max(1, min(self.hparams.optim.batch_split, b))
        block_sync = getattr(self.trainer.strategy, "block_backward_sync", None)  # DDP: one all-reduce, at the end
        with self.toggled_optimizer(opt):
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=self.device)
            for i in range(chunks):
                lo, hi = i * b // chunks, (i + 1) * b // chunks
                c = None if cond is None else cond[lo:hi]
                fake = f.images(self.G, z[lo:hi], c, self.rng, shade_at=self.iteration)
                loss = g_nonsaturating_loss(self.D(self.d_view(fake), f.condition(c))) / chunks
                with block_sync() if block_sync is not None and i < chunks - 1 else contextlib.nullcontext():
                    self.manual_backward(loss)
                total = total + loss.detach()
            self.finish_step(opt, total, self.G)
        return {"loss_g": total}

    def finish_step(self, opt, loss: torch.Tensor, net) -> bool:
        """Clip and step, unless the loss or a gradient is non-finite: then skip, count, and stop after K in a row.
        One host read: the total gradient norm (which clipping computes anyway) plus the loss, checked together."""
        params = [p for p in net.parameters() if p.grad is not None]
        clip = self.hparams.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if clip else \
            torch.nn.utils.get_total_norm([p.grad for p in params])
        if not bool(torch.isfinite(norm + loss)):
            opt.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_row >= self.hparams.max_nonfinite:
                raise FloatingPointError(f"{self.nonfinite_in_row} consecutive non-finite steps at iteration "
                                         f"{self.iteration}: lower the learning rate, check the data, or "
                                         f"resume from an earlier checkpoint")
            return False
        self.nonfinite_in_row = 0
        opt.step()
        return True

    def update_ema(self, batch_total: int) -> float:
        ema = self.hparams.ema
        beta = torch_ema_beta(self.ema_updates, ema.decay) if ema.kind == "torch_ema" else \
            stylegan2_ema_beta(batch_total, self.nimg, ema.kimg, ema.rampup)
        ema_update(self.G_ema, self.G, beta)
        self.ema_updates += 1
        return beta

    @torch.no_grad()
    def observe_real_logits(self, real_logits: torch.Tensor) -> dict:
        """StyleGAN2-ADA's r_t = E[sign(D(real))] since the last log (``ada_rt``, logged with or without augmentation)
        and, with augmentation, p's update every ``augment.interval`` iterations from every rank's signs."""
        s = real_logits.detach().float().sign()
        signs = torch.stack([s.sum(), torch.ones_like(s).sum()])
        self._signs_since_log = signs if self._signs_since_log is None else self._signs_since_log + signs
        logs = {"ada_rt": self._signs_since_log[0] / self._signs_since_log[1]}
        if self.ada is not None:
            self.ada.observe(real_logits)
            if (self.iteration + 1) % self.hparams.augment.interval == 0:
                strategy = self._trainer.strategy if self._trainer is not None else None
                self.ada.update(None if strategy is None else lambda t: strategy.reduce(t, reduce_op="sum"))
            logs["augment_p"] = self.ada.p.clone()
        return logs

    def training_step(self, batch: dict, batch_idx: int):
        if self.iteration >= self.hparams.max_iters:
            self.trainer.should_stop = True
            return None
        opt_g, opt_d = self.optimizers()
        b = batch["image"].shape[0]
        logs = {**self.d_step(batch, opt_d), **self.g_step(b, opt_g)}
        batch_total = b * self.trainer.world_size
        ema_beta = self.update_ema(batch_total)  # ramp-up from the images seen before this batch (StyleGAN2-ADA)
        self.nimg += batch_total
        self.iteration += 1
        if self.log_iteration.due(self.trainer, self.iteration, self.hparams.max_iters):
            self._signs_since_log = None  # the logged r_t covers the iterations since the previous log
            self.log_iteration.write(self, logs, batch_total, b, ema_beta=ema_beta, kimg=self.nimg / 1000,
                                     iteration=self.iteration, nonfinite_total=self.nonfinite_total,
                                     effective_batch=batch_total, **self.fakes.logs())
        if self.iteration >= self.hparams.max_iters:
            self.trainer.should_stop = True
        return None

    def validation_step(self, batch: dict, batch_idx: int):
        """Logits of reals and of G_ema fakes (a cheap health check; FID lives in the evaluation callbacks), from a
        generator of its own, so validating does not move the training stream."""
        b, f = batch["image"].shape[0], self.fakes
        g = self.streams.validation(self.device, self._trainer, batch_idx)
        with torch.no_grad():
            cond = f.sample(b, g)
            fake = f.images(self.G_ema, self.sample_z(b, g), cond, g, shade_at=None, noise_mode="const")
            real_logits = self.D(batch["image"], f.real_condition(batch))
            fake_logits = self.D(fake, f.condition(cond))
        self.log_dict({"val/logits_real": real_logits.mean(), "val/logits_fake": fake_logits.mean(),
                       "val/loss_d": d_logistic_loss(real_logits, fake_logits)}, batch_size=b, sync_dist=True)

    test_step = validation_step

    def configure_optimizers(self):
        hp = self.hparams.optim
        g_params = [p for n, p in self.G.named_parameters() if hp.train_mapping or not n.startswith("mapping.")]
        return [torch.optim.Adam(params, lr=hp.lr, betas=tuple(hp.betas), eps=1e-8)
                for params in (g_params, self.D.parameters())]

    # --------------------------------------------------------------------------------- Lightning's hooks
    def on_fit_start(self) -> None:
        world, hp = self.trainer.world_size, self.hparams
        if "16-mixed" == str(self.trainer.precision):
            raise InputError("precision 16-mixed is not supported (its loss scaling hides non-finite steps from the "
                             "guard and clipping): use bf16-mixed or 32-true")
        rank_zero_info(f"{type(self).__name__}: {self.preset.name} {self.preset.resolution}px, batch per device "
                       f"{self.trainer.datamodule.batch_size if self.trainer.datamodule else '?'} x {world} devices, "
                       f"lr {hp.optim.lr} for G and D (no scaling with the batch), iteration "
                       f"{self.iteration}/{hp.max_iters}, random streams seeded {run_seed()} * {world} + rank")

    def setup(self, stage: str) -> None:
        init = self.hparams.get("init_from")
        if init and str(init).endswith(".ckpt") and not getattr(self, "_initialised_from_ckpt", False):
            load_checkpoint_weights(self, init)
            self._initialised_from_ckpt = True

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            self.export(self.hparams.export_path)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if getattr(self, "run_config", None):
            checkpoint["run_config"] = self.run_config  # the resolved YAML of the run (LightningCLI)
        checkpoint["generator_init_kwargs"] = self.G_ema.init_kwargs  # rebuild G_ema without the init file
        checkpoint["model_mode"] = self.mode
        state = {**{k: getattr(self, k) for k in self.COUNTERS}, **self.fakes.state(),
                 "rng": self.streams.state(self.device, self._trainer, self.iteration)}
        if self.ada is not None:  # p (equal on every rank) and every rank's signs since p's last update
            state["ada"] = {"p": self.ada.p.detach().cpu().clone(),
                            "signs": gather_per_rank(self._trainer, self.ada.signs.detach(), self.device)}
        checkpoint["gmpi_state"] = state
        key = self.CHECKPOINT_HYPER_PARAMS_KEY
        if key in checkpoint:  # plain data, so that the checkpoint loads with weights_only
            checkpoint[key] = hparams.plain(checkpoint[key])

    @property
    def hparams_initial(self) -> AttributeDict:
        """The hyper-parameters as loggers record them: every group whole, as a plain dict."""
        return AttributeDict(hparams.plain(hparams.typed(super().hparams_initial)))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        s = checkpoint.get("gmpi_state", {})
        for k in self.COUNTERS:
            setattr(self, k, int(s.get(k, 0)))
        self.fakes.load_state(s)
        device = self.trainer.strategy.root_device.type if self._trainer is not None else self.device.type
        self.streams.load(s.get("rng"), self._trainer, device)
        ada, (world, rank) = s.get("ada"), world_rank(self._trainer)
        if self.ada is not None and ada is not None:  # else p starts at augment.p (a run that had no augmentation)
            self.ada.p.copy_(ada["p"])
            self.ada.signs.copy_(ada["signs"][rank] if len(ada["signs"]) == world else torch.zeros(2))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, preset={self.preset.name}@{self.preset.resolution}px"


def backbone(preset: str, resolution: int | None, init_from: str | None,
             arch: Architecture | dict) -> tuple[Preset, torch.nn.Module, torch.nn.Module]:
    """The preset (``resolution`` overrides its own: the data's) and the 2D (G, D) a run starts from
    (:func:`.networks.stylegan2_backbone`)."""
    p = get_preset(preset, **({"resolution": resolution} if resolution else {}))
    return (p, *stylegan2_backbone(init_from, p, hparams.group(Architecture, arch, "arch")))


class StyleGAN2Module(GANModule):
    """2D StyleGAN2 training (no planes, no poses), exported in the converted StyleGAN2 format.

    Pretrains the 2D generator GMPI starts from where no public StyleGAN2 exists (the synthetic data). Its arguments,
    and :class:`GANModule`'s settings (``optim``, ...):

    Args:
        preset: camera/plane/architecture constants (``gmpi_lightning.presets``).
        resolution: the data's resolution, if not the preset's.
        init_from: NVlabs pickle / converted .pt (StyleGAN2 weights), or a Lightning checkpoint of the same module
            (all weights, loaded without running code). None: train from scratch with ``arch``.
        arch: the backbone's architecture when not initialised from a file.
    """

    mode = "stylegan2"

    def __init__(self, preset: str = "FFHQ256", resolution: int | None = None, init_from: str | None = None,
                 arch: Architecture = Architecture(), **settings):
        p, G, D = backbone(preset, resolution, init_from, arch)
        super().__init__(G, D, Images2D(), p, **settings)

    def export(self, path: str | Path) -> Path:
        from .io import save_converted

        nets = {"G": self.G, "D": self.D, "G_ema": self.G_ema}
        nets["kwargs"] = {k: {"class_name": type(m).__name__, "init_kwargs": m.init_kwargs} for k, m in nets.items()}
        return save_converted(nets, path)


class GMPIModule(GANModule):
    """GMPI fine-tuning of a pretrained StyleGAN2 (GMPI's generator and pose-conditioned D built on its networks).

    Trained with :class:`GANModule`'s phases. Its arguments, and :class:`GANModule`'s settings (``optim``, ...):

    Args:
        preset: camera/plane/architecture constants (``gmpi_lightning.presets``).
        resolution: the data's resolution, if not the preset's.
        init_from: the pretrained StyleGAN2 (NVlabs pickle / converted .pt), or a Lightning checkpoint of this module.
        arch: the backbone's architecture when not initialised from a file.
        train_planes: planes per MPI during training (official 32).
        alpha: the alpha branch and how it starts.
        discriminator: the pose-conditioned discriminator (pose_conditioning False is the ablation).
        views: the G step's cameras (worst of ``per_z`` as scored by D).
        shading: the shading augmentation of fakes (schedule ``as_coded`` = official, ``ramp`` = monotone).
    """

    mode = "gmpi"

    def __init__(self, preset: str = "FFHQ256", resolution: int | None = None, init_from: str | None = None,
                 arch: Architecture = Architecture(), train_planes: int = 32, alpha: Alpha = Alpha(),
                 discriminator: PoseDiscriminator = PoseDiscriminator(), views: Views = Views(),
                 shading: Shading = Shading(), **settings):
        p, G2d, D2d = backbone(preset, resolution, init_from, arch)
        g = hparams.typed({"alpha": alpha, "discriminator": discriminator, "views": views, "shading": shading})
        G, D = gmpi_networks(G2d, D2d, p, train_planes, g["alpha"], g["discriminator"])
        fakes = PosedViews(Scene(p, train_planes), g["discriminator"].pose_conditioning, g["views"], g["shading"])
        super().__init__(G, D, fakes, p, **settings)

    @property
    def scene(self) -> Scene:
        """Preset + training planes on this module's device."""
        return self.fakes.scene

    def export(self, path: str | Path) -> Path:
        from .io import save_gmpi_checkpoint

        extra = {"iteration": self.iteration, "kimg": self.nimg / 1000}
        dm = getattr(self._trainer, "datamodule", None)
        if isinstance(getattr(dm, "hparams", {}).get("data"), str):
            extra["data"] = dm.hparams["data"]  # the training shards: `gmpi evaluate`'s default --data
        return save_gmpi_checkpoint(path, self.G_ema, preset=self.preset.to_dict(), D=self.D, extra=extra)
