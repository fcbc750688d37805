"""``shapes32``: a 32x32 RGB, 10-class image task rendered at load time (nothing downloaded or cached).

Each image holds one shape of its class -- disc, ring, triangle, square, hexagon, star, plus,
crescent, heart, arrow -- at a random size, rotation, aspect ratio and position near the centre,
in a random colour with an optional stripe/checker texture, over a random background colour with
its own texture and a colour gradient, sometimes a line segment or blob behind the shape, and
pixel noise. Every class is closed under rotation and mirroring, so flips and crops preserve
labels. Rendering is vectorised numpy; shape edges are anti-aliased by 2x2 supersampling.

``Difficulty`` holds the ranges; its defaults are the ``shapes32`` task, tuned so that the zoo
``cnn`` reaches about 80% with backprop in 20 epochs (docs/convergence.md lists the versions tried:
the CNN's linear head makes position the hardest nuisance by far). The images are a pure function
of ``(n, seed, difficulty)``: one ``np.random.default_rng(seed)`` draws every parameter in a fixed
order. Labels are balanced (class ``i % 10`` for the i-th of n, then permuted). Only numpy is used,
because the device runtime imports the data module.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CLASS_NAMES = ["disc", "ring", "triangle", "square", "hexagon", "star", "plus", "crescent", "heart", "arrow"]
SIZE = 32
_SUPER = 2  # supersampling factor per axis
_CHUNK = 500  # images rendered at once (bounds the temporaries to a few tens of MB)


@dataclass(frozen=True)
class Difficulty:
    """The ranges the renderer draws from (uniformly unless noted); ``shapes32`` uses the defaults."""

    scale: tuple[float, float] = (8.0, 13.0)  # shape circumradius, pixels
    log_aspect: float = 0.2  # aspect ratio exp(U(-a, a))
    jitter: float = 2.0  # centre offset from the image centre per axis, pixels (kept 0.7 x radius inside)
    bg_texture: tuple[float, float] = (0.0, 0.3)  # weight of the background texture's second colour
    gradient: float = 0.5  # largest weight of the background gradient's colour
    clutter_rounds: int = 1  # each: a line segment (probability p_line) and a blob (p_blob)
    p_line: float = 0.4
    p_blob: float = 0.3
    fg_texture: tuple[float, float] = (0.0, 0.3)  # weight of the shape texture's second colour
    contrast: float = 0.45  # least RGB distance of the shape's colour from the mean background
    noise: tuple[float, float] = (0.02, 0.06)  # standard deviation of the pixel noise


DEFAULT = Difficulty()


def _star(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Five-pointed star: outer radius 1, inner radius 0.45, straight edges in polar interpolation."""
    sector = np.float32(2 * np.pi / 5)
    t = np.abs(np.mod(np.arctan2(y, x), sector) - sector / 2) / (sector / 2)  # 1 at a point, 0 between
    return x * x + y * y <= (0.45 + 0.55 * t) ** 2


