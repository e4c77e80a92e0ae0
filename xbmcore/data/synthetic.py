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
`pretrain_classes` more classes follow the `num_classes`, in super-classes of their own: a pretraining split of
the same image family whose classes and super-classes no other split holds. With none, the bytes are those of a
generator without them.
Rendering is vectorised with numpy over chunks of images (anti-aliased signed-distance shapes), float32 until a
single rounding to uint8.

The same seed and parameters give the same bytes on every machine. numpy dispatches its transcendental ufuncs
(sin, exp, power, ...) to SIMD kernels chosen by the CPU, and the C library's versions differ between platforms,
in the last bits; rounded to uint8, a last bit sometimes moves a pixel. So nothing here calls them: the random
draws are exact (uniform bits, integers), normal variates are sums of uniforms, and sin/cos, log2 and exp2 are
polynomials below, evaluated with +, -, x, / and exact bit operations (frexp, ldexp, rint) only, which IEEE 754
rounds identically everywhere. One numpy ufunc is one rounded operation (no fused multiply-add across ufuncs),
so the order written is the order computed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xbmcore.config import SyntheticParams

# Bumped whenever the same parameters render other bytes: a folder prepared by an older generator is regenerated.
GENERATOR_VERSION = 2
# Images rendered per numpy pass. Fixed, because the pixel noise is drawn per chunk: changing it changes bytes.
_CHUNK = 1024

# ---- elementary functions from exactly rounded operations ------------------------------------------------------
# Accuracy (float64 inputs): sin/cos ~1e-13 for |x| < 100, log2 and exp2 ~1e-8 relative; in float32 a few ulp.
# Enough: a pixel is one of 256 levels, and what must not change between machines is the bytes, not the last bit.

_LN2 = 0.6931471805599453
_SQRT_HALF = 0.7071067811865476
# pi/2 split in two (Cody-Waite): q * _PIO2_HI is exact for |q| < 2^20, so x - q pi/2 loses nothing to rounding.
_PIO2_HI = 1.57079632673412561417
_PIO2_LO = 6.07710050650619224932e-11


def _log2(x: np.ndarray) -> np.ndarray:
    """log2(x) for x > 0 (finite, normal), in x's dtype: exponent + atanh series of the mantissa."""
    x = np.asarray(x)
    m, e = np.frexp(x)  # x = m 2^e, m in [1/2, 1)
    low = m < _SQRT_HALF
    m = np.where(low, m * 2, m)  # m in [sqrt(1/2), sqrt(2))
    e = (e - low).astype(x.dtype)
    t = (m - 1) / (m + 1)  # |t| <= 0.172: ln m = 2 atanh t = 2 (t + t^3/3 + t^5/5 + ...)
    t2 = t * t
    p = (((t2 * (1 / 9) + 1 / 7) * t2 + 1 / 5) * t2 + 1 / 3) * t2 + 1
    return e + p * t * (2 / _LN2)


def _exp2(y: np.ndarray) -> np.ndarray:
    """2^y in y's dtype, y clipped to [-125, 127] (no subnormal results): 2^round(y) x Taylor series of the rest."""
    y = np.clip(np.asarray(y), -125, 127)
    k = np.rint(y)
    z = (y - k) * _LN2  # |z| <= ln2 / 2; y - k is exact
    p = z * (1 / 5040) + 1 / 720
    for c in (1 / 120, 1 / 24, 1 / 6, 1 / 2, 1, 1):
        p = p * z + c
    return np.ldexp(p, k.astype(np.int32))


def _sincos(x) -> tuple[np.ndarray, np.ndarray]:
    """(sin x, cos x) in float64: reduction by multiples of pi/2, Taylor series on [-pi/4, pi/4]."""
    x = np.asarray(x, np.float64)
    q = np.rint(x * (2 / np.pi))
    r = (x - q * _PIO2_HI) - q * _PIO2_LO
    r2 = r * r
    s = r2 * (-1 / 39916800) + 1 / 362880
    for c in (-1 / 5040, 1 / 120, -1 / 6, 1):
        s = s * r2 + c
    s = s * r
    c_ = r2 * (1 / 479001600) - 1 / 3628800
    for c in (1 / 40320, -1 / 720, 1 / 24, -1 / 2, 1):
        c_ = c_ * r2 + c
    n = q.astype(np.int64) & 3  # sin(r + n pi/2), cos(r + n pi/2)
    quadrant = [n == 0, n == 1, n == 2]
    return np.select(quadrant, [s, c_, -s], -c_), np.select(quadrant, [c_, -s, -c_], s)


