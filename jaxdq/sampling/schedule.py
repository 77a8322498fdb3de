"""Discrete-time noise schedules and the choice of inference timesteps.

A schedule is defined by four scalars, so :class:`DiscreteSchedule` is a frozen
(hashable) dataclass registered as a *static* pytree: it can be closed over,
passed as a ``static_argnames`` argument, or passed as an ordinary argument of a
``jax.jit``-ed function (it then becomes part of the cache key, never a tracer).
Its arrays are NumPy arrays built on demand: computed in float64, exposed as
float32 (the ``*64`` variants keep float64 for deriving solver coefficients).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear")


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
    """β_t for t = 0 .. T-1 (T = ``num_train_timesteps``).

    ``kind="linear"``:        β = linspace(beta_start, beta_end, T)          (DDPM / DiT)
    ``kind="scaled_linear"``: β = linspace(√beta_start, √beta_end, T)²       (Stable Diffusion)
    """

    kind: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        if self.kind not in BETA_SCHEDULES:
            raise ValueError(f"unknown beta schedule {self.kind!r}; valid: {', '.join(BETA_SCHEDULES)}")
        if self.num_train_timesteps < 1:
            raise ValueError("num_train_timesteps must be >= 1")

    # --- float64 (for coefficient derivations) -------------------------------------------
    @property
    def betas64(self) -> np.ndarray:
        """``[T]`` float64."""
        n = self.num_train_timesteps
        if self.kind == "linear":
            return np.linspace(self.beta_start, self.beta_end, n, dtype=np.float64)
        return np.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, n, dtype=np.float64) ** 2

    @property
    def alphas_cumprod64(self) -> np.ndarray:
        """ᾱ_t = Π_{s≤t} (1 − β_s), ``[T]`` float64."""
        return np.cumprod(1.0 - self.betas64)

    # --- float32 views ---------------------------------------------------------------------
    @property
    def betas(self) -> np.ndarray:
        """``[T]`` float32."""
        return self.betas64.astype(np.float32)

    @property
    def alphas(self) -> np.ndarray:
        """1 − β_t, ``[T]`` float32."""
        return (1.0 - self.betas64).astype(np.float32)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t, ``[T]`` float32."""
        return self.alphas_cumprod64.astype(np.float32)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        """ᾱ_{t-1} with ᾱ_{-1} = 1, ``[T]`` float32."""
        return np.append(1.0, self.alphas_cumprod64[:-1]).astype(np.float32)

    @property
    def sqrt_alphas_cumprod(self) -> np.ndarray:
        """α_t = √ᾱ_t, ``[T]`` float32."""
        return np.sqrt(self.alphas_cumprod64).astype(np.float32)

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> np.ndarray:
        """σ_t = √(1 − ᾱ_t), ``[T]`` float32."""
        return np.sqrt(1.0 - self.alphas_cumprod64).astype(np.float32)

    @property
    def posterior_variance(self) -> np.ndarray:
        """β̃_t = β_t (1 − ᾱ_{t-1}) / (1 − ᾱ_t), ``[T]`` float32 (β̃_0 = 0)."""
        return posterior_variance64(self.alphas_cumprod64).astype(np.float32)


jax.tree_util.register_static(DiscreteSchedule)


def linear_schedule(num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> DiscreteSchedule:
    """DDPM / DiT linear β schedule (defaults: DiT's 1000 steps, 1e-4 .. 0.02)."""
    return DiscreteSchedule("linear", num_train_timesteps, beta_start, beta_end)


def scaled_linear_schedule(num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                           beta_end: float = 0.012) -> DiscreteSchedule:
    """Stable-Diffusion "scaled_linear" schedule: β = linspace(√start, √end, T)²."""
    return DiscreteSchedule("scaled_linear", num_train_timesteps, beta_start, beta_end)


def select_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """The K = ``num_steps`` training timesteps visited by a sampler, in sampling order.

    Identical to DiT / improved-DDPM ``space_timesteps(T, str(K))`` (one section):
    ``round(i · (T-1)/(K-1))`` for i = 0..K-1 with Python's round-half-even and
    the stride accumulated by repeated addition, then reversed.  So for K ≥ 2
    the first step is t = T-1 and the last is t = 0; K = 1 gives ``[T-1]``.

    Returns:
      ``[K]`` int64, strictly decreasing.
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_train_timesteps - 1], np.int64)
    stride = (num_train_timesteps - 1) / (num_steps - 1)
    cur, taken = 0.0, []
    for _ in range(num_steps):
        taken.append(round(cur))
        cur += stride
    return np.array(taken[::-1], np.int64)


def posterior_variance64(alphas_cumprod: np.ndarray) -> np.ndarray:
    """β̃_i = β_i (1 − ā_{i-1}) / (1 − ā_i) of the chain with cumulative products ``alphas_cumprod``.

    Args:
      alphas_cumprod: ``[K]`` float64, ā_i of a (possibly respaced) chain, increasing t.
    Returns:
      ``[K]`` float64; entry 0 is 0 (ā_{-1} = 1).
    """
    prev = np.append(1.0, alphas_cumprod[:-1])
    betas = 1.0 - alphas_cumprod / prev
    return betas * (1.0 - prev) / (1.0 - alphas_cumprod)
