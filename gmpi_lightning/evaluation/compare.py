"""Several generators evaluated with the same settings, side by side (``gmpi ablations``' table and figure):
:func:`check_settings` before any training, :func:`evaluate_cached` per generator (its eval.json reused when the
request matches), :func:`table_row` its line with standard errors, :func:`sample_figure` all from the same views.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from ..data import read_card, resolve_shards
from ..errors import InputError
from .reference import KINDS, TRUTH_RENDERERS

COLUMNS = ["fid", "kid", "precision", "recall", "is", "pose", "pose_yaw_slope", "depth", "depth_fd",
           "consistency_photo_l1", "consistency_depth_err", "semi_transparent", "depth_relief"]
PER_FAKE = {"pose": "pose_error", "depth": "depth_error",  # column -> per-fake stats
            **{c: c for c in ("consistency_photo_l1", "consistency_depth_err", "semi_transparent", "depth_relief")}}
IMAGE_DEFAULT = ["fid", "kid", "pr", "is"]  # the Inception metrics, in the default set when the weights are found
DEPTH_METRICS = ("depth_fd", "pose", "depth")  # need ground-truth depth in the data (the estimators train on it)


def data_has_depth(folder: str | Path) -> bool | None:
    """Whether a ``gmpi data`` folder's samples carry depth.npy (its first shard's first members); None when the
    folder, its card or that shard is not there."""
    try:
        first = Path(resolve_shards(folder)[0][0])
    except (FileNotFoundError, IndexError):
        return None
    if not first.is_file():
        return None
    with tarfile.open(first) as tar:  # a sample has at most 5 members: two whole samples seen
        return any(m.name.endswith(".depth.npy") for m, _ in zip(tar, range(12)))


def choose_metrics(requested: str | None, data: str | Path, has_depth: bool | None, synthetic: bool,
                   inception: bool) -> list[str]:
    """Parsed ``requested``, or the default for the data: with depth (``has_depth``; ``synthetic`` when the data
    is not there yet) consistency and the depth metrics (+ fid,kid,pr,is with ``inception``), else
    fid,kid,pr,is,consistency."""
    from .evaluate import parse_metrics

    if requested is None:
        if not (synthetic if has_depth is None else has_depth):
            return [*IMAGE_DEFAULT, "consistency"]
        return (IMAGE_DEFAULT if inception else []) + ["consistency", *DEPTH_METRICS]
    metrics = parse_metrics(requested)
    need, keep = [m for m in metrics if m in DEPTH_METRICS], [m for m in metrics if m not in DEPTH_METRICS]
    if need and has_depth is False:
        raise InputError(f"--metrics {','.join(need)} need ground-truth depth, but the samples of {data} have no "
                         f"depth.npy; drop them (e.g. --metrics {','.join(keep or ['fid', 'kid', 'consistency'])})")
    return metrics


def check_settings(requested: str | None, data: str, synthetic: bool, inception: str | None
                   ) -> tuple[list[str], str | None]:
    """(metrics, Inception weights or None), checked now, not after the training. The weights: ``inception``,
    $GMPI_INCEPTION_WEIGHTS or torch.hub's cache; the default metrics take fid,kid,pr,is when they are found."""
    from .evaluate import INCEPTION_METRICS
    from .inception import resolve_weights

    try:
        weights = str(resolve_weights(inception))
    except FileNotFoundError as e:
        weights, missing = None, FileNotFoundError(f"{e} (or leave fid,kid,pr,is out of --metrics)")
        if inception:
            raise missing from e
    metrics = choose_metrics(requested, data, data_has_depth(data), synthetic, weights is not None)
    if INCEPTION_METRICS & set(metrics) and weights is None:
        raise missing
    return metrics, weights if INCEPTION_METRICS & set(metrics) else None


def _identity(path: str | Path | None) -> str | None:
    return f"{Path(path).resolve()}:{Path(path).stat().st_size}-{Path(path).stat().st_mtime_ns}" if path else None


def evaluation_request(ckpt: Path, data: str, metrics: list[str], num_samples: int, planes: int, inception,
                       estimators, device: str = "cpu") -> dict:
    """What a cached evaluation of ``ckpt`` must have been computed with to be reused."""
    return {"metrics": metrics, "num_samples": num_samples, "planes": planes, "data": str(data),
            "generator": _identity(ckpt), "inception": _identity(inception), "estimators": _identity(estimators),
            "device": str(device)}


def evaluate_cached(ckpt: Path, cache: Path, data: str, metrics: list[str], num_samples: int, planes: int,
                    inception: str | None, estimators: str | None, device: str = "cpu") -> dict:
    """``gmpi evaluate``'s result for ``ckpt`` (96-plane style settings: ``planes``, batch 8), from ``cache`` when
    it answers the same request, else computed and written there."""
    want = evaluation_request(ckpt, data, metrics, num_samples, planes, inception, estimators, device)
    blob = json.loads(cache.read_text()) if cache.is_file() else None
    if blob is None or blob.get("request") != want:
        from ..inference import load_generator
        from .evaluate import evaluate
        from .fakes import FakeSettings

        print(f"evaluating {ckpt}", flush=True)
        loaded = load_generator(ckpt, device=device)
        blob = evaluate(loaded.G, loaded.preset, metrics, num_samples, data, FakeSettings(planes=planes, batch_size=8),
                        inception, estimators=estimators, device=device, show_progress=True)
        cache.write_text(json.dumps(dict(blob, request=want), indent=2))
    return blob


