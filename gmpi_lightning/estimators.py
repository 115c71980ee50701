"""Pose and depth estimators for the geometry metrics (GMPI_SPEC §8.3), and the metrics themselves.

The paper measures 3D consistency of generated images with an *external* estimator: it renders fakes at known
camera poses, lets Deep3DFaceRecon estimate each image's head pose and depth, and compares.

* **Pose error** (per image): the mean over the angles of the squared difference (radians²) between the
  estimator's angles and those of the rendering camera. Reported: the mean over images.
* **Depth error** (per image): over the pixels where the estimator's mask > 0.5 *and* the rendered depth > 1e-8,
  z-score both depth maps (``(v - mean) / (std + 1e-8)``, population std) and take the mean squared difference.
  It is invariant to the scale and offset of either map. Reported: mean (and std) over images.

Interface
---------
Anything that follows these conventions plugs into :func:`pose_error` / :func:`depth_error`:

* a **pose estimator** is a callable / ``nn.Module`` mapping images ``B x 3 x H x W`` in [-1, 1] to ``B x 2``
  ``[yaw, pitch]`` in radians, in this repository's convention (the ``yaw``/``pitch`` of ``pose.json`` in the
  shards, the ones the renderer takes);
* a **depth estimator** maps the same images to ``dict(depth=B x 1 x H x W, mask=B x 1 x H x W)``; ``depth`` is
  any affine function of z-depth (the metric z-scores it), ``mask`` holds probabilities or {0, 1} (> 0.5 counts).

Reference values (what "no skill" scores):

* pose: predicting the mean training pose for every image gives the variance of the pose prior averaged over
  yaw and pitch, ``(std_yaw² + std_pitch²) / 2`` (0.037 on the held-out shard of data/synthetic32);
* depth: a *flat* prediction has std 0, so its z-score is 0 everywhere and the error is the mean square of the
  z-scored rendered depth, ``var / (std + 1e-8)²`` = **1.0** (to within 2e-8 / std) for every image. Any depth
  error below 1.0 therefore means the estimate carries shape information; 0 is a perfect match up to scale and
  offset. (Predicting the *negated* depth scores 4.0, the worst possible value.)

Images with fewer than ``min_pixels`` valid pixels (an empty estimator mask, a face detector failure, NaN
inputs) get NaN; :func:`summarize` reports them as ``n_invalid`` and never drops them silently.

Trained estimators (synthetic data)
-----------------------------------
Deep3DFaceRecon only understands human faces. For the synthetic heads (and as a fast, self-contained check on
any data with ground truth) this module trains two small CNNs on the shards' ground truth:

* :class:`PoseCNN` regresses ``[yaw, pitch]``;
* :class:`DepthCNN`, a tiny U-Net, predicts the per-image z-scored depth and a foreground-mask logit. Its mask is
  trained on the ground-truth mask eroded by one pixel, i.e. it is conservative like Deep3DFace's face mask: the
  metric then scores the surface, not the blurred depth jump at the silhouette (a single mask pixel on the far
  background would cost ~(5 sigma)² / n_pixels).

Both resize their input to a fixed ``input_size`` (default: the data resolution, at most 64), so they accept any
image size; depth and mask come back at the input's size. Train them with::

    gmpi estimators train --data data/synthetic32 --out runs/estimators/synthetic32.pt

which holds out the last shard(s) for validation, prints the validation pose / depth errors next to the
mean-pose and flat-depth (1.0) baselines, and writes one ``weights_only``-loadable file (state dicts,
architecture kwargs, the training data's card checksums and command, the validation metrics). Load it with
:func:`load_estimators`; evaluate it on other shards with ``gmpi estimators eval``.

Measured (defaults: 2000 steps of batch 64, one CPU thread, on 2 cores shared with other jobs): 4 min 08 s for
data/synthetic32 (9375 training / 625 held-out images). Held-out pose error 0.0009 rad² (rmse yaw 0.026, pitch
0.034 rad) vs 0.0366 for the mean pose; depth error 0.059 vs 1.0 flat and 0.268 for the mean training depth map
(same pixels); mask precision 1.000, coverage 0.79. On 1000 fresh heads (seed 7): 0.0009 vs 0.0399 and 0.059.

External estimators (faces: Deep3DFaceRecon)
-------------------------------------------
Deep3DFaceRecon (and MTCNN for its landmarks) needs its own environment and weights, so it runs *offline*:

1. Render the fakes you want to score at known poses and keep, per image, an integer key (the fake-image index or
   seed), the camera's ``yaw``/``pitch`` and the raw rendered z-depth (float array). ``gmpi render`` writes
   colour-mapped depth PNGs only, so use ``gmpi_lightning.evaluation.fakes.iter_fakes`` (the seeded fakes of
   ``gmpi evaluate``: per view ``rgb``, ``depth``, ``alpha``, ``yaw``, ``pitch``) in a short script that saves
   PNGs plus an ``.npz`` of ``seed, yaw, pitch, depth``; the paper renders 1024 seeds at 224 x 224.
2. Run Deep3DFaceRecon on those images (MTCNN landmarks first; the author's fork has ``estimate_pose_gmpi.py``).
   Its ``angle`` coefficient is ``(ax, ay, az)`` radians with ``ax`` ~ our pitch and ``ay`` ~ -yaw (``az``, roll,
   is 0 for our cameras). If the tool crops/aligns the image, apply the same transform to the rendered depth and
   save that as well.
3. Save one ``.npz`` with ``index`` (N,) int and either ``angle`` (N, 3, Deep3DFace convention) or
   ``yaw_pitch`` (N, 2, ours); optionally ``depth`` (N, H, W), ``mask`` (N, H, W) (its face mask) and
   ``rendered_depth`` (N, H, W) (the rendered depth after the tool's alignment). A ``.json`` with
   ``{"convention": "deep3dface" | "yaw_pitch", "items": [{"index": 0, "angle": [..]}, ...]}`` works for poses.
4. Score::

       est = PrecomputedEstimates("deep3d.npz")
       per_image = pose_error(est.pose(indices), torch.stack([yaw, pitch], 1))   # NaN rows: images it skipped
       d = est.depth(indices)
       per_image_d = depth_error(d["depth"], d.get("rendered_depth", rendered), d["mask"])
       print(summarize(per_image), summarize(per_image_d))

   Missing indices (e.g. MTCNN failures, which the paper skips) become NaN rows and are reported as
   ``n_invalid``. For the paper's exact 3-angle pose number use ``pose_error(est.angles(indices),
   yaw_pitch_to_deep3d(yaw, pitch))`` (roll target 0): it divides by 3 angles instead of 2.

Identity consistency (ArcFace cosine similarity) needs ArcFace weights and is not implemented here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FORMAT = "gmpi-estimators/v1"
TRAIN_HINT = "gmpi estimators train --data data/synthetic32 --out {path}"


# =============================================================================================== metrics
def pose_error(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-image MSE over the angles (radians²): ``mean_k (pred[:, k] - true[:, k])²``, shape B.

    ``pred`` and ``true`` are ``B x K`` with the same K (2 for ``[yaw, pitch]``; 3 for Deep3DFace's angles).
    A NaN in a row (e.g. an image the estimator skipped) makes that image's error NaN.
    """
    pred, true = torch.as_tensor(pred), torch.as_tensor(true)
    if pred.ndim != 2 or pred.shape != true.shape:
        raise ValueError(f"pose_error: pred and true must both be B x K, got {tuple(pred.shape)} and "
                         f"{tuple(true.shape)}")
    return ((pred.double() - true.double().to(pred.device)) ** 2).mean(dim=1)


