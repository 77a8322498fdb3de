"""jaxdq: post-training quantization of diffusion models in JAX."""
__version__ = "0.3.0"
