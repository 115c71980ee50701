"""Identity consistency, the paper's "ID" column (docs/METHOD.md §8.2), with an embedder you supply.

The protocol: 1024 seeds, each rendered from two independent cameras of the training prior, both images
embedded by a face-recognition network (ArcFace in the paper, through DeepFace with MTCNN alignment), score =
mean cosine similarity of the two embeddings (higher is better). ArcFace and MTCNN need their own weights (and
TensorFlow for DeepFace), which this machine does not have, so nothing here ships or fakes an embedder:
:func:`identity_similarity` renders the pairs exactly as the other metrics do (latent ``RandomState(k)``, cameras
from pose streams 0 and 1 of :mod:`.fakes`) and applies the ``embed`` callable you pass.

    from gmpi_lightning.evaluation.identity import identity_similarity
    res = identity_similarity(arcface, G, preset, seeds=range(1024))   # arcface: B x 3 x H x W in [-1, 1] -> B x d
    res["mean"], res["std"]

An embedder that needs aligned crops does its own detection/alignment inside ``embed``; one that cannot find a
face returns a NaN row, which is counted in ``n_invalid`` (never silently dropped).
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
