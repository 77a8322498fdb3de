"""Timestep-dependent quantization inside a jitted sampler.

Two kinds of time dependence, both pure functions of (params, t):

* per-timestep static activation qparams (Q-Diffusion / TFMQ-DM FSC style): an
  :class:`~jaxdq.quant.layers.ActQuant` whose ``t [S]`` holds the calibration timesteps and
  ``scale``/``zero`` one value per timestep.  :func:`at_timestep` picks the entry of the
  nearest calibration timestep with a dynamic index (one compiled model).
* per-segment layer configurations (ViDiT-Q's timestep-segment mixed precision): a
  :class:`~jaxdq.quant.layers.Segmented` node holds one layer variant per segment (variants
  may differ in bit width, i.e. in static structure).  :func:`timestep_aware` runs the
  model under ``lax.switch`` over the segments, each branch compiled with its own static
  variant; only the current segment's branch executes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxdq.quant.layers import ActQuant, QConv, QLinear, Segmented, iter_layers, map_layers

__all__ = ["Segmented", "at_segment", "at_timestep", "is_time_dependent", "segment_bounds", "segment_of",
           "segments_of", "timestep_aware"]


def segment_of(t: jax.Array, bounds: Sequence[int]) -> jax.Array:
    """Segment index (int32 scalar) of timestep ``t`` (scalar) for descending ``bounds``."""
    if not bounds:
        return jnp.int32(0)
    return jnp.sum(jnp.asarray(t) < jnp.asarray(bounds)).astype(jnp.int32)


def segment_bounds(timesteps: Sequence[int], num_segments: int) -> tuple[int, ...]:
    """Thresholds splitting a descending sampling timestep list into ``num_segments``
    runs of (nearly) equal length: segment k holds steps ``[k·S/K, (k+1)·S/K)``."""
    # integer DDPM timesteps stay ints (as checkpoints store them); flow-matching sigmas stay floats
    ts = [int(t) if float(t).is_integer() else float(t) for t in timesteps]
    n = len(ts)
    cuts = [round(k * n / num_segments) for k in range(1, num_segments)]
    # threshold between step c-1 (larger t) and step c: t_c < b <= t_{c-1}
    return tuple(ts[c - 1] for c in cuts)


def at_segment(params: Mapping, k: int) -> dict:
    """Params with every :class:`Segmented` layer replaced by its segment-``k`` variant."""
    return map_layers(params, lambda _, l: l.variants[l.index[k]] if isinstance(l, Segmented) else l)


def _act_at(act: ActQuant, t) -> ActQuant:
    k = jnp.argmin(jnp.abs(act.t.astype(jnp.float32) - jnp.asarray(t, jnp.float32)))
    sel = lambda a: None if a is None else a[k]  # noqa: E731
    return dataclasses.replace(act, scale=sel(act.scale), zero=sel(act.zero), t=None)


def _layer_at(layer: Any, t) -> Any:
    if isinstance(layer, Segmented):
        return layer.replace(variants=tuple(_layer_at(v, t) for v in layer.variants))
    if isinstance(layer, (QLinear, QConv)) and layer.act is not None and layer.act.t is not None:
        return layer.replace(act=_act_at(layer.act, t))
    return layer


def at_timestep(params: Mapping, t: jax.Array) -> dict:
    """Resolve per-timestep activation qparams to the calibration timestep nearest ``t``
    (a scalar, may be traced)."""
    return map_layers(params, lambda _, l: _layer_at(l, t))


def _layers(params: Mapping) -> list:
    return [l for _, l in iter_layers(params)]


def segments_of(params: Mapping) -> tuple[int, tuple]:
    """(number of segments, bounds) of the :class:`Segmented` layers (all must agree); (1, ()) if none."""
    found = {(l.num_segments, l.bounds) for l in _layers(params) if isinstance(l, Segmented)}
    if not found:
        return 1, ()
    if len(found) > 1:
        raise ValueError(f"Segmented layers disagree on their segments: {sorted(found)}")
    return found.pop()


def _time_dependent(layer) -> bool:
    if isinstance(layer, Segmented):
        return True
    act = getattr(layer, "act", None)
    return act is not None and act.t is not None


def is_time_dependent(params: Mapping) -> bool:
    return any(_time_dependent(l) for l in _layers(params))


def timestep_aware(apply: Callable[..., jax.Array], params: Mapping) -> Callable[..., jax.Array]:
    """``f(x, t, *args, **kw) = apply(params_at(t), x, t, *args, **kw)`` where ``params_at(t)``
    resolves every time-dependent layer for ``t[0]`` (the batch shares one timestep, as in
    sampling).  Plain params give ``apply(params, ...)`` unchanged."""
    if not is_time_dependent(params):
        return lambda x, t, *a, **kw: apply(params, x, t, *a, **kw)
    n_seg, bounds = segments_of(params)

    def f(x, t, *a, **kw):
        t0 = jnp.reshape(t, (-1,))[0]
        if n_seg == 1:
            return apply(at_timestep(params, t0), x, t, *a, **kw)
        branches = [lambda x, t, *a, k=k: apply(at_timestep(at_segment(params, k), t0), x, t, *a, **kw)
                    for k in range(n_seg)]
        return jax.lax.switch(segment_of(t0, bounds), branches, x, t, *a)

    return f