def zscore(values: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image ``(v - mean) / (std + eps)`` over ``valid`` pixels (population std); B x N -> B x N (0 elsewhere)."""
    valid = valid.to(values.dtype)
    n = valid.sum(dim=1, keepdim=True).clamp_min(1)
    mean = (values * valid).sum(dim=1, keepdim=True) / n
    var = (((values - mean) * valid) ** 2).sum(dim=1, keepdim=True) / n
    return (values - mean) / (var.sqrt() + eps) * valid


def depth_error(est_depth: torch.Tensor, rendered_depth: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                min_pixels: int = 16) -> torch.Tensor:
    """Per-image depth error (GMPI_SPEC §8.3), shape B, float64.

    Valid pixels: ``mask > 0.5`` and ``rendered_depth > 1e-8`` (and both depths finite). Both depth maps are
    z-scored over the valid pixels of their image, then the squared difference is averaged over them. Images with
    fewer than ``min_pixels`` valid pixels, or with a non-finite value among them, get NaN (see :func:`summarize`).
    Inputs are ``B x 1 x H x W`` or ``B x H x W``, all the same size.
    """
    est, ren, m = (torch.as_tensor(t) for t in (est_depth, rendered_depth, mask))
    if not (est.shape == ren.shape == m.shape):
        raise ValueError(f"depth_error: est_depth {tuple(est.shape)}, rendered_depth {tuple(ren.shape)} and mask "
                         f"{tuple(m.shape)} must have the same shape (resize the estimate to the rendering first)")
    b = est.shape[0]
    est, ren, m = (t.reshape(b, -1).double() for t in (est, ren.to(est.device), m.to(est.device)))
    valid = (m > 0.5) & (ren > 1e-8)
    bad = ~(torch.isfinite(est) & torch.isfinite(ren)) & valid
    valid_f = valid & ~bad
    n = valid_f.sum(dim=1)
    est0, ren0 = torch.where(valid_f, est, 0.0), torch.where(valid_f, ren, 0.0)
    diff = (zscore(est0, valid_f, eps) - zscore(ren0, valid_f, eps)) ** 2
    err = diff.sum(dim=1) / n.clamp_min(1)
    return torch.where((n >= min_pixels) & ~bad.any(dim=1), err, torch.full_like(err, math.nan))


def summarize(values) -> dict:
    """``dict(mean, std, n, n_invalid)`` over the finite values; NaN/Inf entries are counted in ``n_invalid``."""
    v = torch.as_tensor(values).detach().double().reshape(-1).cpu()
    ok = torch.isfinite(v)
    good = v[ok]
    n = int(good.numel())
    return {"mean": float(good.mean()) if n else math.nan, "std": float(good.std(unbiased=False)) if n else math.nan,
            "n": n, "n_invalid": int((~ok).sum())}


def deep3d_to_yaw_pitch(angle) -> torch.Tensor:
    """Deep3DFaceRecon ``angle`` (N x 3: ax, ay, az radians) -> ``N x 2 [yaw, pitch]``: yaw = -ay, pitch = ax."""
    from .cameras import deep3dface_dataset_angles

    yaw, pitch = deep3dface_dataset_angles(angle)
    return torch.stack([yaw, pitch], dim=1)


def yaw_pitch_to_deep3d(yaw, pitch) -> torch.Tensor:
    """Our camera ``yaw``/``pitch`` (B each) -> Deep3DFace's angle target ``[pitch, -yaw, 0]`` (B x 3), as the paper."""
    yaw, pitch = torch.as_tensor(yaw, dtype=torch.float32), torch.as_tensor(pitch, dtype=torch.float32)
    return torch.stack([pitch, -yaw, torch.zeros_like(yaw)], dim=1)


# ============================================================================================ networks
def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """To the network's input size: area averaging when shrinking, bilinear when enlarging."""
    if x.shape[-2:] == (size, size):
        return x
    if x.shape[-1] >= size and x.shape[-2] >= size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.2, inplace=True))


