"""Timestep-dependent quantization inside a jitted sampler.

Two kinds of time dependence, both pure functions of (params, t):

* per-timestep static activation qparams (Q-Diffusion / TFMQ-DM FSC style): a
  QLinear whose ``act_t [S]`` holds the calibration timesteps and ``act_scale``/
  ``act_zero`` one value per timestep.  :func:`at_timestep` picks the entry of the
  nearest calibration timestep with a dynamic index (one compiled model).
* per-segment layer configurations (ViDiT-Q's timestep-segment mixed precision):
  a :class:`Segmented` node holds one layer variant per segment (variants may
  differ in bit width, i.e. in static structure).  :func:`timestep_aware` runs the
  model under ``lax.switch`` over the segments, each branch compiled with its own
  static variant; only the current segment's branch executes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxdq.quant.qlinear import QLinear


@struct.dataclass
class Segmented:
    """One linear layer with a variant per timestep segment.

    ``variants``: tuple of layer dicts (``{"qlinear": QLinear}`` or float dicts), one
    per distinct configuration; ``index``: static tuple, segment k uses
    ``variants[index[k]]``; ``bounds``: static descending timestep thresholds
    ``(b_1 > … > b_{K-1})``; timestep t is in segment ``#{j : t < b_j}`` (segment 0 =
    the first, noisiest sampling steps).
    """

    variants: tuple
    index: tuple = struct.field(pytree_node=False)
    bounds: tuple = struct.field(pytree_node=False)

    @property
    def num_segments(self) -> int:
        return len(self.index)


def segment_of(t: jax.Array, bounds: Sequence[int]) -> jax.Array:
    """Segment index (int32 scalar) of timestep ``t`` (scalar) for descending ``bounds``."""
    if not bounds:
        return jnp.int32(0)
    return jnp.sum(jnp.asarray(t) < jnp.asarray(bounds)).astype(jnp.int32)


def segment_bounds(timesteps: Sequence[int], num_segments: int) -> tuple[int, ...]:
    """Thresholds splitting a descending sampling timestep list into ``num_segments``
    runs of (nearly) equal length: segment k holds steps ``[k·S/K, (k+1)·S/K)``."""
    ts = [int(t) for t in timesteps]
    n = len(ts)
    cuts = [round(k * n / num_segments) for k in range(1, num_segments)]
    # threshold between step c-1 (larger t) and step c: t_c < b <= t_{c-1}
    return tuple(ts[c - 1] for c in cuts)


def _map_nodes(params: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(params, (QLinear, Segmented)):
        return fn(params)
    if isinstance(params, Mapping):
        return {k: _map_nodes(v, fn) for k, v in params.items()}
    return params


def at_segment(params: Mapping, k: int) -> dict:
    """Params with every :class:`Segmented` node replaced by its segment-``k`` variant."""
    return _map_nodes(params, lambda n: n.variants[n.index[k]] if isinstance(n, Segmented) else n)


def at_timestep(params: Mapping, t: jax.Array) -> dict:
    """Resolve per-timestep activation qparams to the calibration timestep nearest ``t``
    (a scalar, may be traced)."""

    def pick(node):
        if isinstance(node, QLinear) and node.act_t is not None:
            k = jnp.argmin(jnp.abs(node.act_t.astype(jnp.float32) - jnp.asarray(t, jnp.float32)))
            sel = lambda a: None if a is None else a[k]
            return dataclasses.replace(node, act_scale=sel(node.act_scale), act_zero=sel(node.act_zero), act_t=None)
        if isinstance(node, Segmented):
            return dataclasses.replace(node, variants=tuple(_map_nodes(v, pick) for v in node.variants))
        return node

    return _map_nodes(params, pick)


def segments_of(params: Mapping) -> tuple[int, tuple]:
    """(number of segments, bounds) of the :class:`Segmented` nodes (all must agree); (1, ()) if none."""
    found = set()
    _map_nodes(params, lambda n: found.add((n.num_segments, n.bounds)) if isinstance(n, Segmented) else None)
    if not found:
        return 1, ()
    if len(found) > 1:
        raise ValueError(f"Segmented layers disagree on their segments: {sorted(found)}")
    return found.pop()


def is_time_dependent(params: Mapping) -> bool:
    flags = []
    _map_nodes(params, lambda n: flags.append(isinstance(n, Segmented) or n.act_t is not None))
    return any(flags)


def timestep_aware(apply: Callable[..., jax.Array], params: Mapping) -> Callable[..., jax.Array]:
    """``f(x, t, *args) = apply(params_at(t), x, t, *args)`` where ``params_at(t)``
    resolves every time-dependent node for ``t[0]`` (the batch shares one timestep, as
    in sampling).  Plain params give ``apply(params, ...)`` unchanged."""
    if not is_time_dependent(params):
        return lambda x, t, *a: apply(params, x, t, *a)
    n_seg, bounds = segments_of(params)

    def f(x, t, *a):
        t0 = jnp.reshape(t, (-1,))[0]
        if n_seg == 1:
            return apply(at_timestep(params, t0), x, t, *a)
        branches = [lambda x, t, *a, k=k: apply(at_timestep(at_segment(params, k), t0), x, t, *a)
                    for k in range(n_seg)]
        return jax.lax.switch(segment_of(t0, bounds), branches, x, t, *a)

    return f
