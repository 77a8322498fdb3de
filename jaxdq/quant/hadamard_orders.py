"""Full-width Hadamard rotations for channel counts that are not a power of two.

A width ``n = m·p`` (``p`` a power of two, ``m`` a Hadamard order) gets the
orthogonal matrix ``H_n = (H_m ⊗ H_p) / sqrt(n)``: ``H_p`` the Sylvester matrix
(``H_1 = [1]``, ``H_2k = [[H, H], [H, -H]]``) and ``H_m`` a ±1 matrix with
``H_m H_mᵀ = m I`` built here, never stored:

* Paley I, ``q`` prime, ``q ≡ 3 (mod 4)``: order ``q + 1`` (4, 8, 12, 20, 24, 32,
  44, 48, 60, 68, 72, 80, 84, 104, 108, ...);
* Paley II, ``q`` prime, ``q ≡ 1 (mod 4)``: order ``2(q + 1)`` (12, 28, 36, 60, 76,
  ...);
* Sylvester doubling ``[[H, H], [H, -H]]`` of a buildable order (40 = 2·20, ...);
* Kronecker products of two buildable orders.

This is the construction QuaRot uses (a stored order-12/20/28/36/40/... matrix times
a power of two), unlike :func:`jaxdq.quant.hadamard.block_hadamard`, which rotates
each block of ``p`` channels separately and so never mixes an outlier channel into
the other ``m - 1`` blocks.  The online transform :func:`full_hadamard` costs
``O(n log p + n m)`` per token: a fast Walsh–Hadamard transform over ``p`` and a
dense ``m × m`` product.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.quant.walsh import fwht, hadamard_matrix

__all__ = [
    "hadamard_base", "hadamard_order_split", "hadamard_matrix_full", "full_hadamard",
    "rotate_kernel_full", "is_hadamard_order",
]


def _is_prime(q: int) -> bool:
    """Trial division; ``q`` is small (a Hadamard order)."""
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix ``Q [q, q]`` int: ``Q[i, j] = χ(j − i)``, χ the quadratic
    character of GF(q) (``q`` an odd prime): 0 at 0, +1 on squares, −1 otherwise."""
    chi = -np.ones(q, np.int64)
    chi[0] = 0
    chi[[(i * i) % q for i in range(1, q)]] = 1
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _conference(q: int, sign: int) -> np.ndarray:
    """Paley conference matrix ``C [q+1, q+1]`` int: zero diagonal, ``C Cᵀ = q I``.

    ``sign = -1`` (skew, for ``q ≡ 3 mod 4``) or ``+1`` (symmetric, ``q ≡ 1 mod 4``)
    is the sign of the first column below the corner.
    """
    c = np.zeros((q + 1, q + 1), np.int64)
    c[0, 1:] = 1
    c[1:, 0] = sign
    c[1:, 1:] = _jacobsthal(q)
    return c


def _paley1(q: int) -> np.ndarray:
    """Paley I Hadamard matrix ``[q+1, q+1]`` int ±1, ``q`` prime ≡ 3 (mod 4): ``I + C``."""
    return np.eye(q + 1, dtype=np.int64) + _conference(q, -1)


def _paley2(q: int) -> np.ndarray:
    """Paley II Hadamard matrix ``[2(q+1), 2(q+1)]`` int ±1, ``q`` prime ≡ 1 (mod 4):
    ``C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]``."""
    c = _conference(q, 1)
    return (np.kron(c, np.array([[1, 1], [1, -1]]))
            + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])))


