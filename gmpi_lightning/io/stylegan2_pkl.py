"""Read NVlabs StyleGAN2-ADA network pickles without executing the code they embed.

An NVlabs snapshot (``network-snapshot-*.pkl``) is a dict ``{G, D, G_ema, augment_pipe,
training_set_kwargs}`` whose networks are "persistent objects": a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` where ``meta`` carries the Python
source of the defining module (``module_src``), the class name and the attribute dict. NVlabs'
own loader *executes* that source. We never do: a restricted unpickler resolves only the handful
of globals needed to rebuild tensors and these records, the record becomes a plain
:class:`PersistentRecord`, and our own classes are built from its constructor kwargs and loaded
with its tensors by name. Anything else in the pickle (``os.system``, ``builtins.eval``, an unknown
class) is refused with an error that names it.

The converted format written by :func:`save_converted` (``gmpi import-stylegan2``) is a plain
``torch.save`` of dicts, strings, numbers and tensors that ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import _compat_pickle
import collections
import inspect
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch._utils
from torch import nn

from ..nn.discriminator import Discriminator
from ..nn.synthesis import Generator

FORMAT = "gmpi-lightning/stylegan2-ada"
FORMAT_VERSION = 1
NETWORK_KEYS = ("G", "D", "G_ema")

# Top-level network classes we can rebuild, and every sub-module class name NVlabs uses inside them.
NETWORK_CLASSES: dict[str, type[nn.Module]] = {"Generator": Generator, "Discriminator": Discriminator}
KNOWN_SUBMODULES = {
    "MappingNetwork", "FullyConnectedLayer", "SynthesisNetwork", "SynthesisBlock", "SynthesisLayer",
    "ToRGBLayer", "Conv2dLayer", "DiscriminatorBlock", "DiscriminatorEpilogue", "MinibatchStdLayer",
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list; nothing from it was executed."""


class NetworkFormatError(ValueError):
    """The file is not a StyleGAN2-ADA network we can rebuild (unknown class, kwargs or tensors)."""


@dataclass
class PersistentRecord:
    """What NVlabs' ``_reconstruct_persistent_obj`` receives, kept as data."""

    class_name: str
    state: dict
    version: int
    extra: dict = field(default_factory=dict)


class EasyDict(dict):
    """Stand-in for ``dnnlib.util.EasyDict``: a dict, attribute access only."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e


def _reconstruct_persistent_obj(meta: dict) -> PersistentRecord:
    if not isinstance(meta, dict) or meta.get("type") != "class":
        raise NetworkFormatError(f"unsupported persistent record (type {meta.get('type')!r}); expected 'class'")
    if meta.get("version") != 6:
        raise NetworkFormatError(f"persistent record version {meta.get('version')!r} is not supported (expected 6)")
    return PersistentRecord(class_name=str(meta["class_name"]), state=meta["state"], version=meta["version"],
                            extra={k: v for k, v in meta.items() if k not in ("state", "module_src")})


def _load_storage_from_bytes(b: bytes):
    return torch.load(io.BytesIO(b), weights_only=True)


def _numpy_scalar(dtype, *args):
    if dtype.hasobject:
        raise UnsafePickleError("numpy object scalars are not allowed in a network pickle")
    return np._core.multiarray.scalar(dtype, *args)


def _numpy_reconstruct(*args):
    return np._core.multiarray._reconstruct(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,  # numpy 1.x spelling (NVlabs' released pickles)
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # protocol-2 names, e.g. __builtin__
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            hint = ""
            if module.startswith("dnnlib.tflib"):
                hint = " (a TensorFlow-era pickle: convert it with NVlabs' legacy.py in a sandbox first)"
            raise UnsafePickleError(
                f"{self.source}: refusing global '{module}.{name}': a network pickle may only rebuild tensors and "
                f"StyleGAN2-ADA records; nothing from this file was executed{hint}") from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed in a network pickle ({pid!r})")


def _plain(obj):
    """EasyDict / numpy scalars / tuples -> plain Python, so kwargs save with weights_only."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _record_tensors(record: PersistentRecord, prefix: str = "") -> dict[str, torch.Tensor]:
    if record.class_name not in KNOWN_SUBMODULES and record.class_name not in NETWORK_CLASSES:
        raise NetworkFormatError(f"unknown network class {record.class_name!r} at '{prefix or '<root>'}'")
    state = record.state
    out: dict[str, torch.Tensor] = {}
    skip = set(state.get("_non_persistent_buffers_set", ()))
    for group in ("_parameters", "_buffers"):
        for name, t in state.get(group, {}).items():
            if t is not None and name not in skip:
                out[prefix + name] = t.detach() if isinstance(t, torch.Tensor) else torch.as_tensor(t)
    for name, child in state.get("_modules", {}).items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise NetworkFormatError(f"sub-module '{prefix}{name}' is a {type(child).__name__}, not a network record")
        out.update(_record_tensors(child, f"{prefix}{name}."))
    return out


