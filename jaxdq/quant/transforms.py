"""Float-equivalent layer transforms: ``FloatLinear → FloatLinear``, in any order.

Each transform changes how a float layer computes its product while keeping the function
it computes (up to rounding): the inverse goes into the kernel (and the low-rank factor).
A layer's transforms live in its one :class:`~jaxdq.quant.layers.InputTransform`, whose
forward order is fixed (``rotation(x / smooth)``, then the low-rank branch on the
transformed input), and every transform below folds itself into that order exactly,
whatever was applied before — so no order of calls builds an illegal layer:

* :func:`smooth_layer` (SmoothQuant λ): a later smoothing divides the raw input, so with a
  rotation already present the kernel becomes ``Rᵀ diag(λ) R W``;
* :func:`rotate_layer` (one rotation per layer): kernel and low-rank factor ``Rᵀ ·``;
* :func:`lowrank_layer` (one branch per layer): splits the kernel as it stands.

They apply to float layers only: quantization (:func:`jaxdq.quant.rules.quantize_linear`)
is the last step, and a quantized layer raises TypeError.  ``*_params`` versions map a
transform over the layers a ``select(path)`` predicate accepts.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from jaxdq.quant.hadamard import BlockHadamard
from jaxdq.quant.layers import FloatLinear, InputTransform, get_path, map_layers
from jaxdq.quant.lowrank import svd_split
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.smooth import smoothing_factors

Select = Callable[[str], bool]


def _float(layer: Any, what: str) -> FloatLinear:
    if not isinstance(layer, FloatLinear):
        raise TypeError(f"{what} applies to float layers, not {type(layer).__name__}: "
                        "apply float-equivalent transforms before quantizing")
    return layer


def smooth_layer(layer: FloatLinear, lam) -> FloatLinear:
    """Divide the layer's raw input by ``λ [C_in]`` and fold ``λ`` into the weights.

    Without a rotation: ``W ← diag(λ) W``, ``L1 ← diag(λ) L1``; with one (``X' = (X/s) R``):
    ``W ← Rᵀ diag(λ) R W`` (same for ``L1``).  Divisors of repeated smoothings multiply.
    """
    layer = _float(layer, "smoothing")
    t = layer.transform
    lam = jnp.asarray(lam, jnp.float32)
    rot = t.rotation

    def fold(w):
        w = jnp.asarray(w, jnp.float32)
        if rot is None:
            return w * lam[:, None]
        return rot.rotate_weight(lam[:, None] * rot.unrotate_weight(w))

    la = None if t.lowrank_a is None else fold(t.lowrank_a)
    smooth = lam if t.smooth is None else t.smooth * lam
    return layer.replace(kernel=fold(layer.kernel), transform=t.replace(smooth=smooth, lowrank_a=la))


def rotate_layer(layer: FloatLinear, rotation: Optional[Any] = None) -> FloatLinear:
    """Rotate the layer's (smoothed) input online: ``X' ← X' R``, ``W ← Rᵀ W``, ``L1 ← Rᵀ L1``.

    ``rotation`` defaults to :class:`~jaxdq.quant.hadamard.BlockHadamard` with the largest
    power-of-two block dividing C_in.  A layer holds one rotation (compose rotations into
    one node to chain them).
    """
    layer = _float(layer, "rotation")
    t = layer.transform
    if t.rotation is not None:
        raise ValueError("layer is already rotated; a layer holds one rotation (compose them into one node)")
    rot = rotation if rotation is not None else BlockHadamard.for_width(layer.in_features)
    la = None if t.lowrank_a is None else rot.rotate_weight(jnp.asarray(t.lowrank_a, jnp.float32))
    return layer.replace(kernel=rot.rotate_weight(jnp.asarray(layer.kernel, jnp.float32)),
                         transform=t.replace(rotation=rot, lowrank_a=la))


def lowrank_layer(layer: FloatLinear, rank: int, *, quant_spec: Optional[QuantSpec] = None, iters: int = 0,
                  factor_dtype=None) -> FloatLinear:
    """Split the kernel as it stands into ``L1 L2 + R`` (:func:`jaxdq.quant.lowrank.svd_split`):
    kernel ``R``, branch ``(X' L1) L2``.  ``rank`` is clipped to ``min(C_in, C_out)``;
    0 leaves the layer unchanged."""
    layer = _float(layer, "a low-rank split")
    if layer.transform.lowrank_a is not None:
        raise ValueError("layer already has a low-rank branch")
    rank = min(int(rank), *layer.kernel.shape)
    if rank == 0:
        return layer
    s = svd_split(layer.kernel, rank, quant_spec=quant_spec, iters=iters, factor_dtype=factor_dtype)
    return layer.replace(kernel=s.R, transform=layer.transform.replace(lowrank_a=s.L1, lowrank_b=s.L2))


def transform_params(params: Mapping, fn: Callable[[str, FloatLinear], FloatLinear], select: Select) -> dict:
    """``fn(path, layer)`` on every float linear whose path ``select`` accepts."""
    return map_layers(params, lambda p, l: fn(p, l) if isinstance(l, FloatLinear) and select(p) else l)


def smooth_params(params: Mapping, stats: Mapping, alpha: float, select: Select) -> dict:
    """SmoothQuant on the selected layers: each layer's ``λ`` from its pooled calibration
    ``absmax [C_in]`` (``stats`` has the params' layer paths) and the current kernel."""
    def fn(path, layer):
        lam = smoothing_factors(get_path(stats, path)["absmax"], layer.effective_kernel(), alpha)
        return smooth_layer(layer, lam)

    return transform_params(params, fn, select)


def rotate_params(params: Mapping, select: Select, rotation_for: Optional[Callable[[int], Any]] = None) -> dict:
    """:func:`rotate_layer` on the selected layers; ``rotation_for(C_in)`` builds each
    layer's rotation (default: the block Hadamard of the largest power-of-two block)."""
    make = rotation_for or BlockHadamard.for_width
    return transform_params(params, lambda p, l: rotate_layer(l, make(l.in_features)), select)


def smoothed_range(stats: Mapping, layer: FloatLinear) -> dict:
    """Per-tensor range of the layer's transformed input bounded from its pooled raw-input
    statistics: ``max_j absmax_j / smooth_j`` (exact for a smoothing alone)."""
    if layer.transform.smooth is None:
        return stats
    m = float(np.max(np.asarray(stats["absmax"]) / np.asarray(layer.transform.smooth)))
    return dict(stats, min=-m, max=m)


__all__ = ["InputTransform", "lowrank_layer", "rotate_layer", "rotate_params", "smooth_layer", "smooth_params",
           "smoothed_range", "transform_params"]
