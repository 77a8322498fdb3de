"""PyTorch PixArt-α/Σ state dict → :class:`jaxdq.models.pixart.PixArt` params.

Two layouts, told apart by their keys:

* diffusers ``PixArtTransformer2DModel`` (and the older ``Transformer2DModel`` PixArt
  folders, same keys): ``pos_embed.proj``, ``adaln_single.emb.timestep_embedder.linear_{1,2}``,
  ``adaln_single.emb.{resolution,aspect_ratio}_embedder.linear_{1,2}`` (α-1024 only),
  ``adaln_single.linear``, ``caption_projection.linear_{1,2}``,
  ``transformer_blocks.N.{scale_shift_table, attn1.to_q/to_k/to_v/to_out.0,
  attn2.to_q/to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2}``, ``scale_shift_table``, ``proj_out``;
* original PixArt-alpha / PixArt-sigma (``PixArt``, ``PixArtMS``): ``x_embedder.proj``,
  ``t_embedder.mlp.{0,2}``, ``csize_embedder.mlp.{0,2}``, ``ar_embedder.mlp.{0,2}`` (MS
  with micro-conditions), ``t_block.1``, ``y_embedder.y_proj.{fc1,fc2}``,
  ``blocks.N.{scale_shift_table, attn.qkv, attn.proj, cross_attn.q_linear,
  cross_attn.kv_linear, cross_attn.proj, mlp.fc1, mlp.fc2}``,
  ``final_layer.{linear, scale_shift_table}``.  Optional extras: ``pos_embed`` (fixed
  buffer of the non-MS models, checked against the computed one) and
  ``y_embedder.y_embedding`` (the learned null caption used for CFG by the original
  sampler; shape-checked and dropped: pass it as the uncond ``encoder_hidden_states``
  if you want the original CFG).

torch ``[out, in]`` weights become ``[in, out]`` kernels; diffusers' q/k/v (k/v for
cross-attention) are concatenated into ``attn1/qkv`` (``attn2/kv``).  Every missing,
unexpected or mis-shaped key is named in one :class:`ConversionError`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional, Union

import numpy as np

from converters.dit import ConversionError, _depth, _Entry, _identity, _linear, _patch_embed, build_params
from jaxdq.models.dit import FREQ_EMBED_DIM
from jaxdq.models.pixart import PixArtConfig, _default_scale, pixart_config, pos_embed_2d_scaled

PIXART_HEAD_DIM = 72  # head width of every released PixArt / Latte model


def _fused(target: str, srcs: Sequence[str], c_in: int, c_out: int) -> list[_Entry]:
    """One ``[c_in, len(srcs)·c_out]`` kernel from torch Linears ``srcs`` (outputs concatenated)."""
    return [_Entry(f"{target}/kernel", tuple(s + ".weight" for s in srcs), ((c_out, c_in),) * len(srcs),
                   lambda *w: np.concatenate(w, axis=0).T),
            _Entry(f"{target}/bias", tuple(s + ".bias" for s in srcs), ((c_out,),) * len(srcs),
                   lambda *b: np.concatenate(b, axis=0))]


def _table(target: str, src: str, rows: int, d: int) -> _Entry:
    return _Entry(target, (src,), ((rows, d),), _identity)


def _mlp2(target: str, src1: str, src2: str, c_in: int, c_hid: int, c_out: int,
          names: tuple[str, str] = ("linear_1", "linear_2")) -> list[_Entry]:
    return (_linear(f"{target}/{names[0]}", src1, c_in, c_hid)
            + _linear(f"{target}/{names[1]}", src2, c_hid, c_out))


def block_entries(b: str, s: str, d: int, m: int, ctx: Optional[int], self_attn: str = "diffusers") -> list[_Entry]:
    """Entries of one diffusers ``BasicTransformerBlock`` (ada_norm_single) at key prefix ``s``
    onto :class:`~jaxdq.models.pixart.PixArtBlock` path ``b``; ``ctx`` None: no cross-attention."""
    e = [_table(b + "scale_shift_table", s + "scale_shift_table", 6, d)]
    e += _fused(b + "attn1/qkv", [f"{s}attn1.to_{n}" for n in "qkv"], d, d)
    e += _linear(b + "attn1/proj", s + "attn1.to_out.0", d, d)
    if ctx is not None:
        e += _linear(b + "attn2/q", s + "attn2.to_q", d, d)
        e += _fused(b + "attn2/kv", [s + "attn2.to_k", s + "attn2.to_v"], ctx, d)
        e += _linear(b + "attn2/proj", s + "attn2.to_out.0", d, d)
    return e + _linear(b + "ff/fc1", s + "ff.net.0.proj", d, m) + _linear(b + "ff/fc2", s + "ff.net.2", m, d)


def adaln_caption_entries(cfg, names: Mapping[str, str]) -> list[_Entry]:
    """adaLN-single and caption-projection entries; ``names`` maps our module → source prefix."""
    d = cfg.hidden_size
    e = _mlp2("adaln_single/t_embedder", names["t1"], names["t2"], FREQ_EMBED_DIM, d, d)
    if getattr(cfg, "use_additional_conditions", False):
        e += _mlp2("adaln_single/resolution_embedder", names["r1"], names["r2"], FREQ_EMBED_DIM, d // 3, d // 3)
        e += _mlp2("adaln_single/aspect_ratio_embedder", names["a1"], names["a2"], FREQ_EMBED_DIM, d // 3, d // 3)
    e += _linear("adaln_single/linear", names["ada"], d, 6 * d)
    if cfg.caption_channels is not None:
        e += _mlp2("caption_projection", names["c1"], names["c2"], cfg.caption_channels, d, d, ("fc1", "fc2"))
    return e


_DIFFUSERS_NAMES = {
    "t1": "adaln_single.emb.timestep_embedder.linear_1", "t2": "adaln_single.emb.timestep_embedder.linear_2",
    "r1": "adaln_single.emb.resolution_embedder.linear_1", "r2": "adaln_single.emb.resolution_embedder.linear_2",
    "a1": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "a2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
    "ada": "adaln_single.linear", "c1": "caption_projection.linear_1", "c2": "caption_projection.linear_2"}
_ORIGINAL_NAMES = {
    "t1": "t_embedder.mlp.0", "t2": "t_embedder.mlp.2", "r1": "csize_embedder.mlp.0", "r2": "csize_embedder.mlp.2",
    "a1": "ar_embedder.mlp.0", "a2": "ar_embedder.mlp.2", "ada": "t_block.1",
    "c1": "y_embedder.y_proj.fc1", "c2": "y_embedder.y_proj.fc2"}


def final_entries(cfg, table: str, lin: str) -> list[_Entry]:
    d = cfg.hidden_size
    return [_table("final_layer/scale_shift_table", table, 2, d)] + _linear(
        "final_layer/linear", lin, d, cfg.patch_size ** 2 * cfg.out_channels)


def _diffusers_entries(cfg: PixArtConfig) -> list[_Entry]:
    e = _patch_embed("pos_embed.proj", cfg) + adaln_caption_entries(cfg, _DIFFUSERS_NAMES)
    for i in range(cfg.depth):
        e += block_entries(f"blocks_{i}/", f"transformer_blocks.{i}.", cfg.hidden_size, cfg.mlp_hidden,
                           cfg.context_dim)
    return e + final_entries(cfg, "scale_shift_table", "proj_out")


def _original_entries(cfg: PixArtConfig) -> list[_Entry]:
    d, m, ctx = cfg.hidden_size, cfg.mlp_hidden, cfg.context_dim
    e = _patch_embed("x_embedder.proj", cfg) + adaln_caption_entries(cfg, _ORIGINAL_NAMES)
    for i in range(cfg.depth):
        b, s = f"blocks_{i}/", f"blocks.{i}."
        e += [_table(b + "scale_shift_table", s + "scale_shift_table", 6, d)]
        e += _linear(b + "attn1/qkv", s + "attn.qkv", d, 3 * d) + _linear(b + "attn1/proj", s + "attn.proj", d, d)
        e += (_linear(b + "attn2/q", s + "cross_attn.q_linear", d, d)
              + _linear(b + "attn2/kv", s + "cross_attn.kv_linear", ctx, 2 * d)
              + _linear(b + "attn2/proj", s + "cross_attn.proj", d, d))
        e += _linear(b + "ff/fc1", s + "mlp.fc1", d, m) + _linear(b + "ff/fc2", s + "mlp.fc2", m, d)
    return e + final_entries(cfg, "final_layer.scale_shift_table", "final_layer.linear")


# ---------------------------------------------------------------------------------------------
# layout and config


def detect_layout(sd: Mapping[str, np.ndarray]) -> str:
    """``"diffusers"`` (PixArtTransformer2DModel) or ``"original"`` (PixArt-alpha/sigma repos)."""
    if any(k.startswith(("transformer_blocks.", "adaln_single.", "pos_embed.proj.")) for k in sd):
        return "diffusers"
    if any(k.startswith(("blocks.", "x_embedder.", "t_block.", "final_layer.")) for k in sd):
        return "original"
    raise ConversionError(other=[f"unrecognized layout (neither original PixArt nor diffusers); "
                                 f"first keys: {sorted(sd)[:8]}"], layout="PixArt")


_SHAPE_KEYS = {  # patch conv, block-0 fc1, final linear, block-0 cross-attn kv input, caption fc1
    "diffusers": ("pos_embed.proj.weight", "transformer_blocks.0.ff.net.0.proj.weight", "proj_out.weight",
                  "transformer_blocks.0.attn2.to_k.weight", "caption_projection.linear_1.weight",
                  "adaln_single.emb.resolution_embedder.linear_1.weight", "transformer_blocks."),
    "original": ("x_embedder.proj.weight", "blocks.0.mlp.fc1.weight", "final_layer.linear.weight",
                 "blocks.0.cross_attn.kv_linear.weight", "y_embedder.y_proj.fc1.weight",
                 "csize_embedder.mlp.0.weight", "blocks."),
}


def _infer_config(sd: Mapping, layout: str, num_heads: Optional[int], sample_size: Optional[int],
                  interpolation_scale: Optional[float]) -> PixArtConfig:
    patch, fc1, out, kv, cap, res, prefix = _SHAPE_KEYS[layout]
    tag = f"PixArt {layout}"
    if missing := [k for k in (patch, fc1, out, kv) if k not in sd]:
        raise ConversionError(missing=missing, other=["(needed to infer the config)"], layout=tag)
    d, c, p = sd[patch].shape[:3]
    out_ch, rem = divmod(sd[out].shape[0], p * p)
    problems = [f"{out} has {sd[out].shape[0]} outputs, not a multiple of p·p={p * p}"] if rem else []
    caption = sd[cap].shape[1] if cap in sd else None
    ctx = sd[kv].shape[1]
    if num_heads is None:
        if d % PIXART_HEAD_DIM:
            problems.append(f"num_heads cannot be inferred (hidden size {d} is not a multiple of PixArt's head "
                            f"width {PIXART_HEAD_DIM}): pass num_heads=... or config=...")
        num_heads = d // PIXART_HEAD_DIM
    if sample_size is None and layout == "original" and "pos_embed" in sd:
        sample_size = round(sd["pos_embed"].shape[1] ** 0.5) * p
    if sample_size is None:
        problems.append("sample_size (latent size the model was trained at) cannot be inferred from the weights: "
                        "pass sample_size=..., a named config (config='PixArt-sigma-1024') or the config.json dict")
    if problems:
        raise ConversionError(other=problems, layout=tag)
    return PixArtConfig(sample_size=sample_size, patch_size=p, in_channels=c, out_channels=out_ch, hidden_size=d,
                        depth=_depth(sd, prefix), num_heads=num_heads, mlp_ratio=sd[fc1].shape[0] / d,
                        caption_channels=caption, cross_attention_dim=None if caption else ctx,
                        interpolation_scale=_default_scale(interpolation_scale, sample_size),
                        use_additional_conditions=res in sd)


def resolve_config(config, sd, layout: str, infer, named, from_diffusers, config_type, tag: str):
    """Config from an instance, a name, a diffusers config.json dict, the StateDict's own
    ``config``, or the weights' shapes (``infer()``), in that order."""
    if isinstance(config, config_type):
        return config
    if isinstance(config, str):
        try:
            return named(config)
        except ValueError as err:
            raise ConversionError(other=[str(err)], layout=tag) from None
    dconf = config if config is not None else getattr(sd, "config", None)
    if dconf is not None:
        try:
            return from_diffusers(dconf)
        except (ValueError, TypeError) as err:
            raise ConversionError(other=[str(err)], layout=tag) from None
    return infer()


