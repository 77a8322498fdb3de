"""Activation statistics of every linear layer, collected along sampling trajectories.

The float model first samples with ``return_trajectory=True`` (only the images
x_t are kept, never activations); the model is then replayed on that trajectory
under ``lax.scan`` with the ``act_stats`` collection mutable, so each
:class:`jaxdq.nn.Linear` folds the new activations into running reductions
(maxima, sums).  Memory is the statistics plus one forward pass.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxdq.nn import ACT_STATS


def collect_act_stats(apply_fn: Callable[..., Any], params: Mapping, step_inputs: Mapping[str, jax.Array],
                      *, progress: bool = False) -> dict:
    """Reduce every Linear's input statistics over a sequence of model calls.

    Args:
      apply_fn: ``flax_module.apply``.
      params: the float params tree.
      step_inputs: keyword arguments of the model call, each with a leading
        step axis ``S`` (e.g. ``{"x": [S, B, C, H, W], "t": [S, B], "y": [S, B]}``).
      progress: show a progress bar over the S calls.
    Returns:
      The ``act_stats`` tree (same module paths as ``params``); see
      ``jaxdq.nn._update_stats`` for the fields.
    """
    steps = jax.tree_util.tree_leaves(step_inputs)[0].shape[0]

    def call(variables, inputs):
        _, upd = apply_fn(variables, **inputs, mutable=[ACT_STATS])
        return upd[ACT_STATS]

    @jax.jit
    def run(params, step_inputs):
        first = jax.tree_util.tree_map(lambda a: a[0], step_inputs)
        stats = call({"params": params}, first)
        rest = jax.tree_util.tree_map(lambda a: a[1:], step_inputs)

        def body(stats, xs):
            i, inputs = xs
            if progress:
                from jaxdq.sampling.progress import scan_progress

                scan_progress(i + 1, steps, "calibrating")
            return call({"params": params, ACT_STATS: stats}, inputs), None

        stats, _ = jax.lax.scan(body, stats, (jnp.arange(1, steps), rest))
        return stats

    return jax.device_get(run(params, step_inputs))
