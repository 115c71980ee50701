"""FID, KID (torchmetrics, fed precomputed features), precision/recall and Inception Score (torch-fidelity's ``prc``
and ``isc`` code) from one Inception pass, float64 features, real statistics computed once per dataset and cached.
Under DDP each rank extracts its share, :func:`gather_rows` collects them, and every rank computes the same numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from ..data import eval_loader, read_card, resolve_shards, write_atomic
from ..errors import InputError
from ..export import progress
from .inception import InceptionFeatures, to_uint8_images

CACHE_ENV = "GMPI_CACHE"
KID_SEED = 2020  # torch-fidelity's rng_seed (our subsets come from torch's generator, not numpy's)
PR_NEIGHBORHOOD = 3  # torch-fidelity's prc_neighborhood: k of the k-NN balls (Kynkaanniemi et al.: k = 3)
IS_SPLITS = 10  # torch-fidelity's isc_splits


def _passthrough(num_features: int) -> nn.Module:
    """An identity "extractor" that lets torchmetrics consume features we computed already."""
    net = nn.Identity()
    net.num_features = num_features
    return net


def fid_kid(real: torch.Tensor, fake: torch.Tensor, which=("fid", "kid"), kid_subsets: int = 100,
            kid_subset_size: int = 1000, seed: int = KID_SEED) -> dict:
    """FID and/or KID between two N x d feature sets (torchmetrics' estimators, float64). KID: torch-fidelity's
    defaults (100 subsets of 1000, cubic kernel), the subset size shrunk to the smaller set (``kid_subset_size``
    says so); subsets drawn by torch's seeded CPU generator, not numpy's as in torch-fidelity, so the two agree
    statistically, not digit for digit, when the subsets are smaller than the sets."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = real.double().cpu(), fake.double().cpu()
    d = real.shape[1]
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise InputError(f"FID/KID need at least 2 real and 2 fake images, got {real.shape[0]} and {fake.shape[0]}")
    out: dict = {"num_real": int(real.shape[0]), "num_fake": int(fake.shape[0])}
    if "fid" in which:
        fid = FrechetInceptionDistance(feature=_passthrough(d), sync_on_compute=False).set_dtype(torch.float64)
        fid.update(real, real=True)
        fid.update(fake, real=False)
        out["fid"] = float(fid.compute())
    if "kid" in which:
        size = min(kid_subset_size, real.shape[0], fake.shape[0])
        kid = KernelInceptionDistance(feature=_passthrough(d), subsets=kid_subsets, subset_size=size,
                                      sync_on_compute=False)
        kid.update(real, real=True)
        kid.update(fake, real=False)
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: CUDA states stay untouched
            torch.default_generator.manual_seed(seed)
            mean, std = kid.compute()
        out.update(kid=float(mean), kid_std=float(std), kid_subsets=kid_subsets, kid_subset_size=size)
    return out


def precision_recall(real: torch.Tensor, fake: torch.Tensor, neighborhood: int = PR_NEIGHBORHOOD) -> dict:
    """Improved precision and recall (k-NN manifolds) of N x 2048 fake features against real ones, by
    torch-fidelity's ``prc`` code: precision = share of fakes inside some real's ball (radius: distance to its k-th
    nearest real), recall = share of reals inside some fake's ball. float32 features, as torch-fidelity extracts
    them (ties at a ball's edge then fall as in its own runs)."""
    from torch_fidelity.metric_prc import prc_features_to_metric

    n_real, n_fake = real.shape[0], fake.shape[0]
    if min(n_real, n_fake) <= neighborhood:
        raise InputError(f"precision/recall (pr) need more than {neighborhood} real and fake images (k-NN balls, "
                         f"k = {neighborhood}); got {n_real} real and {n_fake} fake: raise --num-samples / --num-real")
    out = prc_features_to_metric(fake.float().cpu(), real.float().cpu(), prc_neighborhood=neighborhood,
                                 prc_batch_size=10000, save_cpu_ram=True, verbose=False)
    return {"precision": float(out["precision"]), "recall": float(out["recall"]), "f_score": float(out["f_score"]),
            "pr_neighborhood": neighborhood, "num_real": int(n_real), "num_fake": int(n_fake)}


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS, seed: int = KID_SEED) -> dict:
    """Inception Score of N x 1008 fake logits (Inception's ``logits_unbiased``), by torch-fidelity's ``isc`` code:
    exp(E KL(p(y|x) || p(y))) in ``splits`` chunks after a seeded shuffle; mean and std over the chunks. With fewer
    fakes than ``splits`` each chunk holds one fake and the result says so (``is_splits``)."""
    from torch_fidelity.metric_isc import isc_features_to_metric

    if logits.shape[0] < 2:
        raise InputError(f"the Inception Score needs at least 2 fakes, got {logits.shape[0]}")
    splits = min(splits, logits.shape[0])
    out = isc_features_to_metric(logits.float().cpu(), splits=splits, shuffle=True, rng_seed=seed)
    return {"is": float(out["inception_score_mean"]), "is_std": float(out["inception_score_std"]),
            "is_splits": splits, "num_fake": int(logits.shape[0])}


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (different counts allowed), in rank order; a no-op without DDP."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return local
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    n = torch.tensor([local.shape[0]], device=dev)
    counts = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, n)
    top = int(max(int(c) for c in counts))
    padded = torch.zeros((top, *local.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local.to(dev)
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts)]).to(local.device)


