"""Typed layers: the float and quantized linear (and convolution) as registered pytree nodes.

A model's params tree holds, at each linear layer's module path, either the Flax-native
float dict ``{"kernel": [C_in, C_out], "bias": [C_out]}`` (what ``init`` and the
converters make) or one of the dataclasses below.  Only this module knows that layout:
:func:`as_layer` views a node as a typed layer, :func:`to_node` stores one back, and
:func:`iter_layers` / :func:`map_layers` walk a tree.  Everything else works on typed
layers.

Every linear computes the same reference forward, written once in :func:`forward`::

    X' = T(X)            = rotation(X / smooth)             (InputTransform.apply)
    Y  = P(X') + (X' L1) L2 + b                            (P: the layer's main product)

``P`` is ``X' W`` for a :class:`FloatLinear`; for a :class:`QLinear` it is
``Q_a(X') · deq(W_q)`` (fake quantization, :meth:`QLinear.product_fake`) or the integer
accumulator form an int8 GEMM computes (:meth:`QLinear.product_int`).  Which one runs is
not part of the layer: :mod:`jaxdq.backend` decides it.

A 2-D convolution's params are the Flax-native ``{"kernel": [kh, kw, C_in, C_out] (HWIO),
"bias"}`` (viewed as a :class:`FloatConv`) or a :class:`QConv`; the conv geometry (strides,
padding) is the calling module's (:class:`ConvGeometry`).  The tree walkers see convs as
layers too.

Static numerical configuration (bits, granularity, packing, storage layout) is pytree aux
data, so ``jax.jit`` specialises on it and ``jax.tree_util`` sees only arrays.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdq.quant.quantizer import (QuantSpec, compute_qparams, dequantize, fake_quant, pack_int4, quantize,
                                   unpack_int4)

Array = jax.Array


# --------------------------------------------------------------------------- input transforms
@struct.dataclass
class InputTransform:
    """The float-equivalent transforms of a layer's input, in their one order.

    ``apply(x) = rotation(x / smooth)``; the low-rank branch ``(X' L1) L2`` reads the
    transformed input.  The layer's weight already holds the inverses, so the layer
    computes the function it computed before the transforms (up to rounding).

    Fields (all optional):
      smooth: float32 ``[C_in]`` per-input-channel divisor (SmoothQuant / channel balancing).
      rotation: a rotation node (:class:`jaxdq.quant.hadamard.BlockHadamard`, ...) with
        ``apply(x)``, ``rotate_weight(w)`` (``Rᵀ W``) and ``unrotate_weight(w)`` (``R W``).
      lowrank_a, lowrank_b: ``[C_in, r]`` and ``[r, C_out]`` factors of the 16-bit branch.
    """

    smooth: Optional[Array] = None
    rotation: Any = None
    lowrank_a: Optional[Array] = None
    lowrank_b: Optional[Array] = None

    @property
    def is_identity(self) -> bool:
        return self.smooth is None and self.rotation is None and self.lowrank_a is None

    @property
    def rank(self) -> int:
        return 0 if self.lowrank_a is None else int(self.lowrank_a.shape[1])

    def apply(self, x: Array) -> Array:
        """``rotation(x / smooth)`` for ``x [..., C_in]`` (same dtype)."""
        if self.smooth is not None:
            x = x / self.smooth.astype(x.dtype)
        if self.rotation is not None:
            x = self.rotation.apply(x)
        return x

    def lowrank(self, xt: Array) -> Optional[Array]:
        """``(X' L1) L2`` ``[..., C_out]`` in ``xt.dtype``, or None without a branch."""
        if self.lowrank_a is None:
            return None
        return jnp.dot(jnp.dot(xt, self.lowrank_a.astype(xt.dtype)), self.lowrank_b.astype(xt.dtype))


IDENTITY = InputTransform()


def forward(transform: InputTransform, bias: Optional[Array], x: Array, product: Callable[[Array], Array],
            dtype) -> Array:
    """The reference forward of every linear layer: ``P(X') + (X' L1) L2 + b``, ``X' = T(x)``.

    Args:
      transform: the layer's :class:`InputTransform`.
      bias: ``[C_out]`` or None.
      x: ``[..., C_in]``.
      product: ``X' [..., C_in] -> [..., C_out]``, the layer's main product.
      dtype: the compute dtype (float layers: ``x.dtype``; quantized layers: float32).
    Returns:
      ``[..., C_out]`` in ``x.dtype``.
    """
    out_dtype = x.dtype
    xt = transform.apply(x.astype(dtype))
    y = product(xt)
    lr = transform.lowrank(xt)
    if lr is not None:
        y = y + lr
    if bias is not None:
        y = y + bias.astype(dtype)
    return y.astype(out_dtype)


# --------------------------------------------------------------------------- float linear
@struct.dataclass
class FloatLinear:
    """A float linear layer ``Y = T(X) W + (T(X) L1) L2 + b``.

    kernel: ``[C_in, C_out]`` (holding the inverses of ``transform``); bias ``[C_out]`` or None.
    Stored in a params tree as the plain ``{"kernel", "bias"}`` dict when ``transform`` is
    the identity (:func:`to_node`).
    """

    kernel: Array
    bias: Optional[Array] = None
    transform: InputTransform = IDENTITY

    @property
    def in_features(self) -> int:
        return int(self.kernel.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.kernel.shape[1])

    def product(self, xt: Array) -> Array:
        return jnp.dot(xt, self.kernel.astype(xt.dtype))

    def __call__(self, x: Array) -> Array:
        return forward(self.transform, self.bias, x, self.product, x.dtype)

    def effective_kernel(self) -> Array:
        """float32 ``[C_in, C_out]`` ``W_eff`` with ``layer(x) = x W_eff + b`` (transforms folded out)."""
        return effective_kernel(self.transform, jnp.asarray(self.kernel, jnp.float32))


def effective_kernel(t: InputTransform, w: Array) -> Array:
    """The kernel seen from the raw input: ``diag(1/smooth) · R · (W + L1 L2)``."""
    if t.lowrank_a is not None:
        w = w + t.lowrank_a.astype(jnp.float32) @ t.lowrank_b.astype(jnp.float32)
    if t.rotation is not None:
        w = t.rotation.unrotate_weight(w)
    if t.smooth is not None:
        w = w / t.smooth.astype(jnp.float32)[:, None]
    return w


# --------------------------------------------------------------------------- quantized pieces
@struct.dataclass
class QWeight:
    """Integer weight codes of a ``[C_in, C_out]`` kernel with their qparams.

    codes: int8 ``[C_in, C_out]`` (uint8 if asymmetric); packed 4-bit: uint8
      ``[C_in, C_out // 2]``, two codes per byte along C_out, element 2i in the low nibble.
      With ``layout="nk"`` the codes are stored transposed, ``[C_out, C_in]`` (packed
      ``[C_out, C_in // 2]``): the K-major layout the GPU kernels read directly.
    scale: float32 ``[1, C_out]`` (channel), ``[C_in // G, C_out]`` (group) or ``[]`` (tensor).
    zero: like ``scale`` for asymmetric codes, else None.
    """

    codes: Array
    scale: Array
    zero: Optional[Array] = None
    spec: QuantSpec = struct.field(pytree_node=False, default=QuantSpec())
    packed: bool = struct.field(pytree_node=False, default=False)
    layout: str = struct.field(pytree_node=False, default="kn")

    @classmethod
    def from_kernel(cls, kernel: Array, spec: QuantSpec, *, pack: bool = False,
                    scale_dtype=None) -> "QWeight":
        """Quantize a float ``[C_in, C_out]`` kernel (round to nearest).  ``scale_dtype``
        (e.g. float16): store the scales rounded to it, codes computed against the rounded
        scales, so the stored pair is exactly what the layer uses."""
        w = jnp.asarray(kernel, jnp.float32)
        bad = int(np.size(w) - np.count_nonzero(np.isfinite(np.asarray(w))))
        if bad:
            raise ValueError(f"weight {tuple(w.shape)} holds {bad} NaN/inf values; refusing to quantize it")
        scale, zero = compute_qparams(w, spec, kind="weight")
        if scale_dtype is not None and spec.granularity != "tensor":
            if not spec.symmetric:
                raise ValueError("scale_dtype applies to symmetric weight quantization only")
            scale = scale.astype(scale_dtype)
        codes = quantize(w, scale.astype(jnp.float32), zero, spec, kind="weight")
        if pack:
            if spec.bits > 4:
                raise ValueError(f"int4 packing needs weight bits <= 4, got {spec.bits}")
            codes = pack_int4(codes)
        return cls(codes=codes, scale=scale, zero=zero, spec=spec, packed=pack)

    @property
    def shape(self) -> tuple[int, int]:
        """``(C_in, C_out)``."""
        rows, cols = self.codes.shape
        cols *= 2 if self.packed else 1
        return (cols, rows) if self.layout == "nk" else (rows, cols)

    def unpacked(self) -> Array:
        """Integer codes ``[C_in, C_out]`` whatever the storage."""
        codes = unpack_int4(self.codes, signed=self.spec.symmetric) if self.packed else self.codes
        return codes.T if self.layout == "nk" else codes

    def stored(self) -> Array:
        """Codes in their storage layout; packed 4-bit codes as a ``jnp.int4``/``uint4``
        view of the bytes (XLA's nibble order is ours), so no unpacked copy is made."""
        if not self.packed:
            return self.codes
        rows, half = self.codes.shape
        nibble = jnp.int4 if self.spec.symmetric else jnp.uint4
        return jax.lax.bitcast_convert_type(self.codes, nibble).reshape(rows, 2 * half)

    def dequantize(self) -> Array:
        """float32 ``[C_in, C_out]``."""
        return dequantize(self.unpacked(), self.scale, self.zero, self.spec, kind="weight")

    # -- the weight protocol (see QLinear): bits, stored_arrays, int_ok, int_product
    @property
    def bits(self) -> int:
        return self.spec.bits

    def stored_arrays(self) -> list:
        """The arrays this weight stores (codes, scales, zero points; what weight bytes count)."""
        return [a for a in (self.codes, self.scale, self.zero) if a is not None]

    @property
    def int_ok(self) -> bool:
        """Whether :meth:`int_product` computes this weight: symmetric, per channel or tensor."""
        return self.spec.symmetric and self.spec.granularity in ("channel", "tensor")

    def int_product(self, x_codes: Array, x_scale: Array) -> Array:
        """int8 activation codes ``[..., C_in]`` × the codes as stored, int32 accumulation
        (an "nk" layout is contracted in place, packed int4 through a ``jnp.int4`` view,
        so a GEMV-like call reads each weight byte once), then ``s_x · s_w``: float32
        ``[..., C_out]``."""
        contract = 1 if self.layout == "nk" else 0
        # FP8 (spec.fmt "e4m3"): float8 × float8 with an f32 accumulator (the fp8 GEMM on a GPU)
        code, acc_t = (jnp.float8_e4m3fn, jnp.float32) if self.spec.fmt == "e4m3" else (jnp.int8, jnp.int32)
        acc = jax.lax.dot_general(x_codes.astype(code), self.stored().astype(code),
                                  (((x_codes.ndim - 1,), (contract,)), ((), ())), preferred_element_type=acc_t)
        return acc.astype(jnp.float32) * x_scale * self.scale.astype(jnp.float32).reshape(-1)

    def to_layout(self, layout: str) -> "QWeight":
        """The same codes stored as ``layout`` ("kn" ``[C_in, C_out]`` or "nk" ``[C_out, C_in]``)."""
        if layout not in ("kn", "nk"):
            raise ValueError(f"layout must be 'kn' or 'nk', got {layout!r}")
        if layout == self.layout:
            return self
        codes = self.unpacked()
        out = codes.T if layout == "nk" else codes
        return self.replace(codes=pack_int4(out) if self.packed else out, layout=layout)


@struct.dataclass
class ActQuant:
    """How a layer's input activation is quantized.

    spec: the activation QuantSpec.  Dynamic (``scale`` None): the range comes from the
    tensor at every call.  Static: ``scale``/``zero`` ``[]`` per tensor from calibration;
    per timestep: ``[S]`` with ``t [S]`` int32 the calibration timesteps, resolved to the
    nearest one by :func:`jaxdq.quant.timestep.at_timestep` before the layer runs.

    split (static, Q-Diffusion's shortcut splitting; static qparams only): the input is a
    channel concatenation ``[a, b]`` with ``a = x[..., :split]``, and each half has its own
    range: ``scale``/``zero`` get a trailing axis of 2 (``[2]``, per timestep ``[S, 2]``),
    entry 0 for ``a``, 1 for ``b``.  :meth:`parts` gives the two halves as plain ActQuants.
    """

    spec: QuantSpec = struct.field(pytree_node=False, default=QuantSpec(granularity="token"))
    scale: Optional[Array] = None
    zero: Optional[Array] = None
    t: Optional[Array] = None
    split: Optional[int] = struct.field(pytree_node=False, default=None)

    @property
    def static(self) -> bool:
        return self.scale is not None

    def check_resolved(self) -> None:
        if self.t is not None:
            raise ValueError("this layer has per-timestep activation qparams; resolve them with "
                             "jaxdq.quant.timestep.at_timestep(params, t) before calling the model")

    def parts(self, channels: int) -> list[tuple[int, int, "ActQuant"]]:
        """``[(lo, hi, act)]``: channel ranges of an input of ``channels`` channels and the
        unsplit ActQuant of each (one entry without ``split``)."""
        self.check_resolved()
        if self.split is None:
            return [(0, channels, self)]
        if not 0 < self.split < channels:
            raise ValueError(f"activation split {self.split} outside an input of {channels} channels")
        half = lambda a, i: None if a is None else a[..., i]  # noqa: E731
        return [(lo, hi, ActQuant(spec=self.spec, scale=half(self.scale, i), zero=half(self.zero, i)))
                for i, (lo, hi) in enumerate(((0, self.split), (self.split, channels)))]

    def fake(self, x: Array) -> Array:
        """``Q_a(x)`` (quantize-dequantize), same shape and dtype."""
        self.check_resolved()
        if self.split is not None:
            return jnp.concatenate([a.fake(x[..., lo:hi]) for lo, hi, a in self.parts(x.shape[-1])], axis=-1)
        return fake_quant(x, self.spec, kind="activation", scale=self.scale, zero=self.zero)

    def codes(self, x: Array) -> tuple[Array, Array, Optional[Array]]:
        """``(codes, scale, zero)`` of ``x`` (dynamic or the stored static qparams); a split
        activation has one (scale, zero) per half: take its :meth:`parts`."""
        self.check_resolved()
        if self.split is not None:
            raise ValueError("a split activation has one range per half: quantize its parts()")
        if self.static:
            return quantize(x, self.scale, self.zero, self.spec, kind="activation"), self.scale, self.zero
        scale, zero = compute_qparams(x, self.spec, kind="activation")
        return quantize(x, scale, zero, self.spec, kind="activation"), scale, zero


def static_act_quant(lo, hi, spec: QuantSpec, t=None, split: Optional[int] = None) -> ActQuant:
    """Static :class:`ActQuant` for the range ``[lo, hi]`` (scalars, ``[S]`` with ``t``; with
    ``split`` a trailing axis of 2, one range per half); the range is widened to include 0."""
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    if split is not None and (lo.ndim == 0 or lo.shape[-1] != 2):
        raise ValueError(f"a split activation needs ranges with a trailing axis of 2, got shape {lo.shape}")
    qp = lambda a, b: compute_qparams(jnp.stack([a, b]), spec, kind="activation")  # noqa: E731
    if lo.ndim:  # one qparam pair per entry, whatever the leading shape
        scale, zero = jax.vmap(qp)(lo.reshape(-1), hi.reshape(-1))
        scale = scale.reshape(lo.shape)
        zero = None if zero is None else zero.reshape(lo.shape)
    else:
        scale, zero = qp(lo, hi)
    return ActQuant(spec=spec, scale=scale, zero=zero, t=None if t is None else jnp.asarray(t, jnp.int32),
                    split=split)


# --------------------------------------------------------------------------- quantized linear
@struct.dataclass
class QLinear:
    """Quantized linear layer: ``Y = P(T(X)) + (T(X) L1) L2 + b`` with ``P`` the product of
    the quantized input and the dequantized integer weight.

    weight: the (transformed) kernel's weight node: a :class:`QWeight` (uniform codes) or
    any node of the weight protocol, e.g. :class:`jaxdq.quant.twinlog.TwinLogWeight`
    (``shape`` ``(C_in, C_out)``, ``bits``, ``dequantize() -> float32 [C_in, C_out]``,
    ``stored_arrays()``, ``int_ok`` and ``int_product(x_codes, x_scale)``, the integer
    path's product); act: :class:`ActQuant`, or None for weight-only quantization (float
    activations); bias: ``[C_out]`` or None; transform: the :class:`InputTransform`
    carried over from the float layer.
    """

    weight: Any
    act: Optional[ActQuant] = None
    bias: Optional[Array] = None
    transform: InputTransform = IDENTITY

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    @property
    def bits_label(self) -> str:
        return f"W{self.weight.bits}A{self.act.spec.bits if self.act else 16}"

    def product_fake(self, xt: Array) -> Array:
        """``Q_a(X') · deq(W_q)`` in float32 (the reference)."""
        xq = xt if self.act is None else self.act.fake(xt)
        return jnp.dot(xq, self.weight.dequantize())

    def int_path_ok(self) -> bool:
        """Whether :meth:`product_int` computes this layer: symmetric activation codes with
        one scale per token/tensor, and a weight whose ``int_ok`` holds (uniform: symmetric,
        per channel/tensor; twin-log: an integer form was chosen)."""
        a = self.act
        return (a is not None and a.spec.symmetric and a.spec.granularity in ("token", "tensor")
                and self.weight.int_ok
                and a.spec.fmt == getattr(getattr(self.weight, "spec", None), "fmt", "int"))  # int8×int8 / fp8×fp8

    def product_int(self, xt: Array) -> Array:
        """int8 activation codes × the weight's integer form with an int32 accumulator, then
        the scales: what an integer GEMM computes (``weight.int_product``; a QWeight reads
        its codes as stored, so a GEMV-like call reads each weight byte once)."""
        codes, s_x, _ = self.act.codes(xt)
        y = self.weight.int_product(codes, s_x)
        # NaN/inf policy: integer codes cannot carry a non-finite input; its output row is NaN
        return jnp.where(jnp.all(jnp.isfinite(xt), axis=-1, keepdims=True), y, jnp.nan)

    def __call__(self, x: Array) -> Array:
        """The fake-quant reference forward (the backend may run another implementation)."""
        return forward(self.transform, self.bias, x, self.product_fake, jnp.float32)

    def dequantized(self) -> FloatLinear:
        """The float layer with the weights this layer effectively uses (activation
        quantization dropped; transforms kept)."""
        return FloatLinear(kernel=self.weight.dequantize(), bias=self.bias, transform=self.transform)


# --------------------------------------------------------------------------- convolutions
@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """How a 2-D convolution slides: NHWC input, HWIO kernel, ``strides (sh, sw)`` and
    explicit ``padding ((top, bottom), (left, right))`` (hashable: static jit data).  Owned
    by the module that calls the layer (:class:`jaxdq.nn.Conv`), not stored in params."""

    strides: tuple = (1, 1)
    padding: tuple = ((0, 0), (0, 0))

    def __call__(self, x: Array, kernel: Array, preferred_element_type=None) -> Array:
        """``conv(x [N, H, W, C_in], kernel [kh, kw, C_in, C_out]) -> [N, H', W', C_out]``
        (XLA's convolution; ``preferred_element_type=jnp.int32`` for int8 operands)."""
        return jax.lax.conv_general_dilated(x, kernel, tuple(self.strides), tuple(map(tuple, self.padding)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            preferred_element_type=preferred_element_type)

    def patches(self, x: Array, kh: int, kw: int) -> Array:
        """im2col by slicing (any dtype, integer included): ``[N, H', W', kh·kw·C_in]`` with
        the feature axis in the kernel's HWI order, so ``patches @ kernel.reshape(-1, C_out)``
        is the convolution."""
        (pt, pb), (pl, pr) = self.padding
        sh, sw = self.strides
        xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        ho = (xp.shape[1] - kh) // sh + 1
        wo = (xp.shape[2] - kw) // sw + 1
        cols = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :] for i in range(kh) for j in range(kw)]
        return jnp.concatenate(cols, axis=-1)


def conv_geometry(kernel_size: int, stride: int = 1, padding=None) -> ConvGeometry:
    """The geometry of a square ``kernel_size`` conv: ``padding`` an int p (p on every side),
    explicit ``((top, bottom), (left, right))``, or None for ``kernel_size // 2`` ("same")."""
    if padding is None:
        padding = kernel_size // 2
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return ConvGeometry(strides=(int(stride), int(stride)),
                        padding=tuple((int(a), int(b)) for a, b in padding))


@struct.dataclass
class FloatConv:
    """A float 2-D convolution ``conv(x, kernel) + bias`` (the typed view of the Flax-native
    ``{"kernel": [kh, kw, C_in, C_out] (HWIO), "bias": [C_out]}`` dict, :func:`as_layer`).
    Computed in ``x.dtype``, as ``flax.linen.Conv`` does."""

    kernel: Array
    bias: Optional[Array] = None

    @property
    def kernel_shape(self) -> tuple:
        return tuple(int(d) for d in self.kernel.shape)

    @property
    def in_features(self) -> int:
        return int(self.kernel.shape[2])

    @property
    def out_features(self) -> int:
        return int(self.kernel.shape[3])

    def __call__(self, x: Array, geom: ConvGeometry) -> Array:
        """``x [N, H, W, C_in]`` → ``[N, H', W', C_out]`` in ``x.dtype``."""
        y = geom(x, self.kernel.astype(x.dtype))
        return y if self.bias is None else y + self.bias.astype(x.dtype)


@struct.dataclass
class QConv:
    """Quantized 2-D convolution (NHWC input, HWIO kernel): ``conv(Q_a(x), deq(W_q)) + b``.

    weight: :class:`QWeight` of the kernel flattened to ``[kh·kw·C_in, C_out]`` (per output
    channel; 4-bit codes packed two per byte along C_out); kernel_shape: static
    ``(kh, kw, C_in, C_out)``; act: :class:`ActQuant` of the input (static per tensor, per
    timestep, or split in two halves of the channel concatenation), or None (float
    activations); bias: ``[C_out]`` or None.

    Two implementations of the same function (:mod:`jaxdq.backend` picks one):
    :meth:`conv_fake` (float32 conv of the dequantized operands) and :meth:`conv_int`
    (int8 codes ⊛ int8 codes, int32 accumulation, then the scales).
    """

    weight: QWeight
    act: Optional[ActQuant] = None
    bias: Optional[Array] = None
    kernel_shape: tuple = struct.field(pytree_node=False, default=())

    @classmethod
    def from_kernel(cls, kernel: Array, bias: Optional[Array], spec: QuantSpec, *, pack: bool = False,
                    act: Optional[ActQuant] = None) -> "QConv":
        """Round-to-nearest quantization of a float HWIO kernel (``spec``: "channel" = per
        output channel, or "tensor")."""
        k = jnp.asarray(kernel, jnp.float32)
        w = QWeight.from_kernel(k.reshape(-1, k.shape[-1]), spec, pack=pack)
        return cls(weight=w, act=act, bias=None if bias is None else jnp.asarray(bias, jnp.float32),
                   kernel_shape=tuple(int(d) for d in k.shape))

    @property
    def in_features(self) -> int:
        return int(self.kernel_shape[2])

    @property
    def out_features(self) -> int:
        return int(self.kernel_shape[3])

    def dequantized_kernel(self) -> Array:
        """float32 HWIO kernel ``[kh, kw, C_in, C_out]``."""
        return self.weight.dequantize().reshape(self.kernel_shape)

    def dequantized(self) -> FloatConv:
        """The float conv with the weights this layer effectively uses (activation
        quantization dropped)."""
        return FloatConv(kernel=self.dequantized_kernel(), bias=self.bias)

    def conv_fake(self, x: Array, conv: Callable[[Array, Array], Array]) -> Array:
        """``conv(Q_a(x), deq(W))`` in float32, + bias: the reference.  ``conv(x, kernel)``
        carries the geometry (a :class:`ConvGeometry`).  ``x [N, H, W, C_in]`` → float32."""
        xq = x.astype(jnp.float32)
        if self.act is not None:
            xq = self.act.fake(xq)
        y = conv(xq, self.dequantized_kernel())
        return y if self.bias is None else y + self.bias.astype(jnp.float32)

    def int_path_ok(self) -> bool:
        """Whether :meth:`conv_int` computes this layer: activations quantized per tensor
        (static, per timestep once resolved, split or dynamic; symmetric or asymmetric, the
        zero point handled exactly), weights symmetric per output channel or per tensor."""
        a = self.act
        return (a is not None and a.spec.granularity == "tensor" and isinstance(self.weight, QWeight)
                and self.weight.spec.symmetric and self.weight.spec.granularity in ("channel", "tensor"))

    def conv_int(self, x: Array, geom: ConvGeometry, impl: str = "xla") -> Array:
        """The integer convolution: per input part (the whole input, or the two halves of a
        split activation) int8 activation codes ⊛ int8 weight codes with an int32
        accumulator, scaled by ``s_x · s_w``; float32 ``[N, H', W', C_out]`` (+ bias).

        Asymmetric activation codes ``q ∈ [0, 2^b)`` are shifted to int8 (``q − 2^(b−1)``) and
        the shift and zero point come back exactly: ``x̂ = s (q − z)`` so
        ``x̂ ⊛ W = s s_w [(q − 2^(b−1)) ⊛ W_q + (2^(b−1) − z) (1 ⊛ W_q)]``, with ``1 ⊛ W_q``
        the conv of an all-ones image (zero padding included).  ``impl``: "xla" (XLA's
        convolution on int8 operands, ``preferred_element_type=int32``) or "im2col"
        (patches by slicing, then an int8 × int8 → int32 dot).
        """
        if impl not in ("xla", "im2col"):
            raise ValueError(f"integer conv impl must be 'xla' or 'im2col', got {impl!r}")
        kh, kw, c_in, c_out = self.kernel_shape
        w_codes = self.weight.unpacked().astype(jnp.int8)  # [kh·kw·C_in, C_out]
        s_w = self.weight.scale.astype(jnp.float32).reshape(-1)
        xf = x.astype(jnp.float32)

        def iconv(codes, lo, hi):
            if impl == "xla":
                w = w_codes.reshape(kh, kw, c_in, c_out)[:, :, lo:hi]
                return geom(codes, w, preferred_element_type=jnp.int32)
            w = w_codes.reshape(kh, kw, c_in, c_out)[:, :, lo:hi].reshape(-1, c_out)
            cols = geom.patches(codes, kh, kw)
            return jax.lax.dot_general(cols, w, (((cols.ndim - 1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.int32)

        y = None
        for lo, hi, a in self.act.parts(c_in):
            q, s_x, z = a.codes(xf[..., lo:hi])
            if a.spec.symmetric:
                acc = iconv(q.astype(jnp.int8), lo, hi).astype(jnp.float32)
            else:
                shift = 2 ** (a.spec.bits - 1)
                q8 = (q.astype(jnp.int32) - shift).astype(jnp.int8)
                ones = jnp.ones((1,) + q.shape[1:], jnp.int8)  # one image: the zero-padding border pattern
                acc = (iconv(q8, lo, hi).astype(jnp.float32)
                       + (shift - jnp.asarray(z, jnp.float32)) * iconv(ones, lo, hi).astype(jnp.float32))
            part = acc * jnp.asarray(s_x, jnp.float32) * s_w
            y = part if y is None else y + part
        if self.bias is not None:
            y = y + self.bias.astype(jnp.float32)
        # NaN/inf policy: integer codes cannot carry a non-finite input; that sample's output is NaN
        return jnp.where(jnp.all(jnp.isfinite(xf), axis=(1, 2, 3), keepdims=True), y, jnp.nan)

    def __call__(self, x: Array, geom: ConvGeometry) -> Array:
        """The fake-quant reference forward (the backend may run another implementation)."""
        return self.conv_fake(x, geom)


# --------------------------------------------------------------------------- tree access
LAYER_TYPES = (FloatLinear, QLinear, FloatConv, QConv)


@struct.dataclass
class Segmented:
    """One layer with a variant per timestep segment (ViDiT-Q's timestep-segment mixed
    precision); :func:`jaxdq.quant.timestep.timestep_aware` resolves it per step.

    ``variants``: tuple of layers (variants may differ in bit width, i.e. in static
    structure); ``index``: static tuple, segment k uses ``variants[index[k]]``;
    ``bounds``: static descending timestep thresholds ``(b_1 > … > b_{K-1})``; timestep t
    is in segment ``#{j : t < b_j}`` (segment 0 = the first, noisiest sampling steps).
    """

    variants: tuple
    index: tuple = struct.field(pytree_node=False)
    bounds: tuple = struct.field(pytree_node=False)

    @property
    def num_segments(self) -> int:
        return len(self.index)


def is_float_dict(node: Any) -> bool:
    """The Flax-native float linear: a dict holding a 2-D ``"kernel"`` (and maybe ``"bias"``)."""
    return (isinstance(node, Mapping) and "kernel" in node and getattr(node["kernel"], "ndim", 0) == 2
            and set(node) <= {"kernel", "bias"})


def is_float_conv_dict(node: Any) -> bool:
    """The Flax-native float 2-D convolution: a dict holding a 4-D HWIO ``"kernel"`` (and maybe ``"bias"``)."""
    return (isinstance(node, Mapping) and "kernel" in node and getattr(node["kernel"], "ndim", 0) == 4
            and set(node) <= {"kernel", "bias"})


def as_layer(node: Any) -> Optional[Any]:
    """``node`` as a typed layer: a layer (or time-dependent layer node) itself, a float
    dict as a :class:`FloatLinear` (2-D kernel) or :class:`FloatConv` (4-D HWIO kernel),
    anything else None."""
    if isinstance(node, LAYER_TYPES + (Segmented,)):
        return node
    if is_float_dict(node):
        return FloatLinear(kernel=node["kernel"], bias=node.get("bias"))
    if is_float_conv_dict(node):
        return FloatConv(kernel=node["kernel"], bias=node.get("bias"))
    return None


def to_node(layer: Any) -> Any:
    """Inverse of :func:`as_layer`: a plain float layer goes back to its Flax-native dict."""
    if isinstance(layer, FloatConv):
        return {"kernel": layer.kernel} if layer.bias is None else {"kernel": layer.kernel, "bias": layer.bias}
    if isinstance(layer, FloatLinear) and layer.transform.is_identity:
        out = {"kernel": layer.kernel}
        if layer.bias is not None:
            out["bias"] = layer.bias
        return out
    return layer


def iter_layers(params: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, layer)`` for every linear or conv layer (float, quantized or time-dependent)
    of a params tree; ``path`` is the ``/``-joined module path (``"blocks_3/attn/qkv"``)."""
    for key, node in params.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        layer = as_layer(node)
        if layer is not None:
            yield path, layer
        elif isinstance(node, Mapping):
            yield from iter_layers(node, path)


def map_layers(params: Mapping, fn: Callable[[str, Any], Any], prefix: str = "") -> dict:
    """Copy of ``params`` with every layer replaced by ``fn(path, layer)`` (stored with
    :func:`to_node`); the rest of the tree is shared, not copied."""
    out = {}
    for key, node in params.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        layer = as_layer(node)
        if layer is not None:
            out[key] = to_node(fn(path, layer))
        elif isinstance(node, Mapping):
            out[key] = map_layers(node, fn, path)
        else:
            out[key] = node
    return out


def get_path(tree: Mapping, path: str) -> Any:
    """``tree["a"]["b"]`` for ``"a/b"``; KeyError naming the path if absent."""
    node = tree
    for k in path.split("/"):
        if not isinstance(node, Mapping) or k not in node:
            raise KeyError(f"no entry {path!r} (missing at {k!r})")
        node = node[k]
    return node


def set_path(tree: dict, path: str, value: Any) -> None:
    """``tree["a"]["b"] = value`` for ``"a/b"``, creating dicts on the way."""
    *parents, leaf = path.split("/")
    node = tree
    for k in parents:
        node = node.setdefault(k, {})
    node[leaf] = value


def weight_arrays(layer: Any) -> list[Array]:
    """The stored weight arrays of one layer: the weight node's ``stored_arrays()`` (codes,
    scales, zero points; twin-log params), low-rank factors, smoothing vector and the
    rotation node's arrays (none for a Hadamard; DuQuant's blocks and permutation) of a
    quantized layer, or the kernel (and transforms) of a float one; biases and activation
    qparams excluded."""
    if isinstance(layer, Segmented):
        return [a for v in layer.variants for a in weight_arrays(v)]
    if isinstance(layer, (QLinear, QConv)):
        arrays = list(layer.weight.stored_arrays())
    else:
        arrays = [layer.kernel]
    t = getattr(layer, "transform", IDENTITY)
    arrays += [t.smooth, t.lowrank_a, t.lowrank_b] + jax.tree_util.tree_leaves(t.rotation)
    return [a for a in arrays if a is not None]


def weight_bytes(params: Mapping) -> int:
    """Bytes of every layer's stored weight (:func:`weight_arrays`) over a params tree."""
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for _, l in iter_layers(params) for a in weight_arrays(l))


def nbytes(tree: Any) -> int:
    """Total bytes of every array leaf of a params tree (quantized or not)."""
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree)))


def bits_label(layer: Any) -> str:
    """``"W8A8"`` / ``"W4A16"`` of a quantized layer, ``"float"`` else (``"mixed"`` for
    a time-dependent layer whose variants differ)."""
    if isinstance(layer, Segmented):
        labels = {bits_label(v) for v in layer.variants}
        return labels.pop() if len(labels) == 1 else "/".join(sorted(labels))
    if isinstance(layer, (QLinear, QConv)):
        return f"W{layer.weight.bits}A{layer.act.spec.bits if layer.act else 16}"
    return "float"


