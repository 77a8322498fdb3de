"""Hopper (sm_90a) W8A8 GEMM through the Pallas Mosaic GPU backend.

``wgmma.mma_async ... .s32.s8.s8`` (integer tensor cores, int32 accumulator in
registers) over a TMA-fed multi-stage shared-memory pipeline (``plgpu.emit_pipeline``),
one warpgroup per CTA tile.  8-bit wgmma needs both operands K-major in shared
memory, so the weight is passed transposed, ``wt = W^T [N, K]`` (int8), and viewed
as ``[K, N]`` through ``plgpu.transpose_ref``.

Fused epilogue in registers (WGMMA layout): ``acc·s_x·s_w + bias``, plus the
low-rank up-projection as a second wgmma, ``bf16 XA [tm, r] @ L2 [r, tn]`` into an
f32 accumulator of the same tile, gate and residual; then bf16 through shared
memory and a TMA store.

Mosaic GPU kernels do not run in interpret mode on CPU in jax 0.10/0.11; they are
checked against the reference on the GPU by ``bench/bench_kernels.py``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def _transforms(minor_elems: int, bits: int):
    swizzle = plgpu.find_swizzle(minor_elems * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def int8_gemm(xq, wt, sx, sw, *, bias=None, xa=None, l2=None, residual=None, gate_rows=None,
              out_dtype=jnp.bfloat16, tile_m: int = 128, tile_n: int = 128, tile_k: int = 128,
              max_concurrent_steps: int = 4):
    """``bf16 [M, N] = (xq @ wt.T) · sx · sw + bias + xa @ l2`` (then ``· gate + residual``).

    Args:
      xq: int8 ``[M, K]``.  wt: int8 ``[N, K]`` (the weight transposed).
      sx: f32 ``[M]``; sw: f32 ``[N]``; bias: f32 ``[N]`` or None.
      xa: bf16 ``[M, r]``, l2: bf16 ``[r, N]`` (r a multiple of 16) or None.
      residual: bf16 ``[M, N]``; gate_rows: bf16 ``[M, N]`` (the gate broadcast to rows) or None.
    M, N, K must be multiples of the tiles.
    """
    m, k = xq.shape
    n = wt.shape[0]
    tile_m, tile_n = min(tile_m, m), min(tile_n, n)
    if m % tile_m or n % tile_n or k % tile_k:
        raise ValueError(f"shape {(m, n, k)} not divisible by tiles {(tile_m, tile_n, tile_k)}")
    k_iters = k // tile_k
    if residual is not None or gate_rows is not None:  # their tiles take shared memory
        max_concurrent_steps = min(max_concurrent_steps, 2)
    in_tr = _transforms(tile_k, 8)
    out_tr = _transforms(tile_n, 16)
    has_bias, has_lr = bias is not None, xa is not None
    has_res, has_gate = residual is not None, gate_rows is not None

    def kernel(*refs):
        it = iter(refs)
        x_gmem, w_gmem, sx_smem, sw_smem = next(it), next(it), next(it), next(it)
        b_smem = next(it) if has_bias else None
        xa_smem, l2_smem = (next(it), next(it)) if has_lr else (None, None)
        g_smem = next(it) if has_gate else None
        r_smem = next(it) if has_res else None
        o_smem = next(it)
        acc = next(it)
        acc_lr = next(it) if has_lr else None
        mi, ni = pl.program_id(0), pl.program_id(1)

        def body(_, a_smem, b_smem):
            plgpu.wgmma(acc, a_smem, plgpu.transpose_ref(b_smem, (1, 0)))
            plgpu.wgmma_wait(1)  # keep one wgmma in flight; delay_release=1 keeps its buffers

        plgpu.emit_pipeline(
            body,
            in_specs=[plgpu.BlockSpec((tile_m, tile_k), lambda kk: (mi, kk), transforms=in_tr,
                                     delay_release=1),
                      plgpu.BlockSpec((tile_n, tile_k), lambda kk: (ni, kk), transforms=in_tr,
                                     delay_release=1)],
            grid=(k_iters,), max_concurrent_steps=max_concurrent_steps,
        )(x_gmem, w_gmem)
        if has_lr:
            plgpu.wgmma(acc_lr, xa_smem, plgpu.transpose_ref(l2_smem, (1, 0)))
        plgpu.wgmma_wait(0)
        shape = (tile_m, tile_n)
        srow = plgpu.load(sx_smem, (), layout=plgpu.Layout.WGMMA.reduce(1))
        scol = plgpu.load(sw_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
        y = acc[...].astype(jnp.float32)
        y = y * lax.broadcast_in_dim(srow, shape, [0]) * lax.broadcast_in_dim(scol, shape, [1])
        if has_bias:
            bcol = plgpu.load(b_smem, (), layout=plgpu.Layout.WGMMA.reduce(0))
            y = y + lax.broadcast_in_dim(bcol, shape, [1])
        if has_lr:
            y = y + acc_lr[...]
        if has_gate:
            y = y * plgpu.load(g_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        if has_res:
            y = y + plgpu.load(r_smem, (), layout=plgpu.Layout.WGMMA).astype(jnp.float32)
        o_smem[...] = y.astype(out_dtype)

    args = [xq, wt, sx.astype(jnp.float32), sw.astype(jnp.float32)]
    gm = pl.BlockSpec(memory_space=plgpu.GMEM)
    specs = [gm, gm, plgpu.BlockSpec((tile_m,), lambda i, j: (i,)),
             plgpu.BlockSpec((tile_n,), lambda i, j: (j,))]
    scratch = [plgpu.ACC((tile_m, tile_n), jnp.int32)]
    if has_bias:
        args.append(bias.astype(jnp.float32))
        specs.append(plgpu.BlockSpec((tile_n,), lambda i, j: (j,)))
    if has_lr:
        r = xa.shape[1]
        args += [xa.astype(jnp.bfloat16), l2.T.astype(jnp.bfloat16)]  # L2^T [N, r]: swizzle matches XA's
        specs += [plgpu.BlockSpec((tile_m, r), lambda i, j: (i, 0), transforms=_transforms(r, 16)),
                  plgpu.BlockSpec((tile_n, r), lambda i, j: (j, 0), transforms=_transforms(r, 16))]
        scratch.append(plgpu.ACC((tile_m, tile_n), jnp.float32))
    if has_gate:
        args.append(gate_rows.astype(out_dtype))
        specs.append(plgpu.BlockSpec((tile_m, tile_n), lambda i, j: (i, j), transforms=out_tr))
    if has_res:
        args.append(residual.astype(out_dtype))
        specs.append(plgpu.BlockSpec((tile_m, tile_n), lambda i, j: (i, j), transforms=out_tr))
    return pl.pallas_call(
        kernel, in_specs=specs,
        out_specs=plgpu.BlockSpec((tile_m, tile_n), lambda i, j: (i, j), transforms=out_tr),
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(m // tile_m, n // tile_n),
        scratch_shapes=scratch, compiler_params=plgpu.CompilerParams(),
        name="jaxdq_int8_gemm_mgpu")(*args)


def int8_gemm_ws(xq, wt, sx, sw, *, bias=None, xa=None, l2=None, out_dtype=jnp.bfloat16,
                 tile_m: int = 128, tile_n: int | None = None, tile_k: int = 128, max_concurrent_steps: int = 4,
                 epi_tile_n: int = 64, epi_tile_m: int = 64, grid_tile_width: int = 8,
                 wg_dim: str = "auto"):
    """Warp-specialized, persistent variant of :func:`int8_gemm`.

    With ``xa [M, r]`` and ``l2 [r, N]`` (bf16, r % 16 == 0) the low-rank branch is fused:
    each consumer warpgroup TMA-loads its ``xa`` rows and ``l2`` columns at the start of a
    tile (overlapping the main loop) and after it issues one bf16 wgmma into a second f32
    accumulator of the same tile.  Two accumulators of 128×128 would need 256 registers
    per thread, so ``tile_n`` defaults to 64 with the branch (128 without).
    NOTE: the fused low-rank variant is lowering-checked only; it has not yet run on a GPU.

    The structure of jax's ``hopper_matmul_mgpu`` example: one producer warpgroup
    issuing TMA loads, two consumer warpgroups each owning a ``tile_m × tile_n``
    int32 accumulator (CTA tile ``tile_m × 2·tile_n``, or ``2·tile_m × tile_n`` with
    ``wg_dim="m"``; "auto" picks n when N divides), a persistent grid of one CTA
    per SM walking the output tiles in a planar snake; epilogue ``acc·s_x·s_w + bias``.
    """
    m, k = xq.shape
    n = wt.shape[0]
    has_lr = xa is not None
    if tile_n is None:
        tile_n = 64 if has_lr else 128
    r = xa.shape[1] if has_lr else 0
    if wg_dim == "auto":
        wg_dim = "n" if n % (2 * tile_n) == 0 else "m"
    cta_m, cta_n = (tile_m, 2 * tile_n) if wg_dim == "n" else (2 * tile_m, tile_n)
    if m % cta_m or n % cta_n or k % tile_k:
        raise ValueError(f"shape {(m, n, k)} not divisible by CTA tile {(cta_m, cta_n, tile_k)}")
    m_iters, n_iters, k_iters = m // cta_m, n // cta_n, k // tile_k
    in_tr = _transforms(tile_k, 8)
    out_tr = _transforms(epi_tile_n, 16)
    has_bias = bias is not None
    num_out_slots = min(2, (tile_m * tile_n) // (epi_tile_m * epi_tile_n))

    def kernel(x_gmem, w_gmem, sx_gmem, sw_gmem, b_gmem, xa_gmem, l2t_gmem, out_gmem):
        def get_pipeline(pipeline_body, compute_context):
            return plgpu.emit_pipeline_warp_specialized(
                pipeline_body, grid=(k_iters,), memory_registers=40,
                in_specs=[plgpu.BlockSpec((cta_m, tile_k), lambda kk: (0, kk), transforms=in_tr,
                                          memory_space=plgpu.SMEM, delay_release=1),
                          plgpu.BlockSpec((cta_n, tile_k), lambda kk: (0, kk), transforms=in_tr,
                                          memory_space=plgpu.SMEM, delay_release=1)],
                wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=max_concurrent_steps,
                compute_context=compute_context)

        ignore = lambda *_, **__: None

        @functools.partial(
            pl.run_scoped,
            pipeline_allocs=get_pipeline(ignore, ignore).get_allocations(x_gmem, w_gmem),
            out_smem=plgpu.SMEM((2, num_out_slots, epi_tile_m, epi_tile_n), out_dtype, transforms=out_tr),
            lr_smem=(plgpu.SMEM((2, tile_m, r), jnp.bfloat16, transforms=_transforms(r, 16)),
                     plgpu.SMEM((2, tile_n, r), jnp.bfloat16, transforms=_transforms(r, 16)))
            if has_lr else None,
            lr_bar=plgpu.Barrier(num_barriers=4) if has_lr else None,  # one per copy: each arrives once
            collective_axes="wg")
        def _scope(pipeline_allocs, out_smem, lr_smem, lr_bar):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((m_iters * n_iters,), collective_axes="sm")
            def _mn_loop(info):
                (lin,) = info.index
                mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), 1, grid_tile_width)
                cm = pl.ds(mi * cta_m, cta_m)
                cn = pl.ds(ni * cta_n, cta_n)
                if wg_dim == "n":
                    wm, wn = slice(None), pl.ds(wg * tile_n, tile_n)
                else:
                    wm, wn = pl.ds(wg * tile_m, tile_m), slice(None)

                def compute_context(eval_pipeline):
                    @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tile_m, tile_n), jnp.int32))
                    def _acc_scope(acc_ref):
                        if has_lr:  # issue the low-rank tiles' loads before the main loop
                            plgpu.copy_gmem_to_smem(xa_gmem.at[cm].at[wm], lr_smem[0].at[wg], lr_bar.at[2 * wg])
                            plgpu.copy_gmem_to_smem(l2t_gmem.at[cn].at[wn], lr_smem[1].at[wg],
                                                    lr_bar.at[2 * wg + 1])
                        eval_pipeline(acc_ref)
                        shape = (tile_m, tile_n)
                        srow = plgpu.load(sx_gmem.at[cm].at[wm], (), layout=plgpu.Layout.WGMMA.reduce(1),
                                          optimized=False)
                        scol = plgpu.load(sw_gmem.at[cn].at[wn], (), layout=plgpu.Layout.WGMMA.reduce(0),
                                          optimized=False)
                        y = acc_ref[...].astype(jnp.float32)
                        y = y * lax.broadcast_in_dim(srow, shape, [0]) * lax.broadcast_in_dim(scol, shape, [1])
                        if has_bias:
                            bcol = plgpu.load(b_gmem.at[cn].at[wn], (), layout=plgpu.Layout.WGMMA.reduce(0),
                                              optimized=False)
                            y = y + lax.broadcast_in_dim(bcol, shape, [1])
                        if has_lr:
                            plgpu.barrier_wait(lr_bar.at[2 * wg])
                            plgpu.barrier_wait(lr_bar.at[2 * wg + 1])

                            @functools.partial(pl.run_scoped, lr_ref=plgpu.ACC(shape, jnp.float32))
                            def _lr(lr_ref):
                                plgpu.wgmma(lr_ref, lr_smem[0].at[wg],
                                            plgpu.transpose_ref(lr_smem[1].at[wg], (1, 0)))
                                plgpu.wgmma_wait(0)
                                return lr_ref[...]
                            y = y + _lr
                        y = y.astype(out_dtype)
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        for emi in range(tile_m // epi_tile_m):
                            for eni in range(tile_n // epi_tile_n):
                                es_m = slice(emi * epi_tile_m, (emi + 1) * epi_tile_m)
                                es_n = slice(eni * epi_tile_n, (eni + 1) * epi_tile_n)
                                slot = (emi * (tile_n // epi_tile_n) + eni) % 2
                                plgpu.wait_smem_to_gmem(1, wait_read_only=True)
                                out_smem[wg, slot] = y[es_m, es_n]
                                plgpu.commit_smem()
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg, slot], out_gmem.at[cm, cn].at[wm, wn].at[es_m, es_n])

                def mma_body(_, a_smem, b_smem, acc_ref):
                    plgpu.wgmma(acc_ref, a_smem.at[wm], plgpu.transpose_ref(b_smem.at[wn], (1, 0)))
                    plgpu.wgmma_wait(1)
                    return acc_ref

                get_pipeline(mma_body, compute_context)(
                    x_gmem.at[cm, :], w_gmem.at[cn, :], allocations=pipeline_allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    num_sms = jax.devices()[0].core_count if hasattr(jax.devices()[0], "core_count") else 132
    b = bias.astype(jnp.float32) if has_bias else jnp.zeros((n,), jnp.float32)
    f = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((m, n), out_dtype), grid=(num_sms,), grid_names=("sm",),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    if has_lr:
        xa_in, l2t_in = xa.astype(jnp.bfloat16), l2.T.astype(jnp.bfloat16)  # L2^T [N, r]
    else:
        xa_in, l2t_in = jnp.zeros((m, 16), jnp.bfloat16), jnp.zeros((n, 16), jnp.bfloat16)
    return f(xq, wt, sx.astype(jnp.float32), sw.astype(jnp.float32), b, xa_in, l2t_in)