def rank_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def all_ranks(flag: bool) -> bool:
    """True when ``flag`` holds on every rank (a collective under DDP: every rank must call it)."""
    return bool(gather_rows(torch.tensor([[float(flag)]])).min() > 0)


def gather_keys(keys: list[str]) -> list[str]:
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return list(keys)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, list(keys))
    return [k for p in parts for k in p]


# ------------------------------------------------------------------------------------------- real statistics
def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gmpi-lightning") / "real-features"


def real_cache_key(card: dict, extractor: dict, max_images: int | None, world: int) -> str:
    """Dataset identity (the card's shard checksums and count) x feature extractor x selection."""
    ident = {"shards": sorted((s["name"], s["sha256"]) for s in card.get("shards", [])), "count": card.get("count"),
             "extractor": extractor["extractor"], "weights_sha256": extractor["weights_sha256"],
             "max_images": max_images, "world": world if max_images else None}
    if not ident["shards"]:
        raise InputError("the dataset card lists no shards with checksums; rewrite the dataset with `gmpi data`")
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def real_features(data: str | Path, extractor: InceptionFeatures, max_images: int | None = None,
                  cache_dir: str | Path | None = None, batch_size: int = 64, num_workers: int = 1,
                  use_cache: bool = True) -> tuple[torch.Tensor, dict]:
    """Inception features of the dataset's images, rows sorted by sample key (all, or the first ``max_images`` the
    ranks read: that subset depends on the world size and is keyed by it). Computed once (each rank reads its own
    shards) and cached under ``cache_dir``, keyed by the card's checksums and the extractor's weights; every rank
    takes the same path (the cache is used only when every rank sees it)."""
    card = read_card(data)
    rank, world = rank_world()
    key = real_cache_key(card, extractor.describe(), max_images, world)
    path = Path(cache_dir or default_cache_dir()) / f"{Path(data).name}-{key}.pt"
    info = {"cache": str(path), "cache_key": key, "dataset": str(data), "dataset_count": card.get("count")}
    if all_ranks(use_cache and path.is_file()):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return blob["features"].double(), dict(info, cache_hit=True)
    if world > 1:  # loader workers may not see the process group (spawned ranks): tell WebDataset the rank
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
    limit = -(-max_images // world) if max_images else None
    feats, keys, bar = [], [], progress(total=limit or -(-(card.get("count") or 0) // world) or None,
                                        desc="real features", unit="img", disable=rank != 0)
    for batch in eval_loader(resolve_shards(data)[0], batch_size, num_workers):
        imgs = to_uint8_images(batch["image"], (-1.0, 1.0))[: None if limit is None else limit - len(keys)]
        feats.append(extractor(imgs))
        keys += batch["key"][: imgs.shape[0]]
        bar.update(imgs.shape[0])
        if limit is not None and len(keys) >= limit:
            break
    bar.close()
    local = torch.cat(feats) if feats else torch.zeros(0, extractor.num_features, dtype=torch.float64)
    allf, allk = gather_rows(local), gather_keys(keys)
    allf = allf[sorted(range(len(allk)), key=allk.__getitem__)]  # a canonical row order, whatever the world size
    if max_images:
        want = min(max_images, card.get("count") or max_images)
        if allf.shape[0] < want:  # a rank's shards hold fewer than its share: never compare against fewer silently
            raise InputError(f"{data}: asked for {want} real images but the {world} process(es) read {allf.shape[0]} "
                             f"(each reads its own shards, at most {limit}); use all reals (no --num-real), fewer "
                             f"processes, or more, equal-sized shards")
        allf = allf[:max_images]
    elif card.get("count") is not None and allf.shape[0] != card["count"]:
        raise InputError(f"{data}: read {allf.shape[0]} real images but dataset.json says {card['count']}: shards "
                         f"missing or read twice; check the folder, then rerun")
    allf = allf.float().double()  # the cache stores float32: a miss returns exactly what a later hit will
    if use_cache and rank == 0:
        write_atomic(path, lambda tmp: torch.save({"features": allf.float(), "info": info,
                                                   "extractor": extractor.describe()}, tmp))
    return allf, dict(info, cache_hit=False)
