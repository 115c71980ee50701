"""Evaluation: FID/KID, precision/recall and IS against torch-fidelity, the real-feature cache, 3D metrics with known
answers, ``gmpi evaluate`` end to end, DDP sharding, and the training callback."""

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from datamodules.synthetic import SyntheticConfig, render_heads, sample_poses
from gmpi_lightning.cameras import sphere_c2w
from gmpi_lightning.evaluation import geometry
from gmpi_lightning.evaluation.evaluate import evaluate, parse_metrics
from gmpi_lightning.evaluation.fakes import FakeSettings, seed_poses
from gmpi_lightning.evaluation.image_metrics import (
    fid_kid,
    inception_score,
    precision_recall,
    real_cache_key,
    real_features,
)
from gmpi_lightning.evaluation.inception import (
    INCEPTION_FILE,
    InceptionFeatures,
    resolve_weights,
    to_uint8_images,
    write_random_inception,
)
from gmpi_lightning.nn.gmpi import FlatMPIGenerator, GMPIGenerator
from gmpi_lightning.nn.synthesis import Generator
from gmpi_lightning.planes import preset_planes
from gmpi_lightning.presets import get_preset
from gmpi_lightning.render import render_mpi

PRESET = get_preset("FFHQ256", resolution=64)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    return write_random_inception(tmp_path_factory.mktemp("inc") / "inception_he.pth", seed=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 heads (not conftest's 96): the Inception tests run 299 px features of every image."""
    from datamodules.converters import convert_synthetic

    return convert_synthetic(tmp_path_factory.mktemp("syn") / "s16", num=24, resolution=16, seed=5,
                             samples_per_shard=8)


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("real-features")


def _images(n, seed, bright):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g) * bright
    return to_uint8_images(torch.nn.functional.interpolate(low, size=32, mode="bilinear").clamp(0, 1))


class DS(torch.utils.data.Dataset):
    """uint8 images as torch-fidelity reads a dataset."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


# ------------------------------------------------------------------------------------------------- FID / KID
def test_fid_kid_match_torch_fidelity(inception_file):
    import torch_fidelity

    real, fake = _images(8, 0, 1.0), _images(8, 1, 0.6)
    ref = torch_fidelity.calculate_metrics(input1=DS(fake), input2=DS(real), cuda=False, fid=True, kid=True,
                                           feature_extractor_weights_path=str(inception_file), kid_subsets=10,
                                           kid_subset_size=8, batch_size=8, cache=False, verbose=False,
                                           save_cpu_ram=True)
    ext = InceptionFeatures(inception_file)
    ours = fid_kid(ext(real), ext(fake), kid_subsets=10, kid_subset_size=8)
    assert ref["frechet_inception_distance"] > 1.0  # He-init features move with the inputs (default init: 0)
    assert ours["fid"] == pytest.approx(ref["frechet_inception_distance"], rel=2e-3)
    assert ours["kid"] == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-4, abs=1e-7)
    same = fid_kid(ext(real), ext(real), kid_subset_size=20)
    assert abs(same["fid"]) < 1e-3 * ours["fid"] and same["kid_subset_size"] == 8


def test_precision_recall_and_inception_score_match_torch_fidelity(inception_file):
    """Fakes that collapse onto two of the reals (small perturbations of them) against 12 varied reals: precision,
    recall and the Inception Score equal ``torch_fidelity.calculate_metrics(prc=True, isc=True)`` on the same images
    and Inception file (prc on the Inception pool features: its default extractor is VGG16), and precision is far
    above recall. Rules out precision and recall swapped, the real and fake
    roles swapped, and IS computed on other outputs than torch-fidelity's (the biased logits, the pool features)."""
    import torch_fidelity

    real = _images(12, 0, 1.0)
    g = torch.Generator().manual_seed(3)
    fake = real[torch.tensor([0, 1] * 5)].int() + torch.randint(-2, 3, (10, 3, 32, 32), generator=g)
    fake = fake.clamp(0, 255).to(torch.uint8)
    ref = torch_fidelity.calculate_metrics(input1=DS(fake), input2=DS(real), cuda=False, prc=True, isc=True,
                                           isc_splits=2, feature_extractor="inception-v3-compat",
                                           feature_layer_prc="2048", feature_extractor_weights_path=str(inception_file),
                                           batch_size=12, cache=False, verbose=False, save_cpu_ram=True)
    ext = InceptionFeatures(inception_file)
    real_f = ext(real)
    fake_f, fake_logits = ext.features_and_logits(fake)
    pr = precision_recall(real_f, fake_f)
    score = inception_score(fake_logits, splits=2)
    assert pr["precision"] == pytest.approx(ref["precision"], abs=1e-6)
    assert pr["recall"] == pytest.approx(ref["recall"], abs=1e-6)
    assert pr["precision"] == 1.0 and pr["recall"] <= 0.25  # two of 12 reals covered by the collapsed fakes
    # a random Inception predicts nearly the same class for every image (IS barely above 1): compare IS - 1
    assert score["is"] - 1 == pytest.approx(ref["inception_score_mean"] - 1, rel=1e-3)
    assert score["is_std"] == pytest.approx(ref["inception_score_std"], rel=1e-3)
    biased = inception_score(fake_logits + ext.net.fc.bias.double(), splits=2)["is"]
    pooled = inception_score(fake_f, splits=2)["is"]
    for wrong in (biased, pooled):  # the outputs IS must not use score differently here
        assert abs((wrong - 1) / (score["is"] - 1) - 1) > 0.5


def test_precision_recall_and_inception_score_known_answers():
    """Gaussians: fakes from a narrow core of the real distribution have precision about 1 and low recall; the
    reverse roles give the reverse. Logits of 10 classes, each fake certain of one class, all classes equally often:
    IS = 10; every fake certain of the same class, or uncertain: IS = 1. Rules out swapped precision/recall, a
    softmax over the batch instead of the classes, and a missing exp."""
    g = torch.Generator().manual_seed(0)
    real = torch.randn(600, 2, generator=g, dtype=torch.float64)
    narrow = torch.randn(600, 2, generator=g, dtype=torch.float64) * 0.2
    collapsed = precision_recall(real, narrow)
    assert collapsed["precision"] > 0.95 and collapsed["recall"] < 0.4
    spread = precision_recall(narrow, real)  # the fakes cover more than the reals: the other way round
    assert spread["recall"] > 0.95 and spread["precision"] < 0.4
    certain = torch.nn.functional.one_hot(torch.arange(1000) % 10, 10).double() * 60
    assert inception_score(certain, splits=1)["is"] == pytest.approx(10.0, rel=1e-6)
    assert inception_score(certain[::10], splits=1)["is"] == pytest.approx(1.0, abs=1e-6)  # all of class 0
    assert inception_score(torch.zeros(100, 10), splits=1)["is"] == pytest.approx(1.0, abs=1e-9)
    assert inception_score(certain[:4], splits=10)["is_splits"] == 4
    with pytest.raises(ValueError, match="more than 3 real and fake"):
        precision_recall(real[:3], narrow)


def test_fid_kid_known_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 4, generator=g, dtype=torch.float64) * 2 + 1
    # FID of N(0, I) vs N(1, 4I) in 4-d: |mu|^2 + tr(I + 4I - 2 * 2I) = 4 + 4 = 8
    out = fid_kid(a, b, kid_subsets=5, kid_subset_size=500)
    assert out["fid"] == pytest.approx(8.0, rel=0.05)
    assert out["kid"] > 1.0 and fid_kid(a, a, ("kid",), 5, 500)["kid"] < 0.01 * out["kid"]


