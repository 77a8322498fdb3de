"""8-bit attention on Hopper (sm_90a) through the Pallas Mosaic GPU backend: INT8 ``Q Kᵀ``
on the integer tensor cores, half-precision ``P̃ V`` (SageAttention v1's scheme).

* :func:`int8qk_attention`, tuned by :class:`AttentionConfig` (frozen, hashable).
* Reference: :func:`int8qk_attention_reference` (pure jnp, the same inputs).

What it computes, per batch ``b``, head ``h``, query ``i`` (the caller quantizes: smoothing
K by its token mean, the codes and their scales are the library's choice)::

    t_ij = (qc_i · kc_j) · sq_i · sk_j + kbias_j          (base-2 logits, float32)
    out_i = Σ_j 2^(t_ij − m_i) V_j / Σ_j 2^(t_ij − m_i),   m_i = max_j t_ij

with ``qc · kc`` an exact int32 dot, the unnormalized probabilities rounded to ``v.dtype``
before the ``P̃ V`` product (float32 accumulation), the row sums kept in float32.  ``sq``
carries the softmax scale ``log2(e)/√d`` (so the kernel's exponential is ``exp2``).

Structure (the FlashAttention-3 design jax's ``attention_mgpu`` example follows): a CTA
owns ``2 · block_q`` query rows of one (batch, head); two consumer warpgroups each hold a
``block_q``-row Q tile (int8, in shared memory for the whole KV loop) and an f32 output
accumulator in registers; a producer warpgroup streams K (int8), V and the per-key scale
(and bias) rows through a ``max_concurrent_steps``-deep TMA pipeline.  Per KV step each
consumer issues ``wgmma ... .s32.s8.s8`` (``S = Q Kᵀ``, both operands K-major in swizzled
shared memory), scales, runs the online softmax in registers, and issues a 16-bit wgmma
with ``P̃`` as the register A operand and V from shared memory.  A shared "schedule"
barrier makes the two consumers alternate, so one's softmax overlaps the other's MMAs.

On CPU the kernel runs in jax's Mosaic GPU interpreter
(``config=AttentionConfig(interpret=gpu_interpret_params())``, small shapes).  The interpreter
has no rule for ``plgpu.load``, transposed wgmma operands, register A operands or
``run_state``; in interpret mode those steps are a plain ref read, an explicit SMEM
transpose, ``P̃`` through SMEM, and a second accumulator added to the carry.  Everything
else (pipeline, barriers, int8 wgmma, softmax, epilogue) is the code the GPU runs.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.int_gemm_hopper import SMEM_BUDGET, smem_transforms, wgmma_vector

__all__ = ["AttentionConfig", "int8qk_attention", "int8qk_attention_reference", "attention_smem_bytes"]



def int8qk_attention_reference(qc, kc, v, sq, sk, kbias=None) -> jax.Array:
    """What :func:`int8qk_attention` computes (module docstring), in jnp.

    qc: int8 ``[B, Tq, H, Dk]``; kc: int8 ``[B, Tk, H, Dk]``; v: float16/bfloat16
    ``[B, Tk, H, Dv]``; sq: f32 ``[B, H, Tq]``; sk: f32 ``[B, H, Tk]``; kbias: f32
    ``[B, Tk]`` (base-2 logit offsets, e.g. a key mask) or None.  Returns ``v.dtype``
    ``[B, Tq, H, Dv]``."""
    s = jnp.einsum("bqhd,bkhd->bhqk", qc, kc, preferred_element_type=jnp.int32).astype(jnp.float32)
    t = s * sq[..., :, None] * sk[..., None, :]
    if kbias is not None:
        t = t + kbias.astype(jnp.float32)[:, None, None, :]
    p = jnp.exp2(t - t.max(axis=-1, keepdims=True))
    pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return (pv / p.sum(axis=-1).transpose(0, 2, 1)[..., None]).astype(v.dtype)


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Tiles of :func:`int8qk_attention` (frozen: a static jit argument).

    block_q: query rows per consumer warpgroup (64: one wgmma M; the CTA holds 2·block_q).
    block_kv: keys per pipeline step (a multiple of 64).
    max_concurrent_steps: TMA pipeline depth (lowered until the SMEM fits).
    schedule_barrier: alternate the two consumers' softmax and MMAs (FlashAttention-3's
      ping-pong); False lets them run free.
    interpret: None, or the Mosaic GPU interpreter's params
      (``pallas_kernels.int_gemm_hopper.gpu_interpret_params()``).
    """

    block_q: int = 64
    block_kv: int = 128
    max_concurrent_steps: int = 2
    schedule_barrier: bool = True
    interpret: Any = None

    def __post_init__(self):
        if self.block_q != 64:
            raise ValueError(f"block_q={self.block_q}: one wgmma M tile (64) per consumer warpgroup")
        if self.block_kv % 64 or self.block_kv <= 0:
            raise ValueError(f"block_kv={self.block_kv} must be a positive multiple of 64")
        if self.max_concurrent_steps < 2:
            raise ValueError(f"max_concurrent_steps={self.max_concurrent_steps} must be at least 2")


