"""Mesh files of an extracted MPI surface (:func:`~gmpi_lightning.export.extract_mesh`): PLY and glTF binary.

    paths = write_mesh("out/seed0000_mesh", verts, faces, colors, ["ply", "glb"])   # -> .ply and .glb

* ``ply``: binary little-endian PLY in the GMPI world frame (+X right, +Y down, +Z forward, preset units), 8-bit
  vertex colours (:func:`~gmpi_lightning.export.write_ply`).
* ``glb``: glTF 2.0 binary (trimesh), colours as ``COLOR_0``. glTF is +Y up with the viewer on +Z, so vertices are
  stored as (x, -y, -z) of the world frame (180 degrees about X, no mirror): the face looks upright towards +Z, where
  glTF viewers (three.js, Blender, W&B's Object3D) put their camera; depth spans z in [-far, -near].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import InputError

MESH_FORMATS = ("ply", "glb")
GLTF_FROM_WORLD = np.diag([1.0, -1.0, -1.0]).astype(np.float32)  # world (y down, z forward) -> glTF (y up, z back)


def parse_mesh_formats(formats) -> list[str]:
    """``"ply,glb"`` or a list -> the formats, each checked; an unknown one is an error naming the choices."""
    items = [f.strip().lower().lstrip(".") for f in (formats.split(",") if isinstance(formats, str) else formats)]
    items = [f for f in items if f]
    bad = [f for f in items if f not in MESH_FORMATS]
    if bad or not items:
        raise InputError(f"mesh format {', '.join(bad) or '(none)'} is not one of {', '.join(MESH_FORMATS)}: "
                         f"pass e.g. --mesh-format ply,glb")
    return list(dict.fromkeys(items))


def write_glb(path: str | Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None = None) -> Path:
    """glTF binary of a triangle mesh: ``verts`` V x 3 (world frame), ``faces`` F x 3 indices, ``colors`` V x 3
    uint8 (stored as COLOR_0). Vertices are written in glTF's axes (module docstring)."""
    import trimesh

    verts, faces = np.asarray(verts, np.float32), np.asarray(faces, np.int64)
    if verts.ndim != 2 or verts.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise InputError(f"a mesh is V x 3 vertices and F x 3 faces, got {verts.shape} and {faces.shape}")
    if len(faces) and (faces.min() < 0 or faces.max() >= len(verts)):
        raise InputError(f"face indices must lie in [0, {len(verts)}), got {faces.min()}..{faces.max()}")
    rgba = None
    if colors is not None:
        colors = np.asarray(colors, np.uint8)
        if colors.shape != (len(verts), 3):
            raise InputError(f"vertex colours must be {len(verts)} x 3 uint8, got {colors.shape}")
        rgba = np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], axis=1)
    mesh = trimesh.Trimesh(vertices=verts @ GLTF_FROM_WORLD.T, faces=faces, vertex_colors=rgba, process=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(mesh.export(file_type="glb"))
    return path


def write_mesh(stem: str | Path, verts: np.ndarray, faces: np.ndarray, colors: np.ndarray | None,
               formats=("ply",)) -> list[Path]:
    """The mesh as ``stem.<format>`` for each of ``formats`` (``ply``, ``glb``); returns the paths in that order."""
    from .export import write_ply

    writers, stem = {"ply": write_ply, "glb": write_glb}, Path(stem)
    return [writers[f](stem.with_name(f"{stem.name}.{f}"), verts, faces, colors) for f in parse_mesh_formats(formats)]
