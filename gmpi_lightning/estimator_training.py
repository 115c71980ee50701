"""Training and checking the small pose/depth CNNs of :mod:`gmpi_lightning.estimators` on shards with ground truth
(``gmpi estimators train|eval``); what they measure and how the numbers read is that module's docstring."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from json import dumps as json_dumps
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import file_sha256, read_samples, resolve_shards, write_atomic
from .errors import InputError
from .estimators import FORMAT, DepthCNN, PoseCNN, depth_error, load_estimators, pose_error, summarize, zscore


# ========================================================================================== data
def _split_shards(data: str | Path, val_shards: int) -> tuple[list[str], list[str], dict | None]:
    urls, card = resolve_shards(data)
    if val_shards < 1:
        raise InputError(f"val_shards must be >= 1, got {val_shards}")
    if len(urls) <= val_shards:
        raise InputError(f"{data}: {len(urls)} shard(s), but {val_shards} are held out for validation and at "
                         "least one more is needed for training; write more shards (`gmpi data ... "
                         "--samples-per-shard N`) or pass --val-data")
    return urls[:-val_shards], urls[-val_shards:], card


def load_arrays(urls: Sequence[str], input_size: int | None = None, max_samples: int | None = None,
                desc: str = "load", progress_bar: bool = True) -> dict:
    """Decode shards into memory: ``image`` uint8 N x 3 x S x S, ``depth`` float32 N x 1 x S x S, ``mask`` bool,
    ``yaw_pitch`` float32 N x 2, ``key`` list. Images are resized to ``input_size`` (area), depth/mask by nearest
    sampling. Shards without depth/mask ground truth are refused with the shard's name."""
    from .export import progress

    imgs, depths, masks, poses, keys = [], [], [], [], []
    for s in progress(read_samples(urls), desc=desc, unit="img", total=max_samples, disable=not progress_bar):
        if "depth" not in s or "mask" not in s:
            raise InputError(f"sample {s['key']} in {list(urls)[:3]}... has no depth.npy/mask.png ground truth; "
                             "estimators train on shards with ground truth (e.g. `gmpi data synthetic`)")
        imgs.append(torch.from_numpy(np.array(s["image"])).permute(2, 0, 1))
        depths.append(torch.from_numpy(np.array(s["depth"]))[None])
        masks.append(torch.from_numpy(np.ascontiguousarray(s["mask"]))[None])
        poses.append((s["yaw"], s["pitch"]))
        keys.append(s["key"])
        if max_samples is not None and len(keys) >= max_samples:
            break
    if not keys:
        raise InputError(f"no samples in {list(urls)}")
    image, depth, mask = torch.stack(imgs), torch.stack(depths), torch.stack(masks)
    if input_size is not None and image.shape[-1] != input_size:
        image = F.interpolate(image.float(), size=(input_size, input_size), mode="area").round().byte()
        depth = F.interpolate(depth, size=(input_size, input_size), mode="nearest")
        mask = F.interpolate(mask.float(), size=(input_size, input_size), mode="nearest") > 0.5
    return {"image": image, "depth": depth, "mask": mask, "yaw_pitch": torch.tensor(poses, dtype=torch.float32),
            "key": keys}


def _to_input(image_u8: torch.Tensor) -> torch.Tensor:
    return image_u8.float() / 127.5 - 1