def convert_pixart(state_dict: Mapping[str, np.ndarray],
                   config: Union[PixArtConfig, Mapping, str, None] = None, *,
                   num_heads: Optional[int] = None, sample_size: Optional[int] = None,
                   interpolation_scale: Optional[float] = None) -> tuple[PixArtConfig, dict]:
    """Map a diffusers or original PixArt-α/Σ state dict onto :class:`~jaxdq.models.pixart.PixArt` params.

    Args:
      state_dict: ``{name: array}`` (e.g. :func:`converters.load_state_dict`; a diffusers
        folder's StateDict carries its ``config.json``).
      config: a :class:`PixArtConfig`, a named config (``"PixArt-sigma-1024"``), a diffusers
        ``config.json`` dict, or None: the StateDict's own config, else inferred from the
        shapes (head width 72 unless ``num_heads``; ``sample_size`` must then be given
        unless an original ``pos_embed`` buffer tells it).
    Returns:
      ``(config, params)``, params a nested dict of float32 jax arrays.
    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    layout = detect_layout(sd)
    tag = f"PixArt {layout}"
    cfg = resolve_config(config, state_dict, layout,
                         lambda: _infer_config(sd, layout, num_heads, sample_size, interpolation_scale),
                         pixart_config, PixArtConfig.from_diffusers, PixArtConfig, tag)
    entries = _diffusers_entries(cfg) if layout == "diffusers" else _original_entries(cfg)
    optional, other = {}, []
    g = cfg.sample_size // cfg.patch_size
    buffer = "pos_embed" if layout == "original" else "pos_embed.pos_embed"
    if buffer in sd:
        optional[buffer] = (1, g * g, cfg.hidden_size)
        if tuple(sd[buffer].shape) == optional[buffer]:
            ref = pos_embed_2d_scaled(cfg.hidden_size, g, g, g, cfg.pe_scale)
            err = float(np.max(np.abs(sd[buffer][0] - ref)))
            if err > 1e-4:
                other.append(f"{buffer} is not the 2D sin-cos embedding of sample_size={cfg.sample_size}, "
                             f"interpolation scale {cfg.pe_scale} (max |Δ| = {err:.3g})")
    if layout == "original" and "y_embedder.y_embedding" in sd and cfg.caption_channels is not None:
        optional["y_embedder.y_embedding"] = (sd["y_embedder.y_embedding"].shape[0], cfg.caption_channels)
    return cfg, build_params(sd, entries, tag, optional, other)


__all__ = ["convert_pixart", "detect_layout", "ConversionError"]
