"""Linears that read a normalized, modulated input: the quantize fused into the norm.

In DiT, PixArt and FLUX the first linear(s) of each sub-block read
``h = norm(x) · (1 + scale) + shift`` (adaLN modulate; PixArt's scale-shift table rows;
FLUX's modulation).  A model calls :func:`norm_linear` there, once per ``h``, naming the
linears that read it::

    h = norm_linear(self, x, Norm("layer", eps), shift=shift, scale=scale, linears=("attn/qkv",))
    ... Attention(...)(h)          # its Linear "qkv" reads h as before

* Under the reference policy, with float params, at ``init`` or while statistics are
  collected, ``norm_linear`` returns ``h`` itself, computed by the same ops the models
  always used (``layer_norm(x, eps) * (1 + scale) + shift``): the models are unchanged to float
  rounding (tests/data/norm_linear_fixture.npz holds the outputs from before this module).
* Under ``policy("kernels")`` (on a GPU, or interpreted) it returns a :class:`NormInput`:
  the named linears that the fused path takes have their outputs already computed — the
  fused kernel :func:`pallas_kernels.norm_quantize.norm_quantize` (norm → modulate with the
  smoothing folded in → block Hadamard → 8-bit codes + per-token scales → ``X' L1``) feeding
  the integer GEMM (Mosaic GPU wgmma on Hopper, Pallas-Triton elsewhere), or XLA's float8
  dot for FP8 layers — and every :class:`jaxdq.nn.Linear` that receives it picks its own
  output by module path; any other linear (not eligible, not named) gets ``h`` computed
  the reference way, once.  ``x`` is read once per group instead of written as ``h`` and
  read again by a separate quantize kernel.
* Several linears reading one ``h`` (FLUX's q/k/v; the single block's q/k/v + ``proj_mlp``,
  FLUX's linear1) are quantized once when their input transforms agree (no smoothing, the
  same rotation block and code format): one kernel call, their rank-r down-projections
  concatenated into one ``[K, Σr]`` product, then one GEMM each.  Layers with a smoothing
  vector get one kernel call each (λ differs per layer; it is folded into that call's rows).

The smoothing fold (no divide in the kernel): ``(LN(x)(1+s)+b)/λ = LN(x)·(1+s)/λ + b/λ``,
computed on the ``[B, K]`` modulation rows (:func:`pallas_kernels.norm_quantize.fold_modulation`).

PixArt's cross-attention ``q`` reads the residual stream without a norm (PixArt and diffusers'
``ada_norm_single`` blocks apply none there), so it keeps the separate quantize kernel.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxdq import backend
from jaxdq.quant.layers import QLinear, QWeight

NORM_KINDS = ("layer", "rms")


@dataclasses.dataclass(frozen=True)
class Norm:
    """The norm before a linear: ``kind`` "layer" (LayerNorm without affine, the models'
    ``layer_norm``) or "rms" (``x · rsqrt(mean(x²) + eps)``), and its ``eps``."""

    kind: str = "layer"
    eps: float = 1e-6

    def __post_init__(self):
        if self.kind not in NORM_KINDS:
            raise ValueError(f"norm kind must be one of {NORM_KINDS}, got {self.kind!r}")

    def __call__(self, x: jax.Array) -> jax.Array:
        """The reference norm (float32 inside, ``x.dtype`` out)."""
        return layer_norm(x, self.eps) if self.kind == "layer" else rms_norm(x, self.eps)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without affine params, computed in float32; same dtype out.
    (The models' LayerNorm: ``jaxdq.models.dit.layer_norm`` is this function.)"""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x: jax.Array, eps: float) -> jax.Array:
    """``x · rsqrt(mean(x²) + eps)`` over the last axis in float32, no scale; same dtype out."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _rows(v: Optional[jax.Array], x: jax.Array) -> Optional[jax.Array]:
    """A per-sample ``[N, D]`` modulation row as ``[N, 1, D]`` against ``x [N, T, D]``."""
    if v is None or v.ndim != x.ndim - 1:
        return v
    return jnp.expand_dims(v, -2)


def reference_input(x: jax.Array, norm: Norm, shift=None, scale=None, weight=None, bias=None) -> jax.Array:
    """``h = (norm(x)·weight + bias)·(1 + scale) + shift`` by the models' ops (each term optional)."""
    h = norm(x)
    if weight is not None:
        h = h * weight.astype(h.dtype)
    if bias is not None:
        h = h + bias.astype(h.dtype)
    if scale is not None:
        h = h * (1 + _rows(scale, x))
    if shift is not None:
        h = h + _rows(shift, x)
    return h


