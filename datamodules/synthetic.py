"""Procedural "synthetic heads": a fast, deterministic renderer of head-like objects with exact ground truth, the
default training data (real face data cannot ship) and the ground truth of the 3D metrics.

A sample is a scene in GMPI's world frame (+X right, +Y down, +Z forward; ``gmpi_lightning.cameras``): a head
ellipsoid near (0, 0, 1) whose face front is at z ~ 0.95 (the preset's near plane), nose, eyes (sclera / iris /
pupil by normal), eyebrows, mouth, ears, neck and a two-sided hair "sheet" (a larger cap ellipsoid kept where a
hairline function says hair), before the background plane z = ``far`` with a random colour gradient. Albedos,
sinusoidal skin modulation and hair streaks are random; shading is Lambertian under a light fixed in the *world*, so
multi-view renders of a sample are consistent. Every primitive is an axis-aligned ellipsoid intersected in closed
form, and only against the rays of a conservative pixel window around its bounding sphere (exact, and cheap for the
small features). Poses come from the preset's prior. Throughput: ``benchmarks/bench_synthetic.py``.

Randomness: sample ``i`` draws its pose, then a fixed-length vector of uniforms, from its own ``torch.Generator``
(seeded by a hash of (``cfg.seed``, ``i``)) and is rendered alone, so its outputs are bit-identical whatever batch
it is in (for a given torch build and thread count). RGB averages ``supersample``^2 sub-pixel rays per pixel; depth
and mask come from the single pixel-centre ray (``pixel_rays``), exact point samples that unproject exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from gmpi_lightning.cameras import focal_from_fov, invert_rigid, pixel_rays, sample_preset_pose, sphere_c2w
from gmpi_lightning.errors import InputError
from gmpi_lightning.evaluation.reference import register_truth
from gmpi_lightning.presets import get_preset

# Primitive slots (rows of the per-sample tables).
HEAD, CAP, NOSE, EYE_L, EYE_R, EAR_L, EAR_R, MOUTH, NECK, BROW_L, BROW_R = range(11)
N_PRIMS = 11
_N_UNIFORMS = 128         # fixed draw count per sample, so adding a parameter never shifts the others' stream
_MASK64 = (1 << 64) - 1
_PUPIL, _SCLERA = torch.tensor([[0.02], [0.02], [0.02]]), torch.tensor([[0.85], [0.83], [0.8]])
KEYS = ("image", "depth", "mask", "yaw", "pitch", "c2w", "w2c")


@dataclass
class SyntheticConfig:
    resolution: int = 64
    supersample: int = 2            # sub-pixel rays per pixel side for the RGB (depth/mask: the pixel-centre ray)
    seed: int = 0
    preset: str = "synthetic64"     # geometry (fov, far plane, camera sphere) and pose prior; resolution from above


def _mix64(x: int) -> int:
    # splitmix64 finaliser: neighbouring (seed, index) pairs get unrelated generator seeds
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int) -> int:
    """The ``torch.Generator`` seed of sample ``index`` (a 63-bit hash of the pair)."""
    return _mix64((_mix64((int(seed) + 0x9E3779B97F4A7C15) & _MASK64) + int(index)) & _MASK64) >> 1


def _generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(seed, index))


def sample_poses(indices: Sequence[int] | torch.Tensor, cfg: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(yaw, pitch), float32 each of length B: the poses ``render_heads`` uses for these samples (cheap)."""
    preset = get_preset(cfg.preset)
    poses = [sample_preset_pose(1, preset, generator=_generator(cfg.seed, i)) for i in _as_list(indices)]
    return tuple(torch.cat([p[k] for p in poses] or [torch.zeros(0)]).float() for k in (0, 1))


