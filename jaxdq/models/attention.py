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

SEQUENCE_PARALLEL = ("a2a", "a2a-xla", "a2a-cudnn")
IMPLS = ("float32", "cudnn", "xla") + SEQUENCE_PARALLEL


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
