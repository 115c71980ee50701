"""Camera estimation by analysis-by-synthesis against ground truth: held-out synthetic heads spread over the prior.

    python benchmarks/bench_poses.py --ckpt runs/synthetic/gmpi.pt --num 32

Each head (indices from the data card's ``count`` on: never in the training shards) is drawn by the synthetic renderer
at its own pose from the preset's prior (the training distribution, not shrunk), and its camera is estimated three
ways:

* ``search + refine``: what ``gmpi invert`` and ``gmpi poses`` do without ``--pose``: the grid search over the prior
  (``gmpi_lightning.pose_search``), then yaw and pitch learned with the latent in stage 1 (no pivotal tuning: it
  does not move the camera);
* ``search only``: the search's winner, before the refinement;
* ``pose CNN``: the pose estimator's reading (``runs/estimators/<data>.pt``; skipped when there is none), and
  ``pose CNN + refine``: that reading as the start of the same refinement (``gmpi invert --pose-init cnn``);
* ``reader``: the reading of the checkpoint's own pose reader (``gmpi_lightning.pose_reader``, trained on the
  checkpoint's renders, cached next to it; ``--no-reader`` leaves it out), and ``reader-guided search + refine``:
  the search and refinement over the half of the prior's yaw range around that reading (``gmpi invert --pose-init
  reader``);
* ``prior mean``: the preset's mean pose for every head (what knowing nothing gives).

``--profile N`` maps the loss instead: each head is scored at an N-yaw x ``pitches`` grid of fixed cameras over the
whole prior (each with its own w and ``--search steps``; no camera moves), and the script reports where the lowest
loss lies against the truth, and how much lower it is on the head's side than on the mirrored one (profile.json).

``--source generator`` draws the heads with the checkpoint itself instead (seed k's latent, the same prior poses):
images the generator can reproduce exactly, so the rows then measure the search and the refinement alone, without
the gap between the generator's heads and the renderer's.

Reported: mean, median and max |yaw error| and |pitch error| in radians against the renderer's truth, and for the
search the confidence (runner-up's loss gap) of heads whose yaw is off by more than 0.1 rad against the rest. Writes
``results.json`` and ``table.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from heads import add_common_flags, add_run_flags, overrides, setup  # benchmarks/heads.py

from datamodules.synthetic import render_heads, sample_poses
from gmpi_lightning.camera_fit import estimate_camera, mirror_average
from gmpi_lightning.cameras import clamp_to_prior
from gmpi_lightning.estimators import load_estimators
from gmpi_lightning.inversion import InvertSettings, invert, latent_stats
from gmpi_lightning.pose_reader import ReaderSettings, reader_for
from gmpi_lightning.pose_search import SearchSettings, search_pose
from gmpi_lightning.scene import Scene

ROWS = ("search + refine", "search only", "reader-guided search + refine", "reader", "pose CNN + refine", "pose CNN",
        "prior mean")
WRONG = 0.1  # rad: a yaw error this large is a wrong camera, not an imprecise one


def _stats(values) -> dict:
    v = np.abs(np.asarray(values, np.float64))
    return {"mean": float(v.mean()), "median": float(np.median(v)), "max": float(v.max()), "n": len(v)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_common_flags(ap, ", if there")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--skip", type=int, default=0, help="start after this many held-out heads (a fresh set)")
    ap.add_argument("--source", choices=["data", "generator"], default="data",
                    help="heads drawn by the synthetic renderer (default) or by the checkpoint itself")
    ap.add_argument("--steps", type=int, default=InvertSettings.steps, help="stage 1 steps (camera refined)")
    ap.add_argument("--search", action="append", default=[], metavar="KEY=VALUE",
                    help="override a SearchSettings field, e.g. --search yaws=9 (repeatable)")
    ap.add_argument("--no-reader", action="store_true", help="leave out the checkpoint's pose reader rows")
    ap.add_argument("--reader-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a ReaderSettings field, e.g. --reader-set steps=500 (repeatable)")
    ap.add_argument("--profile", type=int, metavar="N", help="map the loss over N fixed yaws per head instead")
    ap.add_argument("--mirror", action="store_true",
                    help="mirror each head left-right (its true yaw negated): beside a run without, the same "
                         "heads seen from the other side")
    ap.add_argument("--average-mirror", nargs=2, metavar=("RUN", "MIRRORED_RUN"),
                    help="no estimation: the table of two runs' --out folders (without and with --mirror) with each "
                         "camera averaged with its mirror's (gmpi poses --mirror), written to --out")
    add_run_flags(ap, "pose_lr=0.005", "runs/bench/poses")
    args = ap.parse_args()
    if args.average_mirror:
        if args.out == ap.get_default("out") or Path(args.out).resolve() in {Path(d).resolve()
                                                                            for d in args.average_mirror}:
            raise SystemExit("--average-mirror writes a new table: pass an --out other than its two runs' folders")
        mirror_table(*args.average_mirror, Path(args.out))
        return
    if args.mirror and args.profile:
        raise SystemExit("--profile maps the loss of the heads as drawn: it takes no --mirror")
    card, cfg, loaded = setup(args)
    G, preset = loaded.G, loaded.preset
    est_path = Path(args.estimators or Path("runs/estimators") / f"{Path(args.data).name}.pt")
    pose_cnn = load_estimators(est_path)[0] if est_path.is_file() else None
    if pose_cnn is None:
        print(f"no pose estimator at {est_path}: the pose CNN row is left out")
    reader = None if args.no_reader or args.profile else \
        reader_for(args.ckpt, G, preset, ReaderSettings(**overrides(args.reader_set)), device=args.device)
    settings = InvertSettings(steps=args.steps, pti_steps=0,
                              **overrides(args.set))
    search = SearchSettings(**overrides(args.search))
    indices = list(range(card["count"] + args.skip, card["count"] + args.skip + args.num))
    true_yaw, true_pitch = sample_poses(indices, cfg)
    if args.profile:
        return loss_profile(args, G, preset, cfg, indices, true_yaw.tolist(), true_pitch.tolist(),
                            replace(search, yaws=args.profile, pose_lr=0.0))
    heads = []
    print(f"{args.ckpt}: {len(indices)} held-out heads from index {indices[0]} at their prior poses; search "
          f"{search.yaws} x {search.pitches} x {search.steps} steps, stage 1 {settings.steps} steps, "
          f"{args.threads} thread(s)")
    for n, (idx, y, p) in enumerate(zip(indices, true_yaw.tolist(), true_pitch.tolist())):
        image = head(idx, y, p, cfg, G, preset, args)
        if args.mirror:
            image, y = image.flip(-1), -y
        wall, cpu = time.perf_counter(), time.process_time()
        found = estimate_camera(G, preset, image, settings, search)  # what gmpi invert and gmpi poses run
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rec = {"index": idx, "yaw": y, "pitch": p, "seconds": wall, "cpu_seconds": cpu,
               **{k: found[k] for k in ("confidence", "loss_gap", "runner_up", "recon_psnr")},
               "estimates": {"search + refine": [found["yaw"], found["pitch"]], "search only": found["search"],
                             "prior mean": [preset.yaw_mean, preset.pitch_mean]}}
        if pose_cnn is not None:
            with torch.no_grad():
                read = [float(v) for v in pose_cnn.to(image.device)(image * 2 - 1)[0]]
            start = clamp_to_prior(*read, preset)  # as gmpi invert: a reading outside the prior is clamped
            refined = invert(G, preset, image, *start, settings=settings, refine_pose=True)
            rec["estimates"]["pose CNN"] = read
            rec["estimates"]["pose CNN + refine"] = [refined.yaw, refined.pitch]
        if reader is not None:  # the search around the reader's reading (--pose-init reader)
            guided = estimate_camera(G, preset, image, settings, search, reader)
            rec["estimates"]["reader"] = guided["reader"]
            rec["estimates"]["reader-guided search + refine"] = [guided["yaw"], guided["pitch"]]
        heads.append(rec)
        ours = rec["estimates"]["search + refine"]
        print(f"[{n + 1}/{len(indices)}] head {idx} truth {y:+.3f} {p:+.3f}: estimated {ours[0]:+.3f} {ours[1]:+.3f} "
              f"(search {found['search'][0]:+.3f} {found['search'][1]:+.3f}, confidence "
              f"{found['confidence']:.3f}), recon {rec['recon_psnr']:.1f} dB, {wall:.1f} s ({cpu:.1f} CPU s)")
    write_report(args, heads, settings, search)


@torch.no_grad()
def head(seed: int, yaw: float, pitch: float, cfg, G, preset, args) -> torch.Tensor:
    """Held-out head ``seed`` at (yaw, pitch), 1 x 3 x R x R in [0, 1]: the synthetic renderer's, or with ``--source
    generator`` the checkpoint's own (seed's latent, the training planes, 8-bit as a file holds it)."""
    if args.source != "generator":
        return render_heads([seed], cfg)["image"].permute(0, 3, 1, 2).float().div(255).to(args.device)
    scene = Scene.for_generator(G, preset, preset.train_planes, args.device)
    rgb = scene.render_pose(scene.generate(G, scene.seed_latents([seed], G.z_dim)), yaw, pitch)["rgb"]
    return (rgb * 255 + 0.5).floor() / 255


def write_report(args, heads: list[dict], settings: InvertSettings, search: SearchSettings) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = {}
    for name in ROWS:
        rows = [h for h in heads if name in h["estimates"]]
        if rows:
            table[name] = {"yaw": _stats([h["estimates"][name][0] - h["yaw"] for h in rows]),
                           "pitch": _stats([h["estimates"][name][1] - h["pitch"] for h in rows])}
    wrong = [h for h in heads if abs(h["estimates"]["search + refine"][0] - h["yaw"]) > WRONG]
    right = [h for h in heads if h not in wrong]
    conf = {"wrong": [h["confidence"] for h in wrong], "right": [h["confidence"] for h in right]}
    digest = hashlib.sha256(Path(args.ckpt).read_bytes()).hexdigest()[:12]
    seconds = float(np.mean([h["seconds"] for h in heads]))
    cpu = float(np.mean([h["cpu_seconds"] for h in heads]))
    command = (f"python benchmarks/bench_poses.py --ckpt {args.ckpt} --num {args.num}"
               + (f" --skip {args.skip}" if args.skip else "")
               + (f" --source {args.source}" if args.source != "data" else "")
               + (f" --steps {args.steps}" if args.steps != InvertSettings.steps else "")
               + "".join(f" --set {kv}" for kv in args.set) + "".join(f" --search {kv}" for kv in args.search)
               + (" --no-reader" if args.no_reader else "") + "".join(f" --reader-set {kv}" for kv in args.reader_set)
               + (" --mirror" if args.mirror else ""))
    lines = [f"`{command}` (checkpoint sha256 {digest}; {len(heads)} held-out heads ({args.source}"
             f"{', mirrored' if args.mirror else ''}) at prior poses; "
             f"{seconds:.1f} s wall, {cpu:.1f} CPU s per head on {args.device}, {args.threads} thread(s))", "",
             "| camera from | mean \\|yaw error\\| | median | max | mean \\|pitch error\\| | median | max |",
             "|---|---|---|---|---|---|---|"]
    for name, t in table.items():
        y, p = t["yaw"], t["pitch"]
        lines.append(f"| {name} | {y['mean']:.3f} | {y['median']:.3f} | {y['max']:.3f} | {p['mean']:.3f} | "
                     f"{p['median']:.3f} | {p['max']:.3f} |")
    lines += ["", f"Yaw off by more than {WRONG} rad: {len(wrong)} of {len(heads)} heads; search confidence "
              f"{_mean_text(conf['wrong'])} on those, {_mean_text(conf['right'])} on the rest."]
    md = "\n".join(lines) + "\n"
    (out / "table.md").write_text(md)
    result = {"command": command, "checkpoint": args.ckpt, "checkpoint_sha256": digest, "settings": vars(settings),
              "search": vars(search), "seconds": seconds, "cpu_seconds": cpu, "table": table,
              "confidence": conf, "heads": heads}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(md + f"wrote {out}/table.md, results.json")
    return result


def loss_profile(args, G, preset, cfg, indices: list[int], true_yaw: list[float], true_pitch: list[float],
                 search: SearchSettings) -> None:
    """The image loss over a grid of fixed cameras, per held-out head (lowest over the pitches at each yaw)."""
    G = G.eval().requires_grad_(False)
    scene, stats = Scene(preset, preset.train_planes).to(args.device), latent_stats(G)
    heads = []
    for idx, y, p in zip(indices, true_yaw, true_pitch):
        image = head(idx, y, p, cfg, G, preset, args)
        found = search_pose(G, scene, image, search, stats)
        yaws = found.start_yaws.view(search.pitches, search.yaws)[0]
        loss = found.losses.view(search.pitches, search.yaws).min(0).values
        own, mirrored = float(loss[yaws * y > 0].min()), float(loss[yaws * y < 0].min())  # the grid's 0 is neither
        heads.append({"index": idx, "yaw": y, "grid_yaws": yaws.tolist(), "loss": loss.tolist(),
                      "lowest_at": float(yaws[loss.argmin()]), "own_side": own, "mirrored_side": mirrored})
        print(f"head {idx} truth {y:+.3f}: lowest loss at {heads[-1]['lowest_at']:+.3f}; own side {own:.4f}, "
              f"mirrored {mirrored:.4f} ({(mirrored - own) / mirrored:+.1%})", flush=True)
    err = [abs(h["lowest_at"] - h["yaw"]) for h in heads]
    gaps = [(h["mirrored_side"] - h["own_side"]) / h["mirrored_side"] for h in heads]
    summary = {"command": f"python benchmarks/bench_poses.py --ckpt {args.ckpt} --num {args.num} --profile "
                          f"{args.profile}" + (f" --source {args.source}" if args.source != "data" else "")
                          + "".join(f" --search {kv}" for kv in args.search),
               "search": vars(search), "mean_abs_error_of_lowest": float(np.mean(err)),
               "mirrored_side_lower": sum(g < 0 for g in gaps), "median_side_gap": float(np.median(gaps)),
               "heads": heads}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(heads)} heads: lowest loss {summary['mean_abs_error_of_lowest']:.3f} rad from the truth on average; "
          f"lower on the mirrored side for {summary['mirrored_side_lower']}; own side lower by "
          f"{summary['median_side_gap']:.1%} (median); wrote {out}/profile.json")


def mirror_table(run: str, mirrored_run: str, out: Path) -> dict:
    """Each row's error alone (both runs pooled: 2 x N views of the heads) and averaged with the mirror's estimate
    as ``gmpi poses --mirror`` averages it; how far apart the two were on heads the average misses by more than
    WRONG and on the rest."""
    plain, mirrored = (json.loads((Path(d) / "results.json").read_text()) for d in (run, mirrored_run))
    by_index = {h["index"]: h for h in mirrored["heads"]}
    same = all(plain[k] == mirrored[k] for k in ("checkpoint_sha256", "settings", "search"))
    if not same or mirrored["command"] != plain["command"] + " --mirror" \
            or sorted(by_index) != sorted(h["index"] for h in plain["heads"]):
        raise SystemExit(f"{run} and {mirrored_run} must be runs of the same command on the same checkpoint, the "
                         f"second with --mirror added")
    header = (r"| camera from | alone: mean \|yaw error\| | mirror-averaged: mean | median | max | mean \|pitch "
              r"error\| | image vs mirror apart: on misses | on the rest |")
    table, lines = {}, [f"Mirror-averaged cameras: `{plain['command']}` and `{mirrored['command']}` (checkpoint "
                        f"sha256 {plain['checkpoint_sha256']}; {len(by_index)} heads)", "", header,
                        "|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        pairs = [(h, by_index[h["index"]]) for h in plain["heads"] if name in h["estimates"]]
        if not pairs or name == "prior mean":
            continue
        alone, avg, pitch, apart = [], [], [], []
        for h, m in pairs:
            (y1, p1), (y2, p2) = h["estimates"][name], m["estimates"][name]
            cam = mirror_average({"yaw": y1, "pitch": p1, "confidence": 0.0}, {"yaw": y2, "pitch": p2,
                                                                                "confidence": 0.0})
            alone += [abs(y1 - h["yaw"]), abs(y2 - m["yaw"])]
            avg.append(cam["yaw"] - h["yaw"])
            pitch.append(cam["pitch"] - h["pitch"])
            apart.append(cam["mirror_disagreement"])
        miss = [a for a, e in zip(apart, avg) if abs(e) > WRONG]
        rest = [a for a, e in zip(apart, avg) if abs(e) <= WRONG]
        table[name] = {"alone": float(np.mean(alone)), "yaw": _stats(avg), "pitch": _stats(pitch),
                       "apart_on_misses": miss, "apart_on_rest": rest}
        y = table[name]["yaw"]
        lines.append(f"| {name} | {table[name]['alone']:.3f} | {y['mean']:.3f} | {y['median']:.3f} | {y['max']:.3f} "
                     f"| {table[name]['pitch']['mean']:.3f} | {_mean_text(miss)} | {_mean_text(rest)} |")
    md = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(md)
    (out / "results.json").write_text(json.dumps({"runs": [run, mirrored_run], "table": table}, indent=1))
    print(md + f"wrote {out}/table.md, results.json")
    return table


def _mean_text(values) -> str:
    values = [v for v in values if v is not None]
    return f"{np.mean(values):.3f} (mean of {len(values)})" if values else "-"


if __name__ == "__main__":
    main()
