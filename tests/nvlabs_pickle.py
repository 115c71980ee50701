"""Write network pickles in NVlabs' persistence format from our own modules (test data only).

NVlabs pickles each network as ``torch_utils.persistence._reconstruct_persistent_obj(meta)``; this
writer produces the same opcodes and globals from our modules, so the loader can be tested on
configurations other than the shared fixture's (conditional nets, other resolutions, fp16 settings).
"""

from __future__ import annotations

import io
import pickle
import sys
import types

from torch import nn


def _install_fake_modules():
    """Modules named like NVlabs' so pickle records the same global names."""
    mods = {}
    for name in ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util"):
        mods[name] = sys.modules.get(name) or types.ModuleType(name)

    def _reconstruct_persistent_obj(meta):  # never called by the code under test
        raise AssertionError("the fake writer's reconstruct must not run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mods["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class EasyDict(dict):
        pass

    EasyDict.__module__ = "dnnlib.util"
    EasyDict.__qualname__ = "EasyDict"
    mods["dnnlib.util"].EasyDict = EasyDict
    return mods


def _easy(obj, easydict):
    if isinstance(obj, dict):
        return easydict({k: _easy(v, easydict) for k, v in obj.items()})
    return obj


class _NVPickler(pickle.Pickler):
    def __init__(self, file, init_kwargs: dict[int, dict], mods):
        super().__init__(file, protocol=4)
        self.init_kwargs, self.mods = init_kwargs, mods

    def reducer_override(self, obj):
        if isinstance(obj, nn.Module):
            state = dict(obj.__dict__)
            state["_init_args"] = ()
            state["_init_kwargs"] = _easy(self.init_kwargs.get(id(obj), {}), self.mods["dnnlib.util"].EasyDict)
            meta = dict(type="class", version=6, module_src="# source removed", class_name=type(obj).__name__,
                        state=state)
            return (self.mods["torch_utils.persistence"]._reconstruct_persistent_obj, (meta,))
        return NotImplemented


def dumps_nvlabs(snapshot: dict, init_kwargs: dict[str, dict]) -> bytes:
    """snapshot: {'G': module, 'D': module, ..., 'training_set_kwargs': dict}; init_kwargs by the same keys."""
    mods = _install_fake_modules()
    saved = {name: sys.modules.get(name) for name in mods}
    sys.modules.update(mods)
    try:
        by_id = {id(snapshot[k]): kw for k, kw in init_kwargs.items()}
        buf = io.BytesIO()
        _NVPickler(buf, by_id, mods).dump(snapshot)
        return buf.getvalue()
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod

