"""QServe's progressive group quantization (W4A8 weights with integer group scales).

Two levels for a float kernel ``W [C_in, C_out]`` (``Y = X W``), group size ``g`` along C_in:

1. Per output channel, symmetric INT8 with a *protective range*::

       s1[n] = max_k |W[k, n]| / 119            float32 [1, C_out]
       q8    = round(W / s1)                    int8 in [-119, 119]

2. Per group of ``g`` input channels (per output channel), asymmetric UINT4 of the int8
   values with an *integer* scale and zero::

       lo, hi = min(min q8, 0), max(max q8, 0)         (over the group; the range holds 0)
       s_g    = max(1, ceil((hi - lo) / 15))            uint8 [C_in/g, C_out], in [1, 16]
       z_g    = clamp(round(-lo / s_g), 0, 15)          uint8 [C_in/g, C_out]
       q4     = clamp(round(q8 / s_g) + z_g, 0, 15)     4-bit codes
       w8     = (q4 - z_g) · s_g                        the int8 weight the GEMM multiplies

   ``W ≈ s1 · w8``, so ``Y = (s_x[m] · s1[n]) · Σ_k x8[m, k] w8[k, n]``: a pure int8 × int8 →
   int32 GEMM, the group scale and zero applied in integers while expanding int4 → int8,
   with no per-group float rescale of the accumulator.

Why ``w8`` fits int8 (:func:`expand`): let ``u = round(q8 / s_g)``.  Unclamped,
``w8 = u · s_g`` and ``|u · s_g| ≤ |q8| + s_g / 2``.  The clamp of ``u + z_g`` to ``[0, 15]``
only moves ``w8`` towards 0 (above: ``w8 = (15 − z_g) s_g ∈ [0, u s_g)``; below:
``w8 = −z_g s_g ∈ (u s_g, 0]``, since ``0 ≤ z_g ≤ 15``), so ``|w8| ≤ |q8| + s_g / 2``.  With
``|q8| ≤ 119`` the group range is at most 238, so ``s_g ≤ ceil(238 / 15) = 16`` and
``|w8| ≤ 119 + 8 = 127``.  Without the protective range (``|q8| ≤ 127``, ``s_g`` up to 17)
``w8`` reaches 128: e.g. a group spanning ``[-106, 120]`` has ``s_g = 16``, ``z_g = 7`` and
``q8 = 120 → q4 = 15 → w8 = 128`` (tests/test_progressive.py checks both).

Integers here are computed in int32 and stored narrow.  Everything is jitted with the group
size and the protective range static.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["PROTECT", "LEVELS", "PGCodes", "level1", "level2", "expand", "progressive_quantize",
           "progressive_dequantize", "ProgressiveWeight", "ProgressiveSpec", "group_for"]

#: Level 1's protective range: ``|q8| ≤ 119`` keeps level 2's ``w8`` inside int8.
PROTECT = 119
#: Level 2's codes: UINT4 in ``[0, LEVELS]``.
LEVELS = 15
_TINY = 1e-8


class PGCodes(NamedTuple):
    """Progressive-group codes of a ``[C_in, C_out]`` kernel (unpacked).

    q4: uint8 ``[C_in, C_out]`` in ``[0, 15]``; s1: float32 ``[1, C_out]``;
    s_g: uint8 ``[C_in/g, C_out]`` in ``[1, 16]``; z_g: uint8 ``[C_in/g, C_out]`` in ``[0, 15]``.
    """

    q4: jax.Array
    s1: jax.Array
    s_g: jax.Array
    z_g: jax.Array


@functools.partial(jax.jit, static_argnames=("protect",))
def level1(w: jax.Array, protect: int = PROTECT) -> tuple[jax.Array, jax.Array]:
    """Level 1: ``w [C_in, C_out]`` float → ``(q8 int32 [C_in, C_out] in [-protect, protect],
    s1 float32 [1, C_out])`` with ``s1 = max|W_col| / protect`` (floored at 1e-8)."""
    w = jnp.asarray(w, jnp.float32)
    s1 = jnp.maximum(jnp.max(jnp.abs(w), axis=0, keepdims=True) / protect, _TINY)
    q8 = jnp.clip(jnp.round(w / s1), -protect, protect).astype(jnp.int32)
    return q8, s1


def _groups(a: jax.Array, g: int) -> jax.Array:
    k, n = a.shape
    if k % g:
        raise ValueError(f"C_in={k} is not a multiple of the group size {g}")
    return a.reshape(k // g, g, n)


def _div_round(q: jax.Array, s: jax.Array) -> jax.Array:
    """``round(q / s)``, ties to even, in int32 (``s ≥ 1``): exact, unlike a float division
    that XLA may compute as ``q · (1/s)`` (45 · (1/6) = 7.4999995 → 7, not 8)."""
    d = jnp.floor_divide(q, s)
    r2 = 2 * (q - s * d)  # 2 · remainder, in [0, 2s)
    up = (r2 > s) | ((r2 == s) & (d % 2 == 1))
    return d + up.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("group_size",))
def level2(q8: jax.Array, group_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Level 2: int8-valued ``q8 [C_in, C_out]`` → ``(q4 uint8 [C_in, C_out], s_g uint8
    [C_in/g, C_out], z_g uint8 [C_in/g, C_out])`` (module docstring)."""
    qg = _groups(jnp.asarray(q8, jnp.int32), group_size)
    lo = jnp.minimum(jnp.min(qg, axis=1), 0)
    hi = jnp.maximum(jnp.max(qg, axis=1), 0)
    s = jnp.maximum((hi - lo + LEVELS - 1) // LEVELS, 1)  # integer ceil, ≥ 1
    z = jnp.clip(_div_round(-lo, s), 0, LEVELS)
    q4 = _div_round(qg, s[:, None, :]) + z[:, None, :]
    q4 = jnp.clip(q4, 0, LEVELS).reshape(q8.shape)
    return q4.astype(jnp.uint8), s.astype(jnp.uint8), z.astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("group_size",))
