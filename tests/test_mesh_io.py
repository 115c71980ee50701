"""glTF binary meshes (gmpi_lightning/mesh_io.py): `gmpi render --mesh --mesh-format ply,glb`, read back by a GLB
parser written here from the glTF 2.0 container layout (not trimesh, which writes them) and by trimesh."""

import json
import struct

import numpy as np
import pytest
import torch

from gmpi_lightning import export
from gmpi_lightning.cli import main as gmpi_main
from gmpi_lightning.io import save_gmpi_checkpoint
from gmpi_lightning.mesh_io import parse_mesh_formats, write_glb
from gmpi_lightning.nn.gmpi import GMPIGenerator
from gmpi_lightning.presets import get_preset

PRESET = get_preset("FFHQ256", resolution=32)
COMPONENTS = {"SCALAR": 1, "VEC3": 3, "VEC4": 4}
DTYPES = {5121: np.uint8, 5123: np.uint16, 5125: np.uint32, 5126: np.float32}


def read_glb(path) -> dict:
    """The first primitive of a GLB file: 'POSITION' (V x 3), 'COLOR_0' (V x C, as stored), 'indices' (F x 3),
    'normalized' flags and the accessors' declared 'min'/'max'."""
    data = open(path, "rb").read()
    magic, version, length = struct.unpack("<4sII", data[:12])
    assert magic == b"glTF" and version == 2 and length == len(data)
    json_len, json_type = struct.unpack("<I4s", data[12:20])
    assert json_type == b"JSON"
    doc = json.loads(data[20:20 + json_len])
    bin_len, bin_type = struct.unpack("<I4s", data[20 + json_len:28 + json_len])
    assert bin_type == b"BIN\0"
    blob = data[28 + json_len:28 + json_len + bin_len]
    prim = doc["meshes"][0]["primitives"][0]
    assert prim.get("mode", 4) == 4  # triangles

    def accessor(i):
        acc = doc["accessors"][i]
        view = doc["bufferViews"][acc["bufferView"]]
        start = view.get("byteOffset", 0) + acc.get("byteOffset", 0)
        n = COMPONENTS[acc["type"]]
        arr = np.frombuffer(blob, DTYPES[acc["componentType"]], acc["count"] * n, start).reshape(acc["count"], n)
        return arr, acc

    out = {"indices": accessor(prim["indices"])[0].reshape(-1, 3)}
    for name, i in prim["attributes"].items():
        out[name], acc = accessor(i)
        out[name + "_acc"] = acc
    return out


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    G = GMPIGenerator(z_dim=16, c_dim=0, w_dim=16, img_resolution=32, mapping_kwargs=dict(num_layers=2),
                      synthesis_kwargs=dict(channel_base=512, channel_max=32)).eval()
    return save_gmpi_checkpoint(tmp_path_factory.mktemp("ckpt") / "gmpi.pt", G, PRESET.to_dict())


def test_render_writes_a_glb_with_the_mpi_colours_inside_the_depth_range(tiny_ckpt, tmp_path):
    """The glb holds the PLY's mesh: same vertex count and faces, the same 8-bit colours as COLOR_0, vertices in
    glTF's axes ((x, -y, -z): the face upright, looking at a viewer on +Z) and so z inside [-far, -near].
    Rules out: a glb without colours (or colours as floats > 1 / all one value), vertices left in the world frame
    (z would be positive), a mirrored frame (only y or only z flipped), vertices and faces out of step."""
    out = tmp_path / "r"
    assert gmpi_main(["render", "--ckpt", str(tiny_ckpt), "--seeds", "0", "--planes", "8", "--yaw", "0", "--mesh",
                      "--mesh-format", "ply,glb", "--out", str(out), "--device", "cpu"]) == 0
    verts, faces = export.read_ply(out / "seed0000_mesh.ply")
    ply_colors = np.frombuffer((out / "seed0000_mesh.ply").read_bytes()[-(len(faces) * 13 + len(verts) * 15):],
                               dtype=[("xyz", "<f4", 3), ("rgb", "u1", 3)], count=len(verts))["rgb"]
    glb = read_glb(out / "seed0000_mesh.glb")
    assert len(verts) > 10 and glb["POSITION"].shape == (len(verts), 3)
    np.testing.assert_allclose(glb["POSITION"], verts * np.array([1, -1, -1], np.float32), atol=1e-6)
    assert np.array_equal(glb["indices"], faces)
    color = glb["COLOR_0"]
    assert color.dtype == np.uint8 and glb["COLOR_0_acc"]["normalized"] and color.shape[1] in (3, 4)
    assert np.array_equal(color[:, :3], ply_colors) and color[:, :3].std() > 1  # the MPI's colours, not one grey
    z = glb["POSITION"][:, 2]
    assert -PRESET.far - 1e-4 <= z.min() and z.max() <= -PRESET.near + 1e-4
    declared = glb["POSITION_acc"]
    np.testing.assert_allclose(declared["min"], glb["POSITION"].min(0), atol=1e-6)
    np.testing.assert_allclose(declared["max"], glb["POSITION"].max(0), atol=1e-6)
    import trimesh  # a second reader: what other tools see

    mesh = trimesh.load(out / "seed0000_mesh.glb", force="mesh")
    assert len(mesh.vertices) == len(verts) and len(mesh.faces) == len(faces)
    assert np.array_equal(np.asarray(mesh.visual.vertex_colors)[:, :3], ply_colors)
    assert gmpi_main(["render", "--ckpt", str(tiny_ckpt), "--seeds", "0", "--planes", "8", "--yaw", "0",
                      "--mesh-format", "glb", "--out", str(tmp_path / "g"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "g").glob("*mesh*")) == ["seed0000_mesh.glb"]  # a format asks for one
    assert gmpi_main(["invert", "--ckpt", str(tiny_ckpt), "--image", str(out / "seed0000_view00.png"), "--pose", "0,0",
                      "--steps", "2", "--pti-steps", "0", "--planes", "8", "--mesh-format", "glb", "--out",
                      str(tmp_path / "i"), "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "i").glob("mesh*")) == ["mesh.glb"]  # the same rule in gmpi invert


def test_formats_and_bad_meshes_are_checked(tmp_path):
    assert parse_mesh_formats("glb, .PLY,glb") == ["glb", "ply"]
    with pytest.raises(ValueError, match="mesh format obj is not one of ply, glb"):
        parse_mesh_formats("ply,obj")
    verts = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"face indices must lie in \[0, 3\)"):
        write_glb(tmp_path / "x.glb", verts, np.array([[0, 1, 3]]))
    with pytest.raises(ValueError, match="vertex colours must be 3 x 3"):
        write_glb(tmp_path / "x.glb", verts, np.array([[0, 1, 2]]), np.zeros((2, 3), np.uint8))
    assert not (tmp_path / "x.glb").exists()
