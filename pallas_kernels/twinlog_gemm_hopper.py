"""Twin-log (LRQ-DiT TLQ) weight GEMM for Hopper (sm_90a) through the Pallas Mosaic GPU backend.

* :func:`twinlog_gemm_hopper`, tuned by :class:`TwinLogHopperConfig` (frozen, hashable);
  :func:`twinlog_hopper_config`: the tile choice per (M, N) (unmeasured).
* :func:`twinlog_hopper_operands`: the kernel's weight operands from those of the Triton
  kernel :mod:`pallas_kernels.twinlog_gemm` (``wq`` uint8 ``[K, N/2]``, ``step``/``offset``
  ``[2, N]`` of its ``kernel_table``): the codes K-major as ``jnp.int4 [N, K]`` and the
  per-column decode constants ``[8, N]`` (:func:`decode_constants`).
* References: :func:`decode_twinlog_hopper_reference` (the kernel's decode, the same formula
  in jnp), :func:`twinlog_gemm_hopper_reference` (the GEMM);
  ``pallas_kernels.twinlog_gemm.decode_twinlog_reference`` evaluates eq. 7 by ``exp2``.

Codes: the twin-log 4-bit two's-complement code ``c`` (jaxdq.quant.twinlog's format) is
exactly a ``jnp.int4`` value: 0 = zero; ``c > 0`` positive, ``q = c − 1``; ``c < 0``
negative, ``q = −c − 1``; ``|w| = 2^(step_side · q + offset_side)`` per column (eq. 7).

The decode has no ``ex2`` (the SFU's 16 / clock / SM would make it as slow as the MMA).
With ``v = c & 7`` (the code's low three bits) and its sign bit choosing the side,

    positive (c ≥ 1,  v = c,     q = v − 1):  |w| = 2^(o⁺ − s⁺) · (2^s⁺)^v
    negative (c ≤ −1, v = c + 8, q = 7 − v):  |w| = 2^(o⁻ + 7 s⁻) · (2^−s⁻)^v

so ``w = A · F1 · F2 · F4``, ``F_j = B_j`` if bit ``log2 j`` of ``v`` is set, else 1, with per
column and side ``A`` (the sign folded into ``A⁻ = −2^(o⁻ + 7 s⁻)``) and ``B_j = 2^(± j·s)``,
j = 1, 2, 4: per weight a sign test, three bit tests (and + compare), eight selects (four by
side, three by bit, one for ``c == 0 → 0``), three float32 multiplies and the rounding to
bf16.  The eight constants per column are computed once by XLA (float32 ``exp2``,
:func:`decode_constants`) and each consumer holds those of its columns in registers for a
whole output tile.

Error of the decoded weight against eq. 7 (float64 ``2^(s q + o)`` of the float32 ``step``
and ``offset``): each constant carries float32 ``exp2``'s error (≲ 2 ulp) and its argument's
rounding (``o − s``, ``o + 7s``: ≤ 2^−24 · |arg| in the exponent), three float32 multiplies
add ≤ 3 · 2^−24: together below :data:`F32_DECODE_REL_ERROR` ``= 2^−19`` relative for
exponents of magnitude < 32.  The bf16 rounding adds ``2^−8``:
``|bf16(ŵ) − w| ≤ HOPPER_DECODE_REL_ERROR · |w|``, ``2^−8 + 2^−18``.  (The Triton kernel's
``exp2`` decode rounds to the same bf16 but at f32 values within ~2^−19 of a bf16 tie.)  Per
output ``|Y − Y_f| ≤ HOPPER_DECODE_REL_ERROR · (|sx ⊙ Xq| · |W_f|)`` plus float32
accumulation and the output cast.

Main loop (per pipeline step of ``tile_k``, per consumer warpgroup): the ``jnp.int4``
weight tile arrives in SMEM by TMA (4 bits per weight); the warpgroup loads it to registers
in the WGMMA layout, widens it (Mosaic GPU's i4 → i16 sign extension: there is no 8-bit
pointwise arithmetic), decodes it ``decode_rows`` rows at a time, stores the bf16 tile to a
swizzled SMEM buffer and issues ``wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16``
(:data:`MAIN_LOOP_INSTRUCTION`): A the activation tile (bf16 codes, SMEM), B the decoded
tile (K-major, ``plgpu.transpose_ref``), float32 accumulator in registers.
``wgmma_wait(1)`` keeps one MMA in flight while the next tile is decoded.  Activations:
int8 codes are exact in bf16 (|code| ≤ 128 needs 8 significant bits), so the kernel takes
bf16 codes ``[M, K]`` (int8 ones are converted by XLA first, one pass over X).  Epilogue in
registers: ``y = acc · sx[:, None] + bias``, then SMEM and TMA stores.

Structure: ``pallas_kernels.int_gemm_hopper.int8_gemm_ws``'s (jax's ``hopper_matmul_mgpu``):
one producer warpgroup issuing the TMA loads (``plgpu.emit_pipeline_warp_specialized``),
two consumer warpgroups with a ``tile_m × tile_n`` accumulator each (CTA tile ``tile_m ×
2·tile_n``, or ``2·tile_m × tile_n`` with ``wg_dim="m"``), a persistent grid of one CTA per
SM walking the output tiles in a planar snake.  A decoded weight feeds the rows that read
it: ``tile_m`` of them when each consumer decodes its own tile (two double-buffered bf16
SMEM tiles per consumer), ``2·tile_m`` with ``shared_decode`` (warpgroups split along M read
the same weight tile: they take turns decoding it, by step parity, into three shared SMEM
buffers and meet at a barrier every step).  Cost model, not measured: ~16 integer/select
operations per weight at 64 / clock / SM against 4096 bf16 FLOP / clock / SM of wgmma, so the
decode keeps pace with the MMA only at ≳ 500 rows per decoded weight: ``tile_m = 256``,
``tile_n = 64``, shared (CTA 512 × 64) comes closest; bench/bench_twinlog.py times three tilings.

On CPU the kernel runs in jax's Mosaic GPU interpreter (``interpret=gpu_interpret_params()``),
which has no rule for ``plgpu.load`` or transposed wgmma operands: there the per-column
vectors are plain ref reads and the decoded tile is transposed by an explicit SMEM copy;
everything else (pipeline, persistent loop, int4 load and widening, the decode, the SMEM
buffers and their barrier, bf16 wgmma, epilogue stores) is the code the GPU runs.  The
interpreter runs each warpgroup as an XLA CPU execution on XLA's CPU thread pool, whose size
is the core count: with fewer than 3 cores (``PJRT_NPROC`` unset) a kernel whose warpgroups
wait on each other hangs (tests/test_twinlog_gemm_hopper.py sets ``PJRT_NPROC``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.int_gemm_hopper import (SMEM_BUDGET, device_num_sms, output_tile, smem_transforms, store_tiles,
                                            wgmma_vector)

__all__ = ["TwinLogHopperConfig", "twinlog_gemm_hopper", "twinlog_hopper_config", "twinlog_hopper_operands",
           "decode_constants", "decode_twinlog_hopper_reference", "twinlog_gemm_hopper_reference",
           "twinlog_hopper_smem_bytes", "HOPPER_DECODE_REL_ERROR", "F32_DECODE_REL_ERROR", "MAIN_LOOP_INSTRUCTION"]

#: Relative error of the float32 decode (before the bf16 rounding) against float64 eq. 7.
F32_DECODE_REL_ERROR = 2.0 ** -19
#: Relative error of a decoded bf16 weight against eq. 7: bf16 rounding (2^-8) + the float32 decode.
HOPPER_DECODE_REL_ERROR = 2.0 ** -8 + 2.0 ** -18
#: The main loop's tensor-core instruction, from the code (``plgpu.wgmma`` of two bf16 SMEM
#: operands into a float32 accumulator; N = the consumer's ``tile_n``).
MAIN_LOOP_INSTRUCTION = "wgmma.mma_async.sync.aligned.m64nNk16.f32.bf16.bf16"

_FACTOR_BITS = (1, 2, 4)


# --------------------------------------------------------------------------- operands + references
def decode_constants(step: jax.Array, offset: jax.Array) -> jax.Array:
    """float32 ``[8, N]`` decode constants from ``step, offset [2, N]`` (row 0 positive side,
    row 1 negative; ``pallas_kernels.twinlog_gemm.kernel_table``): rows ``A⁺, B1⁺, B2⁺, B4⁺,
    A⁻, B1⁻, B2⁻, B4⁻`` with ``A⁺ = 2^(o⁺ − s⁺)``, ``B_j⁺ = 2^(j s⁺)``, ``A⁻ = −2^(o⁻ + 7 s⁻)``,
    ``B_j⁻ = 2^(−j s⁻)`` (module docstring)."""
    step = jnp.asarray(step, jnp.float32)
    offset = jnp.asarray(offset, jnp.float32)
    sp, sn, op, on = step[0], step[1], offset[0], offset[1]
    rows = [jnp.exp2(op - sp)] + [jnp.exp2(j * sp) for j in _FACTOR_BITS]
    rows += [-jnp.exp2(on + 7.0 * sn)] + [jnp.exp2(-j * sn) for j in _FACTOR_BITS]
    return jnp.stack(rows)


def twinlog_hopper_operands(wq: jax.Array, step: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(wt, consts)``: the codes of ``wq`` (uint8 ``[K, N/2]``, two per byte along N, element
    2i in the low nibble) K-major as ``jnp.int4 [N, K]``, and :func:`decode_constants` ``[8, N]``.
    (A layer stored this way needs no per-call conversion.)"""
    p = wq.astype(jnp.int32)
    u = jnp.stack([p & 0xF, (p >> 4) & 0xF], axis=-1).reshape(wq.shape[0], 2 * wq.shape[1])  # [K, N] in [0, 16)
    c = jnp.where(u >= 8, u - 16, u)
    return c.T.astype(jnp.int4), decode_constants(step, offset)


