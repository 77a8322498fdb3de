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
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.quant.layers import FloatLinear, Segmented, iter_layers, map_layers
from jaxdq.quant.quantizer import QuantSpec, fake_quant
from jaxdq.quant.rules import LayerQuant, quantize_linear
from jaxdq.quant.timestep import segment_bounds
from jaxdq.sampling.progress import ProgressBar

GROUP_METRIC = {"cross-attn": "alignment", "adaLN": "alignment", "temporal-attn": "temporal"}


def metric_of(role: Optional[str]) -> str:
    """The metric of a layer's group from its role tag (sub-roles such as ``cross-attn:kv``
    belong to their base role's group)."""
    return GROUP_METRIC.get((role or "").split(":")[0], "quality")


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


def mixed_precision(params: Mapping, calib: Mapping, *, roles: Mapping[str, str], select: Callable[[str], bool],
                    eps: Callable[..., jax.Array], layer_config: Callable[[int], LayerQuant],
                    budget_bits: float = 6.0, num_segments: int = 4, low: int = 4, high: int = 8,
                    steps_per_segment: int = 3, max_samples: int = 16, per_segment: bool = True,
                    progress: bool = False) -> tuple[dict, dict]:
    """Metric-decoupled timestep-segment mixed precision of a (balanced) float params tree.

    Per segment of the calibration trajectory, layer sensitivities (:func:`layer_sensitivities`
    on :func:`output_metrics`) and a greedy allocation under ``budget_bits`` average weight
    bits (:func:`allocate`); layers whose bits differ between segments become
    :class:`~jaxdq.quant.layers.Segmented` layers.

    Args:
      params: float params (already channel-balanced by the caller, if wanted).
      calib: a calibration result with ``"t" [S]`` and ``"inputs"``: ``{"x": [S, N, ...],
        "cond": {...}, "uncond": {...} | None}`` (``jaxdq.calibrate.calibrate(keep_inputs=True)``).
      roles: path → role tag; ``select(path)``: the layers to allocate (the rest stay as they are).
      eps: ``eps(params, x, t, **cond) -> [B, C, ...]`` one float network call of the family,
        its ε (or velocity) prediction in x's layout (``Family.eps_fn``).
      layer_config: ``bits -> LayerQuant`` of a layer at ``low`` or ``high`` weight bits.
      per_segment: one allocation per segment (True) or one for all timesteps (sensitivities
        summed over segments).
    Returns:
      ``(params, report)``: report has the budget, per-segment promoted layers, average bits
      and sensitivities.
    """
    if calib is None or "inputs" not in calib:
        raise ValueError("mixed precision needs the calibration trajectory (calibrate(..., keep_inputs=True))")
    inputs = calib["inputs"]
    paths = [p for p, l in iter_layers(params) if isinstance(l, FloatLinear) and select(p)]
    layers = dict(iter_layers(params))
    sizes = {p: int(np.prod(layers[p].kernel.shape)) for p in paths}
    metrics = {p: metric_of(roles.get(p)) for p in paths}
    deq = lambda k, bits: fake_quant(k, QuantSpec(bits=bits, granularity="channel"), kind="weight")  # noqa: E731
    low_k = {p: deq(layers[p].kernel, low) for p in paths}
    base = map_layers(params, lambda p, l: l.replace(kernel=deq(l.kernel, high)) if p in sizes else l)

    def swap(path):
        return lambda tree: map_layers(tree, lambda p, l: l.replace(kernel=low_k[p]) if p == path else l)

    x_all = jnp.asarray(inputs["x"])
    n_all = x_all.shape[1]
    n = min(max_samples, n_all)
    idx = np.linspace(0, n_all - 1, n).round().astype(int)
    def take(c):  # the evaluated samples of a condition (per-sample arrays; scalars such as guidance kept)
        if c is None:
            return None
        return {k: jnp.asarray(v)[idx] if jnp.ndim(v) and jnp.shape(v)[0] == n_all else v for k, v in c.items()}
    cond, uncond = take(inputs.get("cond") or {}), take(inputs.get("uncond"))  # unconditional model: no cond
    ts = np.asarray(calib["t"])
    S = len(ts)
    bounds = segment_bounds(ts, num_segments)

    def outputs(p, x, t):
        """Cond and uncond ε ``[K, n, C, ...]`` at K steps (params passed in, never closed over:
        closed-over arrays would be embedded in the program as constants)."""
        def one(xk, tk):
            tt = jnp.full((n,), tk, jnp.asarray(t).dtype)
            ec = eps(p, xk, tt, **cond)
            eu = ec if uncond is None else eps(p, xk, tt, **uncond)
            return ec, eu
        return jax.vmap(one)(x, t)

    float_apply = jax.jit(outputs)

    @jax.jit
    def eval_fn(p, x, t, ref_c, ref_u):
        return output_metrics(*outputs(p, x, t), ref_c, ref_u)

    promoted, seg_sens = [], []
    report = {"budget_bits": budget_bits, "low": low, "high": high, "segments": [], "per_segment": per_segment}
    for k in range(num_segments):
        lo_i, hi_i = round(k * S / num_segments), round((k + 1) * S / num_segments)
        steps = np.linspace(lo_i, hi_i - 1, min(steps_per_segment, hi_i - lo_i)).round().astype(int)
        x = x_all[steps][:, idx]
        t = jnp.asarray(ts[steps])
        ref_c, ref_u = float_apply(params, x, t)
        ev = lambda p, x=x, t=t, ref_c=ref_c, ref_u=ref_u: eval_fn(p, x, t, ref_c, ref_u)  # noqa: E731
        sens = layer_sensitivities(ev, base, {p: swap(p) for p in paths}, progress=progress)
        seg_sens.append(sens)
        chosen, acct = allocate(sizes, metrics, sens, budget_bits, low, high)
        promoted.append(chosen)
        report["segments"].append({"steps": [int(lo_i), int(hi_i)], "promoted": sorted(chosen),
                                   "avg_bits": acct["used"] / sum(sizes.values()),
                                   "sensitivity": {p: sens[p] for p in paths}})
    if not per_segment:
        total = {p: {m: sum(s[p][m] for s in seg_sens) for m in seg_sens[0][p]} for p in paths}
        chosen, acct = allocate(sizes, metrics, total, budget_bits, low, high)
        promoted = [chosen] * num_segments
        report["static"] = {"promoted": sorted(chosen), "avg_bits": acct["used"] / sum(sizes.values())}

    cfg_lo, cfg_hi = layer_config(low), layer_config(high)

    def build(path: str, layer: Any):
        if path not in sizes:
            return layer
        index = tuple(int(path in ch) for ch in promoted)
        if all(index):
            return quantize_linear(layer, cfg_hi)
        if not any(index):
            return quantize_linear(layer, cfg_lo)
        return Segmented(variants=(quantize_linear(layer, cfg_lo), quantize_linear(layer, cfg_hi)),
                         index=index, bounds=bounds)

    return map_layers(params, build), report
