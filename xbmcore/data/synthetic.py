"""The embedded benchmark: SOP-like fine-grained classes rendered from a seed, no download.

Why it looks like this. Stanford Online Products has ~11k training classes of ~5 images, grouped in super-classes
whose members (e.g. two kettles) differ in small details. Pair losses need those look-alike classes as negatives,
and a P x M batch rarely holds them when classes are many: that is the gap Cross-Batch Memory fills. The generator
reproduces that structure:

  super-class  a composite shape (a body and two parts: superellipses with exponent, size, angle) and a palette;
  class        small details on top of its super-class: a mark's position and colour (one of two), a stripe's
               angle and offset across the body, a shifted colour of one part, a resized part;
  image        position, scale, rotation, background (colour, gradient, texture), two clutter blobs, colour
               jitter, an occluder on some images, pixel noise.

So siblings inside a super-class are hard negatives, and classes of different super-classes are easy ones.
Rendering is vectorised with numpy over chunks of images (anti-aliased signed-distance shapes), float32 until a
single rounding to uint8. Same seed and parameters give identical bytes (on one platform: numpy's transcendental
functions may differ in the last bit across CPUs).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xbmcore.config import SyntheticParams

# Images rendered per numpy pass. Fixed, because the pixel noise is drawn per chunk: changing it changes bytes.
_CHUNK = 1024


@dataclass(frozen=True)
class SyntheticSet:
    images: np.ndarray  # N x 3 x S x S uint8, images of one class contiguous, classes in id order
    labels: np.ndarray  # N int64 class ids 0..C-1
    super_labels: np.ndarray  # N int64 super-class ids


def images_per_class(p: SyntheticParams, rng: np.random.Generator) -> np.ndarray:
    # Skewed towards the minimum (n = min + floor(span * u^2), mean ~ min + span/3) like SOP's long tail of
    # classes with few images: about 7 on average for the default 4..12.
    span = p.images_per_class_max - p.images_per_class_min + 1
    u = rng.random(p.num_classes)
    return p.images_per_class_min + np.minimum((span * u * u).astype(np.int64), span - 1)


def _uniform(rng: np.random.Generator, lo: float, hi: float, size) -> np.ndarray:
    return rng.uniform(lo, hi, size).astype(np.float32)


def _describe_classes(p: SyntheticParams, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Shape and colour parameters of every class (object units: the object radius is 1)."""
    C = p.num_classes
    S_n = -(-C // p.classes_per_superclass)
    sup = np.arange(C) // p.classes_per_superclass  # class -> super-class
    u = lambda lo, hi, size=S_n: _uniform(rng, lo, hi, size)  # noqa: E731

    # Super-class: a body and two parts (centre, half-sizes, exponent, angle) and a palette.
    # Exponent 1 is a diamond, 2 an ellipse, large values a rounded rectangle; log-uniform spreads shapes evenly.
    body = dict(cx=np.zeros(S_n, np.float32), cy=np.zeros(S_n, np.float32), a=u(0.6, 0.95), b=u(0.35, 0.65),
                e=np.exp(u(np.log(0.9), np.log(6.0))), t=u(0, np.pi))
    parts = []
    for _ in range(2):
        ang, rad = u(0, 2 * np.pi), u(0.45, 0.85)
        parts.append(dict(cx=rad * np.cos(ang), cy=rad * np.sin(ang), a=u(0.18, 0.38), b=u(0.12, 0.3),
                          e=np.exp(u(np.log(0.9), np.log(6.0))), t=u(0, np.pi)))
    palette = u(0.05, 0.95, (S_n, 3, 3))  # body, part 1, part 2 colours
    mark_colours = u(0.0, 1.0, (S_n, 2, 3))  # the two mark colours a class chooses from
    stripe_colour = u(0.0, 1.0, (S_n, 3))

    # Class: the small details. Each class starts from its super-class and perturbs a few things.
    c = lambda lo, hi, size=C: _uniform(rng, lo, hi, size)  # noqa: E731
    d: dict[str, np.ndarray] = {"super": sup}
    for k, v in body.items():
        d[f"body_{k}"] = v[sup]
    for i, part in enumerate(parts):
        for k, v in part.items():
            d[f"part{i}_{k}"] = v[sup].copy()
    colours = palette[sup].copy()  # C x 3 parts x 3 channels
    which = rng.integers(0, 2, C)  # the part whose colour and size move
    colours[np.arange(C), 1 + which] = np.clip(
        colours[np.arange(C), 1 + which] + rng.normal(0, 0.22, (C, 3)).astype(np.float32), 0, 1)
    grow = c(0.75, 1.3)
    for i in range(2):
        sel = which == i
        d[f"part{i}_a"][sel] *= grow[sel]
        d[f"part{i}_b"][sel] *= grow[sel]
    d["colours"] = colours
    r, ang = np.sqrt(c(0, 1)) * 0.55, c(0, 2 * np.pi)  # mark uniform over a disc inside the body
    d["mark_cx"], d["mark_cy"], d["mark_r"] = r * np.cos(ang), r * np.sin(ang), c(0.16, 0.22)
    d["mark_colour"] = mark_colours[sup, rng.integers(0, 2, C)]
    d["stripe_t"], d["stripe_off"], d["stripe_w"] = c(0, np.pi), c(-0.35, 0.35), c(0.12, 0.2)
    d["stripe_colour"] = stripe_colour[sup]
    return d


def _describe_images(n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Per-image nuisance: pose, background, clutter, colour jitter, occlusion, noise (image units: [-1, 1])."""
    u = lambda lo, hi, size=n: _uniform(rng, lo, hi, size)  # noqa: E731
    return dict(
        cx=u(-0.18, 0.18), cy=u(-0.18, 0.18), scale=u(0.65, 0.85), rot=u(-0.25, 0.25),
        bg=u(0, 1, (n, 3)), grad=u(-0.3, 0.3, (n, 3)), grad_t=u(0, 2 * np.pi),
        tex_amp=u(0, 0.1), tex_fx=u(-9, 9), tex_fy=u(-9, 9), tex_ph=u(0, 2 * np.pi),
        clutter_cx=u(-1, 1, (n, 2)), clutter_cy=u(-1, 1, (n, 2)), clutter_a=u(0.05, 0.16, (n, 2)),
        clutter_b=u(0.05, 0.16, (n, 2)), clutter_e=np.exp(u(np.log(0.9), np.log(6.0), (n, 2))),
        clutter_t=u(0, np.pi, (n, 2)), clutter_colour=u(0, 1, (n, 2, 3)),
        gain=u(0.75, 1.25), channel_gain=u(0.9, 1.1, (n, 3)), offset=u(-0.06, 0.06, (n, 3)),
        occlude=(rng.random(n) < 0.2), occ_cx=u(-0.9, 0.9), occ_cy=u(-0.9, 0.9), occ_w=u(0.1, 0.28),
        occ_h=u(0.1, 0.28), occ_colour=u(0, 1, (n, 3)), noise=u(0.01, 0.04),
    )


def _superellipse(x, y, cx, cy, a, b, e, t, px):
    """Anti-aliased coverage (N x S x S, 0..1) of |u/a|^e + |v/b|^e <= 1, (u, v) rotated by t about (cx, cy).

    All shape arguments are per image (N,) and broadcast over the pixel grid; px is one pixel in the units of x, y.
    The level-set distance (r - 1) * min(a, b) approximates the signed distance well enough for a one-pixel ramp.
    """
    col = lambda v: np.asarray(v, np.float32)[:, None, None]  # noqa: E731
    dx, dy = x - col(cx), y - col(cy)
    ct, st = col(np.cos(t)), col(np.sin(t))
    u = np.abs(dx * ct + dy * st) / col(a)
    v = np.abs(dy * ct - dx * st) / col(b)
    ee = col(e)
    r = (u ** ee + v ** ee) ** (1.0 / ee)
    return np.clip(0.5 - (r - 1.0) * col(np.minimum(a, b)) / col(px), 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    # img: N x 3 x S x S, alpha: N x S x S, colour: N x 3 -- alpha compositing in place.
    a = alpha[:, None]
    img *= 1.0 - a
    img += a * colour[:, :, None, None]


def _render(cls: dict[str, np.ndarray], im: dict[str, np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one chunk: `cls` holds the class parameters of each image, `im` its nuisance parameters."""
    n = len(im["cx"])
    g = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2 - 1  # pixel centres in [-1, 1]
    X, Y = g[None, None, :], g[None, :, None]  # broadcast to N x S x S
    px = np.full(n, 2.0 / size, np.float32)

    # Background: colour + linear gradient + a sinusoidal texture.
    ramp = X * np.cos(im["grad_t"])[:, None, None] + Y * np.sin(im["grad_t"])[:, None, None]  # N x S x S
    tex = im["tex_amp"][:, None, None] * np.sin(
        X * im["tex_fx"][:, None, None] + Y * im["tex_fy"][:, None, None] + im["tex_ph"][:, None, None])
    img = im["bg"][:, :, None, None] + im["grad"][:, :, None, None] * ramp[:, None] * 0.5 + tex[:, None]
    img = img.astype(np.float32)
    for k in range(2):  # clutter behind the object
        _paint(img, _superellipse(X, Y, im["clutter_cx"][:, k], im["clutter_cy"][:, k], im["clutter_a"][:, k],
                                  im["clutter_b"][:, k], im["clutter_e"][:, k], im["clutter_t"][:, k], px),
               im["clutter_colour"][:, k])

    # Object frame: translate, rotate, scale so the object radius is 1; distances scale by 1 / scale.
    c, s, sc = np.cos(im["rot"]), np.sin(im["rot"]), im["scale"]
    dx, dy = X - im["cx"][:, None, None], Y - im["cy"][:, None, None]
    ox = (dx * c[:, None, None] + dy * s[:, None, None]) / sc[:, None, None]
    oy = (dy * c[:, None, None] - dx * s[:, None, None]) / sc[:, None, None]
    opx = px / sc

    body = _superellipse(ox, oy, cls["body_cx"], cls["body_cy"], cls["body_a"], cls["body_b"], cls["body_e"],
                         cls["body_t"], opx)
    _paint(img, body, cls["colours"][:, 0])
    for i in range(2):
        _paint(img, _superellipse(ox, oy, cls[f"part{i}_cx"], cls[f"part{i}_cy"], cls[f"part{i}_a"],
                                  cls[f"part{i}_b"], cls[f"part{i}_e"], cls[f"part{i}_t"], opx),
               cls["colours"][:, 1 + i])
    # Stripe: a band across the body (clipped to it) at the class's angle and offset.
    t = cls["stripe_t"][:, None, None]
    dist = np.abs(ox * np.cos(t) + oy * np.sin(t) - cls["stripe_off"][:, None, None])
    band = np.clip(0.5 + (cls["stripe_w"][:, None, None] / 2 - dist) / opx[:, None, None], 0.0, 1.0)
    _paint(img, band * body, cls["stripe_colour"])
    ones = np.ones(n, np.float32)
    _paint(img, _superellipse(ox, oy, cls["mark_cx"], cls["mark_cy"], cls["mark_r"], cls["mark_r"], 2 * ones,
                              0 * ones, opx), cls["mark_colour"])

    # Photometric jitter, occluder (in front of everything), pixel noise.
    img *= (im["gain"][:, None] * im["channel_gain"])[:, :, None, None]
    img += im["offset"][:, :, None, None]
    occ = np.clip(0.5 + (im["occ_w"][:, None, None] - np.abs(X - im["occ_cx"][:, None, None])) / px[0], 0, 1) * \
        np.clip(0.5 + (im["occ_h"][:, None, None] - np.abs(Y - im["occ_cy"][:, None, None])) / px[0], 0, 1)
    _paint(img, occ * im["occlude"][:, None, None], im["occ_colour"])
    img += rng.standard_normal(img.shape, dtype=np.float32) * im["noise"][:, None, None, None]
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def num_images(p: SyntheticParams) -> int:
    """N, the number of images `generate(p)` renders (the first draw from the seeded generator)."""
    return int(images_per_class(p, np.random.default_rng(p.seed)).sum())


def generate(p: SyntheticParams, out: np.ndarray | None = None) -> SyntheticSet:
    """Render the whole set, N x 3 x S x S uint8, into `out` when given (e.g. a memory-mapped .npy)."""
    rng = np.random.default_rng(p.seed)
    counts = images_per_class(p, rng)
    cls = _describe_classes(p, rng)
    labels = np.repeat(np.arange(p.num_classes, dtype=np.int64), counts)
    N = len(labels)
    im = _describe_images(N, rng)
    shape = (N, 3, p.image_size, p.image_size)
    if out is None:
        out = np.empty(shape, np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"generate: `out` must be uint8 {shape}, got {out.dtype} {out.shape}")
    for k, start in enumerate(range(0, N, _CHUNK)):
        sl = slice(start, min(start + _CHUNK, N))
        lab = labels[sl]
        out[sl] = _render({key: v[lab] for key, v in cls.items()}, {key: v[sl] for key, v in im.items()},
                          p.image_size, np.random.default_rng([p.seed, 1, k]))
    return SyntheticSet(images=out, labels=labels, super_labels=cls["super"][labels].astype(np.int64))
