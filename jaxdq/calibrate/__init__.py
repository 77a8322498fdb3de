"""Activation statistics of every linear layer, per timestep and per CFG branch.

:func:`calibrate` works on every model family through its
:class:`jaxdq.sampling.families.Family`: the float model first samples a
:class:`~jaxdq.sampling.families.Batch` with ``return_trajectory=True`` (only the
model inputs x_t are kept, never activations); the network is then replayed on that
trajectory under ``lax.scan`` with the ``act_stats`` collection mutable, once per CFG
branch (the condition and the null condition), so each :class:`jaxdq.nn.Linear`
reduces its input into a few statistics (see ``jaxdq.nn._update_stats``).  Memory is
the statistics plus one forward pass.

Per-step statistics (:func:`collect_step_stats`) keep a leading step axis ``S`` on
every leaf; :func:`pool_stats` reduces any subset of steps and branches back to
one set (what static quantizers and smoothing read).  A calibration result is the
pytree ``{"t": [S] int32, "cond": tree, "uncond": tree}`` (branches of the CFG
batch, observed separately); :func:`save_stats` / :func:`load_stats` store it.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.nn import ACT_SAMPLES, ACT_STATS, EMA_MOMENTUM
from jaxdq.sampling.families import Batch, trajectory_kwargs

# How each statistic combines over steps/branches.
_REDUCE = {"absmax": np.max, "min": np.min, "max": np.max, "token_absmax_max": np.max,
           "token_absmax_min": np.min, "sq_sum": np.sum, "count": np.sum, "ema_calls": np.sum,
           # conv inputs (jaxdq.nn.Conv): per-channel range, and the skip-concatenation split index
           "cmin": np.min, "cmax": np.max, "split": np.max}


def momentum_max(per_step: np.ndarray, momentum: float = EMA_MOMENTUM) -> np.ndarray:
    """The momentum-averaged maximum over calibration steps in the order given:
    ``e = a_0``, then ``e ← m e + (1 − m) a_s`` (``per_step [S, C]`` → ``[C]``)."""
    a = np.asarray(per_step, np.float64)
    e = a[0]
    for row in a[1:]:
        e = momentum * e + (1.0 - momentum) * row
    return e.astype(np.float32)


def collect_step_stats(apply_fn: Callable[..., Any], params: Mapping, step_inputs: Mapping[str, jax.Array],
                       *, samples: bool = False, progress: bool = False, label: str = "calibrating",
                       mesh=None) -> dict:
    """Every Linear's input statistics at each of S model calls, separately.

    Args:
      apply_fn: ``flax_module.apply``.
      params: the float params tree.
      step_inputs: keyword arguments of the model call, each with a leading
        step axis ``S`` (e.g. ``{"x": [S, B, C, H, W], "t": [S, B], "y": [S, B]}``).
      samples: also keep ``SAMPLE_TOKENS`` input tokens per layer and step
        (leaf ``"samples": [S, k, C_in]``).
      progress: progress bar over the S calls.
      mesh: a ``jax.sharding.Mesh``: data parallel, the batch axis (axis 1) of the step
        inputs split over its "data" axis; the statistics are reduced across devices
        inside the jitted replay (global max/min/sum), equal to one device's.
    Returns:
      Tree with the module paths of ``params``; each linear's leaves are the
      statistics of ``jaxdq.nn._update_stats`` with a leading ``[S]`` axis.
    """
    steps = jax.tree_util.tree_leaves(step_inputs)[0].shape[0]
    cols = [ACT_STATS] + ([ACT_SAMPLES] if samples else [])

    @jax.jit
    def run(params, step_inputs):
        def body(_, xs):
            i, inputs = xs
            if progress:
                from jaxdq.sampling.progress import scan_progress

                scan_progress(i + 1, steps, label)
            _, upd = apply_fn({"params": params}, **inputs, mutable=cols)
            out = dict(upd[ACT_STATS])
            if samples:
                out = _merge(out, upd[ACT_SAMPLES])
            return None, out

        return jax.lax.scan(body, None, (jnp.arange(steps), step_inputs))[1]

    if mesh is None:
        out = run(params, step_inputs)
    else:
        from jaxdq.distributed import call

        out = call(run, mesh, params, step_inputs, batch_axis=1)
    return jax.tree_util.tree_map(np.asarray, jax.device_get(out))


def _merge(a: Mapping, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out and isinstance(v, Mapping) else v
    return out


def _is_layer(node) -> bool:
    return isinstance(node, Mapping) and "absmax" in node


def pool_stats(stats: Mapping, steps: Optional[Sequence[int] | np.ndarray] = None) -> dict:
    """Reduce per-step statistics over ``steps`` (indices into S; all if None).

    ``stats`` is either a per-step tree (from :func:`collect_step_stats`) or a
    calibration result with ``"cond"``/``"uncond"`` branches, whose branches are
    pooled together.  Stored samples are concatenated to ``[n, C_in]``.  The
    momentum-averaged maximum ``absmax_ema`` is the one statistic whose pooling depends on
    the order: per step the max over the branches (what one CFG-batched call sees), then
    :func:`momentum_max` over the steps in sampling order (``steps`` as given).
    """
    if "cond" in stats:
        trees = [stats[b] for b in ("cond", "uncond") if b in stats]
    else:
        trees = [stats]

    def pool(nodes):
        if _is_layer(nodes[0]):
            out = {}
            for k in nodes[0]:
                arrs = [np.asarray(n[k]) if steps is None else np.asarray(n[k])[np.asarray(steps)] for n in nodes]
                if k == "absmax_ema":
                    out[k] = momentum_max(np.max(np.stack(arrs), axis=0))
                    continue
                a = np.concatenate(arrs, axis=0)
                out[k] = a.reshape(-1, a.shape[-1]) if k == "samples" else _REDUCE[k](a, axis=0)
            return out
        return {k: pool([n[k] for n in nodes]) for k in nodes[0]}

    return pool(trees)


def frobenius_j(layer_stats: Mapping) -> float:
    """LRQ-DiT's ``J = ||X||_F / sqrt(#elements)`` (RMS of the layer input) from pooled stats."""
    return float(np.sqrt(layer_stats["sq_sum"] / max(float(layer_stats["count"]), 1.0)))