def attention_smem_bytes(steps: int, *, block_q: int, block_kv: int, dk: int, dv: int, v_bytes: int,
                         bias: bool, interpret: bool = False) -> int:
    """Shared memory of one :func:`int8qk_attention` CTA with ``steps`` pipeline stages."""
    fixed = 2 * block_q * dk + 2 * block_q * dv * v_bytes
    if interpret:  # the explicit K transposes and P̃ tiles
        fixed += 2 * dk * block_kv + 2 * block_q * block_kv * v_bytes
    per_step = block_kv * dk + block_kv * dv * v_bytes + 4 * block_kv * (2 if bias else 1)
    return fixed + steps * per_step


@functools.partial(jax.jit, static_argnames=("config",))
def int8qk_attention(qc, kc, v, sq, sk, kbias=None, *, config: AttentionConfig = AttentionConfig()):
    """INT8 ``Q Kᵀ`` + half-precision ``P̃ V`` flash attention (module docstring).

    Args:
      qc: int8 ``[B, Tq, H, Dk]`` query codes; kc: int8 ``[B, Tk, H, Dk]`` key codes.
      v: float16 or bfloat16 ``[B, Tk, H, Dv]``.
      sq: f32 ``[B, H, Tq]`` per-query scales times ``log2(e)/√d``; sk: f32 ``[B, H, Tk]``.
      kbias: f32 ``[B, Tk]`` added to the base-2 logits (a key mask: 0 / large negative,
        finite so a fully masked row averages V instead of giving NaN), or None.
      config: :class:`AttentionConfig`.
    Shapes: ``Tq`` a multiple of ``2·block_q``, ``Tk`` of ``block_kv``, ``Dk`` of 32 (one s8
    wgmma K step) and ``Dv`` of 16 (the caller pads: zero code columns leave ``Q Kᵀ``
    unchanged, masked keys get no weight).  Rows of 128 bytes take the 128-byte shared-memory
    swizzle; other widths the largest swizzle dividing them (e.g. d = 72 padded to Dk = 96,
    Dv = 80: 32-byte swizzles).
    Returns ``v.dtype [B, Tq, H, Dv]``.
    """
    bq, bkv, interpret = config.block_q, config.block_kv, config.interpret
    b_sz, tq, heads, dk = qc.shape
    _, tk, _, dv = v.shape
    if qc.dtype != jnp.int8 or kc.dtype != jnp.int8:
        raise ValueError(f"int8 codes expected, got {qc.dtype}, {kc.dtype}")
    if v.dtype not in (jnp.float16, jnp.bfloat16):
        raise ValueError(f"v must be float16 or bfloat16, got {v.dtype}")
    if kc.shape != (b_sz, tk, heads, dk) or sq.shape != (b_sz, heads, tq) or sk.shape != (b_sz, heads, tk):
        raise ValueError(f"shapes: qc {qc.shape}, kc {kc.shape}, v {v.shape}, sq {sq.shape}, sk {sk.shape}")
    if tq % (2 * bq) or tk % bkv or dk % 32 or dv % 16:
        raise ValueError(f"Tq={tq} must divide by {2 * bq}, Tk={tk} by {bkv}, Dk={dk} by 32 and Dv={dv} by 16")
    has_bias = kbias is not None
    if has_bias and kbias.shape != (b_sz, tk):
        raise ValueError(f"kbias shape {kbias.shape} != {(b_sz, tk)}")
    kv_steps = tk // bkv
    v_bytes = jnp.dtype(v.dtype).itemsize
    steps = min(config.max_concurrent_steps, kv_steps)
    smem = functools.partial(attention_smem_bytes, block_q=bq, block_kv=bkv, dk=dk, dv=dv, v_bytes=v_bytes,
                             bias=has_bias, interpret=bool(interpret))
    while steps > 2 and smem(steps) > SMEM_BUDGET:
        steps -= 1
    if smem(steps) > SMEM_BUDGET:
        raise ValueError(f"tiles need {smem(steps)} B of shared memory (> {SMEM_BUDGET})")
    pdt = v.dtype
    ping_pong = config.schedule_barrier

    vec_load = functools.partial(wgmma_vector, interpret=interpret)

    def attention_int8_kernel(q_gmem, k_gmem, v_gmem, sq_gmem, sk_gmem, kb_gmem, out_gmem,
                              q_smem, out_smem, q_bar, sched_bar, tr_smem):
        batch, head = lax.axis_index("batch"), lax.axis_index("heads")
        wg = lax.axis_index("wg")
        q0 = lax.axis_index("q_seq") * (2 * bq) + wg * bq

        def schedule():
            if ping_pong:
                plgpu.barrier_arrive(sched_bar)
                plgpu.barrier_wait(sched_bar)

        def compute_context(run_pipeline):
            plgpu.copy_gmem_to_smem(q_gmem.at[batch, pl.ds(q0, bq), head], q_smem.at[wg], q_bar.at[wg])
            acc = jnp.zeros((bq, dv), jnp.float32)
            m_i = jnp.full((bq,), -jnp.inf, jnp.float32)
            l_i = jnp.zeros((bq,), jnp.float32)
            if not interpret:  # (no interpreter rule for layout_cast)
                acc = plgpu.layout_cast(acc, plgpu.Layout.WGMMA)
                m_i = plgpu.layout_cast(m_i, plgpu.Layout.WGMMA.reduce(1))
                l_i = plgpu.layout_cast(l_i, plgpu.Layout.WGMMA.reduce(1))
            plgpu.barrier_wait(q_bar.at[wg])
            pl.when(wg == 1)(schedule)  # offset the consumers by half a step
            acc, m_i, l_i = run_pipeline((acc, m_i, l_i))
            pl.when(wg == 0)(schedule)
            out = acc / lax.broadcast_in_dim(l_i, (bq, dv), [0])
            out_smem[wg] = out.astype(out_gmem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[batch, pl.ds(q0, bq), head])
            plgpu.wait_smem_to_gmem(0)

        def kv_body(_, k_smem, v_smem, sk_smem, *rest):
            if has_bias:
                kb_smem, k_done, v_done, sk_done, kb_done, carry = rest
            else:
                k_done, v_done, sk_done, carry = rest
            acc, m_i, l_i = carry
            if interpret:  # wgmma's B as [Dk, block_kv]: the interpreter takes no transposed refs
                k_t = tr_smem[0].at[wg]
                k_t[...] = k_smem[...].T
            else:
                k_t = plgpu.transpose_ref(k_smem, (1, 0))

            @functools.partial(pl.run_scoped, s_ref=plgpu.ACC((bq, bkv), jnp.int32))
            def s_int(s_ref):
                plgpu.wgmma(s_ref, q_smem.at[wg], k_t)
                schedule()
                plgpu.wgmma_wait(0)
                return s_ref[...]

            srow = vec_load(sq_gmem.at[batch, head, pl.ds(q0, bq)], 1, gmem=True)
            scol = vec_load(sk_smem, 0)
            t = (s_int.astype(jnp.float32) * lax.broadcast_in_dim(srow, (bq, bkv), [0])
                 * lax.broadcast_in_dim(scol, (bq, bkv), [1]))
            if has_bias:
                t = t + lax.broadcast_in_dim(vec_load(kb_smem, 0), (bq, bkv), [1])
                plgpu.barrier_arrive(kb_done)
            plgpu.barrier_arrive(k_done)
            plgpu.barrier_arrive(sk_done)
            m_new = jnp.maximum(m_i, t.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(t - lax.broadcast_in_dim(m_new, (bq, bkv), [0]))
            l_i = l_i * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, (bq, dv), [0])
            p16 = p.astype(pdt)
            schedule()
            if interpret:  # P̃ through SMEM and a second accumulator (no register-A / run_state rules)
                p_smem = tr_smem[1].at[wg]
                p_smem[...] = p16

                @functools.partial(pl.run_scoped, o_ref=plgpu.ACC((bq, dv), jnp.float32))
                def pv(o_ref):
                    plgpu.wgmma(o_ref, p_smem, v_smem)
                    plgpu.wgmma_wait(0)
                    return o_ref[...]
                acc = acc + pv
            else:
                def _pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem)
                acc = pl.run_state(_pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_done)
            return acc, m_new, l_i

        specs = [plgpu.BlockSpec((bkv, dk), lambda i: (i, 0), transforms=smem_transforms(dk, 8)),
                 plgpu.BlockSpec((bkv, dv), lambda i: (i, 0), transforms=smem_transforms(dv, 16)),
                 plgpu.BlockSpec((bkv,), lambda i: (i,))]
        operands = [k_gmem.at[batch, :, head, :], v_gmem.at[batch, :, head, :], sk_gmem.at[batch, head]]
        if has_bias:
            specs.append(plgpu.BlockSpec((bkv,), lambda i: (i,)))
            operands.append(kb_gmem.at[batch])
        pipeline = plgpu.emit_pipeline_warp_specialized(
            kv_body, grid=(kv_steps,), memory_registers=40, in_specs=specs, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=steps, manual_consumed_barriers=True, compute_context=compute_context)
        pipeline(*operands)

    scratch = [plgpu.SMEM((2, bq, dk), jnp.int8, transforms=smem_transforms(dk, 8)),
               plgpu.SMEM((2, bq, dv), pdt, transforms=smem_transforms(dv, 16)),
               plgpu.Barrier(num_barriers=2),
               plgpu.Barrier(num_arrivals=2)]
    scratch.append((plgpu.SMEM((2, dk, bkv), jnp.int8), plgpu.SMEM((2, bq, bkv), pdt)) if interpret else None)
    f = plgpu.kernel(
        attention_int8_kernel, out_type=jax.ShapeDtypeStruct((b_sz, tq, heads, dv), v.dtype),
        grid=(heads, tq // (2 * bq), b_sz), grid_names=("heads", "q_seq", "batch"),
        num_threads=3, thread_name="wg", scratch_types=tuple(scratch), interpret=interpret,
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    kb = kbias.astype(jnp.float32) if has_bias else jnp.zeros((b_sz, bkv), jnp.float32)
    return f(qc, kc, v, sq.astype(jnp.float32), sk.astype(jnp.float32), kb)
