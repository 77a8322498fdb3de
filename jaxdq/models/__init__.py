"""jaxdq models: DiT (:mod:`jaxdq.models.dit`) and the shipped default (:mod:`jaxdq.models.default`)."""
from jaxdq.models.dit import DiT, DiTConfig, dit_config, init_dit

__all__ = ["DiT", "DiTConfig", "dit_config", "init_dit"]
