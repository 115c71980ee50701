"""Arrows you can see (docs/ARCHITECTURE.md): datamodules/ and callbacks/ use gmpi_lightning; inside the package only
the composition root (cli.py, which builds the `gmpi` commands, and trainer.py, which hands LightningCLI its datamodule)
imports them, and nothing loads project code by name (importlib), so every arrow is an import statement."""

import ast

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
