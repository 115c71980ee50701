"""The commands of ``gmpi``, one typed function each: ``gmpi_lightning.cli`` builds a command's flags from its
signature and the ``Args:`` of its docstring, so flags, defaults and help have one source. From Python they are plain
functions (``gmpi_lightning.commands.render.render(ckpt, out, seeds=[0, 1])``). Command-line types: :class:`Seeds`
(``0-3,7``) and :class:`Floats` (``-0.3,0,0.3``).
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from jsonargparse.typing import register_type

from ..errors import InputError

_INVOCATION = [""]


def set_invocation(text: str) -> None:
    """Record the command line being run (``gmpi_lightning.cli`` does, before calling the command)."""
    _INVOCATION[0] = text


def invocation() -> str:
    """The command line being run, as ``gmpi`` parsed it; "" when a command is called from Python."""
    return _INVOCATION[0]


class Seeds(tuple):
    """Latent seeds written as ranges and single numbers, ``0-3,7``."""


class Floats(tuple):
    """Comma-separated numbers, ``-0.3,0,0.3``."""


def parse_seeds(text) -> Seeds:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11] (a list of ints passes through)."""
    listed = isinstance(text, (list, tuple))
    seeds = [int(s) for s in text] if listed else []
    for part in [] if listed else (p.strip() for p in str(text).split(",")):
        if m := re.fullmatch(r"(\d+)-(\d+)", part):
            if int(m[2]) < int(m[1]):
                raise InputError(f"seed range {part!r} is empty")
            seeds += range(int(m[1]), int(m[2]) + 1)
        elif part.isdigit():
            seeds.append(int(part))
        else:
            raise InputError(f"cannot parse seeds {str(text)!r}: use e.g. 0-3,7")
    if twice := sorted(s for s, n in Counter(seeds).items() if n > 1):
        raise InputError(f"seeds {text!r}: {', '.join(map(str, twice))} listed more than once (each seed is one "
                         f"latent: list it once)")
    if any(s >= 2**32 or s < 0 for s in seeds):
        raise InputError(f"seeds {text!r}: a seed must be in 0 .. 2**32 - 1 (numpy's seeding draws the latent)")
    return Seeds(seeds)


def parse_floats(text) -> Floats:
    if isinstance(text, (list, tuple)):
        return Floats(float(v) for v in text)
    try:
        return Floats(float(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise InputError(f"cannot parse {text!r} as comma-separated numbers, e.g. -0.3,0,0.3") from None


register_type(Seeds, serializer=lambda s: ",".join(map(str, s)), deserializer=parse_seeds)
register_type(Floats, serializer=lambda v: ",".join(map(str, v)), deserializer=parse_floats)


FOUR_SEEDS = Seeds((0, 1, 2, 3))
YAWS, PITCHES = Floats((-0.3, 0.0, 0.3)), Floats((0.0,))


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
