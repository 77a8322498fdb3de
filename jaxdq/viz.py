"""Image grids and labels with Pillow: PNG files, text in a real (scalable, mixed-case) font.

Arrays follow one convention throughout: samples are float ``[N, C, H, W]`` in
``value_range`` (default ``[-1, 1]``) with ``C`` = 1 (grey) or 3 (RGB); pictures are
uint8 ``[H, W, C]`` (grey pictures keep a channel axis of 1 until :func:`write_png`).

Building blocks: :func:`to_uint8`, :func:`grid` (cells separated by a gap, optional row
labels and column titles), :func:`text_image`, :func:`labeled`, :func:`side_by_side`,
:func:`write_png` / :func:`read_png`.  Higher level: :func:`image_grid` (a titled grid
with row labels) and :func:`method_rows` (one row per method, labelled with its name and
score, e.g. ``"w8a8  43.0 dB"``).

Text uses Pillow's built-in scalable font (``ImageFont.load_default(size=...)``, Pillow
≥ 10.1, no font files or network needed); older Pillow falls back to its fixed bitmap font.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont

FONT_SIZE = 14  # px; text_image(scale=2) — the old 5×7 font at scale 2 was 14 px tall
MIN_FONT_SIZE = 8  # titles shrink to fit down to this size, then are cut


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """``[N, C, H, W]`` floats in ``value_range`` → ``[N, H, W, C]`` uint8 (C = 1 or 3).

    Values outside the range are clipped; NaN becomes 0 (black) rather than garbage."""
    x = np.asarray(images, np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {x.shape}")
    lo, hi = value_range
    x = np.clip(np.nan_to_num((x - lo) / (hi - lo), nan=0.0), 0.0, 1.0)
    x = np.transpose(x, (0, 2, 3, 1))
    if x.shape[-1] not in (1, 3):
        x = x[..., :3] if x.shape[-1] > 3 else x[..., :1]
    return np.round(x * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------------------- text


@functools.lru_cache(maxsize=32)
def font(size: int = FONT_SIZE) -> ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` px (scalable from Pillow 10.1; else the bitmap one)."""
    try:
        return ImageFont.load_default(size=int(size))
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _ink(text: str, size: int) -> np.ndarray:
    """Coverage mask of ``text`` (uint8 ``[h, w]``, 255 = ink), ``h`` the font's full line
    height (ascent + descent) so every label of one size has the same height."""
    f = font(size)
    try:
        ascent, descent = f.getmetrics()
    except AttributeError:  # bitmap font
        ascent, descent = f.getbbox("Ag")[3], 0
    left, _, right, _ = f.getbbox(text) if text else (0, 0, 0, 0)
    width = max(1, int(math.ceil(right - min(0, left))) + 1)
    img = Image.new("L", (width, ascent + descent), 0)
    ImageDraw.Draw(img).text((-min(0, left), 0), text, font=f, fill=255)
    return np.asarray(img)


def _fit(text: str, size: int, width: int) -> np.ndarray:
    """``_ink(text)`` shrunk (down to MIN_FONT_SIZE) and then cut to at most ``width`` px."""
    mask = _ink(text, size)
    while mask.shape[1] > width and size > MIN_FONT_SIZE:
        size -= 1
        mask = _ink(text, size)
    return mask[:, :max(0, width)]


def _blend(canvas: np.ndarray, mask: np.ndarray, y: int, x: int, ink: Optional[int] = None) -> None:
    """Draw coverage ``mask`` into ``canvas [H, W, C]`` at (y, x), in place, clipped to the canvas.
    ``ink``: text colour (default black on light backgrounds, white on dark ones)."""
    h = min(mask.shape[0], canvas.shape[0] - y)
    w = min(mask.shape[1], canvas.shape[1] - x)
    if h <= 0 or w <= 0:
        return
    region = canvas[y:y + h, x:x + w].astype(np.float32)
    if ink is None:
        ink = 0 if region.mean() > 127 else 255
    a = mask[:h, :w, None].astype(np.float32) / 255.0
    canvas[y:y + h, x:x + w] = np.round(region * (1 - a) + ink * a).astype(np.uint8)