def _check_size(input_size: int, multiple: int, name: str) -> None:
    if input_size < multiple or input_size % multiple:
        raise ValueError(f"{name}: input_size must be a positive multiple of {multiple}, got {input_size}")


class PoseCNN(nn.Module):
    """Images (B x 3 x H x W in [-1, 1], any H, W) -> ``B x 2 [yaw, pitch]`` radians.

    The input is resized to ``input_size``, downsampled to 4 x 4 by stride-2 convolutions (``width`` channels,
    doubling, at most 128), flattened (so the head keeps *where* features are) and regressed by a 2-layer MLP.
    Outputs are de-normalised with the training poses' mean/std (buffers ``pose_mean``/``pose_std``).
    """

    def __init__(self, input_size: int = 32, width: int = 32):
        super().__init__()
        _check_size(input_size, 8, "PoseCNN")
        self.input_size, self.width = input_size, width
        layers, c, res = [_conv(3, width)], width, input_size
        while res > 4:
            c2 = min(2 * c, 128)
            layers += [_conv(c, c2, 2), _conv(c2, c2)]
            c, res = c2, res // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * res * res, 128), nn.LeakyReLU(0.2, inplace=True),
                                  nn.Linear(128, 2))
        self.register_buffer("pose_mean", torch.zeros(2))
        self.register_buffer("pose_std", torch.ones(2))

    def kwargs(self) -> dict:
        return {"input_size": self.input_size, "width": self.width}

    def forward_normalized(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(_resize(images, self.input_size)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_normalized(images) * self.pose_std + self.pose_mean


class DepthCNN(nn.Module):
    """Images -> ``dict(depth=B x 1 x H x W, mask=B x 1 x H x W probabilities, mask_logit=...)``.

    A tiny U-Net at ``input_size`` (three stride-2 levels, skip connections); ``depth`` is trained to be the
    per-image z-scored z-depth over the foreground (any affine map of depth is equivalent for the metric).
    Outputs are resized (bilinear) back to the input's H x W.
    """

    def __init__(self, input_size: int = 32, width: int = 16):
        super().__init__()
        _check_size(input_size, 8, "DepthCNN")
        self.input_size, self.width = input_size, width
        w = width
        self.enc0 = nn.Sequential(_conv(3, w), _conv(w, w))
        self.enc1 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        self.enc2 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))
        self.enc3 = nn.Sequential(_conv(4 * w, 8 * w, 2), _conv(8 * w, 8 * w))
        self.dec2 = nn.Sequential(_conv(8 * w + 4 * w, 4 * w), _conv(4 * w, 4 * w))
        self.dec1 = nn.Sequential(_conv(4 * w + 2 * w, 2 * w), _conv(2 * w, 2 * w))
        self.dec0 = nn.Sequential(_conv(2 * w + w, w), _conv(w, w))
        self.out = nn.Conv2d(w, 2, 3, 1, 1)

    def kwargs(self) -> dict:
        return {"input_size": self.input_size, "width": self.width}

    @staticmethod
    def _up(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1)

    def forward_raw(self, images: torch.Tensor) -> torch.Tensor:
        """B x 2 x input_size x input_size: z-scored depth, mask logit."""
        e0 = self.enc0(_resize(images, self.input_size))
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        e3 = self.enc3(e2)
        d2 = self.dec2(self._up(e3, e2))
        d1 = self.dec1(self._up(d2, e1))
        return self.out(self.dec0(self._up(d1, e0)))

    def forward(self, images: torch.Tensor) -> dict:
        out = self.forward_raw(images)
        if out.shape[-2:] != images.shape[-2:]:
            out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        logit = out[:, 1:2]
        return {"depth": out[:, 0:1], "mask": torch.sigmoid(logit), "mask_logit": logit}


