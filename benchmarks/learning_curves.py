"""Learning curves from training runs' eval.jsonl (the EvaluationCallback's log) and, for the discriminator's
overfitting heuristic and the augmentation probability, their metrics.csv: one line per run, or per arm.

    python benchmarks/learning_curves.py runs/sweeps/where_3d --out docs/figures/where_3d.png
    python benchmarks/learning_curves.py runs/sweeps/suspects --out docs/figures/suspects.png --table
    python benchmarks/learning_curves.py runs/sweeps/priors --panels est_fd --out docs/figures/priors.png
    python benchmarks/learning_curves.py runs/sweeps/small_data --panels ada_rt,augment_p,est_fd --table

Each argument is a run folder (its ``**/eval.jsonl``) or a sweep folder (every ``run-*`` in it, labelled with the
run's parameters from ``done.json`` / ``config.yaml``). Runs that differ only in their seeds (``seed_everything``,
``data.seed``: ``gmpi sweep-local --seeds``) form one arm, drawn as its mean with a band of ± one standard deviation
and tabulated as ``mean ± sd (n)`` at the iterations every seed reached. ``--reference`` adds the reference rows of
a ``gmpi evaluate --reference`` JSON as horizontal lines (ground-truth renders, ground-truth MPI, billboard, ...), so
every curve has its scale.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

PANELS = {"pose_yaw_slope": "pose slope (1 = turns with the camera)", "pose": "pose error (rad²)",
          "depth": "depth error (z-scored; flat = 1)", "depth_fd": "depth FD", "depth_relief": "depth relief",
          "est_fd": "est_fd (estimator-feature FD to the reals)",
          "ada_rt": "r_t = E[sign D(real)] (1: D memorised the reals)", "augment_p": "augmentation p"}
TRAIN_KEYS = ("ada_rt", "augment_p")  # metrics.csv's train/<key>, logged every log_every_n_steps iterations
DEFAULT_PANELS = ("pose_yaw_slope", "pose", "depth", "depth_fd", "depth_relief")
LOG_PANELS = ("depth_fd", "est_fd")
REF_STYLE = {"renders": ("k", ":", "ground-truth renders"), "mpi": ("k", "--", "ground-truth MPI"),
             "mpi_blur": ("tab:gray", "--", "ground-truth MPI, blurred"),
             "billboard": ("tab:gray", "-.", "billboard")}  # black/grey: never a run's colour
SEED_KEYS = ("seed_everything", "data.seed")


def read_curve(run: Path) -> list[dict]:
    """[{iteration, metric: value}] of one run, in iteration order (a resumed run's repeats: the last one wins):
    the evaluations, and :data:`TRAIN_KEYS` where the training log has them."""
    points: dict[int, dict] = {}
    for log in sorted(run.glob("**/metrics.csv")):
        with open(log, newline="") as f:
            for row in csv.DictReader(f):
                values = {k: float(row[f"train/{k}"]) for k in TRAIN_KEYS if row.get(f"train/{k}")}
                if values and row.get("train/iteration"):
                    it = int(float(row["train/iteration"]))
                    points.setdefault(it, {"iteration": it}).update(values)
    for log in sorted(run.glob("**/eval.jsonl")):
        for line in log.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                points.setdefault(int(d["iteration"]), {"iteration": int(d["iteration"])}).update(d["metrics"])
    return [points[k] for k in sorted(points)]


def params_of(run: Path) -> dict:
    """What the run varies (params.json, written when it starts; done.json's copy for older runs)."""
    for name, key in (("params.json", None), ("done.json", "params")):
        f = run / name
        if f.is_file():
            blob = json.loads(f.read_text())
            return (blob.get(key) if key else blob) or {}
    return {}


def arm_label(sweep: str, params: dict) -> str:
    shown = {k.split(".")[-1]: Path(str(v)).stem if str(v).endswith(".yaml") else v for k, v in params.items()
             if not k.endswith("max_iters") and k not in SEED_KEYS}
    return f"{sweep}: " + ", ".join(f"{k}={v}" for k, v in shown.items()) if shown else sweep


def collect(paths: list[str]) -> list[tuple[str, list[list[dict]]]]:
    """[(arm label, [one curve per seed])], arms in first-seen order."""
    arms: dict[str, list[list[dict]]] = {}
    for p in map(Path, paths):
        runs = sorted(q for q in p.glob("run-*") if q.is_dir() and ".old-" not in q.name) or [p]
        for r in runs:
            if c := read_curve(r):
                label = arm_label(p.name if r is not p else r.parent.name, params_of(r)) if r is not p else r.name
                arms.setdefault(label, []).append(c)
    if not arms:
        raise SystemExit(f"no eval.jsonl under {paths}: train with an EvaluationCallback (e.g. the overlay "
                         f"experiments/overlays/learning_curve.yaml)")
    return list(arms.items())


def mean_sd(curves: list[list[dict]], key: str, complete: bool = True) -> list[tuple[int, float, float, int]]:
    """(iteration, mean, sd, n) over the curves at each iteration (``complete``: only where every curve has a
    value); sd is the sample standard deviation (0 for one curve)."""
    by_it: dict[int, list[float]] = {}
    for c in curves:
        for p in c:
            if p.get(key) is not None:
                by_it.setdefault(p["iteration"], []).append(float(p[key]))
    out = []
    for it in sorted(by_it):
        v = by_it[it]
        if complete and len(v) < len(curves):
            continue
        m = sum(v) / len(v)
        sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
        out.append((it, m, sd, len(v)))
    return out


def plot(arms, path: Path, reference: dict | None = None, title: str = "", panels=DEFAULT_PANELS) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for label, curves in arms:
            pts = mean_sd(curves, key)
            if not pts:
                continue
            it, m, sd, n = zip(*pts)
            line, = ax.plot(it, m, marker="o", ms=3, label=f"{label} (n={max(n)})" if max(n) > 1 else label)
            if max(n) > 1:
                ax.fill_between(it, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                color=line.get_color(), alpha=0.15, lw=0)
        for kind, row in (reference or {}).items():
            value = row["metrics"].get(key)
            if value is not None and kind in REF_STYLE:
                color, style, ref_label = REF_STYLE[kind]
                ax.axhline(value, color=color, ls=style, lw=1, label=ref_label)
        ax.set(title=PANELS.get(key, key), xlabel="iteration")
        ax.grid(alpha=0.3)
        if key in LOG_PANELS:
            ax.set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.suptitle(title or "metrics during training (mean ± sd over seeds where an arm has several)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 3), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def table(arms, panels=DEFAULT_PANELS) -> str:
    lines = ["| arm | iteration | " + " | ".join(panels) + " |", "|---|---|" + "---|" * len(panels)]
    for label, curves in arms:
        stats = {k: {it: (m, sd, n) for it, m, sd, n in mean_sd(curves, k)} for k in panels}
        for it in sorted(set().union(*(s.keys() for s in stats.values()))):
            cells = []
            for k in panels:
                if it not in stats[k]:
                    cells.append("n/a")
                    continue
                m, sd, n = stats[k][it]
                cells.append(f"{m:.3g} ± {sd:.2g} ({n})" if n > 1 else f"{m:.3g}")
            lines.append(f"| {label} | {it} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders or sweep folders (run-*)")
    ap.add_argument("--out", default="learning_curves.png")
    ap.add_argument("--reference", help="a `gmpi evaluate --reference ...` JSON: reference rows as lines")
    ap.add_argument("--panels", default=",".join(DEFAULT_PANELS), help=f"metrics to draw, from {', '.join(PANELS)}")
    ap.add_argument("--title", default="")
    ap.add_argument("--table", action="store_true", help="print every point as a markdown table")
    args = ap.parse_args(argv)
    panels = [p for p in args.panels.split(",") if p]
    arms = collect(args.runs)
    ref = json.loads(Path(args.reference).read_text()).get("reference") if args.reference else None
    print(f"wrote {plot(arms, Path(args.out), ref, args.title, panels)}")
    if args.table:
        print(table(arms, panels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
