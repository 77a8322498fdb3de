"""ViDiT-Q's metric-decoupled mixed precision, per timestep segment.

1. The sampling steps are split into ``K`` segments (default 4).
2. Layers are grouped by role tag, and each group is judged by its own metric
   (:data:`GROUP_METRIC`): ``quality`` (MSE of the conditional ε prediction:
   spatial attention, FFN), ``alignment`` (MSE of the guidance direction
   ε_cond − ε_uncond: the conditioning paths, cross-attention and adaLN, since a
   class-conditional DiT receives its condition through adaLN) and ``temporal``
   (MSE of the frame-to-frame difference of ε: temporal attention).
3. Sensitivity of a layer in a segment = the metric's increase when that layer
   alone drops from ``high`` to ``low`` weight bits (all other layers at ``high``),
   measured on the calibration trajectory's inputs in that segment.  Activations
   are left float in this measurement: the allocation is over weight bits.
4. Each group gets a share of the promotion budget proportional to its layers'
   summed ``quality`` sensitivity (their effect on the output); inside a group the
   layers are ranked by the group's metric and promoted to ``high`` bits greedily
   while the share allows; what is left is spent greedily over all layers.  The
   result never exceeds the budget, and no further layer fits in what remains.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Optional

import jax
import jax.numpy as jnp

GROUP_METRIC = {"cross-attn": "alignment", "adaLN": "alignment", "temporal-attn": "temporal"}


def metric_of(role: Optional[str]) -> str:
    return GROUP_METRIC.get(role or "", "quality")


def allocate(sizes: Mapping[str, int], metrics: Mapping[str, str], sens: Mapping[str, Mapping[str, float]],
             budget_bits: float, low: int = 4, high: int = 8) -> tuple[set, dict]:
    """Choose which layers get ``high`` weight bits under an average-bit budget.

    Args:
      sizes: path → number of weight elements.
      metrics: path → the metric of its group ("quality" | "alignment" | "temporal").
      sens: path → {metric name: sensitivity} (≥ 0; larger = more sensitive).
      budget_bits: average weight bits allowed over all the layers in ``sizes``.
    Returns:
      (promoted paths, accounting dict with ``budget``, ``used`` total bits, ``left``).
    """
    total = sum(sizes.values())
    budget = budget_bits * total
    base = low * total
    if budget < base:
        raise ValueError(f"budget {budget_bits} bits is below the {low}-bit floor")
    extra = budget - base
    cost = {p: (high - low) * n for p, n in sizes.items()}
    groups: dict[str, list[str]] = {}
    for p in sizes:
        groups.setdefault(metrics[p], []).append(p)
    q_total = sum(sens[p]["quality"] for p in sizes) or 1.0
    promoted: set = set()
    used = 0.0
    for g, paths in groups.items():
        share = extra * sum(sens[p]["quality"] for p in paths) / q_total
        spent = 0.0
        for p in sorted(paths, key=lambda p: -sens[p][g]):
            if spent + cost[p] <= share and used + cost[p] <= extra:
                promoted.add(p)
                spent += cost[p]
                used += cost[p]
    for p in sorted(sizes, key=lambda p: -sens[p][metrics[p]] / max(sizes[p], 1)):
        if p not in promoted and used + cost[p] <= extra:
            promoted.add(p)
            used += cost[p]
    return promoted, {"budget": budget, "used": base + used, "left": extra - used}


def output_metrics(eps_c: jax.Array, eps_u: jax.Array, ref_c: jax.Array, ref_u: jax.Array,
                   frame_axis: Optional[int] = None) -> dict:
    """The three group metrics of one quantized output against the float output."""
    out = {"quality": jnp.mean(jnp.square(eps_c - ref_c)),
           "alignment": jnp.mean(jnp.square((eps_c - eps_u) - (ref_c - ref_u)))}
    if frame_axis is not None:
        d = jnp.diff(eps_c, axis=frame_axis) - jnp.diff(ref_c, axis=frame_axis)
        out["temporal"] = jnp.mean(jnp.square(d))
    else:
        out["temporal"] = jnp.zeros(())
    return out


def layer_sensitivities(eval_fn: Callable[[Mapping], dict], base: Mapping, candidates: Mapping[str, Callable],
                        progress: bool = False) -> dict:
    """``{path: metrics}``: ``eval_fn(params)`` (jitted; returns :func:`output_metrics`)
    on ``base`` with one layer replaced by ``candidates[path](base)``, minus the
    base's own metrics (clipped at 0)."""
    from jaxdq.sampling.progress import ProgressBar

    ref = {k: float(v) for k, v in eval_fn(base).items()}
    out = {}
    bar = ProgressBar(len(candidates), "sensitivity") if progress else None
    for path, make in candidates.items():
        m = eval_fn(make(base))
        out[path] = {k: max(float(v) - ref[k], 0.0) for k, v in m.items()}
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    return out
