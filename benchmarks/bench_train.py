"""Training-iteration benchmark: `make bench-train` (README "Training speed").

One full GMPI iteration (D step with R1, G step with worst-of-4 views, EMA, Lightning's own per-step work) is timed
from one batch start to the next through a real ``Trainer.fit`` on synthetic shards of the right resolution, for:

    synthetic32   the machine's speed yardstick that time budgets are quoted against: the 32 px recipe (batch 8, 32
                  planes, no shading) at 128 channels, kept fixed so figures stay comparable (the default run now
                  trains at 64 channels, about 1.9x cheaper per iteration: docs/3D.md)
    ffhq64        FFHQ geometry with small nets at 64 px, batch 4, 32 planes, shading on (the side-by-side config)
    ffhq256       the FFHQ256 architecture (NVlabs widths), batch 2 on CPU (8 on a GPU), shading on
    ffhq512       the FFHQ512 architecture (GPU only by default)
    ffhq1024      the FFHQ1024 architecture, batch 4 in 2 chunks (GPU only by default)

Prints img/s, seconds per iteration, peak memory and the host reads per iteration, on CPU and, where CUDA is present,
in fp32 and bf16. ``--profile`` adds where the time goes (exclusive time per phase, including the amortised cost of
the default run's evaluation and media callbacks); ``--code DIR`` benchmarks another checkout (e.g. a `git worktree`
of an older commit) with this script, for before/after tables.

    python benchmarks/bench_train.py --configs synthetic32,ffhq64 --profile
    python benchmarks/bench_train.py --code /tmp/before --configs synthetic32 --profile
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]

SHADED = dict(shading=dict(enabled=True, start=0), optim=dict(betas=(0.0, 0.9)), views=dict(per_z=4), train_planes=32)
CONFIGS = {
    "synthetic32": dict(res=32, batch=8, gpu_batch=8, model=dict(
        preset="synthetic32", arch=dict(z_dim=128, w_dim=128, mapping_layers=4, channel_base=4096, channel_max=128),
        train_planes=32, views=dict(per_z=4), optim=dict(r1_gamma=10.0, grad_clip=10.0, betas=(0.0, 0.9)),
        alpha=dict(init_gain=0.3, init_logit=-1.0), shading=dict(enabled=False), ema=dict(kimg=1.0))),
    "ffhq64": dict(res=64, batch=4, gpu_batch=4, model=dict(
        SHADED, preset="FFHQ256", resolution=64,
        arch=dict(z_dim=512, w_dim=512, mapping_layers=8, channel_base=8192, channel_max=256))),
    "ffhq256": dict(res=256, batch=2, gpu_batch=8, model=dict(SHADED, preset="FFHQ256")),
    "ffhq512": dict(res=512, batch=2, gpu_batch=4, model=dict(
        SHADED, preset="FFHQ512", optim=dict(betas=(0.0, 0.9), batch_split=2))),
    "ffhq1024": dict(res=1024, batch=1, gpu_batch=4, model=dict(
        SHADED, preset="FFHQ1024", optim=dict(betas=(0.0, 0.9), batch_split=2))),
}


def profiling():
    """This checkout's profiling tools (also when ``--code`` benchmarks an older one that lacks them)."""
    import importlib.util

    if "bench_profiling" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_profiling", HERE / "benchmarks" / "profiling.py")
        sys.modules["bench_profiling"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["bench_profiling"])
    return sys.modules["bench_profiling"]


def data_for(res: int, cache: Path) -> Path:
    from datamodules.converters import convert_synthetic

    out = cache / f"synthetic{res}"
    if not (out / "dataset.json").exists():
        convert_synthetic(out, num=64, resolution=res, seed=0, samples_per_shard=16)
    return out


