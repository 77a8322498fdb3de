"""Pillow-backed image grids, labels and PNG files (jaxdq.viz)."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFont

from jaxdq import viz


def _cells(n, c=1, h=8, w=8, value=-1.0):
    return np.full((n, c, h, w), value, np.float32)


# ------------------------------------------------------------------------------ PNG


@pytest.mark.parametrize("shape", [(13, 17), (13, 17, 1), (13, 17, 3), (5, 6, 4)])
def test_png_round_trip(tmp_path, shape):
    img = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "x.png"
    viz.write_png(str(path), img)
    back = viz.read_png(str(path))
    expect = img[..., 0] if shape[-1:] == (1,) else img
    np.testing.assert_array_equal(back, expect)
    with Image.open(path) as im:  # a real PNG, readable by anything
        assert im.format == "PNG" and im.size == (shape[1], shape[0])
        np.testing.assert_array_equal(np.asarray(im), expect)


def test_png_errors(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        viz.write_png(str(tmp_path / "f.png"), np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="1\\|3\\|4"):
        viz.write_png(str(tmp_path / "f.png"), np.zeros((2, 2, 2), np.uint8))
    (tmp_path / "t.png").write_text("not an image")
    with pytest.raises(ValueError, match="not a readable PNG"):
        viz.read_png(str(tmp_path / "t.png"))
    with pytest.raises(FileNotFoundError):
        viz.read_png(str(tmp_path / "missing.png"))


def test_to_uint8_range_and_nan():
    x = np.array([[[[-1.0, 0.0, 1.0, 3.0, np.nan]]]], np.float32)
    np.testing.assert_array_equal(viz.to_uint8(x)[0, 0, :, 0], [0, 128, 255, 255, 0])
    assert viz.to_uint8(_cells(2, 3)).shape == (2, 8, 8, 3)


# ------------------------------------------------------------------------------ text


def test_font_is_scalable_and_offline():
    f = viz.font(14)
    assert isinstance(f, ImageFont.FreeTypeFont)  # Pillow's built-in scalable font, no files needed
    assert viz.text_image("43.0 dB", size=28).shape[0] > viz.text_image("43.0 dB", size=14).shape[0]


def test_text_keeps_case():
    mixed, upper = viz.text_image("43.0 dB"), viz.text_image("43.0 DB")
    assert (mixed < 128).any() and (upper < 128).any()
    assert mixed.shape != upper.shape or (mixed != upper).any()
    # same height for every label of one size (ascent + descent), so rows line up
    assert viz.text_image("g").shape[0] == viz.text_image("T").shape[0] == viz.text_image("").shape[0]


def test_labeled_title_band_has_ink_and_clears_the_panel():
    panel = viz.grid([_cells(3, value=1.0)])  # all white cells
    out = viz.labeled(panel, "w8a8 43.0 dB")
    band = out[:out.shape[0] - panel.shape[0]]
    assert (band < 128).sum() > 20  # the text is drawn
    # rows just above the panel stay background: strokes do not touch the grid
    assert (band[-2:] == 255).all()
    np.testing.assert_array_equal(out[band.shape[0]:], panel)
    # different text, different pixels; too-long titles shrink or cut but never overflow
    other = viz.labeled(panel, "W8A8 43.0 DB")
    assert (other != out).any()
    long = viz.labeled(panel, "a very long method name that cannot fit " * 3)
    assert long.shape[1] == panel.shape[1]


# ------------------------------------------------------------------------------ grids


def test_gap_pixels_between_cells_are_background():
    rows = [_cells(3), _cells(3)]  # black cells on a white background
    g = viz.grid(rows, pad=2, upscale=2, row_gap=3)
    h = w = 16
    assert g.shape == (2 * (h + 2) + 2 + 3, 3 * (w + 2) + 2, 1)
    for j in range(3):
        x0 = 2 + j * (w + 2)
        assert (g[2:2 + h, x0:x0 + w] == 0).all()  # the cell
        assert (g[:, x0 - 2:x0] == 255).all()  # the gap left of it, top to bottom
    y1 = 2 + h + 2 + 3
    assert (g[2 + h:y1] == 255).all()  # pad + row_gap between the rows
    assert (viz.grid(rows)[:, :2] == 255).all()  # the default leaves a visible gap too


def test_grid_rgb_and_grey_rows_mix():
    g = viz.grid([_cells(2, 1), _cells(1, 3, value=1.0)])
    assert g.shape[-1] == 3 and g.dtype == np.uint8


def test_row_labels_and_column_titles():
    rows = [_cells(2, value=1.0) for _ in range(3)]
    plain = viz.grid(rows, upscale=3)
    g = viz.grid(rows, upscale=3, row_labels=["0", "1", "7"], col_titles=["seed 0", "seed 1"])
    assert g.shape[0] > plain.shape[0] and g.shape[1] > plain.shape[1]
    left = g.shape[1] - plain.shape[1]
    top = g.shape[0] - plain.shape[0]
    np.testing.assert_array_equal(g[top:, left:], plain)  # the images themselves are unchanged
    h = 24 + 2
    bands = [g[top + 2 + i * h: top + 2 + i * h + 24, :left] for i in range(3)]
    assert all((b < 128).any() for b in bands)  # each row's label is drawn next to it
    assert (bands[0] != bands[1]).any()  # "0" and "1" differ
    for j in range(2):  # a title over each column
        x0 = left + 2 + j * (24 + 2)
        assert (g[:top, x0:x0 + 24] < 128).any()
    with pytest.raises(ValueError, match="2 row labels for 3 rows"):
        viz.grid(rows, row_labels=["a", "b"])


def test_method_rows_labels_each_row_with_name_and_score():
    images = {"float": _cells(4, value=1.0), "w8a8": _cells(4, value=1.0), "naive": _cells(4, value=1.0)}
    img = viz.method_rows(images, scores={"w8a8": 43.0, "naive": 28.43}, col_titles=["0", "1", "2", "3"])
    same = viz.image_grid(list(images.values()), row_labels=["float", "w8a8  43.0 dB", "naive  28.4 dB"],
                          col_titles=["0", "1", "2", "3"])
    np.testing.assert_array_equal(img, same)
    titled = viz.method_rows(images, title="DiT digits16, DDIM 10 steps")
    assert titled.shape[0] > viz.method_rows(images).shape[0]
    assert img.dtype == np.uint8 and img.shape[-1] == 1


def test_side_by_side_pads_and_gaps():
    a, b = np.zeros((5, 4, 1), np.uint8), np.zeros((3, 2, 3), np.uint8)
    out = viz.side_by_side([a, b], gap=6)
    assert out.shape == (5, 4 + 6 + 2, 3)
    assert (out[:, 4:10] == 255).all() and (out[3:, 10:] == 255).all()
