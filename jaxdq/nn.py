"""The one ``Linear`` module every matmul of every jaxdq model goes through.

A linear layer's params are the Flax-native float dict ``{"kernel": [C_in, C_out],
"bias": [C_out]}`` or a typed layer of :mod:`jaxdq.quant.layers` (``QLinear``,
``FloatLinear`` with input transforms, ...), possibly bound to an execution policy
(:func:`jaxdq.backend.bind`).  :class:`Linear` hands whatever it holds to
:func:`jaxdq.backend.linear`, so a quantized model is the same Flax module applied to a
different params tree.

Applied with the ``act_stats`` collection mutable, :class:`Linear` also records streaming
statistics of its input (running maxima, so repeated calls reduce in place and nothing
but the statistics is kept): this is how :mod:`jaxdq.calibrate` observes activations.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdq import backend
from jaxdq.quant.rules import ROLES  # noqa: F401  (re-exported: the role tags models use)

ACT_STATS = "act_stats"
ACT_SAMPLES = "act_samples"  # when mutable, each Linear keeps SAMPLE_TOKENS of its input tokens
SAMPLE_TOKENS = 32


def linear(p: Any, x: jax.Array) -> jax.Array:
    """``y = layer(x)`` for a linear layer's params (see module docstring);
    ``x [..., C_in]`` → ``[..., C_out]`` in ``x.dtype``."""
    return backend.linear(p, x)


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
      role: one of :data:`jaxdq.quant.rules.ROLES`; what rules select on (the models'
        ``layer_roles`` list the same tags), not used in the math.
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