class NormInput:
    """``h = norm(x)·(1 + scale) + shift`` with the outputs of the linears that read it
    already computed by the fused path (what :func:`norm_linear` returns under a kernels
    policy).  Quacks like ``h`` where the models need it (``shape``, ``dtype``, ``ndim``);
    :meth:`value` computes ``h`` the reference way (once)."""

    def __init__(self, x, norm, shift, scale, weight, bias, outputs: dict, acts: Optional[dict] = None):
        self._args = (x, norm, shift, scale, weight, bias)
        self._value = None
        self.outputs = outputs  # {absolute module path tuple: [..., C_out] array}
        self.acts = acts or {}  # {path: the activation already applied to that output}
        self.shape, self.dtype, self.ndim = x.shape, x.dtype, x.ndim

    def value(self) -> jax.Array:
        if self._value is None:
            self._value = reference_input(*self._args)
        return self._value

    def output_for(self, path: tuple) -> Optional[jax.Array]:
        return self.outputs.get(tuple(path))

    def act_for(self, path: tuple) -> Optional[str]:
        """The activation (:class:`jaxdq.backend.Epilogue` ``act``) that output already has."""
        return self.acts.get(tuple(path))

    def astype(self, dtype):
        return self.value().astype(dtype)


def _node(params: Any, rel: str):
    node = params
    for k in rel.split("/"):
        try:
            node = node[k]
        except (KeyError, TypeError):
            return None
    return node


def norm_linear(module, x: jax.Array, norm: Norm, *, shift: Optional[jax.Array] = None,
                scale: Optional[jax.Array] = None, linears: Sequence[str] = (), weight=None, bias=None,
                acts: Optional[dict] = None):
    """The input ``h = (norm(x)·weight + bias)·(1 + scale) + shift`` of the linears ``linears``
    (module paths relative to ``module``, e.g. ``("attn/to_q", "attn/to_k", "attn/to_v")``).
    ``acts``: ``{path: "gelu_tanh"}``, the activation the model applies to that linear's output
    (its ``Linear(...)(h, epilogue=Epilogue(act=...))``): a fused output gets it in the GEMM's
    epilogue, and the Linear then applies only the rest of its epilogue.

    Called inside ``module``'s compact method; ``x [N, T, D]``; ``shift``/``scale`` per sample
    ``[N, D]`` (or ``[N, 1, D]``), or None; ``weight``/``bias`` an affine norm's ``[D]``.
    Returns ``h`` (reference policy, float params, init, statistics collection) or a
    :class:`NormInput` whose linears' outputs come from the fused kernel path (module
    docstring).  Either way the caller passes the result where it passed ``h`` before.
    """
    if (module.is_initializing() or not linears or module.is_mutable_collection("act_stats")
            or module.is_mutable_collection("act_samples")):
        return reference_input(x, norm, shift, scale, weight, bias)
    params = module.variables.get("params", {})
    nodes = [_node(params, rel) for rel in linears]
    if not any(isinstance(n, backend.Bound) and n.policy.mode == "kernels" for n in nodes):
        return reference_input(x, norm, shift, scale, weight, bias)
    acts = acts or {}
    outs = norm_linears(x, norm, nodes, shift=shift, scale=scale, weight=weight, bias=bias,
                        acts=tuple(acts.get(rel) for rel in linears))
    base = tuple(module.path)
    key = lambda rel: base + tuple(rel.split("/"))  # noqa: E731
    found = {key(rel): y for rel, y in zip(linears, outs) if y is not None}
    if not found:
        return reference_input(x, norm, shift, scale, weight, bias)
    return NormInput(x, norm, shift, scale, weight, bias, found,
                     {key(rel): acts.get(rel) for rel in linears if key(rel) in found})


