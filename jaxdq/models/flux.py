"""FLUX.1 transformer (diffusers ``FluxTransformer2DModel``) in Flax linen.

A rectified-flow MMDiT: N double-stream blocks (image and text tokens keep their own
weights but attend jointly), then M single-stream blocks over the concatenated
``[text; image]`` sequence, with 3-axis RoPE and adaLN conditioning on
``timestep (+ guidance) + pooled CLIP text``.  Every matmul goes through
:class:`jaxdq.nn.Linear`.  Param tree (``D`` = heads·head_dim, ``d`` = head_dim,
``M = 4D``, ``C`` = in_channels, i.e. 4·latent channels after 2×2 packing)::

    x_embedder                                   [C, D]         role "embedding"
    context_embedder                             [J, D]         "embedding"  (J = joint_attention_dim)
    time_text_embed/timestep_embedder/linear_1   [256, D]       "time-embedding"
    time_text_embed/timestep_embedder/linear_2   [D, D]         "time-embedding"
    time_text_embed/guidance_embedder/linear_1,2 (guidance_embeds only)  "time-embedding"
    time_text_embed/text_embedder/linear_1, 2    [P, D], [D, D] "time-embedding" (pooled CLIP)
    transformer_blocks_{i}/norm1/linear          [D, 6D]        "adaLN"  (image stream)
    transformer_blocks_{i}/norm1_context/linear  [D, 6D]        "adaLN"  (text stream)
    transformer_blocks_{i}/attn/to_q, to_k, to_v, to_out          [D, D]  "self-attn"
    transformer_blocks_{i}/attn/add_q_proj, add_k_proj, add_v_proj, to_add_out  [D, D]  "self-attn"
    transformer_blocks_{i}/attn/norm_q, norm_k, norm_added_q, norm_added_k/scale  [d]  (RMSNorm)
    transformer_blocks_{i}/ff/fc1, ff/fc2                [D, M], [M, D]  "ffn"
    transformer_blocks_{i}/ff_context/fc1, ff_context/fc2  [D, M], [M, D]  "ffn"
    single_transformer_blocks_{j}/norm/linear    [D, 3D]        "adaLN"
    single_transformer_blocks_{j}/attn/to_q, to_k, to_v  [D, D]  "self-attn"
    single_transformer_blocks_{j}/attn/norm_q, norm_k/scale  [d]
    single_transformer_blocks_{j}/proj_mlp       [D, M]         "ffn"
    single_transformer_blocks_{j}/proj_out       [D + M, D]     "ffn" (attention ‖ GELU(mlp) → D)
    norm_out/linear                              [D, 2D]        "adaLN" (scale first, then shift)
    proj_out                                     [D, p·p·C_out] "final"

The joint attention's projections are tagged "self-attn" (the text tokens attend
with the image tokens in one softmax; there is no separate cross-attention).
``single_transformer_blocks_{j}/proj_out`` takes ``[attention output ‖ GELU(proj_mlp)]``;
4/5 of its input is the post-GELU MLP activation, hence "ffn".

Conventions as in diffusers: the model takes the timestep as σ ∈ [0, 1] and
guidance as the guidance scale; both are multiplied by 1000 before the sinusoid.
Latents enter packed, ``[N, (H/2)(W/2), 4·C_lat]`` (:func:`pack_latents`), with
``img_ids`` ``[L, 3]`` (:func:`image_ids`) and ``txt_ids`` ``[T, 3]`` (:func:`text_ids`).

RoPE tables are computed in float32 (diffusers uses float64 angles, then float32):
the angle ``pos·ω`` differs by at most one float32 rounding, ~1e-5 rad at position 128.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.backend import Epilogue
from jaxdq.models.dit import FREQ_EMBED_DIM, GELU, Mlp, layer_norm, modulate, patchify, timestep_embedding
from jaxdq.models.attention import attention, check_attention_impl
from jaxdq.nn import Linear
from jaxdq.norm_linear import Norm, norm_linear

NORM_EPS = 1e-6  # every LayerNorm and the q/k RMSNorms of FLUX
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """FLUX hyper-parameters, named as diffusers' ``FluxTransformer2DModel`` config
    (defaults: FLUX.1-dev).

    Attributes:
      patch_size: only sizes ``proj_out`` (``p·p·out_channels`` outputs); 2×2 packing is
        done outside the model, FLUX.1 uses 1.
      in_channels: features of a packed latent token (64 = 16 latent channels · 2·2).
      out_channels: None means ``in_channels``.
      num_layers: double-stream blocks.
      num_single_layers: single-stream blocks.
      attention_head_dim: d.
      num_attention_heads: heads; ``D = heads · d``.
      joint_attention_dim: J, width of the T5 text states.
      pooled_projection_dim: P, width of the pooled CLIP embedding.
      guidance_embeds: guidance-distilled model (FLUX.1-dev) with a guidance embedder.
      axes_dims_rope: RoPE dims per id axis; must sum to d.
      mlp_ratio: M = int(D · mlp_ratio).
      attention: attention implementation, see :mod:`jaxdq.models.attention` ("float32"
        reference; "cudnn" fused flash attention for GPU sampling).
    """

    patch_size: int = 1
    in_channels: int = 64
    out_channels: Optional[int] = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = True
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    mlp_ratio: float = 4.0
    attention: str = "float32"

    def __post_init__(self):
        check_attention_impl(self.attention)
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must sum to "
                             f"attention_head_dim={self.attention_head_dim}")
        if any(a % 2 for a in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {self.axes_dims_rope} must all be even")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        return self.patch_size ** 2 * (self.out_channels or self.in_channels)


FLUX_CONFIGS = {"flux1-dev": dict(guidance_embeds=True), "flux1-schnell": dict(guidance_embeds=False)}


def flux_config(name: str, **overrides) -> FluxConfig:
    """``"flux1-dev"`` (guidance-distilled) or ``"flux1-schnell"`` with field overrides."""
    if name not in FLUX_CONFIGS:
        raise ValueError(f"unknown FLUX config {name!r}; valid names: {', '.join(FLUX_CONFIGS)}")
    return FluxConfig(**{**FLUX_CONFIGS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# latents and position ids


def pack_latents(x: jax.Array) -> jax.Array:
    """``[N, C, H, W] → [N, (H/2)·(W/2), 4C]``, features ordered (c, py, px) (diffusers ``_pack_latents``)."""
    if x.shape[2] % 2 or x.shape[3] % 2:
        raise ValueError(f"latent height and width must be even, got {x.shape}")
    return patchify(x, 2)


def unpack_latents(x: jax.Array, height: int, width: int) -> jax.Array:
    """``[N, (H/2)·(W/2), 4C] → [N, C, H, W]``, the inverse of :func:`pack_latents`; H, W latent size."""
    n, _, f = x.shape
    c = f // 4
    x = x.reshape(n, height // 2, width // 2, c, 2, 2)
    return x.transpose(0, 3, 1, 4, 2, 5).reshape(n, c, height, width)


def image_ids(height: int, width: int) -> np.ndarray:
    """``[(H/2)·(W/2), 3]`` float32 ids of packed latent tokens: ``(0, row, col)``; H, W latent size."""
    gh, gw = height // 2, width // 2
    ids = np.zeros((gh, gw, 3), np.float32)
    ids[..., 1] = np.arange(gh)[:, None]
    ids[..., 2] = np.arange(gw)[None, :]
    return ids.reshape(gh * gw, 3)


def text_ids(num_tokens: int) -> np.ndarray:
    """``[T, 3]`` float32 zeros: FLUX text tokens all sit at position 0."""
    return np.zeros((num_tokens, 3), np.float32)


def rope_tables(ids: jax.Array, axes_dims: tuple[int, ...], theta: float = ROPE_THETA) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)``, each ``[S, Σ axes_dims]`` float32, from ``ids [S, n_axes]`` (diffusers ``FluxPosEmbed``).

    Axis ``i`` uses frequencies ``θ^(-2k/dᵢ)``, each repeated twice (interleaved pairs).
    """
    ids = jnp.asarray(ids, jnp.float32)
    cos, sin = [], []
    for i, d in enumerate(axes_dims):
        freqs = jnp.asarray(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d), jnp.float32)
        ang = ids[:, i:i + 1] * freqs[None]
        cos.append(jnp.repeat(jnp.cos(ang), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(ang), 2, axis=-1))
    return jnp.concatenate(cos, -1), jnp.concatenate(sin, -1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs ``(x₀, x₁) → (x₀cos − x₁sin, x₁cos + x₀sin)``.

    x ``[N, S, H, d]``; cos, sin ``[S, d]``.  Computed in float32, returned in x's dtype.
    """
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    return (xf * cos[None, :, None] + rotated * sin[None, :, None]).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# modules

_zeros = nn.initializers.zeros


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned ``scale [d]``; computed in float32, same dtype out."""

    eps: float = NORM_EPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


class EmbedMLP(nn.Module):
    """``[N, F] → [N, D]``: linear_1 → SiLU → linear_2 (diffusers ``TimestepEmbedding`` /
    ``PixArtAlphaTextProjection(act_fn="silu")``)."""

    features: int
    role: str = "time-embedding"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.silu(Linear(self.features, role=self.role, name="linear_1")(x))
        return Linear(self.features, role=self.role, name="linear_2")(h)


class TimeTextEmbed(nn.Module):
    """``temb [N, D] = MLP(sin(1000·t)) (+ MLP(sin(1000·g))) + MLP(pooled)``.

    Args of ``__call__``:
      timestep: ``[N]`` σ in [0, 1].  guidance: ``[N]`` guidance scale, or None.
      pooled: ``[N, P]``.  dtype: the tokens' dtype.
    """

    config: FluxConfig

    @nn.compact
    def __call__(self, timestep, guidance, pooled, dtype):
        d = self.config.hidden_size

        def sinusoid(t):
            # diffusers: flip_sin_to_cos=True, downscale_freq_shift=0 → [cos, sin], f_k = 10000^(-k/128)
            return timestep_embedding(jnp.asarray(t, jnp.float32) * 1000.0, FREQ_EMBED_DIM, 0).astype(dtype)

        temb = EmbedMLP(d, name="timestep_embedder")(sinusoid(timestep))
        if self.config.guidance_embeds:
            if guidance is None:
                raise ValueError("this FLUX model is guidance-distilled (guidance_embeds=True): pass guidance [N]")
            temb = temb + EmbedMLP(d, name="guidance_embedder")(sinusoid(guidance))
        return temb + EmbedMLP(d, name="text_embedder")(pooled.astype(dtype))


def _heads(x: jax.Array, d: int) -> jax.Array:
    return x.reshape(*x.shape[:-1], -1, d)


def _attention(q, k, v, cos, sin, impl):
    """Joint softmax attention over ``[N, S, H, d]`` after RoPE (:func:`jaxdq.models.attention.attention`
    with ``impl``); ``[N, S, H·d]`` out in ``v.dtype``."""
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    n, s, h, d = q.shape
    return attention(q, k, v, impl=impl).reshape(n, s, h * d).astype(v.dtype)


def _project_qkv(x, d_model, head_dim, names, norm_names):
    """Inside a compact method: q, k, v ``[N, S, H, d]`` with RMSNorm on q and k."""
    q, k, v = (_heads(Linear(d_model, role="self-attn", name=n)(x), head_dim) for n in names)
    return RMSNorm(name=norm_names[0])(q), RMSNorm(name=norm_names[1])(k), v


class JointAttention(nn.Module):
    """Double-stream attention: per-stream q/k/v (+ q/k RMSNorm) and output projections,
    one softmax over ``[text; image]``.

    Args of ``__call__``: img ``[N, L, D]``, txt ``[N, T, D]``, cos/sin ``[T + L, d]``.
    Returns ``(img [N, L, D], txt [N, T, D])``.
    """

    config: FluxConfig

    @nn.compact
    def __call__(self, img, txt, cos, sin):
        cfg = self.config
        d, hd = cfg.hidden_size, cfg.attention_head_dim
        q, k, v = _project_qkv(img, d, hd, ("to_q", "to_k", "to_v"), ("norm_q", "norm_k"))
        cq, ck, cv = _project_qkv(txt, d, hd, ("add_q_proj", "add_k_proj", "add_v_proj"),
                                  ("norm_added_q", "norm_added_k"))
        cat = lambda a, b: jnp.concatenate([a, b], axis=1)  # noqa: E731
        out = _attention(cat(cq, q), cat(ck, k), cat(cv, v), cos, sin, cfg.attention)
        t = txt.shape[1]
        img_out = Linear(d, role="self-attn", name="to_out")(out[:, t:])
        txt_out = Linear(d, role="self-attn", name="to_add_out")(out[:, :t])
        return img_out, txt_out


class AdaLNZero(nn.Module):
    """``Linear(SiLU(temb))`` split into ``chunks`` ``[N, D]`` pieces (diffusers ``norm1.linear`` etc.)."""

    chunks: int
    hidden_size: int

    @nn.compact
    def __call__(self, temb):
        mod = Linear(self.chunks * self.hidden_size, role="adaLN", kernel_init=_zeros, name="linear")(nn.silu(temb))
        return jnp.split(mod, self.chunks, axis=-1)


class FluxTransformerBlock(nn.Module):
    """Double-stream block (diffusers ``FluxTransformerBlock``).

    Args of ``__call__``: img ``[N, L, D]``, txt ``[N, T, D]``, temb ``[N, D]``, cos/sin ``[T + L, d]``.
    Returns ``(img, txt)``, same shapes.
    """

    config: FluxConfig

    @nn.compact
    def __call__(self, img, txt, temb, cos, sin):
        cfg = self.config
        d = cfg.hidden_size
        sh, sc, g, sh2, sc2, g2 = AdaLNZero(6, d, name="norm1")(temb)
        csh, csc, cg, csh2, csc2, cg2 = AdaLNZero(6, d, name="norm1_context")(temb)
        # modulate(layer_norm(·), shift, scale) through norm_linear: the quantize fuses into the norm
        # under kernels, q/k/v of a stream quantized once
        norm = Norm("layer", NORM_EPS)
        a_img, a_txt = JointAttention(cfg, name="attn")(
            norm_linear(self, img, norm, shift=sh, scale=sc, linears=("attn/to_q", "attn/to_k", "attn/to_v")),
            norm_linear(self, txt, norm, shift=csh, scale=csc,
                        linears=("attn/add_q_proj", "attn/add_k_proj", "attn/add_v_proj")), cos, sin)
        # x + gate · fc2(GELU(fc1(·))): in the GEMMs' epilogues where they fuse
        img = img + g[:, None] * a_img
        img = Mlp(d, cfg.mlp_hidden, name="ff")(
            norm_linear(self, img, norm, shift=sh2, scale=sc2, linears=("ff/fc1",), acts={"ff/fc1": GELU}),
            Epilogue(gate=g2, residual=img))
        txt = txt + cg[:, None] * a_txt
        txt = Mlp(d, cfg.mlp_hidden, name="ff_context")(
            norm_linear(self, txt, norm, shift=csh2, scale=csc2, linears=("ff_context/fc1",),
                        acts={"ff_context/fc1": GELU}),
            Epilogue(gate=cg2, residual=txt))
        return img, txt


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over ``x = [text; image]`` ``[N, S, D]`` (diffusers ``FluxSingleTransformerBlock``):
    ``x + gate · proj_out([attn(h) ‖ GELU(proj_mlp(h))])`` with ``h`` the modulated LayerNorm of x."""

    config: FluxConfig

    @nn.compact
    def __call__(self, x, temb, cos, sin):
        cfg = self.config
        d = cfg.hidden_size
        shift, scale, gate = AdaLNZero(3, d, name="norm")(temb)
        # h = modulate(layer_norm(x), shift, scale), read by proj_mlp and q/k/v (FLUX's linear1):
        # under kernels one fused norm-quantize for all four
        h = norm_linear(self, x, Norm("layer", NORM_EPS), shift=shift, scale=scale,
                        linears=("proj_mlp", "attn/to_q", "attn/to_k", "attn/to_v"), acts={"proj_mlp": GELU})
        mlp = Linear(cfg.mlp_hidden, role="ffn", name="proj_mlp")(h, Epilogue(act=GELU))
        attn = _SingleAttention(cfg, name="attn")(h, cos, sin)
        # x + gate · proj_out(·) in its GEMM's epilogue where it fuses
        return Linear(d, role="ffn", name="proj_out")(jnp.concatenate([attn, mlp], axis=-1),
                                                      Epilogue(gate=gate, residual=x))


class _SingleAttention(nn.Module):
    """q/k/v (+ q/k RMSNorm) and attention, no output projection (``pre_only``): ``[N, S, D]``."""

    config: FluxConfig

    @nn.compact
    def __call__(self, h, cos, sin):
        cfg = self.config
        q, k, v = _project_qkv(h, cfg.hidden_size, cfg.attention_head_dim, ("to_q", "to_k", "to_v"),
                               ("norm_q", "norm_k"))
        return _attention(q, k, v, cos, sin, cfg.attention)


class Flux(nn.Module):
    """FLUX.1 transformer: the velocity of packed latents.

    ``Flux(config).apply({"params": params}, img, txt, pooled, timestep, img_ids, txt_ids, guidance)``:
      img: ``[N, L, C]`` packed latents (:func:`pack_latents`).
      txt: ``[N, T, J]`` T5 hidden states.
      pooled: ``[N, P]`` pooled CLIP embedding.
      timestep: ``[N]`` σ in [0, 1] (scaled by 1000 inside, as diffusers).
      img_ids: ``[L, 3]`` (:func:`image_ids`); txt_ids: ``[T, 3]`` (:func:`text_ids`).
      guidance: ``[N]`` guidance scale (e.g. 3.5) when ``guidance_embeds``, else ignored / None.
    Returns:
      ``[N, L, p·p·C_out]`` in img's dtype.
    """

    config: FluxConfig

    @nn.compact
    def __call__(self, img, txt, pooled, timestep, img_ids, txt_ids, guidance=None):
        cfg = self.config
        d = cfg.hidden_size
        if img.shape[-1] != cfg.in_channels:
            raise ValueError(f"img has {img.shape[-1]} features, config.in_channels={cfg.in_channels}")
        x = Linear(d, role="embedding", name="x_embedder")(img)
        temb = TimeTextEmbed(cfg, name="time_text_embed")(timestep, guidance, pooled, x.dtype)
        c = Linear(d, role="embedding", name="context_embedder")(txt.astype(x.dtype))
        cos, sin = rope_tables(jnp.concatenate([jnp.asarray(txt_ids), jnp.asarray(img_ids)], axis=0),
                               cfg.axes_dims_rope)
        for i in range(cfg.num_layers):
            x, c = FluxTransformerBlock(cfg, name=f"transformer_blocks_{i}")(x, c, temb, cos, sin)
        t = c.shape[1]
        h = jnp.concatenate([c, x], axis=1)
        for j in range(cfg.num_single_layers):
            h = FluxSingleTransformerBlock(cfg, name=f"single_transformer_blocks_{j}")(h, temb, cos, sin)
        x = h[:, t:]
        # AdaLayerNormContinuous: (scale, shift) order, unlike adaLN-Zero's (shift, scale, ...)
        scale, shift = AdaLNZero(2, d, name="norm_out")(temb)
        x = modulate(layer_norm(x, NORM_EPS), shift, scale)
        return Linear(cfg.out_dim, role="final", kernel_init=_zeros, name="proj_out")(x)


def _dummy_inputs(config: FluxConfig, n: int = 1, img_len: int = 4, txt_len: int = 2):
    img = jnp.zeros((n, img_len, config.in_channels), jnp.float32)
    txt = jnp.zeros((n, txt_len, config.joint_attention_dim), jnp.float32)
    pooled = jnp.zeros((n, config.pooled_projection_dim), jnp.float32)
    t = jnp.zeros((n,), jnp.float32)
    ids_i = jnp.zeros((img_len, len(config.axes_dims_rope)), jnp.float32)
    ids_t = jnp.zeros((txt_len, len(config.axes_dims_rope)), jnp.float32)
    g = jnp.zeros((n,), jnp.float32) if config.guidance_embeds else None
    return img, txt, pooled, t, ids_i, ids_t, g


def init_flux(config: FluxConfig, key: jax.Array) -> dict:
    """Float32 params (xavier-uniform Linears, unit RMSNorm scales, zero adaLN and ``proj_out``).

    Use ``jax.eval_shape(lambda k: init_flux(cfg, k), key)`` for shapes without allocating.
    """
    args = _dummy_inputs(config)
    return jax.jit(lambda k: Flux(config).init(k, *args)["params"])(key)


def layer_roles(config: FluxConfig) -> dict[str, str]:
    """``{"/"-joined Linear path: role}`` of every Linear of the model (for jaxdq.quant.rules)."""
    roles = {"x_embedder": "embedding", "context_embedder": "embedding"}
    embedders = ["timestep_embedder", "text_embedder"] + (["guidance_embedder"] if config.guidance_embeds else [])
    for e in embedders:
        for lin in ("linear_1", "linear_2"):
            roles[f"time_text_embed/{e}/{lin}"] = "time-embedding"
    attn = ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    for i in range(config.num_layers):
        b = f"transformer_blocks_{i}/"
        roles.update({b + "norm1/linear": "adaLN", b + "norm1_context/linear": "adaLN"})
        roles.update({b + "attn/" + n: "self-attn" for n in attn})
        roles.update({b + f"{ff}/{fc}": "ffn" for ff in ("ff", "ff_context") for fc in ("fc1", "fc2")})
    for j in range(config.num_single_layers):
        b = f"single_transformer_blocks_{j}/"
        roles[b + "norm/linear"] = "adaLN"
        roles.update({b + "attn/" + n: "self-attn" for n in ("to_q", "to_k", "to_v")})
        roles.update({b + "proj_mlp": "ffn", b + "proj_out": "ffn"})
    roles.update({"norm_out/linear": "adaLN", "proj_out": "final"})
    return roles