def test_missing_inception_names_the_file(tmp_path, monkeypatch):
    monkeypatch.delenv("GMPI_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILE) as e:
        resolve_weights(None)
    assert "GMPI_INCEPTION_WEIGHTS" in str(e.value) and "--inception" in str(e.value)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        resolve_weights(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth"):
        InceptionFeatures(bad)


def test_real_features_cached_by_card_and_extractor(shards, inception_file, feature_cache):
    ext = InceptionFeatures(inception_file)
    f1, info1 = real_features(shards, ext, cache_dir=feature_cache)
    f2, info2 = real_features(shards, ext, cache_dir=feature_cache)
    assert f1.shape == (24, 2048) and not info1["cache_hit"] and info2["cache_hit"]
    assert torch.equal(f1, f2)
    card = json.loads((shards / "dataset.json").read_text())
    desc = ext.describe()
    key = real_cache_key(card, desc, None, 1)
    card["shards"][0]["sha256"] = "0" * 64
    assert real_cache_key(card, desc, None, 1) != key  # new data -> new statistics
    assert real_cache_key(card, dict(desc, weights_sha256="x"), None, 1) != real_cache_key(card, desc, None, 1)
    f3, _ = real_features(shards, ext, max_images=5, cache_dir=feature_cache)
    # the first 5 rows, computed in a batch of 5 instead of 24 (CPU convolutions differ in the last float bits)
    torch.testing.assert_close(f3, f1[:5], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------ 3D metrics
def _smooth(g, r):
    return torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=r, mode="bilinear")[0]


def _scene(n_planes=32, r=64):
    """An opaque textured square on plane 6 in front of a textured background plane."""
    g = torch.Generator().manual_seed(0)
    mpi = torch.zeros(1, n_planes, 4, r, r)
    mpi[0, :, :3] = _smooth(g, r)
    mpi[0, 6, :3] = _smooth(g, r)
    mpi[0, -1, 3] = 1
    mpi[0, 6, 3, r // 4:3 * r // 4, r // 4:3 * r // 4] = 1
    return mpi


def _view(mpi, planes, yaw, weights=False, pitch=0.0, chunk=None):
    c2w = sphere_c2w(torch.tensor([yaw]), torch.tensor([pitch]), PRESET.sphere_center_z, PRESET.sphere_r)
    out = render_mpi(mpi, planes.depths, planes.extents, c2w, PRESET.fov_deg, 64, 64, return_weights=weights,
                     plane_chunk=chunk)
    return dict(out, c2w=c2w)


def test_two_view_consistency_tells_a_scene_from_a_camera_ignoring_picture():
    planes = preset_planes(PRESET, 32)
    mpi = _scene()
    a, b = _view(mpi, planes, -0.25), _view(mpi, planes, 0.25)
    scene = geometry.two_view_consistency(a, b, PRESET.fov_deg, PRESET.near, PRESET.far)
    front = _view(mpi, planes, 0.0)  # the same 2D picture (and depth) whatever the camera
    sticker = geometry.two_view_consistency(dict(front, c2w=a["c2w"]), dict(front, c2w=b["c2w"]), PRESET.fov_deg,
                                            PRESET.near, PRESET.far)
    assert float(scene["photo_l1"]) < 0.005 and float(scene["depth_err"]) < 1e-4
    up, down = _view(mpi, planes, 0.1, pitch=0.15), _view(mpi, planes, -0.1, pitch=-0.15)  # y matters too
    tilt = geometry.two_view_consistency(up, down, PRESET.fov_deg, PRESET.near, PRESET.far)
    assert float(tilt["photo_l1"]) < 0.005 and float(tilt["depth_err"]) < 1e-4 and float(tilt["covisible"]) > 0.3
    assert float(sticker["photo_l1"]) > 20 * float(scene["photo_l1"])
    assert float(sticker["depth_err"]) > 0.05
    # a flat card is a consistent 3D scene too: consistency passes, relief is zero
    flat = mpi.clone()
    flat[0, :, 3] = 0
    flat[0, 0, 3] = 1
    fa, fb = _view(flat, planes, -0.25), _view(flat, planes, 0.25)
    assert float(geometry.two_view_consistency(fa, fb, PRESET.fov_deg, PRESET.near, PRESET.far)["depth_err"]) < 1e-4
    assert float(geometry.depth_relief(fa, PRESET.fov_deg, PRESET.near, PRESET.far)) < 1e-4
    want = (PRESET.far - float(planes.depths[6])) / (PRESET.far - PRESET.near)
    assert float(geometry.depth_relief(a, PRESET.fov_deg, PRESET.near, PRESET.far)) == pytest.approx(want, rel=1e-3)


def test_semi_transparent_fraction_fog_vs_surface():
    planes = preset_planes(PRESET, 32)
    surface = _scene()
    fog = surface.clone()
    fog[0, :-1, 3] = 0.08  # every plane a little opaque: weight spread over the whole depth range
    w_surface = _view(surface, planes, 0.1, weights=True)["weights"]
    w_fog = _view(fog, planes, 0.1, weights=True)["weights"]
    assert w_surface.shape == (1, 32, 1, 64, 64)
    assert torch.allclose(w_surface.sum(1), _view(surface, planes, 0.1)["alpha"], atol=1e-5)
    assert torch.allclose(_view(fog, planes, 0.1, weights=True, chunk=5)["weights"], w_fog, atol=1e-6)
    assert float(geometry.semi_transparent_fraction(w_surface, planes.depths, PRESET.near, PRESET.far)) == 0.0
    assert float(geometry.semi_transparent_fraction(w_fog, planes.depths, PRESET.near, PRESET.far)) == 1.0


def test_depth_fd_billboard_much_worse_than_matching_depth():
    cfg = SyntheticConfig(resolution=32)
    idx = torch.arange(48)
    yaw, pitch = sample_poses(idx, cfg)
    real = render_heads(idx, cfg, yaw=yaw, pitch=pitch)["depth"][:, None]
    other = render_heads(idx + 5000, cfg, yaw=yaw, pitch=pitch)["depth"][:, None]  # other heads, same cameras
    feats = lambda d: geometry.depth_features(d, PRESET.near, PRESET.far)  # noqa: E731
    billboard = torch.full_like(real, PRESET.near)
    matching = geometry.frechet_distance(feats(real), feats(other))
    flat = geometry.frechet_distance(feats(real), feats(billboard))
    assert geometry.frechet_distance(feats(real), feats(real)) < 1e-6
    assert flat > 10 * matching


# --------------------------------------------------------------------------------------------- gmpi evaluate
def _tiny_gmpi(seed=0):
    torch.manual_seed(seed)
    G = GMPIGenerator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3,
                      mapping_kwargs={"num_layers": 2}, synthesis_kwargs=dict(channel_base=256, channel_max=16),
                      n_train_planes=8).eval()
    for name, p in G.named_parameters():
        if name.endswith("noise_strength"):  # 0 at init: make random noise matter, so seeding is tested
            p.data.fill_(0.5)
    return G


def test_evaluate_all_image_and_3d_metrics(shards, inception_file, feature_cache):
    preset = get_preset("synthetic32", resolution=16)
    G = _tiny_gmpi()
    settings = FakeSettings(planes=8, batch_size=5)
    out = evaluate(G, preset, ["fid", "kid", "pr", "is", "consistency", "depth_fd"], 12, shards, settings,
                   inception_file, kid_subset_size=1000, cache_dir=feature_cache, show_progress=False)
    m = out["metrics"]
    assert set(m) >= {"fid", "kid", "precision", "recall", "is", "consistency_photo_l1", "consistency_depth_err",
                      "semi_transparent", "depth_relief", "depth_fd"}
    assert all(np.isfinite(v) for v in m.values()) and m["fid"] > 0 and m["is"] >= 1.0
    assert 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert out["details"]["fid_kid"]["num_real"] == 24 and out["details"]["fid_kid"]["kid_subset_size"] == 12
    pr, score = out["details"]["precision_recall"], out["details"]["inception_score"]
    assert (pr["num_real"], pr["num_fake"], pr["pr_neighborhood"]) == (24, 12, 3) and score["is_splits"] == 10
    assert out["settings"]["planes"] == 8 and out["settings"]["seeds"] == "0-11" and out["warnings"]
    # batch size does not change the fakes: seeds fix latents, cameras and (random) noise
    again = evaluate(G, preset, ["consistency", "depth_fd"], 12, shards, FakeSettings(planes=8, batch_size=12),
                     show_progress=False)
    for k in ("consistency_photo_l1", "depth_relief", "depth_fd"):
        assert again["metrics"][k] == pytest.approx(m[k], rel=1e-5, abs=1e-9)
    const = evaluate(G, preset, ["depth_fd"], 12, shards, FakeSettings(planes=8, noise_mode="const"),
                     show_progress=False)
    assert const["metrics"]["depth_fd"] != pytest.approx(m["depth_fd"], rel=1e-6)  # the noise is really used
    # the flat 2D baseline (everything on the nearest plane) has no relief and no semi-transparent rays
    torch.manual_seed(0)
    flat = FlatMPIGenerator(Generator(z_dim=16, c_dim=0, w_dim=16, img_resolution=16, img_channels=3,
                                      mapping_kwargs={"num_layers": 2},
                                      synthesis_kwargs=dict(channel_base=256, channel_max=16))).eval()
    f = evaluate(flat, preset, ["consistency"], 6, None, settings, show_progress=False)["metrics"]
    assert f["depth_relief"] < 1e-4 and f["semi_transparent"] == 0.0


def test_metric_names_and_data_requirements():
    assert parse_metrics("all") == ["fid", "kid", "pr", "is", "consistency", "depth_fd", "pose", "depth", "est_fd"]
    with pytest.raises(ValueError, match="fidd"):
        parse_metrics("fid,fidd")
    with pytest.raises(ValueError, match="--data"):
        evaluate(_tiny_gmpi(), get_preset("synthetic32", resolution=16), ["depth_fd"], 4, None, show_progress=False)


def test_pose_slope_recovers_the_gain():
    from gmpi_lightning.evaluation.evaluate import pose_slope

    g = torch.Generator().manual_seed(0)
    true = torch.randn(2000, 2, generator=g) * 0.3
    pred = torch.stack([0.5 * true[:, 0] + 0.1, -true[:, 1]], 1) + 0.01 * torch.randn(2000, 2, generator=g)
    s = pose_slope(pred, true)
    assert float(s[0]) == pytest.approx(0.5, abs=0.01) and float(s[1]) == pytest.approx(-1.0, abs=0.01)
    assert float(pose_slope(torch.zeros(2000, 2), true).abs().max()) == 0.0  # a picture that ignores the camera


def test_seed_poses_follow_the_prior_and_do_not_depend_on_order():
    yaw, pitch = seed_poses(list(range(400)), PRESET)
    y2, _ = seed_poses([7, 3], PRESET)
    assert float(y2[0]) == float(yaw[7]) and float(y2[1]) == float(yaw[3])
    assert abs(float(yaw.mean())) < 0.05 and float(yaw.std()) == pytest.approx(0.26, abs=0.04)  # 2-std truncation
    assert float(yaw.abs().max()) <= 2 * PRESET.yaw_std + 1e-6 and float(pitch.abs().max()) <= 2 * PRESET.pitch_std


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DDP_METRICS = ["fid", "kid", "is", "consistency", "depth_fd"]


def _ddp_worker(rank, world, port, shards, inception, cache, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    res = evaluate(_tiny_gmpi(), get_preset("synthetic32", resolution=16), DDP_METRICS, 2, shards,
                   FakeSettings(planes=8, batch_size=3), inception, cache_dir=cache, show_progress=False)
    (out / f"rank{rank}.json").write_text(json.dumps(res["metrics"]))
    dist.destroy_process_group()


def test_ddp_sharded_evaluation_equals_single_process(shards, inception_file, feature_cache, tmp_path):
    """3 ranks, 2 fakes: rank 2 renders nothing and must still join every gather; the real features (each rank
    reads its own shards) are cached in a world-independent order."""
    cache = tmp_path / "cache"
    mp.spawn(_ddp_worker, args=(3, _free_port(), shards, inception_file, cache, tmp_path), nprocs=3, join=True)
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(3)]
    assert r[0] == r[1] == r[2]
    single = evaluate(_tiny_gmpi(), get_preset("synthetic32", resolution=16), DDP_METRICS, 2, shards,
                      FakeSettings(planes=8, batch_size=3), inception_file, cache_dir=cache, show_progress=False)
    for k, v in single["metrics"].items():
        assert r[0][k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
    assert single["details"]["fid_kid"]["real"]["cache_hit"]  # written by the 3-rank run, read by one process
    ddp_real = torch.load(next(cache.glob("*.pt")), weights_only=True)["features"].double()
    one_real, _ = real_features(shards, InceptionFeatures(inception_file), cache_dir=feature_cache)
    assert torch.allclose(ddp_real, one_real, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- callback and command
def _tiny_module(**kw):
    from gmpi_lightning.module import GMPIModule
    from tests.test_module import tiny

    torch.manual_seed(0)
    return GMPIModule(**tiny(**kw))


def test_evaluation_callback_runs_on_schedule_and_logs(shards, tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from callbacks.metrics import EvaluationCallback
    from datamodules.posed_images import PosedImageDataModule

    cb = EvaluationCallback(every_n_iters=2, metrics="consistency,depth_fd", num_samples=4, batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=-1, logger=CSVLogger(tmp_path, name="csv"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=[cb])
    dm = PosedImageDataModule(str(shards), batch_size=4, batches_per_epoch=50, num_workers=0, seed=0)
    trainer.fit(_tiny_module(max_iters=5), dm)
    lines = [json.loads(x) for x in (tmp_path / "csv" / "version_0" / "eval.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines] == [2, 4, 5]  # every 2 iterations, and at the end
    assert all(np.isfinite(x["metrics"]["depth_fd"]) for x in lines)
    assert lines[0]["settings"]["planes"] == 6  # the training plane count by default
    csv = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    assert "eval/depth_fd" in csv[0] and "eval/consistency_photo_l1" in csv[0]


def test_callback_without_inception_fails_at_start(monkeypatch, tmp_path):
    from callbacks.metrics import EvaluationCallback

    monkeypatch.delenv("GMPI_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for metric in ("fid", "pr", "is"):  # when made: before gmpi fit starts any logger
        with pytest.raises(FileNotFoundError, match=INCEPTION_FILE):
            EvaluationCallback(metrics=metric, data="unused")


def test_gmpi_evaluate_command_writes_json(shards, tmp_path):
    from gmpi_lightning.cli import main

    ckpt = tmp_path / "g.pt"
    module = _tiny_module()
    module.export(ckpt)
    out = tmp_path / "r.json"
    assert main(["evaluate", "--ckpt", str(ckpt), "--data", str(shards), "--metrics", "consistency,depth_fd",
                 "--num-samples", "4", "--planes", "6", "--truncation", "0.7", "--device", "cpu",
                 "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert set(r["metrics"]) >= {"depth_fd", "consistency_photo_l1", "depth_relief"}
    assert r["settings"]["planes"] == 6 and r["settings"]["truncation"] == 0.7 and r["settings"]["num_samples"] == 4
    assert r["preset"]["name"] == "synthetic32" and "--truncation 0.7" in r["command"]
