"""A pickle reader that rebuilds tensors and NVlabs' persistent records without executing anything: only the
globals in ``_ALLOWED_GLOBALS`` resolve, persistent network objects become plain :class:`PersistentRecord` data, and
every tensor storage must fit in the bytes that encode it (:mod:`gmpi_lightning.io.stylegan2_pkl` builds networks
from what it returns)."""

from __future__ import annotations

import _compat_pickle
import collections
import functools
import io
import pickle
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch._utils

from ..errors import InputError


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references a global outside the allow-list; nothing from it was executed."""


class NetworkFormatError(InputError):
    """The file is not a StyleGAN2-ADA network we can rebuild (unknown class, kwargs or tensors)."""


@dataclass
class PersistentRecord:
    """What NVlabs' ``_reconstruct_persistent_obj`` receives, kept as data: the class name and its attribute dict."""

    class_name: str
    state: dict


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
    return PersistentRecord(class_name=name, state=state)


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


class RestrictedUnpickler(pickle.Unpickler):
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


def plain(obj):
    """EasyDict / numpy scalars / tuples -> plain Python, so kwargs save with weights_only."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj
