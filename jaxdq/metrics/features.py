"""A small CNN feature network for the default model's data (16x16 grey digits, 10 classes).

It plays, in-project and offline, the role Inception-v3 plays for FID and CLIP
plays for CLIPScore / CLIP-temp: ``features`` (the penultimate layer, ``D = 64``)
feed the Fréchet distance, ``logits`` the class agreement.  Trained by
``examples/train_digits_classifier.py`` on a seed-fixed 80 % split of scikit-learn's
digits (preprocessed exactly as the default DiT's training data, see
:func:`load_digits_16`); weights ship as ``jaxdq/assets/digits_classifier.safetensors``
(float16, keys ``conv1/kernel`` ...; loaded as float32).

Architecture (NCHW, kernels HWIO, 3x3 "SAME" convs, ReLU):
  conv 1→32, conv 32→32, 2x2 avg-pool, conv 32→64, conv 64→64, 2x2 avg-pool,
  flatten 64·4·4 → dense 64 + ReLU (= features) → dense 10 (= logits).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets")
CLASSIFIER_WEIGHTS = os.path.join(ASSET_DIR, "digits_classifier.safetensors")
FEATURE_DIM = 64
NUM_CLASSES = 10
_CONVS = (("conv1", 1, 32), ("conv2", 32, 32), ("conv3", 32, 64), ("conv4", 64, 64))


def load_digits_16() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits → images ``[1797, 1, 16, 16]`` float32 in [-1, 1], labels ``[1797]`` int32.

    The same preprocessing as ``examples/train_default_dit.py`` (the default DiT's
    training data): 8x8 values / 16, bilinear upsampling to 16x16, clip to [0, 1], ×2 − 1.
    Needs scikit-learn (the data ship inside its wheel).
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = jnp.asarray(d.images, jnp.float32)[:, None] / 16.0
    x = jax.image.resize(x, (x.shape[0], 1, 16, 16), "bilinear")
    return np.asarray(jnp.clip(x, 0, 1) * 2 - 1), d.target.astype(np.int32)


def digits_split(n: int = 1797, seed: int = 0, test_fraction: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Fixed ``(train_idx, test_idx)`` permutation split of ``n`` examples."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def init_params(key: jax.Array) -> dict:
    """He-normal float32 params ``{conv1..conv4: {kernel [3,3,I,O], bias [O]}, fc: .., head: ..}``."""
    keys = jax.random.split(key, len(_CONVS) + 2)
    params = {}
    for k, (name, cin, cout) in zip(keys, _CONVS):
        params[name] = {"kernel": jax.random.normal(k, (3, 3, cin, cout)) * np.sqrt(2.0 / (9 * cin)),
                        "bias": jnp.zeros((cout,))}
    fan_in = _CONVS[-1][2] * 16
    params["fc"] = {"kernel": jax.random.normal(keys[-2], (fan_in, FEATURE_DIM)) * np.sqrt(2.0 / fan_in),
                    "bias": jnp.zeros((FEATURE_DIM,))}
    params["head"] = {"kernel": jax.random.normal(keys[-1], (FEATURE_DIM, NUM_CLASSES)) / np.sqrt(FEATURE_DIM),
                      "bias": jnp.zeros((NUM_CLASSES,))}
    return params


def _conv(p, x):
    y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME", dimension_numbers=("NCHW", "HWIO", "NCHW"))
    return jax.nn.relu(y + p["bias"][:, None, None])


def _pool(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


def apply(params: Mapping, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``images [N, 1, 16, 16]`` in [-1, 1] (clipped) → ``(features [N, 64], logits [N, 10])`` float32."""
    x = jnp.clip(jnp.asarray(images, jnp.float32), -1, 1)
    x = _conv(params["conv2"], _conv(params["conv1"], x))
    x = _conv(params["conv4"], _conv(params["conv3"], _pool(x)))
    x = _pool(x).reshape(x.shape[0], -1)
    feats = jax.nn.relu(x @ params["fc"]["kernel"] + params["fc"]["bias"])
    return feats, feats @ params["head"]["kernel"] + params["head"]["bias"]


_apply_jit = jax.jit(apply)


@dataclasses.dataclass
class FeatureNet:
    """The digits feature network bound to its params; a :class:`jaxdq.metrics.FeatureExtractor`.

    ``features`` / ``logits`` / ``__call__`` take ``[N, 1, 16, 16]`` images in [-1, 1]
    (any array-like; values are clipped) and return NumPy float32, evaluated in
    batches of ``batch_size``.
    """
    params: dict
    batch_size: int = 1024

    def _run(self, images) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images, np.float32)
        if images.ndim != 4 or images.shape[1:] != (1, 16, 16):
            raise ValueError(f"FeatureNet takes images [N, 1, 16, 16], got {images.shape}")
        outs = [_apply_jit(self.params, images[i:i + self.batch_size])
                for i in range(0, images.shape[0], self.batch_size)]
        if not outs:
            return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
        return tuple(np.concatenate([np.asarray(o[j]) for o in outs]) for j in range(2))

    def features(self, images) -> np.ndarray:
        """Penultimate-layer features ``[N, 64]``."""
        return self._run(images)[0]

    def logits(self, images) -> np.ndarray:
        """Class logits ``[N, 10]``."""
        return self._run(images)[1]

    __call__ = features


def save_classifier_weights(params: Mapping, path: str) -> str:
    """Write params as float16 safetensors, keys ``"conv1/kernel"``."""
    from safetensors.numpy import save_file

    flat = {f"{m}/{k}": np.asarray(v, np.float16) for m, sub in params.items() for k, v in sub.items()}
    save_file(flat, path)
    return path


def load_digits_classifier(path: str = CLASSIFIER_WEIGHTS) -> FeatureNet:
    """The shipped digits classifier (float32 params) as a :class:`FeatureNet`."""
    from safetensors.numpy import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"digits classifier weights not found at {path}")
    params: dict = {}
    for key, v in load_file(path).items():
        module, leaf = key.split("/")
        params.setdefault(module, {})[leaf] = jnp.asarray(v, jnp.float32)
    return FeatureNet(params)
