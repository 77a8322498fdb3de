"""jaxdq models (Flax linen; every matmul through :func:`jaxdq.nn.linear`).

DiT (:mod:`~jaxdq.models.dit`), PixArt-α/Σ (:mod:`~jaxdq.models.pixart`), Latte
(:mod:`~jaxdq.models.latte`), UNet2D / UNet2DCondition (:mod:`~jaxdq.models.unet`),
AutoencoderKL (:mod:`~jaxdq.models.vae`), FLUX.1 (:mod:`~jaxdq.models.flux`), the shipped
default (:mod:`~jaxdq.models.default`) and the family table (:mod:`~jaxdq.models.registry`).
"""
from jaxdq.models.dit import DiT, DiTConfig, dit_config, init_dit
from jaxdq.models.flux import Flux, FluxConfig, flux_config, init_flux
from jaxdq.models.latte import Latte, LatteConfig, init_latte, latte_config
from jaxdq.models.pixart import PixArt, PixArtConfig, init_pixart, pixart_config
from jaxdq.models.unet import UNet, UNetConfig, init_unet, unet_config
from jaxdq.models.vae import AutoencoderKL, VAEConfig, init_vae, vae_config, vae_decode, vae_encode

__all__ = ["AutoencoderKL", "DiT", "DiTConfig", "Flux", "FluxConfig", "Latte", "LatteConfig", "PixArt",
           "PixArtConfig", "UNet", "UNetConfig", "VAEConfig", "dit_config", "flux_config", "init_dit",
           "init_flux", "init_latte", "init_pixart", "init_unet", "init_vae", "latte_config", "pixart_config",
           "unet_config", "vae_config", "vae_decode", "vae_encode"]
