"""Package arrows point one way (DESIGN.md): datamodules/ and callbacks/ use gmpi_lightning, never the reverse. The
training program names its datamodule and `gmpi data` by string, as experiment YAMLs name callbacks."""

import ast

from tests.conftest import REPO


def test_gmpi_lightning_imports_neither_datamodules_nor_callbacks():
    offenders = []
    for path in sorted((REPO / "gmpi_lightning").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            offenders += [f"{path.relative_to(REPO)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0] in ("datamodules", "callbacks")]
    assert offenders == []


def test_the_named_pieces_resolve(tmp_path):
    from gmpi_lightning import cli, trainer

    module, _, name = trainer.DATAMODULE.rpartition(".")
    assert getattr(__import__(module, fromlist=[name]), name).__name__ == "PosedImageDataModule"
    assert cli.main(["data", "synthetic", "--out", str(tmp_path / "d"), "--num", "4", "--resolution", "16"]) == 0
    assert (tmp_path / "d" / "dataset.json").is_file()
