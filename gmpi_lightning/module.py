"""Training modules: the 2D GAN phases (:class:`GANModule`) and what GMPI adds to them (:class:`GMPIModule`).

One iteration, as the official training loop (docs/METHOD.md §6):

    D step: fakes = render(G(z) [shaded after shading_start], one prior pose per z); reals with their poses;
            loss = softplus(-D(real)) + softplus(D(fake)) [+ r1_every * R1 (gamma/2 ||grad_x D(real)||^2) every
            r1_every iterations, folded into this step]
    G step: for fresh z, score views_per_z prior poses with the current D (no grad, no shading) and keep the
            one with the lowest logit; regenerate with gradients (in batch_split chunks), shade, render at
            that pose; loss = softplus(-D(fake)); clip; step; EMA update.

:class:`GANModule` owns everything that is not specific to 3D: the networks' phases, R1, clipping, the non-finite
guard, EMA, counters, the per-rank random streams and exact resume. :class:`StyleGAN2Module` is plain 2D
StyleGAN2 training (the synthetic data's pretrained 2D generator is made with it); :class:`GMPIModule` adds
planes, cameras, the pose-conditioned D, worst-of-N views and shading. Networks know nothing about Lightning.

Randomness: every draw of an iteration (latents, cameras, lights, the generator's noise, the candidate views)
comes from one ``torch.Generator`` per rank on the rank's device, seeded ``seed * world_size + rank`` (StyleGAN2-ADA's
convention; ``seed`` is ``seed_everything``'s), so on N GPUs every rank draws its own fakes. Checkpoints keep every
rank's stream; a resumed run continues each one where it stopped.

Host reads: an iteration reads one value back from the device per optimiser step (whether the total gradient norm,
which clipping computes anyway, and the loss are finite), plus the logged scalars every ``log_every_n_steps``
iterations. Input checks that read values (``render_mpi(validate=True)``) belong to the user-facing entry points.
"""

from __future__ import annotations

import copy
import os
import pickle
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from . import cameras
from .augment import AdaptiveP, PoseSafeAugment
from .losses import d_logistic_loss, ema_update, g_nonsaturating_loss, r1_penalty, stylegan2_ema_beta, torch_ema_beta
from .nn.alpha import alpha_branch
from .nn.discriminator import Discriminator, PoseConditionedDiscriminator
from .nn.gmpi import GMPIGenerator
from .nn.synthesis import Generator
from .presets import SHADING, get_preset
from .render import light_direction, sample_light, shade_mpi, shading_coefficients
from .scene import Scene

VALIDATION_STREAM = 7_919  # validation batches draw from their own generators, never from the training stream