def _decode(c, consts, bcast):
    """float32 weights of the int16 codes ``c``; ``consts`` the 8 per-column rows, each made
    the shape of ``c`` by ``bcast`` (the kernel's and the reference's one formula)."""
    neg = c < 0
    side = lambda i: jnp.where(neg, bcast(consts[4 + i]), bcast(consts[i]))  # noqa: E731
    w = side(0)
    for i, bit in enumerate(_FACTOR_BITS, start=1):
        w = w * jnp.where((c & bit) != 0, side(i), jnp.float32(1.0))
    return jnp.where(c == 0, jnp.float32(0.0), w)


def decode_twinlog_hopper_reference(wt: jax.Array, consts: jax.Array, dtype=jnp.bfloat16) -> jax.Array:
    """The kernel's decoded weights, ``[K, N]`` in ``dtype`` (float32: before the bf16 rounding).

    wt: ``jnp.int4 [N, K]`` codes; consts: float32 ``[8, N]`` (:func:`decode_constants`)."""
    c = wt.astype(jnp.int16)
    n = c.shape[0]
    w = _decode(c, [consts[i].astype(jnp.float32) for i in range(8)], lambda r: r.reshape(n, 1))
    return w.T.astype(dtype)


def twinlog_gemm_hopper_reference(xq: jax.Array, sx: jax.Array, wt: jax.Array, consts: jax.Array, *,
                                  bias: Optional[jax.Array] = None, out_dtype=jnp.bfloat16) -> jax.Array:
    """:func:`twinlog_gemm_hopper`'s semantics in float32: ``(xq · bf16(Ŵ)) · sx + bias``.

    xq: ``[M, K]`` integer-valued activation codes (bf16 or int8); sx: float32 ``[M]`` (or
    ``[M, 1]``); wt: ``jnp.int4 [N, K]``; consts: ``[8, N]``; bias ``[N]``.  ``out_dtype [M, N]``.
    """
    w = decode_twinlog_hopper_reference(wt, consts, jnp.bfloat16).astype(jnp.float32)
    y = jnp.dot(xq.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    y = y * sx.astype(jnp.float32).reshape(-1, 1)
    if bias is not None:
        y = y + bias.astype(jnp.float32).reshape(1, -1)
    return y.astype(out_dtype)


# --------------------------------------------------------------------------- tuning config
@dataclasses.dataclass(frozen=True)
class TwinLogHopperConfig:
    """Tiles and launch parameters of :func:`twinlog_gemm_hopper` (frozen: a static jit argument).

    tile_m, tile_n: one consumer warpgroup's float32 accumulator (multiples of 64; the CTA
      tile is ``tile_m × 2·tile_n``, or ``2·tile_m × tile_n`` with ``wg_dim="m"``).
    tile_k: K per pipeline step (a multiple of 64: a bf16 row of 64 takes the 128-byte
      swizzle, an int4 row of 64 the smallest TMA swizzle, 32 bytes).
    max_concurrent_steps: pipeline depth (lowered inside until the SMEM fits,
      :func:`twinlog_hopper_smem_bytes`).
    epi_tile_m, epi_tile_n: the epilogue's SMEM → HBM store tile.
    grid_tile_width: the planar snake's band width over the output tiles.
    wg_dim: "n", "m" or "auto" (m with ``shared_decode``, else n when N divides by ``2·tile_n``).
    shared_decode: the two consumers (warpgroups split along M, which read the same weight
      tile) take turns decoding it into three shared SMEM buffers, meeting at a barrier every
      step: one decode per weight element for the CTA's ``2·tile_m`` rows instead of two.
    decode_rows: weight rows decoded at a time (a multiple of 64 dividing ``tile_n``), so that
      the decode's float32 temporaries fit beside the accumulator in registers.
    num_sms: CTAs of the persistent grid (None: :func:`device_num_sms`, or in interpret mode
      at most 2, as the interpreter simulates every CTA).
    interpret: None, or the Mosaic GPU interpreter's params
      (:func:`pallas_kernels.int_gemm_hopper.gpu_interpret_params`).
    """

    tile_m: int = 128
    tile_n: int = 128
    tile_k: int = 64
    max_concurrent_steps: int = 4
    epi_tile_m: int = 64
    epi_tile_n: int = 64
    grid_tile_width: int = 8
    wg_dim: str = "auto"
    shared_decode: bool = False
    decode_rows: int = 64
    num_sms: Optional[int] = None
    interpret: Any = None


def twinlog_hopper_config(m: int, n: int, *, num_sms: int = 132, interpret: Any = None) -> TwinLogHopperConfig:
    """The config for ``m`` rows and ``n`` columns (an unmeasured rule): at ≤ 128 rows each
    consumer decodes its own tile (``tile_m`` 64 at ≤ 64 rows: less padding); above, the
    shared decode over a 256-row CTA.  ``tile_n`` 64 instead of 128 when 128 would leave more
    than a quarter of the ``num_sms`` SMs without an output tile."""
    shared = m > 128
    tm = 64 if m <= 64 else 128

    def tiles(tn):
        by_n = not shared and n % (2 * tn) == 0
        cta_m, cta_n = (tm, 2 * tn) if by_n else (2 * tm, tn)
        return -(-m // cta_m) * (n // cta_n)
    tn = 64 if n % 128 == 0 and tiles(128) < 0.75 * num_sms else 128
    return TwinLogHopperConfig(tile_m=tm, tile_n=tn, shared_decode=shared, interpret=interpret)


def twinlog_hopper_smem_bytes(steps: int, *, cta_m: int, cta_n: int, tile_n: int, tile_k: int, out_slots: int,
                              out_bytes: int, shared: bool = False) -> int:
    """Shared memory of one CTA on the GPU with ``steps`` pipeline stages, barriers aside: the
    bf16 X and int4 W stages, the decoded bf16 tiles (two per consumer, or three shared) and
    the epilogue's tiles (``out_slots`` elements each, two per consumer).  (The interpreter's
    transpose buffers come on top; it runs the GPU's pipeline depth and has no SMEM limit.)"""
    per_step = 2 * cta_m * tile_k + cta_n * tile_k // 2
    fixed = (3 if shared else 4) * tile_n * tile_k * 2 + 2 * out_slots * out_bytes
    return fixed + steps * per_step


class _Plan(NamedTuple):
    """Static shape decisions of one call (from :func:`_plan`)."""

    wg_dim: str
    cta_m: int
    cta_n: int
    m_pad: int
    steps: int
    epi_m: int
    epi_n: int
    out_slots: int


def _plan(m: int, n: int, k: int, c: TwinLogHopperConfig, out_dtype) -> _Plan:
    """Checks the tiles against ``(m, n, k)`` and picks the warpgroup split, the padded rows
    and the deepest pipeline that fits :data:`SMEM_BUDGET`."""
    tile_m, tile_n, tile_k = c.tile_m, c.tile_n, c.tile_k
    if tile_m % 64 or tile_n % 64 or tile_k % 64 or c.decode_rows % 64 or tile_n % c.decode_rows:
        raise ValueError(f"tiles {(tile_m, tile_n, tile_k)} must be multiples of 64, and tile_n of "
                         f"decode_rows={c.decode_rows} (itself a multiple of 64)")
    wg_dim = c.wg_dim if c.wg_dim != "auto" else ("m" if c.shared_decode or n % (2 * tile_n) else "n")
    if c.shared_decode and wg_dim != "m":
        raise ValueError("shared_decode needs the warpgroups split along M (wg_dim='m')")
    cta_m, cta_n = (tile_m, 2 * tile_n) if wg_dim == "n" else (2 * tile_m, tile_n)
    if n % cta_n or k % tile_k:
        raise ValueError(f"N, K = {(n, k)} not divisible by the CTA tile's {(cta_n, tile_k)}")
    epi_m, epi_n = min(c.epi_tile_m, tile_m), min(c.epi_tile_n, tile_n)
    out_slots = min(2, (tile_m * tile_n) // (epi_m * epi_n))
    smem = functools.partial(twinlog_hopper_smem_bytes, cta_m=cta_m, cta_n=cta_n, tile_n=tile_n, tile_k=tile_k,
                             out_slots=out_slots * epi_m * epi_n, out_bytes=jnp.dtype(out_dtype).itemsize,
                             shared=c.shared_decode)
    steps = c.max_concurrent_steps
    while steps > 2 and smem(steps) > SMEM_BUDGET:
        steps -= 1
    if smem(steps) > SMEM_BUDGET:
        raise ValueError(f"tiles {(tile_m, tile_n, tile_k)} need {smem(steps)} B of SMEM > {SMEM_BUDGET}")
    return _Plan(wg_dim, cta_m, cta_n, -(-m // cta_m) * cta_m, steps, epi_m, epi_n, out_slots)


# --------------------------------------------------------------------------- kernel
def _kernel_fn(c: TwinLogHopperConfig, p: _Plan, *, k_iters: int, mn_iters: tuple[int, int], has_bias: bool,
               out_dtype):
    """The Mosaic GPU kernel body ``kernel(x, w, sx, consts, bias, out)`` (GMEM refs)."""
    tile_m, tile_n, tile_k, interpret, shared = c.tile_m, c.tile_n, c.tile_k, c.interpret, c.shared_decode
    cta_m, cta_n, epi_m, epi_n, chunk = p.cta_m, p.cta_n, p.epi_m, p.epi_n, c.decode_rows
    x_tr, w_tr = smem_transforms(tile_k, 16), smem_transforms(tile_k, 4)
    out_tr = smem_transforms(epi_n, 8 * jnp.dtype(out_dtype).itemsize)
    shape = (tile_m, tile_n)
    vec_load = functools.partial(wgmma_vector, interpret=interpret)

    def kernel(x_gmem, w_gmem, sx_gmem, k_gmem, b_gmem, out_gmem):
        specs = [plgpu.BlockSpec((cta_m, tile_k), lambda kk: (0, kk), transforms=x_tr,
                                 memory_space=plgpu.SMEM, delay_release=1),
                 plgpu.BlockSpec((cta_n, tile_k), lambda kk: (0, kk), transforms=w_tr,
                                 memory_space=plgpu.SMEM, delay_release=1)]

        def get_pipeline(pipeline_body, compute_context):
            return plgpu.emit_pipeline_warp_specialized(
                pipeline_body, grid=(k_iters,), memory_registers=40, in_specs=specs,
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=p.steps,
                compute_context=compute_context)

        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
            out_smem=plgpu.SMEM((2, p.out_slots, epi_m, epi_n), out_dtype, transforms=out_tr),
            wd_smem=plgpu.SMEM((3, tile_n, tile_k) if shared else (2, 2, tile_n, tile_k), jnp.bfloat16,
                               transforms=x_tr),
            dec_bar=plgpu.Barrier(num_arrivals=2) if shared else None,
            tr_smem=plgpu.SMEM((2, tile_k, tile_n), jnp.bfloat16) if interpret else None,
            collective_axes="wg")
        def _scope(pipeline_allocs, out_smem, wd_smem, dec_bar, tr_smem):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((mn_iters[0] * mn_iters[1],), collective_axes="sm")
            def _mn_loop(info):
                (lin,) = info.index
                _, cm, cn, wm, wn = output_tile(lin, mn_iters, c.grid_tile_width, wg, cta_m=cta_m, cta_n=cta_n,
                                                tile_m=tile_m, tile_n=tile_n, wg_dim=p.wg_dim)

                def epilogue(y):
                    """f32 ``y [tile_m, tile_n]`` (scaled) + bias → ``out_dtype`` → SMEM → HBM."""
                    if has_bias:
                        bcol = vec_load(b_gmem.at[cn].at[wn], 0, gmem=True)
                        y = y + lax.broadcast_in_dim(bcol, shape, [1])
                    store_tiles(y.astype(out_dtype), out_smem, out_gmem.at[cm, cn].at[wm, wn], wg,
                                epi_m=epi_m, epi_n=epi_n)

                def decode_constant_rows():
                    """Per chunk of ``chunk`` weight rows of this warpgroup, the 8 decode-constant
                    rows (f32), loaded once per output tile in the layout that broadcasts along K."""
                    kc = k_gmem.at[:, cn].at[:, wn]
                    return tuple(tuple(vec_load(kc.at[i, pl.ds(r0, chunk)], 1, gmem=True) for i in range(8))
                                 for r0 in range(0, tile_n, chunk))

                def decode_to(dst, w_smem, rows):
                    """This step's int4 ``[tile_n, tile_k]`` weight tile → bf16 in registers → ``dst``,
                    ``chunk`` rows at a time."""
                    for ci, r0 in enumerate(range(0, tile_n, chunk)):
                        part = pl.ds(r0, chunk)
                        codes = w_smem.at[wn].at[part][...].astype(jnp.int8).astype(jnp.int16)
                        w = _decode(codes, rows[ci], lambda r: lax.broadcast_in_dim(r, (chunk, tile_k), [0]))
                        dst.at[part][...] = w.astype(jnp.bfloat16)
                    plgpu.commit_smem()

                def decoded_operand(step, w_smem, rows):
                    """The decoded weight tile in SMEM as wgmma's B ``[tile_k, tile_n]`` (a K-major
                    view).  Own buffers: this warpgroup's, of this parity.  Shared: the warpgroups
                    take turns (step parity) decoding into one of three buffers and meet at
                    ``dec_bar`` every step."""
                    if shared:
                        # three buffers: a warpgroup decoding step j has passed barrier j − 1, so
                        # the other one may still run its wgmmas of steps j − 2 and j − 1, not j − 3
                        dst = wd_smem.at[lax.rem(step, 3)]
                        pl.when(lax.rem(step, 2) == wg)(lambda: decode_to(dst, w_smem, rows))
                        plgpu.barrier_arrive(dec_bar)
                        plgpu.barrier_wait(dec_bar)
                    else:
                        dst = wd_smem.at[wg, lax.rem(step, 2)]
                        decode_to(dst, w_smem, rows)
                    if not interpret:
                        return plgpu.transpose_ref(dst, (1, 0))
                    tr = tr_smem.at[wg]  # the GPU interpreter's wgmma takes no transposed refs
                    tr[...] = dst[...].T
                    return tr

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(shape, jnp.float32))
                    def _acc_scope(acc_ref):
                        eval_pipeline((acc_ref, decode_constant_rows()))
                        srow = vec_load(sx_gmem.at[cm].at[wm], 1, gmem=True)
                        epilogue(acc_ref[...] * lax.broadcast_in_dim(srow, shape, [0]))

                def mma_body(idx, x_smem, w_smem, carry):
                    acc_ref, rows = carry
                    # the step count runs on over this CTA's tiles: the shared buffers' rotation
                    # and turn must not restart while the other warpgroup finishes a tile
                    step = info.local_index * k_iters + idx[0] if shared else idx[0]
                    plgpu.wgmma(acc_ref, x_smem.at[wm], decoded_operand(step, w_smem, rows))
                    plgpu.wgmma_wait(1)
                    return carry

                get_pipeline(mma_body, compute_context)(x_gmem.at[cm, :], w_gmem.at[cn, :],
                                                        allocations=pipeline_allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    return kernel


@functools.partial(jax.jit, static_argnames=("out_dtype", "config"))
def twinlog_gemm_hopper(xq: jax.Array, sx: jax.Array, wt: jax.Array, consts: jax.Array, *,
                        bias: Optional[jax.Array] = None, out_dtype=jnp.bfloat16,
                        config: TwinLogHopperConfig = TwinLogHopperConfig()) -> jax.Array:
    """Persistent warp-specialized twin-log GEMM on Hopper (bf16 wgmma; module docstring).

    ``y = (xq @ Ŵ) · sx[:, None] + bias``, ``Ŵ = bf16(decode(wt, consts))`` ``[K, N]``
    (:func:`twinlog_gemm_hopper_reference`).

    Args:
      xq: ``[M, K]`` activation codes: bf16 (integer values, e.g. int8 codes converted), or
        int8 (converted to bf16 here, one XLA pass).
      sx: float32 per-token scales ``[M]`` or ``[M, 1]``.
      wt: ``jnp.int4 [N, K]`` twin-log codes, K-major (:func:`twinlog_hopper_operands`).
      consts: float32 ``[8, N]`` decode constants (:func:`decode_constants`).
      bias: ``[N]`` or None.  out_dtype: bf16 (default) or float32.
    Returns ``out_dtype [M, N]``.  N must be a multiple of the CTA tile's columns and K of
    ``tile_k``; any M (rows are zero-padded to the CTA tile inside and sliced off).  Jitted
    (static: ``out_dtype``, ``config``).
    """
    m, k = xq.shape
    n = wt.shape[0]
    if wt.shape != (n, k) or wt.dtype != jnp.int4 or consts.shape != (8, n):
        raise ValueError(f"twinlog_gemm_hopper: wt {wt.shape} {wt.dtype} must be jnp.int4 [N, K] = [{n}, {k}] "
                         f"and consts {consts.shape} [8, N]")
    c = config
    p = _plan(m, n, k, c, out_dtype)
    xq = xq.astype(jnp.bfloat16)
    sx = sx.astype(jnp.float32).reshape(m)
    if p.m_pad != m:  # zero rows up to the CTA tile (zero codes → zero rows, sliced off)
        xq = jnp.pad(xq, ((0, p.m_pad - m), (0, 0)))
        sx = jnp.pad(sx, (0, p.m_pad - m))
    mn_iters = (p.m_pad // p.cta_m, n // p.cta_n)
    kernel = _kernel_fn(c, p, k_iters=k // c.tile_k, mn_iters=mn_iters, has_bias=bias is not None,
                        out_dtype=out_dtype)
    num_sms = c.num_sms or (min(2, mn_iters[0] * mn_iters[1]) if c.interpret else device_num_sms())
    b = jnp.zeros((n,), jnp.float32) if bias is None else bias.astype(jnp.float32).reshape(n)
    f = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((p.m_pad, n), out_dtype), grid=(num_sms,), grid_names=("sm",),
        num_threads=3, thread_name="wg", interpret=c.interpret,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return f(xq, wt, sx, consts.astype(jnp.float32), b)[:m]
