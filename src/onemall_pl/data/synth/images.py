"""Small rendered images whose look follows the category (so a vision encoder can tell them apart).

Every category owns a template: the L1 sets the hue, the L2 the pattern (stripes, checks,
rings, ...), the L3 the pattern's frequency and a second hue; entertainment genres get
their own hues and patterns. An item's image is its template at a brightness set by its
price band, with a corner mark in its shop's colour, a small random shift and pixel noise.
Images are rendered in vectorised batches and PNG-encoded with Pillow.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image

N_PATTERNS = 8


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def template(pattern: int, freq: int, hue1: float, hue2: float, size: int, sat: float = 0.75) -> np.ndarray:
    """A ``[size, size, 3]`` float image in [0, 1]: two hues laid out by ``pattern`` at ``freq``."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    p = pattern % N_PATTERNS
    if p == 0:
        m = np.sin(2 * np.pi * freq * y)
    elif p == 1:
        m = np.sin(2 * np.pi * freq * x)
    elif p == 2:
        m = np.sin(2 * np.pi * freq * x) * np.sin(2 * np.pi * freq * y)
    elif p == 3:
        m = np.sin(2 * np.pi * freq * np.hypot(x - 0.5, y - 0.5) * 2)
    elif p == 4:
        m = np.sin(2 * np.pi * freq * (x + y) / 2)
    elif p == 5:
        m = np.sin(2 * np.pi * freq * (x - y) / 2)
    elif p == 6:
        m = np.cos(freq * np.arctan2(y - 0.5, x - 0.5))
    else:
        m = (np.abs(x - 0.5) + np.abs(y - 0.5) < 0.15 * freq % 0.5 + 0.2).astype(np.float32) * 2 - 1
    w = (m[..., None] + 1) / 2
    return (w * _rgb(hue1, sat, 0.95) + (1 - w) * _rgb(hue2, sat * 0.8, 0.55)).astype(np.float32)


def render(templates: np.ndarray, tidx: np.ndarray, brightness: np.ndarray, accent_hue: np.ndarray,
           rng: np.random.Generator, noise: float = 0.05, shift: np.ndarray | None = None) -> np.ndarray:
    """Render ``len(tidx)`` images ``uint8 [N, S, S, 3]`` from ``templates[tidx]``.

    ``brightness`` scales the template, ``accent_hue`` colours a corner mark (the shop),
    ``shift`` (``[N, 2]`` pixels; random in [0, 4) when None) moves the pattern.
    """
    n, s = len(tidx), templates.shape[1]
    if shift is None:
        shift = rng.integers(0, 4, size=(n, 2))
    yy = (np.arange(s)[None, :, None] + shift[:, 0, None, None]) % s
    xx = (np.arange(s)[None, None, :] + shift[:, 1, None, None]) % s
    img = templates[tidx[:, None, None], yy, xx] * np.asarray(brightness, np.float32)[:, None, None, None]
    h = np.asarray(accent_hue, dtype=np.float32)
    accent = np.stack([np.clip(np.abs((h * 6 + k) % 6 - 3) - 1, 0, 1) for k in (0, 4, 2)], axis=-1)
    c = max(2, s // 6)
    img[:, :c, :c] = accent[:, None, None, :]
    img += np.float32(noise) * rng.standard_normal(size=img.shape, dtype=np.float32)
    return (np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


def encode_png(images: np.ndarray) -> list[bytes]:
    """PNG bytes of each ``uint8 [S, S, 3]`` image."""
    out = []
    for a in images:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG", compress_level=1)
        out.append(buf.getvalue())
    return out


def decode_png(data: bytes) -> np.ndarray:
    """The ``uint8 [S, S, 3]`` array of a PNG produced by :func:`encode_png`."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