def phases(timer):
    """The phases of an iteration, patched by name so that the same table works on older checkouts."""
    import lightning.pytorch as pl
    import torch

    import gmpi_lightning.module as M
    from gmpi_lightning.nn import discriminator as Dm
    from gmpi_lightning.nn.gmpi import GMPIGenerator

    render_owner = sys.modules.get("gmpi_lightning.scene") if hasattr(sys.modules.get("gmpi_lightning.scene"),
                                                                       "render_mpi") else M
    timer.wrap(GMPIGenerator, "forward", "G forward (MPI)")
    timer.wrap(render_owner, "render_mpi", "render (warp + composite)")
    timer.wrap(Dm.Discriminator, "forward", "D forward")
    timer.wrap(Dm.PoseConditionedDiscriminator, "forward", "D forward")
    timer.wrap(pl.LightningModule, "manual_backward", "backward")
    timer.wrap(torch.optim.Adam, "step", "Adam step")
    timer.wrap(M, "r1_penalty", "R1 (grad of D)")
    timer.wrap(M, "ema_update", "EMA")
    views = sys.modules.get("gmpi_lightning.views")  # where the fakes are made (older checkouts: the module)
    timer.wrap(views or M, "shade_mpi", "shading")
    names = {"_finish_step": "clip + finite check", "finish_step": "clip + finite check",
             "select_views": "view search (rest)", "g_step_condition": "view search (rest)",
             "d_step": "D step (rest)", "g_step": "G step (rest)", "training_step": "training_step (rest)"}
    owners = [*M.GMPIModule.__mro__] + ([views.PosedViews] if views else [])
    for name, label in names.items():
        owner = next((c for c in owners if name in vars(c)), None)
        if owner is not None:
            timer.wrap(owner, name, label)
    timer.wrap(pl.LightningModule, "log_dict", "logging")
    return timer


def amortised_callbacks(trainer, module, data: str, every: int = 200, max_iters: int = 800) -> dict:
    """Seconds per iteration of the default run's callbacks: evaluation and sample grid every ``every`` iterations,
    sweep video and mesh once at the end of ``max_iters``."""
    from callbacks.media import MeshExport, SampleGrid, SweepVideo
    from callbacks.metrics import EvaluationCallback

    out = Path(tempfile.mkdtemp())
    cost = {}
    ev = EvaluationCallback(every_n_iters=every, metrics=["consistency", "depth_fd"], num_samples=64, batch_size=16,
                            data=data)
    for name, cb, period in (("evaluation every 200 (64 fakes)", ev, every),
                             ("sample grid every 200", SampleGrid(every_n_iters=every, seeds=list(range(6)),
                                                                 yaws=[-0.4, 0.0, 0.4], out_dir=str(out)), every),
                             ("sweep video at the end", SweepVideo(frames=48, fps=12, seeds=[0, 1], out_dir=str(out)),
                              max_iters),
                             ("mesh at the end", MeshExport(seeds=[0], out_dir=str(out)), max_iters)):
        if hasattr(cb, "last_iteration"):
            cb.last_iteration = None
        t0 = time.perf_counter()
        cb.run(trainer, module)
        cost[name] = (time.perf_counter() - t0) / period
    return cost


