"""The GMPI LightningModule: phases (D main + R1, G main with worst-view selection), shading, EMA.

One iteration, as the official training loop (GMPI_SPEC §6.4):

    D step: fakes = render(G(z) [shaded after shading_start], one prior pose per z); reals with their poses;
            loss = softplus(-D(real)) + softplus(D(fake)) + R1 (gamma/2 ||grad_x D(real)||^2, every r1_every)
    G step: for fresh z, score views_per_z prior poses with the current D (no grad, no shading) and keep the
            one with the lowest logit; regenerate with gradients (in batch_split chunks), shade, render at
            that pose; loss = softplus(-D(fake)); clip; step; EMA update.

``mode="stylegan2"`` is plain 2D StyleGAN2 training (no planes, no poses) with the same phases, used
to pretrain a 2D generator where no public StyleGAN2 exists (the synthetic default data).
Networks know nothing about Lightning; everything here is orchestration.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from . import cameras
from .losses import d_logistic_loss, ema_update, g_nonsaturating_loss, r1_penalty, stylegan2_ema_beta, torch_ema_beta
from .nn.discriminator import Discriminator, PoseConditionedDiscriminator
from .nn.gmpi import GMPIGenerator
from .nn.synthesis import Generator
from .planes import preset_planes
from .presets import SHADING, get_preset
from .render import light_direction, render_mpi, sample_light, shade_mpi, shading_coefficients


class GMPIModule(pl.LightningModule):
    """GMPI fine-tuning (or 2D StyleGAN2 training) with manual optimisation.

    Args:
        preset: camera/plane/architecture constants (``gmpi_lightning.presets``).
        resolution: override the preset's resolution (the data's).
        mode: ``gmpi`` or ``stylegan2`` (2D pretraining).
        init_from: NVlabs pickle / converted .pt (StyleGAN2 weights: G_ema -> G backbone, D -> pose-conditioned D),
            or a Lightning checkpoint of this module (all weights). None: train from scratch.
        z_dim, w_dim, mapping_layers, channel_base, channel_max: architecture when not initialised from a file.
        alpha_mode, pos_enc_multires: the alpha branch (see ``GMPIGenerator``).
        alpha_init_gain, alpha_init_logit: start of the new alpha branch (official: 1, 0; see ``GMPIGenerator``).
        train_planes: planes per MPI during training (official 32).
        pose_conditioning: condition D on the flattened w2c (GMPI); False is the ablation.
        mbstd_group_size: minibatch-stddev group (GMPI 1: per-sample independent logits).
        lr, betas: Adam for G and D (official 0.002, (0, 0.9)); train_mapping: also train the mapping network.
        r1_gamma, r1_every: R1 weight and interval (official 10 every step; >1 is lazy R1 with Adam rescaling).
        grad_clip: gradient-norm clip of both networks (official 10; None disables).
        views_per_z, view_selection: G's worst-of-N views scored by D (``worst``) or one random view (``random``).
        batch_split: G step in chunks with gradient accumulation (one DDP all-reduce).
        shading, shading_schedule, shading_start, shading_grow: Lambertian shading of fake MPIs
            (schedule ``as_coded`` = official, ``ramp`` = monotone).
        ema: ``stylegan2`` (ema_kimg with rampup) or ``torch_ema`` (official: decay with warm-up).
        max_iters: stop after this many iterations (our counter; Lightning's global_step counts both optimisers).
        max_nonfinite: stop with an error after this many consecutive non-finite steps (each is skipped).
        export_path: at the end of fit, write the inference file there (``gmpi render`` reads it): the 2D
            networks in the converted StyleGAN2 format, or G_ema + D in our GMPI format.
    """

    def __init__(self, preset: str = "FFHQ256", resolution: int | None = None, mode: str = "gmpi",
                 init_from: str | None = None, z_dim: int = 512, w_dim: int = 512, mapping_layers: int = 8,
                 channel_base: int | None = None, channel_max: int | None = None,
                 alpha_mode: str = "normalize_add_z", pos_enc_multires: int = 0, alpha_init_gain: float = 1.0,
                 alpha_init_logit: float = 0.0, train_planes: int = 32,
                 pose_conditioning: bool = True, mbstd_group_size: int = 1, lr: float = 0.002,
                 betas: tuple[float, float] = (0.0, 0.9), train_mapping: bool = True, r1_gamma: float = 10.0,
                 r1_every: int = 1, grad_clip: float | None = 10.0, views_per_z: int = 4,
                 view_selection: str = "worst", batch_split: int = 1, shading: bool = True,
                 shading_schedule: str = "as_coded", shading_start: int = 1000, shading_grow: int = 1000,
                 ema: str = "stylegan2", ema_kimg: float = 10.0, ema_rampup: float | None = 0.05,
                 ema_decay: float = 0.999, max_iters: int = 5000, max_nonfinite: int = 20,
                 export_path: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        if mode not in ("gmpi", "stylegan2"):
            raise ValueError(f"mode must be 'gmpi' or 'stylegan2', got {mode!r}")
        if view_selection not in ("worst", "random"):
            raise ValueError(f"view_selection must be 'worst' or 'random', got {view_selection!r}")
        if ema not in ("stylegan2", "torch_ema"):
            raise ValueError(f"ema must be 'stylegan2' or 'torch_ema', got {ema!r}")
        self.automatic_optimization = False
        self.preset = get_preset(preset, **({"resolution": resolution} if resolution else {}))
        self.G, self.D = self._build_networks()
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        if mode == "gmpi":
            planes = preset_planes(self.preset, train_planes)
            for k in ("depths", "normalized", "extents"):
                self.register_buffer(f"plane_{k}", planes[k], persistent=False)
        # our counters (checkpointed in on_save_checkpoint)
        self.iteration, self.nimg, self.ema_updates, self.shading_calls = 0, 0, 0, 0
        self.nonfinite_in_row, self.nonfinite_total = 0, 0
        self._t_last = None

    # --------------------------------------------------------------------------------------- networks
    def _build_networks(self):
        """(G, D): from a StyleGAN2 file (GMPI: G_ema -> backbone, D -> pose-conditioned D), or from scratch."""
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
                raise ValueError(f"{init} holds no discriminator; GMPI fine-tuning starts from a pretrained D")
        else:  # from scratch (a .ckpt of this module is loaded after construction, see setup)
            synth = dict(channel_base=hp.channel_base or p.channel_base, channel_max=hp.channel_max or p.channel_max,
                         num_fp16_res=p.num_fp16_res, conv_clamp=p.conv_clamp)
            G2d = Generator(z_dim=hp.z_dim, c_dim=0, w_dim=hp.w_dim, img_resolution=p.resolution, img_channels=3,
                            mapping_kwargs=dict(num_layers=hp.mapping_layers), synthesis_kwargs=synth)
            D2d = Discriminator(c_dim=0, img_resolution=p.resolution, img_channels=3,
                                channel_base=synth["channel_base"], channel_max=synth["channel_max"],
                                num_fp16_res=p.num_fp16_res, conv_clamp=p.conv_clamp)
        if hp.mode == "stylegan2":
            return G2d.train().requires_grad_(True), D2d.train().requires_grad_(True)
        token_depths = (self.preset.normalized_plane_depths(hp.train_planes).tolist()
                        if hp.alpha_mode == "learnable_tokens" else None)
        G = GMPIGenerator.from_stylegan2(G2d, alpha_mode=hp.alpha_mode, pos_enc_multires=hp.pos_enc_multires,
                                         n_train_planes=hp.train_planes, token_depths=token_depths,
                                         alpha_init_gain=hp.alpha_init_gain, alpha_init_logit=hp.alpha_init_logit)
        if hp.pose_conditioning:
            D = PoseConditionedDiscriminator.from_stylegan2(D2d, mbstd_group_size=hp.mbstd_group_size)
        else:  # ablation: unconditional D (still with the GMPI mbstd group)
            D = copy.deepcopy(D2d)
            D.b4.mbstd.group_size = hp.mbstd_group_size
        return G.train().requires_grad_(True), D.train().requires_grad_(True)

    def on_fit_start(self) -> None:
        world, hp = self.trainer.world_size, self.hparams
        rank_zero_info(f"GMPI {hp.mode}: {self.preset.name} {self.preset.resolution}px, batch per device "
                       f"{self.trainer.datamodule.batch_size if self.trainer.datamodule else '?'} x {world} devices, "
                       f"lr {hp.lr} for G and D (no scaling with the batch), iteration {self.iteration}/{hp.max_iters}")

    def setup(self, stage: str) -> None:
        init = self.hparams.init_from
        if init and str(init).endswith(".ckpt") and not getattr(self, "_initialised_from_ckpt", False):
            state = torch.load(init, map_location="cpu", weights_only=False)["state_dict"]
            missing, unexpected = self.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if not k.startswith("plane_")]:
                raise ValueError(f"{init}: weights do not fit this model ({self.hparams.mode}); missing "
                                 f"{missing[:4]}, unexpected {unexpected[:4]}. A .ckpt initialises the same mode "
                                 f"and architecture; use the exported .pt of a StyleGAN2 run for GMPI")
            self._initialised_from_ckpt = True

    def on_train_end(self) -> None:
        """Export the inference generator next to the checkpoints: stylegan2.pt (2D) or gmpi.pt."""
        if self.hparams.export_path and self.trainer.is_global_zero:
            self.export(self.hparams.export_path)

    def export(self, path: str | Path) -> Path:
        from .io import save_converted, save_gmpi_checkpoint

        if self.hparams.mode == "stylegan2":
            nets = {"G": self.G, "D": self.D, "G_ema": self.G_ema, "training_set_kwargs": None,
                    "kwargs": {k: {"class_name": type(m).__name__, "init_kwargs": m.init_kwargs}
                               for k, m in (("G", self.G), ("D", self.D), ("G_ema", self.G_ema))}}
            return save_converted(nets, path)
        extra = {"iteration": self.iteration, "kimg": self.nimg / 1000}
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(getattr(dm, "hparams", {}).get("data"), str):
            extra["data"] = dm.hparams["data"]  # the training shards: `gmpi evaluate`'s default --data
        return save_gmpi_checkpoint(path, self.G_ema, preset=self.preset.to_dict(), D=self.D, extra=extra)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        s = checkpoint.get("gmpi_state", {})
        for k in ("iteration", "nimg", "ema_updates", "shading_calls", "nonfinite_total"):
            setattr(self, k, int(s.get(k, 0)))
        if "torch_rng" in s:
            torch.set_rng_state(s["torch_rng"])

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if getattr(self, "run_config", None):
            checkpoint["run_config"] = self.run_config  # the resolved YAML of the run (LightningCLI)
        checkpoint["generator_init_kwargs"] = self.G_ema.init_kwargs  # rebuild G_ema without the init file
        checkpoint["gmpi_state"] = {"iteration": self.iteration, "nimg": self.nimg, "ema_updates": self.ema_updates,
                                    "shading_calls": self.shading_calls, "nonfinite_total": self.nonfinite_total,
                                    "torch_rng": torch.get_rng_state()}

    def configure_optimizers(self):
        hp = self.hparams
        g_params = [p for n, p in self.G.named_parameters() if hp.train_mapping or not n.startswith("mapping.")]
        d_lr, d_betas = hp.lr, hp.betas
        if hp.r1_every > 1:  # lazy regularisation: StyleGAN2's Adam rescaling
            ratio = hp.r1_every / (hp.r1_every + 1)
            d_lr, d_betas = hp.lr * ratio, tuple(b**ratio for b in hp.betas)
        opt_g = torch.optim.Adam(g_params, lr=hp.lr, betas=tuple(hp.betas), eps=1e-8)
        opt_d = torch.optim.Adam(self.D.parameters(), lr=d_lr, betas=d_betas, eps=1e-8)
        return [opt_g, opt_d]

    # ----------------------------------------------------------------------------------------- pieces
    def sample_z(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.G.z_dim, device=self.device)

    def sample_c2w(self, n: int) -> torch.Tensor:
        yaw, pitch = cameras.sample_preset_pose(n, self.preset)
        return cameras.sphere_c2w(yaw, pitch, self.preset.sphere_center_z, self.preset.sphere_r).to(self.device)

    def generate_mpi(self, G, z: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        return G(z, None, self.plane_normalized, noise_mode=noise_mode)

    def shade(self, mpi: torch.Tensor) -> torch.Tensor:
        """Shading augmentation of fake MPIs after ``shading_start`` iterations (counts calls, as the official)."""
        hp = self.hparams
        if not hp.shading or self.iteration < hp.shading_start:  # official: 1-based step > start
            return mpi
        self.shading_calls += 1
        ka, kd = shading_coefficients(self.shading_calls, SHADING["max_ka"], SHADING["max_kd"], hp.shading_grow,
                                      hp.shading_schedule)
        yaw, pitch = sample_light(mpi.shape[0], SHADING["light_yaw_mean"], SHADING["light_yaw_std"],
                                  SHADING["light_pitch_mean"], SHADING["light_pitch_std"],
                                  SHADING["light_n_truncated_stds"])
        light = light_direction(yaw, pitch, self.preset.sphere_center_z, self.preset.sphere_r).to(mpi)
        self._last_shading = ka + kd
        return shade_mpi(mpi, self.plane_depths, self.plane_extents, light, ka, kd, SHADING["blur_ksize"])

    def render(self, mpi: torch.Tensor, c2w: torch.Tensor) -> torch.Tensor:
        """RGB in [-1, 1] at the training resolution."""
        r = self.preset.resolution
        out = render_mpi(mpi, self.plane_depths, self.plane_extents, c2w, self.preset.fov_deg, r, r)
        return out["rgb"] * 2 - 1

    def d_condition(self, c2w: torch.Tensor | None) -> torch.Tensor | None:
        if self.hparams.mode == "stylegan2" or not self.hparams.pose_conditioning:
            return None
        return cameras.flatten_w2c(c2w).to(self.device)

    def fake_images(self, G, z: torch.Tensor, c2w: torch.Tensor | None, shade: bool = True,
                    noise_mode: str = "random") -> torch.Tensor:
        if self.hparams.mode == "stylegan2":
            return G(z, None, noise_mode=noise_mode)
        mpi = self.generate_mpi(G, z, noise_mode)
        return self.render(self.shade(mpi) if shade else mpi, c2w)

    @torch.no_grad()
    def select_views(self, z: torch.Tensor) -> torch.Tensor:
        """Per z, the pose (of views_per_z prior poses) with the lowest D logit: c2w B x 4 x 4."""
        n, b = self.hparams.views_per_z, z.shape[0]
        c2w = self.sample_c2w(b * n).reshape(b, n, 4, 4)
        if self.hparams.view_selection == "random" or n == 1:
            return c2w[:, 0]
        mpi = self.generate_mpi(self.G, z)
        logits = torch.stack([self.D(self.render(mpi, c2w[:, k]), self.d_condition(c2w[:, k]))[:, 0]
                              for k in range(n)], dim=1)  # B x n
        return c2w[torch.arange(b), logits.argmin(dim=1)]

    # ------------------------------------------------------------------------------------------ phases
    def d_step(self, batch: dict, opt) -> dict:
        hp = self.hparams
        real = batch["image"].detach().requires_grad_(hp.r1_gamma > 0 and self.iteration % hp.r1_every == 0)
        c_real = batch["w2c"] if (hp.mode == "gmpi" and hp.pose_conditioning) else None
        b = real.shape[0]
        with torch.no_grad():
            c2w = self.sample_c2w(b) if hp.mode == "gmpi" else None
            fake = self.fake_images(self.G, self.sample_z(b), c2w)
        with self.toggled_optimizer(opt):
            real_logits = self.D(real, c_real)
            fake_logits = self.D(fake, self.d_condition(c2w))
            loss = d_logistic_loss(real_logits, fake_logits)
            r1 = torch.zeros((), device=self.device)
            if real.requires_grad:
                r1 = r1_penalty(real_logits, real, hp.r1_gamma) * hp.r1_every
            total = loss + r1
            ok = self._backward_step(opt, total, self.D)
        return {"loss_d": loss.detach(), "r1": r1.detach(), "logits_real": real_logits.detach().mean(),
                "logits_fake": fake_logits.detach().mean(), "ok_d": ok}

    def g_step(self, b: int, opt) -> dict:
        hp = self.hparams
        z = self.sample_z(b)
        c2w = self.select_views(z) if hp.mode == "gmpi" else None
        chunks = max(1, min(hp.batch_split, b))
        with self.toggled_optimizer(opt):
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=self.device)
            for i, idx in enumerate(torch.arange(b).chunk(chunks)):
                cam = c2w[idx] if c2w is not None else None
                logits = self.D(self.fake_images(self.G, z[idx], cam), self.d_condition(cam))
                loss = g_nonsaturating_loss(logits) / chunks
                block_sync = getattr(self.trainer.strategy, "block_backward_sync", None)
                if i < chunks - 1 and block_sync is not None:  # accumulate without an all-reduce per chunk (DDP)
                    with block_sync():
                        self.manual_backward(loss)
                else:
                    self.manual_backward(loss)
                total = total + loss.detach()
            ok = self._finish_step(opt, total, self.G)
        return {"loss_g": total, "ok_g": ok}

    def _backward_step(self, opt, loss: torch.Tensor, net) -> bool:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        return self._finish_step(opt, loss.detach(), net)

    def _finish_step(self, opt, loss: torch.Tensor, net) -> bool:
        """Clip and step, unless the loss or a gradient is non-finite: then skip, count, and stop after K in a row."""
        finite = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(p.grad).all())
                                                    for p in net.parameters() if p.grad is not None)
        if not finite:
            opt.zero_grad(set_to_none=True)
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
            if self.nonfinite_in_row >= self.hparams.max_nonfinite:
                raise FloatingPointError(f"{self.nonfinite_in_row} consecutive non-finite steps at iteration "
                                         f"{self.iteration}: lower the learning rate, check the data, or "
                                         f"resume from an earlier checkpoint")
            return False
        self.nonfinite_in_row = 0
        if self.hparams.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
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

    # ------------------------------------------------------------------------------------ Lightning
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
        logs["ema_beta"] = torch.tensor(self.update_ema(batch_total))
        self.iteration += 1
        now = time.perf_counter()
        if self._t_last is not None:
            logs["img_per_s"] = torch.tensor(batch_total / max(now - self._t_last, 1e-9))
        self._t_last = now
        logs["kimg"] = torch.tensor(self.nimg / 1000)
        logs["iteration"] = torch.tensor(float(self.iteration))
        logs["shading"] = torch.tensor(float(getattr(self, "_last_shading", 1.0)))
        logs["nonfinite_total"] = torch.tensor(float(self.nonfinite_total))
        logs["effective_batch"] = torch.tensor(float(batch_total))
        logs["peak_mem_mb"] = torch.tensor(peak_memory_mb(self.device))
        for k in ("ok_d", "ok_g"):
            logs.pop(k)
        prog = {k: logs[k] for k in ("loss_d", "loss_g", "kimg", "img_per_s") if k in logs}
        self.log_dict(prog, prog_bar=True, on_step=True, on_epoch=False, batch_size=b)
        self.log_dict({f"train/{k}": v for k, v in logs.items() if k not in prog}, on_step=True, on_epoch=False,
                      batch_size=b)
        if self.iteration >= self.hparams.max_iters:
            self.trainer.should_stop = True
        return None

    def validation_step(self, batch: dict, batch_idx: int):
        """Logits of reals and of G_ema fakes (cheap health check; FID lives in the evaluation callbacks)."""
        b = batch["image"].shape[0]
        with torch.no_grad():
            c2w = self.sample_c2w(b) if self.hparams.mode == "gmpi" else None
            fake = self.fake_images(self.G_ema, self.sample_z(b), c2w, shade=False, noise_mode="const")
            c_real = batch["w2c"] if self.d_condition(c2w) is not None else None
            real_logits = self.D(batch["image"], c_real)
            fake_logits = self.D(fake, self.d_condition(c2w))
        self.log_dict({"val/logits_real": real_logits.mean(), "val/logits_fake": fake_logits.mean(),
                       "val/loss_d": d_logistic_loss(real_logits, fake_logits)}, batch_size=b, sync_dist=True)

    test_step = validation_step

    def generator_for_inference(self):
        return self.G_ema

    def extra_repr(self) -> str:
        return f"mode={self.hparams.mode}, preset={self.preset.name}@{self.preset.resolution}px"



def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory of this process, or its peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
