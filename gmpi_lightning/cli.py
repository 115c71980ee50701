"""The ``gmpi`` command (``gmpi --help`` lists them, :data:`HELP`): one typed function per command, its parser built
from the signature and docstring; ``gmpi fit|validate|test`` is LightningCLI (:mod:`.trainer`).

Flags are the functions' parameter names with dashes (``--noise-mode``; the underscore spelling works too), types and
defaults come from the annotations, help from the docstrings' ``Args:``; a parameter typed as a dataclass contributes
its fields as flags of their own. This is the composition root: the one module of the package that imports
``datamodules`` and ``callbacks`` (through ``trainer`` and the ``data`` command), so every arrow is visible.
"""

from __future__ import annotations

import dataclasses
import inspect
import pickle
import re
import shlex
import sys
from collections.abc import Callable
from functools import partial

from jsonargparse import ArgumentParser

from .commands import render as render_commands
from .commands import set_invocation
from .errors import USER_ERRORS, InputError

PROG = "gmpi"


def command_parser(func: Callable, prog: str, positional: bool = False) -> ArgumentParser:
    """A parser of ``func``'s keyword arguments (``positional``: required ones as positional arguments); a parameter
    named ``overrides`` is not a flag: it receives what follows ``--`` on the command line."""
    doc = inspect.getdoc(func) or ""
    parser = ArgumentParser(prog=prog, description=doc.split("\n\n")[0], exit_on_error=True)
    flat = {n: p.annotation for n, p in _parameters(func).items() if dataclasses.is_dataclass(p.annotation)}
    parser.add_function_arguments(func, as_positional=positional, skip=set(flat) | {"overrides"}, nested_key=None)
    for cls in flat.values():
        parser.add_class_arguments(cls, nested_key=None)
    for action in list(parser._actions):  # --noise-mode as well as --noise_mode; --video as well as --video true
        for option in [o for o in action.option_strings if o.startswith("--") and "_" in o]:
            alias = option.replace("_", "-")
            action.option_strings.append(alias)
            parser._option_string_actions[alias] = action
        if action.option_strings and "bool" in str(getattr(action, "_typehint", "")):
            action.nargs, action.const = "?", True
    return parser


def _parameters(func: Callable) -> dict[str, inspect.Parameter]:
    sig = inspect.signature(func, eval_str=True)
    return {n: p for n, p in sig.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def run(func: Callable, argv: list[str], prog: str, positional: bool = False):
    """Parse ``argv`` for ``func`` and call it; dataclass-typed parameters are rebuilt from their flags."""
    params = _parameters(func)
    argv = _join_negative_values(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    if cut < len(argv) and "overrides" not in params:
        raise InputError(f"{prog} takes no arguments after `--`")
    ns = command_parser(func, prog, positional).parse_args(argv[:cut]).as_dict()
    set_invocation(" ".join([prog, *map(shlex.quote, argv)]))  # recorded by commands that write results
    kwargs = {"overrides": argv[cut + 1:]} if "overrides" in params else {}
    for name, p in params.items():
        if dataclasses.is_dataclass(p.annotation):
            kwargs[name] = p.annotation(**{f.name: ns.pop(f.name) for f in dataclasses.fields(p.annotation)
                                           if f.name in ns})
        elif name in ns:
            kwargs[name] = ns.pop(name)
    try:
        return func(**kwargs)
    finally:
        set_invocation("")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--pose -0.2,0`` -> ``--pose=-0.2,0``: argparse reads a value that starts with '-' as an option."""
    out = []
    for a in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and re.match(r"-[\d.]", a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def _lightning(subcommand: str, argv: list[str]) -> None:
    from .trainer import run_lightning_cli

    run_lightning_cli([subcommand, *argv])


def _commands() -> dict:
    """name -> (function, positional) or name -> {subcommand: ...}; ``fit``-like entries take raw argv."""
    import datamodules.synthetic  # noqa: F401  (registers the synthetic heads' ground truth for --reference rows)
    from datamodules import cli as data_cli

    from . import ablations, estimator_training, sweeps
    from .commands import evaluate as evaluate_cmd
    from .commands import invert as invert_cmd

    return {
        "import-stylegan2": (render_commands.import_stylegan2, True),
        "render": (render_commands.render, False), "export-web": (render_commands.export_web, False),
        **{sub: partial(_lightning, sub) for sub in ("fit", "validate", "test")},
        "sweep-local": (sweeps.sweep_local, True),
        "data": {"synthetic": (data_cli.synthetic, False), "ffhq": (data_cli.ffhq, False),
                 "eg3d": (data_cli.eg3d, False), "folder": (data_cli.folder, False)},
        "estimators": {"train": (estimator_training.train_command, False),
                       "eval": (estimator_training.eval_command, False)},
        "evaluate": (evaluate_cmd.evaluate_command, False), "ablations": (ablations.ablations, False),
        "invert": (invert_cmd.invert, False), "poses": (invert_cmd.poses, False),
    }


HELP = {
    "import-stylegan2": "convert an NVlabs StyleGAN2-ADA pickle safely",
    "render": "views, depth, plane strip, video and mesh from a checkpoint",
    "export-web": "a WebGL page of generated MPIs: opens from disk, orbit, depth",
    "fit": "train (LightningCLI): gmpi fit --config experiments/synthetic.yaml",
    "validate": "validate a checkpoint (LightningCLI)", "test": "test a checkpoint (LightningCLI)",
    "sweep-local": "run a W&B sweep file (grid/random) here, without the W&B server",
    "data": "convert datasets (ffhq, eg3d, folder) or make synthetic heads: shards",
    "estimators": "train/evaluate pose and depth estimators for the pose/depth metrics",
    "evaluate": "FID/KID, 3D consistency, depth FD, pose/depth error of a checkpoint -> JSON",
    "ablations": "train and evaluate the paper's ablation rows (experiments/ablations/) into one table",
    "invert": "one image -> latent + tuned generator, novel views, depth, video, mesh",
    "poses": "a folder of images -> their cameras (poses.json for gmpi data folder), estimated by the generator",
}


def dispatch(argv: list[str]) -> int:
    table, asked = _commands(), not argv or argv[0] in ("-h", "--help")
    if asked or argv[0] not in table:
        usage = f"usage: {PROG} COMMAND [ARGS]\n\ncommands:\n" + "\n".join(f"  {n:18s} {h}" for n, h in HELP.items())
        print(usage if asked else f"{PROG}: unknown command {argv[0]!r}\n" + usage)
        return 0 if asked else 2
    entry, prog, rest = table[argv[0]], f"{PROG} {argv[0]}", argv[1:]
    if isinstance(entry, dict):
        if not rest or rest[0] not in entry:
            print(f"usage: {prog} {{{','.join(entry)}}} [ARGS]  (--help after one for its options)")
            return 0 if rest[:1] in (["-h"], ["--help"]) else 2
        entry, prog, rest = entry[rest[0]], f"{prog} {rest[0]}", rest[1:]
    result = run(entry[0], rest, prog, entry[1]) if isinstance(entry, tuple) else entry(rest)
    return result if isinstance(result, int) else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return dispatch(argv)
    except (*USER_ERRORS, pickle.UnpicklingError) as e:  # deliberate input errors: one line; a bug: its traceback
        print(f"{PROG} {argv[0]}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
