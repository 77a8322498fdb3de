"""A quantized linear layer as a registered pytree node.

``QLinear`` holds integer weight codes, their scales/zero points and the optional
pieces later transforms attach (smoothing vector, low-rank factors), plus the
static configuration (bit widths, granularities) as pytree aux data, so
``jax.jit`` specialises on it and ``jax.tree_util`` sees only arrays.

Forward semantics (``Y = X W + b`` with ``X: [..., C_in]``, ``W: [C_in, C_out]``)::

    X' = H(X / smooth)                                (smooth: [C_in]; H: block Hadamard, optional)
    Y  = Q_a(X') · deq(qweight) + (X' L1) L2 + bias   (L1: [C_in, r], L2: [r, C_out])

``Q_a`` fake-quantizes activations (dynamic: range from X' at every call;
static: the stored ``act_scale``/``act_zero``).  Two implementations of the same
function: ``"fake"`` dequantizes both operands to float32 and multiplies
(the reference), ``"int"`` multiplies integer codes with an int32 accumulator and
applies ``s_x · s_w`` afterwards, which is what an integer GEMM kernel does; it
applies when both operands are symmetric with one scale per token/tensor and
per channel/tensor.  ``"kernel"`` runs :func:`pallas_kernels.ops.qlinear_apply`
(Pallas GPU kernels on a GPU backend, the reference elsewhere).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from jaxdq.quant.hadamard import block_hadamard
from jaxdq.quant.quantizer import (
    QuantSpec,
    dequantize,
    fake_quant,
    pack_int4,
    quantize,
    quantize_activation,
    unpack_int4,
)


@struct.dataclass
class QLinear:
    """Quantized linear layer.

    Array fields (pytree children):
      qweight: int8 ``[C_in, C_out]`` codes (uint8 if asymmetric), or uint8
        ``[C_in, C_out // 2]`` when ``packed`` (two 4-bit codes per byte along C_out,
        element 2i in the low nibble).  With ``w_layout="nk"`` the same codes are stored
        transposed: ``[C_out, C_in]``, packed ``[C_out, C_in // 2]`` (pairs along C_in):
        the K-major layout the GPU kernels read without a per-call transpose.
      w_scale: float32, ``[1, C_out]`` (channel), ``[C_in // G, C_out]`` (group) or ``[]``.
      w_zero: like ``w_scale`` for asymmetric weights, else None.
      bias: ``[C_out]`` or None.
      act_scale, act_zero: ``[]`` float32 static activation qparams, or None (dynamic).
      smooth: ``[C_in]`` per-input-channel divisor of X (folded into W already), or None.
      lowrank_a, lowrank_b: ``[C_in, r]`` and ``[r, C_out]`` 16-bit-style float factors, or None.
      act_t: ``[S]`` int32 timesteps when the static activation qparams are per timestep
        (then ``act_scale``/``act_zero`` are ``[S]``); resolved to one timestep by
        :func:`jaxdq.quant.timestep.at_timestep` before the layer is called.
    Static fields (aux data):
      w_spec: the weight QuantSpec; act_spec: activation QuantSpec or None (float activations);
      packed: int4 packing; impl: "fake" (reference), "int" or "kernel";
      had_block: block size of the online input Hadamard rotation (0 = none).
      w_layout: "kn" (``qweight`` is ``[C_in, C_out]``) or "nk" (``[C_out, C_in]``,
        see :meth:`to_layout`).
    """

    qweight: jax.Array
    w_scale: jax.Array
    w_zero: Optional[jax.Array] = None
    bias: Optional[jax.Array] = None
    act_scale: Optional[jax.Array] = None
    act_zero: Optional[jax.Array] = None
    smooth: Optional[jax.Array] = None
    lowrank_a: Optional[jax.Array] = None
    lowrank_b: Optional[jax.Array] = None
    act_t: Optional[jax.Array] = None
    w_spec: QuantSpec = struct.field(pytree_node=False, default=QuantSpec())
    act_spec: Optional[QuantSpec] = struct.field(pytree_node=False, default=None)
    packed: bool = struct.field(pytree_node=False, default=False)
    impl: str = struct.field(pytree_node=False, default="fake")
    had_block: int = struct.field(pytree_node=False, default=0)
    w_layout: str = struct.field(pytree_node=False, default="kn")

    @property
    def in_features(self) -> int:
        if self.w_layout == "nk":
            return self.qweight.shape[1] * (2 if self.packed else 1)
        return self.qweight.shape[0]

    @property
    def out_features(self) -> int:
        if self.w_layout == "nk":
            return self.qweight.shape[0]
        return self.qweight.shape[1] * (2 if self.packed else 1)

    def to_layout(self, layout: str) -> "QLinear":
        """The same layer with ``qweight`` stored as ``layout`` ("kn" or "nk"); the
        function it computes is unchanged (only the codes' storage order moves)."""
        if layout not in ("kn", "nk"):
            raise ValueError(f"w_layout must be 'kn' or 'nk', got {layout!r}")
        if layout == self.w_layout:
            return self
        codes = self.weight_codes()  # [C_in, C_out]
        out = codes.T if layout == "nk" else codes
        if self.packed:
            out = pack_int4(out)
        return self.replace(qweight=out, w_layout=layout)

    @property
    def act_static(self) -> bool:
        return self.act_scale is not None

    def weight_codes(self) -> jax.Array:
        """Unpacked integer codes ``[C_in, C_out]`` (whatever the storage layout)."""
        codes = unpack_int4(self.qweight, signed=self.w_spec.symmetric) if self.packed else self.qweight
        return codes.T if self.w_layout == "nk" else codes

    def stored_codes(self) -> jax.Array:
        """The codes in their storage layout (``[C_out, C_in]`` for "nk", else ``[C_in, C_out]``);
        packed 4-bit codes as a ``jnp.int4`` / ``jnp.uint4`` view of the bytes (XLA's nibble
        order is ours: element 2i in the low nibble), so no unpacked copy is made."""
        if not self.packed:
            return self.qweight
        rows, half = self.qweight.shape
        nibble = jnp.int4 if self.w_spec.symmetric else jnp.uint4
        return jax.lax.bitcast_convert_type(self.qweight, nibble).reshape(rows, 2 * half)

    def dequantized_weight(self) -> jax.Array:
        """float32 ``[C_in, C_out]`` weight the layer effectively uses."""
        return dequantize(self.weight_codes(), self.w_scale, self.w_zero, self.w_spec, kind="weight")

    def quantized_input(self, x: jax.Array) -> jax.Array:
        """``Q_a(X)`` in float32 (identity when activations stay float)."""
        if self.act_spec is None:
            return x
        return fake_quant(x, self.act_spec, kind="activation",
                          scale=self.act_scale, zero=self.act_zero)

    def transform_input(self, x: jax.Array) -> jax.Array:
        """``H(x / smooth)``: the online input transforms (identity when absent)."""
        if self.smooth is not None:
            x = x / self.smooth.astype(x.dtype)
        if self.had_block:
            x = block_hadamard(x, self.had_block)
        return x

    def _int_matmul(self, x: jax.Array) -> jax.Array:
        if self.act_static:
            codes, s_x = quantize(x, self.act_scale, None, self.act_spec, kind="activation"), self.act_scale
        else:
            codes, s_x, _ = quantize_activation(x, self.act_spec)
        # the codes as stored: a GEMV-like call (adaLN) reads each weight byte once, with no
        # transposed or unpacked copy (pallas_kernels.ops.SMALL_M_XLA runs this on a GPU)
        contract = 1 if self.w_layout == "nk" else 0
        acc = jax.lax.dot_general(
            codes.astype(jnp.int8), self.stored_codes().astype(jnp.int8),
            (((x.ndim - 1,), (contract,)), ((), ())), preferred_element_type=jnp.int32)
        return acc.astype(jnp.float32) * s_x * self.w_scale.reshape(-1)

    def int_path_ok(self) -> bool:
        """Whether the integer-accumulator implementation computes this layer."""
        a, w = self.act_spec, self.w_spec
        return (a is not None and a.symmetric and w.symmetric
                and a.granularity in ("token", "tensor") and w.granularity in ("channel", "tensor"))

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.act_t is not None:
            raise ValueError("this QLinear has per-timestep activation qparams; resolve them with "
                             "jaxdq.quant.timestep.at_timestep(params, t) before calling the model")
        dtype = x.dtype
        if self.impl == "kernel":
            from pallas_kernels.ops import qlinear_apply

            return qlinear_apply(self, x)
        x = self.transform_input(x.astype(jnp.float32))
        if self.impl == "int" and self.int_path_ok():
            y = self._int_matmul(x)
        else:
            y = jnp.dot(self.quantized_input(x), self.dequantized_weight())
        if self.lowrank_a is not None:
            y = y + jnp.dot(jnp.dot(x, self.lowrank_a.astype(jnp.float32)),
                            self.lowrank_b.astype(jnp.float32))
        if self.bias is not None:
            y = y + self.bias.astype(jnp.float32)
        return y.astype(dtype)


def nbytes(tree) -> int:
    """Total bytes of every array leaf of a params tree (quantized or not)."""
    return int(sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(tree)))
