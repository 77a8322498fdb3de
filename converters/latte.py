"""diffusers ``LatteTransformer3DModel`` state dict → :class:`jaxdq.models.latte.Latte` params.

Keys (Latte-1, ``maxin-cn/Latte-1``'s ``transformer/`` folder; the official Vchitect/Latte
``LatteT2V`` uses the same names): ``pos_embed.proj``,
``adaln_single.emb.timestep_embedder.linear_{1,2}``, ``adaln_single.linear``,
``caption_projection.linear_{1,2}``, ``transformer_blocks.N.{scale_shift_table,
attn1.to_q/to_k/to_v/to_out.0, attn2.to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2}``,
``temporal_transformer_blocks.N.{scale_shift_table, attn1.*, ff.*}``,
``scale_shift_table``, ``proj_out``.  The non-persistent ``temp_pos_embed`` and
``pos_embed.pos_embed`` buffers are accepted if present (shape-checked) and recomputed.
Every missing, unexpected or mis-shaped key is named in one :class:`ConversionError`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import numpy as np

from converters.dit import ConversionError, _depth, _patch_embed, build_params
from converters.pixart import (_DIFFUSERS_NAMES, PIXART_HEAD_DIM, adaln_caption_entries, block_entries,
                               final_entries, resolve_config)
from jaxdq.models.latte import LatteConfig, latte_config

TAG = "Latte diffusers"


def _entries(cfg: LatteConfig) -> list:
    d, m = cfg.hidden_size, cfg.mlp_hidden
    e = _patch_embed("pos_embed.proj", cfg) + adaln_caption_entries(cfg, _DIFFUSERS_NAMES)
    for i in range(cfg.depth):
        e += block_entries(f"blocks_{i}/", f"transformer_blocks.{i}.", d, m, d)
        e += block_entries(f"temporal_blocks_{i}/", f"temporal_transformer_blocks.{i}.", d, m, None)
    return e + final_entries(cfg, "scale_shift_table", "proj_out")


def _infer_config(sd: Mapping, num_heads: Optional[int], sample_size: Optional[int],
                  video_length: Optional[int]) -> LatteConfig:
    need = ("pos_embed.proj.weight", "transformer_blocks.0.ff.net.0.proj.weight", "proj_out.weight",
            "caption_projection.linear_1.weight")
    if missing := [k for k in need if k not in sd]:
        raise ConversionError(missing=missing, other=["(needed to infer the config)"], layout=TAG)
    patch, fc1, out, cap = (sd[k].shape for k in need)
    d, c, p = patch[:3]
    problems = []
    if num_heads is None:
        if d % PIXART_HEAD_DIM:
            problems.append(f"num_heads cannot be inferred (hidden size {d} is not a multiple of "
                            f"{PIXART_HEAD_DIM}): pass num_heads=... or config=...")
        num_heads = d // PIXART_HEAD_DIM
    if video_length is None and "temp_pos_embed" in sd:
        video_length = sd["temp_pos_embed"].shape[1]
    if sample_size is None:
        problems.append("sample_size cannot be inferred from the weights: pass sample_size=..., "
                        "config='Latte-1' or the config.json dict")
    if problems:
        raise ConversionError(other=problems, layout=TAG)
    return LatteConfig(sample_size=sample_size, patch_size=p, in_channels=c, out_channels=out[0] // (p * p),
                       hidden_size=d, depth=_depth(sd, "transformer_blocks."), num_heads=num_heads,
                       mlp_ratio=fc1[0] / d, caption_channels=cap[1], video_length=video_length or 16)


def convert_latte(state_dict: Mapping[str, np.ndarray], config: Union[LatteConfig, Mapping, str, None] = None, *,
                  num_heads: Optional[int] = None, sample_size: Optional[int] = None,
                  video_length: Optional[int] = None) -> tuple[LatteConfig, dict]:
    """Map a diffusers ``LatteTransformer3DModel`` state dict onto :class:`~jaxdq.models.latte.Latte` params.

    Args:
      state_dict: ``{name: array}``; a diffusers folder's StateDict carries its ``config.json``.
      config: a :class:`LatteConfig`, ``"Latte-1"``, a diffusers ``config.json`` dict, or None:
        the StateDict's own config, else inferred from the shapes (head width 72 unless
        ``num_heads``; ``sample_size`` must then be given).
    Returns:
      ``(config, params)``, params a nested dict of float32 jax arrays.
    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    if not any(k.startswith("temporal_transformer_blocks.") for k in sd):
        raise ConversionError(other=["no temporal_transformer_blocks.* keys: not a diffusers "
                                     f"LatteTransformer3DModel state dict; first keys: {sorted(sd)[:8]}"], layout=TAG)
    cfg = resolve_config(config, state_dict, "diffusers",
                         lambda: _infer_config(sd, num_heads, sample_size, video_length),
                         latte_config, LatteConfig.from_diffusers, LatteConfig, TAG)
    g = cfg.sample_size // cfg.patch_size
    optional = {"temp_pos_embed": (1, cfg.video_length, cfg.hidden_size),
                "pos_embed.pos_embed": (1, g * g, cfg.hidden_size)}
    return cfg, build_params(sd, _entries(cfg), TAG, optional)


__all__ = ["convert_latte", "ConversionError"]
