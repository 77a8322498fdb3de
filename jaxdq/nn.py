"""The one ``Linear`` module every matmul of every jaxdq model goes through (and ``Conv``,
the one 2-D convolution module of the UNets and the VAE).

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

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdq import backend
from jaxdq.norm_linear import NormInput
from jaxdq.quant.rules import ROLES  # noqa: F401  (re-exported: the role tags models use)

ACT_STATS = "act_stats"
ACT_SAMPLES = "act_samples"  # when mutable, each Linear keeps SAMPLE_TOKENS of its input tokens
SAMPLE_TOKENS = 32
#: Momentum of the running per-channel activation maximum ``absmax_ema`` (ViDiT-Q's released
#: PixArt / OpenSora configs: ``channel_wise_scale_type: momentum_act_max``, ``momentum: 0.95``).
EMA_MOMENTUM = 0.95


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
    sq_sum, count: [] running sum of x^2 and element count (Frobenius norm, LRQ-DiT's J);
    absmax_ema: [C_in] momentum-averaged per-channel max |x| over the calls (ViDiT-Q's
      released configs' "momentum_act_max"): the first call's absmax, then
      ``m · ema + (1 − m) · absmax_of_the_call`` with ``m = EMA_MOMENTUM``; ema_calls: []
      calls seen.  Across calibration steps the EMA continues in sampling order when the
      per-step statistics are pooled (``jaxdq.calibrate.pool_stats``).
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
        "absmax_ema": lambda: jnp.zeros((c,), jnp.float32),
        "ema_calls": lambda: jnp.array(0.0, jnp.float32),
    }
    v = {k: mod.variable(ACT_STATS, k, f) for k, f in init.items()}
    tok = jnp.max(jnp.abs(xf), axis=-1)
    cur = jnp.max(jnp.abs(xf), axis=0)
    v["absmax_ema"].value = jnp.where(v["ema_calls"].value > 0,
                                      EMA_MOMENTUM * v["absmax_ema"].value + (1 - EMA_MOMENTUM) * cur, cur)
    v["ema_calls"].value = v["ema_calls"].value + 1
    v["absmax"].value = jnp.maximum(v["absmax"].value, cur)
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


def _update_conv_stats(mod: nn.Module, x: jax.Array, split) -> None:
    """A conv input's statistics: those of :func:`_update_stats` over its pixels
    ``[N·H·W, C_in]``, plus per-channel ``cmin``/``cmax`` ``[C_in]`` (ranges of any channel
    slice: the two halves of a split activation), and ``split`` (the channel index of a
    skip concatenation, Q-Diffusion's shortcut splitting) when the model passes one."""
    _update_stats(mod, x)
    xf = x.astype(jnp.float32).reshape(-1, x.shape[-1])
    c = x.shape[-1]
    lo = mod.variable(ACT_STATS, "cmin", lambda: jnp.full((c,), jnp.inf, jnp.float32))
    hi = mod.variable(ACT_STATS, "cmax", lambda: jnp.full((c,), -jnp.inf, jnp.float32))
    lo.value = jnp.minimum(lo.value, jnp.min(xf, axis=0))
    hi.value = jnp.maximum(hi.value, jnp.max(xf, axis=0))
    if split is not None:
        mod.variable(ACT_STATS, "split", lambda: jnp.float32(split)).value = jnp.float32(split)


class Conv(nn.Module):
    """2-D convolution (NHWC input, HWIO kernel) whose params may be float or quantized.

    Params as ``flax.linen.Conv``'s: ``kernel [kh, kw, C_in, features]`` and ``bias
    [features]`` (the float dict), or a typed conv layer (:class:`jaxdq.quant.layers.QConv`,
    possibly bound to a policy); :func:`jaxdq.backend.conv` runs it with this module's
    geometry.  ``x [N, H, W, C_in] → [N, H', W', features]`` in ``x.dtype``.

    Attributes:
      features: C_out.
      kernel_size: square kernel side k.
      stride: the stride of both spatial axes.
      padding: an int p (p on every side), explicit ``((top, bottom), (left, right))``, or
        None for ``k // 2`` (a "same" conv at stride 1).
      use_bias: whether a float layer has a bias.
      role: a role tag (:data:`jaxdq.quant.rules.ROLES`: "conv" and its sub-roles, or
        "embedding" / "final" / "other"); what rules select on, not used in the math.

    ``__call__(x, split=None)``: ``split`` is the channel index where ``x`` joins two
    tensors (an up block's ``concat([h, skip])``), recorded with the calibration statistics
    so a recipe can give each half its own activation range.
    """

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Any = None
    use_bias: bool = True
    role: str = "conv"
    kernel_init: Any = nn.initializers.lecun_normal()
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array, split: Any = None) -> jax.Array:
        from jaxdq.quant.layers import conv_geometry

        k = self.kernel_size
        if self.is_initializing():
            p = {"kernel": self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))}
            if self.use_bias:
                p["bias"] = self.param("bias", self.bias_init, (self.features,))
        else:
            p = self.variables["params"]
        if self.is_mutable_collection(ACT_STATS):
            _update_conv_stats(self, x, split)
        return backend.conv(p, x, conv_geometry(k, self.stride, self.padding))


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
    def __call__(self, x: jax.Array, epilogue: Optional[backend.Epilogue] = None) -> jax.Array:
        """``x [..., C_in]`` → ``[..., C_out]``, then ``epilogue`` (a :class:`jaxdq.backend.Epilogue`:
        ``residual + gate · act(y)``, fused into the GEMM where the backend allows)."""
        if isinstance(x, NormInput):  # a normalized input whose fused path may hold this layer's output
            y = x.output_for(self.path)
            if y is not None:
                if epilogue is None:
                    return y
                applied = x.act_for(self.path)
                if applied is not None and applied != epilogue.act:
                    raise ValueError(f"{'/'.join(self.path)}: output has activation {applied!r}, "
                                     f"the epilogue asks for {epilogue.act!r}")
                return (epilogue.without_act() if applied else epilogue).apply(y)
            x = x.value()
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
        return backend.linear(p, x, epilogue)
