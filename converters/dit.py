"""PyTorch DiT state dict → :class:`jaxdq.models.dit.DiT` params.

Two layouts, told apart by their keys:

* original facebookresearch/DiT: ``x_embedder.proj``, ``t_embedder.mlp.{0,2}``,
  ``y_embedder.embedding_table``, ``blocks.N.{attn.qkv, attn.proj, mlp.fc1, mlp.fc2,
  adaLN_modulation.1}``, ``final_layer.{adaLN_modulation.1, linear}``, ``pos_embed``
  (a fixed buffer: checked against the computed one, optional);
* diffusers ``DiTTransformer2DModel``: ``pos_embed.proj``, ``transformer_blocks.N.{attn1.to_q/
  to_k/to_v/to_out.0, ff.net.0.proj, ff.net.2, norm1.linear, norm1.emb.*}``,
  ``proj_out_1``, ``proj_out_2``.

torch Linear weights ``[out, in]`` become kernels ``[in, out]``; diffusers' separate
q/k/v are concatenated into the one ``attn/qkv`` kernel; the patch conv weight
``[D, C, p, p]`` becomes a ``[C·p·p, D]`` kernel in :func:`jaxdq.models.dit.patchify`'s
order.  Any missing, unexpected or mis-shaped key raises one :class:`ConversionError`
naming all of them.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np

from jaxdq.models.dit import DIT_CONFIGS, FREQ_EMBED_DIM, DiTConfig, pos_embed_2d

# diffusers defaults the released DiT configs rely on (they set neither key).
DIFFUSERS_NORM_EPS = 1e-5
DIFFUSERS_SAMPLE_SIZE = 32


class ConversionError(ValueError):
    """State dict does not map onto the model; ``missing``, ``unexpected`` (key lists) and
    ``mismatched`` (``(key, expected shape, got shape)``) and ``other`` (messages)."""

    def __init__(self, missing=(), unexpected=(), mismatched=(), other=(), layout: str = ""):
        self.missing, self.unexpected = list(missing), list(unexpected)
        self.mismatched, self.other = list(mismatched), list(other)
        lines = [f"cannot convert {layout + ' ' if layout else ''}DiT state dict:"]
        lines += [f"  missing key {k}" for k in self.missing]
        lines += [f"  unexpected key {k}" for k in self.unexpected]
        lines += [f"  mis-shaped key {k}: expected {tuple(e)}, got {tuple(g)}" for k, e, g in self.mismatched]
        lines += [f"  {m}" for m in self.other]
        super().__init__("\n".join(lines))


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One Flax leaf ``target`` made by ``fn`` from state-dict ``sources`` of ``shapes``."""

    target: str
    sources: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    fn: Callable[..., np.ndarray]


def _transpose(w):
    return w.T


def _identity(b):
    return b


def _linear(target: str, src: str, c_in: int, c_out: int) -> list[_Entry]:
    return [_Entry(f"{target}/kernel", (f"{src}.weight",), ((c_out, c_in),), _transpose),
            _Entry(f"{target}/bias", (f"{src}.bias",), ((c_out,),), _identity)]


def _patch_embed(src: str, cfg: DiTConfig) -> list[_Entry]:
    d, c, p = cfg.hidden_size, cfg.in_channels, cfg.patch_size
    return [_Entry("x_embedder/proj/kernel", (f"{src}.weight",), ((d, c, p, p),), lambda w: w.reshape(d, -1).T),
            _Entry("x_embedder/proj/bias", (f"{src}.bias",), ((d,),), _identity)]


def _embedders(target: str, t1: str, t2: str, table: str, cfg: DiTConfig) -> list[_Entry]:
    d = cfg.hidden_size
    return (_linear(f"{target}t_embedder/linear_1", t1, FREQ_EMBED_DIM, d)
            + _linear(f"{target}t_embedder/linear_2", t2, d, d)
            + [_Entry(f"{target}y_embedder/embedding_table", (table,), ((cfg.num_label_rows, d),), _identity)])


def _head(cfg: DiTConfig, ada: str, lin: str) -> list[_Entry]:
    d = cfg.hidden_size
    return (_linear("final_layer/adaLN_modulation", ada, d, 2 * d)
            + _linear("final_layer/linear", lin, d, cfg.patch_size ** 2 * cfg.out_channels))


