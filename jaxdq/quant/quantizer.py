"""Uniform quantization core: specs, qparams, quantize/dequantize, int4 packing.

``q = clamp(round(x / s) + z, qmin, qmax)``, ``x̂ = s (q − z)``.

Shape conventions (weights ``W: [C_in, C_out]`` with ``Y = X W``; activations
``X: [..., C_in]``):

============  =======================  ======================
granularity   weight scale shape       activation scale shape
============  =======================  ======================
tensor        ``[]``                   ``[]``
channel       ``[1, C_out]``           (not allowed)
token         (not allowed)            ``[..., 1]``
group (G)     ``[C_in // G, C_out]``   ``[..., C_in // G]``
============  =======================  ======================

Zero points, when present, have the scale's shape.  Symmetric codes are signed
int8 in ``[-2^(b-1), 2^(b-1) - 1]`` with ``s = absmax / (2^(b-1) - 1)`` and no
zero point; asymmetric codes are uint8 in ``[0, 2^b - 1]`` with
``s = (max - min) / (2^b - 1)`` and ``z = round(-min / s)``, the range always
widened to include 0.  Scales are floored at ``1e-8`` so all-zero groups give
codes ``z`` (0 for symmetric) and dequantize to exactly 0, never NaN.

Non-finite values (the NaN/inf policy): a NaN or ±inf activation is left out of the range
computation (so it does not poison the scale of its token, group or tensor), quantizes to
the code of 0, and :func:`fake_quant` passes it through unchanged — divergence stays
visible instead of turning into a finite code.  Weights must be finite: the quantization
of a layer refuses NaN/inf weights (:meth:`jaxdq.quant.layers.QWeight.from_kernel`).

Every function is jit/vmap-compatible with the spec and ``kind`` static.  The
primitives (qparams, quantize, dequantize, packing) are themselves jitted, so an
eager call compiles once per (spec, kind, shape, dtype) rather than dispatching
op by op (which, for the MSE search, would recompile its loop on every call).
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Optional

import jax
import jax.numpy as jnp

__all__ = [
    "QuantSpec", "compute_qparams", "quantize", "dequantize", "fake_quant",
    "quantize_weight", "quantize_activation", "pack_int4", "unpack_int4",
]

GRANULARITIES = ("tensor", "channel", "token", "group")
RANGES = ("minmax", "mse", "percentile")
KINDS = ("weight", "activation")
FORMATS = ("int", "e4m3")  # integer codes, or FP8 float8_e4m3fn codes (QuantSpec.fmt)
E4M3_MAX = 448  # the largest finite float8_e4m3fn
_TINY = 1e-8


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Static description of a uniform quantizer (hashable: used as jit / pytree aux data).

    bits: 2..8.  symmetric: signed codes, no zero point.  granularity: "tensor" |
    "channel" (weights) | "token" (activations) | "group" (needs ``group_size``).
    range: "minmax", "mse" (per scale group, the clipping ratio in
    ``linspace(mse_min_ratio, 1, mse_grid)`` with least squared error) or "percentile"
    (per scale group, the range clipped at the ``percentile``-th percentile: symmetric
    ``absmax = P_p(|x|)``; asymmetric ``[P_{100-p}(x), P_p(x)]``, linear interpolation
    between order statistics as NumPy's default; values outside are clamped).
    percentile: in (50, 100]; 100 is min-max.  Read only with ``range="percentile"``.
    fmt: "int" (uniform integer codes) or "e4m3" (FP8: codes are float8_e4m3fn values, the
      scale ``absmax / 448``, ``x / s`` rounded to nearest even on the e4m3 grid by the cast
      and saturated at ±448; symmetric, bits 8, no zero point; fake quantization is the
      cast through ``jnp.float8_e4m3fn``).
    """

    bits: int = 8
    symmetric: bool = True
    granularity: str = "tensor"
    group_size: Optional[int] = None
    range: str = "minmax"
    mse_grid: int = 80
    mse_min_ratio: float = 0.3
    percentile: float = 99.9
    fmt: str = "int"

    def __post_init__(self):
        if not _is_int(self.bits) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group" and not (_is_int(self.group_size) and self.group_size >= 1):
            raise ValueError(f"granularity 'group' needs an int group_size >= 1, got {self.group_size!r}")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size applies only to granularity 'group', not {self.granularity!r}")
        if self.range not in RANGES:
            raise ValueError(f"range must be one of {RANGES}, got {self.range!r}")
        if not _is_int(self.mse_grid) or self.mse_grid < 1:
            raise ValueError(f"mse_grid must be an int >= 1, got {self.mse_grid!r}")
        if (not isinstance(self.mse_min_ratio, numbers.Real) or isinstance(self.mse_min_ratio, bool)
                or not 0.0 < self.mse_min_ratio <= 1.0):
            raise ValueError(f"mse_min_ratio must be a float in (0, 1], got {self.mse_min_ratio!r}")
        if (not isinstance(self.percentile, numbers.Real) or isinstance(self.percentile, bool)
                or not 50.0 < self.percentile <= 100.0):
            raise ValueError(f"percentile must be a number in (50, 100], got {self.percentile!r}")
        if self.fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {FORMATS}, got {self.fmt!r}")
        if self.fmt == "e4m3" and (self.bits != 8 or not self.symmetric):
            raise ValueError(f"fmt 'e4m3' (FP8) is symmetric with bits 8, got bits={self.bits}, "
                             f"symmetric={self.symmetric}")

    @property
    def qmin(self) -> int:
        if self.fmt == "e4m3":
            return -E4M3_MAX
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        if self.fmt == "e4m3":
            return E4M3_MAX
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2 ** self.bits - 1

    @property
    def code_dtype(self):
        if self.fmt == "e4m3":
            return jnp.float8_e4m3fn
        return jnp.int8 if self.symmetric else jnp.uint8


