"""One table of the model families jaxdq converts: module, config, converter, named configs.

``get_arch(name)`` gives, for ``name`` in ``dit | pixart | latte | unet | sd-unet | vae | flux``:
``module(config)`` (the Flax module), ``config_from_dict`` (JSON metadata → config),
``named(name)`` (a published config by name), ``convert(state_dict, config)``, ``roles(config)``
(``{linear path: role tag}``, what the recipes' rules select on) and ``family`` (the name of its
:class:`jaxdq.sampling.families.Family`: conditioning, sampler, one-call inputs; None for the VAE).
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Optional


@dataclasses.dataclass(frozen=True)
class Arch:
    name: str
    description: str
    module: Callable[[Any], Any]
    config_from_dict: Callable[[Mapping], Any]
    named: Callable[[str], Any]
    convert: Callable[..., tuple]
    roles: Callable[[Any], dict]
    layout: str
    family: Optional[str] = None

    def sampling(self):
        """The family's :class:`jaxdq.sampling.families.Family` (ValueError for the VAE)."""
        from jaxdq.sampling.families import get_family

        if self.family is None:
            raise ValueError(f"{self.description} is not sampled on its own (it has no sampler)")
        return get_family(self.family)


def _tuples(cls, d: Mapping):
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields})


def _dit():
    from converters import convert_dit
    from jaxdq.models.dit import DiT, DiTConfig, dit_config, layer_roles

    return Arch("dit", "DiT (class-conditional)", DiT, lambda d: _tuples(DiTConfig, d), dit_config,
                lambda sd, cfg=None, **kw: convert_dit(sd, cfg if not isinstance(cfg, str) else dit_config(cfg), **kw),
                layer_roles, "original facebookresearch/DiT or diffusers DiTTransformer2DModel", "dit")


def _pixart():
    from converters.pixart import convert_pixart
    from jaxdq.models.pixart import PixArt, PixArtConfig, layer_roles, pixart_config

    return Arch("pixart", "PixArt-α/Σ (T5 cross-attention)", PixArt, lambda d: _tuples(PixArtConfig, d),
                pixart_config, convert_pixart, layer_roles,
                "diffusers PixArtTransformer2DModel or original PixArt .pth", "pixart")


def _latte():
    from converters.latte import convert_latte
    from jaxdq.models.latte import Latte, LatteConfig, latte_config, layer_roles

    return Arch("latte", "Latte video DiT (spatial + temporal attention)", Latte,
                lambda d: _tuples(LatteConfig, d), latte_config, convert_latte, layer_roles,
                "diffusers LatteTransformer3DModel", "latte")


def _unet(cross: bool):
    from converters.unet import convert_unet
    from jaxdq.models.unet import UNet, UNetConfig, layer_roles, unet_config

    def convert(sd, cfg=None, **kw):
        cfg = unet_config(cfg) if isinstance(cfg, str) else cfg
        conf, params = convert_unet(sd, cfg)
        if bool(conf.cross) != cross:
            raise ValueError(f"this checkpoint is a {'UNet2DConditionModel' if conf.cross else 'UNet2DModel'}; "
                             f"use --model {'sd-unet' if conf.cross else 'unet'}")
        return conf, params

    name = "sd-unet" if cross else "unet"
    desc = "LDM / Stable Diffusion UNet2DConditionModel" if cross else "DDPM UNet2DModel"
    return Arch(name, desc, UNet, UNetConfig.from_dict, unet_config, convert, layer_roles,
                f"diffusers {desc.split()[-1]}", name)


def _vae():
    from converters.vae import convert_vae
    from jaxdq.models.vae import AutoencoderKL, VAEConfig, layer_roles, vae_config

    return Arch("vae", "AutoencoderKL (encoder + decoder)", AutoencoderKL, VAEConfig.from_dict, vae_config,
                lambda sd, cfg=None, **kw: convert_vae(sd, vae_config(cfg) if isinstance(cfg, str) else cfg),
                layer_roles, "diffusers AutoencoderKL")


def _flux():
    from converters.flux import convert_flux
    from jaxdq.models.flux import Flux, FluxConfig, flux_config, layer_roles

    return Arch("flux", "FLUX.1 transformer (double + single stream, RoPE)", Flux,
                lambda d: _tuples(FluxConfig, d), flux_config,
                lambda sd, cfg=None, **kw: convert_flux(sd, flux_config(cfg) if isinstance(cfg, str) else cfg, **kw),
                layer_roles, "diffusers FluxTransformer2DModel or BFL flux1-*.safetensors", "flux")


_BUILDERS = {"dit": _dit, "pixart": _pixart, "latte": _latte, "unet": lambda: _unet(False),
             "sd-unet": lambda: _unet(True), "vae": _vae, "flux": _flux}
ARCH_NAMES = tuple(_BUILDERS)


def get_arch(name: str) -> Arch:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model family {name!r}; choose from {', '.join(ARCH_NAMES)}")
    return _BUILDERS[name]()


def resolve_config(arch: Arch, config: Optional[str]):
    """``--config`` value → a config: None, a named config, or a ``config.json`` path."""
    if config is None:
        return None
    if os.path.isfile(config):
        with open(config) as f:
            return json.load(f)
    return arch.named(config)


def convert_checkpoint(arch_name: str, path: str, config: Optional[str] = None, **kwargs) -> tuple[Any, dict]:
    """Load a PyTorch checkpoint file/folder and convert it with the family's key map."""
    from converters import load_state_dict

    arch = get_arch(arch_name)
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json")):
        for sub in {"unet": ("unet",), "sd-unet": ("unet",), "vae": ("vae",)}.get(arch_name, ()):
            if os.path.isdir(os.path.join(path, sub)):
                path = os.path.join(path, sub)
    return arch.convert(load_state_dict(path, require_finite=True), resolve_config(arch, config), **kwargs)
