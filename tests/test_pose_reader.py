"""The pose reader taught by the generator (gmpi_lightning/pose_reader.py): it learns the cameras of the checkpoint's
own renders, is cached per checkpoint file and settings, and narrows the camera search of `gmpi invert` and
`gmpi poses` with `--pose-init reader` to its side of the prior."""

import pytest
import torch

from gmpi_lightning import pose_reader
from gmpi_lightning.cameras import pose_range
from gmpi_lightning.errors import InputError
from gmpi_lightning.inversion import InvertSettings, invert
from gmpi_lightning.invert_cli import resolve_pose
from gmpi_lightning.io import save_gmpi_checkpoint
from gmpi_lightning.pose_reader import ReaderSettings, reader_for, reader_path, train_reader, yaw_window
from gmpi_lightning.pose_search import SearchSettings, pose_grid
from tests.test_invert import PRESET, known_target, tiny_generator

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ReaderSettings(samples=768, steps=300, batch=32)


def test_reader_learns_the_cameras_of_the_generators_own_renders():
    """Trained on the tiny generator's renders, the reader reads held-out renders of it to a fraction of the prior's
    spread (measured: yaw 0.11 rad against 0.29 for always answering the mean, pitch 0.09 against 0.13; 10 s): rules
    out labels detached from the images they were rendered at (errors at the prior's spread) or yaw and pitch
    swapped."""
    G = tiny_generator()
    reader, info = train_reader(G, PRESET, SMALL, progress_bar=False)
    (y0, y1), (p0, p1) = pose_range(PRESET)
    mean_guess = {"yaw": (y1 - y0) / 4, "pitch": (p1 - p0) / 4}  # mean |x - centre| of a uniform prior
    err = info["own_renders_error"]
    assert err["yaw"] < 0.55 * mean_guess["yaw"] and err["pitch"] < 0.9 * mean_guess["pitch"], (err, mean_guess)
    target = known_target(G, seed=3, yaw=0.4, pitch=0.0)[1]
    with torch.no_grad():
        yaw, _ = reader(target * 2 - 1)[0].tolist()
    assert yaw == pytest.approx(0.4, abs=0.15)


def test_reader_is_cached_per_checkpoint_file_and_settings(tmp_path, monkeypatch):
    """The first call trains and writes <ckpt>.pose_reader.pt; the next loads it (no training); other settings or a
    changed checkpoint file train anew. Rules out a cache that serves another checkpoint's reader."""
    ckpt = save_gmpi_checkpoint(tmp_path / "g.pt", tiny_generator(), PRESET.to_dict())
    calls = []
    real = pose_reader.train_reader

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(pose_reader, "train_reader", counting)
    tiny = ReaderSettings(samples=64, steps=5, batch=8)
    first = reader_for(ckpt, tiny_generator(), PRESET, tiny, progress_bar=False, log=lambda m: None)
    assert reader_path(ckpt) == tmp_path / "g.pose_reader.pt" and reader_path(ckpt).is_file() and len(calls) == 1
    again = reader_for(ckpt, tiny_generator(), PRESET, tiny, progress_bar=False, log=lambda m: None)
    assert len(calls) == 1 and all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                                      again.state_dict().values()))
    reader_for(ckpt, tiny_generator(), PRESET, ReaderSettings(samples=64, steps=6, batch=8), progress_bar=False,
               log=lambda m: None)
    assert len(calls) == 2
    G = tiny_generator()
    with torch.no_grad():
        G.synthesis.b4.conv1.weight.mul_(1.5)
    save_gmpi_checkpoint(ckpt, G, PRESET.to_dict())
    reader_for(ckpt, G, PRESET, ReaderSettings(samples=64, steps=6, batch=8), progress_bar=False, log=lambda m: None)
    assert len(calls) == 3


class _Fixed(torch.nn.Module):
    def __init__(self, yaw, pitch):
        super().__init__()
        self.pose = torch.tensor([[yaw, pitch]])

    def forward(self, images):
        return self.pose.expand(images.shape[0], 2)


def test_pose_init_reader_starts_from_the_readers_reading_clamped_into_the_prior():
    """--pose-init reader returns the reader's reading with source 'reader'; a reading outside the prior is clamped
    with a warning; without a reader it is a clear error."""
    target = torch.rand(1, 3, 32, 32)
    yaw, pitch, source = resolve_pose(None, target, PRESET, None, None, pose_init="reader",
                                      reader=lambda: _Fixed(0.2, -0.1))
    assert (yaw, pitch, source) == (pytest.approx(0.2), pytest.approx(-0.1), "reader")
    warnings = []
    (y0, y1), _ = pose_range(PRESET)
    yaw, _, _ = resolve_pose(None, target, PRESET, None, None, warn=warnings.append, pose_init="reader",
                             reader=lambda: _Fixed(3.0, 0.0))
    assert yaw == pytest.approx(y1) and "clamped into the preset's range" in warnings[0]
    with pytest.raises(Exception, match="pose reader"):
        resolve_pose(None, target, PRESET, None, None, pose_init="reader")


