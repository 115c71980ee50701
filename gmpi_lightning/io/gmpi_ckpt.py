"""Released GMPI checkpoints (apple/ml-gmpi) and our own GMPI checkpoint format.

Official runs write ``generator.pth`` (a state dict), ``ema.pth`` (torch_ema: a list of shadow parameters in
parameter order) and ``config.pth`` (a pickled yacs config). The state dicts are read with ``weights_only=True``, the
config with a restricted unpickler that rebuilds dict-like config nodes and nothing else. The architecture is
inferred from the tensors; the config (or an equivalent dict / JSON) supplies the alpha-branch switches.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..data import write_atomic
from ..nn.discriminator import Discriminator, PoseConditionedDiscriminator
from ..nn.gmpi import GMPIGenerator
from .safe_pickle import NetworkFormatError, UnsafePickleError, plain
from .stylegan2_pkl import build_checked, check_tensors_match, load_tagged, probe_network, require_file

GMPI_FORMAT = "gmpi-lightning/gmpi"
GMPI_FORMAT_VERSION = 1

# official Generator kwarg -> ours (docs/METHOD.md §3)
_OFFICIAL_TO_OURS = {
    "pos_enc_multires": "pos_enc_multires", "gen_alpha_largest_res": "gen_alpha_largest_res",
    "torgba_sep_background": "separate_background", "build_background_from_rgb_ratio": "background_ratio",
    "background_alpha_full": "background_alpha_full", "G_final_img_act": "final_activation",
    "depth2alpha_z_range": "depth2alpha_z_range", "depth2alpha_n_z_bins": "depth2alpha_n_z_bins",
    "n_gen_planes": "n_train_planes", "n_planes": "n_train_planes",
}


class _ConfigNode(dict):
    """Stand-in for yacs ``CfgNode`` (a dict subclass): keeps items and ignores instance attributes."""

    def __setstate__(self, state):
        pass


class _ConfigUnpickler(pickle.Unpickler):
    _ALLOWED = {  # the only globals a config may name
        ("yacs.config", "CfgNode"): _ConfigNode, ("collections", "OrderedDict"): dict, ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset, ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        raise UnsafePickleError(f"config: refusing global '{module}.{name}'; a GMPI config may only hold "
                                f"config nodes and plain values (nothing was executed)")


class _ConfigPickleModule:
    """``pickle_module`` for torch.load: every unpickling it does (the zip container's data.pkl, and the legacy
    format's header records) goes through the restricted unpickler."""

    Unpickler = _ConfigUnpickler

    @staticmethod
    def load(file, **kwargs):
        return _ConfigUnpickler(file, **kwargs).load()


def read_official_config(path: str | Path) -> dict:
    """``config.pth`` (pickled yacs tree, zip or legacy) or a JSON file -> nested plain dicts."""
    path = Path(path)
    require_file(path, "GMPI config")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    try:  # torch.save containers (zip or legacy), then a plain pickle
        obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_ConfigPickleModule)
    except UnsafePickleError:
        raise
    except Exception:
        try:
            with open(path, "rb") as f:
                obj = _ConfigUnpickler(f).load()
        except UnsafePickleError:
            raise
        except Exception as e:
            raise NetworkFormatError(f"{path}: not a readable GMPI config ({type(e).__name__}: {e})") from e
    return plain(obj)


