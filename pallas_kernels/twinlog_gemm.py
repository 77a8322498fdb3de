"""Twin-log (LRQ-DiT TLQ) weight GEMM: int8 activation codes × packed 4-bit log codes,
decoded in registers and fed to the bf16 tensor cores (Pallas-Triton; any CUDA GPU, and
``interpret=True`` on CPU).

* :func:`twinlog_gemm`: ``Y = (sx ⊙ Xq) · W_f + bias`` with ``Xq`` int8 ``[M, K]`` codes and
  per-token scales ``sx [M, 1]``, ``W_f`` the twin-log weight given as packed 4-bit codes
  (two per byte along N, element 2i in the low nibble) and a per-column table.
* :class:`TwinLogGemmConfig`: its tiles and launch parameters (frozen, hashable);
  :func:`twinlog_gemm_config`: the tile choice per M.
* :func:`twinlog_gemm_reference`: the pure-jnp semantics;
  :func:`decode_twinlog_reference`: the decoded (bf16-rounded) weights;
  :func:`kernel_table`: the per-column table from eq. 7's params.

Codes (jaxdq.quant.twinlog's format): a 4-bit two's-complement ``c``: 0 = zero; ``c > 0``
positive with log level ``q = c − 1``; ``c < 0`` negative with ``q = −c − 1``; so
``q = |c| − 1`` on both sides and ``|w| = 2^(step_side · q + offset_side)`` with
``step = s``, ``offset = s·z`` per column and side (eq. 7).

How the codes become tensor-core operands (the main loop, per K step of ``block_k``):
the uint8 tile ``[block_k, block_n/2]`` is split into its two nibbles; each nibble gives
``neg = u ≥ 8`` and ``q = |c| − 1`` with integer ops, the exponent ``e = step·q + offset``
is one FMA with the side's column parameters (two selects), ``2^e`` one ``ex2`` (the SFU),
the sign and the zero code two selects; the two halves are interleaved to
``[block_k, block_n]`` and rounded to bf16.  The int8 activation codes are converted to
bf16 (exact: |code| ≤ 128 needs 8 significant bits), and ``tl.dot`` of the two bf16 tiles
accumulates in float32: a **bf16 tensor-core MMA** (Triton lowers it to
``wgmma.mma_async…bf16`` on sm_90 when it takes the MMAv3 path, ``mma.sync.m16n8k16…bf16``
otherwise; ``bench/bench_twinlog.py --ptx`` records which).  Epilogue: ``acc · sx + bias``.

Why this decode and not the other two the issue names:
* a per-column table of 16 bf16 values looked up by code would need a register gather,
  which Pallas-Triton does not lower; the equivalent 16-way select tree costs ~15 selects
  per weight against one FMA + one ``ex2`` here, and computes the same table values;
* the integer shift form into int8 (``w_int = ±m << (f − f_min)`` fed to s8 MMA) fits only
  some layers: on the default DiT the 4-bit adaLN layers have no ``I ≥ 0`` with
  ``|w_int| ≤ 127`` and the others ``I ≤ 3``, an error bound ``2^{−I−1} ≥ 6 %``
  (bench/results/twinlog_weight_error.json, ``int8_max_frac_bits``), so it would change
  the model; bf16 rounding of the decoded weight is within ``2^{−8}`` of eq. 7.

Error against the float eq. 7 product ``(sx ⊙ Xq) · W_f``: the decoded weight is within a
relative ``2^{−8}`` (bf16 rounding; ``ex2`` adds ≈ 2^{−22}), so per output
``|Y − Y_f| ≤ 2^{−8} (|sx ⊙ Xq| · |W_f|)`` plus float32 accumulation and the output cast.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels._common import pow2_divisor, tiled_gemm_call

__all__ = ["TwinLogGemmConfig", "twinlog_gemm", "twinlog_gemm_config", "twinlog_gemm_reference",
           "decode_twinlog_reference", "kernel_table", "DECODE_REL_ERROR"]

#: Relative error of a decoded weight against eq. 7 (bf16 rounding to nearest: 8 significant bits).
DECODE_REL_ERROR = 2.0 ** -8


# --------------------------------------------------------------------------- references
def kernel_table(s_pos: jax.Array, z_pos: jax.Array, s_neg: jax.Array, z_neg: jax.Array) -> tuple[jax.Array, jax.Array]:
    """float32 ``(step [2, N], offset [2, N])`` from eq. 7's per-column params ``[1, N]``:
    row 0 the positive side ``(s⁺, s⁺z⁺)``, row 1 the negative ``(s⁻, s⁻z⁻)``."""
    f = lambda a: jnp.asarray(a, jnp.float32).reshape(1, -1)  # noqa: E731
    step = jnp.concatenate([f(s_pos), f(s_neg)])
    offset = jnp.concatenate([f(s_pos) * f(z_pos), f(s_neg) * f(z_neg)])
    return step, offset


def _nibbles(packed: jax.Array) -> jax.Array:
    """uint8 ``[K, N/2]`` → int32 nibble values ``u ∈ [0, 16)`` ``[K, N]`` (low nibble first)."""
    p = packed.astype(jnp.int32)
    u = jnp.stack([p & 0xF, (p >> 4) & 0xF], axis=-1)
    return u.reshape(packed.shape[0], 2 * packed.shape[1])


def _decode(u, sp, sn, op, on):
    """float32 weights of nibble values ``u`` (int32) with the column params broadcast
    against them (the kernel's and the reference's one formula)."""
    neg = u >= 8
    q = jnp.where(neg, 15 - u, u - 1).astype(jnp.float32)   # |c| − 1: c = u − 16 when u ≥ 8
    mag = jnp.exp2(jnp.where(neg, sn, sp) * q + jnp.where(neg, on, op))
    return jnp.where(u == 0, 0.0, jnp.where(neg, -mag, mag))


def decode_twinlog_reference(wq: jax.Array, step: jax.Array, offset: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """Decoded weights ``[K, N]`` (rounded to ``dtype``; float32 gives eq. 7 itself).

    wq: uint8 ``[K, N/2]`` packed 4-bit codes; step, offset: float32 ``[2, N]`` (:func:`kernel_table`).
    """
    u = _nibbles(wq)
    step = step.astype(jnp.float32)
    offset = offset.astype(jnp.float32)
    w = _decode(u, step[0:1], step[1:2], offset[0:1], offset[1:2])
    return w.astype(dtype)


def twinlog_gemm_reference(xq: jax.Array, sx: jax.Array, wq: jax.Array, step: jax.Array, offset: jax.Array, *,
                           bias: Optional[jax.Array] = None, out_dtype=jnp.bfloat16) -> jax.Array:
    """The kernel's semantics in float32: ``(xq · bf16(W_f)) · sx + bias``.

    xq: int8 ``[M, K]`` symmetric activation codes; sx: float32 ``[M, 1]`` per-token
    scales; wq: uint8 ``[K, N/2]``; step, offset: ``[2, N]``; bias ``[N]``.
    Returns ``out_dtype [M, N]``.
    """
    w = decode_twinlog_reference(wq, step, offset, jnp.bfloat16).astype(jnp.float32)
    y = jnp.dot(xq.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST) * sx.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(out_dtype)


# --------------------------------------------------------------------------- tuning config
@dataclasses.dataclass(frozen=True)
class TwinLogGemmConfig:
    """Tiles and launch parameters of :func:`twinlog_gemm` (frozen: a static jit argument).

    block_m, block_n: output tile (each clipped to M, N; ``M % block_m == 0``,
    ``N % block_n == 0``, ``block_n`` even).  block_k: K step (None = the largest power of
    two dividing K, at most 64).  num_warps, num_stages: Triton's.  interpret: run in
    Pallas' interpreter (CPU).  Defaults not yet tuned on a GPU (bench/bench_twinlog.py
    sweeps them).
    """

    block_m: int = 128
    block_n: int = 128
    block_k: Optional[int] = None
    num_warps: int = 8
    num_stages: int = 3
    interpret: bool = False


def twinlog_gemm_config(m: int, *, interpret: bool = False) -> TwinLogGemmConfig:
    """The config for ``m`` (already padded) rows: ``block_m`` 16 / 64 / 128 by M (the dot
    needs ≥ 16 rows), 4 warps below 128 rows."""
    bm = 16 if m <= 16 else 64 if m < 128 else 128
    return TwinLogGemmConfig(block_m=bm, num_warps=4 if bm < 128 else 8, interpret=interpret)


# --------------------------------------------------------------------------- kernel
def _kernel(x_ref, sx_ref, w_ref, t_ref, *rest, k_total, bk, has_bias):
    b_ref = rest[0] if has_bias else None
    o_ref = rest[-1]
    bm, bn = o_ref.shape
    half = bn // 2
    # per-column params of the even (low nibble) and odd (high nibble) columns: [1, bn/2]
    sp_e, sn_e, op_e, on_e, sp_o, sn_o, op_o, on_o = (t_ref[pl.ds(i, 1), :] for i in range(8))

    def body(kk, acc):
        p = w_ref[pl.ds(kk * bk, bk), :].astype(jnp.int32)                  # [bk, bn/2]
        lo = _decode(p & 0xF, sp_e, sn_e, op_e, on_e)
        hi = _decode((p >> 4) & 0xF, sp_o, sn_o, op_o, on_o)
        w = jnp.stack([lo, hi], axis=-1).reshape(bk, 2 * half).astype(jnp.bfloat16)
        x = x_ref[:, pl.ds(kk * bk, bk)].astype(jnp.float32).astype(jnp.bfloat16)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, k_total // bk, body, jnp.zeros((bm, bn), jnp.float32))
    y = acc * sx_ref[...]
    if has_bias:
        y = y + b_ref[...].astype(jnp.float32)
    o_ref[...] = y.astype(o_ref.dtype)


def _table(step: jax.Array, offset: jax.Array) -> jax.Array:
    """float32 ``[8, N/2]``: rows s⁺, s⁻, o⁺, o⁻ of the even columns, then of the odd ones."""
    step = step.astype(jnp.float32)
    offset = offset.astype(jnp.float32)
    return jnp.concatenate([step[:, 0::2], offset[:, 0::2], step[:, 1::2], offset[:, 1::2]])


@functools.partial(jax.jit, static_argnames=("out_dtype", "config"))
def twinlog_gemm(xq: jax.Array, sx: jax.Array, wq: jax.Array, step: jax.Array, offset: jax.Array, *,
                 bias: Optional[jax.Array] = None, out_dtype=jnp.bfloat16,
                 config: TwinLogGemmConfig = TwinLogGemmConfig()) -> jax.Array:
    """Twin-log GEMM; semantics of :func:`twinlog_gemm_reference` (module docstring).

    xq: int8 ``[M, K]``; sx: float32 ``[M, 1]``; wq: uint8 ``[K, N/2]`` packed 4-bit codes;
    step, offset: float32 ``[2, N]`` (:func:`kernel_table`); bias ``[N]`` or None.
    Requirements: ``M % block_m == 0``, ``N % block_n == 0``, ``K % block_k == 0``
    (pad M with zero rows: their codes are zero).  Jitted (static: ``out_dtype``, ``config``).
    """
    m, k = xq.shape
    n = 2 * wq.shape[1]
    bk = config.block_k or pow2_divisor(k, 64)
    bm, bn = min(config.block_m, m), min(config.block_n, n)
    if m % bm or n % bn or k % bk or bn % 2 or wq.shape[0] != k:
        raise ValueError(f"twinlog_gemm: M={m}, K={k}, N={n} do not tile by ({bm}, {bk}, {bn}) "
                         f"or wq {wq.shape} is not [K, N/2]")
    args = [xq, sx.reshape(m, 1).astype(jnp.float32), wq, _table(step, offset)]
    specs = [pl.BlockSpec((bm, k), lambda i, j: (i, 0)), pl.BlockSpec((bm, 1), lambda i, j: (i, 0)),
             pl.BlockSpec((k, bn // 2), lambda i, j: (0, j)), pl.BlockSpec((8, bn // 2), lambda i, j: (0, j))]
    if bias is not None:
        args.append(bias.reshape(1, n).astype(jnp.float32))
        specs.append(pl.BlockSpec((1, bn), lambda i, j: (0, j)))
    kern = functools.partial(_kernel, k_total=k, bk=bk, has_bias=bias is not None)
    return tiled_gemm_call(kern, args, specs, m=m, n=n, bm=bm, bn=bn, out_dtype=out_dtype, config=config,
                           name="jaxdq_twinlog_gemm")
