"""8-bit attention ("sage8": INT8 QKᵀ with K smoothing + FP8 PV; "fp8": FP8 QKᵀ): equal to a
float64 NumPy re-implementation of its quantization, close to float attention, masks exact, and
K smoothing what keeps a K with a shared offset accurate."""
import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxdq.models.attention import SAGE_BLOCK_K, SAGE_BLOCK_Q, attention, attention_8bit


def _e4m3(x):
    return np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)


def _block_scale(x, block, qmax):  # x [N, T, H, d] → per (block of tokens, head) scale, per token
    n, t, h, _ = x.shape
    s = np.ones((n, t, h, 1))
    for b0 in range(0, t, block):
        amax = np.abs(x[:, b0:b0 + block]).max(axis=(1, 3), keepdims=True)
        s[:, b0:b0 + block] = np.where(amax > 0, amax / qmax, 1.0)
    return s


def reference(q, k, v, bias=None, qk="int8", pv="e4m3"):
    """float64 NumPy: the same steps, written loop-free per head."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    k = k - k.mean(axis=1, keepdims=True)
    qmax = 127.0 if qk == "int8" else 448.0
    sq, sk = _block_scale(q, SAGE_BLOCK_Q, qmax), _block_scale(k, SAGE_BLOCK_K, qmax)
    if qk == "int8":
        qc, kc = np.clip(np.round(q / sq), -127, 127), np.clip(np.round(k / sk), -127, 127)
    else:
        qc, kc = _e4m3(q / sq), _e4m3(k / sk)
    s = np.einsum("nqhd,nkhd->nhqk", qc, kc)
    s = s * sq[..., 0].transpose(0, 2, 1)[..., :, None] * sk[..., 0].transpose(0, 2, 1)[..., None, :]
    s = s / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + np.asarray(bias, np.float64)[:, None, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    if pv == "float16":
        out = np.einsum("nhqk,nkhd->nqhd", p.astype(np.float16).astype(np.float64), v.astype(np.float16))
        return out / p.sum(-1, keepdims=True).transpose(0, 2, 1, 3)
    sv = np.abs(v).max(axis=1, keepdims=True) / 448
    sv = np.where(sv > 0, sv, 1.0)
    out = np.einsum("nhqk,nkhd->nqhd", _e4m3(p * 448), _e4m3(v / sv)) / 448 * sv
    return out / p.sum(-1, keepdims=True).transpose(0, 2, 1, 3)


def _qkv(seed=0, tq=200, tk=150, h=3, d=16, k_offset=0.0):
    r = np.random.default_rng(seed)
    q = r.normal(size=(2, tq, h, d)).astype(np.float32)
    k = (r.normal(size=(2, tk, h, d)) + k_offset).astype(np.float32)
    v = r.normal(size=(2, tk, h, d)).astype(np.float32)
    return q, k, v


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("impl,qk,pv,bound", [("sage8", "int8", "e4m3", 0.05), ("fp8", "e4m3", "e4m3", 0.07),
                                              ("int8qk", "int8", "float16", 0.02)])
def test_eight_bit_attention_is_its_float64_reference_and_close_to_float(impl, qk, pv, bound):
    q, k, v = _qkv(k_offset=2.0)  # tq, tk not multiples of the blocks: partial last blocks
    bias = np.zeros((2, 150), np.float32)
    bias[1, 100:] = -10000.0  # PixArt's dropped-token bias
    out = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(bias), impl=impl))
    # float32 vs float64 can flip a rounding of a code near a half step: a few such flips per
    # tensor are allowed, so the bound is on the whole output
    assert _rel(out, reference(q, k, v, bias, qk, pv)) < 2e-3
    flt = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(bias)), np.float64)
    err = _rel(out, flt)
    assert 1e-3 < err < bound, err  # quantized, and SageAttention-close


def test_masked_keys_get_no_weight():
    """A key with PixArt's −10000 bias gets P̃ = 0 exactly: its V (kept inside the unmasked
    rows' range, so the per-channel V scale is the same) does not change the output."""
    q, k, v = _qkv(1)
    v[:, 120:] = 0.5 * v[:, 30:60]
    bias = np.zeros((2, 150), np.float32)
    bias[:, 120:] = -10000.0
    v2 = v.copy()
    v2[:, 120:] = -0.5 * v[:, 60:90]
    a = attention_8bit(*(jnp.asarray(x) for x in (q, k, v)), jnp.asarray(bias))
    b = attention_8bit(*(jnp.asarray(x) for x in (q, k, v2)), jnp.asarray(bias))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = attention_8bit(*(jnp.asarray(x) for x in (q, k, v2)))  # unmasked, the same change shows
    assert float(jnp.abs(c - b).max()) > 1e-2


def test_k_smoothing_is_what_keeps_an_offset_k_accurate():
    """K with a large shared offset (as DiT keys have): without smoothing the INT8 K codes spend
    their range on the offset and the logits lose the per-key differences."""
    q, k, v = _qkv(3, k_offset=100.0)
    args = [jnp.asarray(x) for x in (q, k, v)]
    flt = np.asarray(attention(*args), np.float64)
    smooth = _rel(attention_8bit(*args), flt)
    raw = _rel(attention_8bit(*args, smooth_k=False), flt)
    assert smooth < 0.05 and raw > 4 * smooth, (smooth, raw)


def test_compare_runs_the_quantized_rows_with_eight_bit_attention():
    """``run_compare(attention="sage8")``: the float row is the float model with its own attention
    (identical to a run without the option), the quantized rows differ from the plain run."""
    import sys

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from test_compare_seeds import _tiny

    from jaxdq.compare import run_compare

    kw = dict(per_class=1, classes=(1, 2), num_steps=2, progress=False, model=_tiny())
    plain = run_compare("tiny", ("w8a8",), **kw)
    sage = run_compare("tiny", ("w8a8",), attention="sage8", **kw)
    assert sage["settings"]["attention"] == "sage8" and "attention" not in plain["settings"]
    np.testing.assert_array_equal(plain["images"]["float"], sage["images"]["float"])
    assert not np.array_equal(plain["images"]["w8a8"], sage["images"]["w8a8"])
    assert sage["results"][1]["psnr_db"] < plain["results"][1]["psnr_db"] + 1.0
    with pytest.raises(ValueError, match="attention"):
        run_compare("tiny", ("w8a8",), attention="int3", **kw)
