"""Building blocks shared by the diffusers-style UNets and the KL autoencoder (Flax linen).

Arrays inside these modules are channels-last: images ``[N, H, W, C]``, token
sequences ``[N, T, C]`` (the models transpose from/to NCHW at their boundary).
Every matmul is a :class:`jaxdq.nn.Linear` and every convolution a :class:`jaxdq.nn.Conv`,
each with a role tag; conv params are ``{"kernel": [kh, kw, C_in, C_out] (HWIO),
"bias": [C_out]}`` (or a quantized conv) and norms ``{"scale": [C], "bias": [C]}``.

Conv roles (:func:`conv_role`): the UNet's ``conv_in`` "embedding" and ``conv_out``
"final" (float in every recipe), resnet ``conv1``/``conv2`` "conv", ``conv_shortcut``
"conv:shortcut", down/upsampler convs "conv:resample", a Transformer2D's 1x1 ``proj_in`` /
``proj_out`` "conv:proj"; every VAE conv "other" (the recipes' conv rules select role
"conv", so the VAE's convs stay float).  An up block's concatenated skip input reaches
``conv_shortcut`` with its split channel index (Q-Diffusion's shortcut splitting).

Module and param names mirror diffusers' ``state_dict`` keys with every
``name.<index>`` written ``name_<index>`` (``down_blocks.0.resnets.1.time_emb_proj``
→ ``down_blocks_0/resnets_1/time_emb_proj``, ``attn1.to_out.0`` → ``attn1/to_out_0``,
``ff.net.0.proj`` → ``ff/net_0/proj``), so a checkpoint key maps onto a param path
mechanically (:func:`torch_key`).

Normalizations and the attention softmax are computed in float32 whatever the
activation dtype.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.models.attention import attention
from jaxdq.nn import Conv, Linear
from jaxdq.quant.layers import FloatConv, QConv, iter_layers

# diffusers ModuleList names: their children are ``name.<i>`` in a state dict, ``name_<i>`` here.
INDEXED = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "downsamplers",
           "upsamplers", "to_out", "net")
_INDEXED_RE = re.compile(r"^(%s)_(\d+)$" % "|".join(INDEXED))

def torch_key(path: str) -> str:
    """Flax param path → diffusers state-dict key (``down_blocks_0/resnets_0/conv1/kernel`` →
    ``down_blocks.0.resnets.0.conv1.weight``); ``kernel`` and norm ``scale`` are ``weight``."""
    *mods, leaf = path.split("/")
    mods = [_INDEXED_RE.sub(r"\1.\2", m) for m in mods]
    return ".".join(mods + ["weight" if leaf in ("kernel", "scale") else leaf])


def linear_role(path: str) -> str:
    """The role tag the modules of this file give the Linear at ``path``."""
    segs = path.split("/")
    if segs[0] == "time_embedding" or segs[-1] == "time_emb_proj":
        return "time-embedding"
    if "attn1" in segs:
        return "self-attn"
    if "attn2" in segs:
        return "cross-attn:kv" if segs[-1] in ("to_k", "to_v") else "cross-attn"
    if "ff" in segs:
        return "ffn"
    if segs[-1] in ("to_q", "to_k", "to_v", "to_out_0"):
        return "self-attn"  # the spatial self-attention of UNet2DModel / the VAE
    return "other"  # proj_in / proj_out of linear-projection transformers


def conv_role(path: str, vae: bool = False) -> str:
    """The role tag the modules of this file give the Conv at ``path`` (module docstring)."""
    segs = path.split("/")
    if vae:
        return "other"
    if len(segs) == 1 and segs[0] == "conv_in":
        return "embedding"
    if len(segs) == 1 and segs[0] == "conv_out":
        return "final"
    if segs[-1] == "conv_shortcut":
        return "conv:shortcut"
    if len(segs) > 1 and re.match(r"^(downsamplers|upsamplers)_\d+$", segs[-2]):
        return "conv:resample"
    if segs[-1] in ("proj_in", "proj_out"):
        return "conv:proj"
    return "conv"


def _sub(role: str, sub: str) -> str:
    """A conv sub-role of ``role`` ("conv" → "conv:sub"); other roles (the VAE's) unchanged."""
    return f"{role}:{sub}" if role == "conv" else role


def activation(name: str):
    """diffusers ``act_fn`` → function (only SiLU is used by the supported models)."""
    if name in ("silu", "swish"):
        return nn.silu
    raise ValueError(f"unsupported act_fn {name!r}: only 'silu' / 'swish'")


# ---------------------------------------------------------------------------------------------
# primitives


#: The conv module (``Conv2d(features, kernel_size, stride=, padding=, role=)``): :class:`jaxdq.nn.Conv`.
Conv2d = Conv


class GroupNorm(nn.Module):
    """torch ``GroupNorm`` over channels-last ``[N, ..., C]``: statistics per sample and group
    over all non-batch axes, biased variance, affine ``scale``/``bias`` ``[C]``; float32 inside."""

    groups: int
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        if c % self.groups:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, c // self.groups)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = jnp.mean(xf, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * scale + bias).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with affine ``scale``/``bias``; float32 inside."""

    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        return ((xf - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias).astype(x.dtype)


def timestep_sinusoid(t: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                      max_period: float = 10000.0) -> jax.Array:
    """diffusers ``get_timestep_embedding``: ``[sin(t·f), cos(t·f)]`` (``[cos, sin]`` if flipped),
    ``f_k = exp(-log(max_period)·k / (dim/2 - freq_shift))``, zero-padded to ``dim`` if odd.

    Args:
      t: ``[N]`` int or float timesteps.
    Returns:
      ``[N, dim]`` float32.
    """
    half = dim // 2
    # the frequency table as a rounded-once float32 constant
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / (half - freq_shift))
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * jnp.asarray(freqs, jnp.float32)[None]
    sin, cos = jnp.sin(args), jnp.cos(args)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``[N, C_t] → [N, features]``: ``linear_1 → SiLU → linear_2`` (role "time-embedding")."""

    features: int
    act_fn: str = "silu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Linear(self.features, role="time-embedding", name="linear_1")(x)
        return Linear(self.features, role="time-embedding", name="linear_2")(activation(self.act_fn)(h))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, heads: int) -> jax.Array:
    """softmax(QKᵀ/√d)V per head in float32 (:func:`jaxdq.models.attention.attention`).

    Args:
      q: ``[N, T, H·d]``; k, v: ``[N, S, H·d]``.
    Returns:
      ``[N, T, H·d]`` float32.
    """
    n, t, hd = q.shape
    split = lambda a: a.reshape(n, a.shape[1], heads, hd // heads)  # noqa: E731
    return attention(split(q), split(k), split(v)).reshape(n, t, hd)


def _attend(x: jax.Array, context: jax.Array, heads: int, dim_head: int, out_dim: int, role: str,
            qkv_bias: bool) -> jax.Array:
    """diffusers ``Attention`` core: to_q(x), to_k/to_v(context), attention, to_out.0.
    Called inside a compact method: the Linears are created in the caller's scope."""
    inner = heads * dim_head
    q = Linear(inner, use_bias=qkv_bias, role=role, name="to_q")(x)
    kv_role = role + ":kv" if role == "cross-attn" else role  # keys/values of the text tokens
    k = Linear(inner, use_bias=qkv_bias, role=kv_role, name="to_k")(context)
    v = Linear(inner, use_bias=qkv_bias, role=kv_role, name="to_v")(context)
    out = dot_product_attention(q, k, v, heads).astype(x.dtype)
    return Linear(out_dim, role=role, name="to_out_0")(out)


# ---------------------------------------------------------------------------------------------
# ResNet / attention / resampling


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (pre-norm, ``time_embedding_norm="default"``).

    ``x [N, H, W, C_in]``, ``temb [N, D_t]`` or None → ``[N, H, W, out_channels]``::

        h = conv1(SiLU(norm1(x))) + time_emb_proj(SiLU(temb))
        h = conv2(SiLU(norm2(h)))
        out = (shortcut(x) + h) / output_scale_factor     # shortcut: 1x1 conv iff C_in != C_out

    use_temb: whether the block has ``time_emb_proj`` (False in the VAE).
    conv_role: role of conv1/conv2 ("conv"; the shortcut gets "conv:shortcut"), "other" in the VAE.
    ``split``: the channel index where ``x`` joins an up block's ``[h, skip]`` concatenation,
    passed to ``conv_shortcut`` (the layer that reads the raw concatenation, as Q-Diffusion
    splits its ``skip_connection``).
    """

    out_channels: int
    groups: int
    eps: float
    use_temb: bool = True
    groups_out: Optional[int] = None
    output_scale_factor: float = 1.0
    act_fn: str = "silu"
    conv_role: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None, split: Optional[int] = None) -> jax.Array:
        act = activation(self.act_fn)
        h = act(GroupNorm(self.groups, self.eps, name="norm1")(x))
        h = Conv2d(self.out_channels, 3, role=self.conv_role, name="conv1")(h)
        if self.use_temb:
            proj = Linear(self.out_channels, role="time-embedding", name="time_emb_proj")(act(temb))
            h = h + proj[:, None, None, :].astype(h.dtype)
        h = act(GroupNorm(self.groups_out or self.groups, self.eps, name="norm2")(h))
        h = Conv2d(self.out_channels, 3, role=self.conv_role, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv2d(self.out_channels, 1, role=_sub(self.conv_role, "shortcut"), name="conv_shortcut")(x, split)
        return (x + h) / self.output_scale_factor


class SpatialSelfAttention(nn.Module):
    """diffusers ``Attention`` as used by UNet2DModel and the VAE (``_from_deprecated_attn_block``):
    ``x [N, H, W, C] → (x + to_out(attn(group_norm(x)))) / rescale_output_factor``.

    Params ``group_norm``, ``to_q``/``to_k``/``to_v``/``to_out_0`` (all with bias, role "self-attn");
    old checkpoints call the Linears ``query``/``key``/``value``/``proj_attn``.
    """

    heads: int
    dim_head: int
    groups: int
    eps: float
    rescale_output_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        y = GroupNorm(self.groups, self.eps, name="group_norm")(x).reshape(n, h * w, c)
        y = _attend(y, y, self.heads, self.dim_head, c, "self-attn", qkv_bias=True)
        return (x + y.reshape(n, h, w, c)) / self.rescale_output_factor


class Attention(nn.Module):
    """Transformer attention ``[N, T, D] (, context [N, S, D_c]) → [N, T, out_dim]``;
    to_q/to_k/to_v without bias (diffusers ``attention_bias=False``), to_out_0 with bias."""

    heads: int
    dim_head: int
    out_dim: int
    role: str

    @nn.compact
    def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
        ctx = x if context is None else context.astype(x.dtype)
        return _attend(x, ctx, self.heads, self.dim_head, self.out_dim, self.role, qkv_bias=False)


class FeedForward(nn.Module):
    """GEGLU feed-forward ``[N, T, D] → [N, T, D]``: ``net_0/proj`` ``[D, 2·4D]`` split into
    (h, gate), ``h · GELU(gate)`` (exact GELU), ``net_2`` ``[4D, D]``; role "ffn"."""

    dim: int
    mult: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inner = self.dim * self.mult
        h, gate = jnp.split(_GEGLUProj(2 * inner, name="net_0")(x), 2, axis=-1)
        return Linear(self.dim, role="ffn", name="net_2")(h * nn.gelu(gate, approximate=False))


class _GEGLUProj(nn.Module):
    """diffusers ``GEGLU``'s parameter holder: its Linear is ``net.0.proj``."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return Linear(self.features, role="ffn", name="proj")(x)


class BasicTransformerBlock(nn.Module):
    """diffusers ``BasicTransformerBlock`` (``norm_type="layer_norm"``, GEGLU):
    self-attention (attn1), cross-attention to ``context`` (attn2), feed-forward (ff),
    each pre-LayerNorm (eps 1e-5) and residual.  ``x [N, T, D], context [N, S, D_c] → [N, T, D]``."""

    dim: int
    heads: int
    dim_head: int

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + Attention(self.heads, self.dim_head, self.dim, "self-attn", name="attn1")(
            LayerNorm(1e-5, name="norm1")(x))
        x = x + Attention(self.heads, self.dim_head, self.dim, "cross-attn", name="attn2")(
            LayerNorm(1e-5, name="norm2")(x), context)
        return x + FeedForward(self.dim, name="ff")(LayerNorm(1e-5, name="norm3")(x))


class Transformer2D(nn.Module):
    """diffusers ``Transformer2DModel`` on continuous input.

    ``x [N, H, W, C], context [N, S, D_c] → [N, H, W, C]``: GroupNorm (eps 1e-6), proj_in
    (Linear if ``use_linear_projection`` else 1x1 conv), ``num_layers`` transformer blocks
    of width ``heads·dim_head``, proj_out, plus the input.
    """

    heads: int
    dim_head: int
    groups: int
    use_linear_projection: bool = False
    num_layers: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        n, h, w, c = x.shape
        inner = self.heads * self.dim_head
        y = GroupNorm(self.groups, 1e-6, name="norm")(x)
        if self.use_linear_projection:
            y = Linear(inner, role="other", name="proj_in")(y.reshape(n, h * w, c))
        else:
            y = Conv2d(inner, 1, role="conv:proj", name="proj_in")(y).reshape(n, h * w, inner)
        for i in range(self.num_layers):
            y = BasicTransformerBlock(inner, self.heads, self.dim_head, name=f"transformer_blocks_{i}")(y, context)
        if self.use_linear_projection:
            y = Linear(c, role="other", name="proj_out")(y).reshape(n, h, w, c)
        else:
            y = Conv2d(c, 1, role="conv:proj", name="proj_out")(y.reshape(n, h, w, inner))
        return y + x


class Downsample2D(nn.Module):
    """3x3 stride-2 conv ``conv``; ``padding=0`` pads one row/column at the bottom/right first
    (diffusers ``Downsample2D``), else ``padding`` on every side.  ``[N, H, W, C] → [N, H/2, W/2, C]``."""

    out_channels: int
    padding: int = 1
    conv_role: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return Conv2d(self.out_channels, 3, stride=2, padding=pad, role=_sub(self.conv_role, "resample"),
                      name="conv")(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv ``conv``.  ``[N, H, W, C] → [N, 2H, 2W, C]``."""

    out_channels: int
    conv_role: str = "conv"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return Conv2d(self.out_channels, 3, role=_sub(self.conv_role, "resample"), name="conv")(x)


# ---------------------------------------------------------------------------------------------
# UNet stages


class DownBlock(nn.Module):
    """One encoder stage: ``num_layers`` × (resnet [+ attention]) [+ downsampler].

    attention: "none" (DownBlock2D / DownEncoderBlock2D), "spatial" (AttnDownBlock2D),
    "cross" (CrossAttnDownBlock2D).  heads / dim_head: of the attention;
    transformer_layers: blocks per Transformer2D.

    ``x [N, H, W, C]``, ``temb [N, D_t]`` or None, ``context [N, S, D_c]`` or None →
    ``(x, skips)``: the output and every intermediate state the up path concatenates.
    conv_role: role tag of the stage's convs ("conv"; "other" in the VAE).
    """

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    attention: str = "none"
    heads: int = 1
    dim_head: int = 1
    use_temb: bool = True
    add_downsample: bool = True
    downsample_padding: int = 1
    use_linear_projection: bool = False
    transformer_layers: int = 1
    output_scale_factor: float = 1.0
    act_fn: str = "silu"
    conv_role: str = "conv"

    @nn.compact
    def __call__(self, x, temb=None, context=None):
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, self.use_temb,
                              output_scale_factor=self.output_scale_factor, act_fn=self.act_fn,
                              conv_role=self.conv_role, name=f"resnets_{i}")(x, temb)
            x = _stage_attention(self, i, x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, self.downsample_padding, conv_role=self.conv_role,
                             name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class UpBlock(nn.Module):
    """One decoder stage: ``num_layers`` × (concat skip, resnet [+ attention]) [+ upsampler].

    ``skips``: the states this stage consumes, used last-first (diffusers pops from the
    end); None or empty for the VAE decoder, which has no skip connections.
    Attributes as :class:`DownBlock` ("none" = UpBlock2D / UpDecoderBlock2D,
    "spatial" = AttnUpBlock2D, "cross" = CrossAttnUpBlock2D).
    """

    out_channels: int
    num_layers: int
    groups: int
    eps: float
    attention: str = "none"
    heads: int = 1
    dim_head: int = 1
    use_temb: bool = True
    add_upsample: bool = True
    use_linear_projection: bool = False
    transformer_layers: int = 1
    output_scale_factor: float = 1.0
    act_fn: str = "silu"
    conv_role: str = "conv"

    @nn.compact
    def __call__(self, x, skips: Optional[Sequence[jax.Array]] = None, temb=None, context=None):
        skips = list(skips or ())
        for i in range(self.num_layers):
            split = None
            if skips:
                split = x.shape[-1]  # [h, skip]: the two halves Q-Diffusion quantizes apart
                x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = ResnetBlock2D(self.out_channels, self.groups, self.eps, self.use_temb,
                              output_scale_factor=self.output_scale_factor, act_fn=self.act_fn,
                              conv_role=self.conv_role, name=f"resnets_{i}")(x, temb, split)
            x = _stage_attention(self, i, x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, conv_role=self.conv_role, name="upsamplers_0")(x)
        return x


class MidBlock(nn.Module):
    """``resnets_0``, then ``num_layers`` × (attention, resnet): diffusers ``UNetMidBlock2D``
    (attention "spatial" or "none" = ``add_attention=False``) or ``UNetMidBlock2DCrossAttn``
    ("cross").  attn_groups: GroupNorm groups of the spatial attention (default ``groups``)."""

    channels: int
    groups: int
    eps: float
    attention: str = "spatial"
    heads: int = 1
    dim_head: int = 1
    use_temb: bool = True
    num_layers: int = 1
    attn_groups: Optional[int] = None
    use_linear_projection: bool = False
    transformer_layers: int = 1
    output_scale_factor: float = 1.0
    act_fn: str = "silu"
    conv_role: str = "conv"

    @nn.compact
    def __call__(self, x, temb=None, context=None):
        def resnet(i, x):
            return ResnetBlock2D(self.channels, self.groups, self.eps, self.use_temb,
                                 output_scale_factor=self.output_scale_factor, act_fn=self.act_fn,
                                 conv_role=self.conv_role, name=f"resnets_{i}")(x, temb)

        x = resnet(0, x)
        for i in range(self.num_layers):
            x = _stage_attention(self, i, x, context, groups=self.attn_groups)
            x = resnet(i + 1, x)
        return x


def _stage_attention(block: nn.Module, i: int, x: jax.Array, context: Optional[jax.Array],
                     groups: Optional[int] = None) -> jax.Array:
    """The i-th attention of a stage (``attentions_{i}``), created in ``block``'s scope."""
    if block.attention == "none":
        return x
    if block.attention == "spatial":
        return SpatialSelfAttention(block.heads, block.dim_head, groups or block.groups, block.eps,
                                    block.output_scale_factor, name=f"attentions_{i}")(x)
    if block.attention == "cross":
        if context is None:
            raise ValueError("cross-attention blocks need encoder_hidden_states [N, S, D_c]")
        return Transformer2D(block.heads, block.dim_head, block.groups, block.use_linear_projection,
                             block.transformer_layers, name=f"attentions_{i}")(x, context)
    raise ValueError(f"unknown attention kind {block.attention!r}")


# ---------------------------------------------------------------------------------------------
# param-tree helpers


def nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


def flat_shapes(tree: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{"a/b/kernel": shape}`` of every leaf of a nested params dict (arrays or ShapeDtypeStructs)."""
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flat_shapes(v, path))
        else:
            out[path] = tuple(v.shape)
    return out


def _is_conv(layer) -> bool:
    return isinstance(layer, (FloatConv, QConv)) or getattr(getattr(layer, "kernel", None), "ndim", 0) == 4


def roles_of_params(params: Mapping[str, Any], vae: bool = False) -> dict[str, str]:
    """``{layer path: role}`` of every float or quantized Linear and Conv of a params tree
    (``vae``: the autoencoder's, whose convs are all "other")."""
    return {path: conv_role(path, vae) if _is_conv(layer) else linear_role(path) for path, layer in iter_layers(params)}
