"""The 8-bit attention kernel (:mod:`pallas_kernels.attention_int8`, Mosaic GPU) vs its
pure-jnp reference and a float64 NumPy evaluation of the same formula, in jax's Mosaic GPU
interpreter on CPU; and the library's composition of it (:func:`jaxdq.backend.int8qk_attention`:
codes, folded scales, padding, masks) vs ``attention(impl="int8qk")``'s jnp semantics."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
from pallas_kernels.attention_int8 import AttentionConfig, int8qk_attention, int8qk_attention_reference  # noqa: E402

from jaxdq import backend  # noqa: E402
from jaxdq.models.attention import attention_8bit  # noqa: E402


def _operands(seed, b, tq, tk, h, dk, dv, vdt, bias):
    r = np.random.default_rng(seed)
    qc = r.integers(-127, 128, (b, tq, h, dk)).astype(np.int8)
    kc = r.integers(-127, 128, (b, tk, h, dk)).astype(np.int8)
    v = r.standard_normal((b, tk, h, dv)).astype(np.float32)
    # logits of a few units (base 2), varying per query and key: the softmax is not flat
    sq = r.uniform(0.5, 2.0, (b, h, tq)).astype(np.float32) / (127 * 127 * math.sqrt(dk) / 4)
    sk = r.uniform(0.5, 2.0, (b, h, tk)).astype(np.float32)
    kb = None
    if bias:  # a key mask: the last third of each sample's keys dropped, plus small offsets
        kb = r.uniform(-1, 1, (b, tk)).astype(np.float32)
        kb[:, 2 * tk // 3:] = -1e4
    return qc, kc, v.astype(vdt), sq, sk, kb


def _numpy_attention(qc, kc, v, sq, sk, kb):
    """The module docstring's formula in float64 (P̃ unrounded)."""
    s = np.einsum("bqhd,bkhd->bhqk", qc.astype(np.float64), kc.astype(np.float64))
    t = s * sq[..., :, None] * sk[..., None, :]
    if kb is not None:
        t = t + kb[:, None, None, :]
    p = np.exp2(t - t.max(-1, keepdims=True))
    out = np.einsum("bhqk,bkhd->bqhd", p, np.asarray(v, np.float64))
    return out / p.sum(-1).transpose(0, 2, 1)[..., None]


@pytest.mark.parametrize("b,tq,tk,h,dk,dv,vdt,bias,block_kv", [
    (1, 128, 256, 2, 64, 64, jnp.float16, False, 64),  # 4 KV steps through a 2-deep pipeline, 2 heads
    (2, 256, 128, 1, 128, 64, jnp.float16, True, 64),  # 2 Q tiles, 2 samples, masked keys, Dk 128
    (1, 128, 128, 1, 64, 128, jnp.bfloat16, False, 128),  # bf16 V, Dv 128, one KV step
    (1, 128, 128, 1, 96, 80, jnp.float16, True, 64),  # d = 72 padded tight: 32-byte swizzles
])
def test_kernel_matches_reference_and_float64(b, tq, tk, h, dk, dv, vdt, bias, block_kv):
    qc, kc, v, sq, sk, kb = _operands(tq + tk + dk + dv, b, tq, tk, h, dk, dv, vdt, bias)
    args = [jnp.asarray(a) if a is not None else None for a in (qc, kc, v, sq, sk, kb)]
    cfg = AttentionConfig(block_kv=block_kv, interpret=mk.gpu_interpret_params())
    out = np.asarray(int8qk_attention(*args, config=cfg), np.float64)
    ref = np.asarray(int8qk_attention_reference(*args), np.float64)
    exact = _numpy_attention(qc, kc, np.asarray(jnp.asarray(v, jnp.float32)), sq, sk, kb)
    scale = np.abs(exact).max()
    # P̃ rounded to v.dtype before P̃V (both), output rounded to v.dtype: a few half-ulps
    tol = 4e-3 if vdt == jnp.float16 else 3e-2
    assert np.abs(out - ref).max() <= tol * scale
    assert np.abs(ref - exact).max() <= tol * scale
    assert np.abs(out - exact).max() <= tol * scale
    # the softmax is not flat (otherwise a dropped scale could pass): outputs spread well below max|V|
    assert np.std(exact) > 0.1 * np.abs(exact).max()


def test_kernel_rejects_untiled_shapes():
    qc, kc, v, sq, sk, _ = _operands(0, 1, 96, 128, 1, 64, 64, jnp.float16, False)
    with pytest.raises(ValueError, match="Tq=96"):
        int8qk_attention(*map(jnp.asarray, (qc, kc, v, sq, sk)))
    with pytest.raises(ValueError, match="int8 codes"):
        int8qk_attention(jnp.asarray(qc, jnp.int32), *map(jnp.asarray, (kc, v, sq, sk)))
    with pytest.raises(ValueError, match="block_kv"):
        AttentionConfig(block_kv=96)


@pytest.mark.parametrize("tq,tk,d,masked", [(100, 77, 40, True), (128, 128, 72, False)])
def test_library_composition_equals_int8qk_semantics(tq, tk, d, masked):
    """backend.int8qk_attention (the path ``attention(impl="int8qk")`` takes on Hopper) = the
    jnp semantics: same codes, scales folded, ragged tokens padded and masked, head dims padded."""
    r = np.random.default_rng(tq + tk)
    q = jnp.asarray(r.standard_normal((2, tq, 2, d)) * 2, jnp.float32)
    k = jnp.asarray(r.standard_normal((2, tk, 2, d)) + 3.0, jnp.float32)  # a shared offset: smoothing matters
    v = jnp.asarray(r.standard_normal((2, tk, 2, d)), jnp.float32)
    bias = None
    if masked:
        keep = np.ones((2, tk), np.float32)
        keep[1, tk // 2:] = 0
        bias = jnp.asarray((1 - keep) * -10000.0)
    got = np.asarray(backend.int8qk_attention(q, k, v, bias, interpret=True, block_kv=64), np.float64)
    want = np.asarray(attention_8bit(q, k, v, bias, qk="int8", pv="float16"), np.float64)
    assert got.shape == want.shape == (2, tq, 2, d)
    assert np.abs(got - want).max() <= 4e-3 * np.abs(want).max()