def _scene(g: torch.Generator) -> dict:
    """Per-sample scene parameters (python floats / small float32 tensors) from the generator ``g``."""
    it = iter(torch.rand(_N_UNIFORMS, generator=g, dtype=torch.float64).tolist())
    U = lambda lo, hi: lo + (hi - lo) * next(it)
    cx, cy, cz = U(-0.004, 0.004), U(-0.004, 0.004), 1.0 + U(-0.004, 0.004)
    rx, ry, rz = U(0.055, 0.07), U(0.07, 0.085), U(0.045, 0.055)

    def front(x, y):  # z of the head's front surface above (x, y): features are placed relative to it
        return cz - rz * math.sqrt(max(1.0 - ((x - cx) / rx) ** 2 - ((y - cy) / ry) ** 2, 0.0))

    centres, radii = [None] * N_PRIMS, [None] * N_PRIMS
    centres[HEAD], radii[HEAD] = (cx, cy, cz), (rx, ry, rz)
    centres[CAP] = (cx, cy - U(0.003, 0.008), cz + U(0.002, 0.006))
    radii[CAP] = (rx * U(1.06, 1.12), ry * U(1.05, 1.1), rz * U(1.06, 1.12))
    ny, nr = cy + U(0.05, 0.15) * ry, (U(0.007, 0.011), U(0.014, 0.02), U(0.009, 0.013))
    centres[NOSE], radii[NOSE] = (cx, ny, front(cx, ny) - U(0.005, 0.009) + nr[2]), nr  # tip sticks out toward -Z
    # eyes: flattened spheres sunk into the face so that only a lens-shaped front shows
    ex, ey, er, sink = U(0.3, 0.38) * rx, cy - U(0.1, 0.2) * ry, U(0.0075, 0.0095), U(0.5, 0.6)
    by, br = ey - U(1.3, 1.7) * er, (U(0.011, 0.015), U(0.0018, 0.0028), U(0.003, 0.004))
    for eye, brow, sx in ((EYE_L, BROW_L, -1), (EYE_R, BROW_R, 1)):
        x = cx + sx * ex
        centres[eye], radii[eye] = (x, ey, front(x, ey) + sink * er), (1.3 * er, 0.75 * er, er)
        centres[brow], radii[brow] = (x, by, front(x, by) + 0.3 * br[2]), br
    ay, ar, az = cy + U(0.0, 0.15) * ry, (U(0.008, 0.011), U(0.016, 0.022), U(0.01, 0.014)), cz + U(0.0, 0.01)
    half_w = rx * math.sqrt(1.0 - ((ay - cy) / ry) ** 2)
    for slot, sx in ((EAR_L, -1), (EAR_R, 1)):
        centres[slot], radii[slot] = (cx + sx * (half_w - 0.1 * ar[0]), ay, az), ar
    my, mr = cy + U(0.45, 0.55) * ry, (U(0.012, 0.018), U(0.0035, 0.005), U(0.004, 0.006))
    centres[MOUTH], radii[MOUTH] = (cx, my, front(cx, my) + 0.4 * mr[2]), mr
    centres[NECK] = (cx, cy + U(0.95, 1.05) * ry, cz + U(0.008, 0.015))
    radii[NECK] = (rx * U(0.48, 0.56), ry * U(1.0, 1.2), rz * U(0.7, 0.8))

    t = lambda v: torch.tensor(v, dtype=torch.float32)
    tone, hair_pick = U(0.0, 1.0), int(U(0.0, 4.999))
    skin = [lo + (hi - lo) * tone + U(-0.04, 0.04) for lo, hi in ((0.36, 0.96), (0.22, 0.78), (0.15, 0.68))]
    palette = ((0.05, 0.04, 0.04), (0.3, 0.18, 0.1), (0.75, 0.6, 0.35), (0.55, 0.22, 0.1), (0.6, 0.6, 0.62))
    hair = [min(max(c + U(-0.04, 0.04), 0.0), 1.0) for c in palette[hair_pick]]
    albedo = [skin] * N_PRIMS
    albedo[CAP], albedo[NECK] = hair, [c * 0.88 for c in skin]
    albedo[MOUTH] = [skin[0] * U(0.75, 0.9), skin[1] * U(0.45, 0.6), skin[2] * U(0.5, 0.6)]
    albedo[BROW_L] = albedo[BROW_R] = [c * 0.6 for c in hair]
    light = t((U(-0.6, 0.6), U(-0.7, -0.1), -1.0))
    ka = U(0.25, 0.45)
    radii = t(radii)
    return dict(
        centres=t(centres), inv_r2=radii.pow(-2), radius_max=radii.amax(-1), hair=t(hair), ka=ka, kd=1.0 - ka,
        centres_t=t(centres).T.contiguous(), inv_r2_t=radii.pow(-2).T.contiguous(), albedo_t=t(albedo).T.contiguous(),
        light=light / light.norm(),
        iris=t([U(0.1, 0.4) * 0.6, U(0.1, 0.35) * 0.6, U(0.05, 0.4) * 0.6]),
        # hairline in the cap's unit coordinates q: hair where q_y < h0 + side*clamp(q_z+1, 0, 1) + back*relu(q_z)
        # + a wave in q_x (front: forehead line; sides: temples down to the ears; back: down to the neck)
        hairline=(U(-0.55, -0.35), U(0.4, 0.8), U(0.5, 1.0), U(0.0, 0.1), U(4.0, 9.0), U(0.0, 2 * math.pi)),
        streak=(U(0.05, 0.15), U(8.0, 16.0), U(1.0, 4.0)),
        # skin modulation: amplitude x mean of 3 sinusoids of the 3D position (1-3 cycles across the head)
        mod_amp=U(0.04, 0.1),
        mod_freq=t([[U(-1, 1) for _ in range(3)] for _ in range(3)]) * t([U(20.0, 60.0) for _ in range(3)])[:, None],
        mod_phase=t([U(0.0, 2 * math.pi) for _ in range(3)]),
        bg=t([[U(0.1, 0.9) for _ in range(3)] for _ in range(2)]),
        bg_dir=(lambda a: (math.cos(a), math.sin(a)))(U(0.0, 2 * math.pi)), bg_scale=U(0.15, 0.4),
    )


