"""Pose and depth estimators for the geometry metrics (docs/METHOD.md §8.3), and the metrics themselves.

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
any data with ground truth) two small CNNs, defined here and trained by :mod:`.estimator_training`, learn the
shards' ground truth:

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

External estimators (faces: Deep3DFaceRecon) run offline and write per-image predictions that
:class:`PrecomputedEstimates` reads; docs/EVALUATION.md ("Offline estimators") has the steps.

Identity consistency (ArcFace cosine similarity) needs ArcFace weights and is not implemented here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InputError

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
        raise InputError(f"pose_error: pred and true must both be B x K, got {tuple(pred.shape)} and "
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
    """Per-image depth error (docs/METHOD.md §8.3), shape B, float64.

    Valid pixels: ``mask > 0.5`` and ``rendered_depth > 1e-8`` (and both depths finite). Both depth maps are
    z-scored over the valid pixels of their image, then the squared difference is averaged over them. Images with
    fewer than ``min_pixels`` valid pixels, or with a non-finite value among them, get NaN (see :func:`summarize`).
    Inputs are ``B x 1 x H x W`` or ``B x H x W``, all the same size.
    """
    est, ren, m = (torch.as_tensor(t) for t in (est_depth, rendered_depth, mask))
    if not (est.shape == ren.shape == m.shape):
        raise InputError(f"depth_error: est_depth {tuple(est.shape)}, rendered_depth {tuple(ren.shape)} and mask "
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
        raise InputError(f"{name}: input_size must be a positive multiple of {multiple}, got {input_size}")


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

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x C: the last convolutional features averaged over the image, i.e. which features (eyes, hair, skin,
        background) the network sees, not where: the space of ``est_fd``, a Fréchet distance of fakes to reals that
        measures appearance without being dominated by the fakes' pose distribution (the regression head's hidden
        layer is: it encodes the pose)."""
        return self.features(_resize(images, self.input_size)).mean(dim=(2, 3))

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


def load_estimators(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[PoseCNN, DepthCNN, dict]:
    """``(pose_model, depth_model, info)`` from a file written by :func:`train_estimators` (eval mode)."""
    path = Path(path)
    hint = TRAIN_HINT.format(path=path)
    if not path.is_file():
        raise FileNotFoundError(f"estimator file {path} not found; train one with `{hint}`")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise InputError(f"{path}: not a readable estimator file ({type(e).__name__}: {e}); re-create it with "
                         f"`{hint}`") from None
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt != FORMAT:
        raise InputError(f"{path}: format {fmt!r}, expected {FORMAT!r} (a file written by `gmpi estimators "
                         f"train`); re-create it with `{hint}`")
    for part in ("pose", "depth"):
        if not isinstance(ckpt.get(part), dict) or not {"kwargs", "state_dict"} <= set(ckpt[part]):
            raise InputError(f"{path}: field {part!r} (kwargs + state_dict) missing; re-create it with `{hint}`")
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
                raise InputError(f"{self.path}: field 'index' (N integer image indices / seeds) missing")
            index = data["index"].astype(np.int64).reshape(-1)
            if "angle" in data:
                angles = np.asarray(data["angle"], np.float64).reshape(len(index), 3)
            elif "yaw_pitch" in data:
                yp = np.asarray(data["yaw_pitch"], np.float64).reshape(len(index), 2)
                angles = yaw_pitch_to_deep3d(yp[:, 0], yp[:, 1]).double().numpy()
            else:
                raise InputError(f"{self.path}: needs field 'angle' (N x 3, Deep3DFace) or 'yaw_pitch' (N x 2)")
            for k in ("depth", "mask", "rendered_depth"):
                if k in data:
                    arr = np.asarray(data[k], np.float32)
                    if arr.ndim != 3 or arr.shape[0] != len(index):
                        raise InputError(f"{self.path}: field {k!r} must be N x H x W with N = {len(index)}, got "
                                         f"{arr.shape}")
                    self.depth_maps[k] = arr
        elif self.path.suffix == ".json":
            doc = json.loads(self.path.read_text())
            conv = doc.get("convention")
            if conv not in ("deep3dface", "yaw_pitch") or not isinstance(doc.get("items"), list):
                raise InputError(f"{self.path}: needs 'convention' ('deep3dface' or 'yaw_pitch') and a list 'items'")
            field = "angle" if conv == "deep3dface" else "yaw_pitch"
            try:
                index = np.array([int(it["index"]) for it in doc["items"]], np.int64)
                vals = np.array([it[field] for it in doc["items"]], np.float64).reshape(len(index), -1)
            except (KeyError, TypeError, ValueError) as e:
                raise InputError(f"{self.path}: every item needs 'index' and '{field}' ({e})") from None
            angles = vals if conv == "deep3dface" else yaw_pitch_to_deep3d(vals[:, 0], vals[:, 1]).double().numpy()
        else:
            raise InputError(f"{self.path}: unsupported extension {self.path.suffix!r}; use .npz or .json")
        if len(np.unique(index)) != len(index):
            raise InputError(f"{self.path}: duplicate entries in 'index'")
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
            raise InputError(f"{self.path}: holds no 'depth' and 'mask' fields; the depth error needs both")
        out = {}
        for k, arr in self.depth_maps.items():
            fill = 0.0 if k == "mask" else np.nan
            rows = np.full((len(indices), *arr.shape[1:]), fill, np.float32)
            for r, i in enumerate(indices):
                if int(i) in self._row:
                    rows[r] = arr[self._row[int(i)]]
            out[k] = torch.from_numpy(rows)[:, None]
        return out
