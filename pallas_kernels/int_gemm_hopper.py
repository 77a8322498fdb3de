"""Hopper (sm_90a) integer GEMM through the Pallas Mosaic GPU backend.

* :func:`int8_gemm_ws`, tuned by :class:`HopperGemmConfig` (frozen, hashable), as jax's
  ``hopper_matmul_mgpu`` example takes its ``TuningConfig``; :func:`pick_tile_n` (the
  H100-measured ``tile_n`` rule), :func:`device_num_sms`, :func:`gpu_interpret_params`,
  :func:`smem_bytes`.
* Reference: :func:`pallas_kernels.int_gemm.int_gemm_reference` (imported here as
  ``int_gemm_reference``), given the same codes as int8 ``[K, N]``
  (``wt.T.astype(jnp.int8)``), ``sx`` as ``[M, 1]`` / ``[M, G]`` and ``sw`` as
  ``[1, N]`` / ``[G, N]``.

:func:`int8_gemm_ws`: ``wgmma.mma_async ... .s32.s8.s8`` (integer tensor cores, int32
accumulator in registers) fed by a TMA multi-stage shared-memory pipeline, one producer
and two consumer warpgroups, persistent over the output tiles.  8-bit wgmma needs both
operands K-major in shared memory, so the weight comes K-major, ``wt = W^T [N, K]``
(int8, or ``jnp.int4`` unpacked to int8 in the kernel), viewed as ``[K, N]`` through
``plgpu.transpose_ref``.  Fused epilogue in registers: scales, bias, the low-rank
up-projection (second wgmma, bf16); then bf16 through shared memory and TMA stores.

On CPU the kernel runs in jax's Mosaic GPU interpreter (``config=HopperGemmConfig(interpret=gpu_interpret_params())``,
small shapes): the CPU tests compare it with :func:`int_gemm_reference`.  The
interpreter has no rule for ``plgpu.load`` or for transposed wgmma operands, so in
interpret mode those two steps are a plain ref read and an explicit SMEM transpose;
everything else (pipeline, persistent loop, int4 → int8, group scales, low-rank wgmma,
epilogue stores) is the code the GPU runs.  On the GPU, ``bench/bench_kernels.py``
checks every row against the reference (``rel_err_vs_ref``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import weight_colsum
from pallas_kernels.int_gemm import int_gemm_reference

__all__ = ["HopperGemmConfig", "int8_gemm_ws", "int_gemm_reference", "pick_tile_n", "device_num_sms",
           "gpu_interpret_params", "smem_bytes", "progressive_expand_reference", "progressive_gemm_reference",
           "SMEM_BUDGET", "smem_transforms", "wgmma_vector", "lowrank_alias_rows"]


#: Shared memory one CTA may use on sm_90 (232448 B, as Mosaic GPU reports it), less
#: room for the pipeline's barriers.
SMEM_BUDGET = 232448 - 2048


def lowrank_alias_rows(*, tile_m: int, tile_n: int, rank: int, store_tile: int, slots: int,
                       out_bytes: int) -> tuple[int, int]:
    """``(rows, slots)``: one consumer's low-rank operand buffer ``[rows, rank]`` bf16 (its
    ``xa`` tile in rows ``[0, tile_m)``, its ``l2ᵀ`` tile in ``[tile_m, tile_m + tile_n)``)
    and its epilogue buffer of ``slots`` store tiles of ``store_tile`` elements (at least the
    ``slots`` it uses), padded to the same bytes, so that warpgroup ``w``'s two views of the
    aliased shared memory (``plgpu.RefUnion``) cover the same byte range and neither
    warpgroup's loads can overwrite the other's epilogue tiles."""
    tile_bytes = store_tile * out_bytes
    need = max((tile_m + tile_n) * rank * 2, slots * tile_bytes)
    unit = math.lcm(8 * rank * 2, tile_bytes)  # whole 8-row tiles of the operand, whole store tiles
    per_wg = -(-need // unit) * unit
    return per_wg // (rank * 2), per_wg // tile_bytes


def smem_bytes(steps: int, *, cta_m: int, cta_n: int, tile_m: int, tile_n: int, tile_k: int, w4: bool,
               grouped: bool, rank: int, out_slots: int, out_bytes: int, interpret: bool = False,
               progressive: bool = False, lr_alias: bool = False, store_tile: int = 0,
               res_tile_bytes: int = 0) -> int:
    """Shared memory of one :func:`int8_gemm_ws` CTA with ``steps`` pipeline stages, barriers
    aside: the X/W (and scale-row, or progressive zero/scale-row) stages, the double-buffered
    epilogue tiles (``out_slots`` elements per warpgroup), the low-rank operand tiles (in the
    epilogue tiles' bytes with ``lr_alias``, given ``store_tile`` elements per store tile:
    :func:`lowrank_alias_rows`), the residual tiles read by TMA (``res_tile_bytes`` per
    warpgroup), the int4 → int8 weight tiles, and the interpreter's transpose buffers."""
    per_step = (cta_m * tile_k + cta_n * tile_k // (2 if w4 else 1) + (4 * (cta_m + cta_n) if grouped else 0)
                + (2 * cta_n if progressive else 0))
    if rank and lr_alias:
        rows, _ = lowrank_alias_rows(tile_m=tile_m, tile_n=tile_n, rank=rank, store_tile=store_tile,
                                     slots=out_slots // store_tile, out_bytes=out_bytes)
        epi = 2 * rows * rank * 2
    else:
        epi = 2 * out_slots * out_bytes + (2 * (tile_m + tile_n) * rank * 2 if rank else 0)
    fixed = (epi + 2 * res_tile_bytes
             + (2 * 2 * tile_n * tile_k if w4 or progressive else 0)
             + (2 * tile_k * tile_n + 2 * max(rank, 16) * tile_n * 2 if interpret else 0))
    return fixed + steps * per_step


def progressive_expand_reference(wt: jax.Array, w_zero: jax.Array, w_gscale: jax.Array) -> jax.Array:
    """The progressive-group weight expansion: int8 ``[N, K]`` ``(wt − w_zero) · w_gscale``.

    wt: ``jnp.int4`` (or int8) ``[N, K]`` codes, K-major; w_zero, w_gscale: int8 ``[G, N]``,
    one per group of ``K / G`` input channels and output channel.  Computed in int32 and
    narrowed (QServe's format keeps the product in [-128, 127] by construction)."""
    n, k = wt.shape
    g = k // w_zero.shape[0]
    z = jnp.repeat(w_zero.astype(jnp.int32).T, g, axis=1)
    s = jnp.repeat(w_gscale.astype(jnp.int32).T, g, axis=1)
    return ((wt.astype(jnp.int32) - z) * s).astype(jnp.int8)


def progressive_gemm_reference(xq, wt, w_zero, w_gscale, sx, sw, *, bias=None, xa=None, l2=None,
                               out_dtype=jnp.bfloat16) -> jax.Array:
    """What :func:`int8_gemm_ws` computes with ``w_zero=``/``w_gscale=`` (QServe's W4A8):
    ``y = (xq @ w8ᵀ) · sx ⊗ sw + bias + xa @ l2`` with ``w8 = (wt − w_zero) · w_gscale``
    (:func:`progressive_expand_reference`), the int32 product exact; ``xq`` int8 ``[M, K]``,
    ``sx`` f32 ``[M]``, ``sw`` f32 ``[N]``; ``out_dtype [M, N]``."""
    w8 = progressive_expand_reference(wt, w_zero, w_gscale)
    return int_gemm_reference(xq, w8.T, sx.reshape(-1, 1), sw.reshape(1, -1), bias=bias, xa=xa, l2=l2,
                              out_dtype=out_dtype)


def gpu_interpret_params():
    """``HopperGemmConfig.interpret`` value that runs these kernels in jax's Mosaic GPU interpreter on CPU
    (jax ≥ 0.10: simulated SMEM, barriers, TMA and wgmma), or None if this jax has none."""
    try:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except Exception:  # pragma: no cover
        return None
    # (16 TMA threads let one progressive-group case run, but a full suite run hung with them;
    # the default is kept: see pallas_kernels/NOTES.md, progressive-group section)
    return InterpretGPUParams()


def smem_transforms(minor_elems: int, bits: int):
    """Tiling + swizzle of a shared-memory tile whose rows hold ``minor_elems`` values of ``bits``
    bits: the largest swizzle dividing the row (128 bytes where it fits)."""
    swizzle = plgpu.find_swizzle(minor_elems * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def wgmma_vector(ref, reduced_dim: int, *, interpret, gmem: bool = False):
    """A row (``reduced_dim=1``) / column (0) vector of scales or bias in the layout that
    broadcasts over a WGMMA accumulator.  (The GPU interpreter has no rule for ``plgpu.load``.)"""
    if interpret:
        return ref[...]
    return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(reduced_dim), optimized=not gmem)


def output_tile(lin, iters: tuple, grid_tile_width: int, wg, *, cta_m: int, cta_n: int, tile_m: int,
                tile_n: int, wg_dim: str):
    """The persistent grid's ``lin``-th output tile (a planar snake over ``iters`` = (M, N) CTA
    tiles): ``(mi, cm, cn, wm, wn)`` — its M tile index, its CTA rows and columns, and warpgroup
    ``wg``'s rows and columns within them (split along N or M by ``wg_dim``).  Inside a kernel."""
    mi, ni = plgpu.planar_snake(lin, iters, 1, grid_tile_width)
    cm, cn = pl.ds(mi * cta_m, cta_m), pl.ds(ni * cta_n, cta_n)
    if wg_dim == "n":
        return mi, cm, cn, slice(None), pl.ds(wg * tile_n, tile_n)
    return mi, cm, cn, pl.ds(wg * tile_m, tile_m), slice(None)


def store_tiles(y, out_smem, dst, wg, *, epi_m: int, epi_n: int, add=None, out_dtype=None):
    """Write a warpgroup's ``y [tile_m, tile_n]`` (``out_dtype``) to ``dst`` (its HBM tile)
    through the two ``out_smem[wg, slot]`` store tiles of ``[epi_m, epi_n]``, alternating slots
    so one TMA store is in flight while the next tile is written.  Inside a Mosaic GPU kernel.
    ``add(rows, j)``: an f32 ``[epi_m, epi_n]`` term added to store tile (rows, column tile j) of
    an f32 ``y`` before its cast to ``out_dtype``."""
    tile_m, tile_n = y.shape
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for emi in range(tile_m // epi_m):
        for eni in range(tile_n // epi_n):
            es_m = slice(emi * epi_m, (emi + 1) * epi_m)
            es_n = slice(eni * epi_n, (eni + 1) * epi_n)
            slot = (emi * (tile_n // epi_n) + eni) % 2
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)
            t = y[es_m, es_n]
            out_smem[wg, slot] = t if add is None else (t + add(es_m, eni)).astype(out_dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg, slot], dst.at[es_m, es_n])


def device_num_sms() -> int:
    """Streaming multiprocessors of the default device (132 on an H100 SXM when unknown)."""
    return getattr(jax.devices()[0], "core_count", None) or 132


def pick_tile_n(m: int, n: int, *, num_sms: int, margin: float = 0.75) -> int:
    """``tile_n`` for the plain (per-channel, no second accumulator) :func:`int8_gemm_ws`.

    128 (CTA tile 128×256, or 256×128 with warpgroups split along M) unless 64 needs at
    most ``margin`` of the wave-quantized work ``ceil(tiles / num_sms) · tile area``: at
    small M the 128 tiles leave SMs idle.  H100 (bench/results/kernels_h100_run3.json):
    M=512 DiT qkv 0.0085 vs 0.0116 ms and proj 0.0077 vs 0.0108 ms with 64; fc1 (equal
    work) 0.0118 vs 0.0123 and M=8192 fc2 (64's work 0.83×) 0.0789 vs 0.0833 ms with 128.
    """
    def work(tn):
        cta_m, cta_n = (128, 2 * tn) if n % (2 * tn) == 0 else (256, tn)
        tiles = -(-m // cta_m) * (n // cta_n)
        return -(-tiles // num_sms) * cta_m * cta_n
    if n % 128 == 0 and work(64) <= margin * work(128):
        return 64
    return 128


@dataclasses.dataclass(frozen=True)
class HopperGemmConfig:
    """Tiles and launch parameters of :func:`int8_gemm_ws` (frozen: a static jit argument).

    tile_m, tile_n: one consumer warpgroup's accumulator (the CTA tile is
      ``tile_m × 2·tile_n``, or ``2·tile_m × tile_n`` with warpgroups split along M);
      ``tile_n`` None = the kernel's own rule (64 with group scales or a second low-rank
      accumulator, else 128; :func:`pick_tile_n` gives the measured choice for the plain case).
    tile_k: K per pipeline step (None = 128; group scales make it the group size, 64 or 128).
    max_concurrent_steps: pipeline depth (lowered inside until the SMEM fits, :func:`smem_bytes`).
    epi_tile_n, epi_tile_m: the epilogue's SMEM → HBM store tile.
    grid_tile_width: the planar snake's band width over the output tiles.
    wg_dim: "n", "m" or "auto" (n when N divides by ``2·tile_n``).
    num_sms: CTAs of the persistent grid (None = :func:`device_num_sms`).
    lr_in_acc: add the low-rank product into the scaled f32 result (no second accumulator).
    lr_smem: "alias" (the low-rank operand tiles share the epilogue store tiles' shared memory,
      a ``plgpu.RefUnion``: their lifetimes are disjoint, so the pipeline keeps its depth) or
      "separate" (their own buffers: at ``tile_n`` 128 the pipeline loses a stage).  The GPU
      interpreter has no rule for aliased refs: interpret mode always uses "separate".
    res_load: how the epilogue reads ``residual``: "direct" (each thread loads its fragment
      from HBM in the WGMMA layout after the main loop: uncoalesced, nothing to hide it) or
      "tma" (the tile is copied into its own shared memory when the output tile starts, under
      the main loop, and read from there: ``2 · tile_m · tile_n`` more bytes, which can cost a
      pipeline stage, :func:`smem_bytes`).
    mma_in_flight: wgmma groups a consumer leaves in flight per K-step (``wgmma_wait``), and so
      how many steps later it releases an operand slot (the pipeline's ``delay_release``): 1
      overlaps consecutive K-steps' MMAs; 0 waits for each (see pallas_kernels/NOTES.md: the
      interpreter's multi-tile failures vanish at 0; its cost on the GPU is not yet measured).
    interpret: None, or the Mosaic GPU interpreter's params (:func:`gpu_interpret_params`).
    """

    tile_m: int = 128
    tile_n: Optional[int] = None
    tile_k: Optional[int] = None
    max_concurrent_steps: int = 4
    epi_tile_n: int = 64
    epi_tile_m: int = 64
    grid_tile_width: int = 8
    wg_dim: str = "auto"
    num_sms: Optional[int] = None
    lr_in_acc: bool = False
    lr_smem: str = "alias"
    res_load: str = "direct"
    mma_in_flight: int = 1
    interpret: Any = None

    def __post_init__(self):
        if self.lr_smem not in ("alias", "separate"):
            raise ValueError(f"lr_smem must be 'alias' or 'separate', got {self.lr_smem!r}")
        if self.res_load not in ("direct", "tma"):
            raise ValueError(f"res_load must be 'direct' or 'tma', got {self.res_load!r}")
        if self.mma_in_flight not in (0, 1):
            raise ValueError(f"mma_in_flight must be 0 or 1, got {self.mma_in_flight!r}")


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "activation"))
def int8_gemm_ws(xq, wt, sx, sw, *, bias=None, xa=None, l2=None, x_zero=None, w_colsum=None, gate=None,
                 residual=None, w_zero=None, w_gscale=None, activation=None, out_dtype=jnp.bfloat16,
                 config: HopperGemmConfig = HopperGemmConfig()):
    """Persistent, warp-specialized W8A8 / W4A8 / W4A4 GEMM on Hopper (``wgmma ... .s32.s8.s8``).

    ``y = Σ_g (xq[:, g] @ wt[:, g].T) · sx[:, g] · sw[g] + bias + xa @ l2``,
    ``bf16 [M, N] = residual + gate · act(y)`` (each term optional; :func:`int_gemm_reference`)

    Jitted (static: ``out_dtype``, ``config``; :class:`HopperGemmConfig` holds every tuning
    knob), so a model calling it from many layers of one shape lowers it once.

    N must be a multiple of the CTA tile's columns and K of ``tile_k``; any M works (rows
    are zero-padded to the CTA tile inside and the output sliced back).

    Args:
      xq: int8 ``[M, K]`` activation codes (8- or 4-bit values), or float8_e4m3fn codes (FP8
        W8A8: ``wt`` float8_e4m3fn ``[N, K]`` too, per-token × per-channel scales, no zero
        points; ``wgmma ... .f32.e4m3.e4m3`` into an f32 accumulator, the same epilogue).
      wt: the weight codes K-major, ``[N, K]``: int8, or ``jnp.int4`` (two codes per
        byte in memory; unpacked to int8 in the kernel, see below).
      sx: f32 per-token scales ``[M]``, or ``[M, G]`` per (token, group of K/G channels).
      sw: f32 per-channel scales ``[N]``, or ``[G, N]`` per group.
      bias: f32 ``[N]`` or None.  xa ``[M, r]``, l2 ``[r, N]`` (bf16, r % 16 == 0):
        the low-rank branch, fused as one more wgmma (see below).
      x_zero: f32 ``[M]`` zero points of asymmetric per-token activation codes (shifted to
        int8, :func:`pallas_kernels.quantize_act.quantize_act_reference`), or None; the epilogue
        subtracts ``x_zero ⊗ w_colsum`` from the int32 accumulator before the scales.
        w_colsum: f32 ``[N]`` Σ_k of the weight codes (computed here when None).
      gate: ``[B, N]`` per-sample gate (DiT's ``gate_msa``/``gate_mlp``): row m uses
        ``gate[m // (M / B)]``; the tokens per sample ``M / B`` must be a multiple of the
        CTA tile's rows (128, or 256 with warpgroups split along M).  residual: ``[M, N]``.
      activation: None or "gelu_tanh" (``jax.nn.gelu(y, approximate=True)`` on the f32 ``y``
        in registers, before the gate; DiT's MLP fc1).
      w_zero, w_gscale: int8 ``[G, N]``: QServe's progressive-group W4A8 (reference
        :func:`progressive_gemm_reference`).  The weight the GEMM multiplies is
        ``w8 = (wt − w_zero) · w_gscale`` per group of ``K / G`` input channels (64 or 128),
        with ``wt`` ``jnp.int4`` and ``sx [M]``, ``sw [N]`` per token / per channel: the
        group's integer zero and scale are applied while each consumer expands its int4
        tile to int8 (``tile_k`` = the group), the zero/scale rows arriving through the
        operands' TMA pipeline, and the main loop is the W8A8 one (int32 accumulator,
        ``wgmma_wait(1)``, scales once in the epilogue): no per-group float rescale.
    Instructions: the main loop is ``wgmma.mma_async.sync.aligned.m64nNk32.s32.s8.s8``
    (dense) with both operands in swizzled shared memory.  int4 weights travel HBM→SMEM by TMA
    as 4-bit, each consumer warpgroup converts its ``[tile_n, tile_k]`` tile to int8 in
    registers (``prmt``/``lop3`` sequence of Mosaic GPU's i4→i8 cast) and stores it to a
    double-buffered SMEM tile the s8 wgmma reads (Hopper has no 4-bit MMA).  With group
    scales (G > 1) ``tile_k`` = K/G: each K-step's int32 product is waited for and added
    to an f32 register accumulator as ``part · sx[:, g] ⊗ sw[g]`` (the scales arrive with
    the operands through the same TMA pipeline).

    Structure of jax's ``hopper_matmul_mgpu`` example: one producer warpgroup issuing
    TMA loads, two consumer warpgroups each owning a ``tile_m × tile_n`` accumulator (CTA
    tile ``tile_m × 2·tile_n``, or ``2·tile_m × tile_n`` with ``wg_dim="m"``; "auto" picks
    n when N divides), a persistent grid of one CTA per SM walking the output tiles in a
    planar snake.  Low-rank branch: each consumer TMA-loads its ``xa`` rows and ``l2``
    columns at the start of a tile and after the main loop issues one bf16 wgmma (K = r)
    into a second f32 accumulator; ``tile_n`` defaults to 64 then (two 128×128
    accumulators would need 256 registers per thread): +22% over the plain tile_n-128
    GEMM on DiT fc1 on an H100.  ``lr_in_acc=True`` instead accumulates the low-rank
    product into the scaled f32 result itself (``ACC.init(y)``), with no second
    accumulator, so ``tile_n`` stays 128: on an H100 +13% on 8192³ and FLUX fc1/fc2 (second
    accumulator: +17% to +26%), but +25% at K=1152 (bench/results/kernels_h100_run3.json);
    the GPU interpreter has no ``run_state`` rule, so interpret mode uses the second accumulator.
    ``tile_n`` also defaults to 64 with group scales (the f32 carry and the int32 partial
    are both live), else 128.
    """
    tile_m, tile_n, tile_k = config.tile_m, config.tile_n, config.tile_k
    max_concurrent_steps, epi_tile_n, epi_tile_m = config.max_concurrent_steps, config.epi_tile_n, config.epi_tile_m
    grid_tile_width, wg_dim, num_sms = config.grid_tile_width, config.wg_dim, config.num_sms
    lr_in_acc, interpret, in_flight = config.lr_in_acc, config.interpret, config.mma_in_flight
    m, k = xq.shape
    n = wt.shape[0]
    has_lr = xa is not None
    w4 = wt.dtype == jnp.int4
    sx = sx.astype(jnp.float32)
    sw = sw.astype(jnp.float32)
    groups = max(sx.shape[1] if sx.ndim == 2 else 1, sw.shape[0] if sw.ndim == 2 else 1)
    grouped = groups > 1
    has_zero = x_zero is not None
    # FP8 W8A8: float8_e4m3fn operands, an f32 accumulator (wgmma ... .f32.e4m3.e4m3), the same epilogue
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"activation must be None or 'gelu_tanh', got {activation!r}")
    fp8 = xq.dtype == jnp.float8_e4m3fn
    if fp8 and (wt.dtype != jnp.float8_e4m3fn or grouped or has_zero):
        raise ValueError("FP8 operands: e4m3 activations and weights, per-token × per-channel scales, no zero points")
    code_dt = jnp.float8_e4m3fn if fp8 else jnp.int8
    pg = w_zero is not None  # progressive groups: integer zero/scale in the int4 → int8 expansion
    pg_pipe = False
    if pg:
        if (w_gscale is None or fp8 or grouped or w_zero.shape != w_gscale.shape or w_zero.shape[1] != n
                or wt.dtype not in (jnp.int4, jnp.int8)):
            raise ValueError("progressive groups: jnp.int4 (or int8) wt [N, K], w_zero and w_gscale int8 [G, N], "
                             "per-token sx [M] and per-channel sw [N]")
        pg_groups = w_zero.shape[0]
        if k % pg_groups or k // pg_groups not in (64, 128):
            raise ValueError(f"progressive group size K/G = {k}/{pg_groups} unsupported (64 or 128)")
        tile_k = k // pg_groups
        pg_pipe = True
        w_zero, w_gscale = w_zero.astype(jnp.int8), w_gscale.astype(jnp.int8)
        if has_zero and w_colsum is None:  # Σ_k of the expanded weight, not of the raw codes
            w_colsum = jnp.sum(progressive_expand_reference(wt, w_zero, w_gscale).astype(jnp.int32),
                               axis=1).astype(jnp.float32)
    has_gate, has_res = gate is not None, residual is not None
    if has_zero:
        if grouped:
            raise ValueError("activation zero points need per-token scales (one scale group)")
        if w_colsum is None:
            w_colsum = weight_colsum(wt, kmajor=True)
        x_zero = x_zero.reshape(m).astype(jnp.float32)
    if grouped:
        if k % groups:
            raise ValueError(f"K={k} is not a multiple of the {groups} scale groups")
        tile_k = k // groups
        if tile_k not in (64, 128):
            raise ValueError(f"group size {tile_k} unsupported (64 or 128)")
    tile_k = tile_k or 128
    if tile_n is None:
        tile_n = 64 if (grouped or (has_lr and not lr_in_acc)) else 128
    r = xa.shape[1] if has_lr else 0
    if wg_dim == "auto":
        wg_dim = "n" if n % (2 * tile_n) == 0 else "m"
    cta_m, cta_n = (tile_m, 2 * tile_n) if wg_dim == "n" else (2 * tile_m, tile_n)
    if n % cta_n or k % tile_k:
        raise ValueError(f"N, K = {(n, k)} not divisible by the CTA tile's {(cta_n, tile_k)}")
    m_out = m
    if has_gate:
        batch = gate.shape[0]
        if m % batch or (m // batch) % cta_m:
            raise ValueError(f"gate: M={m} rows over {batch} samples must be whole CTA tiles of {cta_m} rows")
        tokens = m // batch
    if m % cta_m:  # zero rows up to the CTA tile (zero codes → zero output rows, sliced off)
        m = -(-m // cta_m) * cta_m
        pad = lambda a: jnp.pad(a, ((0, m - m_out),) + ((0, 0),) * (a.ndim - 1))  # noqa: E731
        xq, sx, xa = pad(xq), pad(sx), pad(xa) if has_lr else None
        x_zero = pad(x_zero) if has_zero else None
        residual = pad(residual) if has_res else None
    if grouped:  # scales as [G, M] / [G, N] rows, pipelined with the operands (one row per K-step)
        sxg = jnp.broadcast_to(sx.reshape(m, -1), (m, groups)).T
        swg = jnp.broadcast_to(sw.reshape(-1, n), (groups, n))
    m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // tile_k
    num_out_slots = min(2, (tile_m * tile_n) // (epi_tile_m * epi_tile_n))
    store_tile = epi_tile_m * epi_tile_n
    lr_alias = has_lr and config.lr_smem == "alias" and not interpret
    res_tma = has_res and config.res_load == "tma"
    res_dtype = residual.dtype if has_res else out_dtype
    # one buffer and copy per store-tile column chunk: a tiled SMEM column slice is not contiguous,
    # which a TMA copy needs, and the epilogue adds each chunk to its own store tiles
    res_cols = epi_tile_n
    res_chunks = tile_n // res_cols
    if res_tma and (tile_n % res_cols or res_cols * jnp.dtype(res_dtype).itemsize > 128):
        raise ValueError(f"res_load='tma' needs epi_tile_n dividing tile_n, at most 128 bytes a row: {res_cols}")
    smem = functools.partial(
        smem_bytes, cta_m=cta_m, cta_n=cta_n, tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, w4=w4,
        grouped=grouped, rank=r, out_slots=num_out_slots * store_tile,
        out_bytes=jnp.dtype(out_dtype).itemsize, interpret=bool(interpret), progressive=pg,
        lr_alias=lr_alias, store_tile=store_tile,
        res_tile_bytes=tile_m * tile_n * jnp.dtype(res_dtype).itemsize if res_tma else 0)
    # e.g. int4 weights with warpgroups split along M: 4 steps need 262 KB > 227 KB
    while max_concurrent_steps > 2 and smem(max_concurrent_steps) > SMEM_BUDGET:
        max_concurrent_steps -= 1
    in_tr = smem_transforms(tile_k, 8)
    w_tr = smem_transforms(tile_k, 4) if w4 else in_tr
    out_tr = smem_transforms(epi_tile_n, 16)
    has_bias = bias is not None
    shape = (tile_m, tile_n)

    vec_load = functools.partial(wgmma_vector, interpret=interpret)

    def kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, b_gmem, xa_gmem, l2t_gmem, zx_gmem, ws_gmem, g_gmem, r_gmem,
               wz_gmem, wsg_gmem, out_gmem):
        specs = [plgpu.BlockSpec((cta_m, tile_k), lambda kk: (0, kk), transforms=in_tr,
                                 memory_space=plgpu.SMEM, delay_release=in_flight),
                 plgpu.BlockSpec((cta_n, tile_k), lambda kk: (0, kk), transforms=w_tr,
                                 memory_space=plgpu.SMEM, delay_release=in_flight)]
        if grouped:
            specs += [plgpu.BlockSpec((1, cta_m), lambda kk: (kk, 0), memory_space=plgpu.SMEM,
                                      delay_release=in_flight),
                      plgpu.BlockSpec((1, cta_n), lambda kk: (kk, 0), memory_space=plgpu.SMEM,
                                      delay_release=in_flight)]
        if pg_pipe:  # one int8 zero row and one int8 scale row per K-step (= group)
            specs += [plgpu.BlockSpec((1, cta_n), lambda kk: (kk, 0), memory_space=plgpu.SMEM,
                                      delay_release=in_flight) for _ in range(2)]

        def get_pipeline(pipeline_body, compute_context):
            return plgpu.emit_pipeline_warp_specialized(
                pipeline_body, grid=(k_iters,), memory_registers=40, in_specs=specs,
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=max_concurrent_steps,
                compute_context=compute_context)

        ignore = lambda *_, **__: None
        pipe_in = (x_gmem, w_gmem) + ((sx_gmem, sw_gmem) if grouped else ()) + ((wz_gmem, wsg_gmem) if pg_pipe else ())

        lr_tr = smem_transforms(r, 16) if has_lr else None
        if lr_alias:  # the epilogue's store tiles and the low-rank operands in the same bytes
            lr_rows, out_slots_alloc = lowrank_alias_rows(
                tile_m=tile_m, tile_n=tile_n, rank=r, store_tile=store_tile, slots=num_out_slots,
                out_bytes=jnp.dtype(out_dtype).itemsize)
            epi_alloc = plgpu.RefUnion(
                plgpu.SMEM((2, out_slots_alloc, epi_tile_m, epi_tile_n), out_dtype, transforms=out_tr),
                plgpu.SMEM((2, lr_rows, r), jnp.bfloat16, transforms=lr_tr))
            lr_alloc = None
        else:
            epi_alloc = plgpu.SMEM((2, num_out_slots, epi_tile_m, epi_tile_n), out_dtype, transforms=out_tr)
            lr_alloc = (plgpu.SMEM((2, tile_m, r), jnp.bfloat16, transforms=lr_tr),
                        plgpu.SMEM((2, tile_n, r), jnp.bfloat16, transforms=lr_tr)) if has_lr else None

        @functools.partial(
            pl.run_scoped,
            pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(*pipe_in),
            out_smem=epi_alloc,
            lr_smem=lr_alloc,
            lr_bar=plgpu.Barrier(num_barriers=4) if has_lr else None,  # one per copy: each arrives once
            res_smem=plgpu.SMEM((2, res_chunks, tile_m, res_cols), res_dtype,
                                transforms=smem_transforms(res_cols, 16)) if res_tma else None,
            res_bar=plgpu.Barrier(num_barriers=2 * res_chunks) if res_tma else None,  # one per copy
            w8_smem=plgpu.SMEM((2, 2, tile_n, tile_k), jnp.int8, transforms=in_tr) if w4 or pg else None,
            tr_smem=(plgpu.SMEM((2, tile_k, tile_n), code_dt), plgpu.SMEM((2, max(r, 16), tile_n), jnp.bfloat16))
            if interpret else None,
            collective_axes="wg")
        def _scope(pipeline_allocs, out_smem, lr_smem, lr_bar, res_smem, res_bar, w8_smem, tr_smem):
            wg = lax.axis_index("wg")
            if lr_alias:  # this warpgroup's xa rows, then its l2ᵀ rows, in its epilogue bytes
                out_smem, lr_buf = out_smem
                lr_views = lambda: (lr_buf.at[wg].at[pl.ds(0, tile_m)],  # noqa: E731
                                    lr_buf.at[wg].at[pl.ds(tile_m, tile_n)])
            elif has_lr:
                lr_views = lambda: (lr_smem[0].at[wg], lr_smem[1].at[wg])  # noqa: E731

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _mn_loop(info):
                (lin,) = info.index
                mi, cm, cn, wm, wn = output_tile(lin, (m_iters, n_iters), grid_tile_width, wg, cta_m=cta_m,
                                                 cta_n=cta_n, tile_m=tile_m, tile_n=tile_n, wg_dim=wg_dim)

                def epilogue(y):
                    """f32 ``y [tile_m, tile_n]`` (scales applied) → + bias + low rank → HBM."""
                    if has_bias:
                        bcol = vec_load(b_gmem.at[cn].at[wn], 0, gmem=True)
                        y = y + lax.broadcast_in_dim(bcol, shape, [1])
                    if has_lr:
                        plgpu.barrier_wait(lr_bar.at[2 * wg])
                        plgpu.barrier_wait(lr_bar.at[2 * wg + 1])

                        a_lr, l2t = lr_views()
                        b_lr = k_by_n(l2t, 1)
                        if lr_in_acc and not interpret:
                            # accumulate (X L1) L2 into y itself: no second accumulator, so
                            # the register budget allows tile_n = 128
                            def _lr(acc_ref):
                                plgpu.wgmma(acc_ref, a_lr, b_lr)
                            y = pl.run_state(_lr)(plgpu.ACC.init(y))
                        else:  # a second accumulator (the GPU interpreter has no rule for run_state)
                            @functools.partial(pl.run_scoped, lr_ref=plgpu.ACC(shape, jnp.float32))
                            def _lr(lr_ref):
                                plgpu.wgmma(lr_ref, a_lr, b_lr)
                                plgpu.wgmma_wait(0)
                                return lr_ref[...]
                            y = y + _lr
                    if activation == "gelu_tanh":
                        y = jax.nn.gelu(y, approximate=True)
                    if has_gate:  # the CTA tile lies in one sample (checked above)
                        b_idx = jnp.minimum((mi * cta_m) // tokens, batch - 1)  # padded rows: the last
                        grow = vec_load(g_gmem.at[pl.ds(b_idx * n, n)].at[cn].at[wn], 0, gmem=True)
                        y = y * lax.broadcast_in_dim(grow, shape, [1])
                    dst = out_gmem.at[cm, cn].at[wm, wn]
                    if res_tma:  # the chunks start_lowrank_loads copied in under the main loop
                        for c in range(res_chunks):
                            plgpu.barrier_wait(res_bar.at[wg * res_chunks + c])

                        def add_res(rows, j):
                            chunk = res_smem.at[wg, j].at[rows]
                            res = chunk[...] if interpret else plgpu.load(chunk, (), layout=plgpu.Layout.WGMMA)
                            return res.astype(jnp.float32)
                        store_tiles(y, out_smem, dst, wg, epi_m=epi_tile_m, epi_n=epi_tile_n, add=add_res,
                                    out_dtype=out_dtype)
                        return
                    if has_res:
                        r_tile = r_gmem.at[cm, cn].at[wm, wn]
                        res = r_tile[...] if interpret else plgpu.load(
                            r_tile, (), layout=plgpu.Layout.WGMMA, optimized=False)
                        y = y + res.astype(jnp.float32)
                    store_tiles(y.astype(out_dtype), out_smem, dst, wg, epi_m=epi_tile_m, epi_n=epi_tile_n)

                def k_by_n(ref_nk, which):
                    """A K-major ``[n, k]`` SMEM operand as wgmma's ``[k, n]`` B operand."""
                    if not interpret:
                        return plgpu.transpose_ref(ref_nk, (1, 0))
                    # the GPU interpreter's wgmma takes no transposed refs: an explicit copy
                    dst = tr_smem[which].at[wg]
                    dst[...] = ref_nk[...].T
                    return dst

                def start_lowrank_loads():
                    """The copies the epilogue waits for, issued before the main loop: the
                    low-rank tiles and (``res_load="tma"``) the residual tile."""
                    if res_tma:  # this warpgroup read its previous tile in its own epilogue
                        for c in range(res_chunks):
                            cols = pl.ds(c * res_cols, res_cols)
                            plgpu.copy_gmem_to_smem(r_gmem.at[cm, cn].at[wm, wn].at[:, cols],
                                                    res_smem.at[wg, c], res_bar.at[wg * res_chunks + c])
                    if has_lr:  # issue the low-rank tiles' loads before the main loop
                        if lr_alias:  # the previous tile's stores must have read these bytes
                            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        xa_dst, l2t_dst = lr_views()
                        plgpu.copy_gmem_to_smem(xa_gmem.at[cm].at[wm], xa_dst, lr_bar.at[2 * wg])
                        plgpu.copy_gmem_to_smem(l2t_gmem.at[cn].at[wn], l2t_dst, lr_bar.at[2 * wg + 1])

                def weight_operand(kk, b_smem, z_smem=None, s_smem=None):
                    """The K-major int8 ``[tile_n, tile_k]`` weight tile in SMEM, as ``[tile_k, tile_n]``
                    (progressive groups: ``(w − z) · s`` with this K-step's int8 rows ``z_smem``,
                    ``s_smem [1, cta_n]``, in integers, before the store)."""
                    b = b_smem.at[wn]
                    if w4 or pg:  # int4 → int8 in registers, into this warpgroup's buffer of this parity
                        dst = w8_smem.at[wg, lax.rem(kk, 2)]
                        w8 = b[...].astype(jnp.int8)
                        if pg:
                            if not pg_pipe:  # interpreter: this K-step's rows straight from GMEM
                                z_smem, s_smem = wz_gmem.at[pl.ds(kk, 1), cn], wsg_gmem.at[pl.ds(kk, 1), cn]
                            # Mosaic GPU has no 8-bit pointwise arithmetic: int16, exact, then back
                            i16, tshape = jnp.int16, (w8.shape[0], tile_k)
                            zc = lax.broadcast_in_dim(z_smem.at[0].at[wn][...].astype(i16), tshape, [0])
                            sc = lax.broadcast_in_dim(s_smem.at[0].at[wn][...].astype(i16), tshape, [0])
                            w8 = ((w8.astype(i16) - zc) * sc).astype(jnp.int8)
                        dst[...] = w8
                        plgpu.commit_smem()
                        b = dst
                    return k_by_n(b, 0)

                if not grouped:
                    def compute_context(eval_pipeline):
                        @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC(shape, jnp.float32 if fp8 else jnp.int32))
                        def _acc_scope(acc_ref):
                            start_lowrank_loads()
                            eval_pipeline(acc_ref)
                            srow = vec_load(sx_gmem.at[cm].at[wm], 1, gmem=True)
                            scol = vec_load(sw_gmem.at[cn].at[wn], 0, gmem=True)
                            y = acc_ref[...].astype(jnp.float32)
                            if has_zero:  # Σ (q - z) w = Σ q w - z · colsum(w)
                                zrow = vec_load(zx_gmem.at[cm].at[wm], 1, gmem=True)
                                wcol = vec_load(ws_gmem.at[cn].at[wn], 0, gmem=True)
                                y = y - lax.broadcast_in_dim(zrow, shape, [0]) * lax.broadcast_in_dim(wcol, shape, [1])
                            y = y * lax.broadcast_in_dim(srow, shape, [0]) * lax.broadcast_in_dim(scol, shape, [1])
                            epilogue(y)

                    def mma_body(idx, a_smem, b_smem, *rest):
                        *zs, acc_ref = rest  # progressive groups: this K-step's zero and scale rows
                        plgpu.wgmma(acc_ref, a_smem.at[wm], weight_operand(idx[0], b_smem, *zs))
                        plgpu.wgmma_wait(in_flight)
                        return acc_ref

                    get_pipeline(mma_body, compute_context)(
                        x_gmem.at[cm, :], w_gmem.at[cn, :],
                        *((wz_gmem.at[:, cn], wsg_gmem.at[:, cn]) if pg_pipe else ()), allocations=pipeline_allocs)
                else:
                    def compute_context(eval_pipeline):
                        start_lowrank_loads()
                        y0 = jnp.zeros(shape, jnp.float32)
                        if not interpret:  # (no interpreter rule for layout_cast)
                            y0 = plgpu.layout_cast(y0, plgpu.Layout.WGMMA)
                        epilogue(eval_pipeline(y0))

                    def mma_body(idx, a_smem, b_smem, sx_smem, sw_smem, y):
                        @functools.partial(pl.run_scoped, part_ref=plgpu.ACC(shape, jnp.int32))
                        def part(part_ref):
                            plgpu.wgmma(part_ref, a_smem.at[wm], weight_operand(idx[0], b_smem))
                            plgpu.wgmma_wait(0)
                            return part_ref[...]
                        srow = vec_load(sx_smem.at[0].at[wm], 1)
                        scol = vec_load(sw_smem.at[0].at[wn], 0)
                        return y + (part.astype(jnp.float32) * lax.broadcast_in_dim(srow, shape, [0])
                                    * lax.broadcast_in_dim(scol, shape, [1]))

                    get_pipeline(mma_body, compute_context)(
                        x_gmem.at[cm, :], w_gmem.at[cn, :], sx_gmem.at[:, cm], sw_gmem.at[:, cn],
                        allocations=pipeline_allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    if num_sms is None:
        num_sms = device_num_sms()
    b = bias.astype(jnp.float32) if has_bias else jnp.zeros((n,), jnp.float32)
    f = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(num_sms,), grid_names=("sm",),
        num_threads=3, thread_name="wg", interpret=interpret,
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    if has_lr:
        xa_in, l2t_in = xa.astype(jnp.bfloat16), l2.T.astype(jnp.bfloat16)  # L2^T [N, r]
    else:
        xa_in, l2t_in = jnp.zeros((m, 16), jnp.bfloat16), jnp.zeros((n, 16), jnp.bfloat16)
    if has_zero:
        zx_in, ws_in = x_zero, w_colsum.reshape(n).astype(jnp.float32)
    else:  # unused (the kernel signature is fixed)
        zx_in, ws_in = jnp.zeros((m,), jnp.float32), jnp.zeros((n,), jnp.float32)
    g_in = gate.astype(jnp.float32).reshape(-1) if has_gate else jnp.zeros((n,), jnp.float32)
    r_in = residual if has_res else jnp.zeros((1, n), out_dtype)  # (unused when absent)
    if pg:
        wz_in, wsg_in = w_zero, w_gscale
    else:  # unused
        wz_in = wsg_in = jnp.zeros((1, n), jnp.int8)
    rest = (b, xa_in, l2t_in, zx_in, ws_in, g_in, r_in, wz_in, wsg_in)
    if grouped:
        return f(xq, wt, sxg, swg, *rest)[:m_out]
    return f(xq, wt, sx.reshape(m), sw.reshape(n), *rest)[:m_out]
