"""The Q/K quantizer of 8-bit attention (SageAttention's): K smoothed by its token mean,
INT8 codes with one symmetric scale per block of tokens and head.

Shared by the semantics (:func:`jaxdq.models.attention.attention_8bit`, jnp) and the Hopper
kernel's composition (:func:`jaxdq.backend.int8qk_attention`), so both quantize alike.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SAGE_BLOCK_Q = 128  # tokens per Q scale (SageAttention's per-block granularity)
SAGE_BLOCK_K = 64  # tokens per K scale


def per_block_scale(x: jax.Array, block: int, qmax: float) -> jax.Array:
    """Symmetric scale per block of ``block`` tokens and head of ``x [N, T, H, d]``:
    ``[N, T, H, 1]`` (broadcast back over the block's tokens), ``max|x| / qmax`` (1 for an
    all-zero block)."""
    n, t, h, d = x.shape
    pad = (-t) % block
    xp = jnp.pad(jnp.abs(x), ((0, 0), (0, pad), (0, 0), (0, 0)))
    amax = xp.reshape(n, -1, block, h, d).max(axis=(2, 4), keepdims=True)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    return jnp.broadcast_to(scale, (n, xp.shape[1] // block, block, h, 1)).reshape(n, -1, h, 1)[:, :t]


def smooth_keys(k: jax.Array) -> jax.Array:
    """``k − mean_tokens(k)`` in float32 (``[N, Tk, H, d]``): softmax(q·(k − k̄)) = softmax(q·k)
    exactly, and K's shared offset no longer spends the INT8 range."""
    k = k.astype(jnp.float32)
    return k - k.mean(axis=1, keepdims=True)


def int8_qk_codes(q: jax.Array, k: jax.Array, smooth_k: bool = True):
    """``(qc, kc, sq, sk)``: int8 codes ``[N, T, H, d]`` of Q and (smoothed) K and their
    per-token f32 scales ``[N, T, H]`` (each block's scale repeated over its tokens), so that
    ``q ≈ qc · sq[..., None]`` and ``k − k̄ ≈ kc · sk[..., None]``."""
    q = q.astype(jnp.float32)
    k = smooth_keys(k) if smooth_k else k.astype(jnp.float32)
    sq, sk = per_block_scale(q, SAGE_BLOCK_Q, 127.0), per_block_scale(k, SAGE_BLOCK_K, 127.0)
    qc = jnp.clip(jnp.round(q / sq), -127, 127).astype(jnp.int8)
    kc = jnp.clip(jnp.round(k / sk), -127, 127).astype(jnp.int8)
    return qc, kc, sq[..., 0], sk[..., 0]
