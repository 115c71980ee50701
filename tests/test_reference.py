"""Reference rows: the ground-truth MPI reproduces its input view and turns like the head; the billboard
does not; the harmonic fill; the rows through ``gmpi evaluate --reference``; data without a renderable truth."""

import json

import pytest
import torch

from datamodules.synthetic import HeadTruth, SyntheticConfig
from gmpi_lightning.evaluation.reference import (
    KINDS,
    billboard_mpi,
    blurred,
    card_depth,
    harmonic_fill,
    iter_reference,
    load_truth,
    mpi_from_view,
)
from gmpi_lightning.presets import get_preset
from gmpi_lightning.scene import Scene

PRESET = get_preset("synthetic32")
N = 6


def _psnr(a, b):
    return -10 * torch.log10(((a - b) ** 2).mean((1, 2, 3)))


@pytest.fixture(scope="module")
def heads():
    truth = HeadTruth(SyntheticConfig(resolution=32, supersample=2, seed=0, preset="synthetic32"), 10_000)
    scene = Scene(PRESET, 32)
    front = truth.views(range(N), torch.zeros(N), torch.zeros(N))
    return truth, scene, front, mpi_from_view(front["rgb"], front["depth"], scene, 32)


def test_ground_truth_mpi_renders_its_input_view_back(heads):
    _, scene, front, mpi = heads
    out = scene.render_pose(mpi, torch.zeros(N), torch.zeros(N), resolution=32)
    # measured 27.0-31.8 dB: the renderer resamples the texels bilinearly (a texel grid is not the pixel grid)
    assert _psnr(out["rgb"], front["rgb"]).min() > 26
    spacing = float((scene.planes.depths[1:] - scene.planes.depths[:-1]).max())
    err = (out["depth"] - front["depth"]).abs()
    d = front["depth"]
    jump = torch.nn.functional.max_pool2d(d, 3, 1, 1) + torch.nn.functional.max_pool2d(-d, 3, 1, 1)
    smooth = jump < 2 * spacing  # away from silhouettes, where the renderer's bilinear alpha blends head and background
    assert float(smooth.float().mean()) > 0.6  # measured 0.72
    assert float((err[smooth] <= spacing).float().mean()) > 0.97  # the depth, quantised to the planes
    assert float(out["alpha"].min()) > 0.999              # opaque: the background plane holds every ray


@pytest.mark.parametrize("yaw", [-0.3, 0.3])
def test_ground_truth_mpi_turns_like_the_head_and_the_billboard_does_not(heads, yaw):
    truth, scene, front, mpi = heads
    flat = billboard_mpi(front["rgb"], front["depth"], scene, 32)
    gt = truth.views(range(N), torch.full((N,), yaw), torch.zeros(N))
    a, b = (scene.render_pose(m, torch.full((N,), yaw), torch.zeros(N), resolution=32) for m in (mpi, flat))
    head = gt["mask"]
    depth_mpi = float((a["depth"] - gt["depth"])[head].abs().mean())
    depth_flat = float((b["depth"] - gt["depth"])[head].abs().mean())
    assert depth_mpi < 0.25 * depth_flat  # measured 0.0023 vs 0.012
    assert float(_psnr(a["rgb"], gt["rgb"]).mean()) > float(_psnr(b["rgb"], gt["rgb"]).mean()) + 1.5  # 23.3 vs 20.7
    assert float(a["alpha"].min()) > 0.999  # solid behind the surface: no hole where the head turned away
    # the billboard is flat: one depth inside the head at the frontal camera
    fb = scene.render_pose(flat, torch.zeros(N), torch.zeros(N), resolution=32)["depth"]
    assert all(float(fb[i][front["mask"][i]].std()) < 1e-4 for i in range(N))


def test_cards_sit_where_named_and_the_blurred_mpi_keeps_the_geometry(heads):
    """card_* rows are the billboard on the near plane, the rotation centre's plane and halfway to the background
    (rules out cards at one depth, which could not show a metric rewarding where a flat layer sits); mpi_blur has the
    ground-truth MPI's depth exactly and only its colours blurred (rules out a blur that moves the geometry)."""
    truth, scene, front, mpi = heads
    from gmpi_lightning.evaluation.fakes import FakeSettings

    cam = scene.camera(torch.zeros(N), torch.zeros(N))
    want = {"card_front": PRESET.near, "card_center": PRESET.sphere_center_z,
            "card_back": (PRESET.sphere_center_z + PRESET.far) / 2}
    settings = FakeSettings(planes=32, batch_size=N)
    depths = {}
    for kind in ("card_front", "card_center", "card_back", "mpi", "mpi_blur"):
        batch = next(iter_reference(kind, truth, PRESET, list(range(N)), settings))
        depths[kind] = batch["render_at"](cam)["depth"]
        if kind.startswith("card"):
            spacing = float((scene.planes.depths[1:] - scene.planes.depths[:-1]).max())
            assert abs(card_depth(kind, PRESET) - want[kind]) < 1e-6
            inside = front["mask"]
            assert float((depths[kind][inside] - want[kind]).abs().max()) < spacing  # flat, at its depth
            assert float(depths[kind][inside].std()) < 1e-4
    assert torch.equal(depths["mpi"], depths["mpi_blur"])
    sharp = next(iter_reference("mpi", truth, PRESET, list(range(N)), settings))["render_at"](cam)["rgb"]
    soft = next(iter_reference("mpi_blur", truth, PRESET, list(range(N)), settings))["render_at"](cam)["rgb"]
    grad = lambda x: (x[..., 1:] - x[..., :-1]).abs().mean()
    assert float(grad(soft)) < 0.85 * float(grad(sharp))  # features smoothed away (measured 0.73; no blur: 1)
    flat = torch.ones(1, 3, 9, 9)
    assert torch.allclose(blurred(flat, 1.5), flat)  # a blur keeps a constant image (normalised kernel)


