"""diffusers ``AutoencoderKL`` state dict → :class:`jaxdq.models.vae.AutoencoderKL` params.

Keys are diffusers' (``encoder.down_blocks.0.resnets.0.conv1.weight``,
``encoder.mid_block.attentions.0.to_q.weight``, ``quant_conv.weight``,
``decoder.up_blocks.3.upsamplers.0.conv.weight``, ...), converted as in
:mod:`converters.unet`; old checkpoints' mid-block attention names
``query``/``key``/``value``/``proj_attn`` are accepted.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Union

import numpy as np

from converters.dit import ConversionError
from converters.unet import convert_by_shapes
from jaxdq.models.vae import VAEConfig, vae_param_shapes


def convert_vae(state_dict: Mapping[str, np.ndarray],
                config: Union[VAEConfig, Mapping, None] = None) -> tuple[VAEConfig, dict]:
    """Map a diffusers AutoencoderKL state dict onto :class:`AutoencoderKL` params.

    Args:
      state_dict: ``{key: array}`` (e.g. :func:`converters.load_state_dict` of a ``vae/`` folder).
      config: a :class:`VAEConfig`, a config.json dict, or None for the state dict's own
        ``config`` (or, lacking one, the Stable Diffusion VAE's).
    Returns:
      ``(config, params)``.
    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    if isinstance(config, VAEConfig):
        cfg = config
    else:
        dconf = config if config is not None else getattr(state_dict, "config", None)
        try:
            cfg = VAEConfig.from_diffusers(dconf) if dconf is not None else VAEConfig.from_diffusers(_sd_vae())
        except ValueError as e:
            raise ConversionError(other=[str(e)]) from e
    return cfg, convert_by_shapes(state_dict, vae_param_shapes(cfg), "AutoencoderKL")


def _sd_vae() -> dict:
    from jaxdq.models.vae import VAE_CONFIGS

    return VAE_CONFIGS["sd-vae"]