# --------------------------------------------------------------------------- the fused path
def _fmt(q: QLinear) -> str:
    return q.act.spec.fmt


def _group_key(q: QLinear):
    """Linears with equal keys can share one quantized input (None: a group of its own)."""
    if q.transform.smooth is not None:
        return None
    rot = q.transform.rotation
    return (0 if rot is None else rot.kernel_block, q.act.spec, _fmt(q))


def norm_linears(x: jax.Array, norm: Norm, nodes: Sequence[Any], *, shift=None, scale=None, weight=None,
                 bias=None, acts: Optional[Sequence[Optional[str]]] = None) -> list[Optional[jax.Array]]:
    """The outputs ``[..., C_out]`` (``x.dtype``) of the linears ``nodes`` that the fused path
    computes on ``h = (norm(x)·weight + bias)·(1 + scale) + shift``, each with its activation
    ``acts[i]`` applied (None: none); None for the others."""
    acts = tuple(acts) if acts is not None else (None,) * len(nodes)
    n, k = x.shape[0], x.shape[-1]
    batch = n if (shift is not None or scale is not None) else 1
    outs: list[Optional[jax.Array]] = [None] * len(nodes)
    groups: dict = {}
    for i, node in enumerate(nodes):
        if backend.fuse_norm(node, x.shape, batch):  # the decision is the backend's
            key = _group_key(node.layer)
            groups.setdefault(("own", i) if key is None else key, []).append(i)
    rows = lambda v: None if v is None else jnp.asarray(v).reshape(-1, k)  # noqa: E731
    x2 = x.reshape(-1, k)
    # the GEMMs' bf16 outputs get their activation there only in a bf16 model (as backend.execute's)
    in_gemm = x.dtype == jnp.bfloat16
    for idx in groups.values():
        pol = nodes[idx[0]].policy
        ys = _fused_group(tuple(nodes[i].layer for i in idx), x2, rows(scale), rows(shift), weight, bias,
                          norm=norm, pol=pol, acts=tuple(acts[i] if in_gemm else None for i in idx))
        for i, y in zip(idx, ys):
            y = y.reshape(*x.shape[:-1], y.shape[-1]).astype(x.dtype)
            outs[i] = y if in_gemm else backend.Epilogue(act=acts[i]).apply(y)
    return outs


