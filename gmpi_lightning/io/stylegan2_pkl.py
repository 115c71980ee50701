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

A hostile file cannot make us allocate what it does not hold: constructor kwargs are checked against
:data:`INT_BOUNDS` first, the network is then built on the ``meta`` device (no memory) to learn the shape of
every tensor it needs, those shapes must equal the tensors the file carries, and only then is the real network
built. Every tensor storage must fit in the bytes that encode it.

The converted format written by :func:`save_converted` (``gmpi import-stylegan2``) is a plain
``torch.save`` of dicts, strings, numbers and tensors that ``torch.load(weights_only=True)`` reads.
"""

from __future__ import annotations

import _compat_pickle
import collections
import functools
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
from torch.utils._python_dispatch import TorchDispatchMode

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


# Sane bounds on constructor kwargs, checked (at any nesting depth) before anything is built. The largest released
# configurations sit well inside: StyleGAN2/3 at 1024 px (channel_base 32768-65536, channel_max 512-1024, 8 mapping
# layers, 4 fp16 resolutions), GMPI with 96 planes. A name not listed is left to the constructor to refuse.
MAX_RESOLUTION = 4096
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "img_resolution": (4, MAX_RESOLUTION), "img_channels": (1, 16), "z_dim": (0, 4096), "w_dim": (1, 4096),
    "c_dim": (0, 65536), "channel_base": (1, 1 << 18), "channel_max": (1, 2048), "num_fp16_res": (0, 12),
    "num_layers": (1, 32), "embed_features": (0, 4096), "layer_features": (0, 4096), "cmap_dim": (0, 4096),
    "mbstd_group_size": (0, 1024), "mbstd_num_channels": (0, 64), "num_ws": (1, 64),
    "n_train_planes": (1, 1024), "pos_enc_multires": (0, 32), "gen_alpha_largest_res": (0, 1 << 13),
    "depth2alpha_n_z_bins": (1, 1 << 16),
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


def _reconstruct_persistent_obj(meta: dict, source: str = "<pickle>") -> PersistentRecord:
    if not isinstance(meta, dict):
        raise NetworkFormatError(f"{source}: a persistent record is a {type(meta).__name__}, expected a dict")
    if meta.get("type") != "class":
        raise NetworkFormatError(f"{source}: unsupported persistent record (type {meta.get('type')!r}); "
                                 f"expected 'class'")
    if meta.get("version") != 6:
        raise NetworkFormatError(f"{source}: persistent record version {meta.get('version')!r} is not supported "
                                 f"(expected 6)")
    name, state = meta.get("class_name"), meta.get("state")
    if not isinstance(name, str):
        raise NetworkFormatError(f"{source}: a persistent record has class_name {name!r}, expected a string")
    if not isinstance(state, dict):
        raise NetworkFormatError(f"{source}: the record of {name!r} has a {type(state).__name__} state; "
                                 f"expected a dict of module attributes")
    return PersistentRecord(class_name=name, state=state, version=meta["version"],
                            extra={k: v for k, v in meta.items() if k not in ("state", "module_src")})


_STORAGE_ITEM_BYTES = {"FloatStorage": 4, "DoubleStorage": 8, "HalfStorage": 2, "BFloat16Storage": 2,
                       "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
                       "BoolStorage": 1, "UntypedStorage": 1}


class _StorageHeaderReader(pickle.Unpickler):
    """Reads the declared storage sizes of a legacy ``torch.save`` blob, so that a blob cannot ask
    ``torch.load`` to allocate more than it holds."""

    def __init__(self, file):
        super().__init__(file)
        self.declared: list[tuple[str, int]] = []

    def find_class(self, module, name):
        if module == "torch" and name in _STORAGE_ITEM_BYTES:
            return name
        raise UnsafePickleError(f"refusing global '{module}.{name}' in a tensor storage")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[4], int)):
            raise NetworkFormatError(f"unexpected storage record {pid!r}")
        self.declared.append((pid[1], pid[4]))


def _load_storage_from_bytes(b: bytes):
    reader = _StorageHeaderReader(io.BytesIO(b))
    try:
        for _ in range(4):  # magic number, protocol version, system info, the storage record
            reader.load()
    except (UnsafePickleError, NetworkFormatError):
        raise
    except Exception as e:
        raise NetworkFormatError(f"a tensor storage is not a legacy torch.save blob ({type(e).__name__}: {e})") from e
    need = sum(_STORAGE_ITEM_BYTES.get(kind, 1) * max(n, 0) for kind, n in reader.declared)
    if need > len(b):
        raise NetworkFormatError(f"a tensor storage declares {need} bytes but its blob holds {len(b)}")
    return torch.load(io.BytesIO(b), weights_only=True)


def _numpy_scalar(dtype, *args):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError("numpy object scalars are not allowed in a network pickle")
    return np._core.multiarray.scalar(dtype, *args)


class _NumericArray(np.ndarray):
    """What a pickled ndarray is rebuilt as: its state (dtype and bytes) may not hold Python objects."""

    def __setstate__(self, state):
        dtypes = [x for x in state if isinstance(x, np.dtype)] if isinstance(state, tuple) else []
        if len(dtypes) != 1 or dtypes[0].hasobject:
            raise UnsafePickleError("numpy object arrays are not allowed in a network pickle")
        super().__setstate__(state)


def _numpy_reconstruct(subtype, shape, dtype):
    if subtype is not np.ndarray or shape != (0,):  # numpy always pickles (ndarray, (0,), b'b'); data comes after
        raise UnsafePickleError(f"numpy array reconstruction ({subtype!r}, {shape!r}) is not allowed in a network "
                                f"pickle")
    try:
        dtype = np.dtype(dtype)
    except TypeError as e:
        raise UnsafePickleError(f"numpy dtype {dtype!r} is not allowed in a network pickle") from e
    if dtype.hasobject:
        raise UnsafePickleError("numpy object arrays are not allowed in a network pickle")
    return np._core.multiarray._reconstruct(_NumericArray, shape, dtype)


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
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return functools.partial(_reconstruct_persistent_obj, source=self.source)  # errors name the file
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


def _build_network(class_name: str, init_kwargs: dict, state_dict: dict[str, torch.Tensor], where: str) -> nn.Module:
    cls = NETWORK_CLASSES.get(class_name) if isinstance(class_name, str) else None
    if cls is None:
        raise NetworkFormatError(f"{where}: unknown network class {class_name!r}; supported: {sorted(NETWORK_CLASSES)}")
    return build_checked(cls, init_kwargs, state_dict, where)


def _network_from_record(record: PersistentRecord, where: str) -> tuple[nn.Module, dict]:
    if not isinstance(record, PersistentRecord):
        raise NetworkFormatError(f"{where} is a {type(record).__name__}, not a StyleGAN2-ADA network record")
    state = record.state
    kwargs, args = state.get("_init_kwargs", {}), state.get("_init_args", ())
    if not isinstance(kwargs, dict) or not isinstance(args, (list, tuple)):
        raise NetworkFormatError(f"{where}: _init_kwargs / _init_args are a {type(kwargs).__name__} / "
                                 f"{type(args).__name__}, expected a dict and a tuple")
    kwargs, args = _plain(dict(kwargs)), list(args)
    cls = NETWORK_CLASSES.get(record.class_name)
    if cls is None:
        raise NetworkFormatError(f"{where}: unknown network class {record.class_name!r}; "
                                 f"supported: {sorted(NETWORK_CLASSES)}")
    if args:  # positional constructor arguments -> keywords, so the converted file is self-describing
        try:
            kwargs = dict(inspect.signature(cls).bind_partial(*_plain(args), **kwargs).arguments)
        except TypeError as e:
            raise NetworkFormatError(f"{where}: constructor arguments not understood: {e}") from e
    net = _build_network(record.class_name, kwargs, _record_tensors(record, where), where)
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
        except (UnsafePickleError, NetworkFormatError) as e:
            if str(path) in str(e):
                raise
            raise type(e)(f"{path}: {e}") from e
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
    networks = blob.get("networks")
    if not isinstance(networks, dict) or not all(isinstance(e, dict) for e in networks.values()):
        raise NetworkFormatError(f"{path}: 'networks' must map names to dicts of class_name, init_kwargs, state_dict")
    for key, entry in networks.items():
        out[key] = _build_network(entry.get("class_name"), entry.get("init_kwargs"), entry.get("state_dict"),
                                  f"{path}[{key}]")
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