@pytest.mark.parametrize("reading,expected", [(0.0, (-0.289, 0.289)), (0.1, (-0.189, 0.389)),
                                              (0.5, (0.0, 0.578)), (-3.0, (-0.578, 0.0))])
def test_yaw_window_is_half_the_prior_around_the_reading_inside_it(reading, expected):
    """The searched yaws: half the prior's yaw range (+-0.578 here) centred at the reading, moved inside the prior
    near its edges: rules out a window that leaves the prior or shrinks at the edges."""
    assert yaw_window(reading, PRESET) == pytest.approx(expected, abs=1e-3)


def test_search_grid_and_candidates_stay_in_the_yaw_range():
    """With a yaw_range the grid's candidates are the centres of equal cells of that range (pitch unchanged), and
    the moving candidates stay inside it even when the picture's camera lies outside: rules out a range that only
    moves the grid's start, and one that is ignored."""
    yaw, pitch = pose_grid(PRESET, 4, 3, (0.1, 0.5))
    assert yaw[:4].tolist() == pytest.approx([0.15, 0.25, 0.35, 0.45])
    assert pitch.tolist() == pytest.approx(pose_grid(PRESET, 4, 3)[1].tolist())
    with pytest.raises(InputError, match="low < high"):
        SearchSettings(yaw_range=(0.3, 0.1))
    G = tiny_generator()
    target = known_target(G, seed=6, yaw=-0.45, pitch=0.1)[1]
    inv = invert(G, PRESET, target, settings=InvertSettings(steps=5, pti_steps=0),
                 search=SearchSettings(yaws=3, pitches=1, steps=15, pose_lr=0.05, yaw_range=(0.0, 0.4)))
    ends = [c["end"][0] for c in inv.history["pose_search"]["grid"]["candidates"]]
    assert all(0.0 <= y <= 0.4 for y in ends) and inv.history["pose_search"]["grid"]["yaw_range"] == \
        pytest.approx([0.0, 0.4])


def test_invert_and_poses_search_around_the_readers_reading(tmp_path, monkeypatch):
    """`gmpi invert --pose-init reader` and `gmpi poses --pose-init reader` search the window around the reader's
    reading and record the reading: rules out a reading that is computed but not used (a search over the whole
    prior) and a report without it."""
    import imageio.v3 as iio

    from gmpi_lightning import export, invert_cli, poses
    from gmpi_lightning.cli import main as gmpi_main

    ckpt = save_gmpi_checkpoint(tmp_path / "g.pt", tiny_generator(), PRESET.to_dict())
    folder = tmp_path / "images"
    folder.mkdir()
    iio.imwrite(folder / "a.png", export.to_uint8(known_target(tiny_generator(), seed=6, yaw=0.3, pitch=0.0)[1][0]))
    for module in (invert_cli, poses):
        monkeypatch.setattr(module, "reader_for", lambda *a, **kw: _Fixed(0.3, 0.05))
    lo, hi = yaw_window(0.3, PRESET)
    out = tmp_path / "inv"
    assert gmpi_main(["invert", "--ckpt", str(ckpt), "--image", str(folder / "a.png"), "--pose-init", "reader",
                      "--steps", "5", "--pti-steps", "0", "--search-grid", "3x1", "--search-steps", "3",
                      "--out", str(out), "--device", "cpu"]) == 0
    import json

    metrics = json.loads((out / "metrics.json").read_text())
    cam = metrics["camera"]
    assert cam["source"] == "reader" and cam["reader"] == pytest.approx([0.3, 0.05])
    starts = [c["start"][0] for c in metrics["stages"]["pose_search"]["grid"]["candidates"]]
    assert starts == pytest.approx([lo + (hi - lo) * (k + 0.5) / 3 for k in range(3)], abs=1e-5)  # rounded to 1e-6
    poses_out = tmp_path / "poses.json"
    assert gmpi_main(["poses", "--ckpt", str(ckpt), "--images", str(folder), "--out", str(poses_out),
                      "--pose-init", "reader", "--steps", "5", "--search-grid", "3x1", "--search-steps", "3",
                      "--device", "cpu"]) == 0
    report = json.loads((tmp_path / "poses.report.json").read_text())
    est = report["estimates"]["a.png"]
    assert est["reader"] == pytest.approx([0.3, 0.05]) and lo <= est["search"][0] <= hi
    assert report["pose_init"] == "reader"
