"""jaxdq's default models, trained by the project on scikit-learn's digits.

* the default model: a small class-conditional DiT, made by ``examples/train_default_dit.py``
  (see its docstring); the EMA weights ship in ``jaxdq/assets/dit_digits16.safetensors`` as
  float16 with Flax param paths as keys (``blocks_0/attn/qkv/kernel``), and load as float32.
* the default UNet (:func:`load_default_unet`): a class-conditional diffusers ``UNet2DModel``
  layout (DDPM ε-prediction, 11 class embeddings, 10 = CFG null), ``examples/train_default_unet.py``.
* the text-conditioned default (:func:`load_default_text`): a PixArt layout cross-attending to
  all-MiniLM-L6-v2 token embeddings of captions ("a handwritten seven", see
  :mod:`jaxdq.data` and :mod:`jaxdq.text`), ``examples/train_default_text.py``.
* the video default (:func:`load_default_video`): a Latte layout over 8-frame 24×24 clips of a
  moving digit (:func:`jaxdq.data.moving_digit_clips`), captioned like the text model,
  ``examples/train_default_video.py``.

All weights are EMA weights stored the same way (float16, Flax paths, loaded as float32).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from jaxdq.models.dit import DiTConfig
from jaxdq.models.latte import LatteConfig
from jaxdq.models.pixart import PixArtConfig
from jaxdq.models.unet import UNetConfig

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


# ---------------------------------------------------------------------------------------------
# the default UNet, text-conditioned (PixArt) and video (Latte) models

UNET_WEIGHTS = os.path.join(ASSET_DIR, "unet_digits16.safetensors")
TEXT_WEIGHTS = os.path.join(ASSET_DIR, "text_digits16.safetensors")
VIDEO_WEIGHTS = os.path.join(ASSET_DIR, "video_digits.safetensors")

UNET_NULL_CLASS = 10  # class label of the unconditional (CFG) embedding
UNET_CONFIG = UNetConfig(
    model_type="UNet2DModel", sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64),
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), layers_per_block=2, norm_num_groups=8,
    attention_head_dim=32, num_class_embeds=UNET_NULL_CLASS + 1)
# pixel space, 1 channel, learned sigma (2 output channels) like the default DiT; L = 16 caption tokens
TEXT_CONFIG = PixArtConfig(sample_size=16, patch_size=2, in_channels=1, out_channels=2, hidden_size=128, depth=6,
                           num_heads=4, caption_channels=384, max_text_tokens=16)
VIDEO_FRAMES = 8
# 24x24 frames at patch 3 = 8x8 tokens per frame; depth 4 = 4 spatial + 4 temporal blocks
VIDEO_CONFIG = LatteConfig(sample_size=24, patch_size=3, in_channels=1, out_channels=2, hidden_size=128, depth=4,
                           num_heads=4, caption_channels=384, video_length=VIDEO_FRAMES, max_text_tokens=16)


def _param_shapes(config) -> dict[str, tuple[int, ...]]:
    """``{"a/b/kernel": shape}`` of a UNet / PixArt / Latte config's params (nothing allocated)."""
    import jax

    if isinstance(config, UNetConfig):
        from jaxdq.models.unet import unet_param_shapes

        shapes = unet_param_shapes(config)
    elif isinstance(config, PixArtConfig):
        from jaxdq.models.pixart import PixArt, example_inputs

        shapes = jax.eval_shape(lambda k: PixArt(config).init(k, *example_inputs(config))["params"],
                                jax.random.PRNGKey(0))
    else:
        from jaxdq.models.latte import init_latte

        shapes = jax.eval_shape(lambda k: init_latte(config, k), jax.random.PRNGKey(0))

    def walk(tree, prefix=""):
        for k, v in tree.items():
            path = f"{prefix}/{k}" if prefix else str(k)
            if isinstance(v, Mapping):
                yield from walk(v, path)
            else:
                yield path, tuple(v.shape)

    return dict(walk(shapes))


def _load_trained(path: str, config, what: str, script: str):
    from safetensors.numpy import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} weights not found at {path}: they are made on a GPU by {script} "
                                "(bench/gpu_train_session.sh) and copied into jaxdq/assets/")
    flat = load_file(path)
    want = _param_shapes(config)
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if got != want:
        bad = sorted(set(want) ^ set(got)) + sorted(k for k in set(want) & set(got) if want[k] != got[k])
        raise ValueError(f"{path} does not match the {what} config: {len(bad)} missing, extra or mis-shaped "
                         f"params, e.g. {bad[:3]}")
    return config, unflatten_params(flat)


def load_default_unet(path: str = UNET_WEIGHTS) -> tuple[UNetConfig, dict]:
    """The default UNet's ``(config, float32 params)``; apply as
    ``UNet(config).apply({"params": p}, x, t, None, class_labels)`` (label 10 = unconditional)."""
    return _load_trained(path, UNET_CONFIG, "default UNet", "examples/train_default_unet.py")


def load_default_text(path: str = TEXT_WEIGHTS) -> tuple[PixArtConfig, dict]:
    """The text-conditioned default's ``(config, float32 params)``; apply as
    ``PixArt(config).apply({"params": p}, x, t, states, mask)`` with states and mask from
    :func:`jaxdq.data.load_digit_captions` or :func:`jaxdq.text.encode_prompts`."""
    return _load_trained(path, TEXT_CONFIG, "text-conditioned default", "examples/train_default_text.py")


def load_default_video(path: str = VIDEO_WEIGHTS) -> tuple[LatteConfig, dict]:
    """The video default's ``(config, float32 params)``; apply as
    ``Latte(config).apply({"params": p}, x [N, 1, 8, 24, 24], t, states, mask)``."""
    return _load_trained(path, VIDEO_CONFIG, "video default", "examples/train_default_video.py")
