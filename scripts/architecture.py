#!/usr/bin/env python
"""The house as its imports draw it: every product file, its layer, and the arrows between files.

    python scripts/architecture.py                       # check the layers, print the table
    python scripts/architecture.py --draw docs/figures/architecture.png

A file's arrows are all its imports of project code, those inside functions included. ``LAYERS`` says which layer
each file belongs to (first matching prefix); a file may import files of its own layer or of lower ones, never a
higher one, and the graph may have no cycle. ``tests/test_package_arrows.py`` holds both; docs/ARCHITECTURE.md
describes each layer.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = ("gmpi_lightning", "datamodules", "callbacks")

# (layer name, module prefixes), lowest first. The first matching prefix wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundations", ("gmpi_lightning.errors", "gmpi_lightning.presets", "gmpi_lightning.cameras",
                     "gmpi_lightning.planes", "gmpi_lightning.lock", "gmpi_lightning.run_paths")),
    ("networks and rendering", ("gmpi_lightning.nn", "gmpi_lightning.render", "gmpi_lightning.losses",
                                "gmpi_lightning.augment", "gmpi_lightning.io", "gmpi_lightning.data",
                                "gmpi_lightning.image_losses", "gmpi_lightning.hparams",
                                "gmpi_lightning.mesh_io", "gmpi_lightning.export")),
    ("scenes and sampling", ("gmpi_lightning.scene", "gmpi_lightning.sampling", "gmpi_lightning.views",
                             "gmpi_lightning.inference", "gmpi_lightning.estimators", "gmpi_lightning.web")),
    ("training and analysis", ("gmpi_lightning.networks", "gmpi_lightning.streams", "gmpi_lightning.training_log",
                               "gmpi_lightning.module", "gmpi_lightning.estimator_training",
                               "gmpi_lightning.evaluation", "gmpi_lightning.pose_search", "gmpi_lightning.pose_reader",
                               "gmpi_lightning.inversion", "gmpi_lightning.camera_fit", "gmpi_lightning.poses")),
    ("data and callbacks", ("datamodules", "callbacks")),
    ("commands", ("gmpi_lightning.commands", "gmpi_lightning.invert_cli", "gmpi_lightning.runs",
                  "gmpi_lightning.sweeps", "gmpi_lightning.ablations", "gmpi_lightning.trainer",
                  "gmpi_lightning.cli", "gmpi_lightning.__main__")),
]
PACKAGE_ROOTS = {"gmpi_lightning": 0}  # the package's own __init__ (empty): a prefix of every file, so matched exactly


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every product file."""
    out = {}
    for root in ROOTS:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(name: str, mods: dict) -> str | None:
    """The product module an imported name lives in (``a.b.c`` -> ``a.b`` when ``c`` is a symbol)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph() -> dict[str, set[str]]:
    """Module -> the product modules it imports (any import statement anywhere in the file)."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[:len(up) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in node.names]  # a submodule, else a symbol of ``base``
            for n in names:
                if (hit := _resolve(n, mods)) and hit != mod:
                    targets.add(hit)
        graph[mod] = targets
    for mod in graph:  # a package's __init__ is not an arrow to its own files
        graph[mod] = {t for t in graph[mod] if not (mod.startswith(t + ".") and t in graph)}
    return graph


def layer_of(mod: str) -> int:
    if mod in PACKAGE_ROOTS:
        return PACKAGE_ROOTS[mod]
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(mod == p or mod.startswith(p + ".") for p in prefixes):
            return i
    raise KeyError(f"{mod} is in no layer of scripts/architecture.py LAYERS: add it")


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def draw(graph: dict[str, set[str]], out: Path) -> None:
    """One row per layer (lowest at the bottom), one box per file, arrows between layers summed per pair of boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = defaultdict(list)
    for mod in sorted(graph):
        rows[layer_of(mod)].append(mod)
    width = max(len(v) for v in rows.values())
    fig, ax = plt.subplots(figsize=(max(12, width * 1.25), 1.6 * len(LAYERS) + 1))
    pos = {}
    for layer, mods in rows.items():
        y = layer * 1.6
        for i, mod in enumerate(mods):
            x = (i + 0.5) * width / len(mods)
            pos[mod] = (x, y)
            short = mod.replace("gmpi_lightning.", "").replace("gmpi_lightning", "gmpi_lightning/__init__")
            short = short.replace(".", "/")
            ax.text(x, y, short.replace("/", "/\n", 1) if len(short) > 14 else short, ha="center", va="center",
                    fontsize=7, bbox=dict(boxstyle="round,pad=0.25", fc=f"C{layer}", alpha=0.25, ec="0.4"))
        ax.text(-0.6, y, LAYERS[layer][0], ha="right", va="center", fontsize=10, weight="bold")
    for a, targets in graph.items():
        for b in targets:
            if layer_of(a) != layer_of(b):
                (x0, y0), (x1, y1) = pos[a], pos[b]
                ax.annotate("", xy=(x1, y1 + 0.25), xytext=(x0, y0 - 0.25),
                            arrowprops=dict(arrowstyle="->", lw=0.4, color="0.55", alpha=0.5))
    ax.set_xlim(-4, width + 0.5)
    ax.set_ylim(-0.8, 1.6 * (len(LAYERS) - 1) + 0.8)
    ax.axis("off")
    ax.set_title("gmpi-lightning: every product file by layer; arrows are imports (always downwards)", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draw", type=Path, help="write the picture here (PNG)")
    args = ap.parse_args(argv)
    graph = import_graph()
    up, cyc = upward_arrows(graph), cycles(graph)
    lines = {}
    for mod, path in modules().items():
        lines[layer_of(mod)] = lines.get(layer_of(mod), 0) + len(path.read_text().splitlines())
    print("| layer | files | lines |\n|---|---:|---:|")
    for i, (name, _) in enumerate(LAYERS):
        print(f"| {name} | {sum(layer_of(m) == i for m in graph)} | {lines.get(i, 0)} |")
    print(f"upward arrows: {len(up)}; cycles: {len(cyc)}")
    for line in up + [" <-> ".join(c) for c in cyc]:
        print("  ", line)
    if args.draw:
        draw(graph, args.draw)
        print("wrote", args.draw)
    return 1 if up or cyc else 0


if __name__ == "__main__":
    raise SystemExit(main())
