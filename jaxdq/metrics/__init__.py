"""Metrics that run offline: fidelity to the float model, and in-project distribution proxies.

* :mod:`.fidelity`: :func:`psnr`, :func:`ssim` of a quantized model's samples against
  the float model's samples from the same noise;
* :mod:`.features`: the shipped digits feature network (:func:`load_digits_classifier`);
* :mod:`.distribution`: :func:`frechet_distance` ("FD-digits", proxy of FID),
  :func:`class_agreement` (proxy of CLIPScore), :func:`temporal_consistency`
  ("feature temporal consistency", proxy of CLIP-temp).

:func:`evaluate` bundles them; pass your own :class:`FeatureExtractor` (e.g. an
Inception or CLIP image tower) to get the real metrics instead of the proxies.
"""
from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import numpy as np

from jaxdq.metrics.distribution import (class_agreement, frechet_distance, frechet_distance_from_stats,
                                        gaussian_stats, temporal_consistency)
from jaxdq.metrics.features import FeatureNet, load_digits_16, load_digits_classifier
from jaxdq.metrics.fidelity import psnr, ssim

__all__ = ["FeatureExtractor", "FeatureNet", "class_agreement", "evaluate", "frechet_distance",
           "frechet_distance_from_stats", "gaussian_stats", "load_digits_16", "load_digits_classifier",
           "psnr", "ssim", "temporal_consistency"]


@runtime_checkable
class FeatureExtractor(Protocol):
    """Anything callable as ``extractor(images [N, C, H, W]) -> features [N, D]``.

    It may also have ``logits(images) -> [N, K]`` (class scores); :func:`evaluate`
    reports class agreement only when it does.
    """

    def __call__(self, images) -> np.ndarray: ...


def evaluate(images, reference_images=None, labels=None, extractor: Optional[FeatureExtractor] = None,
             data_range: float = 2.0) -> dict:
    """Fidelity and distribution metrics of ``images [N, C, H, W]``.

    Args:
      images: the samples to score (e.g. the quantized model's).
      reference_images: same shape, e.g. the float model's samples from the same noise
        and labels (or real data, for FD only; PSNR/SSIM pair images by index).
      labels: ``[N]`` conditioning classes of ``images`` (for class agreement).
      extractor: a :class:`FeatureExtractor`; default: the shipped digits network
        (16x16 grey images in [-1, 1]), so ``fd`` is then "FD-digits".
      data_range: max - min of the pixel range, for PSNR / SSIM.

    Returns:
      ``{"psnr_db", "ssim" (mean of per-image SSIMs), "fd", "class_agreement",
      "extractor"}``; a key is ``None`` when its inputs are missing (no reference,
      no labels, extractor without ``logits``, or fewer than 2 images for FD).
    """
    images = np.asarray(images)
    if extractor is None:
        extractor = load_digits_classifier()
    out = {"psnr_db": None, "ssim": None, "fd": None, "class_agreement": None,
           "extractor": type(extractor).__name__}
    if reference_images is not None:
        reference_images = np.asarray(reference_images)
        if reference_images.shape == images.shape:
            out["psnr_db"] = psnr(images, reference_images, data_range)
            out["ssim"] = float(np.mean(ssim(images, reference_images, data_range)))
        if images.shape[0] >= 2 and reference_images.shape[0] >= 2:
            out["fd"] = frechet_distance(extractor(images), extractor(reference_images))
    logits_fn = getattr(extractor, "logits", None)
    if labels is not None and callable(logits_fn):
        out["class_agreement"] = class_agreement(logits_fn(images), labels)
    return out
