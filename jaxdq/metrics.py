"""Fidelity metrics of quantized samples against the float model's, from the same noise."""
from __future__ import annotations

import numpy as np


def psnr(x: np.ndarray, ref: np.ndarray, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] against a reference."""
    mse = float(np.mean((np.clip(np.asarray(x, np.float64), -1, 1)
                         - np.clip(np.asarray(ref, np.float64), -1, 1)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range ** 2 / mse)
