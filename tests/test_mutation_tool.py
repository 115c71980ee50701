"""scripts/mutation.py's own logic, without running mutmut: how a survivor is located and described, when a declared
reason applies to it, and the copy that keeps Lightning's constructors unmutated."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("mutation_tool", ROOT / "scripts" / "mutation.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


SOURCE = '''"""doc"""


def scale(x, k=2.0):
    y = x * k
    return y + 1


class Box:
    def area(self, w,
             h):
        return w * h
'''

# the shape of mutmut's output: the original and each mutant as functions named x_<f>__mutmut_<k> (methods:
# xǁ<Class>ǁ<m>__mutmut_<k>), with the trampolines and bookkeeping around them
MUTATED = '''"""doc"""


def x_scale__mutmut_orig(x, k=2.0):
    y = x * k
    return y + 1


def x_scale__mutmut_1(x, k=2.0):
    y = x / k
    return y + 1


def x_scale__mutmut_2(x, k=3.0):
    y = x * k
    return y + 1


class Box:
    def xǁBoxǁarea__mutmut_orig(self, w,
             h):
        return w * h

    def xǁBoxǁarea__mutmut_1(self, w,
             h):
        return w + h
'''


def test_survivors_are_located_on_the_real_file_lines(tool, tmp_path, monkeypatch):
    """Each mutant is described by its function (Class.method for methods), the line of the real file that changed and
    the removed and added text. Rules out line numbers counted in mutmut's generated file (where every function
    appears many times) and a method taken for a function."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(SOURCE)
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    d = tool.describe_mutants("pkg/m.py", MUTATED)
    assert d["x_scale__mutmut_1"] == ("scale", 5, "y = x * k", "y = x / k")
    assert d["x_scale__mutmut_2"] == ("scale", 4, "def scale(x, k=2.0):", "def scale(x, k=3.0):")
    assert d["xǁBoxǁarea__mutmut_1"] == ("Box.area", 12, "return w * h", "return w + h")


def test_a_declared_reason_applies_only_where_its_text_was_replaced(tool):
    """A declaration matches a survivor of its file and function whose change took `old` out and put `new` in. Rules
    out a declaration that also covers another mutation on the same line (the `old` text still there)."""
    entry = dict(file="f.py", function="g", old='indexing="ij"', new="", why="default")
    same_line = "v, u = mesh(a(device=device), indexing=\"ij\")"
    dropped = tool.Survivor("m1", "g", 3, same_line, "v, u = mesh(a(device=device), )", "survived")
    other = tool.Survivor("m2", "g", 3, same_line, "v, u = mesh(a(device=None), indexing=\"ij\")", "survived")
    assert tool._matches(entry, "f.py", dropped) and not tool._matches(entry, "f.py", other)
    assert not tool._matches(entry, "h.py", dropped) and not tool._matches({**entry, "function": "k"}, "f.py", dropped)


def test_lightning_constructors_are_kept_unmutated_on_the_same_lines(tool, tmp_path, monkeypatch):
    """In a file that defines a LightningModule every __init__ gets mutmut's block pragma after the colon that ends
    its (multi-line) header, and nothing else changes: same line count, same times. Rules out the pragma on the def
    line (mutmut reads it only after the colon) and a copy that shifts the lines the summary reports."""
    src = ("import lightning.pytorch as pl\n\n\nclass M(pl.LightningModule):\n"
           "    def __init__(self, a: int = 1,\n"
           "                 b: dict | None = None):  # keep\n"
           "        super().__init__()\n        self.save_hyperparameters()\n"
           "\n    def step(self):\n        return 1\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(src)
    monkeypatch.setattr(tool, "ROOT", tmp_path)
    out = tmp_path / "work"
    (out / "pkg").mkdir(parents=True)
    tool._copy_for_mutmut("pkg/m.py", out)
    lines = (out / "pkg" / "m.py").read_text().splitlines()
    assert len(lines) == len(src.splitlines())
    assert [i for i, line in enumerate(lines) if "pragma: no mutate block" in line] == [5]
    assert lines[5].startswith("                 b: dict | None = None):  # keep")
    assert (out / "pkg" / "m.py").stat().st_mtime_ns == (tmp_path / "pkg" / "m.py").stat().st_mtime_ns
    (tmp_path / "pkg" / "plain.py").write_text("def f():\n    return 1\n")
    tool._copy_for_mutmut("pkg/plain.py", out)
    assert not (out / "pkg" / "plain.py").exists()  # other files: mutmut reads the package copy unchanged
