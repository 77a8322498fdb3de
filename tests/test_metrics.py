"""jaxdq.metrics against float64 NumPy loops, closed forms, scikit-image and SciPy."""
import importlib.util
import json
import os

import numpy as np
import pytest

from jaxdq.metrics import (FeatureExtractor, class_agreement, evaluate, frechet_distance,
                           frechet_distance_from_stats, psnr, ssim, temporal_consistency)
from jaxdq.metrics.features import CLASSIFIER_WEIGHTS, apply, digits_split, load_digits_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RNG = np.random.default_rng(0)


def _pair(shape=(3, 2, 16, 16), noise=0.3):
    a = RNG.uniform(-1, 1, shape)
    return a, np.clip(a + noise * RNG.normal(size=shape), -1, 1)


# --- fidelity ---------------------------------------------------------------------------------
def test_psnr_closed_form_with_clipping():
    a, b = _pair()
    a[0, 0, 0, 0], b[0, 0, 0, 0] = 3.0, -5.0  # clipped to 1 and -1 before the error
    ac, bc = np.clip(a, -1, 1), np.clip(b, -1, 1)
    mse = sum(float((ac.ravel()[i] - bc.ravel()[i]) ** 2) for i in range(a.size)) / a.size
    assert psnr(a, b) == pytest.approx(10 * np.log10(4.0 / mse), rel=1e-12)
    assert psnr(a, b, data_range=1.0) == pytest.approx(10 * np.log10(1.0 / mse), rel=1e-12)
    assert psnr(a, a.copy()) == float("inf")


