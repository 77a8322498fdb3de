"""The one `linear` call every matmul of every jaxdq model goes through.

A float linear layer is the dict ``{"kernel": [C_in, C_out], "bias": [C_out]}``;
a quantized one is ``{"qlinear": QLinear(...)}`` (see :mod:`jaxdq.quant.qlinear`).
:func:`linear` dispatches on which of the two it is given, so a quantized model is
the same Flax module applied to a different params tree.

:class:`Linear` is the Flax module wrapping :func:`linear`.  Applied with the
``act_stats`` collection mutable it also records streaming statistics of its
input (running maxima, so repeated calls reduce in place and nothing but the
statistics is kept): this is how :mod:`jaxdq.calibrate` observes activations.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdq.quant.qlinear import QLinear

ACT_STATS = "act_stats"
ACT_SAMPLES = "act_samples"  # when mutable, each Linear keeps SAMPLE_TOKENS of its input tokens
SAMPLE_TOKENS = 32

# Role tags later transforms select on (see jaxdq.quant.rules).
ROLES = ("self-attn", "cross-attn", "temporal-attn", "ffn", "adaLN", "time-embedding",
         "embedding", "final", "other")


def linear(p: Mapping[str, Any] | QLinear, x: jax.Array) -> jax.Array:
    """``x @ W + b`` for a float layer dict, or the quantized forward of a QLinear.

    A float layer dict may also carry the float-equivalent transforms of
    :mod:`jaxdq.quant` (``smooth``, ``hadamard``, ``lowrank_a``/``lowrank_b``):
    ``x' = H(x / smooth)``, ``y = x' W + (x' L1) L2 + b``.

    Args:
      p: ``{"kernel": [C_in, C_out], "bias": [C_out] (optional), ...}``, or
         ``{"qlinear": QLinear}``, or a QLinear.
      x: ``[..., C_in]`` floating array.
    Returns:
      ``[..., C_out]`` in ``x.dtype``.
    """
    if isinstance(p, Mapping) and "qlinear" in p:
        p = p["qlinear"]
    if isinstance(p, QLinear):
        return p(x)
    if not isinstance(p, Mapping):
        raise TypeError(f"linear() got {type(p).__name__}; time-dependent layers must be resolved first "
                        "(jaxdq.quant.timestep.timestep_aware)")
    x = transform_input(p, x)
    y = jnp.dot(x, p["kernel"].astype(x.dtype))
    if p.get("lowrank_a") is not None:
        y = y + jnp.dot(jnp.dot(x, p["lowrank_a"].astype(x.dtype)), p["lowrank_b"].astype(x.dtype))
    if p.get("bias") is not None:
        y = y + p["bias"].astype(x.dtype)
    return y


def transform_input(p: Mapping[str, Any], x: jax.Array) -> jax.Array:
    """The online input transforms of a float layer dict, in order: ``x / smooth``
    (``[C_in]``, from :mod:`jaxdq.quant.smooth`), then ``p["hadamard"](x)`` (a
    :class:`jaxdq.quant.hadamard.Hadamard`).  The kernel already holds their inverses."""
    if p.get("smooth") is not None:
        x = x / p["smooth"].astype(x.dtype)
    if p.get("hadamard") is not None:
        x = p["hadamard"](x)
    return x


def _update_stats(mod: nn.Module, x: jax.Array) -> None:
    """Running statistics of a linear layer's input ``x: [..., C_in]``.

    absmax: [C_in] per input channel max |x| (SmoothQuant / channel balancing);
    min, max: [] tensor range (static per-tensor quantization);
    token_absmax_max / token_absmax_min: [] the widest and narrowest per-token
      range seen (how much per-token dynamic quantization buys);
    sq_sum, count: [] running sum of x^2 and element count (Frobenius norm, LRQ-DiT's J).
    """
    xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    c = x.shape[-1]
    init = {
        "absmax": lambda: jnp.zeros((c,), jnp.float32),
        "min": lambda: jnp.array(jnp.inf, jnp.float32),
        "max": lambda: jnp.array(-jnp.inf, jnp.float32),
        "token_absmax_max": lambda: jnp.array(0.0, jnp.float32),
        "token_absmax_min": lambda: jnp.array(jnp.inf, jnp.float32),
        "sq_sum": lambda: jnp.array(0.0, jnp.float32),
        "count": lambda: jnp.array(0.0, jnp.float32),
    }
    v = {k: mod.variable(ACT_STATS, k, f) for k, f in init.items()}
    tok = jnp.max(jnp.abs(xf), axis=-1)
    v["absmax"].value = jnp.maximum(v["absmax"].value, jnp.max(jnp.abs(xf), axis=0))
    v["min"].value = jnp.minimum(v["min"].value, jnp.min(xf))
    v["max"].value = jnp.maximum(v["max"].value, jnp.max(xf))
    v["token_absmax_max"].value = jnp.maximum(v["token_absmax_max"].value, jnp.max(tok))
    v["token_absmax_min"].value = jnp.minimum(v["token_absmax_min"].value, jnp.min(tok))
    v["sq_sum"].value = v["sq_sum"].value + jnp.sum(xf * xf)
    v["count"].value = v["count"].value + xf.size


def _store_samples(mod: nn.Module, x: jax.Array) -> None:
    """Keep ``SAMPLE_TOKENS`` evenly strided input tokens ``[k, C_in]`` float32 (the last
    call's; reconstruction-style methods such as SVDQuant's α search read them)."""
    xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    k = min(SAMPLE_TOKENS, xf.shape[0])
    idx = jnp.asarray([round(i * (xf.shape[0] - 1) / max(k - 1, 1)) for i in range(k)], jnp.int32)
    v = mod.variable(ACT_SAMPLES, "samples", lambda: jnp.zeros((k, x.shape[-1]), jnp.float32))
    v.value = xf[idx]


class Linear(nn.Module):
    """Dense layer whose params may be float or quantized.

    Attributes:
      features: C_out.
      use_bias: whether a float layer has a bias.
      role: one of :data:`ROLES`; documentation for rules, not used in the math.
      kernel_init: initializer of the ``[C_in, C_out]`` kernel.
    """

    features: int
    use_bias: bool = True
    role: str = "other"
    kernel_init: Any = nn.initializers.xavier_uniform()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.is_initializing():
            p = {"kernel": self.param("kernel", self.kernel_init, (x.shape[-1], self.features))}
            if self.use_bias:
                p["bias"] = self.param("bias", self.bias_init, (self.features,))
        else:
            p = self.variables["params"]
        if self.is_mutable_collection(ACT_STATS):
            _update_stats(self, x)
        if self.is_mutable_collection(ACT_SAMPLES):
            _store_samples(self, x)
        return linear(p, x)