def collect_act_stats(apply_fn: Callable[..., Any], params: Mapping, step_inputs: Mapping[str, jax.Array],
                      *, progress: bool = False) -> dict:
    """Statistics pooled over all S calls (``collect_step_stats`` then ``pool_stats``)."""
    return pool_stats(collect_step_stats(apply_fn, params, step_inputs, progress=progress))


def save_stats(path: str, stats: Mapping) -> str:
    """Write a statistics pytree (nested dicts of arrays) to one ``.npz`` file."""
    flat = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                walk(v, key)
            elif v is not None:  # an absent branch (no CFG) stays absent
                flat[key] = np.asarray(v)

    walk(stats, "")
    if not path.endswith(".npz"):
        path += ".npz"
    np.savez_compressed(path, **flat)
    return path


def load_stats(path: str) -> dict:
    """Inverse of :func:`save_stats`."""
    out: dict = {}
    with np.load(path) as z:
        for key in z.files:
            node = out
            *parents, leaf = key.split("/")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = z[key]
    return out


def calibrate(model, batch: Batch, *, solver: Optional[str] = None, num_steps: Optional[int] = None,
              guidance: Optional[float] = None, samples: bool = False, keep_inputs: bool = False,
              progress: bool = False, seed: int = 1, mesh=None) -> dict:
    """Per-timestep activation statistics of every Linear along the float model's own
    (guided) trajectories from ``batch``, the conditional and null-condition calls observed
    separately.

    Args:
      model: a :class:`jaxdq.models.sources.LoadedModel` (float).
      batch: noise and conditioning to calibrate on (``model.family.batch(config, request)``).
      solver, num_steps, guidance: the sampler's (None: the family's defaults).
      samples: also keep stored input tokens per layer and step (SVDQuant's α search).
      keep_inputs: keep the trajectory (``"inputs"``; mixed precision evaluates on it).
      seed: key of the sampler's per-step noise.
      mesh: a ``jax.sharding.Mesh``: sampling and replay data parallel over its "data" axis
        (N must divide over it); results equal one device's up to reduction order.
    Returns:
      ``{"t": [S] timesteps (what the network's ``t`` input saw), "cond": tree,
      "uncond": tree (absent without CFG)}``; every statistics leaf has a leading ``[S]``
      step axis.  With ``keep_inputs`` also ``"inputs": {"x": [S, N, ...], "cond": ...,
      "uncond": ...}``.
    """
    fam = model.family
    run = fam.sampler(model.config, solver=solver, num_steps=num_steps, guidance=guidance,
                      return_trajectory=True, progress=progress, mesh=mesh)
    _, traj = run(model.params, batch.x_T, batch.cond, batch.uncond, jax.random.PRNGKey(seed))
    out = {"t": np.asarray(traj["t"])}
    branches = {"cond": batch.cond, "uncond": batch.uncond}
    if keep_inputs:
        out["inputs"] = {"x": np.asarray(traj["x"]),
                         **{k: None if c is None else jax.tree_util.tree_map(np.asarray, fam.call_cond(c, guidance))
                            for k, c in branches.items()}}
    # both branches in one replay (one compilation): their per-step inputs stacked along the step axis
    present = [b for b, c in branches.items() if c is not None]
    per_branch = [trajectory_kwargs(fam, model.config, traj, fam.call_cond(branches[b], guidance)) for b in present]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *per_branch)
    stats = collect_step_stats(model.module.apply, model.params, stacked, samples=samples, progress=progress,
                               label=f"calibrating ({' + '.join(present)})", mesh=mesh)
    steps = len(out["t"])
    for i, b in enumerate(present):
        out[b] = jax.tree_util.tree_map(lambda a, i=i: a[i * steps:(i + 1) * steps], stats)
    return out
