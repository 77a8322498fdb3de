"""SVDQuant (Li et al., arXiv 2411.05007): smoothing + 16-bit low-rank branch + 4-bit residual.

Per selected linear layer ``Y = X W + b`` (``X: [..., C_in]``, ``W: [C_in, C_out]``):

1. Smooth: ``λ_j = max|X_j|^α / max|W_j|^(1−α)``, ``X̂ = X diag(λ)⁻¹``, ``Ŵ = diag(λ) W``
   (:mod:`jaxdq.quant.smooth`); α searched per layer on calibration tokens to
   minimize the quantized layer's output error (:func:`search_alpha`).
2. Split: ``Ŵ = L1 L2 + R`` by SVD, rank r (32 by default), optionally refined
   (:func:`jaxdq.quant.lowrank.svd_split`).
3. ``Y ≈ Q(X̂) Q(R) + (X̂ L1) L2 + b``: the residual ``R`` as symmetric INT4 codes per
   group of 64 input channels (packed two per byte), ``X̂`` quantized dynamically
   (range from the tensor at every call) to symmetric 4 bits per token per group of
   64 channels, the low-rank branch in 16 bit.

Storage choices (state them when reporting memory): ``L1``/``L2`` are stored as
float16 (``factor_dtype``; the residual is formed against the rounded factors so
rounding goes into the quantized part), weight scales ``[C_in/64, C_out]`` float32
by default or float16 with ``scale_dtype=jnp.float16`` (the paper's choice; codes are
then computed against the rounded scales), the smoothing vector float32 ``[C_in]``.
:func:`weight_bytes` counts all of it.

Variants through the bit arguments: 4-bit operands use per-group-64 scales, 8-bit
ones the paper's 8-bit setting (per-output-channel weights, per-token activations);
a layer whose C_in is not divisible by the group size falls back to that too.

Which layers keep higher precision is a :class:`jaxdq.quant.rules.Rule` list over role
tags, :func:`svdquant_rules`, the same on every model family:

* 16-bit (float): roles ``embedding`` and ``final`` (the first and last layers: patch /
  caption / context embedders, output projection), ``time-embedding`` (SVDQuant keeps
  embeddings in 16 bit), and ``cross-attn:kv``, the cross-attention key/value
  projections (the paper keeps them 16-bit in PixArt-Σ/SDXL since they act on the text
  tokens only and cost < 5 % of the runtime).
* W4A16 (4-bit group weights, 16-bit activations, no smoothing or low-rank): role
  ``adaLN``, the adaptive-normalization linears: the paper keeps their inputs in 16 bit
  for FLUX.1.

These two defaults are from the paper's implementation details (§5.1) as recalled
here; ``shared/seeds/svdquant.html`` (a blog summary) does not list them.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Optional

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.quant.layers import FloatLinear, QLinear, as_layer, get_path, map_layers
from jaxdq.quant.progressive import ProgressiveSpec
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.rules import FIRST_LAST, LayerQuant, Rule, config_of, quantize_linear
from jaxdq.quant.smooth import smoothing_factors
from jaxdq.quant.transforms import lowrank_layer, smooth_layer

# α grid of the per-layer search (SVDQuant searches α; the SPEC quotes ≈0.5–0.7).
DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
FIXED_ALPHA = 0.5  # used when no calibration samples are available

#: Roles kept in 16 bit (module docstring).
KEEP_FLOAT_ROLES = FIRST_LAST + ("time-embedding", "cross-attn:kv")
#: Roles quantized weight-only (4-bit weights, 16-bit activations).
WEIGHT_ONLY_ROLES = ("adaLN",)


def _spec(bits: int, group_size: Optional[int], fine: str) -> QuantSpec:
    """Symmetric spec: per group of ``group_size`` for <= 4 bits, else ``fine`` ("channel"/"token")."""
    if group_size and bits <= 4:
        return QuantSpec(bits=bits, granularity="group", group_size=group_size)
    return QuantSpec(bits=bits, granularity=fine)


_SAME = "same"


def svdquant_config(weight_bits: int = 4, act_bits: Optional[int] = 4, group_size: Optional[int] = 64,
                    act_group_size: Optional[int] | str = _SAME, progressive: bool = False) -> LayerQuant:
    """LayerQuant of SVDQuant's residual GEMM: symmetric weights and dynamic symmetric
    activations, per group of ``group_size`` input channels at 4 bits (per output
    channel / per token at 8 bits); 4-bit weight codes packed.  ``act_bits=None``:
    float activations (W{b}A16).  ``act_group_size`` (default: ``group_size``) sets the
    activations' group separately; None = one scale per token (what the fused GPU
    kernels support, :func:`jaxdq.backend.kernel_supported`).  ``progressive``: 4-bit
    weights in QServe's progressive group format instead (:mod:`jaxdq.quant.progressive`:
    per-channel INT8 then per-group UINT4 with integer scales/zeros, group ``group_size``),
    for the W4A8 Hopper GEMM without a per-group float rescale."""
    ag = group_size if act_group_size == _SAME else act_group_size
    act = None if act_bits is None else _spec(act_bits, ag, "token")
    if progressive:
        if weight_bits != 4:
            raise ValueError(f"progressive group weights are 4-bit, got weight_bits={weight_bits}")
        return LayerQuant(weight=ProgressiveSpec(group_size=group_size or 64), act=act, pack=True)
    return LayerQuant(weight=_spec(weight_bits, group_size, "channel"), act=act, pack=weight_bits <= 4)


def svdquant_rules(*, weight_bits: int = 4, act_bits: int = 4, group_size: Optional[int] = 64,
                   act_group_size: Optional[int] | str = _SAME, keep_float: Sequence[str] = KEEP_FLOAT_ROLES,
                   weight_only: Sequence[str] = WEIGHT_ONLY_ROLES, progressive: bool = False) -> list[Rule]:
    """The paper's precision defaults as role rules (first match wins): ``keep_float`` roles
    stay float, ``weight_only`` roles get W{weight_bits}A16 per group, every other linear
    the full SVDQuant treatment.  :func:`svdquant` applies smoothing and the low-rank
    branch only to layers whose config quantizes activations.  ``progressive``: the full
    SVDQuant layers' weights in the progressive group format (the weight-only layers keep
    uniform group weights: without int8 activations there is no integer GEMM to serve)."""
    return [Rule(None, roles=tuple(keep_float)),
            Rule(svdquant_config(weight_bits, None, group_size), roles=tuple(weight_only)),
            Rule(svdquant_config(weight_bits, act_bits, group_size, act_group_size, progressive))]


def svdquant_layer(layer: FloatLinear, cfg: LayerQuant, *, act_absmax=None, alpha: Optional[float] = None,
                   rank: int = 32, iters: int = 0, factor_dtype=jnp.float16, scale_dtype=None) -> QLinear:
    """One float layer → its SVDQuant QLinear: smooth (α), split (rank, refinement), quantize.

    Args:
      layer: a float layer (or its ``{"kernel", "bias"}`` dict).
      cfg: quantizer of the residual GEMM (:func:`svdquant_config`).
      act_absmax: ``[C_in]`` calibration max |x| per input channel (needed if ``alpha``).
      alpha: smoothing strength; None = no smoothing.
      rank: low-rank branch rank (clipped to ``min(C_in, C_out)``); 0 = no branch.
      iters: refinement rounds of the split (:func:`jaxdq.quant.lowrank.svd_split`).
      factor_dtype: storage dtype of the low-rank factors (None: float32); the factors are
        rounded to it before the residual is formed, so rounding lands in the quantized part.
      scale_dtype: storage dtype of the weight scales (None: float32; the paper: float16).
    """
    layer = as_layer(layer)
    if alpha is not None:
        if act_absmax is None:
            raise ValueError("smoothing (alpha given) needs the layer's act_absmax")
        layer = smooth_layer(layer, smoothing_factors(act_absmax, layer.kernel, alpha))
    cfg = cfg.fit(layer.in_features, layer.out_features)
    layer = lowrank_layer(layer, rank, quant_spec=cfg.weight, iters=iters, factor_dtype=factor_dtype)
    if scale_dtype is not None:
        cfg = dataclasses.replace(cfg, scale_dtype=scale_dtype)
    q = quantize_linear(layer, cfg)
    t = q.transform
    if factor_dtype is not None and t.lowrank_a is not None:
        # exact: the factors were rounded to factor_dtype before the residual was formed
        q = q.replace(transform=t.replace(lowrank_a=t.lowrank_a.astype(factor_dtype),
                                          lowrank_b=t.lowrank_b.astype(factor_dtype)))
    return q


def output_error(layer, q: Callable[[jax.Array], jax.Array], x) -> float:
    """``‖X W + b − q(X)‖²`` (sum of squares over ``X: [n, C_in]``) against a float64
    reference of the float ``layer`` (a float layer or its dict)."""
    layer = as_layer(layer)
    x64 = np.asarray(x, np.float64)
    ref = x64 @ np.asarray(layer.effective_kernel(), np.float64)
    if layer.bias is not None:
        ref = ref + np.asarray(layer.bias, np.float64)
    out = np.asarray(q(jnp.asarray(x, jnp.float32)), np.float64)
    return float(np.sum((ref - out) ** 2))


class AlphaResult(NamedTuple):
    alpha: float
    error: float                   # output error of the layer at ``alpha``
    errors: tuple[float, ...]      # output error for each α of the grid, in grid order


def search_alpha(layer, x_samples, cfg: LayerQuant, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
                 rank: int = 32, iters: int = 0, act_absmax=None, factor_dtype=jnp.float16,
                 scale_dtype=None) -> AlphaResult:
    """Per-layer smoothing strength minimizing the fully quantized layer's output error.

    For each α: smooth → SVD split (rank, iters) → quantize (``cfg``); error is
    ``‖X W + b − Q-layer(X)‖²`` on ``x_samples [n, C_in]`` (float32 calibration tokens).
    ``act_absmax`` ``[C_in]`` defaults to ``max |x_samples|`` per channel.
    Returns the best α (first on ties), its error and all the errors.
    """
    layer = as_layer(layer)
    x = np.asarray(x_samples, np.float32).reshape(-1, layer.in_features)
    if act_absmax is None:
        act_absmax = np.max(np.abs(x), axis=0)
    errs = tuple(output_error(layer, svdquant_layer(layer, cfg, act_absmax=act_absmax, alpha=float(a),
                                                    rank=rank, iters=iters, factor_dtype=factor_dtype,
                                                    scale_dtype=scale_dtype), x)
                 for a in alphas)
    i = int(np.argmin(errs))
    return AlphaResult(float(alphas[i]), errs[i], errs)


def layer_stats(stats: Mapping, path: str, c_in: int, *, max_samples: Optional[int] = 512,
                seed: int = 0) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Adapter from a calibration stats tree to ``(absmax [C_in], samples [n, C_in] | None)``.

    ``absmax`` may carry leading axes (e.g. per calibration step); they are reduced
    by max.  ``samples`` (optional) is reshaped to ``[-1, C_in]`` and, above
    ``max_samples`` rows, subsampled without replacement (fixed ``seed``).
    """
    node = get_path(stats, path)
    absmax = np.asarray(node["absmax"], np.float32).reshape(-1, c_in).max(axis=0)
    samples = node.get("samples")
    if samples is not None:
        samples = np.asarray(samples, np.float32).reshape(-1, c_in)
        if max_samples and samples.shape[0] > max_samples:
            idx = np.random.default_rng(seed).choice(samples.shape[0], max_samples, replace=False)
            samples = samples[np.sort(idx)]
    return absmax, samples


