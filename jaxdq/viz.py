"""Image grids written as PNG with the standard library alone (zlib + struct)."""
from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence

import numpy as np


def to_uint8(images: np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """``[N, C, H, W]`` floats in ``value_range`` → ``[N, H, W, C]`` uint8 (C = 1 or 3)."""
    x = np.asarray(images, np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {x.shape}")
    lo, hi = value_range
    x = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    x = np.transpose(x, (0, 2, 3, 1))
    if x.shape[-1] not in (1, 3):
        x = x[..., :3] if x.shape[-1] > 3 else x[..., :1]
    return np.round(x * 255.0).astype(np.uint8)


def grid(rows: Sequence[np.ndarray], *, pad: int = 1, upscale: int = 1,
         row_gap: int = 0, value_range=(-1.0, 1.0), pad_value: int = 255) -> np.ndarray:
    """Tile image rows into one ``[H, W, C]`` uint8 picture.

    rows: each ``[N_i, C, H, W]``; row i shows its N_i images left to right.
    upscale: nearest-neighbour enlargement (small samples are hard to see).
    row_gap: extra blank pixels between rows (separates methods in a comparison).
    """
    tiles = [to_uint8(r, value_range) for r in rows]
    c = max(t.shape[-1] for t in tiles)
    tiles = [np.repeat(t, 3, axis=-1) if t.shape[-1] != c else t for t in tiles]
    h, w = tiles[0].shape[1] * upscale, tiles[0].shape[2] * upscale
    ncol = max(t.shape[0] for t in tiles)
    height = len(tiles) * (h + pad) + pad + row_gap * (len(tiles) - 1)
    canvas = np.full((height, ncol * (w + pad) + pad, c), pad_value, np.uint8)
    for i, t in enumerate(tiles):
        if upscale > 1:
            t = t.repeat(upscale, axis=1).repeat(upscale, axis=2)
        y0 = pad + i * (h + pad + row_gap)
        for j in range(t.shape[0]):
            x0 = pad + j * (w + pad)
            canvas[y0:y0 + h, x0:x0 + w] = t[j]
    return canvas


def write_png(path: str, image: np.ndarray) -> None:
    """Write ``[H, W]`` or ``[H, W, 1|3]`` uint8 as an 8-bit PNG."""
    img = np.asarray(image)
    if img.dtype != np.uint8:
        raise ValueError(f"write_png needs uint8, got {img.dtype}")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    color_type = 0 if img.ndim == 2 else 2
    if img.ndim == 3 and img.shape[-1] != 3:
        raise ValueError(f"write_png needs 1 or 3 channels, got {img.shape[-1]}")
    height, width = img.shape[:2]
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def read_png(path: str) -> np.ndarray:
    """Read back an 8-bit grey/RGB, non-interlaced PNG written by :func:`write_png`."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    width, height, depth, color_type = header[:4]
    if depth != 8 or color_type not in (0, 2):
        raise ValueError(f"{path}: only 8-bit grey/RGB PNGs are supported")
    ch = 1 if color_type == 0 else 3
    raw = zlib.decompress(idat)
    stride = width * ch + 1
    rows = []
    for y in range(height):
        ftype, line = raw[y * stride], np.frombuffer(raw[y * stride + 1:(y + 1) * stride], np.uint8)
        if ftype != 0:
            raise ValueError(f"{path}: PNG filter {ftype} not supported")
        rows.append(line)
    img = np.stack(rows).reshape(height, width, ch)
    return img[..., 0] if ch == 1 else img


# 5×7 bitmap glyphs (one 5-bit row each), enough for method names and numbers.
_GLYPHS = {
    "0": (14, 17, 19, 21, 25, 17, 14), "1": (4, 12, 4, 4, 4, 4, 14), "2": (14, 17, 1, 2, 4, 8, 31),
    "3": (31, 2, 4, 2, 1, 17, 14), "4": (2, 6, 10, 18, 31, 2, 2), "5": (31, 16, 30, 1, 1, 17, 14),
    "6": (6, 8, 16, 30, 17, 17, 14), "7": (31, 1, 2, 4, 8, 8, 8), "8": (14, 17, 17, 14, 17, 17, 14),
    "9": (14, 17, 17, 15, 1, 2, 12), "A": (14, 17, 17, 17, 31, 17, 17), "B": (30, 17, 17, 30, 17, 17, 30),
    "C": (14, 17, 16, 16, 16, 17, 14), "D": (28, 18, 17, 17, 17, 18, 28), "E": (31, 16, 16, 30, 16, 16, 31),
    "F": (31, 16, 16, 30, 16, 16, 16), "G": (14, 17, 16, 23, 17, 17, 15), "H": (17, 17, 17, 31, 17, 17, 17),
    "I": (14, 4, 4, 4, 4, 4, 14), "J": (7, 2, 2, 2, 2, 18, 12), "K": (17, 18, 20, 24, 20, 18, 17),
    "L": (16, 16, 16, 16, 16, 16, 31), "M": (17, 27, 21, 21, 17, 17, 17), "N": (17, 17, 25, 21, 19, 17, 17),
    "O": (14, 17, 17, 17, 17, 17, 14), "P": (30, 17, 17, 30, 16, 16, 16), "Q": (14, 17, 17, 17, 21, 18, 13),
    "R": (30, 17, 17, 30, 20, 18, 17), "S": (15, 16, 16, 14, 1, 1, 30), "T": (31, 4, 4, 4, 4, 4, 4),
    "U": (17, 17, 17, 17, 17, 17, 14), "V": (17, 17, 17, 17, 17, 10, 4), "W": (17, 17, 17, 21, 21, 21, 10),
    "X": (17, 17, 10, 4, 10, 17, 17), "Y": (17, 17, 17, 10, 4, 4, 4), "Z": (31, 1, 2, 4, 8, 16, 31),
    " ": (0,) * 7, "-": (0, 0, 0, 31, 0, 0, 0), ".": (0, 0, 0, 0, 0, 12, 12), "+": (0, 4, 4, 31, 4, 4, 0),
    ":": (0, 12, 12, 0, 12, 12, 0), "(": (2, 4, 8, 8, 8, 4, 2), ")": (8, 4, 2, 2, 2, 4, 8),
    "/": (0, 1, 2, 4, 8, 16, 0), "=": (0, 0, 31, 0, 31, 0, 0), "_": (0, 0, 0, 0, 0, 0, 31),
}


def text_image(text: str, *, scale: int = 2, channels: int = 3) -> np.ndarray:
    """Black text on white as ``[7·scale, width, channels]`` uint8 (upper-cased; unknown chars → '_')."""
    cols = []
    for ch in text.upper():
        rows = _GLYPHS.get(ch, _GLYPHS["_"])
        glyph = np.array([[(r >> (4 - i)) & 1 for i in range(5)] for r in rows], np.uint8)
        cols += [glyph, np.zeros((7, 1), np.uint8)]
    bits = np.concatenate(cols, axis=1) if cols else np.zeros((7, 1), np.uint8)
    img = (255 * (1 - bits)).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    return np.repeat(img[..., None], channels, axis=-1)


def labeled(panel: np.ndarray, title: str, *, scale: int = 2) -> np.ndarray:
    """``panel [H, W, C]`` with ``title`` written above it (the title is cut to the panel width)."""
    label = text_image(title, scale=scale, channels=panel.shape[-1])[:, :max(0, panel.shape[1] - 2)]
    head = np.full((label.shape[0] + 2 * scale, panel.shape[1], panel.shape[2]), 255, np.uint8)
    head[scale:scale + label.shape[0], 2:2 + label.shape[1]] = label
    return np.concatenate([head, panel], axis=0)


def side_by_side(panels: Sequence[np.ndarray], *, gap: int = 12) -> np.ndarray:
    """Join ``[H_i, W_i, C]`` panels left to right, bottom-padded to one height, white gaps."""
    h = max(p.shape[0] for p in panels)
    c = panels[0].shape[2]
    out = []
    for i, p in enumerate(panels):
        if p.shape[0] < h:
            p = np.concatenate([p, np.full((h - p.shape[0],) + p.shape[1:], 255, np.uint8)])
        if i:
            out.append(np.full((h, gap, c), 255, np.uint8))
        out.append(p)
    return np.concatenate(out, axis=1)
