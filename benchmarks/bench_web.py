"""Frames per second of the WebGL viewer (`gmpi export-web`) in headless Chromium: `python benchmarks/bench_web.py`.

Writes pages of synthetic MPIs (smooth random colour and alpha, GMPI's layout: one shared colour layer plus an
opaque background) at 256 px with 32 and 96 planes, opens each in headless Chromium, waits for "ready", lets the
page's own render loop run for --seconds and reads the FPS it reports (frames drawn per second, continuous
rendering, display-synced so at most the browser's frame rate, 60 here). Also the time from navigation to the
first frame (decode + texture upload). Default: software GL (SwiftShader, the flags headless CI needs);
--gpu: the browser's hardware GL (a machine with a GPU and a driver Chromium accepts).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gmpi_lightning.planes import preset_planes
from gmpi_lightning.presets import get_preset
from gmpi_lightning.web import ViewerWriter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests/browser.py drives Chromium
from tests.browser import Chromium  # noqa: E402


def synthetic_mpi(n_planes: int, res: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = lambda c, k: F.interpolate(torch.rand(1, c, k, k, generator=g), size=(res, res), mode="bilinear",
                                        align_corners=True)[0]
    rgb = smooth(3, 12)
    alpha = torch.sigmoid((smooth(n_planes, 6) - 0.7) * 20)
    alpha[-1] = 1.0  # opaque background plane
    return torch.cat([rgb[None].expand(n_planes, 3, res, res), alpha[:, None]], dim=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--planes", default="32,96")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=4.0, help="render-loop time before the FPS is read")
    ap.add_argument("--gpu", action="store_true", help="hardware GL instead of SwiftShader")
    args = ap.parse_args()
    preset, res = get_preset("FFHQ256"), args.resolution
    rows = []
    with tempfile.TemporaryDirectory() as tmp, Chromium(software_gl=not args.gpu) as browser:
        for n in (int(v) for v in args.planes.split(",")):
            out = Path(tmp) / f"p{n}"
            with ViewerWriter(out, preset, preset_planes(preset, n), res, res, [0], verbose=False) as page:
                page.add(0, synthetic_mpi(n, res))
            t0 = time.perf_counter()
            browser.open(f"{(out / 'index.html').as_uri()}?seed=0&yaw=0.2&pitch=-0.1", res, res + 60, timeout=300)
            first = time.perf_counter() - t0
            time.sleep(args.seconds)
            fps = browser.evaluate("window.gmpiViewer.fps")
            renderer = browser.evaluate("(() => { const gl = document.getElementById('view').getContext('webgl2');"
                                        " const e = gl.getExtension('WEBGL_debug_renderer_info');"
                                        " return e ? gl.getParameter(e.UNMASKED_RENDERER_WEBGL) : gl.getParameter("
                                        "gl.RENDERER); })()")
            size = sum(f.stat().st_size for f in out.iterdir()) / 2**20
            rows.append((n, res, fps, first, size, renderer))
    print("| planes | px | page FPS | first frame s | page MB | GL renderer |\n|---|---|---|---|---|---|")
    for n, r, fps, first, size, renderer in rows:
        print(f"| {n} | {r} | {fps:.1f} | {first:.1f} | {size:.1f} | {renderer} |")


if __name__ == "__main__":
    main()
