"""PixArt-α / PixArt-Σ (diffusers ``PixArtTransformer2DModel``) in Flax linen.

A text-conditioned DiT with adaLN-single: one timestep embedder and one
``[D, 6D]`` modulation Linear shared by every block, each block adding its own
learned ``[6, D]`` ``scale_shift_table``; cross-attention to the (projected) T5
caption embeddings after the self-attention.  Every matmul goes through
:class:`jaxdq.nn.Linear`.  Param tree (``D`` = hidden size, ``P = C·p·p``,
``C_t`` = caption channels, ``M`` = MLP width)::

    x_embedder/proj                              [P, D]          role "embedding"
    adaln_single/t_embedder/linear_1, linear_2   [256, D], [D, D]  "time-embedding"
    adaln_single/resolution_embedder/linear_1, linear_2     [256, D/3], [D/3, D/3]
    adaln_single/aspect_ratio_embedder/linear_1, linear_2   (same; only with
                                                 use_additional_conditions)  "time-embedding"
    adaln_single/linear                          [D, 6D]         "adaLN"
    caption_projection/fc1, fc2                  [C_t, D], [D, D]  "embedding"
    blocks_{i}/scale_shift_table                 [6, D]          (plain param)
    blocks_{i}/attn1/qkv, attn1/proj             [D, 3D], [D, D]   "self-attn"
    blocks_{i}/attn2/q, attn2/kv, attn2/proj     [D, D], [D_ctx, 2D], [D, D]  "cross-attn" (kv: "cross-attn:kv")
    blocks_{i}/ff/fc1, ff/fc2                    [D, M], [M, D]    "ffn"
    final_layer/scale_shift_table                [2, D]          (plain param)
    final_layer/linear                           [D, p·p·C_out]  "final"

``qkv`` is ``q | k | v`` and ``kv`` is ``k | v``, each head-major (the original
PixArt ``attn.qkv`` / ``cross_attn.kv_linear`` layout).  ``D_ctx`` is D when there
is a caption projection (all released models), else the raw text width.

Block (diffusers ``BasicTransformerBlock`` with ``norm_type="ada_norm_single"``)::

    sm, cm, gm, sf, cf, gf = scale_shift_table + adaln_single(t).reshape(6, D)
    x += gm · attn1(LN(x)·(1 + cm) + sm)
    x += attn2(x, caption)                  # no norm, no gate (as in PixArt)
    x += gf · ff(LN(x)·(1 + cf) + sf)

Position embedding: 2D sin-cos of positions ``arange(g) / (g / base) / s`` per axis,
``base = sample_size / p`` and ``s`` the interpolation scale (diffusers
``PatchEmbed``; PixArt's ``lewei_scale`` / ``pe_interpolation``).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.backend import Epilogue
from jaxdq.models.dit import (GELU, Mlp, PatchEmbed, TimestepEmbedder, _sincos_1d, check_transformer_dims, layer_norm,
                              patchify, unpatchify)
from jaxdq.models.attention import attention, check_attention_impl
from jaxdq.nn import Linear
from jaxdq.norm_linear import Norm, norm_linear

MASK_BIAS = -10000.0  # additive attention bias of a dropped text token (diffusers and PixArt)


@dataclasses.dataclass(frozen=True)
class PixArtConfig:
    """PixArt hyper-parameters (defaults: PixArt-Σ-XL/2 at 1024², i.e. 128² latents).

    Attributes:
      sample_size: latent height = width the model was trained at; sets the pos-embed base grid.
      patch_size: p.
      in_channels / out_channels: C of the input / output ``[N, C, H, W]``.
      hidden_size: D.
      depth: number of blocks.
      num_heads: attention heads (D divisible by it).
      mlp_ratio: MLP width ``int(D · mlp_ratio)``.
      caption_channels: width of the text-encoder embeddings (T5-XXL: 4096); None: no
        caption projection, the blocks attend to the text embeddings directly.
      cross_attention_dim: width of what the cross-attention keys/values see; None: D
        with a caption projection, else ``caption_channels`` is required to be None and
        this must be set.
      interpolation_scale: pos-embed position divisor; None: ``max(sample_size // 64, 1)``.
      use_additional_conditions: PixArt-α micro-conditioning on resolution and aspect ratio.
      norm_eps: eps of the blocks' LayerNorms (the final LayerNorm uses 1e-6 always).
      max_text_tokens: T5 sequence length the model was trained with (documentation;
        any length works).
      attention: attention implementation, see :mod:`jaxdq.models.attention` ("float32"
        reference; "cudnn" fused flash attention for GPU sampling).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    caption_channels: Optional[int] = 4096
    cross_attention_dim: Optional[int] = None
    interpolation_scale: Optional[float] = None
    use_additional_conditions: bool = False
    norm_eps: float = 1e-6
    max_text_tokens: int = 300
    attention: str = "float32"

    def __post_init__(self):
        check_transformer_dims(self.hidden_size, self.num_heads)
        check_attention_impl(self.attention)
        if self.use_additional_conditions and self.hidden_size % 3:
            raise ValueError(f"use_additional_conditions needs hidden_size divisible by 3, got {self.hidden_size}")
        if self.caption_channels is None and self.cross_attention_dim is None:
            raise ValueError("without caption_channels, cross_attention_dim must be given")
        if self.caption_channels is not None and self.cross_attention_dim not in (None, self.hidden_size):
            raise ValueError(f"with a caption projection the cross-attention sees hidden_size={self.hidden_size} "
                             f"features, not cross_attention_dim={self.cross_attention_dim}")

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def context_dim(self) -> int:
        """Width of the cross-attention keys' input."""
        if self.cross_attention_dim is not None:
            return self.cross_attention_dim
        return self.hidden_size

    @property
    def pe_scale(self) -> float:
        return _default_scale(self.interpolation_scale, self.sample_size)

    @classmethod
    def from_diffusers(cls, dconf: Mapping[str, Any], **overrides) -> "PixArtConfig":
        """From a diffusers ``transformer/config.json`` dict (``PixArtTransformer2DModel`` or the
        older ``Transformer2DModel`` with ``norm_type="ada_norm_single"``).

        Raises:
          ValueError: for settings this implementation does not have (other norm types,
            activations, attention without bias, affine LayerNorms, ...).
        """
        problems = _unsupported_diffusers_settings(dconf)
        if problems:
            raise ValueError("unsupported PixArt config.json: " + "; ".join(problems))
        heads = dconf.get("num_attention_heads", 16)
        d = heads * dconf.get("attention_head_dim", 72)
        sample = dconf.get("sample_size", 128)
        uac = dconf.get("use_additional_conditions")
        if uac is None:
            uac = sample == 128  # diffusers' default
        in_ch = dconf.get("in_channels", 4)
        out_ch = dconf.get("out_channels", 8)
        cross = dconf.get("cross_attention_dim", 1152)
        fields = dict(sample_size=sample, patch_size=dconf.get("patch_size", 2), in_channels=in_ch,
                      out_channels=in_ch if out_ch is None else out_ch, hidden_size=d,
                      depth=dconf.get("num_layers", 28), num_heads=heads,
                      caption_channels=dconf.get("caption_channels"),
                      cross_attention_dim=None if cross == d and dconf.get("caption_channels") else cross,
                      interpolation_scale=_default_scale(dconf.get("interpolation_scale"), sample),
                      use_additional_conditions=bool(uac), norm_eps=dconf.get("norm_eps", 1e-6))
        fields.update(overrides)
        return cls(**fields)


def _default_scale(scale: Optional[float], sample_size: int) -> float:
    """diffusers' pos-embed interpolation scale: the given one, else ``max(sample_size // 64, 1)``."""
    return float(scale) if scale is not None else float(max(sample_size // 64, 1))


def _unsupported_diffusers_settings(dconf: Mapping[str, Any]) -> list[str]:
    need = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate", "attention_bias": True,
            "norm_elementwise_affine": False, "attention_type": "default", "only_cross_attention": False,
            "double_self_attention": False}
    return [f"{k}={dconf[k]!r} (supported: {v!r})" for k, v in need.items() if k in dconf and dconf[k] != v]


_XL2 = dict(hidden_size=1152, depth=28, num_heads=16, patch_size=2, in_channels=4, out_channels=8,
            caption_channels=4096)
PIXART_CONFIGS = {
    "PixArt-alpha-512": dict(_XL2, sample_size=64, interpolation_scale=1.0, use_additional_conditions=False,
                             max_text_tokens=120),
    "PixArt-alpha-1024": dict(_XL2, sample_size=128, interpolation_scale=2.0, use_additional_conditions=True,
                              max_text_tokens=120),
    "PixArt-sigma-1024": dict(_XL2, sample_size=128, interpolation_scale=2.0, use_additional_conditions=False,
                              max_text_tokens=300),
}
_ALIASES = {"α": "alpha", "Σ": "sigma", "σ": "sigma"}


def pixart_config(name: str, **overrides) -> PixArtConfig:
    """Named released config (``"PixArt-alpha-1024"``, ``"PixArt-Σ-1024"``, ...) with overrides."""
    key = name
    for greek, latin in _ALIASES.items():
        key = key.replace(greek, latin)
    if key not in PIXART_CONFIGS:
        raise ValueError(f"unknown PixArt config {name!r}; valid names: {', '.join(PIXART_CONFIGS)}")
    return PixArtConfig(**{**PIXART_CONFIGS[key], **overrides})


# ---------------------------------------------------------------------------------------------
# fixed embeddings


def pos_embed_2d_scaled(dim: int, grid_h: int, grid_w: int, base_size: int, scale: float) -> np.ndarray:
    """2D sin-cos embedding of a ``grid_h × grid_w`` grid at positions ``arange(g) / (g / base_size) / scale``.

    Token ``i·grid_w + j`` gets ``[emb(x_j), emb(y_i)]`` (column first, as
    :func:`jaxdq.models.dit.pos_embed_2d`, which is the case ``g = base_size``, ``scale = 1``).
    Positions are formed in float32 as diffusers does.

    Returns:
      ``[grid_h·grid_w, dim]`` float32 constant.
    """
    def pos(g):
        return np.arange(g, dtype=np.float32) / np.float32(g / base_size) / np.float32(scale)

    ii, jj = np.meshgrid(pos(grid_h), pos(grid_w), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, jj), _sincos_1d(dim // 2, ii)], axis=1)
    return emb.astype(np.float32)


def mask_to_bias(mask: Optional[jax.Array], dtype=jnp.float32) -> Optional[jax.Array]:
    """Keep-mask ``[N, L]`` (1/True keep, 0/False drop) → additive bias ``[N, L]`` (0 / -10000), or None."""
    if mask is None:
        return None
    return (1.0 - jnp.asarray(mask).astype(dtype)) * MASK_BIAS


# ---------------------------------------------------------------------------------------------
# modules

_zeros = nn.initializers.zeros


class SelfAttention(nn.Module):
    """``[N, T, D] → [N, T, D]``: fused ``qkv`` Linear ``[D, 3D]`` and ``proj``, both tagged ``role``."""

    num_heads: int
    role: str = "self-attn"
    impl: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, epilogue: Optional[Epilogue] = None) -> jax.Array:
        """``epilogue``: what follows ``proj`` (``x + gate · proj(·)``; fused where it can be)."""
        n, t, d = x.shape
        qkv = Linear(3 * d, role=self.role, name="qkv")(x).reshape(n, t, 3, self.num_heads, d // self.num_heads)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.impl)
        return Linear(d, role=self.role, name="proj")(out.reshape(n, t, d).astype(x.dtype), epilogue)


class CrossAttention(nn.Module):
    """Queries from ``x [N, T, D]``, keys/values from ``context [N, L, C]`` through one ``kv``
    Linear ``[C, 2D]``; ``bias [N, L]`` is added to the logits.  Returns ``[N, T, D]``."""

    num_heads: int
    impl: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, bias: Optional[jax.Array] = None,
                 epilogue: Optional[Epilogue] = None) -> jax.Array:
        n, t, d = x.shape
        hd = d // self.num_heads
        q = Linear(d, role="cross-attn", name="q")(x).reshape(n, t, self.num_heads, hd)
        kv = Linear(2 * d, role="cross-attn:kv", name="kv")(context.astype(x.dtype))
        kv = kv.reshape(n, context.shape[1], 2, self.num_heads, hd)
        out = attention(q, kv[:, :, 0], kv[:, :, 1], bias, impl=self.impl)
        return Linear(d, role="cross-attn", name="proj")(out.reshape(n, t, d).astype(x.dtype), epilogue)


def CaptionProjection(hidden_size: int, name: str = "caption_projection") -> Mlp:
    """Text embeddings ``[N, L, C_t] → [N, L, D]``: fc1 → GELU(tanh) → fc2, role "embedding"."""
    return Mlp(hidden_size, hidden_size, role="embedding", name=name)


class AdaLNSingle(nn.Module):
    """adaLN-single: ``t [N]`` (+ micro-conditions) → ``(mod [N, 6D], emb [N, D])``.

    ``emb`` = timestep embedding (+ resolution and aspect-ratio embeddings when
    ``use_additional_conditions``), ``mod = linear(SiLU(emb))`` is shared by all blocks;
    ``emb`` itself conditions the final layer.
    """

    hidden_size: int
    use_additional_conditions: bool = False

    @nn.compact
    def __call__(self, t: jax.Array, resolution: Optional[jax.Array] = None,
                 aspect_ratio: Optional[jax.Array] = None, dtype=jnp.float32):
        d = self.hidden_size
        emb = TimestepEmbedder(d, 0, name="t_embedder")(t, dtype)
        if self.use_additional_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError("use_additional_conditions needs resolution [N, 2] and aspect_ratio [N, 1]")
            n = emb.shape[0]
            parts = []
            for name, c in (("resolution_embedder", resolution), ("aspect_ratio_embedder", aspect_ratio)):
                flat = jnp.asarray(c).reshape(-1)
                parts.append(TimestepEmbedder(d // 3, 0, name=name)(flat, dtype).reshape(n, -1))
            emb = emb + jnp.concatenate(parts, axis=-1)
        mod = Linear(6 * d, role="adaLN", name="linear")(nn.silu(emb))
        return mod, emb


class PixArtBlock(nn.Module):
    """adaLN-single transformer block (see module docstring).

    ``__call__(x [N, T, D], mod [N, 6D], context [N, L, C] | None, bias [N, L] | None) → [N, T, D]``.
    With ``cross_attention=False`` (Latte's temporal blocks) there is no ``attn2``.
    """

    hidden_size: int
    num_heads: int
    mlp_hidden: int
    norm_eps: float = 1e-6
    cross_attention: bool = True
    self_attn_role: str = "self-attn"
    attention: str = "float32"

    @nn.compact
    def __call__(self, x, mod, context=None, bias=None):
        n, _, d = x.shape
        table = self.param("scale_shift_table", nn.initializers.normal(stddev=d ** -0.5), (6, d))
        m = table.astype(x.dtype)[None] + mod.reshape(n, 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m[:, i:i + 1] for i in range(6))
        # h = layer_norm(x) * (1 + scale) + shift; the quantize fuses into the norm under kernels.
        # (attn2's q reads x itself: PixArt has no norm before the cross-attention.)
        norm = Norm("layer", self.norm_eps)
        # x + gate · proj(·), x + proj(·), x + gate · fc2(GELU(fc1(·))): in the GEMMs' epilogues where they fuse
        h = norm_linear(self, x, norm, shift=shift_msa, scale=scale_msa, linears=("attn1/qkv",))
        x = SelfAttention(self.num_heads, self.self_attn_role, self.attention, name="attn1")(
            h, Epilogue(gate=gate_msa[:, 0], residual=x))
        if self.cross_attention:
            x = CrossAttention(self.num_heads, self.attention, name="attn2")(x, context, bias, Epilogue(residual=x))
        h = norm_linear(self, x, norm, shift=shift_mlp, scale=scale_mlp, linears=("ff/fc1",), acts={"ff/fc1": GELU})
        return Mlp(d, self.mlp_hidden, name="ff")(h, Epilogue(gate=gate_mlp[:, 0], residual=x))


class FinalLayer(nn.Module):
    """``[N, T, D], emb [N, D] → [N, T, out]``: LayerNorm(eps 1e-6), shift/scale from
    ``scale_shift_table [2, D] + emb``, Linear."""

    out_features: int

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        d = x.shape[-1]
        table = self.param("scale_shift_table", nn.initializers.normal(stddev=d ** -0.5), (2, d))
        m = table.astype(x.dtype)[None] + emb[:, None]
        x = layer_norm(x, 1e-6) * (1 + m[:, 1:2]) + m[:, 0:1]
        return Linear(self.out_features, role="final", kernel_init=_zeros, name="linear")(x)


def embed_patches(cfg, x: jax.Array) -> tuple[jax.Array, int, int]:
    """``[N, C, H, W] → ([N, T, D] tokens + pos embed, gh, gw)`` (PixArt/Latte ``PatchEmbed``)."""
    p = cfg.patch_size
    _, c_in, h, w = x.shape
    if c_in != cfg.in_channels or h % p or w % p:
        raise ValueError(f"input {x.shape} does not fit in_channels={cfg.in_channels}, patch_size={p}")
    gh, gw = h // p, w // p
    tokens = PatchEmbed(cfg.hidden_size, name="x_embedder")(patchify(x, p))
    pe = pos_embed_2d_scaled(cfg.hidden_size, gh, gw, cfg.sample_size // p, cfg.pe_scale)
    return tokens + jnp.asarray(pe, tokens.dtype), gh, gw


class PixArt(nn.Module):
    """PixArt-α/Σ text-to-image DiT.

    ``PixArt(config).apply({"params": params}, x, t, encoder_hidden_states, ...)``:
      x: ``[N, C, H, W]`` latents, H and W multiples of p (any size; positions are
         rescaled to the ``sample_size`` grid as in diffusers).
      t: ``[N]`` int or float timesteps.
      encoder_hidden_states: ``[N, L, C_t]`` T5 embeddings (for CFG, the cond and uncond
         embeddings concatenated along N).
      encoder_attention_mask: optional ``[N, L]`` keep-mask (1 keep, 0 drop).
      resolution, aspect_ratio: ``[N, 2]`` (height, width in pixels) and ``[N, 1]``
         (height / width); required iff ``use_additional_conditions``.
    Returns:
      ``[N, C_out, H, W]`` in x's dtype.
    """

    config: PixArtConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, encoder_hidden_states: jax.Array,
                 encoder_attention_mask: Optional[jax.Array] = None,
                 resolution: Optional[jax.Array] = None, aspect_ratio: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        tokens, gh, gw = embed_patches(cfg, x)
        mod, emb = AdaLNSingle(cfg.hidden_size, cfg.use_additional_conditions, name="adaln_single")(
            t, resolution, aspect_ratio, tokens.dtype)
        context = encoder_hidden_states.astype(tokens.dtype)
        if cfg.caption_channels is not None:
            context = CaptionProjection(cfg.hidden_size, name="caption_projection")(context)
        bias = mask_to_bias(encoder_attention_mask)
        for i in range(cfg.depth):
            tokens = PixArtBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_hidden, cfg.norm_eps,
                                 attention=cfg.attention, name=f"blocks_{i}")(tokens, mod, context, bias)
        out = FinalLayer(cfg.patch_size ** 2 * cfg.out_channels, name="final_layer")(tokens, emb)
        return unpatchify(out, cfg.patch_size, cfg.out_channels, gh, gw)


def example_inputs(cfg: PixArtConfig, n: int = 1, tokens: int = 1) -> tuple:
    """Zero inputs ``(x, t, encoder_hidden_states, mask, resolution, aspect_ratio)`` fitting ``cfg``."""
    s = cfg.sample_size
    text = cfg.caption_channels if cfg.caption_channels is not None else cfg.context_dim
    extra = cfg.use_additional_conditions
    return (jnp.zeros((n, cfg.in_channels, s, s), jnp.float32), jnp.zeros((n,), jnp.int32),
            jnp.zeros((n, tokens, text), jnp.float32), None,
            jnp.full((n, 2), 8.0 * s) if extra else None, jnp.ones((n, 1)) if extra else None)


def init_pixart(config: PixArtConfig, key: jax.Array) -> dict:
    """Float32 ``params`` (xavier Linears, zero final linear); ``jax.eval_shape`` it for shapes only."""
    inputs = example_inputs(config)
    return jax.jit(lambda k: PixArt(config).init(k, *inputs)["params"])(key)


def layer_roles(config: PixArtConfig) -> dict[str, str]:
    """``{"/"-joined Linear path: role}`` of every Linear of the model (for jaxdq.quant.rules)."""
    roles = {"x_embedder/proj": "embedding",
             "adaln_single/t_embedder/linear_1": "time-embedding",
             "adaln_single/t_embedder/linear_2": "time-embedding"}
    if config.use_additional_conditions:
        for e in ("resolution_embedder", "aspect_ratio_embedder"):
            roles.update({f"adaln_single/{e}/linear_1": "time-embedding",
                          f"adaln_single/{e}/linear_2": "time-embedding"})
    roles["adaln_single/linear"] = "adaLN"
    if config.caption_channels is not None:
        roles.update({"caption_projection/fc1": "embedding", "caption_projection/fc2": "embedding"})
    for i in range(config.depth):
        roles.update(block_roles(f"blocks_{i}/", cross_attention=True))
    roles["final_layer/linear"] = "final"
    return roles


def block_roles(prefix: str, cross_attention: bool = True, self_attn_role: str = "self-attn") -> dict[str, str]:
    """Roles of one :class:`PixArtBlock`'s Linears under ``prefix`` (ending in ``/``)."""
    r = {prefix + "attn1/qkv": self_attn_role, prefix + "attn1/proj": self_attn_role}
    if cross_attention:
        r.update({prefix + "attn2/q": "cross-attn", prefix + "attn2/kv": "cross-attn:kv",
                  prefix + "attn2/proj": "cross-attn"})
    r.update({prefix + "ff/fc1": "ffn", prefix + "ff/fc2": "ffn"})
    return r


__all__ = ["PIXART_CONFIGS", "PixArt", "PixArtBlock", "PixArtConfig", "init_pixart", "layer_roles",
           "pixart_config", "pos_embed_2d_scaled", "mask_to_bias"]
