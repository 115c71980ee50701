"""Renderer and generator throughput on this machine: `python benchmarks/bench_render.py` (make bench).

Measures render_mpi (one view, B=1) at 256/512 px with 32/96 planes, all planes at once vs plane-chunked,
and one GMPI generator forward at the FFHQ256 architecture (channel_base 16384, 96 planes, random weights).
Peak RSS is the process high-water mark (ru_maxrss), so run configurations from small to large.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from gmpi_lightning import cameras
from gmpi_lightning.nn.gmpi import GMPIGenerator
from gmpi_lightning.planes import preset_planes
from gmpi_lightning.presets import get_preset
from gmpi_lightning.render import render_mpi


def timed(fn, repeat: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = args.device
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    preset = get_preset("FFHQ256")
    c2w = cameras.sphere_c2w(0.3, 0.1, 1.0, 1.0).to(dev)
    print("| what | resolution | planes | chunk | ms / view | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for res, n in ((256, 32), (256, 96), (512, 96)):
        planes = preset_planes(preset, n)
        mpi = torch.rand(1, n, 4, res, res, device=dev)
        for chunk in (None, 16):
            kw = dict(plane_depths=planes.depths, plane_extents=planes.extents, c2w=c2w,
                      fov_deg=preset.fov_deg, height=res, width=res, plane_chunk=chunk)
            ms = 1000 * timed(lambda m=mpi, kw=kw: render_mpi(m, **kw), args.repeat)
            print(f"| render_mpi | {res} | {n} | {chunk or 'all'} | {ms:.0f} | {peak_mb():.0f} |")
    G = GMPIGenerator(z_dim=512, c_dim=0, w_dim=512, img_resolution=256,
                      synthesis_kwargs=dict(channel_base=16384, channel_max=512, num_fp16_res=4, conv_clamp=256)).eval()
    G.to(dev)
    codes = preset.normalized_plane_depths(96).to(dev)
    z = torch.randn(1, 512, device=dev)
    ms = 1000 * timed(lambda: G(z, None, codes), args.repeat)
    print(f"| GMPIGenerator FFHQ256 arch | 256 | 96 | all | {ms:.0f} | {peak_mb():.0f} |")


if __name__ == "__main__":
    main()
