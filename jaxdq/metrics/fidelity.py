"""Fidelity metrics of quantized samples against the float model's, from the same noise.

Both are computed in float64 NumPy on images ``[N, C, H, W]`` (any float dtype).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] against a reference.

    One number over the whole arrays (pooled MSE, not a mean of per-image PSNRs);
    both sides are clipped to [-1, 1] first; ``inf`` when they are identical.
    """
    mse = float(np.mean((np.clip(np.asarray(x, np.float64), -1, 1)
                         - np.clip(np.asarray(ref, np.float64), -1, 1)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)


def _window(gaussian: bool, win_size: int | None, sigma: float) -> np.ndarray:
    """Normalized 1-D window, as scikit-image builds it (gaussian: truncate 3.5σ)."""
    if gaussian:
        r = int(3.5 * sigma + 0.5)
        if win_size is not None and win_size != 2 * r + 1:
            raise ValueError(f"gaussian window of sigma {sigma} has size {2 * r + 1}, got win_size={win_size}")
        w = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float64) / sigma) ** 2)
    else:
        size = 7 if win_size is None else int(win_size)
        if size < 1 or size % 2 == 0:
            raise ValueError(f"win_size must be odd and positive, got {size}")
        w = np.ones(size, np.float64)
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable weighted mean over every full window: ``[..., H, W] -> [..., H-k+1, W-k+1]``."""
    k = w.shape[0]
    x = sliding_window_view(x, k, axis=-1) @ w
    return np.swapaxes(sliding_window_view(np.swapaxes(x, -1, -2), k, axis=-1) @ w, -1, -2)


def ssim(x: np.ndarray, ref: np.ndarray, data_range: float = 2.0, *, gaussian: bool = True,
         win_size: int | None = None, sigma: float = 1.5, sample_covariance: bool | None = None,
         k1: float = 0.01, k2: float = 0.03) -> np.ndarray:
    """Structural similarity of each image of ``x`` to the same-index image of ``ref``.

    Args:
      x, ref: ``[N, C, H, W]`` (or ``[C, H, W]`` / ``[H, W]``, treated as N = 1, C = 1).
      data_range: max - min of the value range (2 for [-1, 1]).
      gaussian: True (default) = Wang et al.'s 11x11 Gaussian window of σ = 1.5 and
        population covariances, i.e. scikit-image's ``structural_similarity(...,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``; False = scikit-
        image's default 7x7 uniform window (``win_size``) with sample covariances.
      sample_covariance: override the covariance normalization of either mode.

    Returns:
      ``[N]`` float64: the SSIM map over the windows that lie fully inside the image
      (scikit-image's cropped region), averaged over positions and channels.
      Images must be at least as large as the window (11 px for the Gaussian one).
    """
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"shape mismatch: {x.shape} vs {ref.shape}")
    while x.ndim < 4:
        x, ref = x[None], ref[None]
    w = _window(gaussian, win_size, sigma)
    if min(x.shape[-2:]) < w.shape[0]:
        raise ValueError(f"images {x.shape[-2:]} are smaller than the {w.shape[0]}x{w.shape[0]} window")
    if sample_covariance is None:
        sample_covariance = not gaussian
    n_px = w.shape[0] ** 2
    cov_norm = n_px / (n_px - 1) if sample_covariance else 1.0
    ux, uy = _filter_valid(x, w), _filter_valid(ref, w)
    vx = cov_norm * (_filter_valid(x * x, w) - ux * ux)
    vy = cov_norm * (_filter_valid(ref * ref, w) - uy * uy)
    vxy = cov_norm * (_filter_valid(x * ref, w) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s.mean(axis=(1, 2, 3))
