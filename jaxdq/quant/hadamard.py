"""Hadamard rotations of a linear layer's input channels: the rotation nodes.

A rotation ``X ← X H``, ``W ← Hᵀ W`` leaves ``X W`` unchanged (H orthogonal) while
spreading each token's outlier channels over many channels, which shrinks the
per-token range that dynamic quantization has to cover (QuaRot, ViDiT-Q).

Two nodes, both pytree nodes without array leaves (their sizes are static), held in a
layer's :class:`jaxdq.quant.layers.InputTransform`; each has ``apply(x)`` (``x H``),
``rotate_weight(w)`` (``Hᵀ W``), ``unrotate_weight(w)`` (``H W``) and ``kernel_block``
(the block the fused quantize kernel applies in-kernel, 0 = not a kernel rotation):

* :class:`FullHadamard` — one orthogonal Hadamard matrix over the whole width,
  ``H_n = (H_m ⊗ H_p)/sqrt(n)`` (:mod:`jaxdq.quant.hadamard_orders`: a Paley / Sylvester /
  Kronecker order ``m`` times a power of two ``p``), as QuaRot builds it for widths that
  are not a power of two (DiT-XL's 1152 = 36·32, FLUX's 3072 = 12·256): every channel
  mixes with every other, so one outlier channel spreads over all ``n``.  What the
  QuaRot and ViDiT-Q recipes use (:func:`rotation_for`).
* :class:`BlockHadamard` — block-diagonal: each contiguous group of ``block`` channels is
  multiplied by the normalized Sylvester matrix ``H_b / sqrt(b)`` (``H_1 = [1]``,
  ``H_2n = [[H, H], [H, -H]]``), ``b`` a power of two (default: the largest dividing the
  width, 1152 → 128).  It never mixes an outlier into the other blocks; kept as the
  ``-block`` recipe variants and for the kernels' in-kernel rotation.  ``H_b/sqrt(b)`` is
  symmetric and orthogonal, so it is its own inverse.

For a power-of-two width the two coincide (``FullHadamard(n)`` = ``BlockHadamard(n)``).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdq.quant.hadamard_orders import full_hadamard, hadamard_base, hadamard_order_split
from jaxdq.quant.walsh import fwht, hadamard_matrix

__all__ = ["BlockHadamard", "FullHadamard", "ROTATIONS", "block_hadamard", "full_hadamard_transpose", "fwht",
           "hadamard_block_size", "hadamard_matrix", "rotation_for"]


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


@functools.lru_cache(maxsize=None)
def _base_t(m: int) -> np.ndarray:
    """``H_mᵀ / sqrt(m)`` float32 (read-only, cached)."""
    h = (hadamard_base(m).T / math.sqrt(m)).astype(np.float32)
    h.setflags(write=False)
    return h


@jax.jit
def full_hadamard_transpose(x: jax.Array) -> jax.Array:
    """``x · H_nᵀ`` over the last axis (the inverse of :func:`hadamard_orders.full_hadamard`,
    ``H_n`` orthogonal); same dtype, computed in float32 at least, O(n log p + n m) per row.

    ``H_nᵀ = (H_mᵀ ⊗ H_p)/sqrt(n)`` (``H_p`` is symmetric): a fast Walsh–Hadamard transform
    over ``p``, then the dense ``m × m`` product with ``H_mᵀ`` over ``m``."""
    n = x.shape[-1]
    m, p = hadamard_order_split(n)
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    lead = x.shape[:-1]
    y = fwht(x.astype(cdtype).reshape(*lead, m, p))
    if m > 1:
        ht = jnp.asarray(_base_t(m), cdtype)
        # y[..., k, l] = Σ_i H_mᵀ[i, k] y[..., i, l] = Σ_i H_m[k, i] y[..., i, l]
        y = jnp.einsum("...il,ik->...kl", y, ht, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*lead, n).astype(x.dtype)


def _rows(fn, w: jax.Array) -> jax.Array:
    """``fn`` applied along axis 0 of ``w [C_in, ...]`` (the input-channel axis)."""
    return jnp.moveaxis(fn(jnp.moveaxis(w, 0, -1)), -1, 0)


@struct.dataclass
class FullHadamard:
    """Online input rotation ``x ↦ x · H_n`` with the full-width ``H_n = (H_m ⊗ H_p)/sqrt(n)``
    of :func:`jaxdq.quant.hadamard_orders.hadamard_matrix_full` (``n`` = ``width``, static).

    ``kernel_block``: ``width`` when it is a power of two (``H_n`` is then the Sylvester
    matrix the fused quantize kernel applies in-kernel), else 0 (the layer runs its exact
    XLA path; the kernels take power-of-two rotations only).
    """

    width: int = struct.field(pytree_node=False)

    @classmethod
    def for_width(cls, k: int) -> "FullHadamard":
        """The rotation of width ``k``; ValueError naming ``k`` if no full-width Hadamard
        of that order is built (:func:`jaxdq.quant.hadamard_orders.hadamard_order_split`)."""
        hadamard_order_split(k)
        return cls(int(k))

    @property
    def kernel_block(self) -> int:
        return self.width if self.width & (self.width - 1) == 0 else 0

    def _check(self, n: int) -> None:
        if n != self.width:
            raise ValueError(f"FullHadamard of width {self.width} applied to {n} channels")

    def apply(self, x: jax.Array) -> jax.Array:
        self._check(x.shape[-1])
        return full_hadamard(x)

    def rotate_weight(self, w: jax.Array) -> jax.Array:
        """``H_nᵀ W`` for ``W [C_in, ...]``: ``apply(x) @ rotate_weight(w) == x @ w``."""
        self._check(w.shape[0])
        return _rows(full_hadamard, w)

    def unrotate_weight(self, w: jax.Array) -> jax.Array:
        """``H_n W`` (the inverse of :meth:`rotate_weight`)."""
        self._check(w.shape[0])
        return _rows(full_hadamard_transpose, w)


#: Rotation kinds of the rotating recipes: ``"full"`` (full width, QuaRot's construction;
#: the default) and ``"block"`` (block-diagonal, largest power-of-two block).
ROTATIONS = ("full", "block")


def rotation_for(width: int, kind: str = "full"):
    """The rotation node of a layer with ``width`` input channels.

    ``kind="full"``: :class:`FullHadamard` for every width :mod:`jaxdq.quant.hadamard_orders`
    builds (every width of the model zoo); a width it cannot build (odd, or ≡ 2 mod 4 above
    2, or an unbuilt order) falls back to :class:`BlockHadamard`'s largest power-of-two
    block.  ``kind="block"``: :class:`BlockHadamard` always.
    """
    if kind not in ROTATIONS:
        raise ValueError(f"rotation kind must be one of {ROTATIONS}, got {kind!r}")
    if kind == "full":
        try:
            return FullHadamard.for_width(width)
        except ValueError:
            pass
    return BlockHadamard.for_width(width)