def _hair_region(q: list[torch.Tensor], sc: dict) -> torch.Tensor:
    """Bool: whether points given in the cap's unit coordinates q = (x, y, z) lie in the hair region."""
    h0, side, back, amp, freq, phase = sc["hairline"]
    limit = (q[2] + 1).clamp_(0, 1).mul_(side).add_(q[2].clamp(min=0), alpha=back).add_(h0)
    return q[1] < limit.add_(torch.sin(q[0] * freq + phase), alpha=amp)


def _rects(sc: dict, w2c: torch.Tensor, f: float, n: int) -> list[tuple[int, int, int, int]]:
    """Per primitive, a conservative (y0, y1, x0, x1) pixel window of an n x n grid (focal f) holding its image: x/z
    over the bounding sphere's box c +- R is bounded by the box corners, and a 1-2 pixel margin absorbs float
    rounding, so skipping the rays outside never changes a result."""
    cam = sc["centres"].double() @ w2c[:3, :3].double().T + w2c[:3, 3].double()
    r = sc["radius_max"].double()[:, None] * 1.001 + 1e-4
    if bool((cam[:, 2] - r[:, 0] <= 1e-3).any()):
        raise InputError("a head part is behind or too close to the camera")
    lo, hi = cam[:, :2] - r, cam[:, :2] + r
    zs = torch.stack([cam[:, 2] - r[:, 0], cam[:, 2] + r[:, 0]], -1)[:, None, :]
    corners = torch.cat([lo[..., None] / zs, hi[..., None] / zs], -1)         # P x 2 (x, y) x 4
    pix = torch.stack([corners.amin(-1), corners.amax(-1)], -1) * f + n / 2 - 0.5
    pix = torch.stack([pix[..., 0].floor() - 1, pix[..., 1].ceil() + 2], -1).clamp(0, n).long().tolist()
    return [(py[0], py[1], px[0], px[1]) for px, py in pix]


