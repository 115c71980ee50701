"""``gmpi evaluate``: every metric of a generator checkpoint in one pass over seeded fakes, written to JSON.

    gmpi evaluate --ckpt runs/synthetic/gmpi.pt --data data/synthetic32 \\
        --metrics fid,kid,consistency,depth_fd,pose,depth --num-samples 500 --out runs/synthetic/eval.json

The metrics (:data:`ALL_METRICS`), what they mean and what each needs: docs/EVALUATION.md; ``est_fd`` is the
Fréchet distance of fakes to reals in the pose estimator's features, an image-quality number without Inception.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from ..cameras import invert_rigid
from ..data import read_card, read_samples, resolve_shards
from ..errors import InputError
from ..estimators import depth_error, load_estimators, pose_error, summarize
from ..export import progress
from ..scene import generated_planes
from . import geometry
from .fakes import FakeSettings, iter_fakes, rank_seeds
from .image_metrics import fid_kid, gather_rows, inception_score, precision_recall, rank_world, real_features
from .inception import INCEPTION_FILE, InceptionFeatures, to_uint8_images
from .reference import iter_reference, load_truth, parse_names

ALL_METRICS = ("fid", "kid", "pr", "is", "consistency", "depth_fd", "pose", "depth", "est_fd")
DEPTH_POOL = 16  # depth_fd feature: 16 x 16 pooled normalised depth
INCEPTION_METRICS = {"fid", "kid", "pr", "is"}  # need the Inception weights file
NEEDS_DATA = {"fid", "kid", "pr", "depth_fd", "est_fd"}
NEEDS_ESTIMATORS = {"pose", "depth", "est_fd"}
CONSISTENCY = ("consistency_photo_l1", "consistency_depth_err", "consistency_covisible", "semi_transparent",
               "depth_relief")  # the per-fake values of the consistency metric
COLLECTS = {  # metric -> the per-fake rows it collects, and their widths
    **dict.fromkeys(("fid", "kid", "pr"), {"inception": InceptionFeatures.num_features}),
    "is": {"inception": InceptionFeatures.num_features, "logits": InceptionFeatures.num_logits},
    "consistency": dict.fromkeys(CONSISTENCY, 1), "depth_fd": {"fake_depth_features": DEPTH_POOL ** 2},
    "pose": {"pose_error": 1, "pose_pred": 2, "pose_true": 2}, "depth": {"depth_error": 1}}  # est_fd: its network's
EST_FD_REALS = 2000  # est_fd: the first reals in shard order (a fixed set, so every evaluation compares alike)


def parse_metrics(text: str | list[str]) -> list[str]:
    return parse_names(text, ALL_METRICS, "metric(s)", required=True)


def json_safe(obj):
    """``obj`` with every non-finite float replaced by None, so ``json.dumps`` writes valid JSON (null, not NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def weights_warning(weights: Path, sha256: str) -> str | None:
    """A warning when the Inception file is not torch-fidelity's (its name carries the sha256 prefix)."""
    expected = INCEPTION_FILE.rsplit("-", 1)[1].split(".")[0]
    if sha256.startswith(expected):
        return None
    return (f"the Inception weights file {weights} has sha256 {sha256[:8]}..., not {expected}... as torch-fidelity's "
            f"{INCEPTION_FILE}: its FID, KID, precision/recall and IS compare only with numbers computed with the same "
            f"file")


def resolve_estimators(estimators, metrics: list[str], device) -> tuple:
    """(pose estimator or None, depth estimator or None, info) from an estimator file (``gmpi estimators train``),
    a ``(pose, depth)`` pair or a ``{"pose": .., "depth": ..}`` dict of modules/callables (README "Pose and depth
    estimators" for the conventions)."""
    if estimators is None:
        raise InputError("pose/depth/est_fd need an estimator: `gmpi estimators train --data DATA --out EST.pt` "
                         "then --estimators EST.pt, or pass (pose_module, depth_module) to evaluate() (or drop them "
                         "from --metrics)")
    if isinstance(estimators, (str, Path)):
        pose, depth, info = load_estimators(estimators)
        info = {"file": str(estimators), **{k: v for k, v in info.items() if isinstance(v, (str, int, float, dict))}}
    else:
        pose, depth = map(estimators.get, ("pose", "depth")) if isinstance(estimators, dict) else estimators
        info = {"modules": {k: None if n is None else type(n).__name__ for k, n in (("pose", pose), ("depth", depth))}}
    for name, net in (("pose", pose), ("depth", depth)):
        if name in metrics and net is None:
            raise InputError(f"metric {name!r} was asked for but no {name} estimator was given")
    if "est_fd" in metrics and not hasattr(pose, "embed"):
        raise InputError("metric 'est_fd' reads the features of a trained PoseCNN (`gmpi estimators train`); the "
                         f"given pose estimator ({type(pose).__name__}) has no embed()")
    pose, depth = (n.to(device).eval() if isinstance(n, torch.nn.Module) else n for n in (pose, depth))
    return pose, depth, info


def real_depth_samples(data: str | Path, num: int, batch_size: int = 64) -> dict:
    """The first ``num`` samples in shard order: {'depth' N x 1 x H x W, 'c2w' N x 4 x 4}. Every rank reads the
    same samples (no rank split), so the result does not depend on the world size."""
    depth, w2c, seen = [], [], 0
    for batch in read_samples(resolve_shards(str(data))[0], batch_size):
        if "depth" not in batch:
            raise InputError(f"{data}: its samples have no depth.npy, so depth_fd cannot run (it needs ground-truth "
                             f"depth, e.g. `gmpi data synthetic`); drop depth_fd from --metrics")
        depth.append(batch["depth"])
        w2c.append(batch["w2c"])
        seen += batch["depth"].shape[0]
        if seen >= num:
            break
    if seen < num:
        raise InputError(f"{data}: depth_fd asked for {num} real samples but the data holds {seen}")
    w = torch.cat(w2c)[:num].reshape(-1, 4, 4).double()
    return {"depth": torch.cat(depth)[:num], "c2w": invert_rigid(w).float()}


@torch.no_grad()
def real_estimator_features(data: str | Path, pose_net, num: int = EST_FD_REALS, batch_size: int = 256,
                            device="cpu") -> torch.Tensor:
    """The pose estimator's features (``PoseCNN.embed``) of the first ``num`` real images in shard order (every
    rank the same ones): N x 128."""
    feats, seen = [], 0
    for batch in read_samples(resolve_shards(str(data))[0], batch_size):
        feats.append(pose_net.embed(batch["image"][: num - seen].to(device)).double().cpu())
        seen += feats[-1].shape[0]
        if seen >= num:
            break
    return torch.cat(feats)


def _nonfinite(batch: dict) -> torch.Tensor:
    """1.0 for every fake of the batch whose MPI or any rendered view holds NaN/inf, else 0.0 (length B)."""
    parts = [v[k] for v in batch["views"] for k in ("rgb", "depth", "alpha")]
    views = torch.stack([(~torch.isfinite(t)).flatten(1).any(1) for t in parts]).any(0)
    return (views | batch["nonfinite"].to(views.device)).double()


def pose_slope(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of each estimated angle on the rendering angle (N x K -> K)."""
    tc = true.double() - true.double().mean(0)
    return ((pred.double() - pred.double().mean(0)) * tc).sum(0) / (tc * tc).sum(0).clamp_min(1e-12)


@torch.no_grad()
def evaluate(G, preset, metrics: list[str], num_samples: int, data: str | Path | None = None,
             settings: FakeSettings | None = None, inception: str | Path | None = None, num_real: int | None = None,
             kid_subsets: int = 100, kid_subset_size: int = 1000, estimators: str | Path | None = None,
             cache_dir: str | Path | None = None, use_cache: bool = True, device="cpu", first_seed: int = 0,
             show_progress: bool = True, source=None) -> dict:
    """{'metrics': {name: value}, 'details', 'warnings', 'settings', 'seconds'} of generator ``G`` (an MPI generator in
    eval mode) on seeds first_seed..+num_samples, identical on every rank. ``source`` (``G`` then None) replaces its
    fakes by other pictures of the same seeds and cameras: ``(seeds, settings, device, streams, return_weights) ->``
    batches as :func:`~.fakes.iter_fakes` yields them (the reference rows of :mod:`.reference`)."""
    settings = settings or FakeSettings()
    if missing := sorted(m for m in metrics if m in NEEDS_DATA and not data):
        raise InputError(f"metrics {missing} compare with real data: pass --data (a folder written by `gmpi data`)")
    if num_samples < 2:
        raise InputError(f"--num-samples must be at least 2, got {num_samples}")
    t0 = time.time()
    rank, world = rank_world()
    extractor = InceptionFeatures(inception).to(device) if INCEPTION_METRICS & set(metrics) else None
    est = resolve_estimators(estimators, metrics, device) if NEEDS_ESTIMATORS & set(metrics) else None
    real_depth = real_depth_samples(data, num_samples) if "depth_fd" in metrics else None
    res = settings.resolution or (preset.resolution if G is None else G.img_resolution)
    seeds = rank_seeds(num_samples, rank, world, first_seed)
    streams = (0, 1) if "consistency" in metrics else (0,)
    # every rank gathers the same keys with the same widths, even a rank without seeds (num_samples < world)
    widths = {"seed": 1, "nonfinite": 1, **{k: w for m in metrics for k, w in COLLECTS.get(m, {}).items()}}
    if "est_fd" in metrics:
        widths["est_features"] = est[0].embed(torch.zeros(1, 3, res, res, device=device)).shape[1]
    if {"fid", "kid", "pr"} & set(metrics) and data is not None:
        real_res = read_card(data).get("resolution")
        if real_res and real_res != res:
            raise InputError(f"FID/KID/PR would compare {res}px fakes with {real_res}px reals from {data}; render at "
                             f"the data's resolution (--resolution {real_res}) or use data made at {res}px")
    acc: dict[str, list[torch.Tensor]] = {k: [] for k in widths}

    def add(**values):
        for name, value in values.items():
            acc[name].append(value.detach().double().cpu().reshape(value.shape[0], -1))

    bar = progress(total=len(seeds), desc="gmpi evaluate", unit="fake", disable=not show_progress or rank != 0)
    fakes = source or (lambda *a: iter_fakes(G, preset, *a))
    for batch in fakes(seeds, settings, device, streams, "consistency" in metrics):
        a = batch["views"][0]
        add(seed=torch.tensor(batch["seeds"], dtype=torch.float64), nonfinite=_nonfinite(batch))
        if extractor is not None:
            features, logits = extractor.features_and_logits(to_uint8_images(a["rgb"]))
            add(inception=features, **({"logits": logits} if "is" in metrics else {}))
        if "consistency" in metrics:
            c = geometry.two_view_consistency(a, batch["views"][1], preset.fov_deg, preset.near, preset.far)
            add(**{f"consistency_{k}": v for k, v in c.items()},
                semi_transparent=torch.zeros(len(batch["seeds"])) if a.get("weights") is None else  # a surface
                geometry.semi_transparent_fraction(a["weights"], batch["scene"].planes.depths, preset.near, preset.far),
                depth_relief=geometry.depth_relief(a, preset.fov_deg, preset.near, preset.far))
        if real_depth is not None:
            v = batch["render_at"](real_depth["c2w"][[s - first_seed for s in batch["seeds"]]].to(device))
            add(fake_depth_features=geometry.depth_features(geometry.surface_depth(v["depth"], v["alpha"]),
                                                            preset.near, preset.far, DEPTH_POOL))
        img = a["rgb"] * 2 - 1 if est is not None else None
        if "pose" in metrics:
            pred = est[0](img)
            true = torch.stack([a["yaw"], a["pitch"]], 1).to(pred)
            add(pose_error=pose_error(pred, true), pose_pred=pred, pose_true=true)
        if "depth" in metrics:
            out = est[1](img)
            add(depth_error=depth_error(out["depth"], geometry.surface_depth(a["depth"], a["alpha"]), out["mask"]))
        if "est_fd" in metrics:
            add(est_features=est[0].embed(img))
        bar.update(len(batch["seeds"]))
    bar.close()
    per = {k: gather_rows(torch.cat(v) if v else torch.zeros(0, widths[k], dtype=torch.float64))
           for k, v in acc.items()}
    order = torch.argsort(per["seed"][:, 0])  # seed order, whatever the world size (KID subsets use it)
    per = {k: v[order] for k, v in per.items()}
    broken = per.pop("seed")[per.pop("nonfinite")[:, 0] > 0, 0].long().tolist()
    if broken:  # every rank sees the gathered list, so every rank stops here
        raise InputError(f"{len(broken)} of {num_samples} fakes rendered NaN/inf (seeds {broken[:10]}"
                         f"{' ...' if len(broken) > 10 else ''}): the generator is broken (a diverged or corrupt "
                         f"checkpoint?); no metric would mean anything. Re-check the checkpoint, e.g. `gmpi render "
                         f"--seeds {broken[0]}`")
    result: dict = {"metrics": {}, "details": {}, "warnings": []}
    if extractor is not None:
        described = extractor.describe()
        if {"fid", "kid", "pr"} & set(metrics):
            real, info = real_features(data, extractor, num_real, cache_dir, use_cache=use_cache)
        if which := tuple(m for m in ("fid", "kid") if m in metrics):
            out = fid_kid(real, per["inception"], which, kid_subsets, kid_subset_size)
            result["metrics"].update({k: out[k] for k in ("fid", "kid") if k in out})
            result["details"]["fid_kid"] = dict(out, real=info, **described)
        if "pr" in metrics:
            out = precision_recall(real, per["inception"])
            result["metrics"].update(precision=out["precision"], recall=out["recall"])
            result["details"]["precision_recall"] = dict(out, real=info, **described)
        if "is" in metrics:
            out = inception_score(per["logits"])
            result["metrics"]["is"] = out["is"]
            result["details"]["inception_score"] = dict(out, **described)
        if warn := weights_warning(extractor.weights, described["weights_sha256"]):
            result["warnings"].append(warn)
    for k in CONSISTENCY if "consistency" in metrics else ():
        result["details"][k] = summarize(per[k])
        result["metrics"][k] = result["details"][k]["mean"]
    if real_depth is not None:
        real_f = geometry.depth_features(real_depth["depth"], preset.near, preset.far, DEPTH_POOL)
        result["metrics"]["depth_fd"] = geometry.frechet_distance(real_f, per["fake_depth_features"])
        result["details"]["depth_fd"] = {
            "num_real": int(real_f.shape[0]), "poses": "the real samples' cameras",
            "bootstrap_se": geometry.frechet_bootstrap_se(real_f, per["fake_depth_features"]),
            "feature": f"{DEPTH_POOL}x{DEPTH_POOL} area-pooled clip((z - near) / (far - near), 0, 1)"}
    if "est_features" in per:
        real_f = real_estimator_features(data, est[0], num_real or EST_FD_REALS, device=device)
        result["metrics"]["est_fd"] = geometry.frechet_distance(real_f, per["est_features"])
        result["details"]["est_fd"] = {"num_real": int(real_f.shape[0]),
                                       "feature": "PoseCNN.embed: conv features, image mean",
                                       "bootstrap_se": geometry.frechet_bootstrap_se(real_f, per["est_features"])}
    for k in [k for k in ("pose_error", "depth_error") if k in per]:
        result["details"][k] = summarize(per[k])
        result["metrics"][k.split("_")[0]] = result["details"][k]["mean"]
    if "pose_pred" in per:  # does the estimated pose follow the camera? 1: fully, 0: ignores it
        slope = pose_slope(per["pose_pred"], per["pose_true"])
        result["metrics"]["pose_yaw_slope"] = float(slope[0])
        result["details"]["pose_slope"] = {"yaw": float(slope[0]), "pitch": float(slope[1]), "meaning":
                                           "least-squares slope of the estimated on the rendering angle over all "
                                           "fakes: 1 = the picture turns with the camera, 0 = it ignores it"}
    if est is not None:
        result["details"]["estimators"] = est[2]
    for k, s in result["details"].items():
        if isinstance(s, dict) and s.get("n_invalid"):
            result["warnings"].append(f"{k}: {s['n_invalid']} of {s['n'] + s['n_invalid']} fakes gave no value (no "
                                      f"valid pixels: nothing opaque, co-visible or inside the estimator's mask) "
                                      f"and are left out of its mean")
    result["settings"] = dict(asdict(settings), resolution=res, num_samples=num_samples, first_seed=first_seed,
                              seeds=f"{first_seed}-{first_seed + num_samples - 1}", world_size=world,
                              num_real=num_real or "all", kid_subsets=kid_subsets, kid_subset_size=kid_subset_size,
                              latent="z_k = RandomState(k).randn(z_dim)", pose="preset prior, Generator(2k) "
                              "(second view: Generator(2k+1))",
                              planes_generated=settings.planes if G is None else generated_planes(G, settings.planes),
                              noise="random: seeded by each fake's seed" if settings.noise_mode == "random"
                              else settings.noise_mode, device=str(device), versions=_versions())
    result["seconds"] = round(time.time() - t0, 2)
    return result


def evaluate_references(kinds: list[str], data: str | Path, preset, metrics: list[str], num_samples: int,
                        settings: FakeSettings | None = None, estimators=None, device="cpu", first_seed: int = 0,
                        show_progress: bool = True) -> dict:
    """{kind: evaluate()'s result} of the reference rows (:mod:`.reference`) of ``data``, on a generator's seeds,
    cameras and planes, without the Inception metrics (their scale is known: FID 0 for the data itself)."""
    settings = settings or FakeSettings()
    truth = load_truth(data, settings.resolution or preset.resolution)
    metrics = [m for m in metrics if m not in INCEPTION_METRICS]
    return {kind: evaluate(None, preset, metrics, num_samples, data, settings, estimators=estimators, device=device,
                           first_seed=first_seed, show_progress=show_progress,
                           source=partial(iter_reference, kind, truth, preset))
            for kind in kinds}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "torchmetrics", "torch-fidelity", "gmpi-lightning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def default_inputs(metrics: list[str], data: str | None, estimators: str | None, recorded: str | None,
                   log=print) -> tuple[str | None, str | None]:
    """--data defaults to the shards the checkpoint was trained on (where it records them), --estimators to
    ``runs/estimators/<data folder name>.pt`` (what ``make estimators`` writes) when that file exists."""
    if data is None and NEEDS_DATA & set(metrics) and recorded:
        if not Path(recorded).exists():
            raise FileNotFoundError(f"metrics {sorted(NEEDS_DATA & set(metrics))} need the real data; the checkpoint "
                                    f"was trained on {recorded}, which is not here: pass --data")
        data = recorded
        log(f"--data: {data} (the checkpoint's training data)")
    if estimators is None and NEEDS_ESTIMATORS & set(metrics) and (data or recorded):
        guess = Path("runs") / "estimators" / f"{Path(data or recorded).name}.pt"
        if guess.is_file():
            estimators = str(guess)
            log(f"--estimators: {estimators}")
    return data, estimators


__all__ = ["ALL_METRICS", "INCEPTION_METRICS", "default_inputs", "evaluate", "evaluate_references", "json_safe",
           "parse_metrics", "resolve_estimators"]
