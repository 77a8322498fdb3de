"""DiT (Peebles & Xie 2023, facebookresearch/DiT ``models.py``) in Flax linen.

Every matmul goes through :class:`jaxdq.nn.Linear`, so the same module runs float
or quantized params.  Param tree (``D`` = hidden size, ``P = C·p·p``)::

    x_embedder/proj                      [P, D]        role "embedding"
    t_embedder/linear_1, linear_2        [256, D], [D, D]  "time-embedding"
    y_embedder/embedding_table           [num_classes + 1, D]  (plain param)
    blocks_{i}/adaLN_modulation          [D, 6D]       "adaLN"
    blocks_{i}/attn/qkv, attn/proj       [D, 3D], [D, D]  "self-attn"
    blocks_{i}/mlp/fc1, mlp/fc2          [D, M], [M, D]  "ffn"
    final_layer/adaLN_modulation         [D, 2D]       "adaLN"
    final_layer/linear                   [D, p·p·C_out]  "final"

With ``shared_embedder=False`` (diffusers ``DiTTransformer2DModel``) there is no
top-level ``t_embedder``/``y_embedder``; every block has its own under
``blocks_{i}/`` and the final layer is conditioned by block 0's.

Differences between the original DiT and diffusers, as config fields:

* ``freq_shift``: the timestep sinusoid's frequencies are
  ``exp(-log(10000)·k / (128 - freq_shift))``; original 0, diffusers 1
  (``Timesteps(downscale_freq_shift=1)``).
* ``shared_embedder``: original has one timestep+label embedder; diffusers one per
  block (identical copies in converted checkpoints).
* ``mlp_norm_eps``: eps of the LayerNorm before the MLP; original 1e-6 (= ``norm_eps``),
  diffusers its config's ``norm_eps`` (default 1e-5; the released DiT configs do not
  set it).  The attention-side and final LayerNorms use 1e-6 in both.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.backend import Epilogue
from jaxdq.models.attention import attention, check_attention_impl
from jaxdq.nn import Linear
from jaxdq.norm_linear import Norm, layer_norm, norm_linear

FREQ_EMBED_DIM = 256  # width of the timestep sinusoid (DiT's frequency_embedding_size)
GELU = "gelu_tanh"  # the MLP's activation (nn.gelu(approximate=True)), as an Epilogue act


def check_transformer_dims(hidden_size: int, num_heads: int) -> None:
    """ValueError unless ``hidden_size`` splits into ``num_heads`` heads and into the four
    quarters of the 2D sin-cos position embedding (DiT, PixArt, Latte configs)."""
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
    if hidden_size % 4:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 (2D sin-cos pos embed)")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """DiT hyper-parameters (defaults: DiT-XL/2 on 256² images, i.e. 32² latents).

    Attributes:
      input_size: latent height = width the model is built for (sets the pos-embed grid).
      patch_size: p; the patch embedding is a p×p, stride-p conv.
      in_channels: C of the input ``[N, C, H, W]``.
      hidden_size: D.
      depth: number of transformer blocks.
      num_heads: attention heads (D must be divisible by it).
      mlp_ratio: MLP hidden width = ``int(D · mlp_ratio)``.
      num_classes: class labels; label ``num_classes`` is the CFG null class.
      learn_sigma: output ``2·C`` channels (ε and the variance interpolation) if True.
      class_dropout_prob: training label dropout; the null-class row exists iff > 0.
      freq_shift: 0 (original DiT) or 1 (diffusers), see module docstring.
      shared_embedder: one embedder for all blocks (original) or one per block (diffusers).
      norm_eps: eps of the adaLN LayerNorms (attention side and final layer).
      mlp_norm_eps: eps of the LayerNorm before the MLP; None means ``norm_eps``.
      attention: attention implementation, see :mod:`jaxdq.models.attention` ("float32"
        reference; "cudnn" fused flash attention for GPU sampling).
    """

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    freq_shift: int = 0
    shared_embedder: bool = True
    norm_eps: float = 1e-6
    mlp_norm_eps: Optional[float] = None
    attention: str = "float32"

    def __post_init__(self):
        check_transformer_dims(self.hidden_size, self.num_heads)
        check_attention_impl(self.attention)

    @property
    def out_channels(self) -> int:
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def num_label_rows(self) -> int:
        """Rows of the label table: the classes plus the CFG null class when dropout is used."""
        return self.num_classes + int(self.class_dropout_prob > 0)


_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
DIT_CONFIGS = {
    f"DiT-{size}/{p}": dict(hidden_size=d, depth=depth, num_heads=heads, patch_size=p)
    for size, (d, depth, heads) in _SIZES.items() for p in (2, 4, 8)
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """Named config from the DiT paper (``"DiT-XL/2"``, ...) with field overrides."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; valid names: {', '.join(DIT_CONFIGS)}")
    return DiTConfig(**{**DIT_CONFIGS[name], **overrides})