# ========================================================================================== data
def _split_shards(data: str | Path, val_shards: int) -> tuple[list[str], list[str], dict | None]:
    from datamodules.posed_images import resolve_shards

    urls, card = resolve_shards(data)
    if val_shards < 1:
        raise ValueError(f"val_shards must be >= 1, got {val_shards}")
    if len(urls) <= val_shards:
        raise ValueError(f"{data}: {len(urls)} shard(s), but {val_shards} are held out for validation and at "
                         "least one more is needed for training; write more shards (`gmpi data ... "
                         "--samples-per-shard N`) or pass --val-data")
    return urls[:-val_shards], urls[-val_shards:], card


def load_arrays(urls: Sequence[str], input_size: int | None = None, max_samples: int | None = None,
                desc: str = "load", progress_bar: bool = True) -> dict:
    """Decode shards into memory: ``image`` uint8 N x 3 x S x S, ``depth`` float32 N x 1 x S x S, ``mask`` bool,
    ``yaw_pitch`` float32 N x 2, ``key`` list. Images are resized to ``input_size`` (area), depth/mask by nearest
    sampling. Shards without depth/mask ground truth are refused with the shard's name."""
    import webdataset as wds

    from datamodules.posed_images import decode_sample

    from .export import progress

    pipe = wds.DataPipeline(wds.SimpleShardList(list(urls)), wds.tarfile_to_samples(), wds.map(decode_sample))
    imgs, depths, masks, poses, keys = [], [], [], [], []
    for s in progress(pipe, desc=desc, unit="img", total=max_samples, disable=not progress_bar):
        if "depth" not in s or "mask" not in s:
            raise ValueError(f"sample {s['key']} in {list(urls)[:3]}... has no depth.npy/mask.png ground truth; "
                             "estimators train on shards with ground truth (e.g. `gmpi data synthetic`)")
        imgs.append(torch.from_numpy(np.array(s["image"])).permute(2, 0, 1))
        depths.append(torch.from_numpy(np.array(s["depth"]))[None])
        masks.append(torch.from_numpy(np.ascontiguousarray(s["mask"]))[None])
        poses.append((s["yaw"], s["pitch"]))
        keys.append(s["key"])
        if max_samples is not None and len(keys) >= max_samples:
            break
    if not keys:
        raise ValueError(f"no samples in {list(urls)}")
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
    d, m = depth.reshape(b, -1).double(), mask.reshape(b, -1).double()
    n = m.sum(1, keepdim=True).clamp_min(1)
    mean = (d * m).sum(1, keepdim=True) / n
    std = (((d - mean) * m) ** 2).sum(1, keepdim=True).div(n).sqrt()
    return ((d - mean) / (std + eps)).float().reshape(depth.shape)


