"""jaxdq's default model: a small class-conditional DiT trained on scikit-learn's digits.

Made by ``examples/train_default_dit.py`` (see its docstring); the EMA weights ship
in ``jaxdq/assets/dit_digits16.safetensors`` as float16 with Flax param paths as
keys (``blocks_0/attn/qkv/kernel``), and load as float32.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxdq.models.dit import DiTConfig

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
DEFAULT_WEIGHTS = os.path.join(ASSET_DIR, "dit_digits16.safetensors")

DEFAULT_CONFIG = DiTConfig(input_size=16, patch_size=2, in_channels=1, hidden_size=128, depth=6,
                           num_heads=4, mlp_ratio=4.0, num_classes=10, learn_sigma=True,
                           class_dropout_prob=0.1)
CLASS_NAMES = tuple(str(i) for i in range(10))


def flatten_params(params: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested float params dict → ``{"a/b/kernel": array}``."""
    flat = {}
    for k, v in params.items():
        path = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            flat.update(flatten_params(v, path))
        else:
            flat[path] = np.asarray(v)
    return flat


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten_params`, arrays as float32 jax arrays."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(v, jnp.float32)
    return tree


def save_default_weights(params: Mapping, path: str) -> str:
    """Write float params as float16 safetensors with Flax paths as keys."""
    from safetensors.numpy import save_file

    save_file({k: v.astype(np.float16) for k, v in flatten_params(params).items()}, path)
    return path


def load_default(path: str = DEFAULT_WEIGHTS) -> tuple[DiTConfig, dict]:
    """The default model's ``(config, float32 params)``."""
    from safetensors.numpy import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"default model weights not found at {path}")
    return DEFAULT_CONFIG, unflatten_params(load_file(path))
