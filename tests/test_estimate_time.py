"""`make train` prints how long it will take, from a few timed iterations (benchmarks/estimate_time.py)."""

import re
import subprocess

from tests.conftest import REPO


def test_estimate_scales_timed_iterations_to_the_stage_length(tmp_path, monkeypatch, capsys):
    """Rules out an estimate that is not the measured seconds per iteration times the stage's max_iters, a total
    that drops a stage or the data step, or a stage whose 2D prior does not exist yet failing instead of being timed
    with the prior's architecture."""
    monkeypatch.chdir(tmp_path)  # no runs/synthetic_stylegan2/stylegan2.pt here: the GMPI stage is built from scratch
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import estimate_time
    import torch

    threads = torch.get_num_threads()  # the script uses every core; the rest of the suite keeps its setting
    try:
        assert estimate_time.main(["--config", str(REPO / "experiments" / "synthetic.yaml"), "--data-images", "6400",
                                   "--iters", "2", "--warmup", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    data = float(re.search(r"synthetic data, 6400 images: ([\d.]+) min", out).group(1))
    iters, per_iter, minutes = re.search(r"synthetic\.yaml: (\d+) iterations x ([\d.]+) s = ([\d.]+) min", out).groups()
    assert int(iters) == 600  # experiments/synthetic.yaml's max_iters
    assert abs(float(minutes) - int(iters) * float(per_iter) / 60) < 0.06
    total, with_callbacks = map(float, re.search(r"total: about (\d+) min, (\d+) min with", out).groups())
    assert abs(total - (data + float(minutes))) <= 0.6 and with_callbacks >= total


def test_make_train_prints_the_estimate_before_training():
    """Rules out the estimate dropped from the default pipeline, or run after the training it estimates."""
    proc = subprocess.run(["make", "-n", "--no-print-directory", "train"], cwd=REPO, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "MAKEFLAGS": ""})
    lines = proc.stdout.splitlines()
    first_estimate = next(i for i, line in enumerate(lines) if "benchmarks/estimate_time.py" in line)
    first_fit = next(i for i, line in enumerate(lines) if "gmpi fit" in line)
    assert proc.returncode == 0 and first_estimate < first_fit, proc.stdout + proc.stderr
