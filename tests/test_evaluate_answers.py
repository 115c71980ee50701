"""``evaluate()`` end to end on generators whose right answers are known: pose/depth through estimator modules,
depth FD of a matching scene vs a billboard, identity similarity, broken fakes, warnings, JSON, the command's
defaults and a 2-process torchrun run."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gmpi_lightning.evaluation import evaluate as ev
from gmpi_lightning.evaluation.evaluate import evaluate, json_safe, weights_warning
from gmpi_lightning.evaluation.fakes import FakeSettings, seed_poses
from gmpi_lightning.evaluation.identity import identity_similarity
from gmpi_lightning.evaluation.inception import INCEPTION_FILE
from gmpi_lightning.planes import preset_planes
from gmpi_lightning.presets import get_preset
from gmpi_lightning.scene import Scene

PRESET = get_preset("synthetic32", resolution=32)
REPO = Path(__file__).resolve().parents[1]


class SceneGenerator(torch.nn.Module):
    """A stand-in generator with known geometry: an opaque square (its plane and size set by z) in front of the
    opaque background plane. Every plane's colour is its normalised z, (z - near) / (far - near), so where a ray is
    opaque the rendered brightness is an exact affine function of the rendered depth. ``billboard``: everything
    on the nearest plane (a flat card)."""

    def __init__(self, preset, resolution=32, billboard=False, nan=False):
        super().__init__()
        self.preset, self.z_dim, self.img_resolution = preset, 8, resolution
        self.billboard, self.nan = billboard, nan

    def forward(self, z, c, plane_depths, **kw):
        n, r = plane_depths.shape[0], self.img_resolution
        depths = preset_planes(self.preset, n).depths
        grey = (depths - self.preset.near) / (self.preset.far - self.preset.near)
        mpi = torch.zeros(z.shape[0], n, 4, r, r)
        mpi[:, :, :3] = grey[None, :, None, None, None]
        mpi[:, -1, 3] = 1
        for b in range(z.shape[0]):
            k = int((n - 2) * torch.sigmoid(z[b, 0]))
            half = int(r * (0.15 + 0.2 * torch.sigmoid(z[b, 1])))
            mpi[b, k, 3, r // 2 - half:r // 2 + half, r // 2 - half:r // 2 + half] = 1
        if self.billboard:
            mpi[:, :, 3] = 0
            mpi[:, 0, 3] = 1
        if self.nan:
            mpi[1:2, 0, 0, 0, 0] = float("nan")  # the second fake of every batch
        return mpi


class ZeroPose(torch.nn.Module):
    def forward(self, img):
        return torch.zeros(img.shape[0], 2)


class BrightnessDepth(torch.nn.Module):
    """Reads depth off the brightness (exact for SceneGenerator); ``flat``: the same depth everywhere."""

    def __init__(self, flat=False):
        super().__init__()
        self.flat = flat

    def forward(self, img):
        depth = (img[:, :1] + 1) / 2
        return {"depth": torch.ones_like(depth) if self.flat else depth, "mask": torch.ones_like(depth)}


def test_pose_and_depth_errors_through_estimator_modules():
    G, seeds = SceneGenerator(PRESET), list(range(12))
    settings = FakeSettings(planes=24, batch_size=5)
    out = evaluate(G, PRESET, ["pose"], 12, settings=settings, estimators=(ZeroPose(), None), show_progress=False)
    yaw, pitch = seed_poses(seeds, PRESET, 0)
    want = float(((yaw.double() ** 2 + pitch.double() ** 2) / 2).mean())  # a constant 0 answer: the poses' power
    assert out["metrics"]["pose"] == pytest.approx(want, rel=1e-6) and want > 1e-3
    assert out["metrics"]["pose_yaw_slope"] == 0.0  # it ignores the picture, so it cannot follow the camera
    assert out["details"]["pose_error"]["n"] == 12 and out["details"]["estimators"]["modules"]["pose"] == "ZeroPose"
    # frontal cameras: a world plane's z is the camera's z-depth, so brightness is exactly affine in depth
    front = dataclasses.replace(PRESET, yaw_std=0.0, pitch_std=0.0)
    est = {"depth": BrightnessDepth()}
    exact = evaluate(SceneGenerator(front), front, ["depth"], 12, settings=settings, estimators=est,
                     show_progress=False)
    assert exact["metrics"]["depth"] < 1e-6 and exact["details"]["depth_error"]["n"] == 12
    est = {"depth": BrightnessDepth(flat=True)}
    flat = evaluate(SceneGenerator(front), front, ["depth"], 12, settings=settings, estimators=est,
                    show_progress=False)
    assert flat["metrics"]["depth"] == pytest.approx(1.0, abs=1e-6)  # a flat map: exactly 1 (estimators docstring)
    with pytest.raises(ValueError, match="no pose estimator"):
        evaluate(G, PRESET, ["pose"], 4, estimators={"depth": BrightnessDepth()}, show_progress=False)
    with pytest.raises(ValueError, match="estimators train"):
        evaluate(G, PRESET, ["pose"], 4, show_progress=False)


def test_depth_fd_through_evaluate_matching_scene_vs_billboard(monkeypatch):
    """The real set: the scene generator's own depth maps for other latents, at their cameras; the fakes are
    rendered at those cameras by evaluate(). Matching geometry scores near 0, a billboard far worse."""
    n, settings = 40, FakeSettings(planes=24, batch_size=8)
    scene = SceneGenerator(PRESET)
    others = list(range(500, 500 + n))
    z = torch.stack([torch.from_numpy(np.random.RandomState(s).randn(8)).float() for s in others])
    pl = preset_planes(PRESET, 24)
    yaw, pitch = seed_poses(others, PRESET, 0)
    real = Scene(PRESET, pl).render_pose(scene(z, None, pl.normalized), yaw, pitch, resolution=32)
    from gmpi_lightning.cameras import sphere_c2w
    from gmpi_lightning.evaluation.geometry import surface_depth

    reals = {"depth": surface_depth(real["depth"], real["alpha"]),
             "c2w": sphere_c2w(yaw, pitch, PRESET.sphere_center_z, PRESET.sphere_r)}
    monkeypatch.setattr(ev, "real_depth_samples", lambda data, num: {k: v[:num] for k, v in reals.items()})
    fd = {name: evaluate(G, PRESET, ["depth_fd"], n, "synthetic-depth", settings, show_progress=False)
          ["metrics"]["depth_fd"] for name, G in (("scene", scene), ("billboard", SceneGenerator(PRESET, 32, True)))}
    assert fd["billboard"] > 10 * fd["scene"] and fd["billboard"] > 1.0


def test_identity_similarity_pairs_the_two_prior_views():
    G, seeds = SceneGenerator(PRESET), [3, 4, 9]
    settings = FakeSettings(planes=24, batch_size=2)
    res = identity_similarity(lambda img: img.flatten(1), G, PRESET, seeds, settings)
    pl = preset_planes(PRESET, 24)
    z = torch.stack([torch.from_numpy(np.random.RandomState(s).randn(8)).float() for s in seeds])
    mpi = G(z, None, pl.normalized)
    a, b = (Scene(PRESET, pl).render_pose(mpi, *seed_poses(seeds, PRESET, stream), resolution=32)["rgb"] * 2 - 1
            for stream in (0, 1))
    want = torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)
    assert res["n"] == 3 and res["mean"] == pytest.approx(float(want.mean()), rel=1e-5)
    assert 0.5 < res["mean"] < 0.99999  # the two cameras differ, so the pictures do
    assert identity_similarity(lambda img: torch.ones(img.shape[0], 4), G, PRESET, seeds, settings)["mean"] == 1.0
    nan = identity_similarity(lambda img: torch.full((img.shape[0], 4), float("nan")), G, PRESET, seeds, settings)
    assert nan["n"] == 0 and nan["n_invalid"] == 3  # faces the embedder could not read are counted, not dropped
    with pytest.raises(TypeError, match="embedder"):
        identity_similarity(None, G, PRESET, seeds, settings)


def test_broken_fakes_stop_with_their_seeds():
    with pytest.raises(ValueError, match=r"2 of 6 fakes rendered NaN/inf \(seeds \[1, 4\]"):
        evaluate(SceneGenerator(PRESET, nan=True), PRESET, ["consistency"], 6,  # const noise: one G call a batch
                 settings=FakeSettings(planes=8, batch_size=3, noise_mode="const"), show_progress=False)


def test_invalid_fakes_warned_and_json_has_no_nan():
    # an empty picture (nothing opaque): consistency has no pixels to compare, relief none to measure
    class Empty(SceneGenerator):
        def forward(self, z, c, plane_depths, **kw):
            mpi = super().forward(z, c, plane_depths)
            mpi[:, :, 3] = 0
            return mpi

    out = evaluate(Empty(PRESET), PRESET, ["consistency"], 4, settings=FakeSettings(planes=8), show_progress=False)
    assert out["details"]["depth_relief"]["n_invalid"] == 4 and math.isnan(out["metrics"]["depth_relief"])
    assert any("depth_relief: 4 of 4 fakes" in w for w in out["warnings"])
    text = json.dumps(json_safe(out), allow_nan=False)  # would raise on a NaN
    assert json.loads(text)["metrics"]["depth_relief"] is None


def test_inception_warning_reads_the_hash_not_the_name(tmp_path):
    official = tmp_path / INCEPTION_FILE
    official.write_bytes(b"a random file saved under the official name")
    from gmpi_lightning.data import file_sha256

    assert "not 6726825d" in weights_warning(official, file_sha256(official))
    assert weights_warning(official, "6726825d" + "0" * 56) is None


def _tiny_checkpoint(path, data):
    from gmpi_lightning.io import save_gmpi_checkpoint
    from tests.test_evaluation import _tiny_gmpi

    return save_gmpi_checkpoint(path, _tiny_gmpi(), preset=get_preset("synthetic32", resolution=16).to_dict(),
                                extra={"data": str(data)})


def test_command_defaults_to_the_checkpoints_training_data(shards, tmp_path, monkeypatch, capsys):
    from gmpi_lightning.cli import main

    ckpt = _tiny_checkpoint(tmp_path / "g.pt", shards)
    est_dir = tmp_path / "runs" / "estimators"
    est_dir.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--ckpt", str(ckpt), "--metrics", "depth_fd", "--num-samples", "4", "--planes", "6",
                 "--device", "cpu", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["data"] == str(shards) and r["metrics"]["depth_fd"] > 0
    assert r["settings"]["device"] == "cpu" and r["settings"]["versions"]["torch"]
    # pose/depth: the default estimator file is runs/estimators/<data name>.pt; missing -> how to make one
    capsys.readouterr()
    assert main(["evaluate", "--ckpt", str(ckpt), "--metrics", "pose", "--num-samples", "4", "--device", "cpu"]) != 0
    assert "estimators train" in capsys.readouterr().err
    torch.save({"format": "not-estimators"}, est_dir / "s16.pt")
    assert main(["evaluate", "--ckpt", str(ckpt), "--metrics", "pose", "--num-samples", "4", "--device", "cpu"]) != 0
    assert "s16.pt: format 'not-estimators'" in capsys.readouterr().err  # the default file was picked up
    moved = _tiny_checkpoint(tmp_path / "h.pt", tmp_path / "gone")
    assert main(["evaluate", "--ckpt", str(moved), "--metrics", "depth_fd", "--num-samples", "4",
                 "--device", "cpu"]) != 0
    assert "pass --data" in capsys.readouterr().err


def test_torchrun_two_processes_match_one(shards, tmp_path):
    ckpt = _tiny_checkpoint(tmp_path / "g.pt", shards)
    args = ["evaluate", "--ckpt", str(ckpt), "--metrics", "consistency,depth_fd", "--num-samples", "5",
            "--planes", "6", "--batch-size", "2", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "gmpi_lightning", *args, "--out", str(tmp_path / "two.json")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert two.stdout.count("wrote ") == 1 and "2 processes" in two.stdout  # rank 0 alone reports
    from gmpi_lightning.cli import main

    assert main([*args, "--out", str(tmp_path / "one.json")]) == 0
    r2, r1 = (json.loads((tmp_path / f).read_text()) for f in ("two.json", "one.json"))
    assert r2["settings"]["world_size"] == 2 and r1["settings"]["world_size"] == 1
    for k, v in r1["metrics"].items():
        assert r2["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-9), k


def test_frechet_distance_matches_torchmetrics_and_bootstrap_error():
    from gmpi_lightning.evaluation.geometry import frechet_bootstrap_se, frechet_distance
    from gmpi_lightning.evaluation.image_metrics import fid_kid

    g = torch.Generator().manual_seed(1)
    a = torch.rand(300, 16, generator=g, dtype=torch.float64)
    b = torch.rand(300, 16, generator=g, dtype=torch.float64) * 0.8 + 0.2
    assert frechet_distance(a, b) == pytest.approx(fid_kid(a, b, which=("fid",))["fid"], rel=1e-6)  # torchmetrics
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    x = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    y = torch.randn(2000, 4, generator=g, dtype=torch.float64) * 2 + 1
    small, large = frechet_bootstrap_se(x, y, rounds=40), frechet_bootstrap_se(x[:200], y[:200], rounds=40)
    assert 0.05 < small < 0.8 and large > 2 * small  # FD 8 here; the error shrinks ~ 1/sqrt(n)
