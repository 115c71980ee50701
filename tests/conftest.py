"""Shared test set-up: offline wandb, a private TORCH_HOME, fixture paths, small seeded helpers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import Phase, settings

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TORCH_HOME", tempfile.mkdtemp(prefix="gmpi-torch-home-"))
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
torch.set_num_threads(min(2, torch.get_num_threads()))
# `make mutation` sets HYPOTHESIS_PROFILE=mutation: a property that fails is reported at once, without shrinking its
# example (a killed mutant needs no minimal counterexample, and shrinking costs seconds per mutant).
settings.register_profile("mutation", phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parents[1]
# the tiny backbone of the tests' `gmpi fit` runs (16 px unless a test sets --model.resolution)
TINY_ARCH = '--model.arch={"z_dim": 16, "w_dim": 16, "mapping_layers": 2, "channel_base": 256, "channel_max": 16}'
# Reference tensors of the official implementations, vendored with the tests (tests/fixtures/README.md says how
# they were made); GMPI_FIXTURES points at another copy, e.g. a newer or a held-out set.
FIXTURES = Path(os.environ.get("GMPI_FIXTURES", REPO / "tests" / "fixtures"))


def fixture_dir(name: str) -> Path:
    """Path of tests/fixtures/<name>. A missing folder fails the test: a parity test that skips would let the
    suite say green without having compared anything."""
    path = FIXTURES / name
    if not path.is_dir():
        pytest.fail(f"reference fixtures not found at {path}: they ship with the repository under tests/fixtures "
                    f"(restore them with git, or point GMPI_FIXTURES at a copy)", pytrace=False)
    return path


@pytest.fixture
def sg2_fixture() -> Path:
    return fixture_dir("stylegan2_ada")


@pytest.fixture
def gmpi_fixture() -> Path:
    return fixture_dir("gmpi")


@pytest.fixture
def camera_fixture() -> Path:
    return fixture_dir("camera")


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """96 synthetic heads at 16 px (seed 3, 8 per shard, with depth and mask): the training and evaluation tests' data.
    Tests that need another shape (many images, few per shard) define their own."""
    from datamodules.converters import convert_synthetic

    return convert_synthetic(tmp_path_factory.mktemp("shards") / "s16", num=96, resolution=16, seed=3,
                             samples_per_shard=8)


def max_err(a, b) -> float:
    a = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)
    b = b.detach().cpu().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shape mismatch {a.shape} vs {b.shape}"
    return float(np.abs(a - b).max())


@pytest.fixture(scope="module")
def one_thread():
    """32 px optimisation is latency-bound: one thread is as fast alone and far faster next to other jobs
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
