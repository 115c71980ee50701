"""The training recipe's hyper-parameters, grouped in typed dataclasses that ``gmpi fit`` nests
(``--model.optim.lr``, ``--model.shading.start``; YAML ``model: {shading: {start: 1000}}``).

The flat names of earlier configs (``--model.shading_start``, ``model: {lr: ...}``) still work: :func:`migrate_argv`
rewrites them to the nested ones with one deprecation line per file or command line. :data:`FLAT_NAMES` is the one table
of old name -> new name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import InputError, warner
from .nn.discriminator import POSE_INITS
from .render import SHADING_SCHEDULES


def _one_of(name: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise InputError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise InputError(f"{name} must be >= {low}, got {value}")


@dataclass(frozen=True)
class Architecture:
    """The 2D backbone's architecture when it is not initialised from a file.

    Args:
        z_dim: latent size.
        w_dim: intermediate latent size.
        mapping_layers: layers of the mapping network.
        channel_base: StyleGAN2's channel base (None: the preset's).
        channel_max: most channels per layer (None: the preset's).
    """
    z_dim: int = 512
    w_dim: int = 512
    mapping_layers: int = 8
    channel_base: int | None = None
    channel_max: int | None = None


@dataclass(frozen=True)
class Optimisation:
    """Adam for G and D, R1 and clipping (official: lr 0.002, betas (0, 0.9), gamma 10 every step, clip 10).

    Args:
        lr: learning rate of G and D.
        betas: Adam's betas.
        train_mapping: also train the mapping network.
        r1_gamma: R1 weight; R1 runs inside the D step every ``r1_every`` iterations with weight r1_every * gamma.
        r1_every: R1 interval in iterations.
        grad_clip: total gradient-norm clip of each network (None: no clipping).
        batch_split: the G step in this many chunks with gradient accumulation (one DDP all-reduce).
    """
    lr: float = 0.002
    betas: tuple[float, float] = (0.0, 0.9)
    train_mapping: bool = True
    r1_gamma: float = 10.0
    r1_every: int = 1
    grad_clip: float | None = 10.0
    batch_split: int = 1

    def __post_init__(self):
        _at_least("optim.r1_every", self.r1_every, 1)
        _at_least("optim.batch_split", self.batch_split, 1)


@dataclass(frozen=True)
class EMA:
    """The exponential moving average of G that is exported.

    Args:
        kind: ``stylegan2`` (half-life ``kimg``, ramped up over ``rampup``) or ``torch_ema`` (official: ``decay``).
        kimg: StyleGAN2's half-life in thousands of images.
        rampup: StyleGAN2's ramp-up, a fraction of the images seen (None: none).
        decay: torch_ema's decay (with warm-up).
    """
    kind: str = "stylegan2"
    kimg: float = 10.0
    rampup: float | None = 0.05
    decay: float = 0.999

    def __post_init__(self):
        _one_of("ema.kind", self.kind, ("stylegan2", "torch_ema"))


@dataclass(frozen=True)
class Augmentation:
    """Pose-safe augmentation of every image D trains on (:mod:`.augment`, docs/SMALL_DATA.md).

    Args:
        mode: ``none`` (official), ``ada`` (StyleGAN2-ADA's adaptive p) or ``fixed`` (p stays ``p``).
        p: the probability p (ada: its start).
        ops: the transforms (translate, brightness, contrast, cutout).
        target: ada's target r_t = E[sign D(real)].
        interval: ada updates p every this many iterations.
        kimg: ada can move p from 0 to 1 in this many thousand reals.
    """
    mode: str = "none"
    p: float = 0.0
    ops: tuple[str, ...] = ("translate", "brightness", "contrast", "cutout")
    target: float = 0.6
    interval: int = 4
    kimg: float = 100.0

    def __post_init__(self):
        _one_of("augment.mode", self.mode, ("none", "ada", "fixed"))
        _at_least("augment.interval", self.interval, 1)


@dataclass(frozen=True)
class Alpha:
    """GMPI's alpha branch (:mod:`.nn.alpha`) and its start (official: gain 1, logit 0, no ramp; docs/METHOD.md §3.4).

    Args:
        mode: the branch (``normalize_add_z``: GMPI's depth-conditioned alpha with feature normalisation).
        pos_enc_multires: frequencies of the plane depth's positional encoding (0: the depth itself).
        init_gain: gain of the new alpha layer's initial weights.
        init_logit: initial alpha logit.
        depth_slope: initial logit ramp over the normalised depth (0: none).
        depth_center: normalised depth where the ramp crosses ``init_logit``.
    """
    mode: str = "normalize_add_z"
    pos_enc_multires: int = 0
    init_gain: float = 1.0
    init_logit: float = 0.0
    depth_slope: float = 0.0
    depth_center: float = 0.0


@dataclass(frozen=True)
class PoseDiscriminator:
    """GMPI's discriminator.

    Args:
        pose_conditioning: condition D on the flattened world-to-camera matrix (GMPI); False is the ablation.
        pose_init: how it starts from the pretrained D: ``official`` (the pretrained logit times a random
            pose-dependent gain, sign included) or ``pretrained_logit`` (the pretrained logit at every pose).
        mbstd_group_size: minibatch-stddev group (GMPI: 1, independent per-sample logits).
    """
    pose_conditioning: bool = True
    pose_init: str = "official"
    mbstd_group_size: int = 1

    def __post_init__(self):
        _one_of("discriminator.pose_init", self.pose_init, POSE_INITS)


@dataclass(frozen=True)
class Views:
    """The cameras of the G step.

    Args:
        per_z: prior cameras drawn per latent.
        selection: ``worst`` (the one the current D scores lowest; GMPI) or ``random`` (the first).
    """
    per_z: int = 4
    selection: str = "worst"

    def __post_init__(self):
        _one_of("views.selection", self.selection, ("worst", "random"))
        _at_least("views.per_z", self.per_z, 1)


@dataclass(frozen=True)
class Shading:
    """Lambertian shading of fake MPIs before they are rendered for D (docs/METHOD.md §4.3).

    Args:
        enabled: shade at all.
        schedule: ``as_coded`` (the official code's) or ``ramp`` (monotone).
        start: first iteration that shades.
        grow: shading calls over which the coefficients grow.
    """
    enabled: bool = True
    schedule: str = "as_coded"
    start: int = 1000
    grow: int = 1000

    def __post_init__(self):
        _one_of("shading.schedule", self.schedule, SHADING_SCHEDULES)


_warn = warner("gmpi")

GROUPS = {"arch": Architecture, "optim": Optimisation, "ema": EMA, "augment": Augmentation, "alpha": Alpha,
          "discriminator": PoseDiscriminator, "views": Views, "shading": Shading}

FLAT_NAMES = {  # old flat model option -> its nested name
    **{k: f"arch.{k}" for k in ("z_dim", "w_dim", "mapping_layers", "channel_base", "channel_max")},
    **{k: f"optim.{k}" for k in ("lr", "betas", "train_mapping", "r1_gamma", "r1_every", "grad_clip",
                                 "batch_split")},
    "ema": "ema.kind", "ema_kimg": "ema.kimg", "ema_rampup": "ema.rampup", "ema_decay": "ema.decay",
    "augment": "augment.mode", "augment_p": "augment.p", "augment_ops": "augment.ops", "ada_target": "augment.target",
    "ada_interval": "augment.interval", "ada_kimg": "augment.kimg",
    "alpha_mode": "alpha.mode", "pos_enc_multires": "alpha.pos_enc_multires", "alpha_init_gain": "alpha.init_gain",
    "alpha_init_logit": "alpha.init_logit", "alpha_depth_slope": "alpha.depth_slope",
    "alpha_depth_center": "alpha.depth_center",
    "pose_conditioning": "discriminator.pose_conditioning", "d_pose_init": "discriminator.pose_init",
    "mbstd_group_size": "discriminator.mbstd_group_size",
    "views_per_z": "views.per_z", "view_selection": "views.selection",
    "shading": "shading.enabled", "shading_schedule": "shading.schedule", "shading_start": "shading.start",
    "shading_grow": "shading.grow",
}


def group(cls: type, value, name: str):
    """``value`` as a ``cls``: itself, or built from a mapping (a checkpoint's hyper-parameters, a YAML section)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise InputError(f"model.{name} must be a mapping of {cls.__name__}'s fields, got {value!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    if set(value) - fields:
        raise InputError(f"model.{name}: unknown {sorted(set(value) - fields)}; its fields are {sorted(fields)}")
    return cls(**value)


def typed(hparams: dict) -> dict:
    """``hparams`` with every group of :data:`GROUPS` as its dataclass (:func:`group`)."""
    return {k: group(GROUPS[k], v, k) if k in GROUPS else v for k, v in hparams.items()}


def plain(value):
    """Dataclasses as dicts, tuples as lists, recursively: what checkpoints (weights_only) and loggers store."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return list(map(plain, value)) if isinstance(value, (tuple, list)) else value


def nested_option(name: str) -> str:
    """``model.lr`` (or ``model.init_args.lr``) -> ``model.optim.lr``; every other name unchanged."""
    m = re.fullmatch(r"model\.(?:init_args\.)?(\w+)", name)
    return f"model.{FLAT_NAMES[m.group(1)]}" if m and m.group(1) in FLAT_NAMES else name


def warn_renamed(where: str, renamed: dict[str, str], warn=None) -> None:
    """One line for the flat names ``where`` used (``renamed``: name -> :func:`nested_option`; the rest is skipped)."""
    renamed = {old: new for old, new in renamed.items() if old != new}
    if renamed:
        (warn or _warn)(f"{where}: flat model names are deprecated; write "
                        + ", ".join(f"{new} for {old}" for old, new in renamed.items()))


def migrate_model(section: dict, where: str, warn=None) -> dict:
    """A ``model:`` section (plain or class_path + init_args) with its flat names nested."""
    if "init_args" in section:
        return {**section, "init_args": migrate_model(section["init_args"] or {}, where, warn)}
    out, renamed = {}, {}
    for k, v in section.items():
        if k in FLAT_NAMES and not isinstance(v, dict):
            renamed[f"model.{k}"] = new = nested_option(f"model.{k}")
            grp, field = new.split(".")[1:]
            out.setdefault(grp, {})[field] = v
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    warn_renamed(where, renamed, warn)
    return out


def migrate_argv(argv: list[str], warn=None) -> list[str]:
    """``gmpi fit`` arguments with flat model names nested: ``--model.lr=x`` -> ``--model.optim.lr=x``; a
    ``--config`` file with flat ``model:`` keys is passed on as its migrated text."""
    out, renamed, rest = [], {}, list(argv)
    while rest:
        a = rest.pop(0)
        if not isinstance(a, str) or not a.startswith(("--model.", "--config")):
            out.append(a)
            continue
        name, eq, value = a[2:].partition("=")
        if not eq and rest and isinstance(rest[0], str) and not rest[0].startswith("--"):
            value, eq = rest.pop(0), "="
        if name == "config":
            out.append(f"--config={_migrated_config(value, warn) or value}")
            continue
        new = renamed[name] = nested_option(name)
        field = re.fullmatch(rf"model\.(?:init_args\.)?({'|'.join(GROUPS)})\.(\w+)", new)
        # jsonargparse refuses `--model.GROUP.FIELD=null` for a dataclass field of a subclass; the mapping form
        # sets that one field the same way
        out.append(f'--model.{field[1]}={{"{field[2]}": null}}' if field and value == "null" else f"--{new}{eq}{value}")
    warn_renamed("arguments", renamed, warn)
    return out


def _migrated_config(path: str, warn) -> str | None:
    """The text of config file ``path`` with its ``model:`` keys nested, or None when nothing is flat."""
    cfg = yaml.safe_load(Path(path).read_text()) if Path(path).is_file() else None
    if not isinstance(cfg, dict):
        return None
    before = yaml.safe_dump(cfg)
    for section in [cfg] + [cfg[s] for s in ("fit", "validate", "test") if isinstance(cfg.get(s), dict)]:
        if isinstance(section.get("model"), dict):
            section["model"] = migrate_model(section["model"], path, warn)
    after = yaml.safe_dump(cfg)
    return None if after == before else after