def svdquant(params: Mapping, stats: Mapping, *, roles: Mapping[str, str], rank: int = 32, weight_bits: int = 4,
             act_bits: int = 4, group_size: Optional[int] = 64, act_group_size: Optional[int] | str = _SAME,
             alpha: Optional[float] = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
             rules: Optional[Sequence[Rule]] = None, iters: int = 1, factor_dtype=jnp.float16,
             scale_dtype=None, max_samples: Optional[int] = 512, report: Optional[dict] = None,
             progressive: bool = False) -> dict:
    """SVDQuant W{weight_bits}A{act_bits} of a float params tree.

    Args:
      params: float params tree.
      stats: pooled calibration statistics with the params' layer paths; each layer's dict
        needs ``"absmax"`` (``[C_in]``, or with leading per-step axes) and may hold
        ``"samples"`` (``[n, C_in]``) float32 calibration input tokens
        (``jaxdq.calibrate.collect_step_stats(samples=True)``, then ``pool_stats``).
      roles: path → role tag (the model's ``layer_roles``): the precision rules select on it.
      rank: low-rank branch rank (paper: 32 at 4 bit, 16 at 8 bit).
      weight_bits, act_bits, group_size: see :func:`svdquant_config`; ``act_group_size``
        (default ``group_size``) picks per-group (paper) or, with None, per-token
        activation scales.
      alpha: fixed smoothing strength for every layer; None searches ``alphas`` per
        layer on the layer's ``samples``; a layer without samples uses α = 0.5
        (:data:`FIXED_ALPHA`).
      rules: the precision rules (default :func:`svdquant_rules` at these bits).
      iters: refinement rounds of the SVD split.
      factor_dtype: storage dtype of the low-rank factors.
      scale_dtype: storage dtype of the weight scales (None: float32; the paper: float16).
      max_samples: calibration tokens per layer used by the α search.
      report: if given, filled with ``path → {"alpha", "error"?, "rank"}``.
      progressive: 4-bit weights of the full SVDQuant layers in the progressive group format
        (:func:`svdquant_rules`; ``scale_dtype`` then applies to the weight-only layers only).
    Returns:
      A new params tree; SVDQuant layers are QLinears whose transform holds the smoothing
      vector and the low-rank factors.
    """
    if stats is None:
        raise ValueError("svdquant needs calibration statistics (per-channel 'absmax' of each layer's input)")
    if rules is None:
        rules = svdquant_rules(weight_bits=weight_bits, act_bits=act_bits, group_size=group_size,
                               act_group_size=act_group_size, progressive=progressive)
    cfg_of = config_of(rules, roles)

    def convert(path, layer):
        cfg = cfg_of(path)
        if cfg is None or not isinstance(layer, FloatLinear):
            return layer
        if cfg.act is None:  # weight-only layer: plain quantization
            return quantize_linear(layer, dataclasses.replace(cfg, scale_dtype=scale_dtype))
        absmax, samples = layer_stats(stats, path, layer.in_features, max_samples=max_samples)
        info = {"rank": min(rank, layer.in_features, layer.out_features)}
        a = alpha
        if a is None and samples is not None:
            res = search_alpha(layer, samples, cfg, alphas=alphas, rank=rank, iters=iters,
                               act_absmax=absmax, factor_dtype=factor_dtype, scale_dtype=scale_dtype)
            a, info["error"] = res.alpha, res.error
        elif a is None:
            a = FIXED_ALPHA
        info["alpha"] = a
        if report is not None:
            report[path] = info
        return svdquant_layer(layer, cfg, act_absmax=absmax, alpha=a, rank=rank, iters=iters,
                              factor_dtype=factor_dtype, scale_dtype=scale_dtype)

    return map_layers(params, convert)
