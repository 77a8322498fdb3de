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

Static numerical configuration (bits, granularity, packing, storage layout) is pytree aux
data, so ``jax.jit`` specialises on it and ``jax.tree_util`` sees only arrays.
"""
from __future__ import annotations

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
    """

    spec: QuantSpec = struct.field(pytree_node=False, default=QuantSpec(granularity="token"))
    scale: Optional[Array] = None
    zero: Optional[Array] = None
    t: Optional[Array] = None

    @property
    def static(self) -> bool:
        return self.scale is not None

    def check_resolved(self) -> None:
        if self.t is not None:
            raise ValueError("this layer has per-timestep activation qparams; resolve them with "
                             "jaxdq.quant.timestep.at_timestep(params, t) before calling the model")

    def fake(self, x: Array) -> Array:
        """``Q_a(x)`` (quantize-dequantize), same shape and dtype."""
        self.check_resolved()
        return fake_quant(x, self.spec, kind="activation", scale=self.scale, zero=self.zero)

    def codes(self, x: Array) -> tuple[Array, Array, Optional[Array]]:
        """``(codes, scale, zero)`` of ``x`` (dynamic or the stored static qparams)."""
        self.check_resolved()
        if self.static:
            return quantize(x, self.scale, self.zero, self.spec, kind="activation"), self.scale, self.zero
        scale, zero = compute_qparams(x, self.spec, kind="activation")
        return quantize(x, scale, zero, self.spec, kind="activation"), scale, zero


