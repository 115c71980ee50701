"""Safe import of NVlabs pickles, the converted format, and refusal of hostile pickles."""

import io
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from gmpi_lightning.cli import main as gmpi_main
from gmpi_lightning.io import NetworkFormatError, UnsafePickleError, load_stylegan2_pkl
from gmpi_lightning.io.stylegan2_pkl import FORMAT
from gmpi_lightning.nn import Discriminator, Generator
from tests.conftest import REPO, max_err
from tests.nvlabs_pickle import dumps_nvlabs

G_KW = dict(z_dim=16, c_dim=4, w_dim=16, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),
            synthesis_kwargs=dict(channel_base=256, channel_max=32, num_fp16_res=2, conv_clamp=256))
D_KW = dict(c_dim=4, img_resolution=16, img_channels=3, channel_base=256, channel_max=32, num_fp16_res=2,
            conv_clamp=256, cmap_dim=8, block_kwargs={}, mapping_kwargs=dict(num_layers=2),
            epilogue_kwargs=dict(mbstd_group_size=2))


def _randomise(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            t.add_(0.1 * torch.randn(t.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def conditional_pickle(tmp_path_factory):
    """An NVlabs-format snapshot of a *conditional* 16 px G/D pair (a configuration the fixture lacks)."""
    G, D = _randomise(Generator(**G_KW), 1), _randomise(Discriminator(**D_KW), 2)
    G_ema = _randomise(Generator(**G_KW), 3)
    snap = {"training_set_kwargs": {"resolution": 16, "use_labels": True}, "G": G, "D": D, "G_ema": G_ema,
            "augment_pipe": None}
    path = tmp_path_factory.mktemp("pkl") / "network-snapshot-000100.pkl"
    path.write_bytes(dumps_nvlabs(snap, {"G": G_KW, "D": D_KW, "G_ema": G_KW}))
    return path, snap


def test_conditional_pickle_round_trip(conditional_pickle):
    path, snap = conditional_pickle
    raw = path.read_bytes()
    assert b"torch_utils.persistence" in raw and b"_reconstruct_persistent_obj" in raw
    loaded = load_stylegan2_pkl(path)
    assert loaded["training_set_kwargs"] == {"resolution": 16, "use_labels": True}
    z, c = torch.randn(4, 16), torch.randn(4, 4)
    with torch.no_grad():
        for key in ("G", "G_ema"):
            assert max_err(loaded[key](z, c, noise_mode="const"), snap[key](z, c, noise_mode="const")) == 0
        img = snap["G"](z, c, noise_mode="const")
        assert max_err(loaded["D"](img, c), snap["D"](img, c)) == 0
    assert not loaded["G"].training and not any(p.requires_grad for p in loaded["G"].parameters())


def test_import_command_writes_weights_only_file(conditional_pickle, tmp_path, capsys):
    path, snap = conditional_pickle
    out = tmp_path / "converted.pt"
    assert gmpi_main(["import-stylegan2", str(path), str(out)]) == 0
    assert "G_ema" in capsys.readouterr().out
    blob = torch.load(out, weights_only=True)
    assert blob["format"] == FORMAT and set(blob["networks"]) == {"G", "D", "G_ema"}
    assert blob["networks"]["G"]["init_kwargs"]["synthesis_kwargs"]["num_fp16_res"] == 2
    reloaded = load_stylegan2_pkl(out)
    z, c = torch.randn(2, 16), torch.randn(2, 4)
    with torch.no_grad():
        assert max_err(reloaded["G_ema"](z, c, noise_mode="const"), snap["G_ema"](z, c, noise_mode="const")) == 0


def test_fixture_pickle_converts_and_keeps_outputs(sg2_fixture, tmp_path):
    refs = np.load(sg2_fixture / "refs.npz")
    out = tmp_path / "sg2.pt"
    assert gmpi_main(["import-stylegan2", str(sg2_fixture / "network-snapshot-000000.pkl"), str(out)]) == 0
    nets = load_stylegan2_pkl(out)
    with torch.no_grad():
        img = nets["G_ema"](torch.from_numpy(refs["z"]), None, noise_mode="const")
    assert max_err(img, refs["img"]) <= 1e-4
    assert nets["training_set_kwargs"]["resolution"] == 32


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __reduce__(self):
        import builtins

        return (builtins.eval, ("__import__('os').getcwd()",))


def test_hostile_pickle_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"G": _Boom(marker)}, protocol=4))
    # Sanity: the plain unpickler *would* run the command.
    pickle.loads(evil.read_bytes())
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match=r"refusing global '(posix|os)\.system'"):
        load_stylegan2_pkl(evil)
    assert not marker.exists()
    evil.write_bytes(pickle.dumps({"G": _Eval()}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"builtins\.eval"):
        load_stylegan2_pkl(evil)


def test_hostile_payload_nested_inside_a_network_record(conditional_pickle, tmp_path):
    path, snap = conditional_pickle
    marker = tmp_path / "nested"
    G = _randomise(Generator(**G_KW), 4)
    G.mapping.sneaky = _Boom(marker)  # lives in the record's attribute dict
    evil = tmp_path / "nested.pkl"
    evil.write_bytes(dumps_nvlabs({"G": G}, {"G": G_KW}))
    with pytest.raises(UnsafePickleError, match="system"):
        load_stylegan2_pkl(evil)
    assert not marker.exists()


def test_gmpi_cli_reports_refusal_without_traceback(tmp_path):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"G": _Eval()}, protocol=4))
    proc = subprocess.run([sys.executable, "-m", "gmpi_lightning", "import-stylegan2", str(evil),
                           str(tmp_path / "o.pt")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1
    assert "refusing global 'builtins.eval'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o.pt").exists()


def test_unknown_class_and_kwargs_are_clear_errors(tmp_path):
    G = _randomise(Generator(**G_KW), 5)
    bad_kw = dict(G_KW, synthesis_kwargs=dict(G_KW["synthesis_kwargs"], fancy_new_option=3))
    p = tmp_path / "kw.pkl"
    p.write_bytes(dumps_nvlabs({"G": G}, {"G": bad_kw}))
    with pytest.raises(NetworkFormatError, match="fancy_new_option"):
        load_stylegan2_pkl(p)

    class StyleGAN3Generator(Generator):
        pass

    G3 = StyleGAN3Generator(**G_KW)
    p3 = tmp_path / "sg3.pkl"
    p3.write_bytes(dumps_nvlabs({"G": G3}, {"G": G_KW}))
    with pytest.raises(NetworkFormatError, match="unknown network class 'StyleGAN3Generator'"):
        load_stylegan2_pkl(p3)
    wrong = tmp_path / "wrongshape.pkl"
    wrong.write_bytes(dumps_nvlabs({"G": G}, {"G": dict(G_KW, w_dim=32)}))
    with pytest.raises(NetworkFormatError, match="shape|missing"):
        load_stylegan2_pkl(wrong)


def test_missing_truncated_and_foreign_files(tmp_path, conditional_pickle):
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        load_stylegan2_pkl(tmp_path / "ffhq.pkl")
    path, _ = conditional_pickle
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(path.read_bytes()[: 5000])
    with pytest.raises(NetworkFormatError, match="not a readable network pickle"):
        load_stylegan2_pkl(cut)
    lst = tmp_path / "list.pkl"
    lst.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(NetworkFormatError, match="expected a dict"):
        load_stylegan2_pkl(lst)
    other = tmp_path / "other.pt"
    buf = io.BytesIO()
    torch.save({"hello": torch.zeros(1)}, buf)
    other.write_bytes(buf.getvalue())
    with pytest.raises(NetworkFormatError, match="import-stylegan2"):
        load_stylegan2_pkl(other)
