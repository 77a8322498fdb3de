"""diffusers ``AutoencoderKL`` (the Stable Diffusion / LDM VAE) in Flax: encoder and decoder.

``vae_encode(params, x, config) -> (mean, logvar)``: images ``[N, C, H, W]`` (NCHW, in
[-1, 1]) → the diagonal Gaussian's mean and log-variance ``[N, latent_channels, H/f, W/f]``
(``f = 2^(#stages-1)``; logvar clipped to [-30, 20] as diffusers does).
``vae_decode(params, z, config) -> images``: latents ``[N, latent_channels, h, w]`` →
``[N, out_channels, h·f, w·f]``.

The latent scaling is the caller's: a latent diffusion model works on
``z = sample · scaling_factor`` (0.18215 for SD), and ``vae_decode`` takes ``z / scaling_factor``.

Param tree (diffusers keys with ``name.<i>`` → ``name_<i>``)::

    encoder/conv_in, encoder/down_blocks_{i}/resnets_{j}/{norm1,conv1,norm2,conv2,conv_shortcut},
    encoder/down_blocks_{i}/downsamplers_0/conv, encoder/mid_block/resnets_{0,1},
    encoder/mid_block/attentions_0/{group_norm,to_q,to_k,to_v,to_out_0}, encoder/conv_norm_out, encoder/conv_out
    quant_conv, post_quant_conv                                  1x1 convs
    decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_{i}/resnets_{j}/...,
    decoder/up_blocks_{i}/upsamplers_0/conv, decoder/conv_norm_out, decoder/conv_out

The mid-block attention Linears (role "self-attn") are the only Linears; the convs are
:class:`jaxdq.nn.Conv` layers with role "other" (float in every recipe).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdq.models.unet_blocks import (Conv2d, DownBlock, GroupNorm, MidBlock, UpBlock, activation,
                                      nchw_to_nhwc, nhwc_to_nchw, roles_of_params)

VAE_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code the norm eps
#: Role of every VAE conv: "other", which no recipe's conv rule selects (they select "conv"),
#: so the autoencoder's convs stay float (it is decoded, never quantized, in jaxdq's flows).
VAE_CONV_ROLE = "other"


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """``AutoencoderKL`` hyper-parameters (names as in its config.json; defaults: diffusers').

    scaling_factor / shift_factor are recorded for the caller; the model does not apply them.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    act_fn: str = "silu"

    def __post_init__(self):
        activation(self.act_fn)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> "VAEConfig":
        """From an ``AutoencoderKL`` config.json dict; ValueError naming unsupported settings."""
        name = config.get("_class_name", "AutoencoderKL")
        problems = [] if name == "AutoencoderKL" else [f"_class_name={name!r}, expected 'AutoencoderKL'"]
        n = len(config.get("block_out_channels", cls.block_out_channels))
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = config.get(key, (block,) * n)
            if list(types) != [block] * n:
                problems.append(f"{key}={list(types)} (supported: {n} x {block})")
        if config.get("norm_type", "group") != "group":
            problems.append(f"norm_type={config['norm_type']!r} (supported: 'group')")
        if config.get("act_fn", "silu") not in ("silu", "swish"):
            problems.append(f"act_fn={config['act_fn']!r} (supported: 'silu')")
        if problems:
            raise ValueError("unsupported AutoencoderKL config: " + "; ".join(problems))
        fields = {f.name: config[f.name] for f in dataclasses.fields(cls) if f.name in config}
        if "block_out_channels" in fields:
            fields["block_out_channels"] = tuple(fields["block_out_channels"])
        if isinstance(fields.get("sample_size"), (list, tuple)):
            fields["sample_size"] = fields["sample_size"][0]
        for k in ("use_quant_conv", "use_post_quant_conv"):  # null in some configs means the default
            if fields.get(k) is None:
                fields.pop(k, None)
        return cls(**fields)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# AutoencoderKL config.json of Stable Diffusion 1.x (stable-diffusion-v1-5/vae)
VAE_CONFIGS: dict[str, dict] = {
    "sd-vae": {
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
        "scaling_factor": 0.18215, "up_block_types": ["UpDecoderBlock2D"] * 4},
}


def vae_config(name: str = "sd-vae", **overrides) -> VAEConfig:
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE config {name!r}; valid names: {', '.join(VAE_CONFIGS)}")
    return dataclasses.replace(VAEConfig.from_diffusers(VAE_CONFIGS[name]), **overrides)


SD_VAE = vae_config("sd-vae")


def _mid(cfg: VAEConfig, name: str) -> MidBlock:
    c = cfg.block_out_channels[-1]
    return MidBlock(c, cfg.norm_num_groups, VAE_EPS, attention="spatial" if cfg.mid_block_add_attention else "none",
                    heads=1, dim_head=c, use_temb=False, act_fn=cfg.act_fn, conv_role=VAE_CONV_ROLE, name=name)


class Encoder(nn.Module):
    """``[N, H, W, C_in] → [N, H/f, W/f, 2·latent_channels]`` (channels-last)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        n = len(cfg.block_out_channels)
        x = Conv2d(cfg.block_out_channels[0], 3, role=VAE_CONV_ROLE, name="conv_in")(x)
        for i, c in enumerate(cfg.block_out_channels):
            x, _ = DownBlock(c, cfg.layers_per_block, cfg.norm_num_groups, VAE_EPS, use_temb=False,
                             add_downsample=i < n - 1, downsample_padding=0, act_fn=cfg.act_fn,
                             conv_role=VAE_CONV_ROLE, name=f"down_blocks_{i}")(x)
        x = _mid(cfg, "mid_block")(x)
        x = activation(cfg.act_fn)(GroupNorm(cfg.norm_num_groups, VAE_EPS, name="conv_norm_out")(x))
        return Conv2d(2 * cfg.latent_channels, 3, role=VAE_CONV_ROLE, name="conv_out")(x)


class Decoder(nn.Module):
    """``[N, h, w, latent_channels] → [N, h·f, w·f, out_channels]`` (channels-last)."""

    config: VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        cfg = self.config
        n = len(cfg.block_out_channels)
        x = Conv2d(cfg.block_out_channels[-1], 3, role=VAE_CONV_ROLE, name="conv_in")(z)
        x = _mid(cfg, "mid_block")(x)
        for i, c in enumerate(reversed(cfg.block_out_channels)):
            x = UpBlock(c, cfg.layers_per_block + 1, cfg.norm_num_groups, VAE_EPS, use_temb=False,
                        add_upsample=i < n - 1, act_fn=cfg.act_fn, conv_role=VAE_CONV_ROLE,
                        name=f"up_blocks_{i}")(x)
        x = activation(cfg.act_fn)(GroupNorm(cfg.norm_num_groups, VAE_EPS, name="conv_norm_out")(x))
        return Conv2d(cfg.out_channels, 3, role=VAE_CONV_ROLE, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """``encode(x [N, C, H, W]) -> (mean, logvar)``, ``decode(z [N, L, h, w]) -> [N, C_out, H, W]``
    (NCHW at the boundary); ``__call__`` decodes the encoder's mean (used for init)."""

    config: VAEConfig

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.latent_channels, 1, role=VAE_CONV_ROLE) if cfg.use_quant_conv else None
        self.post_quant_conv = (Conv2d(cfg.latent_channels, 1, role=VAE_CONV_ROLE) if cfg.use_post_quant_conv
                                else None)

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        f = self.config.downscale
        if x.shape[1] != self.config.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"image {x.shape} does not fit in_channels={self.config.in_channels} "
                             f"and H, W multiples of {f}")
        h = self.encoder(nchw_to_nhwc(x))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(nhwc_to_nchw(h), 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array) -> jax.Array:
        h = nchw_to_nhwc(z)
        if self.post_quant_conv is not None:
            h = self.post_quant_conv(h)
        return nhwc_to_nchw(self.decoder(h))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.decode(self.encode(x)[0])