# ---------------------------------------------------------------------------------------------
# fixed embeddings


def timestep_embedding(t: jax.Array, dim: int = FREQ_EMBED_DIM, freq_shift: int = 0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoid ``[cos(t·f), sin(t·f)]`` with ``f_k = exp(-log(max_period)·k / (dim/2 - freq_shift))``.

    Args:
      t: ``[N]`` int or float timesteps.
    Returns:
      ``[N, dim]`` float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    args = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """``[M] → [M, dim]`` as ``[sin(pos·ω), cos(pos·ω)]``, ``ω_k = 10000^(-k/(dim/2))``, float64."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2D sin-cos position embedding of a ``grid_h × grid_w`` token grid.

    Token ``i·grid_w + j`` (row i, column j) gets ``[emb(j), emb(i)]``: the first half
    encodes the column, as in DiT (``np.meshgrid(grid_w, grid_h)``, ``emb_h`` from
    ``grid[0]``) and diffusers.

    Returns:
      ``[grid_h·grid_w, dim]`` float32 (a constant, not a param).
    """
    ii, jj = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    emb = np.concatenate([_sincos_1d(dim // 2, jj), _sincos_1d(dim // 2, ii)], axis=1)
    return emb.astype(np.float32)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x·(1 + scale) + shift``; x ``[N, T, D]``, shift/scale ``[N, D]``."""
    return x * (1 + scale[:, None]) + shift[:, None]


def patchify(x: jax.Array, p: int) -> jax.Array:
    """``[N, C, H, W] → [N, (H/p)·(W/p), C·p·p]``, features ordered (c, py, px) like a conv weight."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p)
    return x.transpose(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), c * p * p)


def unpatchify(x: jax.Array, p: int, c: int, gh: int, gw: int) -> jax.Array:
    """``[N, gh·gw, p·p·c]`` (features ordered (py, px, c), as DiT) → ``[N, c, gh·p, gw·p]``."""
    n = x.shape[0]
    x = x.reshape(n, gh, gw, p, p, c)
    return jnp.einsum("nhwpqc->nchpwq", x).reshape(n, c, gh * p, gw * p)


# ---------------------------------------------------------------------------------------------
# modules

_normal002 = nn.initializers.normal(stddev=0.02)
_zeros = nn.initializers.zeros


class PatchEmbed(nn.Module):
    """Patch tokens ``[N, T, C·p·p] → [N, T, D]`` (the p×p stride-p conv as a Linear)."""

    hidden_size: int

    @nn.compact
    def __call__(self, patches: jax.Array) -> jax.Array:
        return Linear(self.hidden_size, role="embedding", name="proj")(patches)


class TimestepEmbedder(nn.Module):
    """``t [N] → [N, D]``: 256-dim sinusoid (cast to ``dtype``, as diffusers does) → Linear → SiLU → Linear."""

    hidden_size: int
    freq_shift: int = 0

    @nn.compact
    def __call__(self, t: jax.Array, dtype=jnp.float32) -> jax.Array:
        h = timestep_embedding(t, FREQ_EMBED_DIM, self.freq_shift).astype(dtype)
        h = Linear(self.hidden_size, role="time-embedding", kernel_init=_normal002, name="linear_1")(h)
        return Linear(self.hidden_size, role="time-embedding", kernel_init=_normal002,
                      name="linear_2")(nn.silu(h))


class LabelEmbedder(nn.Module):
    """``y [N] int → [N, D]`` from a ``[num_rows, D]`` table; row ``num_classes`` is the null class.

    ``force_drop_ids`` (``[N]`` bool/int, nonzero = drop) replaces labels by the null
    class; the model never drops labels at random.
    """

    num_classes: int
    num_rows: int
    hidden_size: int

    @nn.compact
    def __call__(self, y: jax.Array, force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
        table = self.param("embedding_table", _normal002, (self.num_rows, self.hidden_size))
        if force_drop_ids is not None:
            y = jnp.where(jnp.asarray(force_drop_ids) != 0, self.num_classes, y)
        return jnp.take(table, y, axis=0)


def _conditioning(cfg: DiTConfig, t, y, force_drop_ids, dtype) -> jax.Array:
    """``c = t_embedder(t) + y_embedder(y)``, ``[N, D]`` in ``dtype`` (the tokens' dtype).

    Called inside a compact method, so the embedders are created in the caller's
    scope (``t_embedder``/``y_embedder`` at top level, or under ``blocks_{i}``).
    """
    te = TimestepEmbedder(cfg.hidden_size, cfg.freq_shift, name="t_embedder")(t, dtype)
    ye = LabelEmbedder(cfg.num_classes, cfg.num_label_rows, cfg.hidden_size, name="y_embedder")(y, force_drop_ids)
    return te + ye.astype(dtype)


class Attention(nn.Module):
    """Multi-head self-attention ``[N, T, D] → [N, T, D]``; qkv as one ``[D, 3D]`` Linear
    (q | k | v, each head-major), :func:`jaxdq.models.attention.attention` with ``impl``."""

    hidden_size: int
    num_heads: int
    impl: str = "float32"

    @nn.compact
    def __call__(self, x: jax.Array, epilogue: Optional[Epilogue] = None) -> jax.Array:
        """``epilogue``: what follows ``proj`` (:class:`jaxdq.backend.Epilogue`, e.g. DiT's
        ``x + gate · proj(·)``), fused into its GEMM where the backend allows."""
        n, t, d = x.shape
        hd = d // self.num_heads
        qkv = Linear(3 * d, role="self-attn", name="qkv")(x)
        qkv = qkv.reshape(n, t, 3, self.num_heads, hd)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.impl)
        return Linear(d, role="self-attn", name="proj")(out.reshape(n, t, d).astype(x.dtype), epilogue)


class Mlp(nn.Module):
    """``[N, T, C_in] → [N, T, D]``: fc1 → GELU(tanh) → fc2; both Linears carry ``role``."""

    hidden_size: int
    mlp_hidden: int
    role: str = "ffn"

    @nn.compact
    def __call__(self, x: jax.Array, epilogue: Optional[Epilogue] = None) -> jax.Array:
        """``epilogue``: what follows ``fc2`` (e.g. DiT's ``x + gate · fc2(·)``); the GELU is
        fc1's epilogue.  Both fuse into the GEMMs where the backend allows."""
        h = Linear(self.mlp_hidden, role=self.role, name="fc1")(x, Epilogue(act=GELU))
        return Linear(self.hidden_size, role=self.role, name="fc2")(h, epilogue)


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block.

    With ``own_embedder`` (diffusers layout) the block embeds ``(t, y)`` itself and
    ignores ``c``; otherwise ``c`` is the shared conditioning.

    Args of ``__call__``:
      x: ``[N, T, D]`` tokens.  c: ``[N, D]`` or None.  t: ``[N]``, y: ``[N]`` int.
    Returns:
      ``(x [N, T, D], c [N, D])``: the updated tokens and the conditioning used.
    """

    config: DiTConfig
    own_embedder: bool = False

    @nn.compact
    def __call__(self, x, c=None, t=None, y=None, force_drop_ids=None):
        cfg = self.config
        if self.own_embedder:
            c = _conditioning(cfg, t, y, force_drop_ids, x.dtype)
        mod = Linear(6 * cfg.hidden_size, role="adaLN", kernel_init=_zeros, name="adaLN_modulation")(nn.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        # h = modulate(layer_norm(x), shift, scale); the quantize fuses into the norm under kernels
        h = norm_linear(self, x, Norm("layer", cfg.norm_eps), shift=shift_msa, scale=scale_msa, linears=("attn/qkv",))
        # x + gate · proj(·) and x + gate · fc2(GELU(fc1(·))): in the GEMMs' epilogues where they fuse
        x = Attention(cfg.hidden_size, cfg.num_heads, cfg.attention, name="attn")(
            h, Epilogue(gate=gate_msa, residual=x))
        eps = cfg.norm_eps if cfg.mlp_norm_eps is None else cfg.mlp_norm_eps
        h = norm_linear(self, x, Norm("layer", eps), shift=shift_mlp, scale=scale_mlp, linears=("mlp/fc1",),
                        acts={"mlp/fc1": GELU})
        x = Mlp(cfg.hidden_size, cfg.mlp_hidden, name="mlp")(h, Epilogue(gate=gate_mlp, residual=x))
        return x, c


class FinalLayer(nn.Module):
    """``[N, T, D], c [N, D] → [N, T, p·p·C_out]``: LayerNorm, adaLN (shift, scale), Linear."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        cfg = self.config
        mod = Linear(2 * cfg.hidden_size, role="adaLN", kernel_init=_zeros, name="adaLN_modulation")(nn.silu(c))
        shift, scale = jnp.split(mod, 2, axis=-1)
        x = modulate(layer_norm(x, cfg.norm_eps), shift, scale)
        return Linear(cfg.patch_size ** 2 * cfg.out_channels, role="final", kernel_init=_zeros,
                      name="linear")(x)


class DiT(nn.Module):
    """Class-conditional DiT.

    ``DiT(config).apply({"params": params}, x, t, y)``:
      x: ``[N, C, H, W]`` float, H and W multiples of p (normally ``input_size``; other
         sizes get the sin-cos embedding of their own grid, where diffusers would
         rescale positions to the ``input_size`` grid).
      t: ``[N]`` int or float timesteps.
      y: ``[N]`` int labels in ``[0, num_classes]`` (``num_classes`` = null class).
      force_drop_ids: optional ``[N]``, nonzero → null class (training label dropout).
    Returns:
      ``[N, C_out, H, W]`` in x's dtype.
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array,
                 force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        p = cfg.patch_size
        _, c_in, h, w = x.shape
        if c_in != cfg.in_channels or h % p or w % p:
            raise ValueError(f"input {x.shape} does not fit in_channels={cfg.in_channels}, patch_size={p}")
        gh, gw = h // p, w // p
        tokens = PatchEmbed(cfg.hidden_size, name="x_embedder")(patchify(x, p))
        tokens = tokens + jnp.asarray(pos_embed_2d(cfg.hidden_size, gh, gw), tokens.dtype)

        c = _conditioning(cfg, t, y, force_drop_ids, tokens.dtype) if cfg.shared_embedder else None
        c_final = c
        for i in range(cfg.depth):
            tokens, c_used = DiTBlock(cfg, own_embedder=not cfg.shared_embedder, name=f"blocks_{i}")(
                tokens, c, t, y, force_drop_ids)
            if i == 0:
                c_final = c_used  # diffusers conditions the final layer with block 0's embedder
        out = FinalLayer(cfg, name="final_layer")(tokens, c_final)
        return unpatchify(out, p, cfg.out_channels, gh, gw)


def init_dit(config: DiTConfig, key: jax.Array) -> dict:
    """DiT-style init: xavier-uniform Linears, N(0, 0.02) label table and timestep MLP,
    zero adaLN modulation and final linear (so the initial model outputs zeros).

    Returns:
      the float32 ``params`` dict (use ``jax.eval_shape`` to get shapes without allocating).
    """
    s = config.input_size
    x = jnp.zeros((1, config.in_channels, s, s), jnp.float32)
    t = jnp.zeros((1,), jnp.int32)
    y = jnp.zeros((1,), jnp.int32)
    # jit: one XLA compile instead of one per op (eager init of even a tiny DiT takes ~15 s on CPU)
    return jax.jit(lambda k: DiT(config).init(k, x, t, y)["params"])(key)


def layer_roles(config: DiTConfig) -> dict[str, str]:
    """``{"/"-joined Linear path: role}`` of every Linear of the model (for jaxdq.quant.rules)."""
    emb = {"t_embedder/linear_1": "time-embedding", "t_embedder/linear_2": "time-embedding"}
    roles = {"x_embedder/proj": "embedding"}
    if config.shared_embedder:
        roles.update(emb)
    for i in range(config.depth):
        b = f"blocks_{i}/"
        if not config.shared_embedder:
            roles.update({b + k: v for k, v in emb.items()})
        roles.update({b + "adaLN_modulation": "adaLN", b + "attn/qkv": "self-attn", b + "attn/proj": "self-attn",
                      b + "mlp/fc1": "ffn", b + "mlp/fc2": "ffn"})
    roles.update({"final_layer/adaLN_modulation": "adaLN", "final_layer/linear": "final"})
    return roles
