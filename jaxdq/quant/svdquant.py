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

Which layers keep higher precision is a :class:`jaxdq.quant.rules.Rule` list,
:func:`svdquant_rules`, with these defaults:

* 16-bit (float): the patch/latent embedding and the final projection (first and
  last layers, :data:`jaxdq.quant.recipes.DEFAULT_KEEP_FLOAT`), the timestep /
  class / text embedders (SVDQuant keeps embeddings in 16 bit), and cross-attention
  key/value projections (the paper keeps them 16-bit in PixArt-Σ/SDXL since they
  act on the text tokens only and cost < 5 % of the runtime).
* W4A16 (4-bit group weights, 16-bit activations, no smoothing or low-rank): the
  adaptive-normalization linears (adaLN modulation): the paper keeps their inputs in
  16 bit for FLUX.1.

These two defaults are from the paper's implementation details (§5.1) as recalled
here; ``shared/seeds/svdquant.html`` (a blog summary) does not list them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.quant.lowrank import lowrank_layer
from jaxdq.quant.qlinear import QLinear
from jaxdq.quant.quantizer import QuantSpec, pack_int4, quantize
from jaxdq.quant.recipes import DEFAULT_KEEP_FLOAT
from jaxdq.quant.rules import (LayerQuant, Rule, get_path, is_float_linear, is_quantized_linear,
                               iter_linears, map_linears, quantize_linear)
from jaxdq.quant.smooth import smooth_layer, smoothing_factors

# α grid of the per-layer search (SVDQuant searches α; the SPEC quotes ≈0.5–0.7).
DEFAULT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
FIXED_ALPHA = 0.5  # used when no calibration samples are available

# Embedders (DiT t/y embedders; FLUX time/text/guidance embedders and context embedder) and
# FLUX's final projection, on top of the DiT first/last layers.
EMBEDDERS = (r"(^|/)t_embedder/", r"(^|/)y_embedder/", r"(^|/)time_text_embed/",
             r"(^|/)context_embedder$", r"^proj_out$")
# Cross-attention key/value projections (PixArt / SD naming: attn2.to_k / to_v).
CROSS_ATTN_KV = (r"(^|/)(attn2|cross_attn)/(to_k|to_v|k|v|kv)$",)
SVDQUANT_KEEP_FLOAT = tuple(DEFAULT_KEEP_FLOAT) + EMBEDDERS + CROSS_ATTN_KV
# Adaptive-normalization linears: DiT adaLN_modulation, FLUX norm1(_context)/norm/norm_out linears.
ADALN = (r"(^|/)adaLN_modulation$", r"(^|/)norm1(_context)?/linear$", r"(^|/)norm(_out)?/linear$")


def _spec(bits: int, group_size: Optional[int], fine: str) -> QuantSpec:
    """Symmetric spec: per group of ``group_size`` for <= 4 bits, else ``fine`` ("channel"/"token")."""
    if group_size and bits <= 4:
        return QuantSpec(bits=bits, granularity="group", group_size=group_size)
    return QuantSpec(bits=bits, granularity=fine)


_SAME = "same"


def svdquant_config(weight_bits: int = 4, act_bits: Optional[int] = 4, group_size: Optional[int] = 64,
                    act_group_size: Optional[int] | str = _SAME) -> LayerQuant:
    """LayerQuant of SVDQuant's residual GEMM: symmetric weights and dynamic symmetric
    activations, per group of ``group_size`` input channels at 4 bits (per output
    channel / per token at 8 bits); 4-bit weight codes packed.  ``act_bits=None``:
    float activations (W{b}A16).  ``act_group_size`` (default: ``group_size``) sets the
    activations' group separately; None = one scale per token (what the fused GPU
    kernels of :mod:`pallas_kernels.ops` support today)."""
    ag = group_size if act_group_size == _SAME else act_group_size
    act = None if act_bits is None else _spec(act_bits, ag, "token")
    return LayerQuant(weight=_spec(weight_bits, group_size, "channel"), act=act, pack=weight_bits <= 4)


def svdquant_rules(*, weight_bits: int = 4, act_bits: int = 4, group_size: Optional[int] = 64,
                   act_group_size: Optional[int] | str = _SAME, keep_float: Sequence[str] = SVDQUANT_KEEP_FLOAT,
                   weight_only: Sequence[str] = ADALN) -> list[Rule]:
    """The paper's precision defaults as rules (first match wins).

    ``keep_float`` patterns (and roles embedding/time-embedding/final) stay float;
    ``weight_only`` patterns (and role adaLN) get W{weight_bits}A16 per group; every
    other linear gets the full SVDQuant treatment.  :func:`svdquant` applies smoothing
    and the low-rank branch only to rules whose config quantizes activations.
    """
    w16 = svdquant_config(weight_bits, None, group_size)
    return ([Rule(p, None) for p in keep_float]
            + [Rule(".*", None, roles=("embedding", "time-embedding", "final"))]
            + [Rule(p, w16) for p in weight_only]
            + [Rule(".*", w16, roles=("adaLN",))]
            + [Rule(".*", svdquant_config(weight_bits, act_bits, group_size, act_group_size))])


