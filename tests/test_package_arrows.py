"""Arrows you can see (docs/ARCHITECTURE.md): datamodules/ and callbacks/ use gmpi_lightning; inside the package only
the composition root (cli.py, which builds the `gmpi` commands, and trainer.py, which hands LightningCLI its datamodule)
imports them, and nothing loads project code by name (importlib), so every arrow is an import statement."""

import ast

import pytest

from tests.conftest import REPO

COMPOSITION_ROOT = {"gmpi_lightning/cli.py", "gmpi_lightning/trainer.py"}


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield node.lineno, [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.lineno, [node.module or ""]


def test_only_the_composition_root_imports_datamodules_or_callbacks():
    """Rules out a library file (evaluation, rendering, the module) reaching up into the data or callback layers."""
    offenders = []
    for path in sorted((REPO / "gmpi_lightning").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        offenders += [f"{rel}:{line} {n}" for line, names in _imports(path) for n in names
                      if n.split(".")[0] in ("datamodules", "callbacks") and rel not in COMPOSITION_ROOT]
    assert offenders == []


def test_no_project_code_is_loaded_by_name():
    """Rules out hidden arrows: importlib.import_module / __import__ of a module path written as a string."""
    offenders = []
    for root in ("gmpi_lightning", "datamodules", "callbacks"):
        for path in sorted((REPO / root).rglob("*.py")):
            text = path.read_text()
            offenders += [f"{path.relative_to(REPO)}: {w}" for w in ("import_module(", "__import__(")
                          if w in text]
    assert offenders == []


def test_the_composition_root_wires_data_and_truth(tmp_path):
    from datamodules.posed_images import PosedImageDataModule
    from gmpi_lightning import cli, trainer
    from gmpi_lightning.evaluation.reference import TRUTH_RENDERERS

    assert trainer.PosedImageDataModule is PosedImageDataModule
    assert cli.main(["data", "synthetic", "--out", str(tmp_path / "d"), "--num", "4", "--resolution", "16"]) == 0
    assert (tmp_path / "d" / "dataset.json").is_file()
    assert "synthetic" in TRUTH_RENDERERS  # gmpi evaluate --reference can render the heads' ground truth


def _architecture():
    import importlib.util

    spec = importlib.util.spec_from_file_location("architecture", REPO / "scripts" / "architecture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layers_point_down_and_the_graph_has_no_cycle():
    """docs/ARCHITECTURE.md's layers hold for every product file: no import (inside functions included) from a lower
    layer to a higher one, no cycle, and every file placed in a layer (a new file must be given one)."""
    arch = _architecture()
    graph = arch.import_graph()
    assert len(graph) > 60 and sum(len(t) for t in graph.values()) > 150  # the real graph, not an empty parse
    assert [arch.layer_of(m) for m in graph]  # raises for a file in no layer
    assert arch.upward_arrows(graph) == []
    assert arch.cycles(graph) == []


def test_the_layer_check_sees_a_planted_upward_arrow_and_cycle():
    """Rules out a checker that passes everything: a render -> module arrow and a two-file loop are reported."""
    arch = _architecture()
    graph = {"gmpi_lightning.render": {"gmpi_lightning.module"}, "gmpi_lightning.module": {"gmpi_lightning.render"},
             "gmpi_lightning.cameras": set()}
    assert arch.upward_arrows(graph) == [
        "gmpi_lightning.render (networks and rendering) -> gmpi_lightning.module (training and analysis)"]
    assert arch.cycles(graph) == [["gmpi_lightning.module", "gmpi_lightning.render"]]
    with pytest.raises(KeyError, match="no layer"):
        arch.layer_of("gmpi_lightning.brand_new_module")