def _check_kind(spec: QuantSpec, kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be 'weight' or 'activation', got {kind!r}")
    if spec.granularity == "channel" and kind != "weight":
        raise ValueError("granularity 'channel' (per output channel) applies to weights only")
    if spec.granularity == "token" and kind != "activation":
        raise ValueError("granularity 'token' applies to activations only")


def _group_axis(spec: QuantSpec, kind: str, ndim: int) -> int:
    """Axis split into groups of ``group_size``: C_in of ``[C_in, C_out]`` or the last axis."""
    return 0 if kind == "weight" else ndim - 1


def _grouped(x: jax.Array, spec: QuantSpec, kind: str) -> tuple[jax.Array, tuple[int, ...]]:
    """View ``x`` so that each scale group is reduced over the returned axes.

    Returns ``x`` itself, or for "group" ``x`` with the group axis of size n split
    into ``(n // G, G)``, and the axes to reduce (with keepdims) per scale.
    """
    g = spec.granularity
    if g != "tensor" and kind == "weight" and x.ndim != 2:
        raise ValueError(f"granularity {g!r} needs a 2-D [C_in, C_out] weight, got shape {x.shape}")
    if g != "tensor" and x.ndim == 0:
        raise ValueError(f"granularity {g!r} needs an activation with a channel axis, got a scalar")
    if g == "tensor":
        return x, tuple(range(x.ndim))
    if g == "channel":
        return x, (0,)
    if g == "token":
        return x, (x.ndim - 1,)
    axis = _group_axis(spec, kind, x.ndim)
    n = x.shape[axis]
    if n % spec.group_size:
        raise ValueError(f"axis {axis} of size {n} is not divisible by group_size {spec.group_size}")
    shape = x.shape[:axis] + (n // spec.group_size, spec.group_size) + x.shape[axis + 1:]
    return x.reshape(shape), (axis + 1,)


def _ungroup(p: jax.Array, spec: QuantSpec, kind: str, ndim: int) -> jax.Array:
    """Keepdims qparam of the grouped view → the documented scale shape."""
    if spec.granularity == "tensor":
        return p.reshape(())
    if spec.granularity == "group":
        return jnp.squeeze(p, axis=_group_axis(spec, kind, ndim) + 1)
    return p


def _regroup(p: Optional[jax.Array], spec: QuantSpec, kind: str, ndim: int) -> Optional[jax.Array]:
    """Documented scale shape → broadcastable against the grouped view of x (float32)."""
    if p is None:
        return None
    p = jnp.asarray(p, jnp.float32)
    if spec.granularity == "group":
        return jnp.expand_dims(p, _group_axis(spec, kind, ndim) + 1)
    return p


def _params_from_range(lo: jax.Array, hi: jax.Array, spec: QuantSpec):
    """float32 ``(scale, zero | None)`` for the range ``[lo, hi]`` (same shapes)."""
    if spec.symmetric:
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        return jnp.maximum(amax / spec.qmax, _TINY), None
    lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    s = jnp.maximum((hi - lo) / spec.qmax, _TINY)
    return s, jnp.clip(jnp.round(-lo / s), spec.qmin, spec.qmax)


def _codes(x: jax.Array, s: jax.Array, z: Optional[jax.Array], spec: QuantSpec) -> jax.Array:
    """float32 integer-valued codes ``clamp(round(x / s) + z, qmin, qmax)`` (FP8: ``x / s``
    saturated at ±448 and rounded to the nearest float8_e4m3fn, ties to even, by the cast)."""
    if spec.fmt == "e4m3":
        return jnp.clip(x / s, spec.qmin, spec.qmax).astype(jnp.float8_e4m3fn).astype(jnp.float32)
    q = jnp.round(x / s)
    if z is not None:
        q = q + z
    return jnp.clip(q, spec.qmin, spec.qmax)


def _decode(q: jax.Array, s: jax.Array, z: Optional[jax.Array]) -> jax.Array:
    return (q if z is None else q - z) * s


def _mse_params(xg: jax.Array, lo: jax.Array, hi: jax.Array, axes: tuple[int, ...],
                spec: QuantSpec):
    """Per scale group, the qparams of the clipping ratio with least squared error.

    A loop over ratios with a running best keeps memory at O(x) + O(#groups)
    (a vmap over the grid would hold mse_grid copies of x).  The min-max params
    are the starting point, so the result is never worse than min-max.
    """
    ratios = jnp.linspace(spec.mse_min_ratio, 1.0, spec.mse_grid, dtype=jnp.float32)

    def candidate(r):
        s, z = _params_from_range(lo * r, hi * r, spec)
        err = jnp.sum(jnp.square(_decode(_codes(xg, s, z, spec), s, z) - xg), axis=axes, keepdims=True)
        return err, s, jnp.zeros_like(s) if z is None else z

    def body(i, best):
        cand = candidate(ratios[i])
        better = cand[0] < best[0]
        return tuple(jnp.where(better, c, b) for c, b in zip(cand, best))

    _, s, z = jax.lax.fori_loop(0, spec.mse_grid, body, candidate(jnp.float32(1.0)))
    return s, None if spec.symmetric else z


def _percentile_range(x: jax.Array, finite: jax.Array, axes: tuple[int, ...], spec: QuantSpec):
    """Per scale group ``(lo, hi)`` (keepdims) at the spec's percentile; non-finite values
    are left out (a group with none finite gets 0)."""
    q = spec.percentile / 100.0
    xn = jnp.where(finite, x, jnp.nan)
    if spec.symmetric:
        hi = jnp.nanquantile(jnp.abs(xn), q, axis=axes, keepdims=True)
        hi = jnp.where(jnp.isnan(hi), 0.0, hi)
        return -hi, hi
    lo = jnp.nanquantile(xn, 1.0 - q, axis=axes, keepdims=True)
    hi = jnp.nanquantile(xn, q, axis=axes, keepdims=True)
    return jnp.where(jnp.isnan(lo), 0.0, lo), jnp.where(jnp.isnan(hi), 0.0, hi)


@functools.partial(jax.jit, static_argnames=("spec", "kind"))
def compute_qparams(x: jax.Array, spec: QuantSpec, *, kind: str):
    """Scale and zero point of ``x`` for ``spec``.

    Args:
      x: ``[C_in, C_out]`` weight or ``[..., C_in]`` activation, any float dtype.
      kind: "weight" or "activation" (selects the axis conventions).
    Returns:
      ``(scale, zero)``: float32 in the documented scale shape; ``zero`` is None
      for symmetric specs, else integer-valued float32 in ``[0, 2^b - 1]``.
    """
    _check_kind(spec, kind)
    xf = jnp.asarray(x, jnp.float32)
    finite = jnp.isfinite(xf)
    xf = jnp.where(finite, xf, 0.0)  # non-finite values do not set the range
    xg, axes = _grouped(xf, spec, kind)
    if spec.range == "percentile":
        lo, hi = _percentile_range(xg, _grouped(finite, spec, kind)[0], axes, spec)
    else:
        lo = jnp.min(xg, axis=axes, keepdims=True)
        hi = jnp.max(xg, axis=axes, keepdims=True)
    if spec.range == "mse":
        s, z = _mse_params(xg, lo, hi, axes, spec)
    else:
        s, z = _params_from_range(lo, hi, spec)
    s = _ungroup(s, spec, kind, xf.ndim)
    return s, None if z is None else _ungroup(z, spec, kind, xf.ndim)


def _check_zero(zero, spec: QuantSpec) -> None:
    if zero is None and not spec.symmetric:
        raise ValueError("asymmetric quantization needs a zero point (got zero=None)")


@functools.partial(jax.jit, static_argnames=("spec", "kind"))
def quantize(x: jax.Array, scale: jax.Array, zero: Optional[jax.Array], spec: QuantSpec, *,
             kind: str) -> jax.Array:
    """Integer codes of ``x``: same shape, int8 (symmetric) / uint8 (asymmetric).

    ``scale``/``zero`` are in the documented scale shape (``zero`` None for symmetric).
    """
    _check_kind(spec, kind)
    _check_zero(zero, spec)
    x = jnp.asarray(x)
    xf = x.astype(jnp.float32)
    xg, _ = _grouped(jnp.where(jnp.isfinite(xf), xf, 0.0), spec, kind)  # non-finite → the code of 0
    q = _codes(xg, _regroup(scale, spec, kind, x.ndim), _regroup(zero, spec, kind, x.ndim), spec)
    return q.reshape(x.shape).astype(spec.code_dtype)


@functools.partial(jax.jit, static_argnames=("spec", "kind"))
def dequantize(codes: jax.Array, scale: jax.Array, zero: Optional[jax.Array], spec: QuantSpec, *,
               kind: str) -> jax.Array:
    """float32 ``s (q − z)``, same shape as the (unpacked) ``codes``."""
    _check_kind(spec, kind)
    _check_zero(zero, spec)
    codes = jnp.asarray(codes)
    qg, _ = _grouped(codes.astype(jnp.float32), spec, kind)
    out = _decode(qg, _regroup(scale, spec, kind, codes.ndim), _regroup(zero, spec, kind, codes.ndim))
    return out.reshape(codes.shape)


def fake_quant(x: jax.Array, spec: QuantSpec, *, kind: str, scale: Optional[jax.Array] = None,
               zero: Optional[jax.Array] = None) -> jax.Array:
    """Quantize-dequantize ``x``; result has ``x``'s shape and dtype.

    Dynamic (qparams recomputed from ``x`` at every call) when ``scale`` is None,
    static (the given ``scale``/``zero``) otherwise.  NaN and ±inf pass through unchanged.
    """
    x = jnp.asarray(x)
    if scale is None:
        scale, zero = compute_qparams(x, spec, kind=kind)
    codes = quantize(x, scale, zero, spec, kind=kind)
    out = dequantize(codes, scale, zero, spec, kind=kind).astype(x.dtype)
    return jnp.where(jnp.isfinite(x), out, x)


def quantize_weight(w: jax.Array, spec: QuantSpec):
    """``[C_in, C_out]`` weight → ``(codes [C_in, C_out], scale, zero | None)``."""
    s, z = compute_qparams(w, spec, kind="weight")
    return quantize(w, s, z, spec, kind="weight"), s, z


def quantize_activation(x: jax.Array, spec: QuantSpec):
    """``[..., C_in]`` activation → ``(codes, scale, zero | None)`` from ``x`` itself (dynamic)."""
    s, z = compute_qparams(x, spec, kind="activation")
    return quantize(x, s, z, spec, kind="activation"), s, z


@jax.jit
def pack_int4(codes: jax.Array) -> jax.Array:
    """Pack 4-bit codes two per byte along the last axis.

    Args:
      codes: ``[..., 2n]`` int8 in ``[-8, 7]`` or uint8 in ``[0, 15]``.
    Returns:
      uint8 ``[..., n]``; element ``2i`` in the low nibble, ``2i + 1`` in the high one.
    """
    codes = jnp.asarray(codes)
    if codes.ndim == 0 or codes.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last axis, got shape {codes.shape}")
    u = codes.astype(jnp.int32) & 0xF  # two's-complement nibble for negative codes
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("signed",))
def unpack_int4(packed: jax.Array, *, signed: bool) -> jax.Array:
    """Inverse of :func:`pack_int4`: uint8 ``[..., n]`` → ``[..., 2n]``.

    Returns int8 in ``[-8, 7]`` (sign-extended) if ``signed`` else uint8 in ``[0, 15]``.
    """
    packed = jnp.asarray(packed)
    p = packed.astype(jnp.int32)
    nibbles = jnp.stack([p & 0xF, (p >> 4) & 0xF], axis=-1)
    if signed:
        nibbles = jnp.where(nibbles > 7, nibbles - 16, nibbles)
    out = nibbles.reshape(packed.shape[:-1] + (2 * packed.shape[-1],))
    return out.astype(jnp.int8 if signed else jnp.uint8)