def _build_network(class_name: str, init_kwargs: dict, state_dict: dict[str, torch.Tensor], where: str) -> nn.Module:
    cls = NETWORK_CLASSES.get(class_name)
    if cls is None:
        raise NetworkFormatError(f"{where}: unknown network class {class_name!r}; supported: {sorted(NETWORK_CLASSES)}")
    try:
        net = cls(**init_kwargs)
    except TypeError as e:
        raise NetworkFormatError(f"{where}: {class_name} kwargs {init_kwargs} are not supported: {e}") from e
    missing, unexpected = [], []
    own = net.state_dict()
    for k in own:
        if k not in state_dict:
            missing.append(k)
    for k in state_dict:
        if k not in own:
            unexpected.append(k)
    if missing or unexpected:
        raise NetworkFormatError(f"{where}: tensors do not match a {class_name} built from its kwargs: "
                                 f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, t in state_dict.items():
        if own[k].shape != t.shape:
            raise NetworkFormatError(f"{where}: tensor {k} has shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")
    net.load_state_dict({k: t.to(torch.float32) for k, t in state_dict.items()}, strict=True)
    return net.eval().requires_grad_(False)


def _network_from_record(record: PersistentRecord, where: str) -> tuple[nn.Module, dict]:
    if not isinstance(record, PersistentRecord):
        raise NetworkFormatError(f"{where} is a {type(record).__name__}, not a StyleGAN2-ADA network record")
    state = record.state
    kwargs = _plain(dict(state.get("_init_kwargs", {})))
    args = list(state.get("_init_args", ()))
    cls = NETWORK_CLASSES.get(record.class_name)
    if cls is None:
        raise NetworkFormatError(f"{where}: unknown network class {record.class_name!r}; "
                                 f"supported: {sorted(NETWORK_CLASSES)}")
    if args:  # positional constructor arguments -> keywords, so the converted file is self-describing
        try:
            kwargs = dict(inspect.signature(cls).bind_partial(*_plain(args), **kwargs).arguments)
        except TypeError as e:
            raise NetworkFormatError(f"{where}: constructor arguments not understood: {e}") from e
    net = _build_network(record.class_name, kwargs, _record_tensors(record), where)
    return net, {"class_name": record.class_name, "init_kwargs": kwargs}


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. Nothing is downloaded; pass the path of a local copy.")


def load_stylegan2_pkl(path: str | Path) -> dict[str, Any]:
    """Load an NVlabs StyleGAN2-ADA pickle (or our converted ``.pt``) safely.

    Returns ``{'G', 'D', 'G_ema'}`` (our modules in eval mode, those present in the file),
    ``'training_set_kwargs'`` (dict or None) and ``'kwargs'`` (per network: class name and constructor kwargs).
    """
    path = Path(path)
    _require_file(path, "StyleGAN2 network file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK"):  # a torch.save zip: our converted format
        return _load_converted(path)
    with open(path, "rb") as f:
        try:
            data = _RestrictedUnpickler(f, str(path)).load()
        except (UnsafePickleError, NetworkFormatError):
            raise
        except Exception as e:  # truncated / not a pickle
            raise NetworkFormatError(f"{path}: not a readable network pickle ({type(e).__name__}: {e})") from e
    if not isinstance(data, dict) or not any(k in data for k in NETWORK_KEYS):
        raise NetworkFormatError(f"{path}: expected a dict with any of {NETWORK_KEYS}; got "
                                 f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    out: dict[str, Any] = {"training_set_kwargs": _plain(data.get("training_set_kwargs")), "kwargs": {}}
    for key in NETWORK_KEYS:
        if data.get(key) is not None:
            out[key], out["kwargs"][key] = _network_from_record(data[key], f"{path}[{key}]")
    return out


def _load_converted(path: Path) -> dict[str, Any]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise NetworkFormatError(f"{path}: not a readable converted network file ({e})") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise NetworkFormatError(f"{path}: not a '{FORMAT}' file (written by `gmpi import-stylegan2`)")
    if blob.get("version") != FORMAT_VERSION:
        raise NetworkFormatError(f"{path}: format version {blob.get('version')} is not supported")
    out: dict[str, Any] = {"training_set_kwargs": blob.get("training_set_kwargs"), "kwargs": {}}
    for key, entry in blob["networks"].items():
        out[key] = _build_network(entry["class_name"], entry["init_kwargs"], entry["state_dict"], f"{path}[{key}]")
        out["kwargs"][key] = {"class_name": entry["class_name"], "init_kwargs": entry["init_kwargs"]}
    return out


def save_converted(loaded: dict[str, Any], out_path: str | Path) -> Path:
    """Write what :func:`load_stylegan2_pkl` returned as a ``weights_only``-loadable file."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    networks = {
        key: {**loaded["kwargs"][key], "state_dict": {k: v.clone() for k, v in loaded[key].state_dict().items()}}
        for key in NETWORK_KEYS if key in loaded
    }
    blob = {"format": FORMAT, "version": FORMAT_VERSION, "training_set_kwargs": loaded.get("training_set_kwargs"),
            "networks": networks}
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(out_path)  # never leave a half-written file under the final name
    return out_path
