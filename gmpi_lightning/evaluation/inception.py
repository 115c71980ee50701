"""The Inception feature extractor: torch-fidelity's ``inception-v3-compat`` (the TF-Inception port StyleGAN,
EG3D and GMPI use), 2048-d pool features (FID, KID, precision/recall) and the 1008 ``logits_unbiased`` (Inception
Score) from one pass, images resized to 299 with TF1.x bilinear (no antialias). Weights come from a local file
only (:func:`resolve_weights`); nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data import file_sha256
from ..errors import InputError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
ENV_VAR = "GMPI_INCEPTION_WEIGHTS"
EXTRACTOR = "torch-fidelity inception-v3-compat, 2048-d pool3, TF1.x bilinear resize to 299 (no antialias)"


def hub_cache_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def resolve_weights(weights: str | Path | None = None) -> Path:
    """The local Inception weights file: ``weights`` (``--inception``), else ``$GMPI_INCEPTION_WEIGHTS``, else
    torch.hub's cache; or a FileNotFoundError that says how to provide it."""
    candidates = [("--inception / weights argument", weights), (f"${ENV_VAR}", os.environ.get(ENV_VAR)),
                  ("torch.hub cache", hub_cache_path())]
    for origin, path in candidates:
        if path and Path(path).is_file():
            return Path(path)
        if path and origin != "torch.hub cache":
            raise FileNotFoundError(f"Inception weights not found at {path} (from {origin}); expected the file "
                                    f"{INCEPTION_FILE}")
    raise FileNotFoundError(
        f"FID/KID need torch-fidelity's Inception weights {INCEPTION_FILE}, and nothing is downloaded. Fetch it once "
        f"on a machine with internet ({INCEPTION_URL}) and pass --inception PATH, set {ENV_VAR}=PATH, or copy it to "
        f"{hub_cache_path()}. (Metrics that need no Inception: consistency, depth_fd, pose, depth.)")


class InceptionFeatures(torch.nn.Module):
    """uint8 images (B x 3 x H x W, any size) -> B x 2048 float64 pool features (:meth:`forward`), or those and the
    B x 1008 logits (:meth:`features_and_logits`)."""

    num_features = 2048
    num_logits = 1008

    def __init__(self, weights: str | Path | None = None, batch_size: int = 64):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.weights = resolve_weights(weights)
        try:
            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"],
                                          feature_extractor_weights_path=str(self.weights), antialias=False)
        except Exception as e:  # noqa: BLE001 (a truncated or foreign file: say which)
            raise InputError(f"{self.weights}: cannot load it as torch-fidelity's Inception ({INCEPTION_FILE}): "
                             f"{type(e).__name__}: {e}") from e
        self.batch_size = batch_size

    def describe(self) -> dict:
        return {"extractor": EXTRACTOR, "weights": str(self.weights), "weights_sha256": file_sha256(self.weights)}

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B x 2048 pool features, B x 1008 logits without the bias, as torch-fidelity's Inception Score uses),
        float64 on the CPU."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"Inception features need uint8 B x 3 x H x W images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        dev = next(self.net.parameters()).device
        feats, logits = ([torch.zeros(0, n, dtype=torch.float64)] for n in (self.num_features, self.num_logits))
        for i in range(0, images.shape[0], self.batch_size):
            # every feature of features_list (torchmetrics' forward returns only the first)
            pool, unbiased = self.net._torch_fidelity_forward(images[i:i + self.batch_size].to(dev))
            feats.append(pool.reshape(pool.shape[0], -1).double().cpu())
            logits.append(unbiased.double().cpu())
        return torch.cat(feats), torch.cat(logits)


def to_uint8_images(x: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Float images in ``value_range`` -> uint8 (round half up), as a PNG written with clip(x)*255 reads back."""
    lo, hi = value_range
    return ((x.detach().float() - lo) / (hi - lo) * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def write_random_inception(path: str | Path, seed: int = 0) -> Path:
    """A random Inception file with the real one's state-dict layout (tests, smoke runs; its numbers compare only
    with themselves). He init, as PyTorch's default makes every activation vanish through ~90 layers (FID = KID = 0
    exactly); classifier weights and bias N(0, 3^2), so logits differ by a few units between images (by 0.03 with
    the default init: IS 1.0005 whatever the images) and the bias, which the Inception Score leaves out, matters."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
         mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5
        elif isinstance(m, torch.nn.Linear):
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * 3.0
            m.bias.data = torch.randn(m.bias.shape, generator=gen) * 3.0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path