@functools.lru_cache(maxsize=None)
def _recipe(m: int) -> tuple | None:
    """How to build a Hadamard matrix of order ``m``, or None if this module cannot."""
    if m in (1, 2):
        return ("sylvester",)
    if m < 1 or m % 4:
        return None
    if m & (m - 1) == 0:
        return ("sylvester",)
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    q = m // 2 - 1
    if _is_prime(q) and q % 4 == 1:
        return ("paley2", q)
    if _recipe(m // 2) is not None:
        return ("double", m // 2)
    for a in range(4, math.isqrt(m) + 1, 2):
        if m % a == 0 and _recipe(a) is not None and _recipe(m // a) is not None:
            return ("kron", a, m // a)
    return None


def is_hadamard_order(m: int) -> bool:
    """Whether :func:`hadamard_base` can build a Hadamard matrix of order ``m``."""
    return isinstance(m, (int, np.integer)) and _recipe(int(m)) is not None


@functools.lru_cache(maxsize=None)
def _base(m: int) -> np.ndarray:
    recipe = _recipe(m)
    if recipe is None:
        raise ValueError(f"no Hadamard construction of order {m} here "
                         "(Paley I/II with a prime q, Sylvester doubling, Kronecker products)")
    kind = recipe[0]
    if kind == "sylvester":
        h = np.rint(hadamard_matrix(m) * math.sqrt(m)).astype(np.int64)
    elif kind == "paley1":
        h = _paley1(recipe[1])
    elif kind == "paley2":
        h = _paley2(recipe[1])
    elif kind == "double":
        g = _base(recipe[1])
        h = np.block([[g, g], [g, -g]])
    else:
        h = np.kron(_base(recipe[1]), _base(recipe[2]))
    h = h.astype(np.float64)
    h.setflags(write=False)
    return h


def hadamard_base(m: int) -> np.ndarray:
    """Unnormalized Hadamard matrix of order ``m``: ``[m, m]`` float64 of ±1 with
    ``H Hᵀ = m I`` (read-only, cached).  ValueError if ``m`` cannot be built."""
    return _base(int(m))


def _split_pow2(n: int) -> tuple[int, int]:
    """``n = k · 2^e`` with ``k`` odd: returns ``(k, e)``."""
    e = (n & -n).bit_length() - 1
    return n >> e, e


def hadamard_order_split(n: int) -> tuple[int, int]:
    """``(m, p)`` with ``n = m·p``, ``p`` a power of two as large as possible and ``m``
    a Hadamard order :func:`hadamard_base` builds (``m = 1`` when ``n`` is a power of
    two).  E.g. 1152 → (36, 32), 3072 → (12, 256), 15360 → (60, 256).

    Raises ValueError naming ``n`` when no such split exists (odd ``n > 1``, ``n ≡ 2
    mod 4`` with ``n > 2``, or an odd part whose Hadamard orders are not built here).
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"width must be a positive int, got {n!r}")
    n = int(n)
    k, e = _split_pow2(n)
    if k == 1:
        return 1, n
    for j in range(2, e + 1):  # m = k·2^j, smallest first → largest p
        if _recipe(k << j) is not None:
            return k << j, 1 << (e - j)
    raise ValueError(f"no full-width Hadamard for width {n} = {k}·2^{e}: no order k·2^j "
                     f"(2 <= j <= {e}) is built by this module")


@functools.lru_cache(maxsize=4)
def hadamard_matrix_full(n: int) -> np.ndarray:
    """Orthogonal full-width Hadamard ``(H_m ⊗ H_p) / sqrt(n)``: ``[n, n]`` float64,
    entries ±1/sqrt(n), ``(m, p) = hadamard_order_split(n)``.

    Read-only and cached (4 widths; ``8 n²`` bytes each: 1.9 GB at n = 15360).
    """
    m, p = hadamard_order_split(n)
    h = np.kron(hadamard_base(m), np.rint(hadamard_matrix(p) * math.sqrt(p))) / math.sqrt(n)
    h.setflags(write=False)
    return h


@functools.lru_cache(maxsize=None)
def _base_normalized(m: int, dtype) -> np.ndarray:
    return (hadamard_base(m) / math.sqrt(m)).astype(dtype)


@jax.jit
def full_hadamard(x: jax.Array) -> jax.Array:
    """``x · H_n`` over the last axis, ``H_n = hadamard_matrix_full(n)``.

    Args:
      x: ``[..., n]`` floating, ``n`` accepted by :func:`hadamard_order_split`.
    Returns:
      ``[..., n]``, ``x``'s dtype.  Computed in float32 at least: ``x`` as
      ``[..., m, p]``, a fast Walsh–Hadamard transform over ``p``, then a dense
      ``m × m`` product (precision HIGHEST) over ``m``.  O(n log p + n m) per row.
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"full_hadamard needs a floating input, got {x.dtype}")
    n = x.shape[-1]
    m, p = hadamard_order_split(n)
    cdtype = jnp.promote_types(x.dtype, jnp.float32)
    lead = x.shape[:-1]
    y = fwht(x.astype(cdtype).reshape(*lead, m, p))  # [..., m, p]
    if m > 1:
        hm = jnp.asarray(_base_normalized(m, np.dtype(cdtype)))
        # y[..., k, l] = Σ_i H_m[i, k] y[..., i, l]
        y = jnp.einsum("...il,ik->...kl", y, hm, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*lead, n).astype(x.dtype)


def rotate_kernel_full(w: jax.Array) -> jax.Array:
    """``H_nᵀ W`` for ``W [C_in, C_out]`` (n = C_in): rotate the input-channel axis so
    that ``full_hadamard(x) @ rotate_kernel_full(w) == x @ w``.  Same dtype as ``w``."""
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"kernel must be [C_in, C_out], got shape {w.shape}")
    return full_hadamard(w.T).T