def reference_rows(data: str, preset, metrics: list[str], num_samples: int, planes: int, estimators: str | None,
                   cache: Path, device: str = "cpu") -> list[dict]:
    """The reference rows (:mod:`.reference`) as table rows, for data whose ground truth can be rendered (else
    none), from ``cache`` when it answers the same request."""
    if read_card(data).get("source") not in TRUTH_RENDERERS:
        return []
    want = dict(evaluation_request(Path(data) / "dataset.json", data, metrics, num_samples, planes, None, estimators,
                                   device), preset=preset.to_dict())
    blob = json.loads(cache.read_text()) if cache.is_file() else None
    if blob is None or blob.get("request") != want:
        from .evaluate import evaluate_references
        from .fakes import FakeSettings

        print(f"evaluating the reference rows of {data}", flush=True)
        blob = {"rows": evaluate_references(list(KINDS), data, preset, metrics, num_samples,
                                            FakeSettings(planes=planes, batch_size=8), estimators, device),
                "request": want}
        cache.write_text(json.dumps(blob, indent=2))
    return [{"row": f"ref_{kind}", "setting": f"reference: {KINDS[kind]}", "same_as": "", **table_row(r)}
            for kind, r in blob["rows"].items()]


def table_row(blob: dict) -> dict:
    """The table's columns ("n/a" where not measured) and ``<column>_se``: std / sqrt(n - 1) over the fakes, or the
    bootstrap error (depth FD)."""
    m, details = blob["metrics"], blob.get("details", {})
    out = {c: round(m[c], 5) if c in m else "n/a" for c in COLUMNS}
    out.update({f"{c}_se": round(d["std"] / (d["n"] - 1) ** 0.5, 5) for c, key in PER_FAKE.items()
                if (d := details.get(key) or {}).get("n", 0) > 1 and d.get("std") is not None})
    if (se := (details.get("depth_fd") or {}).get("bootstrap_se")) is not None:
        out["depth_fd_se"] = round(se, 5)
    return out


def sample_figure(ckpts: list[tuple[str, Path]], path: Path, seeds=(0, 1), yaws=(-0.4, 0.0, 0.4),
                  planes: int = 96, data: str | None = None) -> Path:
    """One labelled row per (label, generator file): RGB of each seed at each yaw, then the colour-mapped depth of
    those views; small views repeated (nearest) to 128 px. With ``data`` whose ground truth renders
    (:mod:`.reference`), two more rows: the ground truth of held-out heads at the same cameras and the MPI built
    from it (what an MPI of these planes can show)."""
    import torch

    from .. import export
    from ..inference import load_generator
    from ..sampling import Sampler
    from ..scene import Scene
    from .reference import load_truth, mpi_from_view

    n = len(seeds)

    def row(views, preset):
        pairs = [export.view_images(v, preset, b) for v in views for b in range(n)]
        return [rgb for rgb, _ in pairs] + [depth for _, depth in pairs]

    tiles, labels, preset = [], [label for label, _ in ckpts], None
    for _, ckpt in ckpts:
        loaded = load_generator(ckpt)
        sampler, preset = Sampler(loaded.G, loaded.preset, planes, resolution=loaded.G.img_resolution), loaded.preset
        with torch.no_grad():
            mpi = sampler.mpis(list(seeds))
        tiles.append(row([sampler.render(mpi, sampler.scene.camera(torch.full((n,), y), torch.zeros(n)))
                          for y in yaws], preset))
    if data is not None and preset is not None and read_card(data).get("source") in TRUTH_RENDERERS:
        truth, scene = load_truth(data, preset.resolution), Scene(preset, planes)
        gt = [truth.views(seeds, torch.full((n,), y), torch.zeros(n)) for y in yaws]
        tiles.append(row([dict(v, alpha=torch.ones_like(v["depth"])) for v in gt], preset))
        front = truth.views(seeds, torch.zeros(n), torch.zeros(n))
        mpi = mpi_from_view(front["rgb"], front["depth"], scene, preset.resolution)
        tiles.append(row([scene.render_pose(mpi, torch.full((n,), y), torch.zeros(n), resolution=preset.resolution)
                          for y in yaws], preset))
        labels += ["ref: truth", "ref: GT MPI"]
    cols = [f"s{s} yaw{y:+.1f}" for y in yaws for s in seeds]
    image, _ = export.labeled_grid(tiles, labels, cols + [c + " D" for c in cols])
    return export.save_png(path, image)
