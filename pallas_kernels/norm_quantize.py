"""The activation quantize fused into the norm that produces X: LayerNorm / RMSNorm → per-sample
affine (adaLN modulate, smoothing folded in) → block Hadamard → 8-bit codes + per-token scales
→ low-rank down-projection, in one Pallas-Triton kernel (any CUDA GPU; ``interpret=True`` on CPU).

What a diffusion transformer computes before its qkv / fc1 / FLUX linear1 is
``h = norm(x) · (1 + scale_b) + shift_b`` (adaLN modulate with per-sample rows; PixArt:
``scale_shift_table + t-embedding`` rows; FLUX: its modulation rows); a quantized linear then
reads ``X' = H(h / λ)`` (smoothing λ, optional block Hadamard H) and quantizes it per token.
The separate quantize kernel (``quantize_act``) re-reads ``h`` from HBM after XLA wrote it;
this kernel reads ``x`` once and writes only the int8 codes, the scales and ``X' L1``.

**The smoothing is folded into the modulation, so the kernel has no divide by λ**::

    (LN(x)·(1+s_b) + b_b) / λ  =  LN(x) · ((1+s_b)/λ)  +  b_b/λ  =  LN(x) · mul_b + add_b

``mul_b``, ``add_b`` are ``[B, K]`` rows (B samples), computed by the caller on the
modulation rows (B·K elements, never M·K) — with λ constant, ``1/λ`` is an offline constant
and ``s/λ``, ``b/λ`` are the adaLN outputs scaled per channel.  An affine norm
(``LN(x)·γ + β``) folds the same way: ``mul = γ(1+s)/λ``, ``add = (β(1+s) + b)/λ``.  So the
kernel computes, for row ``m`` of sample ``b = m // (M/B)``::

    y   = norm(x_m) · mul_b + add_b          norm: (x - mean)·rsqrt(var + eps) | x·rsqrt(mean(x²) + eps)
    y'  = H(y)                               (block Hadamard, optional)
    s   = max(absmax(y') / qmax, 1e-8)       (qmax 127 for int8, 448 for float8 e4m3)
    q   = clip(round_half_even(y' / s))      (int8; e4m3: y'/s rounded to nearest even by the cast)
    xl1 = y' @ L1                            (optional, the low-rank branch's down-projection)

* :func:`norm_quantize` — the kernel; :func:`norm_quantize_reference` — its jnp semantics
  (float32); :class:`NormQuantizeConfig` — launch parameters (frozen);
  :func:`norm_quantize_config` — the launch table.
* Numerics vs the reference: the row statistics are summed in another order (the kernel
  per chunk with Chan's combination, XLA by its own tree), so ``y'`` differs by a few f32
  ulps and a code can move by one where ``y'/s`` lies within that of a .5 tie (documented
  ±1 ties, ~1e-5 of codes; with the Hadamard, which runs as a bf16 hi/lo split on the
  tensor cores (≈16-bit mantissa), ~1e-4).  Scales match to f32 rounding, ``xl1`` to bf16
  rounding (bf16 operands on the tensor cores, f32 accumulation).

Row blocks never straddle two samples: ``(M/B) % block_m == 0`` (the caller falls back to
the unfused path otherwise).  K is read in power-of-two chunks (``bk``: the Hadamard block, or
the largest power of two dividing K up to 512).  Two schedules: ``single_pass`` keeps the
row block's K chunks in registers (one read of x); otherwise three sweeps over K per row
block (statistics; absmax and ``X' L1``; codes), the re-reads hitting L2.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels._common import (SCALE_FLOOR, pow2_divisor, sylvester_pm1, symmetric_int_codes, symmetric_scale,
                                     triton_compiler_params)
from pallas_kernels.quantize_act import block_hadamard_reference

NORMS = ("layer", "rms")
FMTS = ("int", "e4m3")
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def qmax_of(bits: int, fmt: str) -> float:
    """Largest code magnitude: ``2^(bits-1) - 1`` for integer codes, 448 for float8 e4m3."""
    if fmt == "e4m3":
        return E4M3_MAX
    return float(2 ** (bits - 1) - 1)


def _check(norm: str, fmt: str, bits: int):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if fmt not in FMTS:
        raise ValueError(f"fmt must be one of {FMTS}, got {fmt!r}")
    if fmt == "int" and not 2 <= bits <= 8:
        raise ValueError(f"integer codes need 2 <= bits <= 8, got {bits}")


# --------------------------------------------------------------------------- reference
def fold_modulation(scale: Optional[jax.Array], shift: Optional[jax.Array], *, k: int,
                    smooth: Optional[jax.Array] = None, weight: Optional[jax.Array] = None,
                    bias: Optional[jax.Array] = None):
    """The kernel's ``(mul [B, K], add [B, K] | None)`` float32 rows for
    ``(norm(x)·γ + β)·(1 + scale) + shift``, divided by the smoothing ``λ``.

    scale, shift: ``[B, K]`` (or ``[K]``, or None: no modulation); smooth, weight (γ), bias
    (β): ``[K]`` or None.  Computed on the rows (B·K elements).  See the module docstring.
    """
    f32 = lambda a: None if a is None else jnp.asarray(a, jnp.float32).reshape(-1, k)  # noqa: E731
    scale, shift, smooth, weight, bias = map(f32, (scale, shift, smooth, weight, bias))
    one_plus = None if scale is None else 1.0 + scale
    mul = jnp.ones((1, k), jnp.float32) if weight is None else weight
    if one_plus is not None:
        mul = mul * one_plus
    add = bias
    if add is not None and one_plus is not None:
        add = add * one_plus
    if shift is not None:
        add = shift if add is None else add + shift
    if smooth is not None:
        mul = mul / smooth
        add = None if add is None else add / smooth
    b = max(a.shape[0] for a in (mul, add) if a is not None)
    mul = jnp.broadcast_to(mul, (b, k))
    return mul, None if add is None else jnp.broadcast_to(add, (b, k))


def normalize_reference(x: jax.Array, norm: str = "layer", eps: float = 1e-6) -> jax.Array:
    """float32 ``LN(x)`` (no affine) or ``x · rsqrt(mean(x²) + eps)`` over the last axis."""
    xf = x.astype(jnp.float32)
    if norm == "rms":
        return xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(var + eps)


def norm_quantize_reference(x: jax.Array, mul: jax.Array, add: Optional[jax.Array] = None, *,
                            norm: str = "layer", eps: float = 1e-6, bits: int = 8, fmt: str = "int",
                            had_block: int = 0, l1: Optional[jax.Array] = None):
    """The fused norm + quantize, in float32 (the kernel's semantics; module docstring).

    Args:
      x: ``[M, K]``.  mul, add: ``[B, K]`` (``M % B == 0``; row m uses row ``m // (M/B)``);
        add may be None.  norm: "layer" | "rms".  eps: the norm's.
      bits: integer code bits (codes in int8).  fmt: "int" or "e4m3" (float8_e4m3fn codes).
      had_block: block-Hadamard size (0 = none).  l1: optional ``[K, r]``.
    Returns:
      ``codes`` int8 / float8_e4m3fn ``[M, K]``, ``scale`` float32 ``[M, 1]``, ``xl1`` float32
      ``[M, r]`` (None without ``l1``).
    """
    _check(norm, fmt, bits)
    m, k = x.shape
    b = mul.shape[0]
    y = normalize_reference(x, norm, eps).reshape(b, m // b, k) * mul.astype(jnp.float32)[:, None]
    if add is not None:
        y = y + add.astype(jnp.float32)[:, None]
    y = y.reshape(m, k)
    if had_block:
        y = block_hadamard_reference(y, had_block)
    xl1 = None if l1 is None else jnp.dot(y, l1.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    qmax = qmax_of(bits, fmt)
    scale = jnp.maximum(jnp.max(jnp.abs(y), axis=-1, keepdims=True) / qmax, SCALE_FLOOR)
    if fmt == "e4m3":
        codes = jnp.clip(y / scale, -qmax, qmax).astype(jnp.float8_e4m3fn)
    else:
        codes = jnp.clip(jnp.round(y / scale), -qmax - 1, qmax).astype(jnp.int8)
    return codes, scale, xl1


# --------------------------------------------------------------------------- tuning config
@dataclasses.dataclass(frozen=True)
class NormQuantizeConfig:
    """Launch parameters of :func:`norm_quantize` (frozen: a static jit argument).

    block_m: rows per program (a divisor of the rows per sample; ≥ 16 with the Hadamard or
      the down-projection, whose tensor-core operand needs 16 rows).  num_warps, num_stages:
      Triton's.  single_pass: the row block's K chunks stay in registers (x read once, for
      ``block_m · K`` up to ~16K elements per 4 warps); else three sweeps over K (the
      re-reads hit L2).  interpret: Pallas' interpreter (CPU).
    """

    block_m: int = 16
    num_warps: int = 4
    num_stages: int = 1
    single_pass: bool = True
    interpret: bool = False


def norm_quantize_config(m: int, k: int, *, tokens: int, dot: bool) -> NormQuantizeConfig:
    """Launch parameters for ``x [m, k]`` with ``tokens`` rows per sample; ``dot``: the
    kernel has a tensor-core product (Hadamard or down-projection).

    Not yet measured on a GPU (bench/bench_fused_norm.py sweeps these and the alternatives):
    the choices follow the separate quantize kernel's H100 table (``quantize_config``):
    without a product, few rows (4–8) in one pass keep every SM busy at M = 512; with one,
    16 rows (the dot minimum), one pass while ``16·K`` fits the registers of 8 warps, three
    sweeps otherwise.  ``block_m`` is lowered to a divisor of ``tokens`` if needed.
    """
    if dot:
        cfg = (NormQuantizeConfig(block_m=16, num_warps=8, single_pass=True) if k <= 2048 else
               NormQuantizeConfig(block_m=16, num_warps=4, num_stages=2, single_pass=False))
    elif k <= 4608:
        cfg = NormQuantizeConfig(block_m=8 if m >= 4096 else 4, num_warps=4, single_pass=True)
    else:
        cfg = NormQuantizeConfig(block_m=8, num_warps=4, num_stages=3, single_pass=False)
    bm = cfg.block_m
    while bm > (16 if dot else 1) and tokens % bm:
        bm //= 2
    return dataclasses.replace(cfg, block_m=bm)


def supported(m: int, k: int, tokens: int, *, had_block: int = 0, l1_rank: int = 0, block_m: int = 16) -> bool:
    """Whether :func:`norm_quantize` takes these shapes with row blocks of ``block_m``."""
    bk = had_block or pow2_divisor(k, 512)
    if k % bk or bk < 16 or m % tokens or tokens % block_m:
        return False
    if (had_block or l1_rank) and (block_m < 16 or l1_rank % 16):
        return False
    return True


# --------------------------------------------------------------------------- kernel
def _kernel(*refs, k_total, bk, norm, eps, qmax, fmt, has_add, has_had, has_l1, had_block, single_pass):
    it = iter(refs)
    x_ref, mul_ref = next(it), next(it)
    add_ref = next(it) if has_add else None
    h_ref = next(it) if has_had else None
    l1_ref = next(it) if has_l1 else None
    q_ref, sc_ref = next(it), next(it)
    xl1_ref = next(it) if has_l1 else None
    nk = k_total // bk
    bm = x_ref.shape[0]
    inv_k = 1.0 / k_total

    def load(kk):
        return x_ref[:, pl.ds(kk * bk, bk)].astype(jnp.float32)

    def finish(xn, kk):
        """normalized chunk → modulated (smoothing folded in), rotated chunk ``y'``."""
        y = xn * mul_ref[:, pl.ds(kk * bk, bk)]
        if has_add:
            y = y + add_ref[:, pl.ds(kk * bk, bk)]
        if has_had:
            h = h_ref[...]  # ±1 (bf16, exact)
            hi = y.astype(jnp.bfloat16)
            lo = (y - hi.astype(jnp.float32)).astype(jnp.bfloat16)
            y = (jnp.dot(hi, h, preferred_element_type=jnp.float32)
                 + jnp.dot(lo, h, preferred_element_type=jnp.float32)) * (1.0 / float(np.sqrt(had_block)))
        return y

    def encode(y, scale):
        v = y / scale
        if fmt == "e4m3":
            return jnp.clip(v, -qmax, qmax).astype(q_ref.dtype)
        return symmetric_int_codes(v, qmax)

    def down_proj(kk, y, acc):
        if has_l1:
            acc = acc + jnp.dot(y.astype(jnp.bfloat16), l1_ref[pl.ds(kk * bk, bk), :],
                                preferred_element_type=jnp.float32)
        return acc

    r = l1_ref.shape[1] if has_l1 else 1
    zeros = jnp.zeros((bm, 1), jnp.float32)

    def finalize_stats(mean, second):
        """(mean, rstd) from the mean and the centered (layer) / raw (rms) second moment sum."""
        return mean, jax.lax.rsqrt(second * inv_k + eps)

    if single_pass:  # every chunk stays in registers (static unroll): x read once
        chunks = [load(kk) for kk in range(nk)]
        if norm == "layer":
            tot = zeros
            for c in chunks:
                tot = tot + jnp.sum(c, axis=1, keepdims=True)
            mean = tot * inv_k
            ss = zeros
            for c in chunks:
                d = c - mean
                ss = ss + jnp.sum(d * d, axis=1, keepdims=True)
        else:
            mean, ss = zeros, zeros
            for c in chunks:
                ss = ss + jnp.sum(c * c, axis=1, keepdims=True)
        mean, rstd = finalize_stats(mean, ss)
        amax, acc = zeros, jnp.zeros((bm, r), jnp.float32)
        ys = []
        for kk, c in enumerate(chunks):
            y = finish((c - mean) * rstd, kk)
            ys.append(y)
            amax = jnp.maximum(amax, jnp.max(jnp.abs(y), axis=1, keepdims=True))
            acc = down_proj(kk, y, acc)
        scale = symmetric_scale(amax, qmax)
        sc_ref[...] = scale
        if has_l1:
            xl1_ref[...] = acc.astype(xl1_ref.dtype)
        for kk, y in enumerate(ys):
            q_ref[:, pl.ds(kk * bk, bk)] = encode(y, scale)
        return

    # three sweeps: (1) row statistics, Chan's combination of per-chunk (mean, M2);
    # (2) absmax and the down-projection; (3) the codes
    def sweep_stats(kk, carry):
        mean, m2 = carry
        c = load(kk)
        if norm == "rms":
            return mean, m2 + jnp.sum(c * c, axis=1, keepdims=True)
        cm = jnp.sum(c, axis=1, keepdims=True) * (1.0 / bk)
        d = c - cm
        cm2 = jnp.sum(d * d, axis=1, keepdims=True)
        na = (kk * bk).astype(jnp.float32)
        n = na + bk
        delta = cm - mean
        return mean + delta * (bk / n), m2 + cm2 + delta * delta * (na * bk / n)

    mean, m2 = jax.lax.fori_loop(0, nk, sweep_stats, (zeros, zeros))
    mean, rstd = finalize_stats(mean, m2)

    def sweep_absmax(kk, carry):
        amax, acc = carry
        y = finish((load(kk) - mean) * rstd, kk)
        return jnp.maximum(amax, jnp.max(jnp.abs(y), axis=1, keepdims=True)), down_proj(kk, y, acc)

    amax, acc = jax.lax.fori_loop(0, nk, sweep_absmax, (zeros, jnp.zeros((bm, r), jnp.float32)))
    scale = symmetric_scale(amax, qmax)
    sc_ref[...] = scale
    if has_l1:
        xl1_ref[...] = acc.astype(xl1_ref.dtype)

    def sweep_codes(kk, c):
        q_ref[:, pl.ds(kk * bk, bk)] = encode(finish((load(kk) - mean) * rstd, kk), scale)
        return c

    jax.lax.fori_loop(0, nk, sweep_codes, 0)


@functools.partial(jax.jit, static_argnames=("norm", "eps", "bits", "fmt", "had_block", "config"))
def norm_quantize(x: jax.Array, mul: jax.Array, add: Optional[jax.Array] = None, *, norm: str = "layer",
                  eps: float = 1e-6, bits: int = 8, fmt: str = "int", had_block: int = 0,
                  l1: Optional[jax.Array] = None, config: NormQuantizeConfig = NormQuantizeConfig()):
    """Fused norm → modulate → (rotate) → quantize → (down-project); semantics
    :func:`norm_quantize_reference`.

    Args:
      x: ``[M, K]`` bf16/f32 (M = B·T, the rows of sample b contiguous).  mul, add: ``[B, K]``
        float rows (:func:`fold_modulation` makes them; add may be None).
      norm, eps: "layer" / "rms" and its epsilon.  bits / fmt: integer code bits (int8) or
        "e4m3" (float8_e4m3fn codes, scale absmax/448).  had_block: 0 or a power of two ≥ 16
        dividing K.  l1: ``[K, r]`` (r a multiple of 16).
      config: :class:`NormQuantizeConfig` (``T % block_m == 0``).
    Returns: codes ``[M, K]`` (int8 or float8_e4m3fn), scale f32 ``[M, 1]``, ``X' L1`` bf16
    ``[M, r]`` or None.
    """
    _check(norm, fmt, bits)
    m, k = x.shape
    b = mul.shape[0]
    bm = config.block_m
    if m % b:
        raise ValueError(f"{m} rows do not split into {b} samples")
    tokens = m // b
    if not supported(m, k, tokens, had_block=had_block, l1_rank=0 if l1 is None else l1.shape[1], block_m=bm):
        raise ValueError(f"norm_quantize: unsupported shapes M={m}, K={k}, rows/sample={tokens}, "
                         f"block_m={bm}, had_block={had_block}, rank={None if l1 is None else l1.shape[1]}")
    bk = had_block or pow2_divisor(k, 512)
    per = tokens // bm  # row blocks per sample
    row = lambda i: (i // per, 0)  # noqa: E731  the sample's modulation row
    args = [x, mul.astype(jnp.float32)]
    specs = [pl.BlockSpec((bm, k), lambda i: (i, 0)), pl.BlockSpec((1, k), row)]
    if add is not None:
        args.append(add.astype(jnp.float32))
        specs.append(pl.BlockSpec((1, k), row))
    if had_block:
        args.append(jnp.asarray(sylvester_pm1(had_block), jnp.bfloat16))
        specs.append(pl.BlockSpec((had_block, had_block), lambda i: (0, 0)))
    code_dtype = jnp.float8_e4m3fn if fmt == "e4m3" else jnp.int8
    out_shape = [jax.ShapeDtypeStruct((m, k), code_dtype), jax.ShapeDtypeStruct((m, 1), jnp.float32)]
    out_specs = [pl.BlockSpec((bm, k), lambda i: (i, 0)), pl.BlockSpec((bm, 1), lambda i: (i, 0))]
    if l1 is not None:
        r = l1.shape[1]
        args.append(l1.astype(jnp.bfloat16))
        specs.append(pl.BlockSpec((k, r), lambda i: (0, 0)))
        out_shape.append(jax.ShapeDtypeStruct((m, r), jnp.bfloat16))
        out_specs.append(pl.BlockSpec((bm, r), lambda i: (i, 0)))
    kern = functools.partial(_kernel, k_total=k, bk=bk, norm=norm, eps=float(eps), qmax=qmax_of(bits, fmt),
                             fmt=fmt, has_add=add is not None, has_had=bool(had_block), has_l1=l1 is not None,
                             had_block=had_block, single_pass=config.single_pass)
    outs = pl.pallas_call(kern, grid=(m // bm,), in_specs=specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=config.interpret,
                          compiler_params=None if config.interpret else triton_compiler_params(config.num_warps,
                                                                                               config.num_stages),
                          name="jaxdq_norm_quantize")(*args)
    return outs[0], outs[1], (outs[2] if l1 is not None else None)


__all__ = ["NormQuantizeConfig", "norm_quantize", "norm_quantize_config", "norm_quantize_reference",
           "normalize_reference", "fold_modulation", "supported", "qmax_of", "E4M3_MAX", "NORMS", "FMTS"]
