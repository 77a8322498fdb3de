"""diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` state dict → :class:`jaxdq.models.unet.UNet` params.

Expected keys are exactly the diffusers ``state_dict`` keys of the model the config
describes (``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight``, ...);
each maps to the param path with ``name.<i>`` → ``name_<i>``
(:func:`jaxdq.models.unet_blocks.torch_key` is the inverse).  Layouts:

* Linear ``weight [out, in]`` → ``kernel [in, out]`` (a 1x1-conv ``[out, in, 1, 1]`` is accepted too);
* Conv2d ``weight [out, in, kh, kw]`` → ``kernel [kh, kw, in, out]``;
* GroupNorm / LayerNorm ``weight`` → ``scale``; biases unchanged;
* the class embedding ``class_embedding.weight [num_class_embeds, D]`` → ``class_embedding/embedding``
  (same layout).

Checkpoints saved before diffusers 0.14 name the UNet2DModel / VAE attention Linears
``query``/``key``/``value``/``proj_attn``; they are renamed to ``to_q``/``to_k``/``to_v``/
``to_out.0`` first (as diffusers' loader does).  Every missing, unexpected or
mis-shaped key is reported in one :class:`ConversionError`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np

from converters.dit import ConversionError
from jaxdq.models.unet import UNetConfig, unet_param_shapes
from jaxdq.models.unet_blocks import flat_shapes, torch_key

_LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def rename_legacy_attention(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``*.attentions.<i>.{query,key,value,proj_attn}.*`` → ``to_q/to_k/to_v/to_out.0``."""
    out = {}
    for k, v in sd.items():
        m = _LEGACY_RE.match(k)
        out[f"{m.group(1)}.{_LEGACY_ATTN[m.group(2)]}.{m.group(3)}" if m else k] = v
    return out


def _torch_key(path: str) -> str:
    """:func:`torch_key`, plus the class embedding table (Flax ``nn.Embed``'s leaf is ``embedding``)."""
    if path == "class_embedding/embedding":
        return "class_embedding.weight"
    return torch_key(path)


def _error(missing, unexpected, mismatched, other, model: str) -> ConversionError:
    err = ConversionError(missing, unexpected, mismatched, other)
    # ConversionError's message names DiT; say which model instead
    err.args = (str(err).replace("DiT state dict", f"{model} state dict", 1),)
    return err


def _torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        kh, kw, i, o = shape
        return (o, i, kh, kw)
    if leaf == "kernel" and len(shape) == 2:
        return shape[::-1]
    return shape


def _to_flax(w: np.ndarray, shape: tuple[int, ...], leaf: str) -> np.ndarray:
    if leaf == "kernel" and len(shape) == 4:
        return w.transpose(2, 3, 1, 0)
    if leaf == "kernel" and len(shape) == 2:
        return w.reshape(w.shape[0], w.shape[1]).T  # [out, in] or a 1x1 conv [out, in, 1, 1]
    return w


def expected_keys(shapes: Mapping) -> dict[str, tuple[int, ...]]:
    """``{diffusers key: torch shape}`` the converter expects for a params tree of these shapes
    (e.g. ``expected_keys(unet_param_shapes(cfg))``)."""
    return {_torch_key(p): _torch_shape(s, p.rsplit("/", 1)[-1]) for p, s in flat_shapes(shapes).items()}


def convert_by_shapes(state_dict: Mapping[str, np.ndarray], shapes: Mapping, model: str) -> dict:
    """Fill a params tree of the given ``ShapeDtypeStruct`` shapes from a diffusers state dict.

    Returns:
      the nested params dict, float32 jax arrays.
    Raises:
      ConversionError: every missing, unexpected and mis-shaped key.
    """
    sd = rename_legacy_attention({k: np.asarray(v) for k, v in state_dict.items()})
    targets = {}  # torch key -> (flax path, flax shape, torch shape)
    for path, shape in flat_shapes(shapes).items():
        leaf = path.rsplit("/", 1)[-1]
        targets[_torch_key(path)] = (path, shape, _torch_shape(shape, leaf))
    missing = [k for k in targets if k not in sd]
    unexpected = sorted(set(sd) - set(targets))
    mismatched = []
    for k, (path, shape, tshape) in targets.items():
        if k not in sd:
            continue
        got = tuple(sd[k].shape)
        ok = got == tshape or (len(shape) == 2 and path.endswith("kernel") and got == tshape + (1, 1))
        if not ok:
            mismatched.append((k, tshape, got))
    if missing or unexpected or mismatched:
        raise _error(missing, unexpected, mismatched, [], model)

    params: dict = {}
    for k, (path, shape, _) in targets.items():
        node = params
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(_to_flax(sd[k], shape, leaf), jnp.float32)
    return params


def convert_unet(state_dict: Mapping[str, np.ndarray],
                 config: Union[UNetConfig, Mapping, None] = None) -> tuple[UNetConfig, dict]:
    """Map a diffusers UNet2DModel / UNet2DConditionModel state dict onto :class:`UNet` params.

    Args:
      state_dict: ``{key: array}``, e.g. :func:`converters.load_state_dict` of a diffusers
        ``unet/`` folder (whose ``config.json`` it carries).
      config: a :class:`UNetConfig`, a diffusers config.json dict, or None for the state
        dict's own ``config`` (head counts and block types cannot be read off the shapes).
    Returns:
      ``(config, params)``.
    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    cfg = _resolve_config(state_dict, config)
    return cfg, convert_by_shapes(state_dict, unet_param_shapes(cfg), cfg.model_type)


def _resolve_config(state_dict, config: Union[UNetConfig, Mapping, None]) -> UNetConfig:
    if isinstance(config, UNetConfig):
        return config
    dconf: Optional[Mapping] = config if config is not None else getattr(state_dict, "config", None)
    if dconf is None:
        raise ConversionError(other=["a UNet config is needed (UNetConfig, a diffusers config.json dict, "
                                     "or a diffusers folder with config.json): block types and head counts "
                                     "are not in the weights"])
    try:
        return UNetConfig.from_diffusers(dconf)
    except ValueError as e:
        raise ConversionError(other=[str(e)]) from e