def expand(q4: jax.Array, s_g: jax.Array, z_g: jax.Array, group_size: int) -> jax.Array:
    """``w8 = (q4 − z_g) · s_g``: int32 ``[C_in, C_out]`` (in ``[-127, 127]`` for codes of
    :func:`progressive_quantize`; int32 so that a test can see an overflow)."""
    qg = _groups(jnp.asarray(q4, jnp.int32), group_size)
    w8 = (qg - z_g.astype(jnp.int32)[:, None, :]) * s_g.astype(jnp.int32)[:, None, :]
    return w8.reshape(q4.shape)


@functools.partial(jax.jit, static_argnames=("group_size", "protect"))
def progressive_quantize(w: jax.Array, group_size: int = 64, protect: int = PROTECT) -> PGCodes:
    """Both levels of a float ``w [C_in, C_out]`` (C_in a multiple of ``group_size``)."""
    q8, s1 = level1(w, protect)
    q4, s_g, z_g = level2(q8, group_size)
    return PGCodes(q4, s1, s_g, z_g)


@functools.partial(jax.jit, static_argnames=("group_size",))
def progressive_dequantize(q4: jax.Array, s1: jax.Array, s_g: jax.Array, z_g: jax.Array,
                           group_size: int) -> jax.Array:
    """float32 ``[C_in, C_out]`` ``s1 · (q4 − z_g) · s_g``."""
    return expand(q4, s_g, z_g, group_size).astype(jnp.float32) * jnp.asarray(s1, jnp.float32)


# --------------------------------------------------------------------------- the weight node
import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
from flax import struct  # noqa: E402

from jaxdq.quant.quantizer import pack_int4, unpack_int4  # noqa: E402

#: Stored codes are ``q4 − 8`` (signed int4, the nibble ``q4 XOR 8``): what the GPU's int4 →
#: int8 conversion reads; the zero the kernel subtracts is then ``z_g − 8``.
CODE_OFFSET = 8


def group_for(c_in: int, group_size: int) -> int:
    """The group size used for a kernel of ``c_in`` input channels: ``group_size``, or one
    group over the whole column when ``c_in`` is not a multiple of it."""
    return group_size if c_in % group_size == 0 else c_in


