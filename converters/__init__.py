"""PyTorch checkpoints → jaxdq Flax params (torch needed only for pickled ``.pt``/``.bin`` files).

One key map per model family: DiT, PixArt-α/Σ, Latte, UNet2D / UNet2DCondition, AutoencoderKL, FLUX.1
(see :mod:`jaxdq.models.registry` for the family table the CLI uses).
"""
from converters.dit import ConversionError, convert_dit, detect_layout
from converters.flux import convert_flux, detect_flux_layout
from converters.latte import convert_latte
from converters.pixart import convert_pixart
from converters.state_dict import CheckpointError, StateDict, load_state_dict
from converters.unet import convert_unet
from converters.vae import convert_vae

__all__ = ["CheckpointError", "ConversionError", "StateDict", "convert_dit", "convert_flux", "convert_latte",
           "convert_pixart", "convert_unet", "convert_vae", "detect_flux_layout", "detect_layout",
           "load_state_dict"]