# ==================================================================================== evaluation
@torch.no_grad()
def evaluate_arrays(pose_model, depth_model, arrays: dict, batch_size: int = 256, device: str = "cpu",
                    pose_reference: torch.Tensor | None = None, depth_template: torch.Tensor | None = None) -> dict:
    """Validation metrics on in-memory ground truth (see :func:`load_arrays`).

    Returns summaries of: ``pose_error`` (the estimator), ``pose_error_mean_baseline`` (predicting
    ``pose_reference``, default the mean of these poses), ``depth_error`` (estimated depth vs ground truth over the
    estimator's mask, as the metric is used), ``depth_error_gt_mask`` (over the whole ground-truth mask, silhouette
    included), ``depth_error_flat_baseline`` (a constant map over the estimator's mask: 1.0),
    ``depth_error_template_baseline`` (one fixed map for all images, the mean training target, over the estimator's
    mask; if ``depth_template`` is given), ``mask_precision`` (fraction of the predicted foreground that is true
    foreground: spill onto the background is what hurts the metric), ``mask_coverage`` (fraction of the true
    foreground predicted); plus ``pose_error_yaw_rmse``/``pitch_rmse`` (radians).
    """
    pose_model.eval()
    depth_model.eval()
    n = arrays["image"].shape[0]
    true = arrays["yaw_pitch"]
    ref = (true.mean(0) if pose_reference is None else torch.as_tensor(pose_reference)).reshape(1, 2)
    pe, pb, de, dg, df, dt, prec, cov, preds = [], [], [], [], [], [], [], [], []
    for i in range(0, n, batch_size):
        img = _to_input(arrays["image"][i:i + batch_size]).to(device)
        gt_d, gt_m = arrays["depth"][i:i + batch_size], arrays["mask"][i:i + batch_size].float()
        yp = true[i:i + batch_size]
        pred = pose_model(img).cpu()
        preds.append(pred)
        pe.append(pose_error(pred, yp))
        pb.append(pose_error(ref.expand_as(yp), yp))
        out = depth_model(img)
        est, est_m = out["depth"].cpu(), out["mask"].cpu()
        de.append(depth_error(est, gt_d, est_m))
        dg.append(depth_error(est, gt_d, gt_m))
        df.append(depth_error(torch.zeros_like(gt_d), gt_d, est_m))
        if depth_template is not None:
            dt.append(depth_error(depth_template.expand_as(gt_d), gt_d, est_m))
        hard, true_m = (est_m > 0.5).flatten(1), (gt_m > 0.5).flatten(1)
        inter = (hard & true_m).sum(1).double()
        nan = torch.full_like(inter, math.nan)
        prec.append(torch.where(hard.any(1), inter / hard.sum(1).clamp_min(1), nan))
        cov.append(torch.where(true_m.any(1), inter / true_m.sum(1).clamp_min(1), nan))
    pred = torch.cat(preds)
    out = {"n_images": n, "pose_error": summarize(torch.cat(pe)), "pose_error_mean_baseline": summarize(torch.cat(pb)),
           "pose_error_yaw_rmse": float(((pred[:, 0] - true[:, 0]) ** 2).mean().sqrt()),
           "pose_error_pitch_rmse": float(((pred[:, 1] - true[:, 1]) ** 2).mean().sqrt()),
           "depth_error": summarize(torch.cat(de)), "depth_error_gt_mask": summarize(torch.cat(dg)),
           "depth_error_flat_baseline": summarize(torch.cat(df)), "mask_precision": summarize(torch.cat(prec)),
           "mask_coverage": summarize(torch.cat(cov))}
    if dt:
        out["depth_error_template_baseline"] = summarize(torch.cat(dt))
    return out


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
    names = [Path(u).name for u in urls]
    if card is None:
        return {"data": str(data), "train_shards": names}
    return {"data": str(data), "preset": card.get("preset"), "resolution": card.get("resolution"),
            "count": card.get("count"), "command": card.get("command"),
            "shards": [{"name": s["name"], "sha256": s.get("sha256")} for s in card.get("shards", [])],
            "train_shards": names}


