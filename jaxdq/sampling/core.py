"""Pieces shared by the solvers: model-output splitting, per-step noise, the scan loop.

Model convention: ``model_fn(x_t, t) -> out`` with ``x_t [B, C, ...]`` and
``t int32 [B]`` training timesteps in [0, T).  ``out`` is ``[B, C, ...]`` (ε)
or ``[B, 2C, ...]`` (DiT learned sigma: ε, then the variance interpolation v).

A solver builds a *table*: a dict of ``[K]`` arrays, one row per step in
sampling order, always holding ``"step"`` (0..K-1) and ``"t"`` (the timestep
the model sees), plus the step's coefficients (derived in float64 NumPy, cast
to float32 once).  :func:`run_steps` scans a step function over its rows.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.sampling.progress import scan_progress

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def call_model(model_fn: ModelFn, x: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Evaluate the model at scalar timestep ``t`` for the whole batch.

    Args:
      x: ``[B, C, ...]``.
      t: int32 scalar.
    Returns:
      ``(eps, v)``: ``eps`` ``[B, C, ...]`` in ``x.dtype``; ``v`` the learned-sigma
      channels ``[B, C, ...]``, or None when the model outputs C channels.
    """
    if x.ndim < 2:
        raise ValueError(f"x must be [B, C, ...], got shape {x.shape}")
    out = model_fn(x, jnp.full((x.shape[0],), t, jnp.int32)).astype(x.dtype)
    c = x.shape[1]
    if out.shape[:1] + out.shape[2:] != x.shape[:1] + x.shape[2:] or out.shape[1] not in (c, 2 * c):
        raise ValueError(f"model output {out.shape} must be x's shape {x.shape} with {c} or {2 * c} channels")
    if out.shape[1] == c:
        return out, None
    return out[:, :c], out[:, c:]


def step_noise(key: jax.Array, step: jax.Array | int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """The standard normal noise a stochastic solver adds at loop step ``step`` (0 = first).

    ``jax.random.normal(jax.random.fold_in(key, step), shape, dtype)``.
    """
    return jax.random.normal(jax.random.fold_in(key, step), shape, dtype)


def predict_x0(x: jax.Array, eps: jax.Array, row: Mapping[str, jax.Array], clip_x0: float | None) -> jax.Array:
    """x̂0 = x/√ā − ε·√(1/ā − 1), optionally clipped to [−clip_x0, clip_x0].

    ``row`` holds the step's ``"sqrt_recip_ac"`` = √(1/ā) and ``"sqrt_recipm1_ac"`` = √(1/ā − 1).
    """
    x0 = row["sqrt_recip_ac"] * x - row["sqrt_recipm1_ac"] * eps
    return x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)


def x0_coefficients(alphas_cumprod: np.ndarray) -> dict[str, np.ndarray]:
    """``{"sqrt_recip_ac": √(1/ā), "sqrt_recipm1_ac": √(1/ā − 1)}`` for ``[K]`` float64 ā."""
    return {"sqrt_recip_ac": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_ac": np.sqrt(1.0 / alphas_cumprod - 1.0)}


def make_table(timesteps: np.ndarray, coefs: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Per-step rows: ``"step"``/``"t"`` int32 ``[K]`` plus each coefficient as float32 ``[K]``.

    A coefficient may already be a jax array (e.g. derived from a traced ``eta``).
    """
    table = {"step": jnp.arange(len(timesteps), dtype=jnp.int32),
             "t": jnp.asarray(timesteps, jnp.int32)}
    for name, value in coefs.items():
        table[name] = jnp.asarray(value, jnp.float32)
    return table


def run_steps(step_fn: Callable[[Any, dict], tuple[Any, jax.Array]], carry: Any, table: dict[str, jax.Array], *,
              return_trajectory: bool, progress: bool, desc: str) -> tuple[Any, dict | None]:
    """``lax.scan`` of ``step_fn(carry, row) -> (carry, x_in)`` over the table's rows.

    Returns:
      ``(final carry, trajectory)``; trajectory is ``{"x": [K, B, ...] the x_in of
      every step, "t": [K] int32}`` when ``return_trajectory``, else None.
    """
    total = int(table["t"].shape[0])

    def body(carry, row):
        carry, x_in = step_fn(carry, row)
        if progress:
            scan_progress(row["step"] + 1, total, desc, after=carry)
        return carry, (x_in if return_trajectory else None)

    carry, xs = jax.lax.scan(body, carry, table)
    return carry, ({"x": xs, "t": table["t"]} if return_trajectory else None)
