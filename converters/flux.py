"""PyTorch FLUX.1 state dict → :class:`jaxdq.models.flux.Flux` params.

Two layouts, told apart by their keys:

* diffusers ``FluxTransformer2DModel`` (``transformer/`` of a FLUX pipeline folder):
  ``x_embedder``, ``context_embedder``, ``time_text_embed.{timestep,guidance,text}_embedder.linear_{1,2}``,
  ``transformer_blocks.N.{norm1.linear, norm1_context.linear, attn.to_q/to_k/to_v/to_out.0,
  attn.add_q_proj/add_k_proj/add_v_proj/to_add_out, attn.norm_q/norm_k/norm_added_q/norm_added_k,
  ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2}``,
  ``single_transformer_blocks.N.{norm.linear, attn.to_q/to_k/to_v, attn.norm_q/norm_k, proj_mlp, proj_out}``,
  ``norm_out.linear``, ``proj_out``;
* Black Forest Labs' original (``flux1-dev.safetensors``; an optional ``model.diffusion_model.``
  prefix is stripped): ``img_in``, ``txt_in``, ``time_in``/``guidance_in``/``vector_in.{in,out}_layer``,
  ``double_blocks.N.{img,txt}_{mod.lin, attn.qkv, attn.proj, attn.norm.{query,key}_norm.scale, mlp.0, mlp.2}``,
  ``single_blocks.N.{modulation.lin, linear1 (q|k|v|mlp), linear2, norm.{query,key}_norm.scale}``,
  ``final_layer.{adaLN_modulation.1 (shift, scale: swapped), linear}``.

torch Linear weights ``[out, in]`` become kernels ``[in, out]``.  Any missing,
unexpected or mis-shaped key raises one :class:`ConversionError` naming all of them.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np

from converters.dit import ConversionError, _Entry, _identity, _linear
from jaxdq.models.dit import FREQ_EMBED_DIM
from jaxdq.models.flux import FluxConfig

BFL_PREFIX = "model.diffusion_model."
# FLUX.1's RoPE split; not recoverable from weight shapes (only their sum, the head dim).
DEFAULT_AXES_DIMS = (16, 56, 56)


def _rms(target: str, src: str, d: int) -> list[_Entry]:
    return [_Entry(f"{target}/scale", (src,), ((d,),), _identity)]


def _rows(start: int, stop: int):
    """Kernel of rows ``[start, stop)`` of a torch ``[out, in]`` weight, or that slice of a bias."""
    def fn(w):
        return w[start:stop].T if w.ndim == 2 else w[start:stop]
    return fn


def _split_linear(target: str, src: str, c_in: int, c_out_total: int, start: int, stop: int) -> list[_Entry]:
    """``target`` gets output rows ``[start, stop)`` of the fused torch Linear ``src``."""
    return [_Entry(f"{target}/kernel", (f"{src}.weight",), ((c_out_total, c_in),), _rows(start, stop)),
            _Entry(f"{target}/bias", (f"{src}.bias",), ((c_out_total,),), _rows(start, stop))]


def _swap_halves(w):
    """BFL's final modulation is (shift, scale); diffusers' AdaLayerNormContinuous (scale, shift)."""
    h = w.shape[0] // 2
    w = np.concatenate([w[h:], w[:h]], axis=0)
    return w.T if w.ndim == 2 else w


def _embedders(cfg: FluxConfig, names: Mapping[str, tuple[str, str]]) -> list[_Entry]:
    """``time_text_embed/{name}/linear_{1,2}`` from ``names[name] = (src_1, src_2)``."""
    d = cfg.hidden_size
    width = {"timestep_embedder": FREQ_EMBED_DIM, "guidance_embedder": FREQ_EMBED_DIM,
             "text_embedder": cfg.pooled_projection_dim}
    e = []
    for name, (s1, s2) in names.items():
        e += (_linear(f"time_text_embed/{name}/linear_1", s1, width[name], d)
              + _linear(f"time_text_embed/{name}/linear_2", s2, d, d))
    return e


def _diffusers_entries(cfg: FluxConfig) -> list[_Entry]:
    d, m, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.attention_head_dim
    e = (_linear("x_embedder", "x_embedder", cfg.in_channels, d)
         + _linear("context_embedder", "context_embedder", cfg.joint_attention_dim, d))
    names = {"timestep_embedder": None, "text_embedder": None}
    if cfg.guidance_embeds:
        names["guidance_embedder"] = None
    e += _embedders(cfg, {n: (f"time_text_embed.{n}.linear_1", f"time_text_embed.{n}.linear_2") for n in names})
    for i in range(cfg.num_layers):
        b, s = f"transformer_blocks_{i}/", f"transformer_blocks.{i}."
        e += _linear(b + "norm1/linear", s + "norm1.linear", d, 6 * d)
        e += _linear(b + "norm1_context/linear", s + "norm1_context.linear", d, 6 * d)
        for n in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            e += _linear(b + "attn/" + n, s + "attn." + n, d, d)
        e += _linear(b + "attn/to_out", s + "attn.to_out.0", d, d)
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            e += _rms(b + "attn/" + n, s + f"attn.{n}.weight", hd)
        for ff in ("ff", "ff_context"):
            e += (_linear(f"{b}{ff}/fc1", f"{s}{ff}.net.0.proj", d, m)
                  + _linear(f"{b}{ff}/fc2", f"{s}{ff}.net.2", m, d))
    for j in range(cfg.num_single_layers):
        b, s = f"single_transformer_blocks_{j}/", f"single_transformer_blocks.{j}."
        e += _linear(b + "norm/linear", s + "norm.linear", d, 3 * d)
        for n in ("to_q", "to_k", "to_v"):
            e += _linear(b + "attn/" + n, s + "attn." + n, d, d)
        for n in ("norm_q", "norm_k"):
            e += _rms(b + "attn/" + n, s + f"attn.{n}.weight", hd)
        e += _linear(b + "proj_mlp", s + "proj_mlp", d, m) + _linear(b + "proj_out", s + "proj_out", d + m, d)
    return e + _linear("norm_out/linear", "norm_out.linear", d, 2 * d) + _linear("proj_out", "proj_out", d, cfg.out_dim)


def _bfl_entries(cfg: FluxConfig) -> list[_Entry]:
    d, m, hd = cfg.hidden_size, cfg.mlp_hidden, cfg.attention_head_dim
    e = (_linear("x_embedder", "img_in", cfg.in_channels, d)
         + _linear("context_embedder", "txt_in", cfg.joint_attention_dim, d))
    names = {"timestep_embedder": "time_in", "text_embedder": "vector_in"}
    if cfg.guidance_embeds:
        names["guidance_embedder"] = "guidance_in"
    e += _embedders(cfg, {n: (f"{s}.in_layer", f"{s}.out_layer") for n, s in names.items()})
    for i in range(cfg.num_layers):
        b, s = f"transformer_blocks_{i}/", f"double_blocks.{i}."
        for stream, norm, qkv_names, out, norms, ff in (
                ("img", "norm1", ("to_q", "to_k", "to_v"), "to_out", ("norm_q", "norm_k"), "ff"),
                ("txt", "norm1_context", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out",
                 ("norm_added_q", "norm_added_k"), "ff_context")):
            e += _linear(f"{b}{norm}/linear", f"{s}{stream}_mod.lin", d, 6 * d)
            for k, n in enumerate(qkv_names):
                e += _split_linear(f"{b}attn/{n}", f"{s}{stream}_attn.qkv", d, 3 * d, k * d, (k + 1) * d)
            e += _linear(f"{b}attn/{out}", f"{s}{stream}_attn.proj", d, d)
            e += (_rms(f"{b}attn/{norms[0]}", f"{s}{stream}_attn.norm.query_norm.scale", hd)
                  + _rms(f"{b}attn/{norms[1]}", f"{s}{stream}_attn.norm.key_norm.scale", hd))
            e += (_linear(f"{b}{ff}/fc1", f"{s}{stream}_mlp.0", d, m)
                  + _linear(f"{b}{ff}/fc2", f"{s}{stream}_mlp.2", m, d))
    for j in range(cfg.num_single_layers):
        b, s = f"single_transformer_blocks_{j}/", f"single_blocks.{j}."
        e += _linear(b + "norm/linear", s + "modulation.lin", d, 3 * d)
        for k, n in enumerate(("to_q", "to_k", "to_v")):
            e += _split_linear(f"{b}attn/{n}", s + "linear1", d, 3 * d + m, k * d, (k + 1) * d)
        e += _split_linear(b + "proj_mlp", s + "linear1", d, 3 * d + m, 3 * d, 3 * d + m)
        e += (_rms(b + "attn/norm_q", s + "norm.query_norm.scale", hd)
              + _rms(b + "attn/norm_k", s + "norm.key_norm.scale", hd))
        e += _linear(b + "proj_out", s + "linear2", d + m, d)
    src = "final_layer.adaLN_modulation.1"
    e += [_Entry("norm_out/linear/kernel", (f"{src}.weight",), ((2 * d, d),), _swap_halves),
          _Entry("norm_out/linear/bias", (f"{src}.bias",), ((2 * d,),), _swap_halves)]
    return e + _linear("proj_out", "final_layer.linear", d, cfg.out_dim)


# ---------------------------------------------------------------------------------------------
# layout and config inference

# (x_embedder, context_embedder, text_embedder.linear_1, a q-norm scale, proj_out, guidance key, double, single)
_KEYS = {
    "diffusers": ("x_embedder.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
                  "transformer_blocks.0.attn.norm_q.weight", "proj_out.weight",
                  "time_text_embed.guidance_embedder.linear_1.weight", "transformer_blocks.",
                  "single_transformer_blocks."),
    "bfl": ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight",
            "double_blocks.0.img_attn.norm.query_norm.scale", "final_layer.linear.weight",
            "guidance_in.in_layer.weight", "double_blocks.", "single_blocks."),
}


def detect_flux_layout(state_dict: Mapping[str, np.ndarray]) -> str:
    """``"diffusers"`` (FluxTransformer2DModel) or ``"bfl"`` (Black Forest Labs' flux1-*.safetensors)."""
    if any(k.startswith(("single_transformer_blocks.", "time_text_embed.", "x_embedder.")) for k in state_dict):
        return "diffusers"
    if any(k.startswith(("double_blocks.", "single_blocks.", "img_in.", BFL_PREFIX)) for k in state_dict):
        return "bfl"
    raise ConversionError(other=[f"unrecognized layout (neither diffusers FLUX nor BFL FLUX); "
                                 f"first keys: {sorted(state_dict)[:8]}"], layout="FLUX")


def _count(sd: Mapping, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = [int(mt.group(1)) for k in sd if (mt := pat.match(k))]
    return max(idx) + 1 if idx else 0


def _infer_config(sd: Mapping, layout: str, dconf: Optional[Mapping]) -> FluxConfig:
    x_k, c_k, p_k, q_k, o_k, g_k, dbl, sgl = _KEYS[layout]
    name = f"FLUX ({layout})"
    if missing := [k for k in (x_k, c_k, p_k, q_k, o_k) if k not in sd]:
        raise ConversionError(missing=missing, other=["(needed to infer the config)"], layout=name)
    d, c_in = sd[x_k].shape
    hd = sd[q_k].shape[0]
    dconf = dict(dconf or {})
    problems = []
    if d % hd:
        problems.append(f"hidden size {d} is not a multiple of the head dim {hd}")
    p = int(dconf.get("patch_size", 1))
    out_ch, rem = divmod(sd[o_k].shape[0], p * p)
    if rem:
        problems.append(f"proj_out has {sd[o_k].shape[0]} outputs, not a multiple of patch_size²={p * p}")
    axes = tuple(dconf.get("axes_dims_rope", DEFAULT_AXES_DIMS if hd == sum(DEFAULT_AXES_DIMS) else ()))
    if not axes:
        problems.append(f"axes_dims_rope cannot be inferred for head dim {hd}: pass a FluxConfig or a config.json")
    ff_key = ("transformer_blocks.0.ff.net.0.proj.weight" if layout == "diffusers"
              else "double_blocks.0.img_mlp.0.weight")
    fields = dict(patch_size=p, in_channels=c_in, out_channels=out_ch, num_layers=_count(sd, dbl),
                  num_single_layers=_count(sd, sgl), attention_head_dim=hd, num_attention_heads=d // hd,
                  joint_attention_dim=sd[c_k].shape[1], pooled_projection_dim=sd[p_k].shape[1],
                  guidance_embeds=g_k in sd, axes_dims_rope=axes,
                  mlp_ratio=sd[ff_key].shape[0] / d if ff_key in sd else 4.0)
    for k, v in fields.items():
        if k in dconf and k not in ("patch_size", "axes_dims_rope"):
            want = dconf[k] if not (k == "out_channels" and dconf[k] is None) else c_in
            if want != v:
                problems.append(f"config.json {k}={dconf[k]!r}, the weights give {v!r}")
    if problems:
        raise ConversionError(other=problems, layout=name)
    try:
        return FluxConfig(**fields)
    except ValueError as e:  # e.g. a config.json axes_dims_rope that does not sum to the head dim
        raise ConversionError(other=[str(e)], layout=name) from None


# ---------------------------------------------------------------------------------------------


def convert_flux(state_dict: Mapping[str, np.ndarray],
                 config: Union[FluxConfig, Mapping, None] = None, *, dtype=jnp.float32) -> tuple[FluxConfig, dict]:
    """Map a diffusers or BFL FLUX.1 state dict onto :class:`~jaxdq.models.flux.Flux` params.

    Args:
      state_dict: ``{name: array}`` (e.g. from :func:`converters.state_dict.load_state_dict`;
        a diffusers folder's :class:`StateDict` carries its ``config.json``).
      config: a :class:`FluxConfig` (every shape is checked against it), a diffusers
        ``config.json`` dict, or None: inferred from the shapes (``axes_dims_rope``
        defaults to FLUX.1's (16, 56, 56) when the head dim is 128).
      dtype: of the params (FLUX.1 has 11.9 B: 47.6 GB in float32, 23.8 GB in bfloat16).
    Returns:
      ``(config, params)``, params a nested dict of ``dtype`` jax arrays.
    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    sd = {(k[len(BFL_PREFIX):] if k.startswith(BFL_PREFIX) else k): np.asarray(v) for k, v in state_dict.items()}
    layout = detect_flux_layout(sd)
    if isinstance(config, FluxConfig):
        cfg = config
    else:
        cfg = _infer_config(sd, layout, config if config is not None else getattr(state_dict, "config", None))

    entries = _diffusers_entries(cfg) if layout == "diffusers" else _bfl_entries(cfg)
    expected = {k: s for e in entries for k, s in zip(e.sources, e.shapes)}
    missing = [k for k in expected if k not in sd]
    mismatched = [(k, s, sd[k].shape) for k, s in expected.items() if k in sd and tuple(sd[k].shape) != tuple(s)]
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected or mismatched:
        raise ConversionError(missing, unexpected, mismatched, layout=f"FLUX ({layout})")

    params: dict = {}
    for e in entries:
        node = params
        *parents, leaf = e.target.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(e.fn(*(sd[k] for k in e.sources)), dtype)
    return cfg, params
