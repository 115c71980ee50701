"""The reference fixtures ship with the repository, and a missing one fails a test instead of skipping it."""

from __future__ import annotations

import re

import pytest

from tests.conftest import FIXTURES, REPO, fixture_dir


def test_every_listed_fixture_is_vendored_and_small():
    readme = (REPO / "tests" / "fixtures" / "README.md").read_text()
    files_section = readme.split("## Files", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([^`]+)` \|", files_section, re.M)
    assert len(listed) == 13  # the README's file table
    for name in listed:
        path = FIXTURES / name
        assert path.is_file(), f"fixture {name} missing from {FIXTURES}"
        assert path.stat().st_size < 5 << 20, f"{name} is over 5 MB"


def test_missing_fixture_fails_not_skips():
    with pytest.raises(pytest.fail.Exception, match="reference fixtures not found"):
        fixture_dir("no-such-fixture-set")


def test_no_test_skips_for_missing_fixtures():
    for path in sorted((REPO / "tests").glob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"pytest\.skip\(([^)]*)\)", text):
            assert "fixture" not in m.group(1).lower(), f"{path.name} skips on a missing fixture: {m.group(0)}"
