"""Read NVlabs StyleGAN2-ADA network pickles without executing the code they embed (docs/RENDER.md).

A snapshot (``network-snapshot-*.pkl``: ``{G, D, G_ema, augment_pipe, training_set_kwargs}``) holds its networks as
"persistent objects" carrying their module's Python source, which NVlabs' own loader executes. Here
:class:`~.safe_pickle.RestrictedUnpickler` keeps each as a plain :class:`PersistentRecord`, and our own classes are
built from its constructor kwargs and loaded with its tensors by name. A hostile file cannot make us allocate what it
does not hold: kwargs are checked against :data:`INT_BOUNDS`, the network is built on the ``meta`` device to learn
every tensor's shape, those must equal the file's, and only then is it built for real.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..data import write_atomic
from ..nn.discriminator import Discriminator
from ..nn.synthesis import Generator
from .safe_pickle import NetworkFormatError, PersistentRecord, RestrictedUnpickler, UnsafePickleError, plain

FORMAT = "gmpi-lightning/stylegan2-ada"
FORMAT_VERSION = 1
NETWORK_KEYS = ("G", "D", "G_ema")

# Top-level network classes we can rebuild, and every sub-module class name NVlabs uses inside them.
NETWORK_CLASSES: dict[str, type[nn.Module]] = {"Generator": Generator, "Discriminator": Discriminator}
KNOWN_SUBMODULES = {"MappingNetwork", "FullyConnectedLayer", "SynthesisNetwork", "SynthesisBlock", "SynthesisLayer",
                    "ToRGBLayer", "Conv2dLayer", "DiscriminatorBlock", "DiscriminatorEpilogue", "MinibatchStdLayer"}

# Sane bounds on constructor kwargs, checked (at any nesting depth) before anything is built. The largest released
# configurations sit well inside: StyleGAN2/3 at 1024 px (channel_base 32768-65536, channel_max 512-1024, 8 mapping
# layers, 4 fp16 resolutions), GMPI with 96 planes. A name not listed is left to the constructor to refuse.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "img_resolution": (4, 4096), "img_channels": (1, 16), "z_dim": (0, 4096), "w_dim": (1, 4096),
    "c_dim": (0, 65536), "channel_base": (1, 1 << 18), "channel_max": (1, 2048), "num_fp16_res": (0, 12),
    "num_layers": (1, 32), "embed_features": (0, 4096), "layer_features": (0, 4096), "cmap_dim": (0, 4096),
    "mbstd_group_size": (0, 1024), "mbstd_num_channels": (0, 64), "num_ws": (1, 64),
    "n_train_planes": (1, 1024), "pos_enc_multires": (0, 32), "gen_alpha_largest_res": (0, 1 << 13),
    "depth2alpha_n_z_bins": (1, 1 << 16),
}


def _record_tensors(record: PersistentRecord, where: str, prefix: str = "") -> dict[str, torch.Tensor]:
    if record.class_name not in KNOWN_SUBMODULES and record.class_name not in NETWORK_CLASSES:
        raise NetworkFormatError(f"{where}: unknown network class {record.class_name!r} at '{prefix or '<root>'}'")
    state = record.state
    out: dict[str, torch.Tensor] = {}
    skip = state.get("_non_persistent_buffers_set", ())
    skip = set(skip) if isinstance(skip, (set, frozenset, list, tuple)) else set()
    for group in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(group, {}), dict):
            raise NetworkFormatError(f"{where}: '{prefix}{group}' is a {type(state[group]).__name__}, expected a dict")
    for group in ("_parameters", "_buffers"):
        for name, t in state.get(group, {}).items():
            if t is None or name in skip:
                continue
            if not isinstance(t, (torch.Tensor, np.ndarray)):
                raise NetworkFormatError(f"{where}: '{prefix}{name}' is a {type(t).__name__}, not a tensor")
            out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t))
    for name, child in state.get("_modules", {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise NetworkFormatError(f"{where}: sub-module '{prefix}{name}' is a {type(child).__name__}, "
                                     f"not a network record")
        out.update(_record_tensors(child, where, f"{prefix}{name}."))
    return out


def check_network_kwargs(kwargs: dict, where: str, path: str = "") -> None:
    """Refuse constructor kwargs outside :data:`INT_BOUNDS` (at any nesting depth) before anything is built."""
    if not isinstance(kwargs, dict):
        raise NetworkFormatError(f"{where}: constructor kwargs{' ' + path if path else ''} are a "
                                 f"{type(kwargs).__name__}, expected a dict")
    for key, value in kwargs.items():
        name = f"{path}.{key}" if path else str(key)
        if isinstance(value, dict):
            check_network_kwargs(value, where, name)
        elif key in INT_BOUNDS and value is not None:
            lo, hi = INT_BOUNDS[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise NetworkFormatError(f"{where}: {name}={value!r} is outside the supported range [{lo}, {hi}]; "
                                         f"refusing to build the network (nothing was allocated)")
            if key == "img_resolution" and value & (value - 1):
                raise NetworkFormatError(f"{where}: img_resolution={value} is not a power of two")


class _MetaValueChecks(TorchDispatchMode):
    """Meta tensors have shapes but no values, so a constructor's value check (``bool((d[1:] <= d[:-1]).any())``)
    cannot run on them: it reads False / 0 here, and runs for real when the network is built."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].is_meta:
            return False if args[0].dtype == torch.bool else 0
        return func(*args, **(kwargs or {}))