def static_act_quant(lo, hi, spec: QuantSpec, t=None) -> ActQuant:
    """Static :class:`ActQuant` for the range ``[lo, hi]`` (scalars, or ``[S]`` with ``t``);
    the range is widened to include 0."""
    lo = jnp.minimum(jnp.asarray(lo, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(hi, jnp.float32), 0.0)
    qp = lambda a, b: compute_qparams(jnp.stack([a, b]), spec, kind="activation")  # noqa: E731
    scale, zero = jax.vmap(qp)(lo, hi) if lo.ndim else qp(lo, hi)
    return ActQuant(spec=spec, scale=scale, zero=zero, t=None if t is None else jnp.asarray(t, jnp.int32))


# --------------------------------------------------------------------------- quantized linear
@struct.dataclass
class QLinear:
    """Quantized linear layer: ``Y = P(T(X)) + (T(X) L1) L2 + b`` with ``P`` the product of
    the quantized input and the dequantized integer weight.

    weight: :class:`QWeight` of the (transformed) kernel; act: :class:`ActQuant`, or None
    for weight-only quantization (float activations); bias: ``[C_out]`` or None;
    transform: the :class:`InputTransform` carried over from the float layer.
    """

    weight: QWeight
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
        return f"W{self.weight.spec.bits}A{self.act.spec.bits if self.act else 16}"

    def product_fake(self, xt: Array) -> Array:
        """``Q_a(X') · deq(W_q)`` in float32 (the reference)."""
        xq = xt if self.act is None else self.act.fake(xt)
        return jnp.dot(xq, self.weight.dequantize())

    def int_path_ok(self) -> bool:
        """Whether :meth:`product_int` computes this layer: symmetric codes, one scale per
        token/tensor for activations and per channel/tensor for weights."""
        a, w = self.act, self.weight.spec
        return (a is not None and a.spec.symmetric and w.symmetric
                and a.spec.granularity in ("token", "tensor") and w.granularity in ("channel", "tensor"))

    def product_int(self, xt: Array) -> Array:
        """int8 codes × int8 codes with an int32 accumulator, then ``s_x · s_w``: what an
        integer GEMM computes.  Reads the weight codes as stored (an "nk" layout is
        contracted in place, packed int4 through a ``jnp.int4`` view), so a GEMV-like call
        reads each weight byte once."""
        codes, s_x, _ = self.act.codes(xt)
        contract = 1 if self.weight.layout == "nk" else 0
        acc = jax.lax.dot_general(codes.astype(jnp.int8), self.weight.stored().astype(jnp.int8),
                                  (((xt.ndim - 1,), (contract,)), ((), ())), preferred_element_type=jnp.int32)
        y = acc.astype(jnp.float32) * s_x * self.weight.scale.astype(jnp.float32).reshape(-1)
        # NaN/inf policy: integer codes cannot carry a non-finite input; its output row is NaN
        return jnp.where(jnp.all(jnp.isfinite(xt), axis=-1, keepdims=True), y, jnp.nan)

    def __call__(self, x: Array) -> Array:
        """The fake-quant reference forward (the backend may run another implementation)."""
        return forward(self.transform, self.bias, x, self.product_fake, jnp.float32)

    def dequantized(self) -> FloatLinear:
        """The float layer with the weights this layer effectively uses (activation
        quantization dropped; transforms kept)."""
        return FloatLinear(kernel=self.weight.dequantize(), bias=self.bias, transform=self.transform)


# --------------------------------------------------------------------------- quantized conv
@struct.dataclass
class QConv:
    """Quantized 2-D convolution (NHWC input, HWIO kernel) — the slot the UNet convolutions
    fill (TFMQ-DM issue).

    weight: :class:`QWeight` of the kernel flattened to ``[kh·kw·C_in, C_out]`` (per output
    channel); kernel_shape: static ``(kh, kw, C_in, C_out)``; act: :class:`ActQuant` of the
    input (static per tensor or per timestep), or None; bias: ``[C_out]`` or None.
    """

    weight: QWeight
    act: Optional[ActQuant] = None
    bias: Optional[Array] = None
    kernel_shape: tuple = struct.field(pytree_node=False, default=())

    @classmethod
    def from_kernel(cls, kernel: Array, bias: Optional[Array], spec: QuantSpec, *, pack: bool = False,
                    act: Optional[ActQuant] = None) -> "QConv":
        k = jnp.asarray(kernel, jnp.float32)
        w = QWeight.from_kernel(k.reshape(-1, k.shape[-1]), spec, pack=pack)
        return cls(weight=w, act=act, bias=None if bias is None else jnp.asarray(bias, jnp.float32),
                   kernel_shape=tuple(int(d) for d in k.shape))

    def dequantized_kernel(self) -> Array:
        """float32 HWIO kernel ``[kh, kw, C_in, C_out]``."""
        return self.weight.dequantize().reshape(self.kernel_shape)

    def conv_fake(self, x: Array, conv: Callable[[Array, Array], Array]) -> Array:
        """``conv(Q_a(x), deq(W))`` in float32, + bias; ``conv(x, kernel)`` carries the geometry."""
        xq = x.astype(jnp.float32)
        if self.act is not None:
            xq = self.act.fake(xq)
        y = conv(xq, self.dequantized_kernel())
        return y if self.bias is None else y + self.bias.astype(jnp.float32)


# --------------------------------------------------------------------------- tree access
LAYER_TYPES = (FloatLinear, QLinear, QConv)


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


def as_layer(node: Any) -> Optional[Any]:
    """``node`` as a typed layer: a layer (or time-dependent layer node) itself, a float
    dict as a :class:`FloatLinear`, anything else None."""
    if isinstance(node, LAYER_TYPES + (Segmented,)):
        return node
    if is_float_dict(node):
        return FloatLinear(kernel=node["kernel"], bias=node.get("bias"))
    return None


def to_node(layer: Any) -> Any:
    """Inverse of :func:`as_layer`: a plain float layer goes back to its Flax-native dict."""
    if isinstance(layer, FloatLinear) and layer.transform.is_identity:
        out = {"kernel": layer.kernel}
        if layer.bias is not None:
            out["bias"] = layer.bias
        return out
    return layer


def iter_layers(params: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(path, layer)`` for every linear layer (float, quantized or time-dependent) of a
    params tree; ``path`` is the ``/``-joined module path (``"blocks_3/attn/qkv"``)."""
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
    """The stored weight arrays of one layer: codes, scales, zero points, low-rank factors
    and smoothing vector of a quantized layer, or the kernel (and factors) of a float one;
    biases and activation qparams excluded."""
    if isinstance(layer, Segmented):
        return [a for v in layer.variants for a in weight_arrays(v)]
    if isinstance(layer, (QLinear, QConv)):
        w = layer.weight
        arrays = [w.codes, w.scale, w.zero]
    else:
        arrays = [layer.kernel]
    t = getattr(layer, "transform", IDENTITY)
    arrays += [t.smooth, t.lowrank_a, t.lowrank_b]
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
        return f"W{layer.weight.spec.bits}A{layer.act.spec.bits if layer.act else 16}"
    return "float"


