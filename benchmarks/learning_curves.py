"""Learning curves of 3D metrics from training runs' eval.jsonl (the EvaluationCallback's log), one line per run.

    python benchmarks/learning_curves.py runs/sweeps/where_3d --out docs/figures/where_3d.png
    python benchmarks/learning_curves.py runs/synthetic_long runs/sweeps/where_3d/run-003 --reference eval_ref.json

Each argument is a run folder (its ``**/eval.jsonl``) or a sweep folder (every ``run-*`` in it, labelled with the
run's parameters from ``done.json`` / ``config.yaml``). ``--reference`` adds the reference rows of a ``gmpi evaluate
--reference`` JSON as horizontal lines (ground-truth renders, ground-truth MPI, billboard), so every curve has its
scale. Also prints a markdown table of each run's metrics at every evaluated iteration (``--table``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = [("pose_yaw_slope", "pose slope (1 = turns with the camera)"), ("pose", "pose error (rad²)"),
          ("depth", "depth error (z-scored; flat = 1)"), ("depth_fd", "depth FD"),
          ("depth_relief", "depth relief")]
REF_STYLE = {"renders": ("k", ":", "ground-truth renders"), "mpi": ("k", "--", "ground-truth MPI"),
             "billboard": ("tab:gray", "-.", "billboard")}  # black/grey: never a run's colour


def read_curve(run: Path) -> list[dict]:
    """[{iteration, metric: value}] of one run, in iteration order (a resumed run's repeats: the last one wins)."""
    points: dict[int, dict] = {}
    for log in sorted(run.glob("**/eval.jsonl")):
        for line in log.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                points[int(d["iteration"])] = {"iteration": int(d["iteration"]), **d["metrics"]}
    return [points[k] for k in sorted(points)]


def label_of(run: Path) -> str:
    """``sweep/run-NNN: what it varies`` (from done.json; a run stopped before the end has none: the folder names)."""
    name = f"{run.parent.name}/{run.name}"
    done = run / "done.json"
    if done.is_file():
        params = json.loads(done.read_text()).get("params") or {}
        shown = {k.split(".")[-1]: Path(v).stem if str(v).endswith(".yaml") else v for k, v in params.items()
                 if not k.endswith("max_iters")}
        if shown:
            return f"{name}: " + ", ".join(f"{k}={v}" for k, v in shown.items())
    return name


def collect(paths: list[str]) -> list[tuple[str, list[dict]]]:
    out = []
    for p in map(Path, paths):
        runs = sorted(q for q in p.glob("run-*") if q.is_dir()) or [p]
        out += [(label_of(r), c) for r in runs if (c := read_curve(r))]
    if not out:
        raise SystemExit(f"no eval.jsonl under {paths}: train with an EvaluationCallback (e.g. the overlay "
                         f"experiments/overlays/learning_curve.yaml)")
    return out


def plot(curves, path: Path, reference: dict | None = None, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, name) in zip(axes, PANELS):
        for label, c in curves:
            pts = [(p["iteration"], p[key]) for p in c if p.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=label)
        for kind, row in (reference or {}).items():
            value = row["metrics"].get(key)
            if value is not None and kind in REF_STYLE:
                color, style, ref_label = REF_STYLE[kind]
                ax.axhline(value, color=color, ls=style, lw=1, label=ref_label)
        ax.set(title=name, xlabel="GMPI iteration")
        ax.grid(alpha=0.3)
        if key == "depth_fd":
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title or "3D metrics during training (64 fakes per point)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 4), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def table(curves) -> str:
    keys = [k for k, _ in PANELS]
    lines = ["| run | iteration | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for label, c in curves:
        for p in c:
            lines.append(f"| {label} | {p['iteration']} | "
                         + " | ".join(f"{p[k]:.3g}" if p.get(k) is not None else "n/a" for k in keys) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders or sweep folders (run-*)")
    ap.add_argument("--out", default="learning_curves.png")
    ap.add_argument("--reference", help="a `gmpi evaluate --reference ...` JSON: reference rows as lines")
    ap.add_argument("--title", default="")
    ap.add_argument("--table", action="store_true", help="print every point as a markdown table")
    args = ap.parse_args(argv)
    curves = collect(args.runs)
    ref = json.loads(Path(args.reference).read_text()).get("reference") if args.reference else None
    print(f"wrote {plot(curves, Path(args.out), ref, args.title)}")
    if args.table:
        print(table(curves))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
