"""Twin-log quantization (TLQ) of weights, LRQ-DiT (arXiv 2508.03485) §4.1, as pure functions.

Weights are ``W: [C_in, C_out]`` (``Y = X W``); every parameter is per output
channel (per column), shape ``[1, C_out]`` float32.

Quantizer (eq. 7)
-----------------
The positive and the negative entries of a column are quantized separately in
the log domain ``W' = log2|W|``, each with its own step ``s`` and offset ``z``::

    q   = clamp(round(log2|w| / s − z), 0, L − 1)          (log-domain rounding)
    W_f = 2^{s⁺(q⁺ + z⁺)} M⁺ − 2^{s⁻(q⁻ + z⁻)} M⁻          (eq. 7)

so a side has the ``L`` levels ``2^{s(q+z)}``, geometrically spaced by ``2^s``,
the top one at ``2^{s(L−1+z)} = α·max⁺`` (``β·max⁻`` on the negative side).
``z`` is real-valued: in the log domain it only offsets the exponent, and the
integer form below never needs it to be an integer.

Code format (b = bits, 2..8; the paper's W3 and W4 are b = 3, 4)
-----------------------------------------------------------------
One b-bit two's-complement integer ``c`` per weight, stored as int8 before
packing; it *is* the paper's ``W_q = W_q⁺ − W_q⁻`` with the masks folded in::

    c = 0                 exact zero (M⁺ = M⁻ = 0)
    c = q⁺ + 1 > 0        positive, q⁺ = c − 1 ∈ [0, 2^{b−1} − 2]   (L⁺ = 2^{b−1} − 1 levels)
    c = −(q⁻ + 1) < 0     negative, q⁻ = −c − 1 ∈ [0, 2^{b−1} − 1]  (L⁻ = 2^{b−1} levels)

All 2^b codes are used: 3 bit → {0, 3 positive, 4 negative levels}, 4 bit →
{0, 7 positive, 8 negative}.  A separate sign bit with a reserved zero code
would waste the "−0" code; with no zero code, the zero-initialized rows and
columns of a DiT (adaLN, final layer) could not be represented.  The code for
zero is also used for *underflow* (``zero_underflow=True``, the default): an
entry with ``|w| < 2^{s(q=0 + z)} / 2`` (nearer to 0 than to the side's lowest
level) gets ``c = 0``; eq. 7 holds unchanged with the masks read off the codes
(``M⁺ = [c > 0]``, ``M⁻ = [c < 0]``).  ``zero_underflow=False`` is the literal
``M⁺ = [W > 0]``: only exact zeros map to 0 and small entries clamp to ``q = 0``.

Packing (:func:`pack_codes`): code ``i`` of a row occupies bits ``[i·b, (i+1)·b)``
of the row's little-endian bit stream, along the last axis.  At 4 bit that is
two codes per byte, element ``2i`` in the low nibble (the layout of
:func:`jaxdq.quant.quantizer.pack_int4`, so ``jnp.int4`` views and the existing
kernels read it); at 3 bit it is 8 codes in 3 bytes, dense: a W3 layer takes
3/8 byte per weight, below W4's 1/2 (4-bit nibbles would make W3 cost exactly
W4's bytes), and decoding a group is ``word = b0 | b1<<8 | b2<<16;
c_i = sext3((word >> 3i) & 7)``, shifts and masks only.

Clipping search
---------------
α and β (and, per side, the log step ``s``) are chosen per output channel by a
grid search: ``α, β ∈ linspace(alpha_min, 1, alpha_grid)`` times
``s ∈ linspace(step_min, step_max, step_grid)``.  The paper searches α, β only,
with the log-domain range from the quantizer itself; a literal min-max range in
the log domain (``s = (log2 max − log2 min)/(L − 1)``) spends the few levels on
the ``log2`` of the column's tiniest entry and is ~2.5× worse than uniform
quantization at 3 bit on Gaussian weights, so the step is searched too.  The
literal min-max (α = β = 1) is the running best's starting point, so the result
is never worse than it, nor than any α = β = 1 point of the grid.  With weight
error the two sides are independent (disjoint entries) and are searched in the
same loop; with calibration tokens ``x [n, C_in]`` the result of that search is
refined by coordinate descent on the layer output error ``‖X W − X W_f‖²`` per
column (one side at a time, the other fixed).  Loops keep a running best, so
memory is O(W) whatever the grid size.

Integer form
------------
Per level, ``e = s(q + z) = f + r``, ``f = floor(e)``, ``r ∈ [0, 1)``, and
``2^r ≈ m / 2^I`` with the integer ``m = round(2^r · 2^I) ∈ [2^I, 2^{I+1}]``, so
``|w| ≈ m · 2^{f − I}``: a shift and an integer multiply.  Since
``|m − 2^r 2^I| ≤ 1/2``::

    |m 2^{f−I} − 2^{f+r}| ≤ 2^{f−I−1} = 2^{−I−1−r} |w_f| ≤ 2^{−I−1} |w_f|

(relative error at most ``2^{−I−1} / 2^r ≤ 2^{−I−1}``), and for a product with
dequantized activations ``x̂``, per output channel
``|y_int − y_fq| ≤ 2^{−I−1} (|x̂| @ |W_f|)`` (:func:`int_error_bound`).
:func:`int_form` aligns a column's levels to its smallest exponent, giving
integer weights ``w_int = ±m << (f − f_min)`` and one shift ``f_min − I`` per
column; :func:`twinlog_int_matmul` multiplies int8 activation codes by them with
int32 accumulation (exact while :func:`int_accumulation_exact` holds).

The layer node
--------------
:class:`TwinLogWeight` is a registered pytree node (codes and eq. 7's params as
arrays; bits, packing and the integer form's ``I`` static) that a
:class:`jaxdq.quant.layers.QLinear` holds as its weight.  A rule quantizes a layer
with it by giving a :class:`TwinLogSpec` as the weight spec of a
:class:`jaxdq.quant.rules.LayerQuant` (:meth:`TwinLogSpec.quantize_weight`).  Its
integer path uses ``I`` = :func:`choose_frac_bits`, picked at quantization time: the
largest ``I ≤ MAX_FRAC_BITS`` for which int32 accumulation of the layer's
activation codes against ``w_int`` cannot overflow over a K chunk of
``INT_CHUNK`` = 128 input channels (partial sums added in float32, as a tiled
integer GEMM does; −1: no integer path).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "TwinLogSpec", "TwinLogWeight", "TwinLogInt", "minmax_params", "clip_params", "encode",
    "decode", "search_weight_error", "refine_output_error", "quantize_twinlog",
    "fake_quant_twinlog", "pack_codes", "unpack_codes", "int_form", "int_dequantize",
    "int_error_bound", "int_accumulation_exact", "twinlog_int_matmul", "level_sets", "choose_frac_bits",
    "MAX_FRAC_BITS", "INT_CHUNK",
]

_TINY = 1e-30   # floor for an absent side's max (its params are then never used)
_MIN_STEP = 1e-3


@dataclasses.dataclass(frozen=True)
class TwinLogSpec:
    """Static description of a twin-log quantizer (hashable: a jit static argument).

    bits: 2..8 (code format in the module docstring).  search: grid search of
    (α, s⁺) and (β, s⁻) per column; False gives the literal min-max log range with
    α = β = 1.  zero_underflow: entries nearer to 0 than to their side's lowest
    level get the zero code.  objective: "weight" (‖W − W_f‖²) or "output" (then
    refined on ‖X W − X W_f‖² over the layer's calibration tokens).
    """

    bits: int = 4
    search: bool = True
    alpha_min: float = 0.3
    alpha_grid: int = 15
    step_min: float = 0.2
    step_max: float = 2.0
    step_grid: int = 19
    zero_underflow: bool = True
    objective: str = "weight"

    def __post_init__(self):
        if self.objective not in ("weight", "output"):
            raise ValueError(f"objective must be 'weight' or 'output', got {self.objective!r}")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in 2..8, got {self.bits!r}")
        if not 0.0 < self.alpha_min <= 1.0 or self.alpha_grid < 1:
            raise ValueError("need 0 < alpha_min <= 1 and alpha_grid >= 1")
        if not _MIN_STEP <= self.step_min <= self.step_max or self.step_grid < 1:
            raise ValueError(f"need {_MIN_STEP} <= step_min <= step_max and step_grid >= 1")

    @property
    def needs_samples(self) -> bool:
        """Whether quantizing needs the layer's calibration tokens (output-error search)."""
        return self.search and self.objective == "output"

    def quantize_weight(self, kernel: jax.Array, *, pack: bool = True, x: Optional[jax.Array] = None,
                        act_bits: int = 8) -> "TwinLogWeight":
        """The weight node of ``kernel [C_in, C_out]`` (:meth:`TwinLogWeight.from_kernel`);
        ``x`` (the layer's transformed calibration tokens) is used when ``objective`` is
        "output".  The hook :func:`jaxdq.quant.rules.quantize_linear` calls."""
        if self.needs_samples and x is None:
            raise ValueError("twin-log output-error search needs the layer's calibration tokens (samples)")
        return TwinLogWeight.from_kernel(kernel, self, pack=pack, x=x if self.needs_samples else None,
                                         act_bits=act_bits)

    @property
    def levels_pos(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def levels_neg(self) -> int:
        return 2 ** (self.bits - 1)

    def grid(self) -> tuple[jax.Array, jax.Array]:
        """Flattened candidate ``(alphas [G], steps [G])``, G = alpha_grid · step_grid."""
        a = jnp.linspace(self.alpha_min, 1.0, self.alpha_grid, dtype=jnp.float32)
        s = jnp.linspace(self.step_min, self.step_max, self.step_grid, dtype=jnp.float32)
        aa, ss = jnp.meshgrid(a, s, indexing="ij")
        return aa.reshape(-1), ss.reshape(-1)


@struct.dataclass
class TwinLogWeight:
    """A twin-log quantized ``[C_in, C_out]`` weight: the weight node of a
    :class:`jaxdq.quant.layers.QLinear` (``QLinear(weight=TwinLogWeight(...))``).

    codes: the b-bit codes of the module docstring, int8 ``[C_in, C_out]``, or, with
      ``packed``, uint8 ``[C_in, C_out·b/8]`` (:func:`pack_codes` along C_out: 4 bit two
      per byte, 3 bit eight per three bytes).
    s_pos, z_pos, s_neg, z_neg: float32 ``[1, C_out]``, eq. 7's per-column params.
    bits (static): b.  packed (static): whether ``codes`` is packed.
    frac_bits (static): the integer form's ``I`` (:func:`int_form`) that the layer's
      integer path uses, chosen when quantizing so that int32 accumulation is exact
      (:func:`choose_frac_bits`); −1: no integer path (the layer runs fake-quant).

    The weight protocol every QLinear weight follows (:class:`jaxdq.quant.layers.QWeight`
    too): ``shape``, ``bits``, ``dequantize()``, ``stored_arrays()``, ``int_ok`` and
    ``int_product(x_codes, x_scale)``.
    """

    codes: jax.Array
    s_pos: jax.Array
    z_pos: jax.Array
    s_neg: jax.Array
    z_neg: jax.Array
    bits: int = struct.field(pytree_node=False, default=8)
    packed: bool = struct.field(pytree_node=False, default=False)
    frac_bits: int = struct.field(pytree_node=False, default=-1)

    @classmethod
    def from_kernel(cls, kernel: jax.Array, spec: "TwinLogSpec", *, pack: bool = True, x: Optional[jax.Array] = None,
                    act_bits: int = 8, frac_bits: Optional[int] = None) -> "TwinLogWeight":
        """Twin-log quantize a float ``[C_in, C_out]`` kernel (:func:`quantize_twinlog`).

        pack: pack the codes when ``C_out · bits`` fills whole bytes (else stored int8).
        x: calibration tokens ``[n, C_in]`` of the layer's (transformed) input: refine the
          search on the output error.  act_bits: the activation bits the integer path
          multiplies (sets the int32 headroom).  frac_bits: the integer form's ``I``
          (default :func:`choose_frac_bits`).
        """
        w = np.asarray(kernel, np.float32)
        bad = int(w.size - np.count_nonzero(np.isfinite(w)))
        if bad:
            raise ValueError(f"weight {tuple(w.shape)} holds {bad} NaN/inf values; refusing to quantize it")
        tw, wmax = _quantize_by_columns(jnp.asarray(w), spec, x)
        fb = _frac_bits_from_wmax(wmax, w.shape[0], act_bits) if frac_bits is None else int(frac_bits)
        tw = tw.replace(frac_bits=fb)
        if pack and (w.shape[1] * spec.bits) % 8 == 0 and spec.bits < 8:
            tw = tw.replace(codes=pack_codes(tw.codes, spec.bits), packed=True)
        return tw

    @property
    def params(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """``(s_pos, z_pos, s_neg, z_neg)``."""
        return self.s_pos, self.z_pos, self.s_neg, self.z_neg

    @property
    def shape(self) -> tuple[int, int]:
        """``(C_in, C_out)``."""
        rows, cols = self.codes.shape
        return (int(rows), int(cols) * 8 // self.bits if self.packed else int(cols))

    def unpacked(self) -> jax.Array:
        """int8 codes ``[C_in, C_out]`` whatever the storage."""
        return unpack_codes(self.codes, self.bits) if self.packed else self.codes

    def dequantize(self) -> jax.Array:
        """Eq. 7: float32 ``W_f [C_in, C_out]``."""
        return decode(self)

    def stored_arrays(self) -> list:
        """The arrays this weight stores (what weight bytes count)."""
        return [self.codes, *self.params]

    @property
    def int_ok(self) -> bool:
        """Whether the layer's integer path applies (a ``frac_bits`` was chosen)."""
        return self.frac_bits >= 0

    def int_form(self) -> "TwinLogInt":
        """:func:`int_form` with this weight's ``frac_bits``."""
        return int_form(self, self.frac_bits)

    def int_product(self, x_codes: jax.Array, x_scale: jax.Array) -> jax.Array:
        """Integer path: int8 activation codes × the shift/multiply weights ``w_int``, int32
        accumulation per :data:`INT_CHUNK` input channels, then ``x_scale · 2^shift``
        (:func:`twinlog_int_matmul`); float32 ``[..., C_out]``, within
        :func:`int_error_bound` of the fake-quant product."""
        return twinlog_int_matmul(x_codes, x_scale, self.int_form(), INT_CHUNK)


class TwinLogInt(NamedTuple):
    """Integer form: ``W ≈ w_int · 2^shift``.

    w_int: int32 ``[C_in, C_out]``, ``±m << (f − f_min)`` (0 for the zero code).
    shift: int32 ``[1, C_out]``, ``f_min − I``.
    """

    w_int: jax.Array
    shift: jax.Array


# ------------------------------------------------------------------ params


def _side_params(top: jax.Array, step: jax.Array, levels: int) -> tuple[jax.Array, jax.Array]:
    """``(s, z)`` putting level ``L − 1`` at ``top`` (> 0) with log step ``step``."""
    s = jnp.broadcast_to(jnp.asarray(step, jnp.float32), top.shape)
    return s, jnp.log2(top) / s - (levels - 1)


def _side_max(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-column max of the positive entries and of ``|negative entries|``, ``[1, C_out]``
    float32, floored at a tiny positive value for a column without such entries."""
    mp = jnp.max(jnp.where(w > 0, w, 0.0), axis=0, keepdims=True)
    mn = jnp.max(jnp.where(w < 0, -w, 0.0), axis=0, keepdims=True)
    return jnp.maximum(mp, _TINY), jnp.maximum(mn, _TINY)


def _side_min(w: jax.Array, positive: bool) -> jax.Array:
    a = jnp.where(w > 0, w, jnp.inf) if positive else jnp.where(w < 0, -w, jnp.inf)
    m = jnp.min(a, axis=0, keepdims=True)
    return jnp.where(jnp.isfinite(m), m, 1.0)


@functools.partial(jax.jit, static_argnames="spec")
def minmax_params(w: jax.Array, spec: TwinLogSpec):
    """Literal min-max log range (α = β = 1): per side, levels from ``min|w|`` to ``max|w|``.

    Args:
      w: ``[C_in, C_out]`` float weight.
    Returns:
      ``(s_pos, z_pos, s_neg, z_neg)`` float32 ``[1, C_out]``.
    """
    w = jnp.asarray(w, jnp.float32)
    out = []
    for positive, top, levels in zip((True, False), _side_max(w), (spec.levels_pos, spec.levels_neg)):
        lo = jnp.minimum(_side_min(w, positive), top)
        step = jnp.maximum((jnp.log2(top) - jnp.log2(lo)) / max(levels - 1, 1), _MIN_STEP)
        out.extend(_side_params(top, step, levels))
    return tuple(out)


@functools.partial(jax.jit, static_argnames="spec")
def clip_params(w: jax.Array, alpha, beta, step_pos, step_neg, spec: TwinLogSpec):
    """Params for given clipping factors and log steps.

    Args:
      w: ``[C_in, C_out]`` float weight.
      alpha, beta: scalars or ``[1, C_out]``; top levels ``α·max⁺`` and ``β·max⁻``.
      step_pos, step_neg: scalars or ``[1, C_out]``, the log steps ``s⁺, s⁻`` (> 0).
    Returns:
      ``(s_pos, z_pos, s_neg, z_neg)`` float32 ``[1, C_out]``.
    """
    mp, mn = _side_max(jnp.asarray(w, jnp.float32))
    return (*_side_params(alpha * mp, step_pos, spec.levels_pos),
            *_side_params(beta * mn, step_neg, spec.levels_neg))


# ------------------------------------------------------------------ encode / decode


def _side_q(a: jax.Array, s: jax.Array, z: jax.Array, levels: int, zero_underflow: bool):
    """Log codes ``q`` (float32) of magnitudes ``a`` (> 0 where used) and the mask of
    entries that stay nonzero."""
    lg = jnp.log2(jnp.where(a > 0, a, 1.0))
    q = jnp.clip(jnp.round(lg / s - z), 0, levels - 1)
    keep = a > 0
    if zero_underflow:
        keep = keep & (a >= 0.5 * jnp.exp2(s * z))
    return q, keep


@functools.partial(jax.jit, static_argnames="spec")
def encode(w: jax.Array, s_pos, z_pos, s_neg, z_neg, spec: TwinLogSpec) -> jax.Array:
    """int8 codes ``[C_in, C_out]`` of ``w`` (module docstring format) for the given params."""
    w = jnp.asarray(w, jnp.float32)
    qp, kp = _side_q(w, s_pos, z_pos, spec.levels_pos, spec.zero_underflow)
    qn, kn = _side_q(-w, s_neg, z_neg, spec.levels_neg, spec.zero_underflow)
    c = jnp.where(kp, qp + 1, 0.0) - jnp.where(kn, qn + 1, 0.0)
    return c.astype(jnp.int8)


@jax.jit
def decode(tw: TwinLogWeight) -> jax.Array:
    """Eq. 7: float32 ``W_f [C_in, C_out]`` of a :class:`TwinLogWeight`."""
    c = tw.unpacked().astype(jnp.float32)
    pos = jnp.exp2(tw.s_pos * (c - 1 + tw.z_pos))
    neg = jnp.exp2(tw.s_neg * (-c - 1 + tw.z_neg))
    return jnp.where(c > 0, pos, 0.0) - jnp.where(c < 0, neg, 0.0)


def _side_dequant(a, s, z, levels, zero_underflow):
    """Dequantized magnitudes of one side's entries ``a`` (0 where the code is zero)."""
    q, keep = _side_q(a, s, z, levels, zero_underflow)
    return jnp.where(keep, jnp.exp2(s * (q + z)), 0.0)


# ------------------------------------------------------------------ search


def _running_best(best, cand):
    better = cand[0] < best[0]
    return tuple(jnp.where(better, c, b) for c, b in zip(cand, best))


@functools.partial(jax.jit, static_argnames="spec")
def search_weight_error(w: jax.Array, spec: TwinLogSpec):
    """Per column and side, the grid point (α or β, s) of least ``‖W − W_f‖²``.

    Args:
      w: ``[C_in, C_out]`` float weight.
    Returns:
      ``(s_pos, z_pos, s_neg, z_neg)`` float32 ``[1, C_out]``; the min-max params
      (:func:`minmax_params`) when ``spec.search`` is False.
    """
    w = jnp.asarray(w, jnp.float32)
    init = minmax_params(w, spec)
    if not spec.search:
        return init
    ap, an = jnp.where(w > 0, w, 0.0), jnp.where(w < 0, -w, 0.0)
    mp, mn = _side_max(w)
    sides = ((ap, mp, spec.levels_pos), (an, mn, spec.levels_neg))

    def side_err(a, s, z, levels):
        d = _side_dequant(a, s, z, levels, spec.zero_underflow) - a
        return jnp.sum(jnp.where(a > 0, d * d, 0.0), axis=0, keepdims=True)

    best = tuple((side_err(a, init[2 * k], init[2 * k + 1], lv), init[2 * k], init[2 * k + 1])
                 for k, (a, _, lv) in enumerate(sides))
    alphas, steps = spec.grid()

    def body(i, best):
        out = []
        for (a, m, lv), b in zip(sides, best):
            s, z = _side_params(alphas[i] * m, steps[i], lv)
            out.append(_running_best(b, (side_err(a, s, z, lv), s, z)))
        return tuple(out)

    (_, sp, zp), (_, sn, zn) = jax.lax.fori_loop(0, alphas.shape[0], body, best)
    return sp, zp, sn, zn


@functools.partial(jax.jit, static_argnames=("spec", "rounds"))
def refine_output_error(w: jax.Array, x: jax.Array, params, spec: TwinLogSpec, rounds: int = 1):
    """Coordinate descent of ``‖X W − X W_f‖²`` per column over the same grid.

    Args:
      w: ``[C_in, C_out]`` float weight.
      x: ``[n, C_in]`` calibration tokens (any float dtype).
      params: starting ``(s_pos, z_pos, s_neg, z_neg)``, e.g. from :func:`search_weight_error`.
      rounds: passes over (positive side, negative side).
    Returns:
      refined ``(s_pos, z_pos, s_neg, z_neg)``; per column the output error is never
      above that of the starting params.
    """
    w = jnp.asarray(w, jnp.float32)
    x = jnp.asarray(x, jnp.float32)
    a_sides = (jnp.where(w > 0, w, 0.0), jnp.where(w < 0, -w, 0.0))
    m_sides = _side_max(w)
    levels = (spec.levels_pos, spec.levels_neg)
    sign = (1.0, -1.0)
    alphas, steps = spec.grid()

    def side_delta(k, s, z):
        """Signed contribution of side k to ``W_f − W``."""
        a = a_sides[k]
        return sign[k] * (_side_dequant(a, s, z, levels[k], spec.zero_underflow) - a)

    params = list(params)
    for _ in range(rounds):
        for k in (0, 1):
            o = 1 - k
            e_other = x @ side_delta(o, params[2 * o], params[2 * o + 1])

            def err(s, z, k=k, e_other=e_other):
                e = x @ side_delta(k, s, z) + e_other
                return jnp.sum(e * e, axis=0, keepdims=True)

            def body(i, best, k=k, err=err):
                s, z = _side_params(alphas[i] * m_sides[k], steps[i], levels[k])
                return _running_best(best, (err(s, z), s, z))

            s0, z0 = params[2 * k], params[2 * k + 1]
            _, s, z = jax.lax.fori_loop(0, alphas.shape[0], body, (err(s0, z0), s0, z0))
            params[2 * k], params[2 * k + 1] = s, z
    return tuple(params)


def quantize_twinlog(w: jax.Array, spec: TwinLogSpec, x: Optional[jax.Array] = None,
                     rounds: int = 1) -> TwinLogWeight:
    """Twin-log quantize ``w [C_in, C_out]``: search the params, encode.

    ``x [n, C_in]`` (optional): calibration tokens; the weight-error search result is
    then refined on the output error (:func:`refine_output_error`, ``rounds`` passes).
    """
    w = jnp.asarray(w, jnp.float32)
    if w.ndim != 2:
        raise ValueError(f"twin-log quantization needs a [C_in, C_out] weight, got shape {w.shape}")
    params = search_weight_error(w, spec)
    if x is not None and spec.search:
        params = refine_output_error(w, x, params, spec, rounds)
    return TwinLogWeight(encode(w, *params, spec), *params, bits=spec.bits)


#: :meth:`TwinLogWeight.from_kernel` quantizes a weight in blocks of this many output
#: columns (the last zero-padded): every step is per column, so the result is the same as
#: one call on the whole weight, and the jitted search / encode / frac-bits functions
#: compile once per C_in instead of once per layer shape (most of a model's quantize time).
COLUMN_BLOCK = 128


def _quantize_by_columns(w: jax.Array, spec: TwinLogSpec, x: Optional[jax.Array]):
    """:func:`quantize_twinlog` of ``w [C_in, C_out]`` by :data:`COLUMN_BLOCK` columns, and the
    float64 ``[MAX_FRAC_BITS + 1]`` ``max|w_int|`` per ``I`` (:func:`choose_frac_bits`)."""
    n = w.shape[1]
    cb = COLUMN_BLOCK if n > COLUMN_BLOCK else n
    pad = (-n) % cb
    wp = jnp.pad(w, ((0, 0), (0, pad))) if pad else w   # zero columns: zero codes, sliced off
    parts = [quantize_twinlog(wp[:, i:i + cb], spec, x) for i in range(0, n + pad, cb)]
    wmax = np.max([np.asarray(_max_w_int(p, MAX_FRAC_BITS + 1), np.float64) for p in parts], axis=0)
    if len(parts) == 1 and not pad:
        return parts[0], wmax
    cat = lambda f: jnp.concatenate([getattr(p, f) for p in parts], axis=1)[:, :n]  # noqa: E731
    return TwinLogWeight(cat("codes"), cat("s_pos"), cat("z_pos"), cat("s_neg"), cat("z_neg"), bits=spec.bits), wmax


def _frac_bits_from_wmax(wmax: np.ndarray, c_in: int, act_bits: int = 8, chunk: int = None) -> int:
    """:func:`choose_frac_bits` from ``max|w_int|`` per ``I = 0 … len(wmax) − 1``."""
    chunk = INT_CHUNK if chunk is None else chunk
    k = min(c_in, chunk) if chunk else c_in
    ok = (2.0 ** (act_bits - 1)) * np.asarray(wmax, np.float64) * k < 2.0 ** 31
    return int(np.flatnonzero(ok).max()) if ok.any() else -1


def fake_quant_twinlog(w: jax.Array, spec: TwinLogSpec, x: Optional[jax.Array] = None) -> jax.Array:
    """Quantize-dequantize ``w``: float32 ``[C_in, C_out]``."""
    return decode(quantize_twinlog(w, spec, x))


def level_sets(tw: TwinLogWeight, column: int, bits: int) -> np.ndarray:
    """Sorted float64 values that column ``column`` of a ``bits``-bit weight can take
    (zero included): ``{0} ∪ {2^{s⁺(q+z⁺)}} ∪ {−2^{s⁻(q+z⁻)}}``."""
    sp, zp, sn, zn = (float(np.asarray(v, np.float64)[0, column]) for v in tw.params)
    pos = [2.0 ** (sp * (q + zp)) for q in range(2 ** (bits - 1) - 1)]
    neg = [-(2.0 ** (sn * (q + zn))) for q in range(2 ** (bits - 1))]
    return np.asarray(sorted([0.0] + pos + neg))


# ------------------------------------------------------------------ packing


@functools.partial(jax.jit, static_argnames="bits")
def pack_codes(codes: jax.Array, bits: int) -> jax.Array:
    """Pack b-bit codes into a little-endian bit stream along the last axis.

    Args:
      codes: int8 ``[..., n]`` in ``[−2^{b−1}, 2^{b−1} − 1]``, ``n·b`` a multiple of 8.
      bits: b, 2..8.
    Returns:
      uint8 ``[..., n·b/8]``; code ``i`` in bits ``[i·b, (i+1)·b)`` (4 bit: element 2i in
      the low nibble, as :func:`jaxdq.quant.quantizer.pack_int4`; 3 bit: 8 codes per 3 bytes).
    """
    codes = jnp.asarray(codes)
    n = codes.shape[-1]
    if (n * bits) % 8:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes")
    u = codes.astype(jnp.int32) & ((1 << bits) - 1)
    bitv = (u[..., None] >> jnp.arange(bits)) & 1                     # [..., n, b], LSB first
    bitv = bitv.reshape(codes.shape[:-1] + (n * bits // 8, 8))
    return jnp.sum(bitv << jnp.arange(8), axis=-1).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames="bits")
def unpack_codes(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of :func:`pack_codes`: uint8 ``[..., m]`` → int8 ``[..., 8m/b]`` (sign-extended)."""
    packed = jnp.asarray(packed)
    m = packed.shape[-1]
    if (8 * m) % bits:
        raise ValueError(f"{m} bytes do not hold a whole number of {bits}-bit codes")
    bitv = (packed.astype(jnp.int32)[..., None] >> jnp.arange(8)) & 1   # [..., m, 8]
    bitv = bitv.reshape(packed.shape[:-1] + (8 * m // bits, bits))
    u = jnp.sum(bitv << jnp.arange(bits), axis=-1)
    return jnp.where(u >= 1 << (bits - 1), u - (1 << bits), u).astype(jnp.int8)


# ------------------------------------------------------------------ integer form


def _exponents(tw: TwinLogWeight) -> jax.Array:
    """float32 ``e = s(q + z)`` of every entry (unused where the code is 0)."""
    c = tw.unpacked().astype(jnp.float32)
    return jnp.where(c > 0, tw.s_pos * (c - 1 + tw.z_pos), tw.s_neg * (-c - 1 + tw.z_neg))


@functools.partial(jax.jit, static_argnames="frac_bits")
def int_form(tw: TwinLogWeight, frac_bits: int) -> TwinLogInt:
    """Integer form of a twin-log weight with ``I = frac_bits`` fraction bits.

    Per entry ``e = f + r``, ``m = round(2^r · 2^I)``; per column ``f_min`` = the
    smallest ``f`` among its nonzero entries (0 for an all-zero column);
    ``w_int = ±m << (f − f_min)``, ``shift = f_min − I``.  Needs
    ``I + 1 + max(f − f_min) ≤ 30`` (int32); ``I ≤ 12`` keeps it for any grid step ≤ 2.
    """
    if not 0 <= frac_bits <= 12:
        raise ValueError(f"frac_bits must be in 0..12, got {frac_bits}")
    e = _exponents(tw)
    codes = tw.unpacked()
    nz = codes != 0
    f = jnp.floor(e)
    r = e - f
    m = jnp.round(jnp.exp2(r) * (1 << frac_bits)).astype(jnp.int32)   # in [2^I, 2^{I+1}]
    fi = f.astype(jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    f_min = jnp.min(jnp.where(nz, fi, big), axis=0, keepdims=True)
    f_min = jnp.where(f_min == big, 0, f_min)
    mag = jnp.left_shift(m, jnp.where(nz, fi - f_min, 0))
    w_int = jnp.where(codes > 0, mag, jnp.where(codes < 0, -mag, 0))
    return TwinLogInt(w_int.astype(jnp.int32), (f_min - frac_bits).astype(jnp.int32))


@jax.jit
def int_dequantize(iw: TwinLogInt) -> jax.Array:
    """float32 ``w_int · 2^shift`` (exact for |w_int| < 2^24)."""
    return iw.w_int.astype(jnp.float32) * jnp.exp2(iw.shift.astype(jnp.float32))


def int_error_bound(x_hat: jax.Array, w_f: jax.Array, frac_bits: int) -> jax.Array:
    """Bound on ``|y_int − y_fq|``: ``2^{−I−1} (|x̂| @ |W_f|)``, shape ``[..., C_out]``.

    x_hat: dequantized activations ``[..., C_in]``; w_f: eq. 7 weights ``[C_in, C_out]``.
    (Elementwise the weight bound is ``2^{−I−1−r} |w_f| ≤ 2^{−I−1} |w_f|``.)
    """
    return 2.0 ** (-frac_bits - 1) * (jnp.abs(x_hat) @ jnp.abs(w_f))


def int_accumulation_exact(iw: TwinLogInt, x_bits: int = 8, chunk: int = 0) -> bool:
    """Whether int32 accumulation of ``x_codes @ w_int`` can never overflow (host check):
    ``2^{x_bits−1} · max|w_int| · K < 2^31``, ``K`` = C_in, or ``chunk`` when the sum runs
    in int32 over chunks of that many input channels (:func:`twinlog_int_matmul`)."""
    c_in = iw.w_int.shape[0]
    k = min(c_in, chunk) if chunk else c_in
    wmax = int(np.abs(np.asarray(iw.w_int, np.int64)).max(initial=0))
    return (2 ** (x_bits - 1)) * wmax * k < 2 ** 31


#: The integer path's K chunk: int32 partial sums over at most this many input channels
#: (a GEMM's K tile), added in float32 — what a tiled integer GEMM computes.  It gives the
#: int32 headroom for ``I`` = 10 at the usual log ranges whatever C_in (over all of C_in,
#: DiT-XL's 4608-channel fc2 fits only ``I`` ≈ 2–3, a 2^{-3}–2^{-4} bound).
INT_CHUNK = 128


#: The largest integer-form fraction count :func:`choose_frac_bits` picks (bound 2^-11).
MAX_FRAC_BITS = 10


@functools.partial(jax.jit, static_argnames="count")
def _max_w_int(tw: TwinLogWeight, count: int) -> jax.Array:
    """float32 ``[count]``: ``max|w_int|`` of :func:`int_form` for ``I = 0 … count−1`` (the
    same float32 arithmetic; exact, as ``m ≤ 2^{I+1}`` and the shifts are powers of two)."""
    e = _exponents(tw)
    nz = tw.unpacked() != 0
    f = jnp.floor(e)
    r = e - f
    big = jnp.float32(3e38)
    f_min = jnp.min(jnp.where(nz, f, big), axis=0, keepdims=True)
    shift = jnp.exp2(jnp.where(nz, f - jnp.where(f_min == big, 0.0, f_min), 0.0))

    def one(i):
        m = jnp.round(jnp.exp2(r) * jnp.exp2(i.astype(jnp.float32)))
        return jnp.max(jnp.where(nz, m * shift, 0.0), initial=0.0)

    return jax.lax.map(one, jnp.arange(count))


def choose_frac_bits(tw: TwinLogWeight, act_bits: int = 8, max_frac_bits: int = MAX_FRAC_BITS,
                     chunk: int = INT_CHUNK) -> int:
    """The largest ``I ≤ max_frac_bits`` whose integer form accumulates exactly in int32
    against ``act_bits``-bit activation codes (:func:`int_accumulation_exact`:
    ``2^{act_bits−1} · max|w_int| · min(C_in, chunk) < 2^31``), or −1 if even ``I = 0``
    can overflow (host check, at quantization time).

    ``max|w_int|`` grows as ``2^{I+1+max(f−f_min)}``, so the choice trades the bound
    ``2^{−I−1}`` against the column's exponent range and ``C_in``.
    """
    wmax = np.asarray(_max_w_int(tw, max_frac_bits + 1), np.float64)
    return _frac_bits_from_wmax(wmax, tw.shape[0], act_bits, chunk)


@functools.partial(jax.jit, static_argnames="chunk")
def twinlog_int_matmul(x_codes: jax.Array, x_scale: jax.Array, iw: TwinLogInt, chunk: int = 0) -> jax.Array:
    """Integer-path linear: ``x_scale · 2^shift · (x_codes @ w_int)``.

    Args:
      x_codes: int8 ``[..., C_in]`` activation codes (symmetric, zero point 0).
      x_scale: float ``[..., 1]`` (per token) or ``[]``.
      iw: :func:`int_form` of the weight.
      chunk: 0 = one int32 accumulation over all of C_in; else int32 partial sums over
        chunks of ``chunk`` input channels (C_in zero-padded to a multiple), added in
        float32 (:data:`INT_CHUNK`).
    Returns:
      float32 ``[..., C_out]``; within :func:`int_error_bound` of
      ``(x_scale · x_codes) @ decode(tw)`` (plus float32 rounding) when
      :func:`int_accumulation_exact` (with the same ``chunk``) holds.

    A reference of the arithmetic (int32 operands); where ``max|w_int| ≤ 127`` the same
    ``w_int`` can be cast to int8 for an int8×int8→int32 GEMM.
    """
    col = jnp.exp2(iw.shift.astype(jnp.float32))[0]
    xc = x_codes.astype(jnp.int32)
    c_in = xc.shape[-1]
    if not chunk or chunk >= c_in:
        acc = jax.lax.dot_general(xc, iw.w_int, ((((xc.ndim - 1),), (0,)), ((), ())),
                                  preferred_element_type=jnp.int32).astype(jnp.float32)
    else:
        nc = -(-c_in // chunk)
        pad = nc * chunk - c_in
        xp = jnp.pad(xc, [(0, 0)] * (xc.ndim - 1) + [(0, pad)]).reshape(xc.shape[:-1] + (nc, chunk))
        wp = jnp.pad(iw.w_int, ((0, pad), (0, 0))).reshape(nc, chunk, -1)
        part = jnp.einsum("...ck,ckn->...cn", xp, wp, preferred_element_type=jnp.int32)   # int32 per chunk
        acc = jnp.sum(part.astype(jnp.float32), axis=-2)
    return acc * col * jnp.asarray(x_scale, jnp.float32)