@functools.partial(jax.jit, static_argnames=("norm", "pol", "acts"))
def _fused_group(layers: tuple, x2: jax.Array, scale, shift, weight, bias, *, norm: Norm, pol,
                 acts: tuple = ()) -> tuple:
    """One fused norm-quantize launch for ``layers`` (one shared input transform), then one
    GEMM each (with activation ``acts[i]``, None: none); ``x2 [M, K]`` → a tuple of
    ``[M, C_out]`` bf16.  Jitted: lowered once per (shapes, norm, policy) and called from
    every block."""
    acts = acts or (None,) * len(layers)
    from pallas_kernels.norm_quantize import fold_modulation, norm_quantize, norm_quantize_config

    m, k = x2.shape
    q0 = layers[0]
    t0 = q0.transform
    mul, add = fold_modulation(scale, shift, k=k, smooth=t0.smooth, weight=weight, bias=bias)
    had = 0 if t0.rotation is None else t0.rotation.kernel_block
    l1s, l2s = [], []
    for q in layers:
        t = q.transform
        if t.lowrank_a is None:
            l1s.append(None)
            l2s.append(None)
            continue
        l1, l2 = t.lowrank_a, t.lowrank_b
        if l1.shape[1] % 16:  # zero-pad the rank to the dot minimum (exact)
            pad = 16 - l1.shape[1] % 16
            l1, l2 = jnp.pad(l1, ((0, 0), (0, pad))), jnp.pad(l2, ((0, pad), (0, 0)))
        l1s.append(l1)
        l2s.append(l2)
    present = [a for a in l1s if a is not None]
    l1_all = jnp.concatenate([a.astype(jnp.bfloat16) for a in present], axis=1) if present else None
    cfg = norm_quantize_config(m, k, tokens=m // mul.shape[0], dot=bool(had or present))
    cfg = dataclasses.replace(cfg, interpret=pol.interpret)
    fmt = _fmt(q0)
    codes, sx, xl1_all = norm_quantize(x2, mul, add, norm=norm.kind, eps=norm.eps, bits=q0.act.spec.bits, fmt=fmt,
                                       had_block=had, l1=l1_all, config=cfg)
    outs, off = [], 0
    for q, l1, l2, act in zip(layers, l1s, l2s, acts):
        xl1 = None
        if l1 is not None:
            xl1 = xl1_all[:, off:off + l1.shape[1]]
            off += l1.shape[1]
        if fmt == "int" or pol.gemm == "hopper":  # int8 GEMMs; FP8 through the Mosaic GPU e4m3 wgmma
            outs.append(_gemm(q, codes, sx, xl1, l2, pol, act))
        else:  # FP8 (gemm "auto"/"triton"): XLA's fp8 dot
            outs.append(backend.Epilogue(act=act).apply(_fp8_product(q, codes, sx, xl1, l2)))
    return tuple(outs)


def _gemm(q: QLinear, codes, sx, xl1, l2, pol, act=None) -> jax.Array:
    """The integer GEMM of ``backend._kernel_forward`` after its quantize step (same
    dispatch: Mosaic GPU wgmma on Hopper, Pallas-Triton otherwise; FP8 codes only reach it
    with ``gemm="hopper"``: the e4m3 wgmma variant of the same kernel), then ``act`` (in the
    Hopper epilogue under ``fuse_epilogue``); ``[M, C_out]`` bf16."""
    from pallas_kernels.int_gemm import GemmConfig, int_gemm

    m = codes.shape[0]
    bm = 128 if m >= 128 else 64
    m_pad = -(-m // bm) * bm
    if m_pad != m:  # zero rows: zero codes, sliced off
        pad = ((0, m_pad - m), (0, 0))
        codes, sx = jnp.pad(codes, pad), jnp.pad(sx, pad, constant_values=1.0)
        xl1 = None if xl1 is None else jnp.pad(xl1, pad)
    bias = None if q.bias is None else q.bias.astype(jnp.float32)
    w = q.weight
    group = w.spec.group_size if w.spec.granularity == "group" else 0
    hopper = pol.gemm == "hopper" or (pol.gemm == "auto" and not pol.interpret and backend._is_hopper())
    in_kernel = hopper and group in (0, 64, 128) and pol.fuse_epilogue and (xl1 is None or pol.fuse_lowrank)
    if hopper and group in (0, 64, 128):
        y = backend._hopper_gemm(q, codes, sx, None, xl1, l2, bias, group, m_pad, pol,
                                 act=act if in_kernel else None)
    else:
        y = int_gemm(codes, w.codes, sx, w.scale, bias=bias, xa=xl1, l2=l2, packed=w.packed,
                     w_kmajor=w.layout == "nk", out_dtype=jnp.bfloat16,
                     config=GemmConfig(block_m=bm, interpret=pol.interpret))
    y = y[:m]
    return y if in_kernel or act is None else backend.Epilogue(act=act).apply(y)


def _fp8_product(q: QLinear, codes, sx, xl1, l2) -> jax.Array:
    """float8 e4m3 codes × the layer's e4m3 weight codes: XLA's fp8 dot (f32 accumulation;
    cuBLASLt's fp8 GEMM on Hopper), then ``· s_x · s_w + (X' L1) L2 + b``; ``[M, C_out]`` bf16."""
    w = q.weight
    contract = 1 if w.layout == "nk" else 0
    acc = jax.lax.dot_general(codes, w.stored(), (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32)
    y = acc * sx * w.scale.astype(jnp.float32).reshape(-1)
    if xl1 is not None:
        y = y + jnp.dot(xl1, l2.astype(jnp.bfloat16), preferred_element_type=jnp.float32)
    if q.bias is not None:
        y = y + q.bias.astype(jnp.float32)
    return y.astype(jnp.bfloat16)


__all__ = ["Norm", "NormInput", "norm_linear", "norm_linears", "reference_input", "layer_norm", "rms_norm"]