def fit_config(cfg: LayerQuant, c_in: int, c_out: int = 2) -> LayerQuant:
    """``cfg`` fitted to a ``[c_in, c_out]`` kernel: group specs that do not divide ``c_in``
    become channel/token ones; int4 packing (two codes per byte along C_out) is dropped
    for an odd ``c_out``."""
    def fit(spec, fine):
        if spec is None or spec.granularity != "group" or c_in % spec.group_size == 0:
            return spec
        return QuantSpec(bits=spec.bits, granularity=fine)
    return dataclasses.replace(cfg, weight=fit(cfg.weight, "channel"), act=fit(cfg.act, "token"),
                               pack=cfg.pack and c_out % 2 == 0)


def quantize_weight_layer(layer: Mapping, cfg: LayerQuant, scale_dtype=None) -> QLinear:
    """``quantize_linear`` with the weight scales stored as ``scale_dtype`` (e.g. float16,
    as the paper's INT4 kernels do); the codes are recomputed against the rounded scales
    so the stored (codes, scales) pair is exactly what the layer uses.  None: float32."""
    q = quantize_linear(layer, cfg)
    if scale_dtype is None or cfg.weight.granularity == "tensor":
        return q
    if not cfg.weight.symmetric:
        raise ValueError("scale_dtype applies to symmetric weight quantization only")
    s = q.w_scale.astype(scale_dtype)
    codes = quantize(jnp.asarray(layer["kernel"], jnp.float32), s.astype(jnp.float32), None, cfg.weight,
                     kind="weight")
    return q.replace(qweight=pack_int4(codes) if cfg.pack else codes, w_scale=s)


def svdquant_layer(layer: Mapping, cfg: LayerQuant, *, act_absmax=None, alpha: Optional[float] = None,
                   rank: int = 32, iters: int = 0, factor_dtype=jnp.float16, scale_dtype=None) -> QLinear:
    """One float layer dict → its SVDQuant QLinear.

    Args:
      layer: ``{"kernel": [C_in, C_out], "bias"?: [C_out]}`` float layer.
      cfg: quantizer of the residual GEMM (:func:`svdquant_config`).
      act_absmax: ``[C_in]`` calibration max |x| per input channel (needed if ``alpha``).
      alpha: smoothing strength; None = no smoothing.
      rank: low-rank branch rank (clipped to ``min(C_in, C_out)``); 0 = no branch.
      iters: refinement rounds of the split (:func:`jaxdq.quant.lowrank.svd_split`).
      factor_dtype: storage dtype of ``lowrank_a``/``lowrank_b`` (None: float32).
      scale_dtype: storage dtype of the weight scales (None: float32), see
        :func:`quantize_weight_layer`.
    """
    if alpha is not None:
        if act_absmax is None:
            raise ValueError("smoothing (alpha given) needs the layer's act_absmax")
        layer = smooth_layer(layer, smoothing_factors(act_absmax, layer["kernel"], alpha))
    rank = min(rank, *np.shape(layer["kernel"]))
    layer = lowrank_layer(layer, rank, quant_spec=cfg.weight, iters=iters, factor_dtype=factor_dtype)
    q = quantize_weight_layer(layer, cfg, scale_dtype)
    if factor_dtype is not None and q.lowrank_a is not None:
        # exact: the factors were rounded to factor_dtype before the residual was formed
        q = q.replace(lowrank_a=q.lowrank_a.astype(factor_dtype), lowrank_b=q.lowrank_b.astype(factor_dtype))
    return q


def output_error(layer: Mapping, q: Callable[[jax.Array], jax.Array], x) -> float:
    """``‖X W + b − q(X)‖²`` (sum of squares over ``X: [n, C_in]``) against a float64 reference."""
    x64 = np.asarray(x, np.float64)
    ref = x64 @ np.asarray(layer["kernel"], np.float64)
    if layer.get("bias") is not None:
        ref = ref + np.asarray(layer["bias"], np.float64)
    out = np.asarray(q(jnp.asarray(x, jnp.float32)), np.float64)
    return float(np.sum((ref - out) ** 2))


class AlphaResult(NamedTuple):
    alpha: float
    error: float                   # output error of the layer at ``alpha``
    errors: tuple[float, ...]      # output error for each α of the grid, in grid order


def search_alpha(layer: Mapping, x_samples, cfg: LayerQuant, *, alphas: Sequence[float] = DEFAULT_ALPHAS,
                 rank: int = 32, iters: int = 0, act_absmax=None, factor_dtype=jnp.float16,
                 scale_dtype=None) -> AlphaResult:
    """Per-layer smoothing strength minimizing the fully quantized layer's output error.

    For each α: smooth → SVD split (rank, iters) → quantize (``cfg``); error is
    ``‖X W + b − Q-layer(X)‖²`` on ``x_samples [n, C_in]`` (float32 calibration tokens).
    ``act_absmax`` ``[C_in]`` defaults to ``max |x_samples|`` per channel.
    Returns the best α (first on ties), its error and all the errors.
    """
    x = np.asarray(x_samples, np.float32).reshape(-1, np.shape(layer["kernel"])[0])
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


