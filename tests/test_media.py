"""Media callbacks (callbacks/media.py): grid layout, determinism, schedule, video, mesh, wandb, a real `gmpi fit`."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from types import SimpleNamespace

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import yaml

from callbacks.media import MeshExport, SampleGrid, SweepVideo, module_sampler, run_dir
from gmpi_lightning import export
from gmpi_lightning.cli import main as gmpi_main
from gmpi_lightning.module import GMPIModule, StyleGAN2Module
from gmpi_lightning.planes import preset_planes
from gmpi_lightning.presets import get_preset
from gmpi_lightning.scene import Scene, seed_latents
from tests.conftest import REPO, TINY_ARCH

RES = 16
SG2_ARGS = ("preset", "resolution", "arch")
TINY = dict(preset="synthetic32", resolution=RES, arch=dict(z_dim=16, w_dim=16, mapping_layers=2, channel_base=256,
                                                            channel_max=16), train_planes=6, views=dict(per_z=2),
            max_iters=3)


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    m = GMPIModule(**TINY)
    with torch.no_grad():  # as after training: per-pixel noise matters (it starts at strength 0)
        for name, p in m.G_ema.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
    return m


def fake_trainer(root, loggers=(), rank0=True, global_step=0):
    return SimpleNamespace(is_global_zero=rank0, loggers=list(loggers), default_root_dir=str(root),
                           global_step=global_step)


def png(path) -> np.ndarray:
    return iio.imread(path)


# --------------------------------------------------------------------------------------------- the grid
def test_grid_layout_depth_tiles_and_fixed_cameras(module, tmp_path):
    seeds, yaws, pitches, r = [0, 1, 2], [-0.3, 0.0, 0.3], [0.0, 0.1], 24
    module.iteration = 7
    cb = SampleGrid(every_n_iters=1, seeds=seeds, yaws=yaws, pitches=pitches, resolution=r)
    files = cb.run(fake_trainer(tmp_path), module)
    assert [f.name for f in files] == ["samples_it000007.png", "planes_it000007_seed0000.png"]
    assert all(f.parent == tmp_path / "media" for f in files)
    grid, lay = png(files[0]), cb.layout
    k = len(yaws) * len(pitches)
    # seeds rows x (K RGB tiles | K depth tiles), each 24 px view repeated 6x (>= 128 px), labels above and left
    assert lay.scale == 6 and lay.size == 144 and lay.top > 0 and lay.left > 0
    assert grid.shape == (lay.top + len(seeds) * 144, lay.left + 2 * k * 144, 3)
    assert (grid[:lay.top] < 128).any() and (grid[lay.top:, :lay.left] < 128).any()  # dark label text on white
    tiles = np.stack([np.stack([lay.tile(grid, i, j) for j in range(2 * k)]) for i in range(len(seeds))])
    big = grid[lay.top:lay.top + 144, lay.left:lay.left + 144]
    assert np.array_equal(big, tiles[0, 0].repeat(6, 0).repeat(6, 1))  # nearest: every source pixel a 6x6 block
    tiles = tiles.astype(np.float64)
    rgb, depth = tiles[:, :k], tiles[:, k:]
    assert np.abs(rgb - depth).mean() > 20  # colour-mapped depth is not the image
    assert np.abs(rgb[0] - rgb[1]).mean() > 1  # different seeds, different samples
    # row 1, pose (yaw 0.3, pitch 0.1) (pitch-major order: index 1 * 3 + 2) is exactly seed 1 seen from there
    planes = preset_planes(module.preset, TINY["train_planes"])
    with torch.no_grad():
        mpi = module.G_ema(seed_latents([1], 16), None, planes.normalized, noise_mode="const")
        view = Scene(module.preset, planes).render_pose(mpi, 0.3, 0.1, resolution=r, check_inside=False)
    assert np.array_equal(tiles[1, 5].astype(np.uint8), export.to_uint8(view["rgb"][0]))
    assert np.array_equal(tiles[1, k + 5].astype(np.uint8), export.depth_to_color(
        view["depth"][0], module.preset.near, module.preset.far, view["alpha"][0]))
    # the plane strip: 6 training planes of the 16 px texture, RGBA, and the last (background) plane opaque
    strip = png(files[1])  # 16 px planes repeated 8x, labelled above
    assert strip.shape[1] == 6 * 8 * RES and strip.shape[2] == 4
    assert strip[-8 * RES:, -8 * RES:, 3].min() == 255


def test_same_seeds_same_bytes_and_training_state_untouched(module, tmp_path):
    module.iteration = 3
    module.G_ema.train()  # as after any module.train(): rendered in eval mode, the mode restored after
    rng = torch.get_rng_state()
    a = SampleGrid(seeds=[0, 1], out_dir=str(tmp_path / "a")).run(fake_trainer(tmp_path), module)
    assert torch.equal(torch.get_rng_state(), rng)  # sampling does not shift the training's random stream
    assert module.G_ema.training  # mode restored
    other_run = copy.deepcopy(module)  # another process with the same weights
    b = SampleGrid(seeds=[0, 1], out_dir=str(tmp_path / "b")).run(fake_trainer(tmp_path), other_run)
    c = SampleGrid(seeds=[2, 3], out_dir=str(tmp_path / "c")).run(fake_trainer(tmp_path), module)
    assert a[0].read_bytes() == b[0].read_bytes() and a[1].read_bytes() == b[1].read_bytes()
    assert not np.array_equal(png(a[0]), png(c[0]))


def test_schedule_uses_module_iterations_rank0_only(module, tmp_path):
    cb = SampleGrid(every_n_iters=2, seeds=[0], yaws=[0.0])
    for it in range(1, 6):  # 5 iterations; Lightning's global_step would be 2 * it
        module.iteration = it
        cb.on_train_batch_end(fake_trainer(tmp_path, global_step=2 * it), module, None, None, it - 1)
    cb.on_train_batch_end(fake_trainer(tmp_path), module, None, None, 5)  # the batch after max_iters: no-op
    cb.on_train_end(fake_trainer(tmp_path), module)
    names = sorted(p.name for p in (tmp_path / "media").glob("samples_*.png"))
    assert names == ["samples_it000002.png", "samples_it000004.png", "samples_it000005.png"]
    # the end of a run that just rendered its last iteration writes nothing new
    cb2 = SampleGrid(every_n_iters=2, seeds=[0], yaws=[0.0], out_dir=str(tmp_path / "end"))
    module.iteration = 4
    cb2.on_train_batch_end(fake_trainer(tmp_path), module, None, None, 3)
    cb2.on_train_end(fake_trainer(tmp_path), module)
    assert [p.name for p in cb2.written] == ["samples_it000004.png", "planes_it000004_seed0000.png"]
    # other ranks never render (and never wait on anything)
    cb3 = SampleGrid(every_n_iters=1, seeds=[0], out_dir=str(tmp_path / "rank1"))
    cb3.on_train_batch_end(fake_trainer(tmp_path, rank0=False), module, None, None, 3)
    cb3.on_train_end(fake_trainer(tmp_path, rank0=False), module)
    assert not (tmp_path / "rank1").exists() and cb3.written == []
    with pytest.raises(ValueError, match="every_n_iters"):
        SampleGrid(every_n_iters=0)
    with pytest.raises(ValueError, match="resolution must be a positive number of pixels"):  # at start, not mid-run
        SampleGrid(every_n_iters=10, resolution=0)


def test_stylegan2_mode_grid_is_one_row_of_2d_images(tmp_path):
    torch.manual_seed(1)
    m = StyleGAN2Module(**{k: v for k, v in TINY.items() if k in SG2_ARGS})
    m.iteration = 2
    cb = SampleGrid(seeds=[0, 1, 2], min_tile=1)  # as rendered, labels above
    files = cb.run(fake_trainer(tmp_path), m)
    grid = png(files[0])
    assert grid.shape == (cb.layout.top + RES, cb.layout.left + 3 * RES, 3) and len(files) == 1
    with torch.no_grad():
        img = m.G_ema(seed_latents([1], 16), None, noise_mode="const")
    assert np.array_equal(cb.layout.tile(grid, 0, 1), export.to_uint8((img[0] + 1) / 2))
    assert SweepVideo(frames=3).run(fake_trainer(tmp_path), m) == []
    assert MeshExport().run(fake_trainer(tmp_path), m) == []


# ---------------------------------------------------------------------------------------------- video
def test_sweep_video_reads_back(module, tmp_path):
    module.iteration, r = 9, 48  # views rendered at 48 px from the 16 px MPI
    files = SweepVideo(frames=7, fps=5, seeds=[0, 3], resolution=r).run(fake_trainer(tmp_path), module)
    assert [f.name for f in files] == ["sweep_yaw_it000009_seed0000.mp4", "sweep_yaw_it000009_seed0003.mp4"]
    frames = iio.imread(files[1], plugin="pyav").astype(np.float64)
    assert frames.shape == (7, r, 2 * r, 3)  # RGB | depth
    # frame 0 is seed 3 at the first sweep pose (h264 is lossy: close to it, far from seed 0's)
    sampler = module_sampler(module, resolution=r)
    yaw, pitch = export.sweep_poses("yaw", 7, module.preset.yaw_mean, module.preset.pitch_mean)[0]
    with sampler.sampling():
        ref3, ref0 = (np.concatenate(sampler.view(sampler.mpi(s), yaw, pitch), axis=1) for s in (3, 0))
    err = np.abs(frames[0] - ref3).mean()
    assert err < 10 and err < 0.5 * np.abs(frames[0] - ref0).mean()
    assert np.abs(frames[0] - frames[-1]).mean() > 2 * err  # the camera moved
    with pytest.raises(ValueError, match="trajectory"):
        SweepVideo(trajectory="zigzag")


# ----------------------------------------------------------------------------------------------- mesh
class BoxGenerator(torch.nn.Module):
    """Alpha 1 inside a box (normalised depth in [0.25, 0.75], texels 4..11 of 16 in x and y), 0 elsewhere."""

    z_dim, img_resolution = 4, RES

    def __init__(self, opaque: bool = True):
        super().__init__()
        self.register_buffer("value", torch.tensor(1.0 if opaque else 0.0))

    def forward(self, z, c=None, plane_depths=None, plane_chunk=None, opaque_background=None, **kwargs):
        codes = torch.as_tensor(plane_depths).reshape(-1)
        mpi = torch.full((1, len(codes), 4, RES, RES), 0.5)
        mpi[:, :, 3] = 0
        inside = (codes >= 0.25) & (codes <= 0.75)
        mpi[0, inside, 3, 4:12, 4:12] = self.value
        return mpi


def box_module(opaque: bool = True, iteration: int = 11):
    preset = get_preset("synthetic32", resolution=RES)
    planes = preset_planes(preset, 6)
    return SimpleNamespace(G_ema=BoxGenerator(opaque).eval(), preset=preset, iteration=iteration,
                           mode="gmpi", scene=Scene(preset, planes))


def test_mesh_of_a_known_box(tmp_path):
    m = box_module()
    files = MeshExport(seeds=[5], grid=32).run(fake_trainer(tmp_path), m)
    assert [f.name for f in files] == ["mesh_it000011_seed0005.ply", "mesh_it000011_seed0005.glb"]
    verts, faces = export.read_ply(files[0])
    from tests.test_mesh_io import read_glb  # the same mesh in glTF's axes (x, -y, -z)

    np.testing.assert_allclose(read_glb(files[1])["POSITION"], verts * np.array([1, -1, -1], np.float32), atol=1e-6)
    assert len(faces) > 50 and faces.max() < len(verts)
    # the iso-surface sits half a sample outside the last opaque sample of the (blurred) box
    p = m.preset
    h, w = (float(v) for v in m.scene.planes.extents[0])
    step = w / (RES - 1)
    assert verts[:, 0].min() == pytest.approx(-w / 2 + 3.5 * step, abs=0.3 * step)
    assert verts[:, 0].max() == pytest.approx(-w / 2 + 11.5 * step, abs=0.3 * step)
    assert verts[:, 1].min() == pytest.approx(-h / 2 + 3.5 * h / (RES - 1), abs=0.3 * step)
    depths = export.mesh_plane_depths(p, 32)
    codes = (depths - p.near) / (p.far - p.near)
    z_in = depths[(codes >= 0.25) & (codes <= 0.75)]
    dz = float(depths[1] - depths[0])
    assert float(verts[:, 2].min()) == pytest.approx(float(z_in.min()) - dz / 2, abs=0.3 * dz)
    assert float(verts[:, 2].max()) == pytest.approx(float(z_in.max()) + dz / 2, abs=0.3 * dz)


def test_mesh_of_an_empty_volume_warns_instead_of_crashing(tmp_path):
    cb = MeshExport(seeds=[0, 1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = cb.run(fake_trainer(tmp_path), box_module(opaque=False))
    messages = [str(w.message) for w in caught if "MeshExport" in str(w.message)]
    assert len(messages) == 2 and all("never crosses the iso-level 0.5" in m for m in messages)
    assert messages[0].startswith("MeshExport: no mesh for seed 0 at iteration 11")
    assert files == [] and not list(tmp_path.rglob("*.ply"))


# ---------------------------------------------------------------------------------------------- wandb
def test_wandb_offline_run_receives_the_media(module, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="gmpi-test", save_dir=str(tmp_path), offline=True)
    trainer = fake_trainer(tmp_path / "unused", loggers=[logger], global_step=8)
    assert run_dir(trainer) == tmp_path  # a WandbLogger first: its save_dir is the run folder, as trainer.log_dir
    module.iteration = 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        written = (SampleGrid(seeds=[0, 1]).run(trainer, module) + SweepVideo(frames=4).run(trainer, module)
                   + MeshExport(grid=32).run(trainer, box_module(iteration=4)))
    run_files = Path(logger.experiment.dir)
    logger.experiment.finish()
    assert sorted(p.name for p in written) == ["mesh_it000004_seed0000.glb", "mesh_it000004_seed0000.ply",
                                                "planes_it000004_seed0000.png", "samples_it000004.png",
                                                "sweep_yaw_it000004_seed0000.mp4"]
    assert all(p.parent == tmp_path / "media" for p in written)
    media = run_files / "media"
    assert "offline-run-" in str(run_files) and media.is_dir()
    images, videos = sorted(media.rglob("*.png")), sorted(media.rglob("*.mp4"))
    meshes = sorted(media.rglob("*.glb"))  # the coloured mesh itself (Object3D reads glb), not a point cloud
    assert len(images) == 2 and len(videos) == 1 and len(meshes) == 1 and not list(media.rglob("*.pts.json"))
    assert meshes[0].read_bytes() == written[4].read_bytes()
    assert {png(p).shape for p in images} == {png(written[0]).shape, png(written[1]).shape}
    assert videos[0].read_bytes() == written[2].read_bytes()


# --------------------------------------------------------------------------------------- configs, gmpi fit
def test_experiment_configs_build_their_media_callbacks():
    import importlib

    seen = {}
    for path in sorted((REPO / "experiments").glob("*.yaml")):
        for cb in yaml.safe_load(path.read_text())["trainer"].get("callbacks", []):
            if cb["class_path"].startswith("callbacks.media."):
                mod, name = cb["class_path"].rsplit(".", 1)
                obj = getattr(importlib.import_module(mod), name)(**cb.get("init_args", {}))
                seen.setdefault(path.stem, []).append(type(obj).__name__)
    assert seen["synthetic"] == seen["synthetic_long"] == ["SampleGrid", "SweepVideo", "MeshExport", "WebViewer"]
    assert seen["synthetic_stylegan2"] == ["SampleGrid"]
    for name in ("ffhq256", "ffhq512", "ffhq1024", "afhqcat512", "metfaces1024"):
        assert seen[name] == ["SampleGrid", "SweepVideo"]


def test_gmpi_fit_writes_media_into_the_run_folder(shards, tmp_path):
    media_cfg = tmp_path / "media.yaml"
    media_cfg.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "callbacks.media.SampleGrid", "init_args": {"every_n_iters": 2, "seeds": [0, 1]}},
        {"class_path": "callbacks.media.SweepVideo", "init_args": {"frames": 4, "fps": 4}},
    ]}}))
    rc = gmpi_main([
        "fit", "--config", str(REPO / "experiments" / "synthetic.yaml"), "--config", str(media_cfg),
        f"--data.data={shards}", "--data.batch_size=4", "--data.num_workers=0", "--model.init_from=null",
        f"--model.resolution={RES}", TINY_ARCH, "--model.train_planes=6", "--model.views.per_z=2",
        "--model.max_iters=3", "--model.export_path=null", "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
        "--trainer.logger.name=csv"])
    assert rc in (0, None)
    media = tmp_path / "csv" / "version_0" / "media"  # trainer.log_dir of the CSV logger
    names = sorted(p.name for p in media.iterdir())
    assert names == ["planes_it000002_seed0000.png", "planes_it000003_seed0000.png", "samples_it000002.png",
                     "samples_it000003.png", "sweep_yaw_it000003_seed0000.mp4"]
    assert png(media / "samples_it000003.png").shape[0] > 2 * 128  # 2 seeds x tiles of at least 128 px
    assert not np.array_equal(png(media / "samples_it000002.png"), png(media / "samples_it000003.png"))  # trained
    assert iio.imread(media / "sweep_yaw_it000003_seed0000.mp4", plugin="pyav").shape == (4, RES, 2 * RES, 3)


@pytest.mark.slow
def test_two_process_ddp_renders_on_rank0_without_hanging(shards, tmp_path):
    """2 CPU processes (gloo): rank 0 renders while rank 1 trains on; the run finishes and media appear once."""
    import os
    import subprocess
    import sys

    cfg = tmp_path / "media.yaml"
    cfg.write_text(yaml.safe_dump({"trainer": {
        "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": str(tmp_path), "name": "csv"}}],
        "callbacks": [{"class_path": "callbacks.media.SampleGrid", "init_args": {"every_n_iters": 2, "seeds": [0, 1]}},
                      {"class_path": "callbacks.media.SweepVideo", "init_args": {"frames": 6}}]}}))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK",
                                                              "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", WANDB_MODE="disabled")
    cmd = [sys.executable, "-m", "gmpi_lightning", "fit", "--config", str(REPO / "experiments" / "synthetic.yaml"),
           "--config", str(cfg), f"--data.data={shards}", "--data.batch_size=2", "--data.num_workers=0",
           "--model.init_from=null", f"--model.resolution={RES}", TINY_ARCH,
           "--model.train_planes=6", "--model.views.per_z=2", "--model.max_iters=5", "--model.export_path=null",
           "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=0", "--trainer.accelerator=cpu",
           "--trainer.devices=2", f"--trainer.default_root_dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "csv" / "version_0" / "media").iterdir())
    assert names == ["planes_it000002_seed0000.png", "planes_it000004_seed0000.png", "planes_it000005_seed0000.png",
                     "samples_it000002.png", "samples_it000004.png", "samples_it000005.png",
                     "sweep_yaw_it000005_seed0000.mp4"]
