"""jaxdq.quant.duquant: orthogonality, float equivalence, the zigzag, the ARS choice.

Widths 1152 (DiT-XL/2, PixArt: 9 blocks of 128) and 3072 (FLUX: 24 blocks of 128).
The NumPy reference of ``x R̂1 P R̂2`` is written here from the documented
conventions, never through the module's apply/fold functions.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.quant import duquant as dq
from jaxdq.quant.hadamard import block_hadamard

WIDTHS = [1152, 3072]


def tokens(c, n=256, seed=0, concentrated=True):
    """Gaussian tokens with a few salient outlier channels (independent signs per token)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c))
    chans = [5, 9, 17] if concentrated else []          # three in block 0: DuQuant's hard case
    chans += list(rng.choice(np.arange(128, c), 3, replace=False))
    for k, ch in enumerate(chans):
        x[:, ch] *= [245, 120, 80, 60, 40, 30][k]
    return x.astype(np.float32)


@pytest.fixture(scope="module", params=WIDTHS)
def built(request):
    x = tokens(request.param)
    return x, dq.duquant_rotation(np.abs(x).max(axis=0))


def ref_apply(x, rot):
    """float64 ``x · blockdiag(r1) · P · blockdiag(r2)``, ``(xP)[p] = x[perm[p]]``."""
    def blockdiag(r):
        k, b, _ = r.shape
        out = np.zeros((k * b, k * b))
        for i in range(k):
            out[i * b:(i + 1) * b, i * b:(i + 1) * b] = r[i]
        return out

    r1, r2 = (np.asarray(r, np.float64) for r in (rot.r1, rot.r2))
    perm = np.asarray(rot.perm)
    p = np.zeros((perm.size, perm.size))
    p[perm, np.arange(perm.size)] = 1.0
    return np.asarray(x, np.float64) @ blockdiag(r1) @ p @ blockdiag(r2)


def per_token_max_over_rms(x):
    x = np.asarray(x, np.float64)
    return float(np.mean(np.abs(x).max(axis=-1) / np.sqrt(np.mean(x * x, axis=-1))))


# ---------------------------------------------------------------- structure


def test_shapes_and_orthogonality(built):
    x, rot = built
    c = x.shape[1]
    assert rot.r1.dtype == jnp.float32 and rot.r1.shape == (c // 128, 128, 128) == rot.r2.shape
    assert rot.perm.dtype == jnp.int32 and rot.perm.shape == (c,)
    np.testing.assert_array_equal(np.sort(np.asarray(rot.perm)), np.arange(c))
    eye = np.eye(128)
    for r in (rot.r1, rot.r2):
        r = np.asarray(r, np.float64)
        assert np.abs(r @ np.swapaxes(r, 1, 2) - eye).max() < 1e-5
        assert np.abs(np.swapaxes(r, 1, 2) @ r - eye).max() < 1e-5
    assert not np.allclose(np.asarray(rot.r1), eye)   # the outlier blocks did rotate


def test_full_matrix_orthogonal_and_matches_reference(built):
    x, rot = built
    full = np.asarray(dq.rotation_matrix(rot), np.float64)
    c = full.shape[0]
    # every block is checked above; of the composite, all of it at 1152, 256 columns and rows at 3072
    cols = np.arange(c) if c <= 1152 else np.random.default_rng(0).choice(c, 256, replace=False)
    assert np.abs(full[:, cols].T @ full[:, cols] - np.eye(cols.size)).max() < 1e-5
    assert np.abs(full[cols] @ full[cols].T - np.eye(cols.size)).max() < 1e-5
    got = np.asarray(dq.apply_rotation(jnp.asarray(x[:16]), rot), np.float64)
    want = ref_apply(x[:16], rot)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


def test_float_equivalence(built):
    x, rot = built
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((x.shape[1], 64)) * 0.02).astype(np.float32)
    want = x.astype(np.float64) @ w.astype(np.float64)
    got = np.asarray(dq.apply_rotation(jnp.asarray(x), rot) @ dq.fold_into_weight(jnp.asarray(w), rot),
                     np.float64)
    assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)
    # the fold alone is R̂2ᵀ Pᵀ R̂1ᵀ W
    folded = np.asarray(dq.fold_into_weight(jnp.asarray(w), rot), np.float64)
    ref = np.asarray(dq.rotation_matrix(rot), np.float64).T @ w
    assert np.linalg.norm(folded - ref) <= 1e-5 * np.linalg.norm(ref)