def _ssim_loop(x, y, w1d, data_range, cov_norm):
    """Per-image, per-channel, per-window SSIM in float64 (Wang et al. 2004, eq. 13)."""
    w = np.outer(w1d, w1d)
    k = w.shape[0]
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = []
    for n in range(x.shape[0]):
        vals = []
        for c in range(x.shape[1]):
            for i in range(x.shape[2] - k + 1):
                for j in range(x.shape[3] - k + 1):
                    px, py = x[n, c, i:i + k, j:j + k], y[n, c, i:i + k, j:j + k]
                    mx, my = (w * px).sum(), (w * py).sum()
                    vx = cov_norm * (w * (px - mx) ** 2).sum()
                    vy = cov_norm * (w * (py - my) ** 2).sum()
                    vxy = cov_norm * (w * (px - mx) * (py - my)).sum()
                    vals.append((2 * mx * my + c1) * (2 * vxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        out.append(np.mean(vals))
    return np.array(out)


def test_ssim_against_float64_window_loop():
    a, b = _pair()
    g = np.exp(-0.5 * (np.arange(-5, 6) / 1.5) ** 2)
    np.testing.assert_allclose(ssim(a, b), _ssim_loop(a, b, g / g.sum(), 2.0, 1.0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ssim(a, b, gaussian=False), _ssim_loop(a, b, np.full(7, 1 / 7), 2.0, 49 / 48),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(ssim(a, b, gaussian=False, win_size=5), _ssim_loop(a, b, np.full(5, 0.2), 2.0, 25 / 24),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(ssim(a, a), np.ones(3), atol=1e-12)
    assert ssim(a, b).shape == (3,) and np.all(ssim(a, b) < 0.9)


def test_ssim_against_scikit_image():
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image not installed")
    a, b = _pair((2, 3, 20, 24), noise=0.2)
    for n in range(2):
        ref_g = skm.structural_similarity(a[n], b[n], data_range=2.0, channel_axis=0, gaussian_weights=True,
                                          sigma=1.5, use_sample_covariance=False)
        ref_u = skm.structural_similarity(a[n], b[n], data_range=2.0, channel_axis=0)
        assert abs(ssim(a, b)[n] - ref_g) < 1e-12
        assert abs(ssim(a, b, gaussian=False)[n] - ref_u) < 1e-12


# --- distribution -----------------------------------------------------------------------------
def _with_exact_stats(rng, n, mu, var):
    """n samples whose sample mean is exactly mu and sample (ddof=1) covariance exactly diag(var)."""
    z = rng.normal(size=(n, mu.shape[0]))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1))).T
    return z * np.sqrt(var) + mu


def test_frechet_distance_closed_form_diagonal():
    rng = np.random.default_rng(1)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    fa, fb = _with_exact_stats(rng, 50, mu1, v1), _with_exact_stats(rng, 80, mu2, v2)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(fa, fb) == pytest.approx(closed, rel=1e-10)
    assert frechet_distance(fa, fa) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_against_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg", reason="scipy not installed")
    rng = np.random.default_rng(2)
    d = 8
    fa = rng.normal(size=(40, d)) @ rng.normal(size=(d, d))
    fb = rng.normal(size=(60, d)) @ rng.normal(size=(d, d)) + 0.5
    m1, m2 = fa.mean(0), fb.mean(0)
    c1, c2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    ref = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)  # pytorch-fid's formula
    assert frechet_distance(fa, fb) == pytest.approx(ref, rel=1e-9)
    assert frechet_distance_from_stats(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-9)
    # rank-deficient covariances (N < D), the usual case for small sample sets
    ga, gb = rng.normal(size=(5, d)), rng.normal(size=(7, d)) * 2
    c1, c2 = np.cov(ga, rowvar=False), np.cov(gb, rowvar=False)
    ref = np.sum((ga.mean(0) - gb.mean(0)) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(ga, gb) == pytest.approx(ref, rel=1e-6)


def test_class_agreement_and_temporal_consistency_loops():
    rng = np.random.default_rng(3)
    logits, labels = rng.normal(size=(50, 10)), rng.integers(0, 10, 50)
    labels[:20] = np.argmax(logits[:20], 1)
    hits = sum(int(max(range(10), key=lambda k: logits[i, k]) == labels[i]) for i in range(50))
    assert class_agreement(logits, labels) == hits / 50 and hits >= 20
    f = rng.normal(size=(3, 5, 4))
    cos = [f[n, t] @ f[n, t + 1] / np.sqrt((f[n, t] @ f[n, t]) * (f[n, t + 1] @ f[n, t + 1]))
           for n in range(3) for t in range(4)]
    assert temporal_consistency(f) == pytest.approx(np.mean(cos), rel=1e-12)
    assert temporal_consistency(np.repeat(f[:, :1] * 1.0, 5, axis=1) * np.arange(1, 6)[None, :, None]) == pytest.approx(1.0)


# --- the digits feature network ---------------------------------------------------------------
def _np_forward(p, x):
    """float64 NumPy forward pass of the FeatureNet architecture, convs as explicit 3x3 tap sums."""
    p = {m: {k: np.asarray(v, np.float64) for k, v in s.items()} for m, s in p.items()}

    def conv(q, x):
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        h, w = x.shape[2:]
        y = sum(np.einsum("nchw,co->nohw", xp[:, :, i:i + h, j:j + w], q["kernel"][i, j])
                for i in range(3) for j in range(3))
        return np.maximum(y + q["bias"][:, None, None], 0)

    pool = lambda x: 0.25 * (x[:, :, ::2, ::2] + x[:, :, 1::2, ::2] + x[:, :, ::2, 1::2] + x[:, :, 1::2, 1::2])
    x = np.clip(x.astype(np.float64), -1, 1)
    x = pool(conv(p["conv4"], conv(p["conv3"], pool(conv(p["conv2"], conv(p["conv1"], x))))))
    f = np.maximum(x.reshape(x.shape[0], -1) @ p["fc"]["kernel"] + p["fc"]["bias"], 0)
    return f, f @ p["head"]["kernel"] + p["head"]["bias"]


def test_feature_net_against_numpy_forward():
    clf = load_digits_classifier()
    x = RNG.uniform(-1.2, 1.2, (4, 1, 16, 16)).astype(np.float32)
    f_ref, l_ref = _np_forward(clf.params, x)
    assert clf.features(x).shape == (4, 64) and clf.logits(x).shape == (4, 10)
    np.testing.assert_allclose(clf.features(x), f_ref, rtol=1e-4, atol=1e-4 * np.abs(f_ref).max())
    np.testing.assert_allclose(clf.logits(x), l_ref, rtol=1e-4, atol=1e-4 * np.abs(l_ref).max())
    assert isinstance(clf, FeatureExtractor)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="scikit-learn (the digits data) not installed")
    from jaxdq.metrics import load_digits_16

    return load_digits_16()


def test_digits_preprocessing_matches_default_dit_training(digits):
    spec = importlib.util.spec_from_file_location("train_default_dit", os.path.join(ROOT, "examples", "train_default_dit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    x_ref, y_ref = mod.load_digits_16()
    x, y = digits
    assert x.shape == (1797, 1, 16, 16) and x.min() == -1.0 and x.max() == 1.0
    np.testing.assert_array_equal(x, x_ref)
    np.testing.assert_array_equal(y, y_ref)


def test_classifier_held_out_accuracy(digits):
    with open(os.path.join(ROOT, "bench", "results", "digits_classifier.json")) as f:
        recorded = json.load(f)["test_accuracy"]
    x, y = digits
    tr, te = digits_split(len(x), seed=0)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(x)
    acc = float(np.mean(np.argmax(load_digits_classifier().logits(x[te]), 1) == y[te]))
    assert acc >= recorded - 0.005 and recorded >= 0.97, (acc, recorded)


# --- evaluate ---------------------------------------------------------------------------------
class _Projection:
    """A user-supplied extractor: fixed random projection; logits optional."""

    def __init__(self, with_logits):
        self.w = np.random.default_rng(4).normal(size=(256, 5))
        if with_logits:
            self.logits = lambda im: np.asarray(im).reshape(len(im), -1)[:, :10]

    def __call__(self, images):
        return np.asarray(images, np.float64).reshape(len(images), -1) @ self.w


def test_evaluate_with_custom_extractor():
    a, b = _pair((12, 1, 16, 16))
    labels = np.arange(12) % 10
    ext = _Projection(with_logits=True)
    r = evaluate(a, b, labels, extractor=ext)
    assert r["psnr_db"] == psnr(a, b)
    assert r["ssim"] == pytest.approx(float(np.mean(ssim(a, b))), rel=1e-12)
    assert r["fd"] == pytest.approx(frechet_distance(ext(a), ext(b)), rel=1e-12) and r["fd"] > 0
    assert r["class_agreement"] == class_agreement(ext.logits(a), labels)
    r = evaluate(a, b, labels, extractor=_Projection(with_logits=False))
    assert r["class_agreement"] is None and r["fd"] is not None


def test_evaluate_default_extractor(digits):
    x, y = digits
    a, b, la = x[:40], x[40:80], y[:40]
    clf = load_digits_classifier()
    r = evaluate(a, b, la)
    assert r["extractor"] == "FeatureNet" and r["class_agreement"] == class_agreement(clf.logits(a), la)
    assert r["class_agreement"] >= 0.95
    assert r["fd"] == pytest.approx(frechet_distance(clf(a), clf(b)), rel=1e-9)
    assert evaluate(a, a, la)["psnr_db"] == float("inf") and evaluate(a, None, la)["fd"] is None