def _shape_mask(label: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Inside test for class ``label`` in the shape's own coordinates (roughly the unit disc)."""
    r2 = x * x + y * y
    ax, ay = np.abs(x), np.abs(y)
    if label == 0:  # disc
        return r2 <= 0.8
    if label == 1:  # ring
        return (r2 <= 1.0) & (r2 >= 0.36)
    # Regular polygons of circumradius 1 as intersections of half-planes, folded by their symmetry.
    if label == 2:  # triangle, a vertex on +y
        return (y >= -0.5) & (0.8660254 * ax + 0.5 * y <= 0.5)
    if label == 3:  # square, a vertex on +y
        return ax + ay <= 1.0
    if label == 4:  # hexagon, a vertex on +y
        return (ax <= 0.8660254) & (0.5 * ax + 0.8660254 * ay <= 0.8660254)
    if label == 5:
        return _star(x, y)
    if label == 6:  # plus
        return ((ax <= 0.28) & (ay <= 0.95)) | ((ay <= 0.28) & (ax <= 0.95))
    if label == 7:  # crescent: a disc minus an offset disc
        return (r2 <= 1.0) & (r2 - 0.9 * x + 0.2025 >= 0.7)
    if label == 8:  # heart (implicit sextic), pointing down
        hx2, hy = 1.3225 * r2 - 1.3225 * y * y, 1.15 * y + 0.15  # (1.15 x)^2 and shifted 1.15 y
        w = hx2 + hy * hy - 1
        return w * w * w <= hx2 * hy * hy * hy
    if label == 9:  # arrow pointing along +x
        shaft = (ay <= 0.2) & (x >= -1.0) & (x <= 0.15)
        head = (x >= 0.15) & (x <= 1.0) & (ay <= 0.7 * (1.0 - x) / 0.85)
        return shaft | head
    raise ValueError(f"label must be 0..9, got {label}")


def _uniform(rng: np.random.Generator, low: float, high: float, n: int) -> np.ndarray:
    """(n, 1, 1) float32 uniform draws, shaped to broadcast over an image."""
    return rng.uniform(low, high, size=n).astype(np.float32)[:, None, None]


def _texture(rng: np.random.Generator, n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per-image mixing weight (n, H, W) in [0, 1]: solid (0), stripes or checker, random scale and angle."""
    kind = rng.integers(0, 3, size=n)
    freq = 2 * np.pi * _uniform(rng, 0.08, 0.35, n)  # 0.08..0.35 cycles per pixel
    angle = _uniform(rng, 0, np.pi, n)
    phase_a, phase_b = _uniform(rng, 0, 2 * np.pi, n), _uniform(rng, 0, 2 * np.pi, n)
    cos, sin = np.cos(angle), np.sin(angle)
    sin_a = np.sin(freq * (u * cos + v * sin) + phase_a)
    out = 0.5 + 0.5 * sin_a  # stripes
    checker = kind == 2
    out[checker] = sin_a[checker] * np.sin(freq[checker] * (v * cos[checker] - u * sin[checker])
                                           + phase_b[checker]) > 0
    out[kind == 0] = 0.0
    return out


def _colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 3, 1, 1) float32 RGB colours in [0, 1]."""
    return rng.uniform(0, 1, size=(n, 3)).astype(np.float32)[:, :, None, None]


def _contrasting(rng: np.random.Generator, ref: np.ndarray, min_dist: float) -> np.ndarray:
    """Colours at least ``min_dist`` (Euclidean, RGB in [0, 1]) from ``ref`` (n, 3, 1, 1), by rejection."""
    out = _colours(rng, len(ref))
    bad = np.linalg.norm((out - ref)[:, :, 0, 0], axis=1) < min_dist
    while bad.any():
        out[bad] = _colours(rng, int(bad.sum()))
        bad = np.linalg.norm((out - ref)[:, :, 0, 0], axis=1) < min_dist
    return out


def _blend(img: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """img * (1 - alpha) + colour * alpha, alpha (n, H, W) shared by the channels."""
    return img + (colour - img) * alpha[:, None]


def _render_chunk(rng: np.random.Generator, labels: np.ndarray, d: Difficulty) -> np.ndarray:
    """Float32 (n, 3, 32, 32) images in [0, 1] for ``labels``."""
    n = len(labels)
    centres = np.arange(SIZE, dtype=np.float32) + 0.5  # pixel centres
    v, u = (a[None] for a in np.meshgrid(centres, centres, indexing="ij"))  # v: row, u: column

    # Background: colour b1, textured towards b2, plus a linear gradient towards b3.
    img = np.broadcast_to(_colours(rng, n), (n, 3, SIZE, SIZE))
    img = _blend(img, _colours(rng, n), _texture(rng, n, u, v) * _uniform(rng, *d.bg_texture, n))
    g_angle = _uniform(rng, 0, 2 * np.pi, n)
    grad = ((u - SIZE / 2) * np.cos(g_angle) + (v - SIZE / 2) * np.sin(g_angle)) / SIZE + 0.5
    img = _blend(img, _colours(rng, n), grad.clip(0, 1) * _uniform(rng, 0.0, d.gradient, n))

    # Clutter behind the shape: line segments and small blobs in random colours (soft edges),
    # each drawn on a random subset of the images.
    img = np.ascontiguousarray(img)
    for _ in range(d.clutter_rounds):
        on = np.flatnonzero(rng.random(n) < d.p_line)
        x0, y0 = _uniform(rng, 0, SIZE, len(on)), _uniform(rng, 0, SIZE, len(on))
        dx, dy = (rng.normal(0, 8, size=(2, len(on))).astype(np.float32)[:, :, None, None])
        width = _uniform(rng, 0.5, 1.5, len(on))
        t = (((u - x0) * dx + (v - y0) * dy) / (dx * dx + dy * dy + 1e-6)).clip(0, 1)
        dist = np.hypot(u - x0 - t * dx, v - y0 - t * dy)
        img[on] = _blend(img[on], _colours(rng, len(on)), (width + 0.5 - dist).clip(0, 1))
        on = np.flatnonzero(rng.random(n) < d.p_blob)
        bx, by = _uniform(rng, 0, SIZE, len(on)), _uniform(rng, 0, SIZE, len(on))
        rad = _uniform(rng, 1.0, 3.0, len(on))
        img[on] = _blend(img[on], _colours(rng, len(on)), (rad + 0.5 - np.hypot(u - bx, v - by)).clip(0, 1))

    # The shape: random scale (circumradius in pixels), aspect, rotation and centre; its coverage
    # of each pixel comes from a _SUPER x _SUPER grid of samples.
    scale = rng.uniform(*d.scale, size=n)
    aspect = np.exp(rng.uniform(-d.log_aspect, d.log_aspect, size=n))
    theta = rng.uniform(0, 2 * np.pi, size=n)
    reach = np.minimum(d.jitter, SIZE / 2 - 0.7 * scale)
    cx = SIZE / 2 + rng.uniform(-reach, reach)
    cy = SIZE / 2 + rng.uniform(-reach, reach)
    fine = (np.arange(SIZE * _SUPER, dtype=np.float32) + 0.5) / _SUPER
    vs, us = (a[None] for a in np.meshgrid(fine, fine, indexing="ij"))
    mask = np.empty((n, SIZE * _SUPER, SIZE * _SUPER), dtype=bool)
    for c in range(len(CLASS_NAMES)):
        sel = labels == c
        du, dv = us - _col(cx[sel]), vs - _col(cy[sel])
        cos, sin = _col(np.cos(theta[sel])), _col(np.sin(theta[sel]))
        x = (du * cos + dv * sin) / _col(scale[sel] * aspect[sel])
        y = (dv * cos - du * sin) / _col(scale[sel] / aspect[sel])
        mask[sel] = _shape_mask(c, x, y)
    coverage = _coverage(mask)
    f1 = _contrasting(rng, img.mean(axis=(2, 3), keepdims=True), d.contrast)
    fg = _blend(np.broadcast_to(f1, (n, 3, SIZE, SIZE)), _colours(rng, n),
                _texture(rng, n, u, v) * _uniform(rng, *d.fg_texture, n))
    img = _blend(img, fg, coverage)

    # Pixel noise: uniform (cheaper to draw than Gaussian) with a random standard deviation.
    amplitude = rng.uniform(*d.noise, size=n).astype(np.float32)[:, None, None, None] * np.float32(12 ** 0.5)
    return img + amplitude * (rng.random(size=img.shape, dtype=np.float32) - 0.5)


def _coverage(mask: np.ndarray) -> np.ndarray:
    """Fraction of each _SUPER x _SUPER block of a boolean (n, H*_SUPER, W*_SUPER) mask that is set."""
    n, size = len(mask), SIZE
    acc = mask.view(np.uint8).reshape(n, size, _SUPER, size * _SUPER).sum(axis=2, dtype=np.uint8)
    acc = acc.reshape(n, size, size, _SUPER).sum(axis=3, dtype=np.uint8)
    return acc.astype(np.float32) * np.float32(1 / _SUPER ** 2)


def _col(a: np.ndarray) -> np.ndarray:
    """(n,) float64 -> (n, 1, 1) float32."""
    return a.astype(np.float32)[:, None, None]


def render_shapes(n: int, seed: int, difficulty: Difficulty = DEFAULT) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images uint8 (n, 3, 32, 32) and balanced labels int64 (n,), a pure function of (n, seed)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES)).astype(np.int64)
    images = np.empty((n, 3, SIZE, SIZE), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        chunk = _render_chunk(rng, labels[start:start + _CHUNK], difficulty)
        images[start:start + _CHUNK] = np.rint(chunk.clip(0, 1) * 255)
    return images, labels