def svdquant(params: Mapping, stats: Mapping, *, rank: int = 32, weight_bits: int = 4, act_bits: int = 4,
             group_size: Optional[int] = 64, act_group_size: Optional[int] | str = _SAME,
             alpha: Optional[float] = None,
             alphas: Sequence[float] = DEFAULT_ALPHAS, keep_float: Sequence[str] = SVDQUANT_KEEP_FLOAT,
             weight_only: Sequence[str] = ADALN, rules: Optional[Sequence[Rule]] = None,
             roles: Optional[Mapping[str, str]] = None, iters: int = 1, factor_dtype=jnp.float16,
             scale_dtype=None,
             max_samples: Optional[int] = 512, report: Optional[dict] = None) -> dict:
    """SVDQuant W{weight_bits}A{act_bits} of a float params tree.

    Args:
      params: float params tree (linear layers are ``{"kernel", "bias"}`` dicts).
      stats: calibration tree with the params' linear paths; each leaf dict needs
        ``"absmax"`` (``[C_in]``, or with leading per-step axes) and may hold
        ``"samples"`` (``[n, C_in]`` or ``[S, k, C_in]``) float32 calibration input
        tokens (``jaxdq.calibrate.collect_step_stats(samples=True)``).  A
        ``jaxdq.pipeline.calibrate`` result (``{"t", "cond", "uncond"}``) is pooled
        over steps and branches first (``jaxdq.calibrate.pool_stats``).
      rank: low-rank branch rank (paper: 32 at 4 bit, 16 at 8 bit).
      weight_bits, act_bits, group_size: see :func:`svdquant_config`; ``act_group_size``
        (default ``group_size``) picks per-group (paper) or, with None, per-token
        activation scales.
      alpha: fixed smoothing strength for every layer; None searches ``alphas`` per
        layer on the layer's ``samples``.  A layer without samples uses α = 0.5
        (:data:`FIXED_ALPHA`): ``collect_act_stats`` stores no samples, so with its
        stats alone every layer gets α = 0.5.
      keep_float / weight_only: the precision rule defaults (module docstring);
        ``rules`` replaces the whole rule list (:func:`svdquant_rules`).
      roles: path → role tag, for role-selecting rules.
      iters: refinement rounds of the SVD split.
      factor_dtype: storage dtype of the low-rank factors.
      scale_dtype: storage dtype of the weight scales (None: float32; the paper: float16).
      max_samples: calibration tokens per layer used by the α search.
      report: if given, filled with ``path → {"alpha", "error"?, "rank"}``.
    Returns:
      A new params tree; SVDQuant layers are ``{"qlinear": QLinear}`` with ``smooth``,
      ``lowrank_a``, ``lowrank_b`` set.
    """
    if stats is None:
        raise ValueError("svdquant needs calibration statistics (per-channel 'absmax' of each layer's input)")
    if "cond" in stats:  # a jaxdq.pipeline.calibrate result: pool steps and CFG branches
        from jaxdq.calibrate import pool_stats

        stats = pool_stats(stats)
    if rules is None:
        rules = svdquant_rules(weight_bits=weight_bits, act_bits=act_bits, group_size=group_size,
                               act_group_size=act_group_size, keep_float=keep_float, weight_only=weight_only)
    roles = roles or {}

    def convert(path, layer):
        if not is_float_linear(layer):
            return layer
        rule = next((r for r in rules if r.matches(path, roles.get(path))), None)
        if rule is None or rule.config is None:
            return layer
        c_in, c_out = (int(d) for d in np.shape(layer["kernel"]))
        cfg = fit_config(rule.config, c_in, c_out)
        if cfg.act is None:  # weight-only layer: plain quantization
            return {"qlinear": quantize_weight_layer(layer, cfg, scale_dtype)}
        absmax, samples = layer_stats(stats, path, c_in, max_samples=max_samples)
        info = {"rank": min(rank, *np.shape(layer["kernel"]))}
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
        return {"qlinear": svdquant_layer(layer, cfg, act_absmax=absmax, alpha=a, rank=rank, iters=iters,
                                          factor_dtype=factor_dtype, scale_dtype=scale_dtype)}

    return map_linears(params, convert)


def weight_bytes(params: Mapping) -> int:
    """Bytes of every linear layer's stored weight: float kernels, or a QLinear's codes,
    scales, zero points, low-rank factors and smoothing vector (biases excluded)."""
    total = 0
    for _, layer in iter_linears(params):
        if is_quantized_linear(layer):
            q = layer["qlinear"]
            arrays = (q.qweight, q.w_scale, q.w_zero, q.lowrank_a, q.lowrank_b, q.smooth)
        else:
            arrays = (layer["kernel"],)
        total += sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays if a is not None)
    return total