def test_thickness_limits_the_extrusion(heads):
    _, scene, front, _ = heads
    solid = mpi_from_view(front["rgb"], front["depth"], scene, 32)
    thin = mpi_from_view(front["rgb"], front["depth"], scene, 32, thickness=0.01)
    assert float(thin[:, :-1, 3].sum()) < 0.5 * float(solid[:, :-1, 3].sum())
    assert torch.equal(thin[:, -1], solid[:, -1])


def test_harmonic_fill_reproduces_a_linear_background_inside_a_hole():
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    img = torch.stack([0.2 + 0.5 * xx, 0.8 - 0.6 * yy, 0.3 + 0.2 * xx + 0.3 * yy])[None]
    known = torch.ones(1, 1, 32, 32, dtype=torch.bool)
    known[..., 8:24, 10:20] = False
    filled = harmonic_fill(torch.where(known, img, torch.zeros_like(img)), known)
    assert float((filled - img).abs().max()) < 1e-4
    assert torch.equal(filled[known.expand_as(img)], img[known.expand_as(img)])  # known texels are kept


def test_reference_rows_through_gmpi_evaluate(shards, tmp_path):
    from gmpi_lightning.cli import main
    from tests.test_evaluate_answers import _tiny_checkpoint

    out = tmp_path / "r.json"
    assert main(["evaluate", "--ckpt", str(_tiny_checkpoint(tmp_path / "g.pt", shards)), "--data", str(shards),
                 "--metrics", "consistency,depth_fd", "--num-samples", "8", "--planes", "12", "--reference", "all",
                 "--device", "cpu", "--out", str(out)]) == 0
    ref = json.loads(out.read_text())["reference"]
    assert sorted(ref) == sorted(KINDS)
    m = {k: v["metrics"] for k, v in ref.items()}
    assert m["renders"]["semi_transparent"] == 0
    assert m["renders"]["depth_fd"] < m["mpi"]["depth_fd"] < m["billboard"]["depth_fd"]
    assert m["billboard"]["depth_relief"] < 0.05 < 0.5 < m["renders"]["depth_relief"]
    assert all(v["settings"]["planes"] == 12 and v["settings"]["num_samples"] == 8 for v in ref.values())


def test_truth_is_the_held_out_heads(shards):
    truth = load_truth(shards)
    assert truth.first_index == 96 and truth.cfg.seed == 3 and truth.cfg.resolution == 16  # after the 96 shards
    v = truth.views([0], [0.0], [0.0])
    assert v["rgb"].shape == (1, 3, 16, 16) and v["depth"].shape == (1, 1, 16, 16)


def test_reference_needs_data_whose_truth_can_be_rendered(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"format": "gmpi-lightning/shards", "source": "ffhq",
                                                       "shards": []}))
    with pytest.raises(ValueError, match=r"source is 'ffhq'.*Drop --reference"):
        load_truth(tmp_path)


def test_evaluation_callback_without_its_estimator_file_stops_at_the_start(tmp_path):
    from types import SimpleNamespace

    from callbacks.metrics import EvaluationCallback

    cb = EvaluationCallback(metrics=["consistency", "pose"], estimators=str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="make estimators"):
        cb.setup(SimpleNamespace(datamodule=None), None, "fit")
    (tmp_path / "missing.pt").write_bytes(b"")
    cb.setup(SimpleNamespace(datamodule=None), None, "fit")  # present: no error


def test_ablation_figure_is_a_labelled_grid_with_ground_truth_rows(shards, tmp_path):
    import imageio.v3 as iio

    from gmpi_lightning.evaluation.compare import sample_figure
    from gmpi_lightning.export import to_uint8
    from tests.test_evaluate_answers import _tiny_checkpoint

    ckpt = _tiny_checkpoint(tmp_path / "g.pt", shards)
    img = iio.imread(sample_figure([("full", ckpt), ("other", ckpt)], tmp_path / "s.png", planes=6, data=str(shards)))
    top, left, size = 18, 8 + 6 * len("ref: GT MPI"), 128  # 16 px views repeated 8 times, labels above and left
    assert img.shape[:2] == (top + 4 * size, left + 12 * size)  # 2 generators + truth + GT MPI; 2 seeds x 3 yaws x 2
    truth = load_truth(shards).views([0], [-0.4], [0.0])["rgb"][0]
    assert (img[top + 2 * size:top + 3 * size:8, left:left + size:8] == to_uint8(truth)).all()  # row 3: the truth
    assert (img[:top, left:] < 128).any() and (img[top:, :left] < 128).any()  # ink: column and row labels


def test_gmpi_evaluate_refuses_reference_rows_before_evaluating(tmp_path, monkeypatch, capsys):
    from gmpi_lightning.cli import main
    from gmpi_lightning.evaluation import evaluate as ev
    from tests.test_evaluate_answers import _tiny_checkpoint

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "dataset.json").write_text(json.dumps({"format": "gmpi-lightning/shards", "source": "folder",
                                                             "shards": []}))
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: pytest.fail("the generator was evaluated first"))
    code = main(["evaluate", "--ckpt", str(_tiny_checkpoint(tmp_path / "g.pt", tmp_path / "d")), "--data",
                 str(tmp_path / "d"), "--metrics", "consistency", "--num-samples", "4", "--reference", "all",
                 "--device", "cpu"])
    assert code != 0 and "source is 'folder'" in capsys.readouterr().err