class GANModule(pl.LightningModule):
    """The phases every GAN here shares, with manual optimisation. Subclasses say how fakes are made.

    Args (grouped as a recipe reads):
        preset, resolution: camera/plane/architecture constants (``gmpi_lightning.presets``); ``resolution``
            overrides the preset's (the data's).
        init_from: NVlabs pickle / converted .pt (StyleGAN2 weights), or a Lightning checkpoint of the same module
            (all weights, loaded without running code). None: train from scratch.
        z_dim, w_dim, mapping_layers, channel_base, channel_max: architecture when not initialised from a file.
        lr, betas, train_mapping: Adam for G and D (official 0.002, (0, 0.9)); also train the mapping network.
        r1_gamma, r1_every: R1 weight and interval. R1 runs inside the D step every ``r1_every`` iterations with
            weight ``r1_every * gamma`` and the plain Adam settings (no StyleGAN2 rescaling: that is for R1 as an
            extra optimiser step, which this loop does not take).
        grad_clip: total gradient-norm clip of both networks (official 10; None disables).
        batch_split: G step in chunks with gradient accumulation (one DDP all-reduce).
        ema, ema_kimg, ema_rampup, ema_decay: ``stylegan2`` (ema_kimg with ramp-up) or ``torch_ema`` (official:
            decay with warm-up).
        max_iters: stop after this many iterations (one D step + one G step; Lightning's global_step counts
            optimiser steps).
        max_nonfinite: stop with an error after this many consecutive non-finite steps (each is skipped).
        export_path: at the end of fit, write the inference file there (``gmpi render`` reads it).
        augment, augment_p, augment_ops, ada_target, ada_interval, ada_kimg: pose-safe augmentation of every image D
            trains on (``gmpi_lightning.augment``; docs/SMALL_DATA.md). ``none`` (official, default), ``ada``
            (StyleGAN2-ADA's adaptive p, starting at ``augment_p``, updated every ``ada_interval`` iterations towards
            r_t = ``ada_target``, able to go from 0 to 1 in ``ada_kimg`` thousand reals) or ``fixed`` (p =
            ``augment_p``). The reals and the fakes of both phases are augmented; R1 is the gradient with respect
            to the reals before augmentation; the worst-view scoring sees renders as they are.
    """

    mode = "gan"

    def __init__(self, preset: str = "FFHQ256", resolution: int | None = None, init_from: str | None = None,
                 # architecture (when not initialised from a file)
                 z_dim: int = 512, w_dim: int = 512, mapping_layers: int = 8, channel_base: int | None = None,
                 channel_max: int | None = None,
                 # optimisation
                 lr: float = 0.002, betas: tuple[float, float] = (0.0, 0.9), train_mapping: bool = True,
                 r1_gamma: float = 10.0, r1_every: int = 1, grad_clip: float | None = 10.0, batch_split: int = 1,
                 # EMA
                 ema: str = "stylegan2", ema_kimg: float = 10.0, ema_rampup: float | None = 0.05,
                 ema_decay: float = 0.999,
                 # run
                 max_iters: int = 5000, max_nonfinite: int = 20, export_path: str | None = None,
                 # augmentation of what D sees (small datasets)
                 augment: str = "none", augment_p: float = 0.0,
                 augment_ops: tuple[str, ...] = ("translate", "brightness", "contrast", "cutout"),
                 ada_target: float = 0.6, ada_interval: int = 4, ada_kimg: float = 100.0):
        super().__init__()
        self.save_hyperparameters()
        if ema not in ("stylegan2", "torch_ema"):
            raise ValueError(f"ema must be 'stylegan2' or 'torch_ema', got {ema!r}")
        if r1_every < 1:
            raise ValueError(f"r1_every must be >= 1, got {r1_every}")
        self.automatic_optimization = False
        self.preset = get_preset(preset, **({"resolution": resolution} if resolution else {}))
        self.G, self.D = self.build_networks(*self._backbone())
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.d_augment, self.ada = self.build_augmentation()
        # our counters (checkpointed in on_save_checkpoint)
        self.iteration, self.nimg, self.ema_updates = 0, 0, 0
        self.nonfinite_in_row, self.nonfinite_total = 0, 0
        self._rng: torch.Generator | None = None
        self._rng_state: torch.Tensor | None = None  # a resumed stream, applied when the generator is made
        self._t_last, self._logs = None, {}
        self._signs_since_log: torch.Tensor | None = None  # (sum of sign(D(real)), count) for the logged r_t

    # --------------------------------------------------------------------------------------- networks
    def _backbone(self) -> tuple[Generator, Discriminator]:
        """2D (G, D): from a StyleGAN2 file, or from scratch (a .ckpt of this module is loaded in setup)."""
        hp, p = self.hparams, self.preset
        init = Path(hp.init_from) if hp.init_from else None
        if init is not None and init.suffix != ".ckpt":
            from .io import load_stylegan2_pkl

            nets = load_stylegan2_pkl(init)
            G2d, D2d = nets.get("G_ema") or nets.get("G"), nets.get("D")
            if G2d is None or G2d.img_resolution != p.resolution:
                raise ValueError(f"{init}: needs a {p.resolution}px generator (the data's resolution), got "
                                 f"{None if G2d is None else G2d.img_resolution}")
            if D2d is None:
                raise ValueError(f"{init} holds no discriminator; fine-tuning starts from a pretrained D")
            return G2d, D2d
        synth = dict(channel_base=hp.channel_base or p.channel_base, channel_max=hp.channel_max or p.channel_max,
                     num_fp16_res=p.num_fp16_res, conv_clamp=p.conv_clamp)
        G2d = Generator(z_dim=hp.z_dim, c_dim=0, w_dim=hp.w_dim, img_resolution=p.resolution, img_channels=3,
                        mapping_kwargs=dict(num_layers=hp.mapping_layers), synthesis_kwargs=synth)
        D2d = Discriminator(c_dim=0, img_resolution=p.resolution, img_channels=3, channel_base=synth["channel_base"],
                            channel_max=synth["channel_max"], num_fp16_res=p.num_fp16_res, conv_clamp=p.conv_clamp)
        return G2d, D2d

    def build_networks(self, G2d: Generator, D2d: Discriminator) -> tuple[torch.nn.Module, torch.nn.Module]:
        return G2d.train().requires_grad_(True), D2d.train().requires_grad_(True)

    # ------------------------------------------------------------------------------------ what subclasses define
    def sample_condition(self, n: int, generator: torch.Generator):
        """What a fake is rendered for (GMPI: a camera); None for an unconditional 2D GAN."""
        return None

    def fake_images(self, G, z: torch.Tensor, cond, noise: torch.Generator | None = None, shade: bool = True,
                    noise_mode: str = "random") -> torch.Tensor:
        """Images in [-1, 1] that D sees."""
        return G(z, None, noise_mode=noise_mode, noise_generator=noise)

    def d_condition(self, cond) -> torch.Tensor | None:
        """D's condition for a fake's ``cond``."""
        return None

    def real_condition(self, batch: dict) -> torch.Tensor | None:
        return None

    def g_condition(self, z: torch.Tensor):
        """The condition of the G step's fakes (GMPI: the worst of N views)."""
        return self.sample_condition(z.shape[0], self.rng)

    def export(self, path: str | Path) -> Path:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- augmentation of D's input
    def build_augmentation(self) -> tuple[PoseSafeAugment | None, AdaptiveP | None]:
        hp = self.hparams
        if hp.augment not in ("none", "ada", "fixed"):
            raise ValueError(f"augment must be 'none', 'ada' or 'fixed', got {hp.augment!r}")
        if hp.augment == "none":
            return None, None
        if hp.ada_interval < 1:
            raise ValueError(f"ada_interval must be >= 1, got {hp.ada_interval}")
        return PoseSafeAugment(hp.augment_ops), AdaptiveP(hp.augment_p, hp.ada_target, hp.ada_kimg,
                                                          adaptive=hp.augment == "ada")

    def augment(self, images: torch.Tensor) -> torch.Tensor:
        """What D trains on: ``images`` augmented with the current p (draws from this rank's stream), or as they are
        when augmentation is off."""
        return images if self.d_augment is None else self.d_augment(images, self.ada.p, self.rng)

    @torch.no_grad()
    def observe_real_logits(self, real_logits: torch.Tensor) -> dict:
        """StyleGAN2-ADA's overfitting heuristic r_t = E[sign(D(real))] since the last logged iteration (logged as
        ``ada_rt`` with or without augmentation) and, with ``augment: ada``, p's update every ``ada_interval``
        iterations from every rank's signs."""
        s = real_logits.detach().float().sign()
        signs = torch.stack([s.sum(), torch.ones_like(s).sum()])
        self._signs_since_log = signs if self._signs_since_log is None else self._signs_since_log + signs
        logs = {"ada_rt": self._signs_since_log[0] / self._signs_since_log[1]}
        if self.ada is not None:
            self.ada.observe(real_logits)
            if (self.iteration + 1) % self.hparams.ada_interval == 0:
                strategy = self._trainer.strategy if self._trainer is not None else None
                self.ada.update(None if strategy is None else lambda t: strategy.reduce(t, reduce_op="sum"))
            logs["augment_p"] = self.ada.p.clone()
        return logs

    # ------------------------------------------------------------------------------------------ randomness
    @staticmethod
    def run_seed() -> int:
        """seed_everything's seed, else this process's initial seed."""
        seed = os.environ.get("PL_GLOBAL_SEED")
        return int(seed) if seed is not None else torch.initial_seed() % 2**31

    def rank_seed(self) -> int:
        """``seed * world_size + rank`` (StyleGAN2-ADA's convention)."""
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        return self.run_seed() * world + rank

    @property
    def rng(self) -> torch.Generator:
        """This rank's stream on this module's device: every random draw of a training iteration uses it."""
        if self._rng is None or self._rng.device != self.device:
            self._rng = torch.Generator(self.device)
            self._rng.manual_seed(self.rank_seed() + 1_000_003 * self.iteration)  # iteration > 0: a changed world
            if self._rng_state is not None:
                self._rng.set_state(self._rng_state)
                self._rng_state = None
        return self._rng

    def sample_z(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.G.z_dim, device=self.device, generator=generator or self.rng)

    def _gather_rng_states(self) -> torch.Tensor:
        """Every rank's stream state (world x bytes); a collective: on_save_checkpoint runs on every rank."""
        return self._gather_per_rank(self.rng.get_state())

    def _gather_per_rank(self, state: torch.Tensor) -> torch.Tensor:
        """Every rank's copy of a 1-d ``state`` (world x n, on the CPU); a collective."""
        if self._trainer is None or self.trainer.world_size == 1:
            return state[None]
        return self.trainer.strategy.all_gather(state.to(self.device)).reshape(self.trainer.world_size, -1).cpu()

    # --------------------------------------------------------------------------------------------- Lightning
    def on_fit_start(self) -> None:
        world, hp = self.trainer.world_size, self.hparams
        if "16-mixed" == str(self.trainer.precision):
            raise ValueError("precision 16-mixed is not supported (its loss scaling hides non-finite steps from the "
                             "guard and clipping): use bf16-mixed or 32-true")
        rank_zero_info(f"{type(self).__name__}: {self.preset.name} {self.preset.resolution}px, batch per device "
                       f"{self.trainer.datamodule.batch_size if self.trainer.datamodule else '?'} x {world} devices, "
                       f"lr {hp.lr} for G and D (no scaling with the batch), iteration {self.iteration}/{hp.max_iters},"
                       f" random streams seeded {self.run_seed()} * {world} + rank")

    def setup(self, stage: str) -> None:
        init = self.hparams.init_from
        if init and str(init).endswith(".ckpt") and not getattr(self, "_initialised_from_ckpt", False):
            try:  # plain tensors and containers only: code in a downloaded checkpoint never runs
                state = torch.load(init, map_location="cpu", weights_only=True)["state_dict"]
            except pickle.UnpicklingError as e:
                raise ValueError(f"{init}: not a plain-data Lightning checkpoint of this module; it holds objects "
                                 f"that only run as code when loaded ({str(e).splitlines()[0]})") from None
            missing, unexpected = self.load_state_dict(state, strict=False)
            if unexpected or missing:
                raise ValueError(f"{init}: weights do not fit this model ({type(self).__name__}); missing "
                                 f"{missing[:4]}, unexpected {unexpected[:4]}. A .ckpt initialises the same module "
                                 f"and architecture; use the exported .pt of a StyleGAN2 run for GMPI")
            self._initialised_from_ckpt = True

    def on_train_end(self) -> None:
        if self.hparams.export_path and self.trainer.is_global_zero:
            self.export(self.hparams.export_path)

    COUNTERS = ("iteration", "nimg", "ema_updates", "nonfinite_total")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if getattr(self, "run_config", None):
            checkpoint["run_config"] = self.run_config  # the resolved YAML of the run (LightningCLI)
        checkpoint["generator_init_kwargs"] = self.G_ema.init_kwargs  # rebuild G_ema without the init file
        checkpoint["model_mode"] = self.mode
        checkpoint["gmpi_state"] = {**{k: getattr(self, k) for k in self.COUNTERS},
                                    "rng": {"device_type": self.device.type, "states": self._gather_rng_states()}}
        if self.ada is not None:  # p (equal on every rank) and every rank's signs since p's last update
            checkpoint["gmpi_state"]["ada"] = {"p": self.ada.p.detach().cpu().clone(),
                                               "signs": self._gather_per_rank(self.ada.signs.detach())}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        s = checkpoint.get("gmpi_state", {})
        for k in self.COUNTERS:
            setattr(self, k, int(s.get(k, 0)))
        rng = s.get("rng")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self._trainer is not None else (1, 0)
        device = self.trainer.strategy.root_device.type if self._trainer is not None else self.device.type
        if rng and len(rng["states"]) == world and rng["device_type"] == device:
            self._rng_state = rng["states"][rank].clone()
        else:
            rank_zero_warn(f"the checkpoint's random streams were saved by {len(rng['states']) if rng else 0} "
                           f"{rng['device_type'] if rng else ''} processes, this run has {world} on {device}: every "
                           f"rank starts a new stream, seeded with the iteration too (the run goes on, but not "
                           f"bit-identically)")
            self._rng_state = None
        self._rng = None
        ada = s.get("ada")
        if self.ada is not None and ada is not None:  # else p starts at augment_p (a run that had no augmentation)
            self.ada.p.copy_(ada["p"])
            self.ada.signs.copy_(ada["signs"][rank] if len(ada["signs"]) == world else torch.zeros(2))

    def configure_optimizers(self):
        hp = self.hparams
        g_params = [p for n, p in self.G.named_parameters() if hp.train_mapping or not n.startswith("mapping.")]
        opt_g = torch.optim.Adam(g_params, lr=hp.lr, betas=tuple(hp.betas), eps=1e-8)
        opt_d = torch.optim.Adam(self.D.parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=1e-8)
        return [opt_g, opt_d]

    # ------------------------------------------------------------------------------------------------ phases
    def d_step(self, batch: dict, opt) -> dict:
        hp = self.hparams
        real = batch["image"].detach().requires_grad_(hp.r1_gamma > 0 and self.iteration % hp.r1_every == 0)
        b = real.shape[0]
        with torch.no_grad():
            cond = self.sample_condition(b, self.rng)
            fake = self.fake_images(self.G, self.sample_z(b), cond, self.rng)
        with self.toggled_optimizer(opt):
            real_logits = self.D(self.augment(real), self.real_condition(batch))  # R1: gradient w.r.t. `real`
            fake_logits = self.D(self.augment(fake), self.d_condition(cond))
            loss = d_logistic_loss(real_logits, fake_logits)
            r1 = torch.zeros((), device=self.device)
            if real.requires_grad:
                r1 = r1_penalty(real_logits, real, hp.r1_gamma) * hp.r1_every
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss + r1)
            self._finish_step(opt, (loss + r1).detach(), self.D)
        return {"loss_d": loss.detach(), "r1": r1.detach(), "logits_real": real_logits.detach().mean(),
                "logits_fake": fake_logits.detach().mean(), **self.observe_real_logits(real_logits)}

    def g_step(self, b: int, opt) -> dict:
        z = self.sample_z(b)
        cond = self.g_condition(z)
        chunks = max(1, min(self.hparams.batch_split, b))
        bounds = [(i * b // chunks, (i + 1) * b // chunks) for i in range(chunks)]
        with self.toggled_optimizer(opt):
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=self.device)
            for i, (lo, hi) in enumerate(bounds):
                c = None if cond is None else cond[lo:hi]
                logits = self.D(self.augment(self.fake_images(self.G, z[lo:hi], c, self.rng)), self.d_condition(c))
                loss = g_nonsaturating_loss(logits) / chunks
                block_sync = getattr(self.trainer.strategy, "block_backward_sync", None)
                if i < chunks - 1 and block_sync is not None:  # accumulate without an all-reduce per chunk (DDP)
                    with block_sync():
                        self.manual_backward(loss)
                else:
                    self.manual_backward(loss)
                total = total + loss.detach()
            self._finish_step(opt, total, self.G)
        return {"loss_g": total}

    def _finish_step(self, opt, loss: torch.Tensor, net) -> bool:
        """Clip and step, unless the loss or a gradient is non-finite: then skip, count, and stop after K in a row.

        One host read: the total gradient norm (which clipping computes anyway) plus the loss, checked together."""
        params = [p for p in net.parameters() if p.grad is not None]
        if self.hparams.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.hparams.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
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
        hp = self.hparams
        if hp.ema == "torch_ema":
            beta = torch_ema_beta(self.ema_updates, hp.ema_decay)
        else:
            beta = stylegan2_ema_beta(batch_total, self.nimg, hp.ema_kimg, hp.ema_rampup)
        ema_update(self.G_ema, self.G, beta)
        self.ema_updates += 1
        return beta

    def training_step(self, batch: dict, batch_idx: int):
        if self.iteration >= self.hparams.max_iters:
            self.trainer.should_stop = True
            return None
        opt_g, opt_d = self.optimizers()
        b = batch["image"].shape[0]
        logs = self.d_step(batch, opt_d)
        logs.update(self.g_step(b, opt_g))
        batch_total = b * self.trainer.world_size
        self.nimg += batch_total
        ema_beta = self.update_ema(batch_total)
        self.iteration += 1
        self._log_iteration(logs, ema_beta, batch_total, b)
        if self.iteration >= self.hparams.max_iters:
            self.trainer.should_stop = True
        return None

    def _log_iteration(self, logs: dict, ema_beta: float, batch_total: int, b: int) -> None:
        """Log every ``log_every_n_steps`` iterations only, as host tensors moved in one transfer (Lightning reads
        logged values back for its loggers and, every step, for the progress bar); throughput is measured over the
        iterations in between."""
        every = max(1, int(getattr(self.trainer, "log_every_n_steps", 1) or 1))
        now = time.perf_counter()
        first_or_last = self.iteration == 1 or self.iteration >= self.hparams.max_iters or self.trainer.fast_dev_run
        if self.iteration % every and not first_or_last:
            return
        self._signs_since_log = None  # the logged r_t covers the iterations since the previous log
        if self._t_last is not None:
            t0, it0 = self._t_last
            logs["img_per_s"] = batch_total * (self.iteration - it0) / max(now - t0, 1e-9)
        self._t_last = (now, self.iteration)
        on_device = [k for k, v in logs.items() if isinstance(v, torch.Tensor)]
        host = torch.stack([logs[k].float() for k in on_device]).cpu()  # one transfer for all of them
        logs.update(zip(on_device, host.unbind()))
        logs.update(ema_beta=ema_beta, kimg=self.nimg / 1000, iteration=float(self.iteration),
                    nonfinite_total=float(self.nonfinite_total), effective_batch=float(batch_total),
                    peak_mem_mb=peak_memory_mb(self.device), **self.extra_logs())
        # host tensors: Lightning re-reads the progress-bar values every step, which must not wait on the device
        logs = {k: v if isinstance(v, torch.Tensor) else torch.tensor(float(v)) for k, v in logs.items()}
        prog = {k: logs[k] for k in ("loss_d", "loss_g", "kimg", "img_per_s") if k in logs}
        self.log_dict(prog, prog_bar=True, on_step=True, on_epoch=False, batch_size=b)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k not in prog}, on_step=True, on_epoch=False,
                      batch_size=b)

    def extra_logs(self) -> dict:
        return {}

    def validation_step(self, batch: dict, batch_idx: int):
        """Logits of reals and of G_ema fakes (cheap health check; FID lives in the evaluation callbacks). Draws from
        a generator of its own, so validating does not move the training streams."""
        b = batch["image"].shape[0]
        g = torch.Generator(self.device)
        g.manual_seed(self.rank_seed() * VALIDATION_STREAM + batch_idx)
        with torch.no_grad():
            cond = self.sample_condition(b, g)
            fake = self.fake_images(self.G_ema, self.sample_z(b, g), cond, g, shade=False, noise_mode="const")
            real_logits = self.D(batch["image"], self.real_condition(batch))
            fake_logits = self.D(fake, self.d_condition(cond))
        self.log_dict({"val/logits_real": real_logits.mean(), "val/logits_fake": fake_logits.mean(),
                       "val/loss_d": d_logistic_loss(real_logits, fake_logits)}, batch_size=b, sync_dist=True)

    test_step = validation_step

    def generator_for_inference(self):
        return self.G_ema

    def extra_repr(self) -> str:
        return f"mode={self.mode}, preset={self.preset.name}@{self.preset.resolution}px"


