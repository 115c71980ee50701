"""Pose and depth estimators for the geometry metrics, and the metrics themselves (docs/METHOD.md §8.3; the metrics,
the estimator interface and offline estimators such as Deep3DFaceRecon: docs/EVALUATION.md).

Pose error: per image, the mean over the angles of the squared difference (rad²) to the rendering camera's. Depth
error: over the pixels where the estimator's mask > 0.5 and the rendered depth > 1e-8, the MSE of both maps z-scored
(``(v - mean) / (std + 1e-8)``, population std): invariant to scale and offset; a flat map scores 1.0 (within
2e-8 / std), the negated depth 4.0. Images with fewer than ``min_pixels`` valid pixels get NaN, which
:func:`summarize` counts in ``n_invalid``. Estimators read images B x 3 x H x W in [-1, 1]; poses are ``[yaw, pitch]``
as in the shards' ``pose.json`` and the renderer.

:class:`PoseCNN` and :class:`DepthCNN` learn the shards' ground truth (``gmpi estimators train``). Measured (defaults,
one CPU thread, data/synthetic32): 4 min; held out, pose error 0.0009 (mean pose 0.0366), depth error 0.059 (flat
1.0, mean training depth map 0.268), mask precision 1.000, coverage 0.79.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cameras import deep3dface_dataset_angles
from .errors import InputError

FORMAT = "gmpi-estimators/v1"


# =============================================================================================== metrics
def pose_error(pred: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """Per-image MSE over the angles (radians²), shape B, of ``B x K`` ``pred`` and ``true`` (K = 2 for
    ``[yaw, pitch]``, 3 for Deep3DFace's angles). A NaN in a row (an image the estimator skipped) gives NaN."""
    pred, true = torch.as_tensor(pred), torch.as_tensor(true)
    if pred.ndim != 2 or pred.shape != true.shape:
        raise InputError(f"pose_error: pred and true must both be B x K, got {tuple(pred.shape)} and "
                         f"{tuple(true.shape)}")
    return ((pred.double() - true.double().to(pred.device)) ** 2).mean(dim=1)


def zscore(values: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8, masked: bool = True) -> torch.Tensor:
    """Per-image ``(v - mean) / (std + eps)`` with the mean and population std of the ``valid`` pixels; B x N -> B x N,
    0 outside ``valid`` (``masked=False``: every pixel scaled alike)."""
    valid = valid.to(values.dtype)
    n = valid.sum(dim=1, keepdim=True).clamp_min(1)
    mean = (values * valid).sum(dim=1, keepdim=True) / n
    var = (((values - mean) * valid) ** 2).sum(dim=1, keepdim=True) / n
    z = (values - mean) / (var.sqrt() + eps)
    return z * valid if masked else z


def depth_error(est_depth: torch.Tensor, rendered_depth: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                min_pixels: int = 16) -> torch.Tensor:
    """Per-image depth error (the module's docstring), shape B, float64, of same-sized ``B x 1 x H x W`` or
    ``B x H x W`` inputs. Images with fewer than ``min_pixels`` valid pixels, or with a non-finite depth among them,
    get NaN."""
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
    z_est, z_ren = (zscore(torch.where(valid_f, t, 0.0), valid_f, eps) for t in (est, ren))
    err = ((z_est - z_ren) ** 2).sum(dim=1) / n.clamp_min(1)
    return torch.where((n >= min_pixels) & ~bad.any(dim=1), err, torch.full_like(err, math.nan))


def summarize(values) -> dict:
    """``dict(mean, std, n, n_invalid)`` over the finite values; NaN/Inf entries are counted in ``n_invalid``."""
    v = torch.as_tensor(values).detach().double().reshape(-1).cpu()
    ok = torch.isfinite(v)
    good, n = v[ok], int(ok.sum())
    return {"mean": float(good.mean()) if n else math.nan, "std": float(good.std(unbiased=False)) if n else math.nan,
            "n": n, "n_invalid": int((~ok).sum())}


def deep3d_to_yaw_pitch(angle) -> torch.Tensor:
    """Deep3DFaceRecon ``angle`` (N x 3: ax, ay, az radians) -> ``N x 2 [yaw, pitch]``: yaw = -ay, pitch = ax."""
    return torch.stack(deep3dface_dataset_angles(angle), dim=1)


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


def _pair(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(_conv(cin, cout, stride), _conv(cout, cout))


class _Estimator(nn.Module):
    """Both CNNs: the input resized to ``input_size`` (a positive multiple of 8), ``width`` base channels."""

    def __init__(self, input_size: int, width: int):
        super().__init__()
        if input_size < 8 or input_size % 8:
            raise InputError(f"{type(self).__name__}: input_size must be a positive multiple of 8, got {input_size}")
        self.input_size, self.width = input_size, width

    def kwargs(self) -> dict:
        return {"input_size": self.input_size, "width": self.width}


class PoseCNN(_Estimator):
    """Images (B x 3 x H x W in [-1, 1], any H, W) -> ``B x 2 [yaw, pitch]`` radians: stride-2 convolutions down to
    4 x 4 (``width`` channels, doubling, at most 128), flattened (the head keeps *where* features are), a 2-layer MLP,
    de-normalised with the training poses' mean/std (buffers ``pose_mean``/``pose_std``)."""

    def __init__(self, input_size: int = 32, width: int = 32):
        super().__init__(input_size, width)
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

    def forward_normalized(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(_resize(images, self.input_size)))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """B x C: the last convolutional features averaged over the image: which features the network sees, not
        where. The space of ``est_fd``, which then measures appearance without being dominated by the fakes' pose
        distribution (the head's hidden layer would be: it encodes the pose)."""
        return self.features(_resize(images, self.input_size)).mean(dim=(2, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_normalized(images) * self.pose_std + self.pose_mean


class DepthCNN(_Estimator):
    """Images -> ``dict(depth=B x 1 x H x W, mask=B x 1 x H x W probabilities, mask_logit=...)``, resized back to the
    input's H x W: a tiny U-Net (three stride-2 levels) whose depth is trained to be the foreground's z-scored depth."""

    def __init__(self, input_size: int = 32, width: int = 16):
        super().__init__(input_size, width)
        w = width
        self.enc0, self.enc1 = _pair(3, w), _pair(w, 2 * w, 2)
        self.enc2, self.enc3 = _pair(2 * w, 4 * w, 2), _pair(4 * w, 8 * w, 2)
        self.dec2, self.dec1 = _pair(8 * w + 4 * w, 4 * w), _pair(4 * w + 2 * w, 2 * w)
        self.dec0, self.out = _pair(2 * w + w, w), nn.Conv2d(w, 2, 3, 1, 1)

    @staticmethod
    def _up(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False), skip], 1)

    def forward_raw(self, images: torch.Tensor) -> torch.Tensor:
        """B x 2 x input_size x input_size: z-scored depth, mask logit."""
        e0 = self.enc0(_resize(images, self.input_size))
        e1 = self.enc1(e0)
        e2 = self.enc2(e1)
        d2 = self.dec2(self._up(self.enc3(e2), e2))
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
    hint = f"gmpi estimators train --data data/synthetic32 --out {path}"
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

    ``.npz`` with ``index`` (N,) and ``angle`` (N x 3, Deep3DFace: ``[pitch, -yaw, roll]``) or ``yaw_pitch``
    (N x 2), optionally ``depth``, ``mask``, ``rendered_depth`` (N x H x W); or ``.json`` ``{"convention":
    "deep3dface" | "yaw_pitch", "items": [{"index", "angle" | "yaw_pitch"}]}`` (poses only). Lookups return NaN rows
    / all-zero masks for indices the tool skipped, so :func:`summarize` counts them as invalid.
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
            field = next((k for k in ("angle", "yaw_pitch") if k in data), None)
            if field is None:
                raise InputError(f"{self.path}: needs field 'angle' (N x 3, Deep3DFace) or 'yaw_pitch' (N x 2)")
            vals = np.asarray(data[field], np.float64).reshape(len(index), 3 if field == "angle" else 2)
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
        else:
            raise InputError(f"{self.path}: unsupported extension {self.path.suffix!r}; use .npz or .json")
        if len(np.unique(index)) != len(index):
            raise InputError(f"{self.path}: duplicate entries in 'index'")
        self.index = index
        self._row = {int(i): r for r, i in enumerate(index)}
        self._angles = vals if field == "angle" else yaw_pitch_to_deep3d(vals[:, 0], vals[:, 1]).double().numpy()

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, i: int) -> bool:
        return int(i) in self._row

    def missing(self, indices) -> list[int]:
        return [int(i) for i in indices if int(i) not in self._row]

    def _rows(self, arr: np.ndarray, indices, fill: float) -> torch.Tensor:
        """``arr``'s rows for these image indices, ``fill`` where missing."""
        out = np.full((len(indices), *arr.shape[1:]), fill, arr.dtype)
        for r, i in enumerate(indices):
            if int(i) in self._row:
                out[r] = arr[self._row[int(i)]]
        return torch.from_numpy(out)

    def angles(self, indices) -> torch.Tensor:
        """Deep3DFace-convention angles (B x 3) for these image indices; NaN rows where missing."""
        return self._rows(self._angles, indices, np.nan)

    def pose(self, indices) -> torch.Tensor:
        """``B x 2 [yaw, pitch]`` (our convention) for these image indices; NaN rows where missing."""
        return deep3d_to_yaw_pitch(self.angles(indices)).double() if len(indices) else torch.zeros(0, 2)

    def depth(self, indices) -> dict:
        """``dict(depth, mask[, rendered_depth])``, each B x 1 x H x W; missing images get NaN depth, zero mask."""
        if "depth" not in self.depth_maps or "mask" not in self.depth_maps:
            raise InputError(f"{self.path}: holds no 'depth' and 'mask' fields; the depth error needs both")
        return {k: self._rows(arr, indices, 0.0 if k == "mask" else np.nan)[:, None]
                for k, arr in self.depth_maps.items()}