def _intersect(sc: dict, o: torch.Tensor, d: torch.Tensor, rects) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest hit distance (inf for none) and primitive id (-1) of the rays d (3 x h x w, unit, world)."""
    t_near = torch.full(d.shape[1:], torch.inf)
    prim = torch.full(d.shape[1:], -1, dtype=torch.long)
    d2 = d * d
    oc = o - sc["centres"]
    w = sc["inv_r2"] * oc
    ks, As, ws = ((w * oc).sum(-1) - 1).tolist(), sc["inv_r2"].tolist(), w.tolist()
    for j, (y0, y1, x0, x1) in enumerate(rects):
        if y1 <= y0 or x1 <= x0:
            continue
        dv, d2v = d[:, y0:y1, x0:x1], d2[:, y0:y1, x0:x1]
        # |A^(1/2) (o + t d - c)|^2 = 1  ->  a t^2 + 2 b t + k = 0, k > 0 as the camera is outside the ellipsoid
        a = (d2v[0] * As[j][0]).add_(d2v[1], alpha=As[j][1]).add_(d2v[2], alpha=As[j][2])
        b = (dv[0] * ws[j][0]).add_(dv[1], alpha=ws[j][1]).add_(dv[2], alpha=ws[j][2])
        root = (b * b).sub_(a, alpha=ks[j]).sqrt_()             # NaN on a miss: every comparison below is False
        t = (-b).sub_(root).div_(a)
        if j == CAP:
            # the hair cap is a two-sided sheet restricted to the hair region: its entry, else its exit root
            t_out = (-b).add_(root).div_(a)
            s, qo = sc["inv_r2"][CAP].sqrt().tolist(), (oc[CAP] * sc["inv_r2"][CAP].sqrt()).tolist()
            hair = [_hair_region([dv[i] * (tt * s[i]) + qo[i] for i in range(3)], sc) for tt in (t, t_out)]
            t = torch.where(hair[0], t, torch.where(hair[1], t_out, torch.inf))
        tv = t_near[y0:y1, x0:x1]
        closer = t < tv
        tv.copy_(torch.where(closer, t, tv))
        prim[y0:y1, x0:x1].masked_fill_(closer, j)
    return t_near, prim


@functools.lru_cache(maxsize=16)
def _camera_dirs(fov: float, n: int) -> torch.Tensor:
    """Unit pixel-centre ray directions of an n x n grid in the camera frame, 3 x n x n (pixel_rays at identity)."""
    return pixel_rays(torch.eye(4), fov, n, n)[0][0].permute(2, 0, 1).contiguous()


def _render_one(sc: dict, c2w: torch.Tensor, w2c: torch.Tensor, res: int, ss: int, fov: float, far: float) -> dict:
    """One sample: image uint8 R x R x 3, depth float32 R x R, mask bool R x R (c2w, w2c: 4 x 4 float32)."""
    o, rot, f, oz = c2w[:3, 3], c2w[:3, :3], focal_from_fov(fov, res), float(c2w[2, 3])
    # depth and mask: the pixel-centre rays
    cam = _camera_dirs(fov, res)
    d = (rot @ cam.reshape(3, -1)).reshape(cam.shape)
    if not bool((d[2] > 0).all()):
        raise InputError("a camera ray points away from the background plane; the pose is outside the supported range")
    t_fg, prim = _intersect(sc, o, d, _rects(sc, w2c, f, res))
    t_bg = (far - oz) / d[2]
    mask = t_fg < t_bg
    depth = torch.where(mask, t_fg, t_bg) * cam[2]          # z-depth: distance times the ray's optical-axis cosine
    # colour: ss x ss sub-pixel rays per pixel (the pixel-centre rays of an ss-times finer grid)
    if ss > 1:
        cam = _camera_dirs(fov, res * ss)
        d = (rot @ cam.reshape(3, -1)).reshape(cam.shape)
        t_fg, prim = _intersect(sc, o, d, _rects(sc, w2c, f * ss, res * ss))
        t_bg = (far - oz) / d[2]
    d, t_fg, t_bg, prim = d.reshape(3, -1), t_fg.reshape(-1), t_bg.reshape(-1), prim.reshape(-1)
    # background: a linear gradient across the plane
    gx, gy = sc["bg_dir"]
    s = (d[0] * gx).add_(d[1], alpha=gy).mul_(t_bg).add_(float(o[0]) * gx + float(o[1]) * gy)
    s = s.div_(sc["bg_scale"]).add_(0.5).clamp_(0, 1)
    c0, c1 = sc["bg"][0][:, None], sc["bg"][1][:, None]
    rgb = c0 + (c1 - c0) * s
    # foreground: shade only the rays that hit the head (gathered)
    hit = (t_fg < t_bg).nonzero()[:, 0]
    d, prim = d.index_select(1, hit), prim.index_select(0, hit)
    p = o[:, None] + t_fg.index_select(0, hit) * d
    n = (p - sc["centres_t"].index_select(1, prim)).mul_(sc["inv_r2_t"].index_select(1, prim))   # not normalised
    n = torch.where((n[0] * d[0] + n[1] * d[1] + n[2] * d[2]) > 0, -n, n)   # the hair sheet's back faces the camera
    inv_len = (n[0] * n[0]).addcmul_(n[1], n[1]).addcmul_(n[2], n[2]).rsqrt_()
    q = list((p - sc["centres_t"][:, CAP:CAP + 1]).mul_(sc["inv_r2_t"][:, CAP:CAP + 1].sqrt()))
    hair = (prim == CAP) | ((prim == HEAD) & _hair_region(q, sc))
    amp, freq, tilt = sc["streak"]
    streak = torch.sin(q[0] * freq + q[1] * tilt).mul_(amp).add_(1)
    skin_mod = torch.sin(sc["mod_freq"] @ p + sc["mod_phase"][:, None]).mean(0).mul_(sc["mod_amp"]).add_(1)
    albedo = torch.where(hair, sc["hair"][:, None] * streak, sc["albedo_t"].index_select(1, prim) * skin_mod)
    # the eyes look toward -Z: pupil / iris / sclera by how frontal the normal is
    nz = n[2] * inv_len
    eye_col = torch.where(nz < -0.93, _PUPIL, torch.where(nz < -0.72, sc["iris"][:, None], _SCLERA))
    albedo = torch.where((prim == EYE_L) | (prim == EYE_R), eye_col, albedo)
    lambert = (sc["light"] @ n).mul_(inv_len).clamp_(min=0)
    rgb.index_copy_(1, hit, albedo * lambert.mul_(sc["kd"]).add_(sc["ka"]))
    rgb = rgb.reshape(3, res, ss, res, ss).mean(dim=(2, 4)).permute(1, 2, 0)
    image = rgb.clamp(0, 1).mul_(255).round_().to(torch.uint8)
    return dict(image=image, depth=depth.float(), mask=mask)


def _as_list(indices) -> list[int]:
    return [int(i) for i in (indices.reshape(-1).tolist() if isinstance(indices, torch.Tensor) else indices)]


def render_heads(indices: Sequence[int] | torch.Tensor, cfg: SyntheticConfig, yaw=None, pitch=None
                 ) -> dict[str, torch.Tensor]:
    """Render samples ``indices``; a sample's scene and pose are a function of (``cfg.seed``, index) only.

    ``yaw`` / ``pitch`` (length-B tensors or sequences) override the sampled pose of each sample (same scene), e.g.
    for multi-view ground truth. Returns, with B = len(indices) and R = ``cfg.resolution``:
    'image' uint8 B x R x R x 3, 'depth' float32 B x R x R (z-depth of the pixel-centre ray's hit, background
    plane included), 'mask' bool B x R x R (head parts vs background plane, pixel-centre ray), 'yaw' / 'pitch'
    float32 B, 'c2w' float32 B x 4 x 4 (``sphere_c2w`` of the returned yaw/pitch), 'w2c' float32 B x 4 x 4.
    """
    preset = get_preset(cfg.preset)
    idx = _as_list(indices)
    res, ss = int(cfg.resolution), int(cfg.supersample)
    if res < 1 or ss < 1:
        raise InputError(f"resolution and supersample must be >= 1, got {res} and {ss}")
    overrides = [None if v is None else torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in (yaw, pitch)]
    for v in overrides:
        if v is not None and v.numel() != len(idx):
            raise InputError(f"pose overrides need one value per sample ({len(idx)}), got {v.numel()}")
    outs = []
    for j, i in enumerate(idx):
        g = _generator(cfg.seed, i)
        drawn = sample_preset_pose(1, preset, generator=g)     # always drawn: the scene stream follows it
        y, p = (v.float() if over is None else over[j:j + 1] for v, over in zip(drawn, overrides))
        c2w = sphere_c2w(y, p, preset.sphere_center_z, preset.sphere_r)[0]
        w2c = invert_rigid(c2w)[0]
        one = _render_one(_scene(g), c2w, w2c, res, ss, preset.fov_deg, preset.far)
        outs.append(dict(one, yaw=y[0], pitch=p[0], c2w=c2w, w2c=w2c))
    if not idx:
        shapes = dict(image=(res, res, 3), depth=(res, res), mask=(res, res), yaw=(), pitch=(), c2w=(4, 4), w2c=(4, 4))
        dtypes = dict(image=torch.uint8, mask=torch.bool)
        return {key: torch.zeros((0, *shapes[key]), dtype=dtypes.get(key, torch.float32)) for key in KEYS}
    return {key: torch.stack([one[key] for one in outs]) for key in KEYS}


def iter_synthetic(num: int, cfg: SyntheticConfig, batch_size: int = 64) -> Iterator[dict]:
    """Samples 0 .. num-1 one by one: dicts with ``render_heads``' keys, unbatched, plus 'index' (int)."""
    for start in range(0, num, batch_size):
        batch = render_heads(range(start, min(start + batch_size, num)), cfg)
        for j in range(batch["image"].shape[0]):
            yield {key: batch[key][j] for key in KEYS} | {"index": start + j}