def _find_keys(tree: Any, wanted: set[str], out: dict) -> dict:
    """Collect the first occurrence of each wanted key anywhere in a nested dict (yacs trees nest them)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k in wanted and k not in out and not isinstance(v, dict):
                out[k] = v
        for v in tree.values():
            _find_keys(v, wanted, out)
    return out


def gmpi_kwargs_from_config(config: dict) -> dict:
    """Our alpha-branch kwargs from an official config: the constructor kwargs, fixture-style JSON
    (``{'generator': {'kwargs': ...}}``) or a full yacs tree."""
    if "generator" in config and isinstance(config["generator"], dict):
        config = config["generator"].get("kwargs", config["generator"])
    wanted = set(_OFFICIAL_TO_OURS) | {"torgba_cond_on_pos_enc", "torgba_cond_on_pos_enc_embed_func",
                                       "cond_on_pos_enc_only_alpha", "build_background_from_rgb"}
    found = _find_keys(config, wanted, {})
    kwargs = {_OFFICIAL_TO_OURS[k]: v for k, v in found.items() if k in _OFFICIAL_TO_OURS}
    mode = found.get("torgba_cond_on_pos_enc", "normalize_add_z")
    embed = found.get("torgba_cond_on_pos_enc_embed_func", "modulated_lrelu")
    modes = {"normalize_add_z": mode, "add_z": mode, "none": "vanilla", "depth2alpha": "depth2alpha"}
    if mode not in modes:
        raise NetworkFormatError(f"alpha branch {mode!r} is not supported; supported: normalize_add_z, add_z, "
                                 f"none (vanilla), depth2alpha")
    kwargs["alpha_mode"] = modes[mode]
    if mode in ("normalize_add_z", "add_z"):  # the depth embedding: learnable tokens, or modulated_lrelu (as is)
        if embed not in ("learnable_param", "modulated_lrelu"):
            raise NetworkFormatError(f"depth embedding {embed!r} is not supported (supported: modulated_lrelu, "
                                     f"learnable_param)")
        if embed == "learnable_param":
            kwargs["alpha_mode"] = "learnable_tokens"
    for key in ("cond_on_pos_enc_only_alpha", "build_background_from_rgb"):
        if found.get(key, True) is not True:
            raise NetworkFormatError(f"official option {key}={found[key]} is not supported (the paper uses True)")
    return kwargs


def infer_backbone_kwargs(state_dict: dict[str, torch.Tensor]) -> dict:
    """StyleGAN2 constructor kwargs (resolution, dims, channels) read off a generator state dict."""
    res = sorted(int(m.group(1)) for k in state_dict if (m := re.match(r"synthesis\.b(\d+)\.conv1\.weight$", k)))
    if not res:
        raise NetworkFormatError("not a GMPI/StyleGAN2 generator state dict (no synthesis.b*.conv1.weight)")
    channels = {r: state_dict[f"synthesis.b{r}.conv1.weight"].shape[0] for r in res}
    channel_max = max(channels.values())
    base_candidates = {channels[r] * r for r in res if channels[r] < channel_max} or {channel_max * res[-1]}
    channel_base = next((b for b in sorted(base_candidates)
                         if all(min(b // r, channel_max) == channels[r] for r in res)), None)
    if channel_base is None:
        raise NetworkFormatError(f"channels per resolution {channels} do not follow min(base // res, max)")
    n_fc = len([k for k in state_dict if re.match(r"mapping\.fc\d+\.weight$", k)])
    if n_fc == 0 or any(f"mapping.fc{i}.weight" not in state_dict for i in range(n_fc)):
        raise NetworkFormatError("not a GMPI/StyleGAN2 generator state dict (mapping.fc0 ... fcN weights missing)")
    w_dim = state_dict[f"mapping.fc{n_fc - 1}.weight"].shape[0]
    c_dim = state_dict["mapping.embed.weight"].shape[1] if "mapping.embed.weight" in state_dict else 0
    embed = state_dict["mapping.embed.weight"].shape[0] if c_dim else 0
    z_dim = state_dict["mapping.fc0.weight"].shape[1] - embed
    big = res[-1] > 128  # the official rule: fp16 on 4 resolutions and clamp 256 beyond 128 px
    return dict(z_dim=z_dim, c_dim=c_dim, w_dim=w_dim, img_resolution=res[-1],
                mapping_kwargs=dict(num_layers=n_fc),
                synthesis_kwargs=dict(channel_base=channel_base, channel_max=channel_max,
                                      num_fp16_res=4 if big else 0, conv_clamp=256 if big else None))


def load_official_gmpi(generator_pth: str | Path, config: str | Path | dict | None = None,
                       backbone: dict | None = None, keep_init_buffers: bool = False) -> GMPIGenerator:
    """A released ``generator.pth`` (state dict) or ``ema.pth`` (torch_ema) -> :class:`GMPIGenerator` (eval).

    ``config``: the run's ``config.pth``, a JSON file or a dict (official constructor kwargs or a yacs tree); without
    it the paper configuration is assumed. ``ema.pth`` holds no names, so its architecture comes from ``backbone``
    kwargs, or from a ``generator.pth`` next to it, whose buffers (``w_avg``, noise constants) are used too.
    ``keep_init_buffers=True`` reproduces the official evaluation, which leaves buffers at initialisation
    (docs/FIDELITY.md: psi < 1 then truncates towards w = 0)."""
    path = Path(generator_pth)
    require_file(path, "GMPI generator checkpoint")
    cfg = config if isinstance(config, dict) else (read_official_config(config) if config else {})
    gmpi_kwargs = gmpi_kwargs_from_config(cfg)
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NetworkFormatError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    shadow = blob.get("shadow_params") if isinstance(blob, dict) else blob if isinstance(blob, list) else None
    state_dict = blob if shadow is None else None
    if shadow is not None:  # torch_ema: parameters only, in parameter order
        sibling = path.with_name("generator.pth")
        if sibling.is_file() and sibling != path:
            state_dict = torch.load(sibling, map_location="cpu", weights_only=True)
        elif backbone is None:
            raise NetworkFormatError(f"{path} is a torch_ema file (parameters without names): pass backbone= "
                                     f"kwargs or keep the run's generator.pth next to it")
    if not isinstance(state_dict, dict) and shadow is None:
        raise NetworkFormatError(f"{path}: expected a state dict or a torch_ema dict, got {type(blob).__name__}")
    # Shapes first (on the meta device, after bounds on the kwargs), memory after: a file cannot make us build
    # more than the tensors it holds.
    kwargs = {**(backbone or infer_backbone_kwargs(state_dict)), **gmpi_kwargs}
    probe = probe_network(GMPIGenerator, kwargs, f"{path} (alpha mode {kwargs.get('alpha_mode')})")
    load_buffers = state_dict is not None and not (shadow is not None and keep_init_buffers)
    if load_buffers:
        check_tensors_match(probe, state_dict, f"{path} (alpha mode {probe.alpha_mode})")
    if shadow is not None:
        shapes = [p.shape for p in probe.parameters()]
        if not isinstance(shadow, (list, tuple)) or len(shadow) != len(shapes):
            n = len(shadow) if isinstance(shadow, (list, tuple)) else type(shadow).__name__
            raise NetworkFormatError(f"{path}: {n} EMA parameters, the generator has {len(shapes)}")
        for i, (shape, s) in enumerate(zip(shapes, shadow)):
            if not isinstance(s, torch.Tensor) or s.shape != shape:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise NetworkFormatError(f"{path}: EMA parameter {i} has shape {got}, expected {tuple(shape)}")
    G = GMPIGenerator(**kwargs)
    if load_buffers:
        G.load_state_dict(state_dict)
    if shadow is not None:
        with torch.no_grad():
            for p, s in zip(G.parameters(), shadow):
                p.copy_(s)
    return G.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------- our own format
def save_gmpi_checkpoint(path: str | Path, G: GMPIGenerator, preset: dict | None = None,
                         D: torch.nn.Module | None = None, extra: dict | None = None) -> Path:
    """A plain, weights_only-loadable file: generator (and D) kwargs + state dicts + preset."""
    blob = {"format": GMPI_FORMAT, "version": GMPI_FORMAT_VERSION, "preset": preset, "extra": extra or {},
            "generator": {"init_kwargs": G.init_kwargs, "state_dict": G.state_dict()}}
    if D is not None:
        blob["discriminator"] = {"class_name": type(D).__name__, "init_kwargs": D.init_kwargs,
                                 "state_dict": D.state_dict()}
    return write_atomic(path, lambda tmp: torch.save(blob, tmp))


def load_gmpi_checkpoint(path: str | Path) -> dict[str, Any]:
    """-> {'G': GMPIGenerator (eval), 'D': discriminator or None, 'preset': dict or None, 'extra': dict}."""
    path = Path(path)
    require_file(path, "GMPI checkpoint")
    blob = load_tagged(path, GMPI_FORMAT, "checkpoint")
    nets = {k: blob[k] for k in ("generator", "discriminator") if k in blob}
    if "generator" not in nets or not all(isinstance(v, dict) for v in nets.values()):
        raise NetworkFormatError(f"{path}: 'generator' (and 'discriminator') must be dicts of init_kwargs and "
                                 f"state_dict")
    build = lambda cls, key: build_checked(cls, nets[key].get("init_kwargs"), nets[key].get("state_dict"),
                                           f"{path}[{key}]")
    G, D = build(GMPIGenerator, "generator"), None
    if "discriminator" in nets:
        classes = {c.__name__: c for c in (Discriminator, PoseConditionedDiscriminator)}
        name = nets["discriminator"].get("class_name", "PoseConditionedDiscriminator")
        if name not in classes:
            raise NetworkFormatError(f"{path}: unknown discriminator class {name!r}; expected one of {list(classes)}")
        D = build(classes[name], "discriminator").requires_grad_(True)
    return {"G": G, "D": D, "preset": blob.get("preset"), "extra": blob.get("extra")}