@struct.dataclass
class ProgressiveWeight:
    """Progressive-group 4-bit weight of a ``[C_in, C_out]`` kernel: a QLinear weight node.

    codes: uint8 ``[C_out, C_in // 2]``, K-major (QWeight's "nk" layout, the one the Hopper
      GEMM reads), two codes per byte along C_in as :func:`jaxdq.quant.quantizer.pack_int4`
      (element 2i in the low nibble); each nibble holds ``q4 − 8`` in two's complement
      (:data:`CODE_OFFSET`).  Unpacked (``packed`` False, C_in odd): int8 ``[C_out, C_in]``.
    s1: float32 ``[1, C_out]``; s_g, z_g: uint8 ``[C_in / group_size, C_out]`` (module docstring).
    group_size (static): g.  packed (static).

    The weight protocol of :class:`jaxdq.quant.layers.QLinear`: ``shape``, ``bits``,
    ``dequantize()``, ``stored_arrays()``, ``int_ok``, ``int_product(x_codes, x_scale)``.
    """

    codes: jax.Array
    s1: jax.Array
    s_g: jax.Array
    z_g: jax.Array
    group_size: int = struct.field(pytree_node=False, default=64)
    packed: bool = struct.field(pytree_node=False, default=True)

    @classmethod
    def from_kernel(cls, kernel: jax.Array, group_size: int = 64, protect: int = PROTECT,
                    pack: bool = True) -> "ProgressiveWeight":
        """Quantize a finite float ``[C_in, C_out]`` kernel (:func:`progressive_quantize`;
        the group falls back to the whole column when C_in is not a multiple of it)."""
        w = jnp.asarray(kernel, jnp.float32)
        bad = int(np.size(w) - np.count_nonzero(np.isfinite(np.asarray(w))))
        if bad:
            raise ValueError(f"weight {tuple(w.shape)} holds {bad} NaN/inf values; refusing to quantize it")
        g = group_for(w.shape[0], group_size)
        pg = progressive_quantize(w, g, protect)
        signed = (pg.q4.astype(jnp.int32) - CODE_OFFSET).astype(jnp.int8).T  # [C_out, C_in]
        pack = pack and w.shape[0] % 2 == 0
        return cls(codes=pack_int4(signed) if pack else signed, s1=pg.s1, s_g=pg.s_g, z_g=pg.z_g,
                   group_size=g, packed=pack)

    @property
    def bits(self) -> int:
        return 4

    @property
    def shape(self) -> tuple[int, int]:
        """``(C_in, C_out)``."""
        rows, cols = self.codes.shape
        return (int(cols) * (2 if self.packed else 1), int(rows))

    def signed_nk(self) -> jax.Array:
        """int8 ``[C_out, C_in]`` stored codes ``q4 − 8`` in ``[-8, 7]``."""
        return unpack_int4(self.codes, signed=True) if self.packed else self.codes

    def q4(self) -> jax.Array:
        """uint8 ``[C_in, C_out]`` level-2 codes in ``[0, 15]``."""
        return (self.signed_nk().astype(jnp.int32) + CODE_OFFSET).T.astype(jnp.uint8)

    def w8(self) -> jax.Array:
        """int8 ``[C_in, C_out]`` ``(q4 − z_g) · s_g`` (the GEMM's weight)."""
        return expand(self.q4(), self.s_g, self.z_g, self.group_size).astype(jnp.int8)

    def dequantize(self) -> jax.Array:
        """float32 ``[C_in, C_out]`` ``s1 · w8``."""
        return progressive_dequantize(self.q4(), self.s1, self.s_g, self.z_g, self.group_size)

    def stored_arrays(self) -> list:
        """The arrays this weight stores (what weight bytes count)."""
        return [self.codes, self.s1, self.s_g, self.z_g]

    @property
    def int_ok(self) -> bool:
        return True

    def kernel_operands(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """What the Hopper GEMM reads: ``(wt jnp.int4 [C_out, C_in]`` (a view of the stored
        bytes), ``w_zero int8 [G, C_out] = z_g − 8``, ``w_gscale int8 [G, C_out] = s_g)``, so
        that ``(wt − w_zero) · w_gscale = (q4 − z_g) · s_g``."""
        if self.packed:
            rows, half = self.codes.shape
            wt = jax.lax.bitcast_convert_type(self.codes, jnp.int4).reshape(rows, 2 * half)
        else:
            wt = self.codes.astype(jnp.int4)
        zero = (self.z_g.astype(jnp.int32) - CODE_OFFSET).astype(jnp.int8)
        return wt, zero, self.s_g.astype(jnp.int8)

    def int_product(self, x_codes: jax.Array, x_scale: jax.Array) -> jax.Array:
        """int8 activation codes ``[..., C_in]`` × ``w8`` (expanded in the same XLA fusion
        from the K-major codes), int32 accumulation, then ``s_x · s1``: float32 ``[..., C_out]``."""
        n, k = self.shape[1], self.shape[0]
        g = self.group_size
        zt = jnp.repeat(self.z_g.astype(jnp.int32).T, g, axis=1)  # [C_out, C_in]
        st = jnp.repeat(self.s_g.astype(jnp.int32).T, g, axis=1)
        w8 = ((self.signed_nk().astype(jnp.int32) + CODE_OFFSET - zt) * st).astype(jnp.int8)
        acc = jax.lax.dot_general(x_codes.astype(jnp.int8), w8, (((x_codes.ndim - 1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.int32)
        assert w8.shape == (n, k)
        return acc.astype(jnp.float32) * x_scale * self.s1.astype(jnp.float32).reshape(-1)


@dataclasses.dataclass(frozen=True)
class ProgressiveSpec:
    """A LayerQuant weight quantizer producing :class:`ProgressiveWeight` (4-bit, group
    ``group_size``, level-1 protective range ``protect``)."""

    group_size: int = 64
    protect: int = PROTECT
    bits: int = 4
    needs_samples: bool = False

    def __post_init__(self):
        if self.bits != 4:
            raise ValueError("progressive group quantization is 4-bit")
        if not (isinstance(self.group_size, int) and self.group_size >= 1):
            raise ValueError(f"group_size must be an int >= 1, got {self.group_size!r}")

    def quantize_weight(self, kernel: jax.Array, *, pack: bool = True, x=None, act_bits: int = 8) -> ProgressiveWeight:
        return ProgressiveWeight.from_kernel(kernel, self.group_size, self.protect, pack=pack)

    def fake_quant(self, w: jax.Array) -> jax.Array:
        """Quantize-dequantize a float ``[C_in, C_out]`` weight (SVD refinement of the residual)."""
        w = jnp.asarray(w, jnp.float32)
        g = group_for(w.shape[0], self.group_size)
        return progressive_dequantize(*progressive_quantize(w, g, self.protect), g)