def _original_entries(cfg: DiTConfig) -> list[_Entry]:
    d, m = cfg.hidden_size, cfg.mlp_hidden
    e = _patch_embed("x_embedder.proj", cfg)
    e += _embedders("", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.embedding_table.weight", cfg)
    for i in range(cfg.depth):
        b, s = f"blocks_{i}/", f"blocks.{i}."
        e += (_linear(b + "attn/qkv", s + "attn.qkv", d, 3 * d) + _linear(b + "attn/proj", s + "attn.proj", d, d)
              + _linear(b + "mlp/fc1", s + "mlp.fc1", d, m) + _linear(b + "mlp/fc2", s + "mlp.fc2", m, d)
              + _linear(b + "adaLN_modulation", s + "adaLN_modulation.1", d, 6 * d))
    return e + _head(cfg, "final_layer.adaLN_modulation.1", "final_layer.linear")


def _diffusers_emb_keys(i: int) -> tuple[str, str, str]:
    s = f"transformer_blocks.{i}.norm1.emb."
    return (s + "timestep_embedder.linear_1", s + "timestep_embedder.linear_2",
            s + "class_embedder.embedding_table.weight")


def _diffusers_entries(cfg: DiTConfig) -> list[_Entry]:
    d, m = cfg.hidden_size, cfg.mlp_hidden
    e = _patch_embed("pos_embed.proj", cfg)
    if cfg.shared_embedder:
        e += _embedders("", *_diffusers_emb_keys(0), cfg)
    for i in range(cfg.depth):
        b, s = f"blocks_{i}/", f"transformer_blocks.{i}."
        if not cfg.shared_embedder:
            e += _embedders(b, *_diffusers_emb_keys(i), cfg)
        qkv = tuple(f"{s}attn1.to_{n}" for n in "qkv")
        e += [_Entry(b + "attn/qkv/kernel", tuple(k + ".weight" for k in qkv), ((d, d),) * 3,
                     lambda *w: np.concatenate(w, axis=0).T),
              _Entry(b + "attn/qkv/bias", tuple(k + ".bias" for k in qkv), ((d,),) * 3,
                     lambda *b_: np.concatenate(b_, axis=0))]
        e += (_linear(b + "attn/proj", s + "attn1.to_out.0", d, d)
              + _linear(b + "mlp/fc1", s + "ff.net.0.proj", d, m) + _linear(b + "mlp/fc2", s + "ff.net.2", m, d)
              + _linear(b + "adaLN_modulation", s + "norm1.linear", d, 6 * d))
    return e + _head(cfg, "proj_out_1", "proj_out_2")


def _emb_param_keys(i: int, cfg: DiTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """``(key, shape)`` of every parameter of diffusers block ``i``'s timestep+label embedder."""
    d = cfg.hidden_size
    t1, t2, table = _diffusers_emb_keys(i)
    return [(t1 + ".weight", (d, FREQ_EMBED_DIM)), (t1 + ".bias", (d,)),
            (t2 + ".weight", (d, d)), (t2 + ".bias", (d,)), (table, (cfg.num_label_rows, d))]


# ---------------------------------------------------------------------------------------------
# config inference

_LAYOUT_KEYS = {
    "diffusers": ("pos_embed.proj.weight", "transformer_blocks.0.ff.net.0.proj.weight",
                  "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight", "proj_out_2.weight"),
    "original": ("x_embedder.proj.weight", "blocks.0.mlp.fc1.weight", "y_embedder.embedding_table.weight",
                 "final_layer.linear.weight"),
}


def detect_layout(state_dict: Mapping[str, np.ndarray]) -> str:
    """``"original"`` (facebookresearch/DiT) or ``"diffusers"`` (DiTTransformer2DModel)."""
    if any(k.startswith(("transformer_blocks.", "pos_embed.proj.", "proj_out_")) for k in state_dict):
        return "diffusers"
    if any(k.startswith(("blocks.", "x_embedder.", "final_layer.")) for k in state_dict):
        return "original"
    raise ConversionError(other=[f"unrecognized layout (neither original DiT nor diffusers); "
                                 f"first keys: {sorted(state_dict)[:8]}"])


def _depth(state_dict: Mapping, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    idx = [int(m.group(1)) for k in state_dict if (m := pat.match(k))]
    return max(idx) + 1 if idx else 0


def _named_config_hint(d: int, depth: int, p: int) -> str:
    for name, c in DIT_CONFIGS.items():
        if (c["hidden_size"], c["depth"], c["patch_size"]) == (d, depth, p):
            return f" (hidden_size={d}, depth={depth}, patch {p} is {name}, which uses num_heads={c['num_heads']})"
    return ""


def _infer_config(sd: Mapping, layout: str, dconf: Optional[Mapping], num_heads: Optional[int]) -> DiTConfig:
    need = _LAYOUT_KEYS[layout]
    if missing := [k for k in need if k not in sd]:
        raise ConversionError(missing=missing, other=["(needed to infer the config)"], layout=layout)
    patch_w, fc1_w, table_w, out_w = (sd[k].shape for k in need)
    d, c, p = patch_w[0], patch_w[1], patch_w[2]
    depth = _depth(sd, "transformer_blocks." if layout == "diffusers" else "blocks.")
    out_ch, rem = divmod(out_w[0], p * p)
    if rem or out_ch not in (c, 2 * c):
        raise ConversionError(other=[f"final linear has {out_w[0]} outputs: not p·p·C or p·p·2C "
                                     f"(p={p}, C={c})"], layout=layout)
    fields = dict(patch_size=p, in_channels=c, hidden_size=d, depth=depth, mlp_ratio=fc1_w[0] / d,
                  num_classes=table_w[0] - 1, learn_sigma=out_ch == 2 * c)
    problems = []
    if layout == "original":
        if "pos_embed" in sd:
            fields["input_size"] = round(sd["pos_embed"].shape[1] ** 0.5) * p
    else:
        fields.update(freq_shift=1)
        dconf = dconf or {}
        fields["input_size"] = dconf.get("sample_size", DIFFUSERS_SAMPLE_SIZE)
        fields["mlp_norm_eps"] = dconf.get("norm_eps", DIFFUSERS_NORM_EPS)
        if "num_attention_heads" in dconf:
            if num_heads is not None and num_heads != dconf["num_attention_heads"]:
                problems.append(f"num_heads={num_heads} contradicts config.json "
                                f"num_attention_heads={dconf['num_attention_heads']}")
            num_heads = dconf["num_attention_heads"]
        problems += _check_diffusers_config(dconf, fields, out_ch)
    if num_heads is None:
        problems.append("num_heads cannot be inferred from weight shapes: pass num_heads=..."
                        + _named_config_hint(d, depth, p))
    if problems:
        raise ConversionError(other=problems, layout=layout)
    cfg = DiTConfig(num_heads=num_heads, **fields)
    if layout == "diffusers":
        cfg = dataclasses.replace(cfg, shared_embedder=_embedders_identical(sd, cfg))
    return cfg


def _check_diffusers_config(dconf: Mapping, fields: Mapping, out_ch: int) -> list[str]:
    """config.json entries that disagree with the weights or that jaxdq's DiT does not implement."""
    dconf = dict(dconf)
    if dconf.get("out_channels", 0) is None:  # diffusers: None means in_channels
        dconf["out_channels"] = dconf.get("in_channels", fields["in_channels"])
    expect = {"in_channels": fields["in_channels"], "patch_size": fields["patch_size"],
              "num_layers": fields["depth"], "num_embeds_ada_norm": fields["num_classes"],
              "out_channels": out_ch, "norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate",
              "attention_bias": True, "norm_elementwise_affine": False}
    probs = [f"config.json {k}={dconf[k]!r}, expected {v!r}" for k, v in expect.items() if dconf.get(k, v) != v]
    if "num_attention_heads" in dconf and "attention_head_dim" in dconf:
        inner = dconf["num_attention_heads"] * dconf["attention_head_dim"]
        if inner != fields["hidden_size"]:
            probs.append(f"config.json heads·head_dim={inner}, the weights' hidden size {fields['hidden_size']}")
    return probs


def _embedders_identical(sd: Mapping, cfg: DiTConfig) -> bool:
    """Whether every diffusers block carries the same timestep+label embedder as block 0."""
    first = [sd.get(k) for k, _ in _emb_param_keys(0, cfg)]
    for i in range(1, cfg.depth):
        for (k, _), b in zip(_emb_param_keys(i, cfg), first):
            a = sd.get(k)
            if a is None or b is None or a.shape != b.shape or not np.array_equal(a, b):
                return False
    return True


# ---------------------------------------------------------------------------------------------


def convert_dit(state_dict: Mapping[str, np.ndarray],
                config: Union[DiTConfig, Mapping, None] = None, *,
                num_heads: Optional[int] = None) -> tuple[DiTConfig, dict]:
    """Map an original-DiT or diffusers state dict onto :class:`~jaxdq.models.dit.DiT` params.

    Args:
      state_dict: ``{name: array}`` (numpy / torch-free), e.g. from :func:`load_state_dict`;
        a :class:`StateDict` from a diffusers folder carries its ``config.json``.
      config: a :class:`DiTConfig` to convert into (all shapes are checked against it), or
        a diffusers ``config.json`` dict; None: inferred from the shapes (and the
        state dict's own ``config`` when it has one).
      num_heads: attention heads, needed unless ``config`` provides them (shapes do not).
    Returns:
      ``(config, params)``, params a nested dict of float32 jax arrays.
    Raises:
      ConversionError: listing every missing, unexpected and mis-shaped key.
    """
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    layout = detect_layout(sd)
    if isinstance(config, DiTConfig):
        cfg = config if num_heads is None else dataclasses.replace(config, num_heads=num_heads)
    else:
        dconf = config if config is not None else getattr(state_dict, "config", None)
        cfg = _infer_config(sd, layout, dconf, num_heads)

    entries = _original_entries(cfg) if layout == "original" else _diffusers_entries(cfg)
    expected = {k: s for e in entries for k, s in zip(e.sources, e.shapes)}
    other = []
    if layout == "diffusers" and cfg.shared_embedder:
        for i in range(1, cfg.depth):
            for (k, shape), (k0, _) in zip(_emb_param_keys(i, cfg), _emb_param_keys(0, cfg)):
                expected[k] = shape
                if k in sd and k0 in sd and sd[k].shape == sd[k0].shape and not np.array_equal(sd[k], sd[k0]):
                    other.append(f"{k} differs from {k0}: per-block embedders need shared_embedder=False")
    buffer = "pos_embed" if layout == "original" else "pos_embed.pos_embed"
    if buffer in sd:
        other += _check_pos_embed(sd[buffer], buffer, cfg, expected)

    built = {k for e in entries for k in e.sources}
    return cfg, build_params(sd, entries, layout, other=other,
                             required={k: s for k, s in expected.items() if k not in built})


def build_params(sd: Mapping[str, np.ndarray], entries: Sequence[_Entry], tag: str,
                 optional: Optional[Mapping[str, tuple]] = None, other: Sequence[str] = (),
                 required: Optional[Mapping[str, tuple]] = None) -> dict:
    """Check ``sd`` against ``entries`` (plus ``required`` keys that are checked but not
    converted, and ``optional`` keys: accepted if present and of that shape) and build the
    nested float32 params dict.  Shared by every converter.

    Raises:
      ConversionError: naming every missing, unexpected and mis-shaped key (and ``other`` problems).
    """
    expected = {k: s for e in entries for k, s in zip(e.sources, e.shapes)}
    expected.update(required or {})
    allowed = {**expected, **{k: s for k, s in (optional or {}).items() if k in sd}}
    missing = [k for k in expected if k not in sd]
    mismatched = [(k, s, tuple(sd[k].shape)) for k, s in allowed.items()
                  if k in sd and tuple(sd[k].shape) != tuple(s)]
    unexpected = sorted(set(sd) - set(allowed))
    if missing or unexpected or mismatched or other:
        raise ConversionError(missing, unexpected, mismatched, other, layout=tag)
    params: dict = {}
    for e in entries:
        node = params
        *parents, leaf = e.target.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = jnp.asarray(e.fn(*(sd[k] for k in e.sources)), jnp.float32)
    return params


def _check_pos_embed(buf: np.ndarray, key: str, cfg: DiTConfig, expected: dict) -> list[str]:
    """Fixed sin-cos buffer ``[1, T, D]``: registered as expected, and its values must be ours."""
    g = cfg.input_size // cfg.patch_size
    expected[key] = (1, g * g, cfg.hidden_size)
    if tuple(buf.shape) != expected[key]:
        return []  # reported as mis-shaped
    err = float(np.max(np.abs(buf[0] - pos_embed_2d(cfg.hidden_size, g, g))))
    return [] if err < 1e-4 else [f"{key} is not the 2D sin-cos position embedding (max |Δ| = {err:.3g})"]