class StyleGAN2Module(GANModule):
    """2D StyleGAN2 training (no planes, no poses): pretrains the 2D generator GMPI starts from where no public
    StyleGAN2 exists (the synthetic data). Exports the networks in the converted StyleGAN2 format."""

    mode = "stylegan2"

    def export(self, path: str | Path) -> Path:
        from .io import save_converted

        nets = {"G": self.G, "D": self.D, "G_ema": self.G_ema, "training_set_kwargs": None,
                "kwargs": {k: {"class_name": type(m).__name__, "init_kwargs": m.init_kwargs}
                           for k, m in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema))}}
        return save_converted(nets, path)


class GMPIModule(GANModule):
    """GMPI fine-tuning of a pretrained StyleGAN2: :class:`GANModule`'s phases and arguments, plus

    Args:
        alpha_mode, pos_enc_multires: the alpha branch (see ``GMPIGenerator``).
        alpha_init_gain, alpha_init_logit, alpha_depth_slope, alpha_depth_center: start of the new alpha branch
            (official: 1, 0 and no ramp; see ``GMPIGenerator``).
        train_planes: planes per MPI during training (official 32).
        pose_conditioning: condition D on the flattened w2c (GMPI); False is the ablation.
        d_pose_init: how the pose-conditioned D starts from the pretrained one: ``official`` (its logit is the
            pretrained logit times a random pose-dependent gain, sign included) or ``pretrained_logit`` (the
            pretrained logit at every pose); see ``PoseConditionedDiscriminator.from_stylegan2``.
        mbstd_group_size: minibatch-stddev group (GMPI 1: per-sample independent logits).
        views_per_z, view_selection: G's worst-of-N views scored by D (``worst``) or one random view (``random``).
        shading, shading_schedule, shading_start, shading_grow: Lambertian shading of fake MPIs
            (schedule ``as_coded`` = official, ``ramp`` = monotone).
    """

    mode = "gmpi"

    def __init__(self, *args,
                 # the alpha branch and its planes
                 alpha_mode: str = "normalize_add_z", pos_enc_multires: int = 0, alpha_init_gain: float = 1.0,
                 alpha_init_logit: float = 0.0, alpha_depth_slope: float = 0.0, alpha_depth_center: float = 0.0,
                 train_planes: int = 32,
                 # the pose-conditioned discriminator and the G step's views
                 pose_conditioning: bool = True, d_pose_init: str = "official", mbstd_group_size: int = 1,
                 views_per_z: int = 4, view_selection: str = "worst",
                 # shading augmentation of fakes
                 shading: bool = True, shading_schedule: str = "as_coded", shading_start: int = 1000,
                 shading_grow: int = 1000, **kwargs):
        if view_selection not in ("worst", "random"):
            raise ValueError(f"view_selection must be 'worst' or 'random', got {view_selection!r}")
        self._gmpi_args = dict(alpha_mode=alpha_mode, pos_enc_multires=pos_enc_multires,
                               alpha_init_gain=alpha_init_gain, alpha_init_logit=alpha_init_logit,
                               alpha_depth_slope=alpha_depth_slope, alpha_depth_center=alpha_depth_center,
                               train_planes=train_planes, pose_conditioning=pose_conditioning,
                               d_pose_init=d_pose_init, mbstd_group_size=mbstd_group_size)
        super().__init__(*args, **kwargs)
        self.shading_calls, self._last_shading = 0, 1.0
        self._scene = Scene(self.preset, train_planes)

    COUNTERS = GANModule.COUNTERS + ("shading_calls",)

    def build_networks(self, G2d, D2d):
        a = self._gmpi_args
        token_depths = (self.preset.normalized_plane_depths(a["train_planes"]).tolist()
                        if alpha_branch(a["alpha_mode"]).uses_tokens else None)
        G = GMPIGenerator.from_stylegan2(G2d, alpha_mode=a["alpha_mode"], pos_enc_multires=a["pos_enc_multires"],
                                         n_train_planes=a["train_planes"], token_depths=token_depths,
                                         alpha_init_gain=a["alpha_init_gain"], alpha_init_logit=a["alpha_init_logit"],
                                         alpha_depth_slope=a["alpha_depth_slope"],
                                         alpha_depth_center=a["alpha_depth_center"])
        if a["pose_conditioning"]:
            D = PoseConditionedDiscriminator.from_stylegan2(D2d, mbstd_group_size=a["mbstd_group_size"],
                                                            pose_init=a["d_pose_init"])
        else:  # ablation: unconditional D (still with the GMPI mbstd group)
            D = copy.deepcopy(D2d)
            D.b4.mbstd.group_size = a["mbstd_group_size"]
        return G.train().requires_grad_(True), D.train().requires_grad_(True)

    @property
    def scene(self) -> Scene:
        """Preset + training planes on this module's device."""
        self._scene = self._scene.to(self.device)
        return self._scene

    def export(self, path: str | Path) -> Path:
        from .io import save_gmpi_checkpoint

        extra = {"iteration": self.iteration, "kimg": self.nimg / 1000}
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(getattr(dm, "hparams", {}).get("data"), str):
            extra["data"] = dm.hparams["data"]  # the training shards: `gmpi evaluate`'s default --data
        return save_gmpi_checkpoint(path, self.G_ema, preset=self.preset.to_dict(), D=self.D, extra=extra)

    # -------------------------------------------------------------------------------------------- fakes
    def sample_condition(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n cameras (c2w) from the preset's prior."""
        return self.scene.sample_cameras(n, generator)

    def shade(self, mpi: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Shading augmentation of fake MPIs after ``shading_start`` iterations (counts calls, as the official)."""
        hp = self.hparams
        if not hp.shading or self.iteration < hp.shading_start:  # official: 1-based step > start
            return mpi
        self.shading_calls += 1
        ka, kd = shading_coefficients(self.shading_calls, SHADING["max_ka"], SHADING["max_kd"], hp.shading_grow,
                                      hp.shading_schedule)
        yaw, pitch = sample_light(mpi.shape[0], SHADING["light_yaw_mean"], SHADING["light_yaw_std"],
                                  SHADING["light_pitch_mean"], SHADING["light_pitch_std"],
                                  SHADING["light_n_truncated_stds"], generator=generator)
        light = light_direction(yaw, pitch, self.preset.sphere_center_z, self.preset.sphere_r).to(mpi)
        self._last_shading = ka + kd
        planes = self.scene.planes
        return shade_mpi(mpi, planes.depths, planes.extents, light, ka, kd, SHADING["blur_ksize"])

    def render(self, mpi: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
        """RGB in [-1, 1] at the training resolution. No value checks: the loop's own MPIs and prior cameras."""
        return self.scene.render(mpi, c2w, validate=False)["rgb"] * 2 - 1

    def fake_images(self, G, z, cond, noise=None, shade: bool = True, noise_mode: str = "random") -> torch.Tensor:
        mpi = self.scene.generate(G, z, noise_mode=noise_mode, noise_generator=noise)
        return self.render(self.shade(mpi, noise) if shade else mpi, cond)

    def d_condition(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        if cond is None or not self.hparams.pose_conditioning:
            return None
        return cameras.flatten_w2c(cond)

    def real_condition(self, batch: dict) -> torch.Tensor | None:
        return batch["w2c"] if self.hparams.pose_conditioning else None

    def g_condition(self, z: torch.Tensor) -> torch.Tensor:
        return self.select_views(z)

    @torch.no_grad()
    def select_views(self, z: torch.Tensor) -> torch.Tensor:
        """Per z, the pose (of views_per_z prior poses) with the lowest D logit: c2w B x 4 x 4. Scored view by view:
        on a CPU, 4 D calls of B images take 25 % less time than one call of 4B (measured at 32 px, B = 8)."""
        n, b = self.hparams.views_per_z, z.shape[0]
        c2w = self.sample_condition(b * n, self.rng).reshape(b, n, 4, 4)
        if self.hparams.view_selection == "random" or n == 1:
            return c2w[:, 0]
        mpi = self.scene.generate(self.G, z, noise_mode="random", noise_generator=self.rng)
        logits = torch.stack([self.D(self.render(mpi, c2w[:, k]), self.d_condition(c2w[:, k]))[:, 0]
                              for k in range(n)], dim=1)  # B x n
        return c2w[torch.arange(b, device=c2w.device), logits.argmin(dim=1)]

    def extra_logs(self) -> dict:
        return {"shading": float(self._last_shading)}


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory of this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
