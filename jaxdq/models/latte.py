"""Latte text-to-video DiT (diffusers ``LatteTransformer3DModel``, Latte-1) in Flax linen.

PixArt-α blocks over each frame ("spatial" blocks, with cross-attention to the
caption) alternating with blocks that attend over the frames axis at each patch
position ("temporal" blocks, no cross-attention), all modulated by one shared
adaLN-single.  Input ``[N, C, F, H, W]``.  Param tree (``D`` = hidden size; the
blocks are :class:`jaxdq.models.pixart.PixArtBlock`)::

    x_embedder/proj                              [C·p·p, D]      role "embedding"
    adaln_single/t_embedder/linear_1, linear_2   [256, D], [D, D]  "time-embedding"
    adaln_single/linear                          [D, 6D]         "adaLN"
    caption_projection/fc1, fc2                  [C_t, D], [D, D]  "embedding"
    blocks_{i}/scale_shift_table                 [6, D]          (plain param)
    blocks_{i}/attn1/qkv, attn1/proj             [D, 3D], [D, D]   "self-attn"
    blocks_{i}/attn2/q, attn2/kv, attn2/proj     [D, D], [D, 2D], [D, D]  "cross-attn" (kv: "cross-attn:kv")
    blocks_{i}/ff/fc1, ff/fc2                    [D, M], [M, D]    "ffn"
    temporal_blocks_{i}/scale_shift_table        [6, D]          (plain param)
    temporal_blocks_{i}/attn1/qkv, attn1/proj    [D, 3D], [D, D]   "temporal-attn"
    temporal_blocks_{i}/ff/fc1, ff/fc2           [D, M], [M, D]    "ffn"
    final_layer/scale_shift_table                [2, D]          (plain param)
    final_layer/linear                           [D, p·p·C_out]  "final"

Order of operations (as diffusers): frames are folded into the batch (``n·F + f``)
for the spatial blocks, patches for the temporal ones (``n·T + t``); before the first
temporal block a fixed 1D sin-cos embedding of the frame index is added (only when
there is more than one frame).  diffusers adds its ``[video_length, D]`` buffer, so
it needs ``F = video_length``; here frame ``f`` gets position ``f`` for any F.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.models.attention import check_attention_impl
from jaxdq.models.dit import _sincos_1d, check_transformer_dims, unpatchify
from jaxdq.models.pixart import (AdaLNSingle, CaptionProjection, FinalLayer, PixArtBlock,
                                 _unsupported_diffusers_settings, block_roles, embed_patches, mask_to_bias)


@dataclasses.dataclass(frozen=True)
class LatteConfig:
    """Latte hyper-parameters (defaults: Latte-1 T2V, 512² frames = 64² latents, 16 frames).

    Attributes:
      sample_size: latent height = width of the pos-embed base grid.
      patch_size, in_channels, out_channels, hidden_size, depth (spatial = temporal
        block count), num_heads, mlp_ratio, caption_channels, norm_eps: as
        :class:`~jaxdq.models.pixart.PixArtConfig`.
      interpolation_scale: None: ``max(sample_size // 64, 1)`` (diffusers Latte always uses that).
      video_length: frames the model was trained with (diffusers' temporal pos-embed length).
      max_text_tokens: T5 length used in training (documentation).
      attention: attention implementation of every block, see :mod:`jaxdq.models.attention`
        ("float32" reference; "a2a" sequence parallel over a mesh's "model" axis).
    """

    sample_size: int = 64
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: int = 4096
    interpolation_scale: Optional[float] = None
    norm_eps: float = 1e-6
    video_length: int = 16
    max_text_tokens: int = 120
    attention: str = "float32"

    def __post_init__(self):
        check_transformer_dims(self.hidden_size, self.num_heads)
        check_attention_impl(self.attention)

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def pe_scale(self) -> float:
        if self.interpolation_scale is not None:
            return float(self.interpolation_scale)
        return float(max(self.sample_size // 64, 1))

    @classmethod
    def from_diffusers(cls, dconf: Mapping[str, Any], **overrides) -> "LatteConfig":
        """From a diffusers ``LatteTransformer3DModel`` ``config.json`` dict.

        Raises:
          ValueError: for settings not implemented here (norm types other than
            ``ada_norm_single``, other activations, affine LayerNorms, no attention bias,
            cross-attention width other than the hidden size).
        """
        # diffusers' own defaults for Latte differ from PixArt's (geglu, layer_norm, no bias):
        # a config.json that omits them describes a model this implementation does not have.
        dconf = {"norm_type": "layer_norm", "activation_fn": "geglu", "attention_bias": False,
                 "norm_elementwise_affine": True, **dconf}
        problems = _unsupported_diffusers_settings(dconf)
        heads = dconf.get("num_attention_heads", 16)
        d = heads * dconf.get("attention_head_dim", 88)
        if dconf.get("cross_attention_dim") != d:
            problems.append(f"cross_attention_dim={dconf.get('cross_attention_dim')!r} "
                            f"(supported: the hidden size {d})")
        if dconf.get("caption_channels") is None:
            problems.append("caption_channels must be set")
        if problems:
            raise ValueError("unsupported Latte config.json: " + "; ".join(problems))
        in_ch = dconf.get("in_channels", 4)
        out_ch = dconf.get("out_channels")
        fields = dict(sample_size=dconf.get("sample_size", 64), patch_size=dconf.get("patch_size", 2),
                      in_channels=in_ch, out_channels=in_ch if out_ch is None else out_ch, hidden_size=d,
                      depth=dconf.get("num_layers", 1), num_heads=heads, caption_channels=dconf["caption_channels"],
                      norm_eps=dconf.get("norm_eps", 1e-5), video_length=dconf.get("video_length", 16))
        fields.update(overrides)
        return cls(**fields)


# Latte-1 (maxin-cn/Latte-1 transformer): PixArt-α-512's transformer config plus video_length.
LATTE_CONFIGS = {"Latte-1": dict(sample_size=64, patch_size=2, in_channels=4, out_channels=8, hidden_size=1152,
                                 depth=28, num_heads=16, caption_channels=4096, norm_eps=1e-6, video_length=16,
                                 max_text_tokens=120)}


def latte_config(name: str, **overrides) -> LatteConfig:
    if name not in LATTE_CONFIGS:
        raise ValueError(f"unknown Latte config {name!r}; valid names: {', '.join(LATTE_CONFIGS)}")
    return LatteConfig(**{**LATTE_CONFIGS[name], **overrides})


def temporal_pos_embed(dim: int, frames: int) -> np.ndarray:
    """``[frames, dim]`` float32: ``[sin(f·ω), cos(f·ω)]`` of frame index f (diffusers ``temp_pos_embed``)."""
    return _sincos_1d(dim, np.arange(frames)).astype(np.float32)


class Latte(nn.Module):
    """Latte T2V transformer.

    ``Latte(config).apply({"params": params}, x, t, encoder_hidden_states, ...)``:
      x: ``[N, C, F, H, W]`` video latents.
      t: ``[N]`` timesteps.
      encoder_hidden_states: ``[N, L, C_t]`` T5 embeddings (CFG: cond and uncond concatenated).
      encoder_attention_mask: optional ``[N, L]`` keep-mask (1 keep, 0 drop); the Latte
        pipeline passes none.
      enable_temporal_attentions: False skips the temporal blocks (image mode).
    Returns:
      ``[N, C_out, F, H, W]`` in x's dtype.
    """

    config: LatteConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, encoder_hidden_states: jax.Array,
                 encoder_attention_mask: Optional[jax.Array] = None,
                 enable_temporal_attentions: bool = True) -> jax.Array:
        cfg = self.config
        n, c, f, h, w = x.shape
        frames = x.transpose(0, 2, 1, 3, 4).reshape(n * f, c, h, w)
        tokens, gh, gw = embed_patches(cfg, frames)  # [N·F, T, D]
        nt, d = gh * gw, cfg.hidden_size
        mod, emb = AdaLNSingle(d, name="adaln_single")(t, dtype=tokens.dtype)
        context = CaptionProjection(d, name="caption_projection")(encoder_hidden_states.astype(tokens.dtype))
        context = jnp.repeat(context, f, axis=0)
        bias = mask_to_bias(encoder_attention_mask)
        bias = None if bias is None else jnp.repeat(bias, f, axis=0)
        mod_spatial, mod_temporal = jnp.repeat(mod, f, axis=0), jnp.repeat(mod, nt, axis=0)
        for i in range(cfg.depth):
            tokens = PixArtBlock(d, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, attention=cfg.attention,
                                 name=f"blocks_{i}")(tokens, mod_spatial, context, bias)
            if enable_temporal_attentions:
                tt = tokens.reshape(n, f, nt, d).transpose(0, 2, 1, 3).reshape(n * nt, f, d)
                if i == 0 and f > 1:
                    tt = tt + jnp.asarray(temporal_pos_embed(d, f), tt.dtype)
                tt = PixArtBlock(d, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps, cross_attention=False,
                                 self_attn_role="temporal-attn", attention=cfg.attention,
                                 name=f"temporal_blocks_{i}")(tt, mod_temporal)
                tokens = tt.reshape(n, nt, f, d).transpose(0, 2, 1, 3).reshape(n * f, nt, d)
        out = FinalLayer(cfg.patch_size ** 2 * cfg.out_channels, name="final_layer")(
            tokens, jnp.repeat(emb, f, axis=0))
        out = unpatchify(out, cfg.patch_size, cfg.out_channels, gh, gw)  # [N·F, C_out, H, W]
        return out.reshape(n, f, cfg.out_channels, h, w).transpose(0, 2, 1, 3, 4)


def init_latte(config: LatteConfig, key: jax.Array, frames: int = 2) -> dict:
    """Float32 ``params`` (``jax.eval_shape`` it for shapes without allocating)."""
    s = config.sample_size
    x = jnp.zeros((1, config.in_channels, frames, s, s), jnp.float32)
    y = jnp.zeros((1, 1, config.caption_channels), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    return jax.jit(lambda k: Latte(config).init(k, x, t, y)["params"])(key)


def layer_roles(config: LatteConfig) -> dict[str, str]:
    """``{"/"-joined Linear path: role}`` of every Linear of the model (for jaxdq.quant.rules)."""
    roles = {"x_embedder/proj": "embedding", "adaln_single/t_embedder/linear_1": "time-embedding",
             "adaln_single/t_embedder/linear_2": "time-embedding", "adaln_single/linear": "adaLN",
             "caption_projection/fc1": "embedding", "caption_projection/fc2": "embedding"}
    for i in range(config.depth):
        roles.update(block_roles(f"blocks_{i}/"))
        roles.update(block_roles(f"temporal_blocks_{i}/", cross_attention=False, self_attn_role="temporal-attn"))
    roles["final_layer/linear"] = "final"
    return roles


__all__ = ["LATTE_CONFIGS", "Latte", "LatteConfig", "init_latte", "latte_config", "layer_roles",
           "temporal_pos_embed"]