def test_leading_axes_and_dtype():
    x = tokens(1152, n=12).reshape(2, 6, 1152)
    rot = dq.duquant_rotation(np.abs(x).max(axis=(0, 1)))
    y = dq.apply_rotation(jnp.asarray(x, jnp.bfloat16), rot)
    assert y.shape == x.shape and y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dq.apply_rotation(jnp.asarray(x), rot)).reshape(12, -1),
                               np.asarray(dq.apply_rotation(jnp.asarray(x.reshape(12, -1)), rot)),
                               rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- the greedy and the zigzag


def test_greedy_spreads_a_single_outlier():
    m = np.ones(128, np.float32)
    m[37] = 1000.0
    r = np.asarray(dq.greedy_block_rotation(jnp.asarray(m), 8), np.float64)
    peak = np.sqrt((m.astype(np.float64) ** 2) @ r ** 2)
    assert peak.max() < 1.2 * 1000 / np.sqrt(128)           # spread to ≈ M/√b
    np.testing.assert_allclose(np.abs(r[37]), 1 / np.sqrt(128), rtol=1e-4)  # e_c → 1/√b
    flat = np.asarray(dq.greedy_block_rotation(jnp.ones(128), 8))
    np.testing.assert_array_equal(flat, np.eye(128))        # nothing to spread: identity


def test_zigzag_deals_the_largest_channels_to_distinct_blocks():
    rng = np.random.default_rng(2)
    m = rng.permutation(np.arange(1152, dtype=np.float64))
    perm = dq.zigzag_permutation(m, 128)
    k = 1152 // 128
    blocks = m[perm].reshape(k, 128)
    top = np.argsort(-m)
    # the k largest land one per block in order 0..k-1, the next k in order k-1..0
    np.testing.assert_array_equal(blocks[:, 0], m[top[:k]])
    np.testing.assert_array_equal(blocks[::-1, 1], m[top[k:2 * k]])
    assert np.all(np.diff(blocks, axis=1) < 0)              # descending inside a block
    sums = blocks.sum(axis=1)
    assert sums.max() - sums.min() < 0.01 * sums.mean()      # balanced mass


@pytest.mark.parametrize("c", WIDTHS)
def test_ars_reduces_outliers(c):
    x = tokens(c, seed=3)
    rot = dq.duquant_rotation(np.abs(x).max(axis=0))
    xr = np.asarray(dq.apply_rotation(jnp.asarray(x), rot))
    xh = np.asarray(block_hadamard(jnp.asarray(x), 128))
    none, duq, had = (per_token_max_over_rms(v) for v in (x, xr, xh))
    assert duq < 0.25 * none
    assert duq < had        # three outliers in one block: the zigzag + R̂2 spread them over blocks


# ---------------------------------------------------------------- the adaptive choice


def stats(j, c=256, outlier=None):
    absmax = np.full(c, 3.0 * j, np.float32)
    if outlier:
        absmax[7] = outlier
    count = 1000.0 * c
    return {"absmax": absmax, "sq_sum": np.float32(j * j * count), "count": np.float32(count)}


def test_choose_path_and_plan():
    assert dq.choose_path(0.99) == "hadamard" and dq.choose_path(1.0) == "duquant"
    assert dq.choose_path(1.5, tau=2.0) == "hadamard"
    low = dq.ars_plan(stats(0.5))
    assert low["path"] == "hadamard" and low["rotation"] is None and low["block"] == 256
    np.testing.assert_allclose(low["J"], 0.5, rtol=1e-5)
    high = dq.ars_plan(stats(2.0, outlier=245.0))
    assert high["path"] == "duquant" and high["block"] == 128
    assert high["rotation"].r1.shape == (2, 128, 128)


def test_report():
    tree = {"blocks_0": {"attn": {"qkv": stats(0.4)}, "mlp": {"fc2": stats(3.0, outlier=245.0)}},
            "final_layer": {"linear": stats(0.9)}}
    rows = dq.report(tree, tau=1.0)
    assert [r["layer"] for r in rows] == ["blocks_0/attn/qkv", "blocks_0/mlp/fc2", "final_layer/linear"]
    assert [r["path"] for r in rows] == ["hadamard", "duquant", "hadamard"]
    np.testing.assert_allclose([r["J"] for r in rows], [0.4, 3.0, 0.9], rtol=1e-5)
    assert rows[1]["absmax_max"] == 245.0 and rows[1]["absmax_median"] == pytest.approx(9.0)
    flat = dq.report({"a/b": stats(1.2)})
    assert flat == [{"layer": "a/b", "J": pytest.approx(1.2, rel=1e-5), "path": "duquant",
                     "absmax_max": pytest.approx(3.6), "absmax_median": pytest.approx(3.6)}]
