"""Walsh–Hadamard rotations of a linear layer's input channels.

A rotation ``X ← X H``, ``W ← Hᵀ W`` leaves ``X W`` unchanged (H orthogonal) while
spreading each token's outlier channels over many channels, which shrinks the
per-token range that dynamic quantization has to cover (QuaRot, ViDiT-Q).

:class:`BlockHadamard` is block-diagonal: each contiguous group of ``block`` channels is
multiplied by the normalized Sylvester matrix ``H_b / sqrt(b)`` (``H_1 = [1]``,
``H_2n = [[H, H], [H, -H]]``), ``b`` a power of two.  For channel counts that are not a
power of two (DiT-XL's 1152 = 9·128) the default block is the largest power of two
dividing the width.  Because ``H_b/sqrt(b)`` is symmetric and orthogonal it is its own
inverse.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def hadamard_matrix(n: int) -> np.ndarray:
    """Normalized Sylvester Hadamard matrix ``[n, n]`` float64 (n a power of two)."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


def fwht(x: jax.Array) -> jax.Array:
    """Normalized fast Walsh–Hadamard transform over the last axis, O(n log n).

    Equals ``x @ hadamard_matrix(n)`` for ``x: [..., n]``, n a power of two; same dtype
    (computed in float32 at least).
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last axis, got {n}")
    dtype = x.dtype
    y = x.astype(jnp.promote_types(dtype, jnp.float32))
    lead = y.shape[:-1]
    h = 1
    while h < n:
        # pairs (i, i+h) inside blocks of 2h: [..., n/2h, 2, h]
        y = y.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return (y.reshape(*lead, n) / math.sqrt(n)).astype(dtype)


@functools.partial(jax.jit, static_argnames="block")
def block_hadamard(x: jax.Array, block: int) -> jax.Array:
    """``x [..., K] → x · blockdiag(H_block, …)`` with normalized blocks (K % block == 0)."""
    k = x.shape[-1]
    if k % block:
        raise ValueError(f"channel count {k} is not a multiple of the Hadamard block {block}")
    return fwht(x.reshape(*x.shape[:-1], k // block, block)).reshape(x.shape)


def hadamard_block_size(k: int, max_block: int | None = None) -> int:
    """Largest power of two dividing ``k`` (capped at ``max_block``)."""
    b = k & -k
    if max_block is not None:
        b = min(b, 1 << (max_block.bit_length() - 1))
    return b


@struct.dataclass
class BlockHadamard:
    """Online input rotation ``x ↦ x · blockdiag(H_b/√b, …)`` (symmetric, its own inverse).

    A pytree node without array leaves (``block`` is static), held in a layer's
    :class:`jaxdq.quant.layers.InputTransform`.  ``kernel_block`` is the block size the
    fused quantize kernel applies in-kernel.
    """

    block: int = struct.field(pytree_node=False)

    @classmethod
    def for_width(cls, k: int, max_block: int | None = None) -> "BlockHadamard":
        return cls(hadamard_block_size(k, max_block))

    @property
    def kernel_block(self) -> int:
        return self.block

    def apply(self, x: jax.Array) -> jax.Array:
        return block_hadamard(x, self.block)

    def rotate_weight(self, w: jax.Array) -> jax.Array:
        """``Hᵀ W`` for ``W [C_in, ...]``: rotate the input-channel axis."""
        return jnp.moveaxis(block_hadamard(jnp.moveaxis(w, 0, -1), self.block), -1, 0)

    def unrotate_weight(self, w: jax.Array) -> jax.Array:
        """``H W`` (= ``Hᵀ W``: H is symmetric and orthogonal)."""
        return self.rotate_weight(w)