def probe_network(cls: type[nn.Module], init_kwargs: dict, where: str) -> nn.Module:
    """``cls(**init_kwargs)`` on the meta device (shapes only, no memory), after :func:`check_network_kwargs`."""
    check_network_kwargs(init_kwargs, where)
    try:
        with torch.device("meta"), _MetaValueChecks():
            return cls(**init_kwargs)
    except Exception as e:
        raise NetworkFormatError(f"{where}: {cls.__name__} kwargs {init_kwargs} are not supported: "
                                 f"{type(e).__name__}: {e}") from e


def check_tensors_match(probe: nn.Module, state_dict: dict, where: str) -> None:
    """The tensors of a file must be exactly those of the network its kwargs describe, shapes included."""
    if not isinstance(state_dict, dict):
        raise NetworkFormatError(f"{where}: the state dict is a {type(state_dict).__name__}, expected a dict")
    own = probe.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise NetworkFormatError(f"{where}: tensors do not match a {type(probe).__name__} built from its kwargs: "
                                 f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise NetworkFormatError(f"{where}: {k} is a {type(t).__name__}, not a tensor")
        if own[k].shape != t.shape:
            raise NetworkFormatError(f"{where}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")


def build_checked(cls: type[nn.Module], init_kwargs: dict, state_dict: dict, where: str) -> nn.Module:
    """``cls(**init_kwargs)`` loaded with ``state_dict`` (eval, no grad), built only once the kwargs are in bounds
    and the tensors match the shapes they imply: what it allocates is the size of the tensors already read."""
    check_tensors_match(probe_network(cls, init_kwargs, where), state_dict, where)
    net = cls(**init_kwargs)
    net.load_state_dict({k: t.to(torch.float32) for k, t in state_dict.items()}, strict=True)
    return net.eval().requires_grad_(False)


def _network_class(class_name: str, where: str) -> type[nn.Module]:
    cls = NETWORK_CLASSES.get(class_name) if isinstance(class_name, str) else None
    if cls is None:
        raise NetworkFormatError(f"{where}: unknown network class {class_name!r}; supported: {sorted(NETWORK_CLASSES)}")
    return cls


def _network_from_record(record: PersistentRecord, where: str) -> tuple[nn.Module, dict]:
    if not isinstance(record, PersistentRecord):
        raise NetworkFormatError(f"{where} is a {type(record).__name__}, not a StyleGAN2-ADA network record")
    state = record.state
    kwargs, args = state.get("_init_kwargs", {}), state.get("_init_args", ())
    if not isinstance(kwargs, dict) or not isinstance(args, (list, tuple)):
        raise NetworkFormatError(f"{where}: _init_kwargs / _init_args are a {type(kwargs).__name__} / "
                                 f"{type(args).__name__}, expected a dict and a tuple")
    kwargs, args, cls = plain(dict(kwargs)), list(args), _network_class(record.class_name, where)
    if args:  # positional constructor arguments -> keywords, so the converted file is self-describing
        try:
            kwargs = dict(inspect.signature(cls).bind_partial(*plain(args), **kwargs).arguments)
        except TypeError as e:
            raise NetworkFormatError(f"{where}: constructor arguments not understood: {e}") from e
    net = build_checked(cls, kwargs, _record_tensors(record, where), where)
    return net, {"class_name": record.class_name, "init_kwargs": kwargs}


def require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. Nothing is downloaded; pass the path of a local copy.")


def load_tagged(path: Path, fmt: str, what: str) -> dict:
    """A file this package wrote with ``torch.save``: a dict of plain data whose ``format`` is ``fmt``, read without
    running code; otherwise :class:`NetworkFormatError` naming the file."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NetworkFormatError(f"{path}: not a readable {what} ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict) or blob.get("format") != fmt:
        raise NetworkFormatError(f"{path}: not a '{fmt}' {what}")
    return blob


def load_stylegan2_pkl(path: str | Path) -> dict[str, Any]:
    """An NVlabs StyleGAN2-ADA pickle (or our converted ``.pt``), loaded safely: ``{'G', 'D', 'G_ema'}`` (our modules
    in eval mode, those in the file), ``'training_set_kwargs'`` (dict or None) and ``'kwargs'`` (per network: class
    name and constructor kwargs)."""
    path = Path(path)
    require_file(path, "StyleGAN2 network file")
    with open(path, "rb") as f:
        if f.read(4).startswith(b"PK"):  # a torch.save zip: our converted format
            return _load_converted(path)
        f.seek(0)
        try:
            data = RestrictedUnpickler(f, str(path)).load()
        except (UnsafePickleError, NetworkFormatError) as e:
            if str(path) in str(e):
                raise
            raise type(e)(f"{path}: {e}") from e
        except Exception as e:  # truncated / not a pickle
            raise NetworkFormatError(f"{path}: not a readable network pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not any(k in data for k in NETWORK_KEYS):
        raise NetworkFormatError(f"{path}: expected a dict with any of {NETWORK_KEYS}; got "
                                 f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    out: dict[str, Any] = {"training_set_kwargs": plain(data.get("training_set_kwargs")), "kwargs": {}}
    for key in NETWORK_KEYS:
        if data.get(key) is not None:
            out[key], out["kwargs"][key] = _network_from_record(data[key], f"{path}[{key}]")
    return out


def _load_converted(path: Path) -> dict[str, Any]:
    blob = load_tagged(path, FORMAT, "converted network file (written by `gmpi import-stylegan2`)")
    if blob.get("version") != FORMAT_VERSION:
        raise NetworkFormatError(f"{path}: format version {blob.get('version')} is not supported")
    out: dict[str, Any] = {"training_set_kwargs": blob.get("training_set_kwargs"), "kwargs": {}}
    networks = blob.get("networks")
    if not isinstance(networks, dict) or not all(isinstance(e, dict) for e in networks.values()):
        raise NetworkFormatError(f"{path}: 'networks' must map names to dicts of class_name, init_kwargs, state_dict")
    for key, entry in networks.items():
        where = f"{path}[{key}]"
        out[key] = build_checked(_network_class(entry.get("class_name"), where), entry.get("init_kwargs"),
                                 entry.get("state_dict"), where)
        out["kwargs"][key] = {"class_name": entry["class_name"], "init_kwargs": entry["init_kwargs"]}
    return out


def save_converted(loaded: dict[str, Any], out_path: str | Path) -> Path:
    """Write what :func:`load_stylegan2_pkl` returned as a ``weights_only``-loadable file."""
    networks = {
        key: {**loaded["kwargs"][key], "state_dict": {k: v.clone() for k, v in loaded[key].state_dict().items()}}
        for key in NETWORK_KEYS if key in loaded
    }
    blob = {"format": FORMAT, "version": FORMAT_VERSION, "training_set_kwargs": loaded.get("training_set_kwargs"),
            "networks": networks}
    return write_atomic(out_path, lambda tmp: torch.save(blob, tmp))  # never half a file under the final name