def train_estimators(data: str | Path, out: str | Path | None = None, steps: int = 2000, batch_size: int = 64,
                     lr: float = 2e-3, seed: int = 0, device: str = "cpu", val_shards: int = 1,
                     val_data: str | Path | None = None, input_size: int | None = None, pose_width: int = 16,
                     depth_width: int = 8, max_train_samples: int | None = None, max_val_samples: int | None = None,
                     bg_weight: float = 0.1, mask_erode: int = 1, progress_bar: bool = True) -> dict:
    """Train :class:`PoseCNN` and :class:`DepthCNN` on the ground truth of posed-image shards.

    Training data: every shard of ``data`` except the last ``val_shards`` (held out for validation), unless
    ``val_data`` names separate validation shards (then all of ``data`` trains). Losses: pose MSE on
    normalised yaw/pitch; depth MSE against the ground-truth depth z-scored with its foreground's mean/std
    (foreground pixels weight 1, background ``bg_weight``, so that a mask spilling over the silhouette still
    predicts the far background there), plus BCE of the mask logit against the ground-truth mask *eroded* by
    ``mask_erode`` pixels (at ``input_size``). The estimator's mask is thus conservative, like Deep3DFace's face
    mask: the metric then scores the interior, not the depth discontinuity at the silhouette, which a small CNN
    blurs (one predicted pixel on the far background costs ~(5 sigma)^2 / n_pixels). Adam with cosine decay;
    batches drawn with replacement from memory (seeded).

    Writes ``out`` (if given; see :func:`load_estimators`) and returns the saved dict (``info`` included).
    """
    from .export import progress

    t0, c0 = time.time(), time.process_time()
    torch.manual_seed(seed)
    if val_data is not None:
        from datamodules.posed_images import resolve_shards

        train_urls, card = resolve_shards(data)
        val_urls, _ = resolve_shards(val_data)
    else:
        train_urls, val_urls, card = _split_shards(data, val_shards)
    if input_size is None:
        res = int(card["resolution"]) if card and card.get("resolution") else 64
        input_size = min(res, 64)
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
    params = list(pose_model.parameters()) + list(depth_model.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    gen = torch.Generator().manual_seed(seed)
    pose_model.train()
    depth_model.train()
    bar = progress(range(steps), desc="gmpi estimators train", unit="step", disable=not progress_bar)
    ema = None
    for step in bar:
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        img = _to_input(train["image"][idx]).to(device)
        yp = ((train["yaw_pitch"][idx] - mean) / std).to(device)
        tgt, m = target_all[idx].to(device), train["mask"][idx].float().to(device)
        m_target = mask_target[idx].to(device)
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
    pose_model.cpu()
    depth_model.cpu()
    metrics = evaluate_arrays(pose_model, depth_model, val, pose_reference=mean, depth_template=template)
    info = {"format": FORMAT, "input_size": input_size, "train_data": _card_info(data, card, train_urls),
            "val_data": {"data": str(val_data or data), "shards": [Path(u).name for u in val_urls],
                         "n_images": metrics["n_images"]},
            "n_train": n, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "device": str(device),
            "seconds": {"load": round(t_load, 1), "train": round(t_train, 1), "total": round(time.time() - t0, 1),
                        "cpu_total": round(time.process_time() - c0, 1), "threads": torch.get_num_threads()},
            "bg_weight": bg_weight, "mask_erode": mask_erode,
            "torch": torch.__version__, "val_metrics": metrics}
    saved = {"format": FORMAT, "pose": {"kwargs": pose_model.kwargs(), "state_dict": pose_model.state_dict()},
             "depth": {"kwargs": depth_model.kwargs(), "state_dict": depth_model.state_dict()},
             "input_size": input_size, "info": json.loads(json.dumps(info))}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        torch.save(saved, tmp)
        tmp.replace(out)
    return saved


def load_estimators(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[PoseCNN, DepthCNN, dict]:
    """``(pose_model, depth_model, info)`` from a file written by :func:`train_estimators` (eval mode)."""
    path = Path(path)
    hint = TRAIN_HINT.format(path=path)
    if not path.is_file():
        raise FileNotFoundError(f"estimator file {path} not found; train one with `{hint}`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable estimator file ({type(e).__name__}: {e}); re-create it with "
                         f"`{hint}`") from None
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != FORMAT:
        raise ValueError(f"{path}: format {fmt!r}, expected {FORMAT!r} (a file written by `gmpi estimators "
                         f"train`); re-create it with `{hint}`")
    for part in ("pose", "depth"):
        if not isinstance(ckpt.get(part), dict) or not {"kwargs", "state_dict"} <= set(ckpt[part]):
            raise ValueError(f"{path}: field {part!r} (kwargs + state_dict) missing; re-create it with `{hint}`")
    pose_model = PoseCNN(**ckpt["pose"]["kwargs"])
    pose_model.load_state_dict(ckpt["pose"]["state_dict"])
    depth_model = DepthCNN(**ckpt["depth"]["kwargs"])
    depth_model.load_state_dict(ckpt["depth"]["state_dict"])
    return pose_model.eval(), depth_model.eval(), dict(ckpt.get("info", {}))


# ================================================================================ external estimates
class PrecomputedEstimates:
    """Per-image predictions made offline by an external tool (e.g. Deep3DFaceRecon), keyed by image index.

    File formats (see the module docstring): ``.npz`` with ``index`` (N,) and ``angle`` (N x 3, Deep3DFace:
    ``[pitch, -yaw, roll]``) or ``yaw_pitch`` (N x 2), optionally ``depth``, ``mask``, ``rendered_depth``
    (N x H x W); or ``.json`` ``{"convention": "deep3dface" | "yaw_pitch", "items": [{"index", "angle" |
    "yaw_pitch"}]}`` (poses only). Lookups return NaN rows / all-zero masks for indices the tool skipped, so
    :func:`summarize` counts them as invalid.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"precomputed estimates {self.path} not found (write it with the external "
                                    "tool; format: gmpi_lightning/estimators.py docstring)")
        self.depth_maps: dict[str, np.ndarray] = {}
        if self.path.suffix == ".npz":
            with np.load(self.path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
            if "index" not in data:
                raise ValueError(f"{self.path}: field 'index' (N integer image indices / seeds) missing")
            index = data["index"].astype(np.int64).reshape(-1)
            if "angle" in data:
                angles = np.asarray(data["angle"], np.float64).reshape(len(index), 3)
            elif "yaw_pitch" in data:
                yp = np.asarray(data["yaw_pitch"], np.float64).reshape(len(index), 2)
                angles = yaw_pitch_to_deep3d(yp[:, 0], yp[:, 1]).double().numpy()
            else:
                raise ValueError(f"{self.path}: needs field 'angle' (N x 3, Deep3DFace) or 'yaw_pitch' (N x 2)")
            for k in ("depth", "mask", "rendered_depth"):
                if k in data:
                    arr = np.asarray(data[k], np.float32)
                    if arr.ndim != 3 or arr.shape[0] != len(index):
                        raise ValueError(f"{self.path}: field {k!r} must be N x H x W with N = {len(index)}, got "
                                         f"{arr.shape}")
                    self.depth_maps[k] = arr
        elif self.path.suffix == ".json":
            doc = json.loads(self.path.read_text())
            conv = doc.get("convention")
            if conv not in ("deep3dface", "yaw_pitch") or not isinstance(doc.get("items"), list):
                raise ValueError(f"{self.path}: needs 'convention' ('deep3dface' or 'yaw_pitch') and a list 'items'")
            field = "angle" if conv == "deep3dface" else "yaw_pitch"
            try:
                index = np.array([int(it["index"]) for it in doc["items"]], np.int64)
                vals = np.array([it[field] for it in doc["items"]], np.float64).reshape(len(index), -1)
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{self.path}: every item needs 'index' and '{field}' ({e})") from None
            angles = vals if conv == "deep3dface" else yaw_pitch_to_deep3d(vals[:, 0], vals[:, 1]).double().numpy()
        else:
            raise ValueError(f"{self.path}: unsupported extension {self.path.suffix!r}; use .npz or .json")
        if len(np.unique(index)) != len(index):
            raise ValueError(f"{self.path}: duplicate entries in 'index'")
        self.index = index
        self._row = {int(i): r for r, i in enumerate(index)}
        self._angles = angles

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, i: int) -> bool:
        return int(i) in self._row

    def missing(self, indices) -> list[int]:
        return [int(i) for i in indices if int(i) not in self._row]

    def angles(self, indices) -> torch.Tensor:
        """Deep3DFace-convention angles (B x 3) for these image indices; NaN rows where missing."""
        out = np.full((len(indices), 3), np.nan)
        for r, i in enumerate(indices):
            if int(i) in self._row:
                out[r] = self._angles[self._row[int(i)]]
        return torch.from_numpy(out)

    def pose(self, indices) -> torch.Tensor:
        """``B x 2 [yaw, pitch]`` (our convention) for these image indices; NaN rows where missing."""
        return deep3d_to_yaw_pitch(self.angles(indices)).double() if len(indices) else torch.zeros(0, 2)

    def depth(self, indices) -> dict:
        """``dict(depth, mask[, rendered_depth])``, each B x 1 x H x W; missing images get NaN depth, zero mask."""
        if "depth" not in self.depth_maps or "mask" not in self.depth_maps:
            raise ValueError(f"{self.path}: holds no 'depth' and 'mask' fields; the depth error needs both")
        out = {}
        for k, arr in self.depth_maps.items():
            fill = 0.0 if k == "mask" else np.nan
            rows = np.full((len(indices), *arr.shape[1:]), fill, np.float32)
            for r, i in enumerate(indices):
                if int(i) in self._row:
                    rows[r] = arr[self._row[int(i)]]
            out[k] = torch.from_numpy(rows)[:, None]
        return out


# ========================================================================================== CLI
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cli(argv: list[str]) -> int:
    """``gmpi estimators train|eval``."""
    p = argparse.ArgumentParser(prog="gmpi estimators", description="Pose/depth estimators for the geometry "
                                "metrics (GMPI_SPEC §8.3), trained on shards with ground truth.")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train PoseCNN + DepthCNN; the last shard(s) are held out for validation",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--data", required=True, help="folder written by `gmpi data` (with depth/mask ground truth)")
    t.add_argument("--out", required=True, help="output file (.pt)")
    t.add_argument("--steps", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="cpu or cuda")
    t.add_argument("--val-shards", type=int, default=1, help="trailing shards held out for validation")
    t.add_argument("--val-data", help="separate validation shards (then all of --data trains)")
    t.add_argument("--input-size", type=int, help="network input size (default: data resolution, at most 64)")
    t.add_argument("--max-train-samples", type=int, help="cap on training samples held in memory")
    t.add_argument("--max-val-samples", type=int)
    t.add_argument("--pose-width", type=int, default=16, help="PoseCNN base channels")
    t.add_argument("--depth-width", type=int, default=8, help="DepthCNN base channels")
    t.add_argument("--mask-erode", type=int, default=1, help="erode the mask target by this many pixels "
                                                               "(a conservative estimator mask)")
    t.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (0: torch's default). 1 by default: these small convolutions gain little "
                        "from more threads, and on a busy machine OpenMP's spin-waiting made 2 threads 27x slower "
                        "(measured 3.5 s vs 0.13 s per step on 2 shared cores)")
    e = sub.add_parser("eval", help="pose/depth errors of saved estimators on shards with ground truth")
    e.add_argument("--estimators", required=True, help="file written by `gmpi estimators train`")
    e.add_argument("--data", required=True)
    e.add_argument("--max-samples", type=int)
    e.add_argument("--json", help="also write the metrics to this JSON file")
    e.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.cmd == "train":
        if args.steps < 1 or args.batch_size < 1:
            raise ValueError("--steps and --batch-size must be >= 1")
        threads = torch.get_num_threads()
        if args.threads > 0:
            torch.set_num_threads(args.threads)
        try:
            saved = train_estimators(args.data, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                     seed=args.seed, device=args.device, val_shards=args.val_shards,
                                     val_data=args.val_data, input_size=args.input_size,
                                     max_train_samples=args.max_train_samples, max_val_samples=args.max_val_samples,
                                     pose_width=args.pose_width, depth_width=args.depth_width,
                                     mask_erode=args.mask_erode)
        finally:
            torch.set_num_threads(threads)
        info = saved["info"]
        print(format_metrics(info["val_metrics"]))
        s = info["seconds"]
        print(f"trained on {info['n_train']} images, {info['steps']} steps in {s['train']} s (load {s['load']} s, "
              f"total {s['total']} s wall, {s['cpu_total']} s CPU, {s['threads']} threads)")
        print(f"wrote {args.out} (sha256 {_file_sha256(Path(args.out))[:12]})")
        return 0
    pose_model, depth_model, info = load_estimators(args.estimators)
    from datamodules.posed_images import resolve_shards

    urls, _ = resolve_shards(args.data)
    arrays = load_arrays(urls, None, args.max_samples, desc="load")
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:  # the mean-pose baseline predicts the *training* mean pose, stored in the pose model
        metrics = evaluate_arrays(pose_model, depth_model, arrays, pose_reference=pose_model.pose_mean)
    finally:
        torch.set_num_threads(threads)
    print(format_metrics(metrics, label="images"))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1))
    return 0