def _dummy_image(config: VAEConfig) -> jax.Array:
    f = config.downscale
    return jnp.zeros((1, config.in_channels, f, f), jnp.float32)


def init_vae(config: VAEConfig, key: jax.Array) -> dict:
    """Flax-default-initialized float32 params (real weights: :func:`converters.vae.convert_vae`)."""
    return jax.jit(lambda k: AutoencoderKL(config).init(k, _dummy_image(config))["params"])(key)


def vae_param_shapes(config: VAEConfig) -> dict:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves."""
    return jax.eval_shape(lambda k: AutoencoderKL(config).init(k, _dummy_image(config))["params"],
                          jax.random.PRNGKey(0))


@functools.partial(jax.jit, static_argnames="config")
def vae_encode(params: Mapping, x: jax.Array, config: VAEConfig = SD_VAE) -> tuple[jax.Array, jax.Array]:
    """Images ``[N, C, H, W]`` → ``(mean, logvar)`` ``[N, latent_channels, H/f, W/f]`` (jitted)."""
    return AutoencoderKL(config).apply({"params": params}, x, method="encode")


@functools.partial(jax.jit, static_argnames="config")
def vae_decode(params: Mapping, z: jax.Array, config: VAEConfig = SD_VAE) -> jax.Array:
    """Latents ``[N, latent_channels, h, w]`` (already divided by scaling_factor) → images (jitted)."""
    return AutoencoderKL(config).apply({"params": params}, z, method="decode")


def layer_roles(params_or_config: Union[VAEConfig, Mapping]) -> dict[str, str]:
    """``{layer path: role}``: the mid-block attentions' to_q/to_k/to_v/to_out_0 ("self-attn")
    and every conv ("other", :data:`VAE_CONV_ROLE`)."""
    params = vae_param_shapes(params_or_config) if isinstance(params_or_config, VAEConfig) else params_or_config
    return roles_of_params(params, vae=True)