class HeadTruth:
    """The ground truth of a synthetic dataset, renderable at any camera: evaluation seed ``k`` is the held-out
    sample ``count + k`` (never in the shards). Reference rows of ``gmpi evaluate --reference`` use it
    (:mod:`gmpi_lightning.evaluation.reference`)."""

    def __init__(self, cfg: SyntheticConfig, first_index: int):
        self.cfg, self.first_index = cfg, int(first_index)

    @classmethod
    def from_card(cls, card: dict, resolution: int | None = None) -> HeadTruth:
        gen = card.get("generator") or {}
        cfg = SyntheticConfig(resolution=int(resolution or card["resolution"]),
                              supersample=int(gen.get("supersample", 2)), seed=int(gen.get("seed", 0)),
                              preset=str(card["preset"]))
        return cls(cfg, int(card["count"]) + int(card.get("rejected", 0)))

    def views(self, seeds, yaw, pitch) -> dict[str, torch.Tensor]:
        """Heads of evaluation ``seeds`` at (yaw, pitch): 'rgb' B x 3 x R x R in [0, 1], 'depth' B x 1 x R x R
        (z-depth), 'mask' B x 1 x R x R."""
        out = render_heads([self.first_index + int(s) for s in seeds], self.cfg, yaw=yaw, pitch=pitch)
        return {"rgb": out["image"].permute(0, 3, 1, 2).float() / 255, "depth": out["depth"][:, None],
                "mask": out["mask"][:, None]}


register_truth("synthetic", HeadTruth.from_card)  # `gmpi evaluate --reference` renders these heads' ground truth