def erode(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Binary erosion of B x 1 x H x W {0, 1} masks with a (2 pixels + 1)² square."""
    if pixels <= 0:
        return mask
    return -F.max_pool2d(-mask, 2 * pixels + 1, stride=1, padding=pixels)


def depth_target(depth: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Ground-truth depth normalised per image with the mean/std of its *foreground* (mask) pixels, applied to
    every pixel (B x 1 x H x W): the foreground is z-scored, the background keeps its (large) offset, so pixels a
    predicted mask wrongly includes still get a consistent depth."""
    b = depth.shape[0]
    return zscore(depth.reshape(b, -1).double(), mask.reshape(b, -1), eps, masked=False).float().reshape(depth.shape)


# ==================================================================================== evaluation
@torch.no_grad()
def evaluate_arrays(pose_model, depth_model, arrays: dict, batch_size: int = 256, device: str = "cpu",
                    pose_reference: torch.Tensor | None = None, depth_template: torch.Tensor | None = None) -> dict:
    """Validation metrics on in-memory ground truth (see :func:`load_arrays`): summaries of the estimators' errors
    and of baselines (predicting ``pose_reference``, default the mean of these poses; a flat depth map; the one map
    ``depth_template`` for all images, if given), the depth error over the whole ground-truth mask (silhouette
    included), mask precision (share of the predicted foreground that is true: spill onto the background is what
    hurts the metric) and coverage (share of the true foreground predicted), and the yaw/pitch rmse (radians)."""
    pose_model.eval()
    depth_model.eval()
    n = arrays["image"].shape[0]
    true = arrays["yaw_pitch"]
    ref = (true.mean(0) if pose_reference is None else torch.as_tensor(pose_reference)).reshape(1, 2)
    acc: dict[str, list[torch.Tensor]] = defaultdict(list)
    for i in range(0, n, batch_size):
        img = _to_input(arrays["image"][i:i + batch_size]).to(device)
        gt_d, gt_m = arrays["depth"][i:i + batch_size], arrays["mask"][i:i + batch_size].float()
        yp = true[i:i + batch_size]
        pred = pose_model(img).cpu()
        out = depth_model(img)
        est, est_m = out["depth"].cpu(), out["mask"].cpu()
        hard, true_m = (est_m > 0.5).flatten(1), (gt_m > 0.5).flatten(1)
        inter = (hard & true_m).sum(1).double()
        nan = torch.full_like(inter, math.nan)
        for k, v in {"pred": pred, "pose_error": pose_error(pred, yp),
                     "pose_error_mean_baseline": pose_error(ref.expand_as(yp), yp),
                     "depth_error": depth_error(est, gt_d, est_m), "depth_error_gt_mask": depth_error(est, gt_d, gt_m),
                     "depth_error_flat_baseline": depth_error(torch.zeros_like(gt_d), gt_d, est_m),
                     "mask_precision": torch.where(hard.any(1), inter / hard.sum(1).clamp_min(1), nan),
                     "mask_coverage": torch.where(true_m.any(1), inter / true_m.sum(1).clamp_min(1), nan)}.items():
            acc[k].append(v)
        if depth_template is not None:
            acc["depth_error_template_baseline"].append(depth_error(depth_template.expand_as(gt_d), gt_d, est_m))
    pred = torch.cat(acc.pop("pred"))
    s = {k: summarize(torch.cat(v)) for k, v in acc.items()}
    rmse = {f"pose_error_{a}_rmse": float(((pred[:, j] - true[:, j]) ** 2).mean().sqrt())
            for j, a in enumerate(("yaw", "pitch"))}
    return {"n_images": n, "pose_error": s.pop("pose_error"), "pose_error_mean_baseline":
            s.pop("pose_error_mean_baseline"), **rmse, **s}


def format_metrics(m: dict, label: str = "validation images") -> str:
    f = lambda k: f"{m[k]['mean']:.4f}" + (f" ({m[k]['n_invalid']} invalid)" if m[k]["n_invalid"] else "")  # noqa
    lines = [f"{label}: {m['n_images']}",
             f"pose error  (rad^2, mean over yaw/pitch): {f('pose_error')}   mean-pose baseline: "
             f"{f('pose_error_mean_baseline')}   (rmse yaw {m['pose_error_yaw_rmse']:.4f}, "
             f"pitch {m['pose_error_pitch_rmse']:.4f} rad)",
             f"depth error (z-scored MSE, estimator mask): {f('depth_error')}   flat baseline: "
             f"{f('depth_error_flat_baseline')}"
             + (f"   mean-template baseline: {f('depth_error_template_baseline')}"
                if "depth_error_template_baseline" in m else "")
             + f"   (whole ground-truth mask: {f('depth_error_gt_mask')})",
             f"mask: precision {f('mask_precision')}, coverage {f('mask_coverage')} of the ground-truth foreground"]
    return "\n".join(lines)


# ===================================================================================== training
def _card_info(data, card: dict | None, urls: list[str]) -> dict:
    """The training data's identity: the card's command and *all* its shards' checksums, and the shards trained on."""
    ident = {} if card is None else {**{k: card.get(k) for k in ("preset", "resolution", "count", "command")},
                                     "shards": [{"name": s["name"], "sha256": s.get("sha256")} for s in
                                                card.get("shards", [])]}
    return {"data": str(data), **ident, "train_shards": [Path(u).name for u in urls]}


def train_estimators(data: str | Path, out: str | Path | None = None, steps: int = 2000, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0, device: str = "cpu", val_shards: int = 1,
                     val_data: str | Path | None = None, input_size: int | None = None, pose_width: int = 16,
                     depth_width: int = 8, max_train_samples: int | None = None, max_val_samples: int | None = None,
                     bg_weight: float = 0.1, mask_erode: int = 1, progress_bar: bool = True) -> dict:
    """Train :class:`PoseCNN` and :class:`DepthCNN` on the ground truth of posed-image shards.

    Trains on every shard of ``data`` but the last ``val_shards`` (validation), or on all of it with ``val_data``.
    Losses: pose MSE on normalised yaw/pitch; depth MSE against :func:`depth_target` (foreground weight 1,
    background ``bg_weight``, so a mask spilling over the silhouette still predicts the far background there); BCE of
    the mask logit against the ground-truth mask eroded by ``mask_erode`` pixels. The mask is thus conservative like
    Deep3DFace's: the metric scores the interior, not the depth jump at the silhouette that a small CNN blurs (one
    pixel on the far background costs ~(5 sigma)^2 / n_pixels). Adam, cosine decay, seeded batches drawn with
    replacement. Writes ``out`` (if given; :func:`load_estimators` reads it) and returns the saved dict.
    """
    from .export import progress

    t0, c0 = time.time(), time.process_time()
    torch.manual_seed(seed)
    if val_data is not None:
        train_urls, card = resolve_shards(data)
        val_urls, _ = resolve_shards(val_data)
    else:
        train_urls, val_urls, card = _split_shards(data, val_shards)
    if input_size is None:  # the data's resolution, at most 64
        input_size = min(int(card["resolution"]) if card and card.get("resolution") else 64, 64)
    train = load_arrays(train_urls, input_size, max_train_samples, desc="load train", progress_bar=progress_bar)
    val = load_arrays(val_urls, input_size, max_val_samples, desc="load val", progress_bar=progress_bar)
    n = train["image"].shape[0]
    t_load = time.time() - t0

    pose_model = PoseCNN(input_size, pose_width).to(device)
    depth_model = DepthCNN(input_size, depth_width).to(device)
    mean, std = train["yaw_pitch"].mean(0), train["yaw_pitch"].std(0).clamp_min(1e-3)
    pose_model.pose_mean.copy_(mean)
    pose_model.pose_std.copy_(std)
    target_all = depth_target(train["depth"], train["mask"])
    mask_target = erode(train["mask"].float(), mask_erode)
    opt = torch.optim.Adam([*pose_model.parameters(), *depth_model.parameters()], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    gen = torch.Generator().manual_seed(seed)
    bar = progress(range(steps), desc="gmpi estimators train", unit="step", disable=not progress_bar)
    ema = None
    for step in bar:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        img = _to_input(train["image"][idx]).to(device)
        yp = ((train["yaw_pitch"][idx] - mean) / std).to(device)
        tgt, m, m_target = (t[idx].float().to(device) for t in (target_all, train["mask"], mask_target))
        wgt = (m + bg_weight * (1 - m)) * (train["depth"][idx] > 1e-8).float().to(device)
        loss_pose = F.mse_loss(pose_model.forward_normalized(img), yp)
        raw = depth_model.forward_raw(img)
        loss_depth = ((raw[:, :1] - tgt) ** 2 * wgt).sum() / wgt.sum().clamp_min(1)
        loss_mask = F.binary_cross_entropy_with_logits(raw[:, 1:], m_target)
        loss = loss_pose + loss_depth + loss_mask
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        vals = torch.stack([loss_pose, loss_depth, loss_mask]).detach().cpu()
        ema = vals if ema is None else 0.95 * ema + 0.05 * vals
        if step % 50 == 0 or step == steps - 1:
            bar.set_postfix(pose=f"{ema[0]:.3f}", depth=f"{ema[1]:.3f}", mask=f"{ema[2]:.3f}", refresh=False)
    t_train = time.time() - t0 - t_load

    template = (target_all * train["mask"]).sum(0, keepdim=True) / train["mask"].sum(0, keepdim=True).clamp_min(1)
    metrics = evaluate_arrays(pose_model.cpu(), depth_model.cpu(), val, pose_reference=mean, depth_template=template)
    info = {"format": FORMAT, "input_size": input_size, "train_data": _card_info(data, card, train_urls),
            "val_data": {"data": str(val_data or data), "shards": [Path(u).name for u in val_urls],
                         "n_images": metrics["n_images"]},
            "n_train": n, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "device": str(device),
            "seconds": {"load": round(t_load, 1), "train": round(t_train, 1), "total": round(time.time() - t0, 1),
                        "cpu_total": round(time.process_time() - c0, 1), "threads": torch.get_num_threads()},
            "bg_weight": bg_weight, "mask_erode": mask_erode, "torch": torch.__version__, "val_metrics": metrics}
    saved = {"format": FORMAT, "pose": {"kwargs": pose_model.kwargs(), "state_dict": pose_model.state_dict()},
             "depth": {"kwargs": depth_model.kwargs(), "state_dict": depth_model.state_dict()},
             "input_size": input_size, "info": json.loads(json.dumps(info))}
    if out is not None:
        write_atomic(out, lambda tmp: torch.save(saved, tmp))
    return saved


# ========================================================================================== CLI
@contextlib.contextmanager
def torch_threads(n: int):
    """Run with ``n`` torch CPU threads (0: leave torch's setting), restored after."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_command(data: str, out: str, steps: int = 2000, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                  device: str = "cpu", val_shards: int = 1, val_data: str | None = None, input_size: int | None = None,
                  max_train_samples: int | None = None, max_val_samples: int | None = None, pose_width: int = 16,
                  depth_width: int = 8, mask_erode: int = 1, threads: int = 1) -> dict:
    """Train PoseCNN + DepthCNN on shards with ground truth; the last shard(s) are held out for validation.

    Args:
        data: folder written by `gmpi data` (with depth/mask ground truth).
        out: output file (.pt).
        steps: optimiser steps.
        batch_size: images per step.
        lr: Adam learning rate (cosine decay).
        seed: seed of the initialisation and the batches.
        device: cpu or cuda.
        val_shards: trailing shards held out for validation.
        val_data: separate validation shards (then all of --data trains).
        input_size: network input size (default: the data's resolution, at most 64).
        max_train_samples: cap on training samples held in memory.
        max_val_samples: cap on validation samples.
        pose_width: PoseCNN base channels.
        depth_width: DepthCNN base channels.
        mask_erode: erode the mask target by this many pixels (a conservative estimator mask).
        threads: torch CPU threads (0: torch's default); 1 by default: on a busy machine OpenMP's spin-waiting made
            2 threads 27x slower (3.5 s vs 0.13 s per step on 2 shared cores).
    """
    if steps < 1 or batch_size < 1:
        raise InputError("--steps and --batch-size must be >= 1")
    with torch_threads(threads):
        saved = train_estimators(data, out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, device=device,
                                 val_shards=val_shards, val_data=val_data, input_size=input_size,
                                 max_train_samples=max_train_samples, max_val_samples=max_val_samples,
                                 pose_width=pose_width, depth_width=depth_width, mask_erode=mask_erode)
    info = saved["info"]
    print(format_metrics(info["val_metrics"]))
    s = info["seconds"]
    print(f"trained on {info['n_train']} images, {info['steps']} steps in {s['train']} s (load {s['load']} s, "
          f"total {s['total']} s wall, {s['cpu_total']} s CPU, {s['threads']} threads)")
    print(f"wrote {out} (sha256 {file_sha256(out)[:12]})")
    return saved


def eval_command(estimators: str, data: str, max_samples: int | None = None, json: str | None = None,
                 threads: int = 1) -> dict:
    """Pose/depth errors of saved estimators on shards with ground truth, next to the mean-pose and flat-depth
    baselines.

    Args:
        estimators: file written by `gmpi estimators train`.
        data: folder written by `gmpi data` (with depth/mask ground truth).
        max_samples: evaluate at most this many images.
        json: also write the metrics to this JSON file.
        threads: torch CPU threads (0: torch's default).
    """
    pose_model, depth_model, _ = load_estimators(estimators)
    arrays = load_arrays(resolve_shards(data)[0], None, max_samples, desc="load")
    with torch_threads(threads):  # the mean-pose baseline predicts the *training* mean pose, stored in the pose model
        metrics = evaluate_arrays(pose_model, depth_model, arrays, pose_reference=pose_model.pose_mean)
    print(format_metrics(metrics, label="images"))
    if json:
        Path(json).write_text(json_dumps(metrics, indent=1))
    return metrics
