"""Identity consistency, the paper's "ID" column (docs/METHOD.md §8.2, docs/EVALUATION.md), with an embedder you
supply: no ArcFace ships (it needs its own weights). Each seed is rendered from the two cameras of pose streams 0 and 1
(:mod:`.fakes`) and scored by the cosine similarity of the two embeddings; an embedder that needs aligned crops aligns
inside ``embed``, and one that finds no face returns a NaN row, counted in ``n_invalid``.

    res = identity_similarity(arcface, G, preset, seeds=range(1024))   # arcface: B x 3 x H x W in [-1, 1] -> B x d
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..estimators import summarize
from .fakes import FakeSettings, iter_fakes


@torch.no_grad()
def identity_similarity(embed: Callable[[torch.Tensor], torch.Tensor], G, preset, seeds: Iterable[int],
                        settings: FakeSettings | None = None, device="cpu") -> dict:
    """Cosine similarity between ``embed`` of the two views of each seed: summary (mean, std, n, n_invalid) plus
    the per-seed values under ``per_seed``. ``embed`` maps images B x 3 x H x W in [-1, 1] to B x d."""
    if not callable(embed):
        raise TypeError("identity_similarity needs an embedder: a callable mapping B x 3 x H x W images in [-1, 1] "
                        "to B x d embeddings (e.g. ArcFace); none ships with gmpi-lightning")
    settings = settings or FakeSettings()
    seeds = [int(s) for s in seeds]
    values = []
    for batch in iter_fakes(G, preset, seeds, settings, device, streams=(0, 1)):
        if bool(batch["nonfinite"].any()):
            bad = [s for s, f in zip(batch["seeds"], batch["nonfinite"].tolist()) if f]
            raise InputError(f"fakes {bad} hold NaN/inf: the generator is broken; no similarity would mean anything")
        a, b = (embed(v["rgb"] * 2 - 1) for v in batch["views"])
        if a.shape[0] != len(batch["seeds"]) or a.shape != b.shape:
            raise InputError(f"the embedder returned {tuple(a.shape)} and {tuple(b.shape)} for "
                             f"{len(batch['seeds'])} images; expected B x d")
        values.append(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1).cpu())
    per_seed = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
    return dict(summarize(per_seed), per_seed=dict(zip(seeds, per_seed.tolist())))