def text_image(text: str, *, scale: int = 2, channels: int = 3, size: Optional[int] = None) -> np.ndarray:
    """Black ``text`` on white as uint8 ``[height, width, channels]``, in the case given.

    ``size``: font size in px (default ``7 * scale``, the height the old bitmap font had)."""
    mask = _ink(text, size or 7 * scale)
    return np.repeat((255 - mask)[..., None], channels, axis=-1)


def labeled(panel: np.ndarray, title: str, *, scale: int = 2, size: Optional[int] = None,
            background: int = 255) -> np.ndarray:
    """``panel [H, W, C]`` with ``title`` written in a band above it, clear of the panel.

    A title wider than the panel is set in a smaller font (down to MIN_FONT_SIZE px), then cut."""
    size = size or 7 * scale
    margin = max(2, size // 4)
    mask = _fit(title, size, panel.shape[1] - 2 * margin)
    head = np.full((mask.shape[0] + 2 * margin, panel.shape[1], panel.shape[2]), background, np.uint8)
    _blend(head, mask, margin, margin)
    return np.concatenate([head, panel], axis=0)


def side_by_side(panels: Sequence[np.ndarray], *, gap: int = 12, background: int = 255) -> np.ndarray:
    """Join ``[H_i, W_i, C]`` panels left to right, bottom-padded to one height, with gaps."""
    h = max(p.shape[0] for p in panels)
    c = max(p.shape[2] for p in panels)
    out = []
    for i, p in enumerate(panels):
        if p.shape[2] != c:
            p = np.repeat(p, c, axis=2)
        if p.shape[0] < h:
            p = np.concatenate([p, np.full((h - p.shape[0],) + p.shape[1:2] + (c,), background, np.uint8)])
        if i:
            out.append(np.full((h, gap, c), background, np.uint8))
        out.append(p)
    return np.concatenate(out, axis=1)


# ------------------------------------------------------------------------------------- grids


def grid(rows: Sequence[np.ndarray], *, pad: int = 2, upscale: int = 1, row_gap: int = 0,
         value_range=(-1.0, 1.0), pad_value: int = 255, row_labels: Optional[Sequence[str]] = None,
         col_titles: Optional[Sequence[str]] = None, font_size: int = FONT_SIZE) -> np.ndarray:
    """Tile image rows into one ``[H, W, C]`` uint8 picture.

    rows: each ``[N_i, C, H, W]`` (all of one H, W); row i shows its N_i images left to right.
    pad: gap in pixels around and between cells, filled with ``pad_value`` (background).
    upscale: nearest-neighbour enlargement (small samples are hard to see).
    row_gap: extra background pixels between rows (separates methods in a comparison).
    row_labels: one text per row (class labels such as ``"0"``.. ``"9"``, method names,
      captions), written left of the row, vertically centred.
    col_titles: text per column, written centred above it (shrunk to the cell width).
    font_size: label size in px.
    """
    if not len(rows):
        raise ValueError("grid needs at least one row of images")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError(f"{len(row_labels)} row labels for {len(rows)} rows")
    tiles = [to_uint8(r, value_range) for r in rows]
    c = max(t.shape[-1] for t in tiles)
    tiles = [np.repeat(t, 3, axis=-1) if t.shape[-1] != c else t for t in tiles]
    h, w = tiles[0].shape[1] * upscale, tiles[0].shape[2] * upscale
    ncol = max(max(t.shape[0] for t in tiles), len(col_titles or ()))
    margin = max(2, font_size // 4)

    labels = [_ink(str(s), font_size) for s in row_labels] if row_labels is not None else []
    left = max((m.shape[1] for m in labels), default=0)
    left = left + 2 * margin if labels else 0
    titles = [_fit(str(s), font_size, w) for s in col_titles] if col_titles is not None else []
    top = max((m.shape[0] for m in titles), default=0)
    top = top + margin if titles else 0

    height = top + len(tiles) * (h + pad) + pad + row_gap * (len(tiles) - 1)
    canvas = np.full((height, left + ncol * (w + pad) + pad, c), pad_value, np.uint8)
    for j, m in enumerate(titles):  # bottom-aligned over the column, centred
        _blend(canvas, m, margin // 2 + top - margin - m.shape[0], left + pad + j * (w + pad) + (w - m.shape[1]) // 2)
    for i, t in enumerate(tiles):
        if upscale > 1:
            t = t.repeat(upscale, axis=1).repeat(upscale, axis=2)
        y0 = top + pad + i * (h + pad + row_gap)
        for j in range(t.shape[0]):
            x0 = left + pad + j * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = t[j]
        if labels:
            m = labels[i]
            _blend(canvas, m, y0 + max(0, (h - m.shape[0]) // 2), margin)
    return canvas


def image_grid(rows: Sequence[np.ndarray], *, row_labels: Optional[Sequence[str]] = None,
               col_titles: Optional[Sequence[str]] = None, col_title: Optional[str] = None,
               title: Optional[str] = None, upscale: Optional[int] = None, pad: int = 3, row_gap: int = 2,
               value_range=(-1.0, 1.0), font_size: int = FONT_SIZE, background: int = 255) -> np.ndarray:
    """A labelled grid: ``rows`` as in :func:`grid`, a label left of each row, titles over the columns,
    and an optional ``title`` (``col_title`` is an alias) above it all.

    upscale: default enlarges cells to about 48 px so labels and samples are in proportion.
    """
    title = title if title is not None else col_title
    if upscale is None:
        upscale = max(1, 48 // max(1, int(np.shape(rows[0])[-2])))
    img = grid(rows, pad=pad, upscale=upscale, row_gap=row_gap, value_range=value_range, pad_value=background,
               row_labels=row_labels, col_titles=col_titles, font_size=font_size)
    return labeled(img, title, size=font_size + 2, background=background) if title else img


def method_rows(images: Mapping[str, np.ndarray], *, scores: Optional[Mapping[str, Optional[float]]] = None,
                unit: str = "dB", labels: Optional[Mapping[str, str]] = None,
                col_titles: Optional[Sequence[str]] = None, **kwargs) -> np.ndarray:
    """One row per method, labelled with its name (and score): ``{"float": x, "w8a8": y}`` with
    ``scores={"w8a8": 43.0}`` gives rows labelled ``"float"`` and ``"w8a8  43.0 dB"``.

    images: method name → ``[N, C, H, W]`` (same N for a like-for-like comparison).
    labels: explicit row label per method (overrides name + score).
    col_titles: e.g. the class label of each column (``["0", "0", "1", ...]``).
    kwargs: passed to :func:`image_grid` (``title``, ``upscale``, ``font_size``, ...).
    """
    names = list(images)
    scores = scores or {}
    labels = dict(labels or {})
    for n in names:
        if n not in labels:
            s = scores.get(n)
            labels[n] = n if s is None else f"{n}  {s:.1f} {unit}".rstrip()
    return image_grid([images[n] for n in names], row_labels=[labels[n] for n in names],
                      col_titles=col_titles, **kwargs)


# ------------------------------------------------------------------------------------- PNG


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write uint8 ``[H, W]`` or ``[H, W, 1|3|4]`` as an 8-bit grey / RGB / RGBA PNG."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"write_png needs uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[-1] not in (3, 4)):
        raise ValueError(f"write_png needs [H, W] or [H, W, 1|3|4], got shape {img.shape}")
    Image.fromarray(np.ascontiguousarray(img)).save(os.fspath(path), format="PNG", optimize=True)


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG (or any image Pillow reads) as uint8: ``[H, W]`` grey, ``[H, W, 3]`` RGB
    or ``[H, W, 4]`` RGBA; palette / other modes are converted to RGB(A)."""
    try:
        with Image.open(os.fspath(path)) as im:
            im.load()
            if im.mode in ("1", "I;16", "I"):
                im = im.convert("L")
            elif im.mode == "LA":
                im = im.convert("L")
            elif im.mode not in ("L", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.mode or "transparency" in im.info else "RGB")
            return np.asarray(im).copy()
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise ValueError(f"{os.fspath(path)} is not a readable PNG file ({e})") from e