def _uniform(rng: np.random.Generator, lo: float, hi: float, size) -> np.ndarray:
    # rng.random's doubles are exact (53 random bits x 2^-53); the affine map is done here, two rounded ufuncs,
    # rather than in the generator's C code, where a compiler may fuse it into one multiply-add on some CPUs.
    return (lo + (hi - lo) * rng.random(size)).astype(np.float32)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float, size) -> np.ndarray:
    return _exp2(_uniform(rng, float(_log2(lo)), float(_log2(hi)), size).astype(np.float64)).astype(np.float32)


def _normal(rng: np.random.Generator, size, dtype=np.float64) -> np.ndarray:
    """Standard normal variates as a centred sum of four uniforms (Irwin-Hall; variance 4/12, rescaled to 1).

    numpy's own normal sampler calls exp and log from the C library. Four uniforms are bounded at +-3.5 sd and
    otherwise close to Gaussian, which is all pixel noise and colour perturbations need.
    """
    u = [rng.random(size, dtype=dtype) for _ in range(4)]
    return ((u[0] + u[1]) + (u[2] + u[3]) - 2) * np.sqrt(dtype(3))


def _cos_sin32(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s, c = _sincos(t)
    return c.astype(np.float32), s.astype(np.float32)


@dataclass(frozen=True)
class SyntheticSet:
    """The rendered benchmark.

    Attributes:
        images: N x 3 x S x S uint8, images of one class contiguous, classes in id order.
        labels: N int64 class ids 0..C-1 (C = total_classes).
        super_labels: N int64 super-class ids.
    """

    images: np.ndarray  # N x 3 x S x S uint8, images of one class contiguous, classes in id order
    labels: np.ndarray  # N int64 class ids 0..C-1
    super_labels: np.ndarray  # N int64 super-class ids


def total_classes(p: SyntheticParams) -> int:
    """Classes rendered: num_classes (train, val, test), then pretrain_classes (the pretrain split).

    Args:
        p: the `data.synthetic` section.

    Returns:
        num_classes + pretrain_classes.
    """
    return p.num_classes + p.pretrain_classes


def images_per_class(p: SyntheticParams, rng: np.random.Generator) -> np.ndarray:
    """The number of images of each class, drawn between images_per_class_min and _max, skewed to the minimum.

    Args:
        p: the `data.synthetic` section.
        rng: the generator to draw from (the first draw of `generate`'s).

    Returns:
        total_classes(p) int64 counts.
    """
    # Skewed towards the minimum (n = min + floor(span * u^2), mean ~ min + span/3) like SOP's long tail of
    # classes with few images: about 7 on average for 4..12, 5.25 for 4..8 (SOP: 5.3).
    span = p.images_per_class_max - p.images_per_class_min + 1
    u = rng.random(total_classes(p))
    return p.images_per_class_min + np.minimum((span * u * u).astype(np.int64), span - 1)


def _describe_classes(p: SyntheticParams, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Shape and colour parameters of every class (object units: the object radius is 1)."""
    C = total_classes(p)
    S_n = -(-C // p.classes_per_superclass)
    sup = np.arange(C) // p.classes_per_superclass  # class -> super-class
    u = lambda lo, hi, size=S_n: _uniform(rng, lo, hi, size)  # noqa: E731

    # Super-class: a body and two parts (centre, half-sizes, exponent, angle) and a palette.
    # Exponent 1 is a diamond, 2 an ellipse, large values a rounded rectangle; log-uniform spreads shapes evenly.
    body = dict(cx=np.zeros(S_n, np.float32), cy=np.zeros(S_n, np.float32), a=u(0.6, 0.95), b=u(0.35, 0.65),
                e=_log_uniform(rng, 0.9, 6.0, S_n), t=u(0, np.pi))
    parts = []
    for _ in range(2):
        (ca, sa), rad = _cos_sin32(u(0, 2 * np.pi)), u(0.45, 0.85)
        parts.append(dict(cx=rad * ca, cy=rad * sa, a=u(0.18, 0.38), b=u(0.12, 0.3),
                          e=_log_uniform(rng, 0.9, 6.0, S_n), t=u(0, np.pi)))
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
        colours[np.arange(C), 1 + which] + (0.22 * _normal(rng, (C, 3))).astype(np.float32), 0, 1)
    grow = c(0.75, 1.3)
    for i in range(2):
        sel = which == i
        d[f"part{i}_a"][sel] *= grow[sel]
        d[f"part{i}_b"][sel] *= grow[sel]
    d["colours"] = colours
    r = np.sqrt(c(0, 1)) * 0.55  # mark uniform over a disc inside the body
    ca, sa = _cos_sin32(c(0, 2 * np.pi))
    d["mark_cx"], d["mark_cy"], d["mark_r"] = r * ca, r * sa, c(0.16, 0.22)
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
        clutter_b=u(0.05, 0.16, (n, 2)), clutter_e=_log_uniform(rng, 0.9, 6.0, (n, 2)),
        clutter_t=u(0, np.pi, (n, 2)), clutter_colour=u(0, 1, (n, 2, 3)),
        gain=u(0.75, 1.25), channel_gain=u(0.9, 1.1, (n, 3)), offset=u(-0.06, 0.06, (n, 3)),
        occlude=(rng.random(n) < 0.2), occ_cx=u(-0.9, 0.9), occ_cy=u(-0.9, 0.9), occ_w=u(0.1, 0.28),
        occ_h=u(0.1, 0.28), occ_colour=u(0, 1, (n, 3)), noise=u(0.01, 0.04),
    )


def _col(v) -> np.ndarray:
    return np.asarray(v, np.float32)[:, None, None]  # per image (N,) -> N x 1 x 1, broadcast over the pixel grid


def _superellipse(x, y, cx, cy, a, b, e, t, px):
    """Anti-aliased coverage (N x S x S, 0..1) of |u/a|^e + |v/b|^e <= 1, (u, v) rotated by t about (cx, cy).

    All shape arguments are per image (N,) and broadcast over the pixel grid; px is one pixel in the units of x, y.
    The level-set distance (r - 1) * min(a, b) approximates the signed distance well enough for a one-pixel ramp.
    r = (u^e + v^e)^(1/e) is computed as max * (1 + (min/max)^e)^(1/e): the power's argument stays in [0, 1] and
    the root's in [1, 2], where log2 and exp2 are accurate, and u = v = 0 needs no special case.
    """
    dx, dy = x - _col(cx), y - _col(cy)
    ct, st = (_col(v) for v in _cos_sin32(t))
    u = np.abs(dx * ct + dy * st) / _col(a)
    v = np.abs(dy * ct - dx * st) / _col(b)
    big, small = np.maximum(u, v), np.minimum(u, v)
    w = small / np.maximum(big, np.float32(1e-30))
    ee = _col(e)
    r = big * _exp2(_log2(1 + _exp2(ee * _log2(np.maximum(w, np.float32(2.0 ** -100))))) / ee)
    return np.clip(0.5 - (r - 1.0) * _col(np.minimum(a, b)) / _col(px), 0.0, 1.0)


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

    # Background: colour + linear gradient + a sinusoidal texture. The texture's phase is linear in x and y, so
    # sin(fx x + fy y + ph) = sin(fx x) cos(fy y + ph) + cos(fx x) sin(fy y + ph): sines of N x S values, not of
    # every pixel.
    cg, sg = _cos_sin32(im["grad_t"])
    ramp = X * _col(cg) + Y * _col(sg)  # N x S x S
    sx, cx = (v.astype(np.float32)[:, None, :] for v in _sincos(im["tex_fx"][:, None] * g))  # N x 1 x S
    sy, cy = (v.astype(np.float32)[:, :, None] for v in _sincos(im["tex_fy"][:, None] * g + im["tex_ph"][:, None]))
    tex = _col(im["tex_amp"]) * (sx * cy + cx * sy)  # N x S x S
    img = im["bg"][:, :, None, None] + im["grad"][:, :, None, None] * ramp[:, None] * 0.5 + tex[:, None]
    img = img.astype(np.float32)
    for k in range(2):  # clutter behind the object
        _paint(img, _superellipse(X, Y, im["clutter_cx"][:, k], im["clutter_cy"][:, k], im["clutter_a"][:, k],
                                  im["clutter_b"][:, k], im["clutter_e"][:, k], im["clutter_t"][:, k], px),
               im["clutter_colour"][:, k])

    # Object frame: translate, rotate, scale so the object radius is 1; distances scale by 1 / scale.
    (c, s), sc = (_col(v) for v in _cos_sin32(im["rot"])), _col(im["scale"])
    dx, dy = X - _col(im["cx"]), Y - _col(im["cy"])
    ox = (dx * c + dy * s) / sc
    oy = (dy * c - dx * s) / sc
    opx = px / im["scale"]

    body = _superellipse(ox, oy, cls["body_cx"], cls["body_cy"], cls["body_a"], cls["body_b"], cls["body_e"],
                         cls["body_t"], opx)
    _paint(img, body, cls["colours"][:, 0])
    for i in range(2):
        _paint(img, _superellipse(ox, oy, cls[f"part{i}_cx"], cls[f"part{i}_cy"], cls[f"part{i}_a"],
                                  cls[f"part{i}_b"], cls[f"part{i}_e"], cls[f"part{i}_t"], opx),
               cls["colours"][:, 1 + i])
    # Stripe: a band across the body (clipped to it) at the class's angle and offset.
    ct, st = (_col(v) for v in _cos_sin32(cls["stripe_t"]))
    dist = np.abs(ox * ct + oy * st - _col(cls["stripe_off"]))
    band = np.clip(0.5 + (_col(cls["stripe_w"]) / 2 - dist) / _col(opx), 0.0, 1.0)
    _paint(img, band * body, cls["stripe_colour"])
    ones = np.ones(n, np.float32)
    _paint(img, _superellipse(ox, oy, cls["mark_cx"], cls["mark_cy"], cls["mark_r"], cls["mark_r"], 2 * ones,
                              0 * ones, opx), cls["mark_colour"])

    # Photometric jitter, occluder (in front of everything), pixel noise.
    img *= (im["gain"][:, None] * im["channel_gain"])[:, :, None, None]
    img += im["offset"][:, :, None, None]
    occ = np.clip(0.5 + (_col(im["occ_w"]) - np.abs(X - _col(im["occ_cx"]))) / px[0], 0, 1) * \
        np.clip(0.5 + (_col(im["occ_h"]) - np.abs(Y - _col(im["occ_cy"]))) / px[0], 0, 1)
    _paint(img, occ * im["occlude"][:, None, None], im["occ_colour"])
    img += _normal(rng, img.shape, np.float32) * im["noise"][:, None, None, None]
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


def num_images(p: SyntheticParams) -> int:
    """N, the number of images `generate(p)` renders (the first draw from the seeded generator).

    Args:
        p: the `data.synthetic` section.

    Returns:
        N.
    """
    return int(images_per_class(p, np.random.default_rng(p.seed)).sum())


def generate(p: SyntheticParams, out: np.ndarray | None = None) -> SyntheticSet:
    """Render the whole set, N x 3 x S x S uint8, into `out` when given (e.g. a memory-mapped .npy).

    Args:
        p: the `data.synthetic` section (classes, images per class, sizes, seed).
        out: an N x 3 x S x S uint8 array to render into (N from `num_images`); None: a new array.

    Returns:
        The images (`out` when given), labels and super-labels.

    Raises:
        ValueError: `out` of another shape or dtype.
    """
    rng = np.random.default_rng(p.seed)
    counts = images_per_class(p, rng)
    cls = _describe_classes(p, rng)
    labels = np.repeat(np.arange(total_classes(p), dtype=np.int64), counts)
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