def run(name: str, args, device: str, precision: str) -> dict:
    import lightning.pytorch as pl
    import torch

    from datamodules.posed_images import PosedImageDataModule
    from gmpi_lightning.module import GMPIModule
    from gmpi_lightning.training_log import peak_memory_mb

    IterationProbe, PhaseTimer = profiling().IterationProbe, profiling().PhaseTimer

    cfg = CONFIGS[name]
    data = data_for(cfg["res"], Path(args.cache))
    batch = cfg["gpu_batch"] if device == "cuda" else cfg["batch"]
    torch.manual_seed(0)
    iters = args.warmup + args.iters
    module = GMPIModule(**cfg["model"], max_iters=iters, export_path=None)
    timer = phases(PhaseTimer(cuda=device == "cuda")) if args.profile else None
    probe = IterationProbe(timer, skip=args.warmup)
    trainer = pl.Trainer(accelerator=device, devices=1, precision=precision, max_epochs=-1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=20, callbacks=[probe],
                         default_root_dir=tempfile.mkdtemp())
    dm = PosedImageDataModule(str(data), batch_size=batch, batches_per_epoch=1000, num_workers=args.workers, seed=0,
                              shuffle_buffer=64)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync_warnings = None
    if timer is not None:
        with timer:
            trainer.fit(module, dm)
    elif device == "cuda" and args.sync_debug:
        import warnings

        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(module, dm)
        torch.cuda.set_sync_debug_mode(0)
        sync_warnings = sum("synchroniz" in str(w.message) for w in caught) / max(1, iters)
    else:
        trainer.fit(module, dm)
    secs = sorted(probe.seconds)
    median = secs[len(secs) // 2]
    peak = peak_memory_mb(torch.device(device))
    row = {"config": name, "device": device, "precision": precision, "batch": batch, "iters": len(secs),
           "s_per_iter": median, "s_per_iter_mean": sum(secs) / len(secs), "seconds": probe.seconds,
           "img_per_s": batch / median, "peak_mem_mb": peak,
           "host_reads_per_iter": sorted(probe.reads)[len(probe.reads) // 2],
           "project_reads_per_iter": sorted(probe.project_reads)[len(probe.project_reads) // 2]}
    if sync_warnings is not None:
        row["cuda_sync_warnings_per_iter"] = sync_warnings
    if timer is not None:
        total = sum(probe.seconds)
        row["phases"] = {k: v / len(secs) for k, v in sorted(timer.total.items(), key=lambda kv: -kv[1])}
        row["phase_total_s"] = total / len(secs)
        if name == "synthetic32":
            row["callbacks_amortised"] = amortised_callbacks(trainer, module, str(data))
    return row


def print_table(rows: list[dict]) -> None:
    print("\n| config | device | precision | batch | s/iter | img/s | peak MB | host reads/iter (ours) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['device']} | {r['precision']} | {r['batch']} | {r['s_per_iter']:.3f} | "
              f"{r['img_per_s']:.2f} | {r['peak_mem_mb']:.0f} | {r['host_reads_per_iter']} "
              f"({r['project_reads_per_iter']}) |")
    for r in rows:
        if "phases" not in r:
            continue
        print(f"\n{r['config']} ({r['device']}, {r['precision']}): {r['s_per_iter']:.3f} s per iteration")
        print("| phase | s/iter | share |\n|---|---|---|")
        for k, v in r["phases"].items():
            print(f"| {k} | {v:.4f} | {100 * v / r['phase_total_s']:.0f} % |")
        for k, v in r.get("callbacks_amortised", {}).items():
            print(f"| callback: {k} | {v:.4f} | (amortised) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None, help=f"comma list of {sorted(CONFIGS)} (default: by device)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations (default 10; 3 for >= 256 px on CPU)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1, help="data loader workers (the default run uses 1)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--profile", action="store_true", help="time the phases of an iteration (slower)")
    ap.add_argument("--sync-debug", action="store_true", help="CUDA: count torch.cuda sync warnings per iteration")
    ap.add_argument("--code", help="benchmark the gmpi_lightning of this checkout instead")
    ap.add_argument("--cache", default=str(HERE / "runs" / "bench"), help="where the benchmark shards are kept")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.code).resolve()) if args.code else str(HERE))
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    device = "cuda" if cuda else "cpu"
    names = args.configs.split(",") if args.configs else (
        ["synthetic32", "ffhq256", "ffhq512"] if cuda else ["synthetic32", "ffhq64", "ffhq256"])
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    rows = []
    for name in names:
        for precision in (["32-true", "bf16-mixed"] if cuda else ["32-true"]):
            a = argparse.Namespace(**vars(args))
            a.iters = args.iters or (3 if CONFIGS[name]["res"] >= 256 and not cuda else 10)
            print(f"[bench-train] {name} on {device} ({precision}), {a.warmup} + {a.iters} iterations ...",
                  flush=True)
            rows.append(run(name, a, device, precision))
            r = rows[-1]
            print(f"[bench-train] {name} {precision}: {r['s_per_iter']:.4f} s/iter, {r['img_per_s']:.2f} img/s, "
                  f"peak {r['peak_mem_mb']:.0f} MB", flush=True)
            if args.json:  # after every row, so a run stopped part-way keeps what it measured
                Path(args.json).write_text(json.dumps({"rows": rows}, indent=1))
    print_table(rows)
    meta = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "threads": torch.get_num_threads(), "code": args.code or str(HERE)}
    print("\n" + json.dumps(meta))
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
