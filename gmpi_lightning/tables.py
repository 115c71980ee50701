"""Result files and tables of sweeps and ablations: JSON markers, rows of dicts as CSV and markdown."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

GOALS = ("minimize", "maximize")


def read_json(path: str | os.PathLike) -> dict | None:
    """A JSON object from ``path``, or None when the file is missing, unreadable or not an object (a marker file
    that a killed run left half-written counts as absent)."""
    try:
        blob = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return blob if isinstance(blob, dict) else None


def format_cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return ""
    return str(v)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def write_table(rows: list[dict], csv_path: str | os.PathLike | None, md_path: str | os.PathLike | None,
                sort_by: str | None = None, goal: str = "minimize", title: str | None = None,
                plus_minus: dict[str, str] | None = None) -> list[dict]:
    """Write ``rows`` (dicts; columns in first-seen order) as CSV and as a markdown table. With ``sort_by``
    both are sorted by that column (``goal`` minimize: ascending, maximize: descending); rows without a finite
    number there keep their order at the end. ``plus_minus`` maps a column to its uncertainty column: the
    markdown shows ``value ± uncertainty`` in one cell, the CSV keeps both columns. Returns the rows in the written
    order."""
    if goal not in GOALS:
        raise ValueError(f"goal must be minimize or maximize, got {goal!r}")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    ordered = list(rows)
    if sort_by:
        sign = -1.0 if goal == "maximize" else 1.0
        scored = [(i, _number(r.get(sort_by))) for i, r in enumerate(ordered)]
        ordered = [rows[i] for i, x in sorted(scored, key=lambda t: (t[1] is None, sign * (t[1] or 0.0), t[0]))]
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in ordered:
                w.writerow({c: "" if r.get(c) is None else r.get(c) for c in columns})
    if md_path is not None:
        def cell(v):
            return format_cell(v).replace("|", "\\|").replace("\n", " ")

        pm = plus_minus or {}
        shown = [c for c in columns if c not in pm.values()]

        def value(r, c):
            err = _number(r.get(pm[c])) if c in pm else None
            shown_err = err is not None and _number(r.get(c)) is not None
            return cell(r.get(c)) + (f" ± {format_cell(err)}" if shown_err else "")

        numeric = [all(_number(r.get(c)) is not None or r.get(c) in (None, "") for r in ordered)
                   and any(_number(r.get(c)) is not None for r in ordered) for c in shown]
        lines = [f"# {title}", ""] if title else []
        lines.append("| " + " | ".join(cell(c) for c in shown) + " |")
        lines.append("|" + "|".join("---:" if n else "---" for n in numeric) + "|")
        lines += ["| " + " | ".join(value(r, c) for c in shown) + " |" for r in ordered]
        Path(md_path).parent.mkdir(parents=True, exist_ok=True)
        Path(md_path).write_text("\n".join(lines) + "\n")
    return ordered
