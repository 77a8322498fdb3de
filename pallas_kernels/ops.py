"""``qlinear_apply(q, x)``: a :class:`jaxdq.quant.qlinear.QLinear` through the Pallas kernels.

On a CUDA backend, for the configurations the kernels cover, the layer runs as two
kernels (both jit-able, shapes static):

1. :func:`pallas_kernels.triton_kernels.quantize_act`: ``X' = H(X / smooth)``, int8
   codes with per-token scales (``bits`` = act_spec.bits; 4-bit codes in int8), and
   ``X' L1`` (bf16), reading X once per sweep.
2. the integer GEMM with the fused epilogue ``acc·s_x·s_w + bias + (X'L1) L2``:
   * int8 weights, per-channel scales, Hopper: Mosaic GPU ``wgmma ... s32.s8.s8``,
     warp-specialized persistent kernel (:func:`pallas_kernels.mosaic_kernels.int8_gemm_ws`;
     the weight is transposed to K-major at call time; epilogue ``acc·s_x·s_w + bias``;
     the low-rank ``(X'L1) L2`` is added by XLA after it on this path);
   * otherwise (packed int4 weights, per-group scales, or non-Hopper): the Pallas-Triton
     kernel (int8 ``tt.dot``; int4 codes unpacked to int8 in registers first).

Everything else (CPU/TPU backends, static or asymmetric activations, asymmetric
weights, tensor-granularity scales) returns the QLinear's own reference: ``impl="int"``
semantics where :meth:`QLinear.int_path_ok`, else ``impl="fake"``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import triton_kernels

#: "auto": Mosaic GPU warp-specialized wgmma (``int8_gemm_ws``) for int8 per-channel
#: weights on sm_90, Triton otherwise; "triton": always the Triton GEMM.
GEMM_BACKEND = "auto"
#: Fuse the low-rank up-projection into the Hopper wgmma kernel (second accumulator).
#: Off until bench/bench_kernels.py's ``mgpu_ws_w8a8_lr32_fused`` rows show it correct on a GPU.
FUSE_LOWRANK_HOPPER = False


def _is_hopper() -> bool:
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and getattr(dev, "compute_capability", "") in ("9.0", "9.0a")
    except Exception:  # pragma: no cover
        return False


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def kernel_supported(q) -> bool:
    """Whether :func:`qlinear_apply` runs ``q`` through the kernels (on a GPU)."""
    a, w = q.act_spec, q.w_spec
    if a is None or q.act_static or not a.symmetric or a.granularity != "token":
        return False
    if not w.symmetric or q.w_zero is not None or w.granularity not in ("channel", "group"):
        return False
    k, n = q.in_features, q.out_features
    if w.granularity == "group" and (w.group_size % 32 or k % w.group_size):
        return False
    if k % 128 or n % 128:
        return False
    if q.had_block and (q.had_block < 16 or q.had_block & (q.had_block - 1)):
        return False
    return True


def _reference(q, x):
    return q.replace(impl="int" if q.int_path_ok() else "fake")(x)


def _pad_rows(a, m_pad):
    return a if a.shape[0] == m_pad else jnp.pad(a, ((0, m_pad - a.shape[0]), (0, 0)))


def qlinear_apply(q, x: jax.Array) -> jax.Array:
    """``y = QLinear(x)`` for ``x [..., C_in]`` → ``[..., C_out]`` in ``x.dtype``."""
    if not (on_gpu() and kernel_supported(q)):
        return _reference(q, x)
    dtype = x.dtype
    k, n = q.in_features, q.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    bm = 128 if m >= 128 else 64
    m_pad = -(-m // bm) * bm
    x2 = _pad_rows(x2, m_pad)  # zero rows quantize to zero codes and are sliced off
    l1, l2 = q.lowrank_a, q.lowrank_b
    if l1 is not None and l1.shape[1] % 16:  # zero-pad the rank to the dot minimum (exact)
        pad = 16 - l1.shape[1] % 16
        l1 = jnp.pad(l1, ((0, 0), (0, pad)))
        l2 = jnp.pad(l2, ((0, pad), (0, 0)))
    codes, sx, xl1 = triton_kernels.quantize_act(
        x2, bits=q.act_spec.bits, smooth=q.smooth, had_block=q.had_block, l1=l1, block_m=16)
    grouped = q.w_spec.granularity == "group"
    bias = None if q.bias is None else q.bias.astype(jnp.float32)
    use_ws = (GEMM_BACKEND == "auto" and _is_hopper() and not q.packed and not grouped)
    if use_ws:
        from pallas_kernels import mosaic_kernels

        # persistent warp-specialized wgmma s8 kernel; rows padded to its CTA tile
        fuse = FUSE_LOWRANK_HOPPER and xl1 is not None
        cta_m = 128 if n % (128 if fuse else 256) == 0 else 256  # int8_gemm_ws's wg_dim="auto"
        m_ws = -(-m // cta_m) * cta_m
        codes_ws, sx_ws = _pad_rows(codes, m_ws), _pad_rows(sx, m_ws)
        y = mosaic_kernels.int8_gemm_ws(codes_ws, q.qweight.T, sx_ws[:, 0], q.w_scale.reshape(-1),
                                        bias=bias, xa=_pad_rows(xl1, m_ws) if fuse else None,
                                        l2=l2 if fuse else None, out_dtype=jnp.bfloat16)
        if xl1 is not None and not fuse:  # not fused on this path yet: one XLA product + add
            xa = _pad_rows(xl1, m_ws)
            y = (y.astype(jnp.float32) + jnp.dot(xa, l2.astype(jnp.bfloat16),
                                                 preferred_element_type=jnp.float32)).astype(jnp.bfloat16)
    else:
        y = triton_kernels.int_gemm(codes, q.qweight, sx, q.w_scale, bias=bias, xa=xl1, l2=l2,
                                    packed=q.packed, out_dtype=jnp.bfloat16, block_m=bm)
    return y[:m].reshape(*lead, n).astype(dtype)
