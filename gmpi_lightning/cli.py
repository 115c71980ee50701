"""The ``gmpi`` command.

    gmpi fit|validate|test --config experiments/NAME.yaml [--model.key=value ...]   (LightningCLI)
    gmpi import-stylegan2 IN.pkl OUT.pt     NVlabs pickle -> plain weights_only file (no code executed)
    gmpi render --ckpt CKPT --seeds 0-3 --planes 96 --out DIR [--video] [--mesh] [--web]
    gmpi export-web --ckpt CKPT --seeds 0-3 --planes 32 --out DIR   WebGL viewer page: open from disk, orbit, depth
    gmpi data synthetic|ffhq|eg3d|folder ...  posed-image shards + dataset.json + preview.png
    gmpi evaluate --ckpt CKPT --data DATA --metrics fid,kid,consistency,depth_fd,pose,depth --out r.json
    gmpi estimators train --data data/synthetic32 --out runs/estimators/synthetic32.pt
    gmpi sweep-local experiments/sweeps/NAME.yaml [--parallel N]   W&B sweep file, run here without a server
    gmpi ablations --data synthetic          train + evaluate experiments/ablations/* into one table
    gmpi invert --ckpt CKPT --image IMG --out DIR [--pose Y,P] [--views "Y,P;..."] [--video] [--mesh]
    gmpi poses --ckpt CKPT --images DIR --out poses.json [--min-confidence C]   cameras of your own images

Each subcommand is a small function registered in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import sys
from collections.abc import Callable

from .lock import RunFolderBusy


def _import_stylegan2(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gmpi import-stylegan2",
                                description="Convert an NVlabs StyleGAN2-ADA pickle into a plain, weights_only-"
                                            "loadable file. The pickle's embedded source code is never executed.")
    p.add_argument("src", help="NVlabs network pickle (e.g. ffhq-res256-mirror-paper256-noaug.pkl)")
    p.add_argument("dst", help="output file (.pt)")
    args = p.parse_args(argv)
    from .io import load_stylegan2_pkl, save_converted

    loaded = load_stylegan2_pkl(args.src)
    save_converted(loaded, args.dst)
    for key in ("G", "D", "G_ema"):
        if key in loaded:
            kw = loaded["kwargs"][key]["init_kwargs"]
            n = sum(p.numel() for p in loaded[key].parameters())
            print(f"{key:6s} {loaded['kwargs'][key]['class_name']:14s} {kw.get('img_resolution')}px "
                  f"{n / 1e6:.2f}M parameters")
    print(f"wrote {args.dst}")
    return 0


def _floats(text: str) -> list[float]:
    return [float(v) for v in str(text).split(",") if v.strip()]


def _render(argv: list[str]) -> int:
    from .inference import add_generator_arguments

    p = argparse.ArgumentParser(
        prog="gmpi render",
        description="Render views, depth, an RGBA plane strip, a camera-sweep video and a mesh per seed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_generator_arguments(p)
    p.add_argument("--planes", type=int, default=96, help="planes at inference (the paper uses 96)")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi")
    p.add_argument("--noise-mode", default="const", choices=["const", "random", "none"])
    p.add_argument("--yaw", type=_floats, default=[-0.3, 0.0, 0.3], help="comma-separated yaws (radians)")
    p.add_argument("--pitch", type=_floats, default=[0.0], help="comma-separated pitches (radians)")
    p.add_argument("--resolution", type=int, help="render resolution (default: the generator's)")
    p.add_argument("--video", action="store_true", help="write a camera-sweep mp4 (RGB | depth)")
    p.add_argument("--trajectory", default="yaw", choices=["yaw", "pitch", "circle"])
    p.add_argument("--frames", type=int, default=100)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--mesh", action="store_true", help="marching cubes over the alpha volume -> mesh file(s)")
    p.add_argument("--mesh-level", type=float, default=0.5, help="iso-level on the smoothed alpha volume")
    p.add_argument("--mesh-format", default="ply", help="mesh files: ply, glb (glTF binary) or both, e.g. ply,glb")
    p.add_argument("--plane-chunk", type=int, help="planes per chunk in generation/compositing (memory)")
    p.add_argument("--allow-outside", action="store_true", help="render rays that miss the background plane "
                                                               "(transparent) instead of stopping")
    p.add_argument("--web", action="store_true", help="also write OUT/web/: the WebGL viewer page of these MPIs "
                                                       "(as gmpi export-web; open index.html from disk)")
    p.add_argument("--wandb-project", help="log that page to W&B (wandb.Html) in this project (implies --web)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    from .inference import run_render

    run_render(args)
    return 0


def _named(target: str) -> Callable[[list[str]], int]:
    """A subcommand that lives in another package (``module:function``), named, not imported: ``datamodules/``
    uses ``gmpi_lightning``, not the reverse."""
    def run(argv: list[str]) -> int:
        module, _, function = target.partition(":")
        return getattr(importlib.import_module(module), function)(argv)
    return run


def _lightning(argv: list[str]) -> int:
    """gmpi fit|validate|test: LightningCLI over GMPIModule + PosedImageDataModule (typed, YAML-configurable)."""
    from .trainer import run_lightning_cli

    run_lightning_cli(argv)
    return 0


def _sweep_local(argv: list[str]) -> int:
    """gmpi sweep-local SWEEP.yaml [--out DIR] [--parallel N] [--count N] [--seed S] [--dry-run] [-- overrides]"""
    from .sweeps import main

    return main(argv)


def _estimators(argv: list[str]) -> int:
    """gmpi estimators train|eval: pose/depth CNNs for the geometry metrics (gmpi_lightning/estimators.py)."""
    from .estimator_training import cli

    return cli(argv)


def _evaluate(argv: list[str]) -> int:
    """gmpi evaluate --ckpt CKPT --metrics fid,kid,consistency,depth_fd,pose,depth --num-samples N --out r.json"""
    from .evaluation.evaluate import main

    return main(argv)


def _ablations(argv: list[str]) -> int:
    """gmpi ablations --data synthetic [--rows full,no_pose_cond] [--stage train|eval|all]"""
    from .ablations import main

    return main(argv)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "import-stylegan2": (_import_stylegan2, "convert an NVlabs StyleGAN2-ADA pickle safely"),
    "render": (_render, "views, depth, plane strip, video and mesh from a checkpoint"),
    "export-web": (_named("gmpi_lightning.web:main"), "a WebGL page of generated MPIs: opens from disk, orbit, depth"),
    "fit": (lambda a: _lightning(["fit", *a]), "train (LightningCLI): gmpi fit --config experiments/synthetic.yaml"),
    "validate": (lambda a: _lightning(["validate", *a]), "validate a checkpoint (LightningCLI)"),
    "test": (lambda a: _lightning(["test", *a]), "test a checkpoint (LightningCLI)"),
    "sweep-local": (_sweep_local, "run a W&B sweep file (grid/random) here, without the W&B server"),
    "data": (_named("datamodules.cli:main"), "convert datasets (ffhq, eg3d, folder) or make synthetic heads: shards"),
    "estimators": (_estimators, "train/evaluate pose and depth estimators for the pose/depth metrics"),
    "evaluate": (_evaluate, "FID/KID, 3D consistency, depth FD, pose/depth error of a checkpoint -> JSON"),
    "ablations": (_ablations, "train and evaluate the paper's ablation rows (experiments/ablations/) into one table"),
    "invert": (_named("gmpi_lightning.invert_cli:main"), "one image -> latent + tuned generator, novel views, depth, "
                                                          "video, mesh"),
    "poses": (_named("gmpi_lightning.poses:main"), "a folder of images -> their cameras (poses.json for gmpi data "
                                                   "folder), estimated by the generator"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:18s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: gmpi COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except (FileNotFoundError, FileExistsError, ValueError, pickle.UnpicklingError, RunFolderBusy) as e:  # user errors
        print(f"gmpi {argv[0]}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
