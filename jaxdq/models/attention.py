"""``softmax(Q Kᵀ/√d + bias) V``, the one attention every model here calls.

``impl`` (a static model-config field, ``attention`` in the DiT/PixArt/FLUX configs):

* ``"float32"`` (default): inputs upcast to float32, logits and softmax materialized
  (``[N, H, Tq, Tk]``), float32 out.  The reference: the converters' parity tests
  against PyTorch use it, and it is what calibration sees.
* ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` in the input
  dtype (bf16/fp16; on NVIDIA GPUs cuDNN's fused flash attention, float32 softmax
  statistics and accumulation, no ``[Tq, Tk]`` tensor in HBM).  For sampling on a GPU:
  at PixArt-Σ-1024 the float32 path spent 85 of the bf16 step's 115 ms in attention
  (bench/results/e2e_h100.json, profile).
* ``"xla"``: the same call with XLA's implementation (materialized, input dtype); runs
  anywhere.
* ``"sage8"``: 8-bit attention as SageAttention computes it (the numerics of issue 19's
  Hopper kernel, here in jnp: runs anywhere, no speed-up): K smoothed by its mean over
  tokens (softmax is invariant to it), Q and K INT8 with one symmetric scale per block of
  :data:`SAGE_BLOCK_Q` / :data:`SAGE_BLOCK_K` tokens and head, ``Q Kᵀ`` in int32; the
  unnormalized probabilities ``P̃ = exp(S − rowmax) ∈ [0, 1]`` as FP8 e4m3 (scale 1/448),
  V as FP8 e4m3 per channel and head, ``P̃ V`` and the row sums in float32.
* ``"fp8"``: the same with Q and K in FP8 e4m3 per block instead of INT8 (FP8 ``Q Kᵀ``).
* ``"int8qk"``: INT8 ``Q Kᵀ`` as ``"sage8"`` with ``P̃`` and V in float16 (SageAttention v1's
  scheme).  On a Hopper GPU it runs as one Pallas Mosaic GPU flash-attention kernel
  (:func:`jaxdq.backend.int8qk_attention`, :mod:`pallas_kernels.attention_int8`: s8 wgmma
  ``Q Kᵀ``, online softmax, f16 ``P̃ V``), elsewhere as this module's jnp.
* ``"a2a"`` (``"a2a-xla"``, ``"a2a-cudnn"``): sequence parallel over the ``"model"`` axis of
  the mesh in jax's mesh context (:func:`jaxdq.distributed.sequence_parallel_attention`:
  all-to-all from a sequence split to a head split and back, ``shard_map``), each device
  running ``"float32"`` (``"xla"``, ``"cudnn"``) on its heads.  The ``mesh=`` entry points
  (``Family.sampler``, ``calibrate``) enter that context; without a mesh it is the inner
  implementation.  For long video sequences: per-device logits are 1/n of the reference's.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from jaxdq import backend
from jaxdq.quant.attention_codes import SAGE_BLOCK_K, SAGE_BLOCK_Q, int8_qk_codes, per_block_scale, smooth_keys

SEQUENCE_PARALLEL = ("a2a", "a2a-xla", "a2a-cudnn")
EIGHT_BIT = ("sage8", "fp8", "int8qk")
IMPLS = ("float32", "cudnn", "xla") + EIGHT_BIT + SEQUENCE_PARALLEL
_E4M3_MAX = 448.0


def check_attention_impl(impl: str) -> None:
    """A model config's ``attention`` field: a clear error at config time, not at trace time."""
    if impl not in IMPLS:
        raise ValueError(f"attention={impl!r}: expected one of {IMPLS}")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array] = None,
              impl: str = "float32") -> jax.Array:
    """Multi-head attention.

    Args:
      q: ``[N, Tq, H, d]``; k, v: ``[N, Tk, H, d]``, any float dtype.
      bias: ``[N, Tk]`` additive logit bias per key (a key mask as 0 / -inf-like), or None.
      impl: one of :data:`IMPLS` (module docstring).
    Returns:
      ``[N, Tq, H, d]``: float32 for ``"float32"``, else ``v.dtype``.  q and k are cast to
      ``v.dtype`` (RoPE may have promoted them to float32); ``"cudnn"`` computes float32
      inputs in bf16 (cuDNN takes fp16/bf16 only) and returns float32.
    """
    if impl == "float32":
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(q.shape[-1])
        if bias is not None:
            logits = logits + bias.astype(jnp.float32)[:, None, None, :]
        return jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(logits, axis=-1), v)
    check_attention_impl(impl)
    if impl in EIGHT_BIT:
        if impl == "int8qk" and backend.attention_kernel_selected(q, k, v):
            return backend.int8qk_attention(q, k, v, bias)
        return attention_8bit(q, k, v, bias, qk="e4m3" if impl == "fp8" else "int8",
                              pv="float16" if impl == "int8qk" else "e4m3")
    if impl in SEQUENCE_PARALLEL:
        from jaxdq.distributed import sequence_parallel_attention

        inner = impl.partition("-")[2] or "float32"
        return sequence_parallel_attention(q, k, v, bias, lambda q, k, v, b: attention(q, k, v, b, impl=inner))
    out_dtype = dtype = v.dtype
    if impl == "cudnn" and dtype not in (jnp.bfloat16, jnp.float16):
        dtype = jnp.bfloat16  # cuDNN's fused attention takes half types only
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    b = None
    if bias is not None:  # cuDNN wants the bias as [N|1, H|1, Tq, Tk]
        b = jnp.broadcast_to(bias.astype(dtype)[:, None, None, :], (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, bias=b, implementation=impl).astype(out_dtype)


def _e4m3(x: jax.Array) -> jax.Array:
    """Round float32 to the FP8 e4m3 grid (nearest even, saturating at ±448), back in float32."""
    return jnp.clip(x, -_E4M3_MAX, _E4M3_MAX).astype(jnp.float8_e4m3fn).astype(jnp.float32)


def attention_8bit(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array] = None,
                   qk: str = "int8", smooth_k: bool = True, pv: str = "e4m3") -> jax.Array:
    """SageAttention-style 8-bit attention (module docstring, ``"sage8"`` / ``"fp8"``).

    Args:
      q: ``[N, Tq, H, d]``; k, v: ``[N, Tk, H, d]``; bias ``[N, Tk]`` or None (added to the
        dequantized logits, so a masked key gets no weight).
      qk: ``"int8"`` (Q, K INT8 per block, int32 ``Q Kᵀ``) or ``"e4m3"`` (FP8 per block).
      smooth_k: subtract K's mean over tokens first (SageAttention; False only to measure it).
      pv: ``"e4m3"`` (P̃ and V in FP8, V per channel) or ``"float16"`` (both rounded to float16).
    Returns:
      ``[N, Tq, H, d]`` float32.
    """
    if qk == "int8":
        qc, kc, sq, sk = int8_qk_codes(q, k, smooth_k)
        s = jnp.einsum("nqhd,nkhd->nhqk", qc, kc, preferred_element_type=jnp.int32).astype(jnp.float32)
    elif qk == "e4m3":
        q = q.astype(jnp.float32)
        k = smooth_keys(k) if smooth_k else k.astype(jnp.float32)
        sq, sk = per_block_scale(q, SAGE_BLOCK_Q, _E4M3_MAX), per_block_scale(k, SAGE_BLOCK_K, _E4M3_MAX)
        s = jnp.einsum("nqhd,nkhd->nhqk", _e4m3(q / sq), _e4m3(k / sk))
        sq, sk = sq[..., 0], sk[..., 0]
    else:
        raise ValueError(f"qk={qk!r}: expected 'int8' or 'e4m3'")
    v = v.astype(jnp.float32)
    s = s * sq.transpose(0, 2, 1)[..., :, None] * sk.transpose(0, 2, 1)[..., None, :]
    s = s / math.sqrt(q.shape[-1])
    if bias is not None:
        s = s + bias.astype(jnp.float32)[:, None, None, :]
    p = jnp.exp(s - s.max(axis=-1, keepdims=True))  # P̃ ∈ [0, 1], row max 1
    denom = p.sum(axis=-1, keepdims=True)  # float32 row sums of the unquantized P̃, as the kernel keeps
    if pv == "float16":
        f16 = lambda a: a.astype(jnp.float16).astype(jnp.float32)  # noqa: E731
        return jnp.einsum("nhqk,nkhd->nqhd", f16(p), f16(v)) / denom.transpose(0, 2, 1, 3)
    if pv != "e4m3":
        raise ValueError(f"pv={pv!r}: expected 'e4m3' or 'float16'")
    sv = jnp.max(jnp.abs(v), axis=1, keepdims=True) / _E4M3_MAX  # [N, 1, H, d] per channel and head
    sv = jnp.where(sv > 0, sv, 1.0)
    out = jnp.einsum("nhqk,nkhd->nqhd", _e4m3(p * _E4M3_MAX), _e4m3(v / sv)) / _E4M3_MAX
    return out * sv / denom.transpose(0, 2, 1, 3)
