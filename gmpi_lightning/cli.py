"""The ``gmpi`` command.

    gmpi import-stylegan2 IN.pkl OUT.pt     NVlabs pickle -> plain weights_only file (no code executed)

Each subcommand is a small function registered in ``COMMANDS``; later subcommands (fit, render,
evaluate, data) plug in the same way.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable


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


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "import-stylegan2": (_import_stylegan2, "convert an NVlabs StyleGAN2-ADA pickle safely"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:18s} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: gmpi COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except (FileNotFoundError, ValueError, pickle.UnpicklingError) as e:  # user-facing errors, no traceback
        print(f"gmpi {argv[0]}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
