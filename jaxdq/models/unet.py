"""diffusers ``UNet2DModel`` (DDPM) and ``UNet2DConditionModel`` (LDM / Stable Diffusion) in Flax.

``UNet(config).apply({"params": params}, sample, timesteps, encoder_hidden_states)``:
  sample: ``[N, C_in, H, W]`` (NCHW, like diffusers; H and W multiples of 2^(#stages-1)).
  timesteps: ``[N]`` or a scalar, int or float.
  encoder_hidden_states: ``[N, S, cross_attention_dim]`` for a UNet2DConditionModel
    (text-encoder states; a CFG batch stacks the conditional and unconditional ones),
    None for a UNet2DModel.
  class_labels: ``[N]`` int labels in ``[0, num_class_embeds)`` for a class-conditional
    model (``num_class_embeds`` set, diffusers' ``class_embed_type=None``: an
    ``nn.Embedding`` row added to the time embedding), else None.
Returns ``[N, C_out, H, W]`` in sample's dtype.

Supported blocks: DownBlock2D / AttnDownBlock2D / CrossAttnDownBlock2D,
UNetMidBlock2D / UNetMidBlock2DCrossAttn, UpBlock2D / AttnUpBlock2D / CrossAttnUpBlock2D,
positional (sinusoidal) timestep embedding, class conditioning by a learned embedding
(``num_class_embeds``, ``class_embed_type=None``), ``resnet_time_scale_shift="default"``,
conv up/down-sampling, GEGLU transformer blocks with linear or 1x1-conv proj_in/out.
:meth:`UNetConfig.from_diffusers` rejects configs using anything else.

Param tree (paths mirror diffusers keys, ``name.<i>`` → ``name_<i>``; see
:mod:`jaxdq.models.unet_blocks`)::

    conv_in, conv_norm_out, conv_out                         conv / GroupNorm params
    time_embedding/linear_1, linear_2                        Linear "time-embedding"
    class_embedding/embedding [num_class_embeds, 4·C0]       plain param (diffusers ``class_embedding.weight``)
    {down,up}_blocks_{i}/resnets_{j}/time_emb_proj           Linear "time-embedding"
    {down,up}_blocks_{i}/resnets_{j}/{norm1,conv1,norm2,conv2,conv_shortcut}
    {down,up}_blocks_{i}/{downsamplers,upsamplers}_0/conv
    mid_block/resnets_{0,1}, mid_block/attentions_0
    .../attentions_{j}/{group_norm,to_q,to_k,to_v,to_out_0}  UNet2DModel attention, "self-attn"
    .../attentions_{j}/{norm,proj_in,proj_out}               Transformer2D (proj Linear "other" or 1x1 conv)
    .../attentions_{j}/transformer_blocks_{k}/attn1/{to_q,to_k,to_v,to_out_0}   "self-attn"
    .../attentions_{j}/transformer_blocks_{k}/attn2/{to_q,to_k,to_v,to_out_0}   "cross-attn" (to_k/to_v: "cross-attn:kv")
    .../attentions_{j}/transformer_blocks_{k}/ff/{net_0/proj,net_2}             "ffn"
    .../attentions_{j}/transformer_blocks_{k}/norm{1,2,3}

Convs are :class:`jaxdq.nn.Conv` layers: ``conv_in`` role "embedding", ``conv_out`` "final",
resnet convs "conv", shortcuts "conv:shortcut", resamplers "conv:resample", 1x1 transformer
projections "conv:proj"; an up block's ``conv_shortcut`` reads ``[h, skip]`` and records the
split channel (Q-Diffusion's shortcut splitting).

TFMQ-DM's temporal information block is the timestep MLP plus every resnet's
``time_emb_proj``: the paths matching ``time_embedding/|time_emb_proj$``
(:data:`TIME_EMBEDDING_PATTERN`), all with role "time-embedding".
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdq.models.unet_blocks import (Conv2d, DownBlock, GroupNorm, MidBlock, TimestepEmbedding, UpBlock,
                                      activation, nchw_to_nhwc, nhwc_to_nchw, roles_of_params,
                                      timestep_sinusoid)

TIME_EMBEDDING_PATTERN = r"(^|/)time_embedding/|/time_emb_proj$"

DOWN_BLOCKS = {"DownBlock2D": "none", "AttnDownBlock2D": "spatial", "CrossAttnDownBlock2D": "cross"}
UP_BLOCKS = {"UpBlock2D": "none", "AttnUpBlock2D": "spatial", "CrossAttnUpBlock2D": "cross"}
MID_BLOCKS = ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn")
MODEL_TYPES = ("UNet2DModel", "UNet2DConditionModel")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyper-parameters of a diffusers UNet (field names and meanings as in its config.json).

    Attributes:
      model_type: "UNet2DModel" (unconditional, spatial self-attention) or
        "UNet2DConditionModel" (cross-attention to encoder_hidden_states).
      attention_head_dim: UNet2DModel only: channels per head of the spatial attention,
        None = one head over all channels (google/ddpm-*).
      num_attention_heads: UNet2DConditionModel only: heads of each down stage's
        transformers (SD's config calls these ``attention_head_dim``); up stages use
        them reversed, the mid block the last.
      transformer_layers_per_block: transformer blocks per Transformer2D, per down stage.
      cross_attention_dim: width of encoder_hidden_states.
      use_linear_projection: proj_in/proj_out are Linears (else 1x1 convs).
      time_embedding_dim: None = ``4 · block_out_channels[0]``.
      num_class_embeds: class-conditional model with this many labels (diffusers
        ``class_embed_type=None`` + ``num_class_embeds``): ``emb = time_embedding(t) +
        class_embedding[y]``; None = no class input.
    """

    model_type: str = "UNet2DModel"
    sample_size: Optional[Union[int, tuple[int, int]]] = None
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    mid_block_type: Optional[str] = "UNetMidBlock2D"
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    attn_norm_num_groups: Optional[int] = None
    add_attention: bool = True
    attention_head_dim: Optional[int] = 8
    num_attention_heads: tuple[int, ...] = ()
    transformer_layers_per_block: tuple[int, ...] = ()
    cross_attention_dim: Optional[int] = None
    use_linear_projection: bool = False
    downsample_padding: int = 1
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    time_embedding_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    act_fn: str = "silu"
    num_class_embeds: Optional[int] = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        problems = []
        if self.model_type not in MODEL_TYPES:
            problems.append(f"model_type {self.model_type!r} not in {MODEL_TYPES}")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            problems.append(f"{n} block_out_channels but {len(self.down_block_types)} down and "
                            f"{len(self.up_block_types)} up block types")
        allowed = {"none", "cross"} if self.cross else {"none", "spatial"}
        for t in self.down_block_types:
            if DOWN_BLOCKS.get(t) not in allowed:
                problems.append(f"unsupported down block {t!r} in a {self.model_type}")
        for t in self.up_block_types:
            if UP_BLOCKS.get(t) not in allowed:
                problems.append(f"unsupported up block {t!r} in a {self.model_type}")
        mid_ok = {None, "UNetMidBlock2DCrossAttn"} if self.cross else {None, "UNetMidBlock2D"}
        if self.mid_block_type not in mid_ok:
            problems.append(f"unsupported mid block {self.mid_block_type!r} in a {self.model_type}")
        if self.cross:
            if self.cross_attention_dim is None:
                problems.append("a UNet2DConditionModel needs cross_attention_dim")
            if len(self.num_attention_heads) != n or len(self.transformer_layers_per_block) != n:
                problems.append(f"num_attention_heads {self.num_attention_heads} and transformer_layers_per_block "
                                f"{self.transformer_layers_per_block} need one entry per stage ({n})")
        if self.num_class_embeds is not None and self.num_class_embeds < 1:
            problems.append(f"num_class_embeds must be positive, got {self.num_class_embeds}")
        activation(self.act_fn)
        if problems:
            raise ValueError("invalid UNetConfig: " + "; ".join(problems))

    @property
    def cross(self) -> bool:
        return self.model_type == "UNet2DConditionModel"

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    def _attention(self, kind: str, channels: int, stage: int) -> dict:
        """Attention fields of a stage (``stage`` indexes down stages; -1 = mid block)."""
        if kind == "cross":
            heads = self.num_attention_heads[stage]
            return dict(heads=heads, dim_head=channels // heads, use_linear_projection=self.use_linear_projection,
                        transformer_layers=self.transformer_layers_per_block[stage])
        if kind == "spatial":
            d = self.attention_head_dim or channels
            return dict(heads=channels // d, dim_head=d)
        return {}

    def down_block(self, i: int) -> dict:
        """Keyword arguments of :class:`DownBlock` for down stage i."""
        kind = DOWN_BLOCKS[self.down_block_types[i]]
        c = self.block_out_channels[i]
        return dict(out_channels=c, num_layers=self.layers_per_block, groups=self.norm_num_groups,
                    eps=self.norm_eps, attention=kind, add_downsample=i < len(self.block_out_channels) - 1,
                    downsample_padding=self.downsample_padding, act_fn=self.act_fn,
                    **self._attention(kind, c, i))

    def up_block(self, i: int) -> dict:
        """Keyword arguments of :class:`UpBlock` for up stage i (stage 0 is the deepest)."""
        kind = UP_BLOCKS[self.up_block_types[i]]
        n = len(self.block_out_channels)
        c = self.block_out_channels[n - 1 - i]
        return dict(out_channels=c, num_layers=self.layers_per_block + 1, groups=self.norm_num_groups,
                    eps=self.norm_eps, attention=kind, add_upsample=i < n - 1, act_fn=self.act_fn,
                    **self._attention(kind, c, n - 1 - i))

    def mid_block(self) -> Optional[dict]:
        """Keyword arguments of :class:`MidBlock`, or None without a mid block."""
        if self.mid_block_type is None:
            return None
        kind = "cross" if self.cross else ("spatial" if self.add_attention else "none")
        c = self.block_out_channels[-1]
        return dict(channels=c, groups=self.norm_num_groups, eps=self.norm_eps, attention=kind,
                    attn_groups=self.attn_norm_num_groups, output_scale_factor=self.mid_block_scale_factor,
                    act_fn=self.act_fn, **self._attention(kind, c, -1))

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "UNetConfig":
        """From a diffusers ``config.json`` dict (``_class_name`` UNet2DModel or
        UNet2DConditionModel; absent: UNet2DConditionModel iff it has cross-attention).
        Raises ValueError naming every setting this implementation does not support."""
        name = config.get("_class_name")
        if name is None:
            types = config.get("down_block_types", ())
            crossy = "cross_attention_dim" in config or any("CrossAttn" in t for t in types)
            name = "UNet2DConditionModel" if crossy else "UNet2DModel"
        if name not in MODEL_TYPES:
            raise ValueError(f"config is a {name}, not one of {MODEL_TYPES}")
        d = {**_DIFFUSERS_DEFAULTS[name], **{k: v for k, v in config.items() if not k.startswith("_")}}
        problems = [f"{k}={d[k]!r} (supported: {ok})" for k, ok in _MUST_BE[name].items()
                    if k in d and not _is_allowed(d[k], ok)]
        if problems:
            raise ValueError(f"unsupported {name} config: " + "; ".join(problems))
        n = len(d["block_out_channels"])
        fields = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        fields.update(model_type=name, block_out_channels=tuple(d["block_out_channels"]),
                      down_block_types=tuple(d["down_block_types"]), up_block_types=tuple(d["up_block_types"]))
        if name == "UNet2DConditionModel":
            heads = d.get("num_attention_heads") or d["attention_head_dim"]  # diffusers' legacy naming
            layers = d["transformer_layers_per_block"]
            fields.update(num_attention_heads=_per_stage(heads, n), transformer_layers_per_block=_per_stage(layers, n),
                          attention_head_dim=None)
        if isinstance(fields.get("sample_size"), list):
            fields["sample_size"] = tuple(fields["sample_size"])
        return cls(**fields)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UNetConfig":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _per_stage(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


def _is_allowed(value, ok) -> bool:
    if isinstance(value, (list, tuple)) and not isinstance(ok[0], (list, tuple)):
        return all(v in ok for v in value)  # per-block flags such as only_cross_attention
    return value in ok


# diffusers' constructor defaults for the fields used here (config.json omits defaults).
_COMMON_DEFAULTS = dict(in_channels=3, out_channels=3, flip_sin_to_cos=True, freq_shift=0, layers_per_block=2,
                        mid_block_scale_factor=1, downsample_padding=1, act_fn="silu", norm_num_groups=32,
                        norm_eps=1e-5, center_input_sample=False, time_embedding_dim=None, sample_size=None,
                        num_class_embeds=None)
_DIFFUSERS_DEFAULTS = {
    "UNet2DModel": dict(_COMMON_DEFAULTS, attention_head_dim=8, attn_norm_num_groups=None, add_attention=True,
                        mid_block_type="UNetMidBlock2D", block_out_channels=(224, 448, 672, 896),
                        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "UNet2DConditionModel": dict(_COMMON_DEFAULTS, in_channels=4, out_channels=4, attention_head_dim=8,
                                 num_attention_heads=None, cross_attention_dim=1280, transformer_layers_per_block=1,
                                 use_linear_projection=False, mid_block_type="UNetMidBlock2DCrossAttn",
                                 conv_in_kernel=3, conv_out_kernel=3, block_out_channels=(320, 640, 1280, 1280),
                                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
}
_MUST_BE_COMMON = dict(time_embedding_type=("positional",), resnet_time_scale_shift=("default",),
                       class_embed_type=(None,), act_fn=("silu", "swish"))
_MUST_BE = {
    "UNet2DModel": dict(_MUST_BE_COMMON, downsample_type=("conv",), upsample_type=("conv",),
                        mid_block_type=("UNetMidBlock2D", None)),
    "UNet2DConditionModel": dict(
        _MUST_BE_COMMON, mid_block_type=("UNetMidBlock2DCrossAttn", None), only_cross_attention=(False,),
        dual_cross_attention=(False,), attention_type=("default",), addition_embed_type=(None,),
        encoder_hid_dim=(None,), encoder_hid_dim_type=(None,), time_cond_proj_dim=(None,),
        time_embedding_act_fn=(None,), timestep_post_act=(None,), class_embeddings_concat=(False,),
        mid_block_only_cross_attention=(None, False), reverse_transformer_layers_per_block=(None,),
        projection_class_embeddings_input_dim=(None,), resnet_skip_time_act=(False,),
        resnet_out_scale_factor=(1, 1.0), cross_attention_norm=(None,)),
}

# config.json of the released checkpoints (google/ddpm-cifar10-32, the UNet of
# stable-diffusion-v1-5); keys at diffusers' defaults omitted as in the hub files.
UNET_CONFIGS: dict[str, dict] = {
    "ddpm-cifar10-32": {
        "_class_name": "UNet2DModel", "act_fn": "silu", "attention_head_dim": None,
        "block_out_channels": [128, 256, 256, 256], "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
        "out_channels": 3, "sample_size": 32, "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]},
    "sd-1.5": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
}


def unet_config(name: str, **overrides) -> UNetConfig:
    """Named config (``"ddpm-cifar10-32"``, ``"sd-1.5"``) with field overrides."""
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {name!r}; valid names: {', '.join(UNET_CONFIGS)}")
    return dataclasses.replace(UNetConfig.from_diffusers(UNET_CONFIGS[name]), **overrides)


# ---------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """UNet2DModel / UNet2DConditionModel forward (see the module docstring)."""

    config: UNetConfig

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: Union[jax.Array, int, float],
                 encoder_hidden_states: Optional[jax.Array] = None,
                 class_labels: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.config
        n, c, h, w = sample.shape
        f = 2 ** (len(cfg.block_out_channels) - 1)
        if c != cfg.in_channels or h % f or w % f:
            raise ValueError(f"sample {sample.shape} does not fit in_channels={cfg.in_channels} "
                             f"and {len(cfg.block_out_channels)} stages (H, W multiples of {f})")
        if cfg.cross and encoder_hidden_states is None:
            raise ValueError("a UNet2DConditionModel needs encoder_hidden_states [N, S, cross_attention_dim]")
        ctx = encoder_hidden_states if cfg.cross else None
        x = 2 * sample - 1.0 if cfg.center_input_sample else sample
        x = nchw_to_nhwc(x)

        t = jnp.broadcast_to(jnp.ravel(jnp.asarray(timesteps)), (n,))
        t_emb = timestep_sinusoid(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, name="time_embedding")(t_emb.astype(x.dtype))
        if cfg.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError(f"a class-conditional UNet (num_class_embeds={cfg.num_class_embeds}) "
                                 "needs class_labels [N]")
            y = jnp.broadcast_to(jnp.ravel(jnp.asarray(class_labels)), (n,))
            table = nn.Embed(cfg.num_class_embeds, cfg.time_embed_dim, name="class_embedding")
            emb = emb + table(y).astype(emb.dtype)
        elif class_labels is not None:
            raise ValueError("class_labels given but the UNet has no class embedding (num_class_embeds=None)")

        x = Conv2d(cfg.block_out_channels[0], cfg.conv_in_kernel, role="embedding", name="conv_in")(x)
        skips = [x]
        for i in range(len(cfg.block_out_channels)):
            x, s = DownBlock(**cfg.down_block(i), name=f"down_blocks_{i}")(x, emb, ctx)
            skips += s
        if (mid := cfg.mid_block()) is not None:
            x = MidBlock(**mid, name="mid_block")(x, emb, ctx)
        for i in range(len(cfg.block_out_channels)):
            k = cfg.layers_per_block + 1
            x = UpBlock(**cfg.up_block(i), name=f"up_blocks_{i}")(x, skips[-k:], emb, ctx)
            skips = skips[:-k]

        x = activation(cfg.act_fn)(GroupNorm(cfg.norm_num_groups, cfg.norm_eps, name="conv_norm_out")(x))
        x = Conv2d(cfg.out_channels, cfg.conv_out_kernel, role="final", name="conv_out")(x)
        return nhwc_to_nchw(x)


def _dummy_inputs(config: UNetConfig):
    s = 2 ** (len(config.block_out_channels) - 1)  # params do not depend on the spatial size
    x = jnp.zeros((1, config.in_channels, s, s), jnp.float32)
    ctx = jnp.zeros((1, 1, config.cross_attention_dim), jnp.float32) if config.cross else None
    y = jnp.zeros((1,), jnp.int32) if config.num_class_embeds is not None else None
    return x, jnp.zeros((1,), jnp.int32), ctx, y


def init_unet(config: UNetConfig, key: jax.Array) -> dict:
    """Flax-default-initialized float32 params (for shapes and tests; real weights come from
    :func:`converters.unet.convert_unet`)."""
    x, t, ctx, y = _dummy_inputs(config)
    return jax.jit(lambda k: UNet(config).init(k, x, t, ctx, y)["params"])(key)


def unet_param_shapes(config: UNetConfig) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves (nothing allocated or compiled)."""
    x, t, ctx, y = _dummy_inputs(config)
    return jax.eval_shape(lambda k: UNet(config).init(k, x, t, ctx, y)["params"], jax.random.PRNGKey(0))


def layer_roles(params_or_config: Union[UNetConfig, Mapping]) -> dict[str, str]:
    """``{"/"-joined layer path: role}`` of every Linear and Conv (float or quantized) of a UNet
    (conv roles: :func:`jaxdq.models.unet_blocks.conv_role`)."""
    params = unet_param_shapes(params_or_config) if isinstance(params_or_config, UNetConfig) else params_or_config
    return roles_of_params(params)
