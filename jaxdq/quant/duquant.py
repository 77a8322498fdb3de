"""LRQ-DiT's adaptive rotation scheme (ARS, arXiv 2508.03485 §4.2) as pure functions.

Per linear layer, ``J = ||X||_F / sqrt(B·N·C)`` (the RMS of the layer input over
calibration, eq. 11) picks the rotation of its input channels (eq. 12):

* ``J < τ`` (τ = 1): a Hadamard rotation ``X R_H`` (:mod:`jaxdq.quant.hadamard`);
* ``J ≥ τ``: DuQuant's ``X · R̂1 · P · R̂2``: a greedy outlier-aware block rotation,
  a zigzag channel permutation, a second greedy block rotation.

Everything here is built from the calibration's per-channel maxima
``absmax [C_in]`` (m) only.  A rotation mixes channels, so the post-rotation
maxima are not a function of ``m``; the greedy scores a rotation ``R`` by the
per-channel peak estimate ``p_j = sqrt(Σ_i m_i² R_ij²)`` (for zero-mean,
uncorrelated channels ``E[(xR)_j²] = Σ_i E[x_i²] R_ij²``, and ``E[x_i²] ≤ m_i²``).
The exact bound ``Σ_i m_i |R_ij|`` assumes every channel peaks with aligned
signs on the same token; it grows by up to √b under any dense rotation of flat
channels, so a greedy on it stops at once (measured: worse than no DuQuant).

Greedy block rotation (DuQuant's construction, arXiv 2406.01721 §3.1, our code):
a fixed orthogonal ``M = diag(1, Q') R̃`` per block size b, with ``R̃`` the
Householder reflection taking ``e_0`` to the all-equal row ``1ᵀ/√b`` and ``Q'``
a fixed random orthogonal ``(b−1)×(b−1)`` (seeded, sign-normalized QR).  A
step takes the channel ``c`` of largest estimate, swaps it into position 0
(``E_c``) and multiplies by ``M``: ``e_c E_c M = 1ᵀ/√b``, spreading it evenly,
while ``Q'`` mixes the other channels densely.  (A bare reflection ``e_c ↔ 1/√b``
is an involution: the next step would gather the spread outlier back into one
channel.)  Up to ``steps`` steps ``R = E_{c1} M E_{c2} M …``; the prefix with the
smallest peak estimate is kept (the identity included, so a block never scores
worse than unrotated).  Each block gets its own chain, from its own channels
(DuQuant's public code shares one rotation between all blocks).

Zigzag permutation: channels sorted by their estimate after ``R̂1`` are dealt to
the blocks in the order 0, 1, …, K−1, K−1, …, 1, 0, 0, 1, … so every block gets
a similar share of the large ones; inside a block they stay in descending order.

Conventions: ``x [..., C_in]`` rotates as ``x ↦ x R̂1 P R̂2`` with ``R̂ =
blockdiag(R[0], …, R[K−1])`` and ``(x P)[..., p] = x[..., perm[p]]``; a weight
``W [C_in, C_out]`` becomes ``R̂2ᵀ Pᵀ R̂1ᵀ W`` so the float product is unchanged.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxdq.calibrate import frobenius_j
from jaxdq.quant import hadamard
from jaxdq.quant.hadamard import hadamard_block_size

__all__ = [
    "DuQuantRotation", "step_matrix", "greedy_block_rotation", "block_peak", "zigzag_permutation",
    "duquant_rotation", "apply_rotation", "fold_into_weight", "unfold_from_weight", "rotation_matrix",
    "choose_path", "ars_plan", "report", "hadamard_rotation", "ars_rotation", "ars_params", "format_report",
    "print_report", "DEFAULT_BLOCK", "DEFAULT_TAU",
]

DEFAULT_BLOCK = 128   # DuQuant's default block size
DEFAULT_TAU = 1.0     # LRQ-DiT's threshold on J


@struct.dataclass
class DuQuantRotation:
    """``X · R̂1 · P · R̂2``: a rotation node of a layer's
    :class:`jaxdq.quant.layers.InputTransform` (a pytree of arrays).

    r1, r2: float32 ``[K, b, b]`` orthogonal blocks (K·b = C_in).
    perm: int32 ``[C_in]``; ``(x P)[..., p] = x[..., perm[p]]``.

    Node protocol (as :class:`jaxdq.quant.hadamard.BlockHadamard`): ``apply(x) = x R``,
    ``rotate_weight(w) = Rᵀ W``, ``unrotate_weight(w) = R W``, ``kernel_block = 0`` (the
    fused quantize kernel cannot apply it: the backend rotates in XLA first).
    """

    r1: jax.Array
    perm: jax.Array
    r2: jax.Array

    @property
    def kernel_block(self) -> int:
        return 0

    @property
    def width(self) -> int:
        return int(self.perm.shape[0])

    def apply(self, x: jax.Array) -> jax.Array:
        """``x [..., C_in] ↦ x R̂1 P R̂2`` (:func:`apply_rotation`)."""
        return apply_rotation(x, self)

    def rotate_weight(self, w: jax.Array) -> jax.Array:
        """``Rᵀ W = R̂2ᵀ Pᵀ R̂1ᵀ W`` for ``W [C_in, ...]`` (:func:`fold_into_weight`)."""
        return fold_into_weight(w, self)

    def unrotate_weight(self, w: jax.Array) -> jax.Array:
        """``R W = R̂1 P R̂2 W`` for ``W [C_in, ...]`` (:func:`unfold_from_weight`)."""
        return unfold_from_weight(w, self)


# ------------------------------------------------------------------ construction


@functools.lru_cache(maxsize=None)
def step_matrix(b: int, seed: int = 0) -> np.ndarray:
    """float64 orthogonal ``[b, b]`` ``M = diag(1, Q') R̃`` with row 0 equal to ``1ᵀ/√b``.

    ``R̃ = I − 2vvᵀ/vᵀv``, ``v = e_0 − 1/√b`` (symmetric, ``e_0 R̃ = 1ᵀ/√b``); ``Q'`` is the
    Q factor (signs fixed by ``diag(R) > 0``) of a seeded Gaussian ``(b−1)×(b−1)`` matrix.
    """
    u = np.full(b, 1.0 / math.sqrt(b))
    v = np.eye(b)[0] - u
    rt = np.eye(b) - 2.0 * np.outer(v, v) / max(float(v @ v), 1e-300)
    q = np.eye(b)
    if b > 2:
        g = np.random.default_rng(seed).standard_normal((b - 1, b - 1))
        qq, rr = np.linalg.qr(g)
        q[1:, 1:] = qq * np.sign(np.diag(rr))
    out = q @ rt
    out.flags.writeable = False   # cached: shared by every caller
    return out


def _peak(m2: jax.Array, r: jax.Array) -> jax.Array:
    """Per-channel peak estimate ``sqrt(m² @ r²)``."""
    return jnp.sqrt(m2 @ (r * r))


@functools.partial(jax.jit, static_argnames="steps")
def greedy_block_rotation(m: jax.Array, steps: int) -> jax.Array:
    """Greedy outlier-spreading rotation of one block.

    Args:
      m: float ``[b]`` per-channel calibration ``absmax`` (≥ 0).
      steps: at most this many steps ``E_c M``.
    Returns:
      float32 orthogonal ``[b, b]`` R: the prefix of the greedy chain with the
      smallest ``max_j sqrt(Σ_i m_i² R_ij²)`` (the identity if no step lowers it).
    """
    m = jnp.asarray(m, jnp.float32)
    b = m.shape[0]
    eye = jnp.eye(b, dtype=jnp.float32)
    if b == 1:
        return eye
    mat = jnp.asarray(step_matrix(b), jnp.float32)
    m2 = m * m
    idx = jnp.arange(b)

    def body(_, state):
        r, best_r, best_peak = state
        c = jnp.argmax(_peak(m2, r))
        swap = jnp.where(idx == 0, c, jnp.where(idx == c, 0, idx))   # E_c: columns 0 ↔ c
        r = r[:, swap] @ mat
        peak = jnp.max(_peak(m2, r))
        better = peak < best_peak
        return r, jnp.where(better, r, best_r), jnp.where(better, peak, best_peak)

    _, best_r, _ = jax.lax.fori_loop(0, steps, body, (eye, eye, jnp.max(m)))
    return best_r


def zigzag_permutation(m: np.ndarray, block: int) -> np.ndarray:
    """int32 ``[C]`` permutation dealing channels, largest ``m`` first, to the K = C/block
    blocks in zigzag order (0…K−1, K−1…0, …); each block's channels in descending ``m``."""
    m = np.asarray(m, np.float64)
    k = m.shape[0] // block
    order = np.argsort(-m, kind="stable")
    period = np.concatenate([np.arange(k), np.arange(k)[::-1]])
    target = period[np.arange(m.shape[0]) % (2 * k)]
    blocks = [order[target == j] for j in range(k)]   # already in descending m
    return np.concatenate(blocks).astype(np.int32)


def block_peak(m: jax.Array, r: jax.Array) -> jax.Array:
    """Peak estimate after ``blockdiag(r)``: ``m [C]``, ``r [K, b, b]`` → ``[C]``."""
    k, b, _ = r.shape
    return jnp.sqrt(jnp.einsum("kb,kbc->kc", (m * m).reshape(k, b), r * r)).reshape(-1)


def duquant_rotation(absmax: np.ndarray, block: int | None = None, steps: int = 8) -> DuQuantRotation:
    """DuQuant's ``R̂1 · P · R̂2`` from calibration per-channel maxima.

    Args:
      absmax: float ``[C_in]`` per-channel ``max |x|``.
      block: rotation block size b (C_in % b == 0); default the largest power of two
        dividing C_in, at most :data:`DEFAULT_BLOCK`.
      steps: greedy steps per block and rotation.
    Returns:
      :class:`DuQuantRotation` (float32 blocks ``[C_in/b, b, b]``, int32 perm ``[C_in]``).
    """
    m = jnp.asarray(absmax, jnp.float32)
    c = m.shape[0]
    block = block or hadamard_block_size(c, DEFAULT_BLOCK)
    if c % block:
        raise ValueError(f"channel count {c} is not a multiple of the block size {block}")
    rot = jax.vmap(lambda mb: greedy_block_rotation(mb, steps))
    r1 = rot(m.reshape(-1, block))
    m1 = block_peak(m, r1)
    perm = zigzag_permutation(np.asarray(m1), block)
    r2 = rot(m1[perm].reshape(-1, block))
    return DuQuantRotation(r1, jnp.asarray(perm, jnp.int32), r2)


# ------------------------------------------------------------------ application


def _blockwise(x: jax.Array, r: jax.Array) -> jax.Array:
    """``x [..., K·b] @ blockdiag(r)``, ``r [K, b, b]``."""
    k, b, _ = r.shape
    y = jnp.einsum("...kb,kbc->...kc", x.reshape(x.shape[:-1] + (k, b)), r.astype(x.dtype))
    return y.reshape(x.shape)


@jax.jit
def apply_rotation(x: jax.Array, rot: DuQuantRotation) -> jax.Array:
    """``x [..., C_in] ↦ x R̂1 P R̂2`` (same shape and dtype, float32 at least inside)."""
    dtype = x.dtype
    y = x.astype(jnp.promote_types(dtype, jnp.float32))
    y = _blockwise(y, rot.r1)[..., rot.perm]
    return _blockwise(y, rot.r2).astype(dtype)


@jax.jit
def fold_into_weight(w: jax.Array, rot: DuQuantRotation) -> jax.Array:
    """``W [C_in, C_out] ↦ R̂2ᵀ Pᵀ R̂1ᵀ W``, so ``apply_rotation(x) @ fold(W) = x @ W``."""
    dtype = w.dtype
    wt = jnp.swapaxes(w.astype(jnp.promote_types(dtype, jnp.float32)), 0, 1)   # [C_out, C_in]
    # (R̂ᵀ W)ᵀ = Wᵀ R̂, and (Pᵀ W1)[p] = W1[perm[p]]: the same row ops as on activations
    wt = _blockwise(wt, rot.r1)[..., rot.perm]
    return jnp.swapaxes(_blockwise(wt, rot.r2), 0, 1).astype(dtype)


@jax.jit
def unfold_from_weight(w: jax.Array, rot: DuQuantRotation) -> jax.Array:
    """``W [C_in, C_out] ↦ R̂1 P R̂2 W`` (the inverse of :func:`fold_into_weight`)."""
    dtype = w.dtype
    wt = jnp.swapaxes(w.astype(jnp.promote_types(dtype, jnp.float32)), 0, 1)   # [C_out, C_in]
    # (R W)ᵀ = Wᵀ Rᵀ = Wᵀ R̂2ᵀ Pᵀ R̂1ᵀ, and (y Pᵀ)[..., i] = y[..., inv_perm[i]]
    inv = jnp.argsort(rot.perm)
    wt = _blockwise(wt, jnp.swapaxes(rot.r2, 1, 2))[..., inv]
    return jnp.swapaxes(_blockwise(wt, jnp.swapaxes(rot.r1, 1, 2)), 0, 1).astype(dtype)


def rotation_matrix(rot: DuQuantRotation) -> jax.Array:
    """The full float32 ``[C_in, C_in]`` matrix ``R̂1 P R̂2`` (for tests and inspection)."""
    c = rot.perm.shape[0]
    return apply_rotation(jnp.eye(c, dtype=jnp.float32), rot)


# ------------------------------------------------------------------ the adaptive choice


def choose_path(j: float, tau: float = DEFAULT_TAU) -> str:
    """Eq. 12's branch: ``"hadamard"`` if ``J < τ`` else ``"duquant"``."""
    return "hadamard" if j < tau else "duquant"


def ars_plan(layer_stats: Mapping, tau: float = DEFAULT_TAU, block: int | None = None,
             steps: int = 8) -> dict:
    """A layer's ARS decision from its pooled calibration stats.

    Args:
      layer_stats: ``{"sq_sum": [], "count": [], "absmax": [C_in], ...}``
        (:func:`jaxdq.calibrate.pool_stats` of one linear).
    Returns:
      ``{"J": float, "path": "hadamard" | "duquant", "block": int, "rotation":
      DuQuantRotation | None}``; for "hadamard" the rotation is
      :func:`jaxdq.quant.hadamard.block_hadamard` with ``block``.
    """
    j = frobenius_j(layer_stats)
    c = int(np.asarray(layer_stats["absmax"]).shape[-1])
    path = choose_path(j, tau)
    if path == "hadamard":
        return {"J": j, "path": path, "block": block or hadamard_block_size(c), "rotation": None}
    b = block or hadamard_block_size(c, DEFAULT_BLOCK)
    return {"J": j, "path": path, "block": b,
            "rotation": duquant_rotation(layer_stats["absmax"], b, steps)}


def _layers(tree: Mapping, prefix: str = ""):
    """``(path, stats)`` of every layer (a mapping with ``sq_sum`` and ``count``)."""
    if "sq_sum" in tree and "count" in tree:
        yield prefix, tree
        return
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _layers(v, f"{prefix}/{k}" if prefix else str(k))


def report(stats_by_layer: Mapping, tau: float = DEFAULT_TAU) -> list[dict]:
    """Each layer's J and ARS path.

    Args:
      stats_by_layer: pooled calibration stats, either a params-shaped tree or a flat
        ``{path: layer_stats}`` mapping (layers are the mappings with ``sq_sum`` and ``count``).
      tau: the threshold.
    Returns:
      One row per layer, in tree order: ``{"layer", "J", "path", "absmax_max",
      "absmax_median"}`` (the last two when ``absmax`` is present: salient outlier
      channels show as ``absmax_max ≫ absmax_median``).
    """
    rows = []
    for path, st in _layers(stats_by_layer):
        j = frobenius_j(st)
        row = {"layer": path, "J": j, "path": choose_path(j, tau)}
        if "absmax" in st:
            a = np.asarray(st["absmax"], np.float64)
            row["absmax_max"], row["absmax_median"] = float(a.max()), float(np.median(a))
        rows.append(row)
    return rows


# ------------------------------------------------------------------ ARS as a layer transform

def hadamard_rotation(width: int, kind: str = "full") -> Any:
    """ARS's ``J < τ`` rotation node for a ``width``-channel input:
    :func:`jaxdq.quant.hadamard.rotation_for` — the full-width Hadamard
    (:class:`~jaxdq.quant.hadamard.FullHadamard`, QuaRot's construction) where one is
    built for the width, else the block Hadamard of the largest power-of-two block;
    ``kind="block"`` always the block one.  The same node the ``quarot-*`` recipes use,
    so the Hadamard-only ablation and ARS's Hadamard branch are the same transform."""
    return hadamard.rotation_for(width, kind)


def ars_rotation(layer_stats: Mapping, width: int, tau: float = DEFAULT_TAU, block: int | None = None,
                 steps: int = 8, smooth: Any = None, hadamard_kind: str = "full") -> tuple[Any, dict]:
    """One layer's ARS rotation node and its report row.

    Args:
      layer_stats: the layer's pooled calibration stats (``sq_sum``, ``count``, ``absmax``).
      width: C_in.
      tau, block, steps: as :func:`ars_plan`.
      smooth: the layer's smoothing divisor ``[C_in]`` if it has one (the DuQuant
        construction then reads the smoothed maxima ``absmax / smooth``; J stays the raw
        input's, as the paper defines it).
      hadamard_kind: "full" or "block" (:func:`hadamard_rotation`).
    Returns:
      ``(rotation node, {"J", "path", "rotation", "block", "absmax_max", "absmax_median"})``:
      a :class:`DuQuantRotation` when ``J ≥ τ``, else :func:`hadamard_rotation`.
    """
    st = dict(layer_stats)
    absmax = np.asarray(st["absmax"], np.float64)
    if smooth is not None:
        st["absmax"] = (absmax / np.asarray(smooth, np.float64)).astype(np.float32)
    plan = ars_plan(st, tau, block, steps)
    rot = plan["rotation"] if plan["path"] == "duquant" else hadamard_rotation(width, hadamard_kind)
    row = {"J": float(plan["J"]), "path": plan["path"], "rotation": type(rot).__name__,
           "block": int(plan["block"] if plan["path"] == "duquant" else getattr(rot, "block", width)),
           "absmax_max": float(absmax.max()), "absmax_median": float(np.median(absmax))}
    return rot, row


def ars_params(params: Mapping, stats: Mapping, select: Callable[[str], bool], *, tau: float = DEFAULT_TAU,
               block: int | None = None, steps: int = 8, hadamard_kind: str = "full") -> tuple[dict, list[dict]]:
    """ARS on every selected float linear: each layer's rotation (:func:`ars_rotation`,
    from its pooled calibration ``stats``, params-shaped) folded exactly into the layer by
    :func:`jaxdq.quant.transforms.rotate_layer` (the float model's function is unchanged).

    Returns ``(params, rows)``, one report row per rotated layer ``{"layer", "J", "path",
    "rotation", "block", "absmax_max", "absmax_median"}`` in tree order.
    """
    from jaxdq.quant.layers import get_path
    from jaxdq.quant.transforms import rotate_layer, transform_params

    rows: list[dict] = []

    def fn(path, layer):
        rot, row = ars_rotation(get_path(stats, path), layer.in_features, tau, block, steps,
                                smooth=layer.transform.smooth, hadamard_kind=hadamard_kind)
        rows.append({"layer": path, **row})
        return rotate_layer(layer, rot)

    return transform_params(params, fn, select), rows


def format_report(report: Any, tau: float | None = None) -> str:
    """ARS report as text: one line per layer (J, path, rotation, salient-channel ratio
    ``absmax_max / absmax_median``) and how many layers took each path.

    ``report``: the rows of :func:`ars_params` / :func:`report`, a quantized model's
    metadata ``report`` (``{"ars": rows, ...}``), the metadata dict itself, or a
    :class:`jaxdq.models.sources.LoadedModel`.
    """
    meta = getattr(report, "metadata", report)
    if isinstance(meta, Mapping):
        meta = meta.get("report", meta)
        if "ars" not in meta:
            raise ValueError("no ARS report here (quantize with an lrq-dit recipe)")
        if tau is None:
            tau = meta.get("ars_tau")
        rows = meta["ars"]
    else:
        rows = list(meta)
    width = max([len("layer")] + [len(r["layer"]) for r in rows])
    lines = [f"{'layer':<{width}}  {'J':>8}  {'path':<8}  {'rotation':<15}  {'block':>5}  {'max/median':>10}"]
    for r in rows:
        ratio = r.get("absmax_max", float("nan")) / max(r.get("absmax_median", float("nan")), 1e-30)
        lines.append(f"{r['layer']:<{width}}  {r['J']:8.4f}  {r['path']:<8}  {r.get('rotation', ''):<15}  "
                     f"{r.get('block', 0):>5}  {ratio:10.1f}")
    n_dq = sum(r["path"] == "duquant" for r in rows)
    head = f"τ = {tau}: " if tau is not None else ""
    lines.append(f"{head}{len(rows) - n_dq} of {len(rows)} layers Hadamard (J < τ), {n_dq} DuQuant (J ≥ τ)")
    return "\n".join(lines)


def print_report(report: Any, tau: float | None = None, file=None) -> None:
    """Print :func:`format_report` (to ``file``, default stdout)."""
    print(format_report(report, tau), file=file)
