"""Distribution-level metrics on features / logits of a feature network (float64 NumPy).

These are in-project proxies of the usual generative-model metrics, computed with
:mod:`jaxdq.metrics.features`' digits network instead of Inception / CLIP:

* :func:`frechet_distance` on digits features = "FD-digits" (proxy of FID);
* :func:`class_agreement` = "class agreement" (proxy of text alignment / CLIPScore);
* :func:`temporal_consistency` = "feature temporal consistency" (proxy of CLIP-temp).

Numbers are comparable only with the same feature network and the same sample sizes.
"""
from __future__ import annotations

import numpy as np


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def gaussian_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``feats [N, D]`` → ``(mean [D], covariance [D, D])`` float64 (unbiased, ddof = 1)."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {f.shape}")
    mu = f.mean(axis=0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def frechet_distance_from_stats(mu1, cov1, mu2, cov2) -> float:
    """Fréchet (2-Wasserstein²) distance of N(mu1, cov1) and N(mu2, cov2).

    ``|mu1 - mu2|² + tr(cov1) + tr(cov2) - 2 tr((cov1 cov2)^½)``, with
    ``tr((cov1 cov2)^½) = Σ sqrt(eig(cov1^½ cov2 cov1^½))`` (a symmetric PSD matrix,
    so eigh applies; no complex round-off as with ``scipy.linalg.sqrtm``).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to ``feats_a [N, D]`` and ``feats_b [M, D]``.

    With the digits feature network this is "FD-digits", the in-project proxy of
    FID (same formula, different features; not comparable to published FIDs).
    Biased upwards at small N, like FID: compare numbers at equal sample sizes.
    """
    return frechet_distance_from_stats(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def class_agreement(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose argmax class ``logits [N, K]`` equals their conditioning ``labels [N]``.

    "Class agreement": the in-project proxy of text alignment / CLIPScore for a
    class-conditional model (does the sample show what it was asked for?).
    """
    logits = np.asarray(logits)
    labels = np.asarray(labels)
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(f"need logits [N, K] and labels [N], got {logits.shape} and {labels.shape}")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def temporal_consistency(features: np.ndarray, eps: float = 1e-12) -> float:
    """Mean cosine similarity of consecutive frames' features ``[N, F, D]`` (F >= 2).

    "Feature temporal consistency": the in-project proxy of CLIP-temp (mean over
    the N videos and F - 1 frame pairs; 1 = frames with parallel features).
    """
    f = np.asarray(features, np.float64)
    if f.ndim != 3 or f.shape[1] < 2:
        raise ValueError(f"need features [N, F >= 2, D], got {f.shape}")
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), eps)
    return float(np.mean(np.sum(f[:, 1:] * f[:, :-1], axis=-1)))
