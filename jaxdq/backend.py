"""How quantized layers execute: the one place that decides, per layer, between the
fake-quant reference, the integer-accumulator path and the Pallas kernels.

The decision comes from a frozen :class:`Policy`, never from the layer or the checkpoint
(a checkpoint stores what a layer computes, not how it runs) and never from module
state.  :func:`bind` attaches a policy to a params tree for one model call; the model's
``jaxdq.nn.Linear`` hands every layer to :func:`linear`, which dispatches::

    params ──bind(params, policy)──► Bound(layer, policy) ──Linear──► linear() ──► execute()

``execute`` (:func:`choose` picks the implementation):

* ``"fake"``: the reference, ``Q_a(X') · deq(W_q)`` in float32 (``QLinear.product_fake``);
* ``"int"``: int8 × int8 → int32 then ``s_x · s_w`` (``QLinear.product_int``), where the
  layer's operands allow it (symmetric, per-token/tensor × per-channel/tensor);
* ``"weight_only"``: a W{b}A16 layer on a GPU, codes dequantized to the activation dtype
  and XLA's dot;
* ``"kernel"``: the fused quantize kernel (``X' = H(X/smooth)``, int8 codes, per-token or
  per-(token, group) scales, ``X' L1``) then the integer GEMM with the fused epilogue
  (``acc · s_x · s_w + bias + (X' L1) L2``): Mosaic GPU wgmma on Hopper, Pallas-Triton
  elsewhere (:mod:`pallas_kernels`).

Where a quantized linear reads a normalized, modulated input (``h = norm(x)·(1+scale)+shift``,
the models call :func:`jaxdq.norm_linear.norm_linear` there), :func:`fuse_norm` decides
whether its quantize runs inside the norm (one kernel reading ``x``) instead.

Every path computes the same function (the reference's) up to the kernels' bf16 output
rounding; the tests check each against it.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from jaxdq.quant.progressive import ProgressiveWeight
from jaxdq.quant.twinlog import TwinLogWeight
from jaxdq.quant.layers import (ConvGeometry, FloatConv, FloatLinear, QConv, QLinear, QWeight, Segmented, as_layer,
                                forward, map_layers)

MODES = ("reference", "integer", "kernels")
GEMMS = ("auto", "triton", "hopper")
CONV_IMPLS = ("xla", "im2col")


@dataclasses.dataclass(frozen=True)
class Policy:
    """How the quantized layers of one model call execute (hashable: jit specialises on it).

    mode: "reference" (fake quantization in float32, the semantics every other path is
      tested against), "integer" (integer-accumulator XLA path where a layer allows it),
      or "kernels" (the Pallas kernels on a GPU; elsewhere the integer/reference paths).
    gemm: with kernels, "auto" (Mosaic GPU wgmma on sm_90, Pallas-Triton on other GPUs),
      "triton" or "hopper".
    fuse_lowrank: on the Hopper GEMM, add the low-rank up-projection inside the kernel (a
      second wgmma accumulator) instead of as an XLA product after it.  H100
      (bench/results/kernels_h100_run2.json): DiT fc1 0.097 vs 0.230 ms, W4A4 g64 0.301 vs
      0.464 ms; PixArt-Σ SVDQuant step 146 vs 156 ms.
    small_m: layers called on at most this many rows (adaLN / FLUX modulation on the
      conditioning vector) take the integer path instead of the kernels: a GEMV-like
      product is weight-bandwidth-bound and the kernel path pads rows to 64 and adds a
      quantize launch.  H100 (kernels_h100_run4.json, call 3): DiT adaLN 1152→6912 at M = 2,
      W8A8 7.2 µs vs 15.8 through the kernels; FLUX modulation 3072→18432 W8A8 26.2 µs vs
      39.9 (1.46× bf16); DiT-XL/2 W8A8 step 4.62 → 4.16 ms (e2e_h100_run3.json).  0 = off.
    interpret: run the kernels in interpret mode (Pallas-Triton ``interpret=True``; the
      Hopper GEMM in jax's Mosaic GPU interpreter): the kernel path on a CPU, for tests.
    conv: how a quantized convolution's integer path runs (modes "integer" and "kernels"):
      "xla" (XLA's convolution on int8 operands with an int32 accumulator) or "im2col"
      (patches by slicing, then XLA's int8 × int8 → int32 dot) — :meth:`QConv.conv_int`.
    fuse_norm: mode "kernels": a quantized linear reading ``norm(x)·(1+scale)+shift`` takes
      the fused norm → quantize kernel (:func:`fuse_norm`); False: ``h`` by XLA, then the
      separate quantize kernel (the baseline the fused path is measured against).
    fuse_epilogue: mode "kernels" on the Hopper GEMM: what a model asks to follow a linear
      (an :class:`Epilogue`: GELU, ``residual + gate · y``) runs in the GEMM's epilogue where
      :func:`fuse_epilogue` allows; False: by XLA after the GEMM.
    fuse_residual: with ``fuse_epilogue``, also an epilogue with a gate or a residual (DiT's
      ``x + gate · proj(h)``); False (default): only activation-only epilogues (fc1's GELU).
      The gate / residual fragments load uncoalesced after the main loop: on an H200
      (bench/results/epilogue_defaults_h200.jsonl, kernel time) FLUX.1 W8A8 93.9 ms with the
      GELU alone in the GEMMs vs 100.7 with gate and residual too, PixArt-Σ 30.0 vs 30.2.
    """

    mode: str = "reference"
    gemm: str = "auto"
    fuse_lowrank: bool = True
    small_m: int = 64
    interpret: bool = False
    conv: str = "xla"
    fuse_norm: bool = True
    fuse_epilogue: bool = True
    fuse_residual: bool = False

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"policy mode must be one of {MODES}, got {self.mode!r}")
        if self.gemm not in GEMMS:
            raise ValueError(f"policy gemm must be one of {GEMMS}, got {self.gemm!r}")
        if not isinstance(self.small_m, int) or self.small_m < 0:
            raise ValueError(f"small_m must be an int >= 0, got {self.small_m!r}")
        if self.conv not in CONV_IMPLS:
            raise ValueError(f"policy conv must be one of {CONV_IMPLS}, got {self.conv!r}")


REFERENCE = Policy()


def policy(mode: str = "reference", **options: Any) -> Policy:
    """The execution policy: ``policy("kernels")`` for the Pallas kernels on a GPU,
    ``policy("integer")``, or the default ``policy()`` (fake-quant reference)."""
    return Policy(mode=mode, **options)


@struct.dataclass
class Bound:
    """A quantized layer with the policy it executes under, for one model call."""

    layer: Any
    policy: Policy = struct.field(pytree_node=False, default=REFERENCE)


def bind(params: Mapping, pol: Policy) -> Mapping:
    """``params`` whose quantized layers execute under ``pol`` (the reference policy returns
    ``params`` itself).  Call it inside the jitted function, after time-dependent layers
    are resolved (:func:`jaxdq.quant.timestep.timestep_aware`); never save bound params."""
    if pol == REFERENCE:
        return params

    def wrap(_, layer):
        if isinstance(layer, Segmented):
            raise TypeError("bind() after timestep resolution: this tree still holds Segmented layers")
        return Bound(layer, pol) if isinstance(layer, (QLinear, QConv)) else layer

    return map_layers(params, wrap)


EPILOGUE_ACTS = (None, "gelu_tanh")


@struct.dataclass
class Epilogue:
    """What a model applies to a linear's output ``y [N, T, C_out]`` right after it:
    ``out = residual + gate · act(y)`` (each term optional), by the same ops the models
    used inline (:meth:`apply`), or inside the GEMM (:func:`fuse_epilogue`).

    act: None or "gelu_tanh" (``jax.nn.gelu(·, approximate=True)``; static).
    gate: ``[N, C_out]`` per sample (DiT's ``gate_msa``/``gate_mlp``), or None.
    residual: ``[N, T, C_out]`` (the residual stream), or None.
    """

    gate: Any = None
    residual: Any = None
    act: Any = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if self.act not in EPILOGUE_ACTS:
            raise ValueError(f"epilogue act must be one of {EPILOGUE_ACTS}, got {self.act!r}")

    def apply(self, y: jax.Array) -> jax.Array:
        """``residual + gate · act(y)`` by XLA."""
        if self.act == "gelu_tanh":
            y = jax.nn.gelu(y, approximate=True)
        if self.gate is not None:
            g = self.gate
            y = g.reshape(g.shape[0], *(1,) * (y.ndim - 2), g.shape[-1]) * y
        if self.residual is not None:
            y = self.residual + y
        return y

    def without_act(self) -> "Epilogue":
        return self.replace(act=None)


def linear(node: Any, x: jax.Array, epilogue: Optional[Epilogue] = None) -> jax.Array:
    """``y = layer(x)`` for whatever a linear module's params are (float dict, typed layer,
    or a :class:`Bound` one), then ``epilogue`` (:class:`Epilogue`; fused into the GEMM
    where :func:`fuse_epilogue` allows).  ``x [..., C_in]`` → ``[..., C_out]`` in ``x.dtype``."""
    if isinstance(node, Bound):
        return execute(node.layer, x, node.policy, epilogue)
    layer = as_layer(node)
    if layer is None:
        raise TypeError(f"not a linear layer: {type(node).__name__}")
    if isinstance(layer, Segmented):
        raise TypeError("time-dependent layers must be resolved first (jaxdq.quant.timestep.timestep_aware)")
    return execute(layer, x, REFERENCE, epilogue)


def fuse_epilogue(q: QLinear, x: Any, epilogue: Optional[Epilogue], pol: Policy) -> bool:
    """Whether quantized linear ``q`` on ``x [N, T, C_in]`` (an array or anything with its
    ``shape``/``dtype``) runs ``epilogue`` inside the Hopper GEMM
    (:func:`pallas_kernels.int_gemm_hopper.int8_gemm_ws`'s ``activation``, ``gate``,
    ``residual``): ``policy("kernels", fuse_epilogue=True)`` with the Hopper GEMM chosen for
    these rows, a bf16 model (the kernel's output dtype: a float32 model keeps its float32
    epilogue by XLA) and residual, and ``T`` a multiple of 256 (the CTA tile's rows stay in
    one sample)."""
    x_shape = tuple(x.shape)
    if epilogue is None or pol.mode != "kernels" or not pol.fuse_epilogue or len(x_shape) != 3:
        return False
    if not pol.fuse_residual and (epilogue.gate is not None or epilogue.residual is not None):
        return False
    if x.dtype != jnp.bfloat16:
        return False
    if isinstance(q.weight, TwinLogWeight) or choose(q, math.prod(x_shape[:-1]), pol) != "kernel":
        return False
    if not _hopper_selected(pol) or _act_group(q) not in (0, 64, 128):
        return False
    if q.transform.lowrank_a is not None and not pol.fuse_lowrank:
        return False
    r = epilogue.residual
    if r is not None and (r.dtype != jnp.bfloat16 or r.shape != (*x_shape[:-1], q.out_features)):
        return False
    g = epilogue.gate
    if g is not None and g.shape != (x_shape[0], q.out_features):
        return False
    return x_shape[1] % 256 == 0


def conv(node: Any, x: jax.Array, geom: ConvGeometry) -> jax.Array:
    """``y = conv layer(x)`` for whatever a conv module's params are (the float HWIO dict,
    a :class:`FloatConv` / :class:`QConv`, or a :class:`Bound` one).
    ``x [N, H, W, C_in]`` → ``[N, H', W', C_out]`` in ``x.dtype``."""
    if isinstance(node, Bound):
        return execute_conv(node.layer, x, geom, node.policy)
    layer = as_layer(node)
    if not isinstance(layer, (FloatConv, QConv)):
        raise TypeError(f"not a conv layer: {type(node).__name__}")
    return execute_conv(layer, x, geom, REFERENCE)


def choose_conv(q: QConv, pol: Policy) -> str:
    """The implementation of quantized conv ``q`` under ``pol``: "fake" (the reference) or
    "int" (:meth:`QConv.conv_int`, ``pol.conv`` picking XLA's int8 conv or im2col + int8
    dot), the latter in modes "integer" and "kernels" where the layer allows it (there is
    no Pallas conv kernel: "kernels" takes the integer path)."""
    if pol.mode == "reference" or not q.int_path_ok():
        return "fake"
    return "int"


def execute_conv(layer: Any, x: jax.Array, geom: ConvGeometry, pol: Policy) -> jax.Array:
    """Run one conv layer on ``x [N, H, W, C_in]`` under ``pol`` (output in ``x.dtype``)."""
    if isinstance(layer, FloatConv):
        return layer(x, geom)
    if not isinstance(layer, QConv):
        raise TypeError(f"execute_conv() runs conv layers, not {type(layer).__name__}")
    if layer.act is not None:
        layer.act.check_resolved()
    if choose_conv(layer, pol) == "int":
        y = layer.conv_int(x, geom, impl=pol.conv)
    else:
        y = layer.conv_fake(x, geom)
    return y.astype(x.dtype)


def _on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def _is_hopper() -> bool:
    dev = jax.devices()[0]
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") in ("9.0", "9.0a")


def _act_group(q: QLinear) -> int:
    a = q.act.spec
    return a.group_size if a.granularity == "group" else 0


def kernel_supported(q: QLinear) -> bool:
    """Whether the kernels compute ``q``: dynamic per-token or per-group activations
    (asymmetric only per token, with per-channel weights), symmetric per-channel or
    per-group weights, K and N multiples of 128, one group size (a power of two ≥ 32)
    shared by weights and activations, a block-Hadamard rotation of a power-of-two block
    ≥ 16 (equal to the activation group if both are set)."""
    if q.act is None or q.act.static or not isinstance(q.weight, QWeight):  # uniform codes only
        return False
    a, w = q.act.spec, q.weight.spec
    if a.fmt != "int" or w.fmt != "int":  # FP8 layers: XLA's fp8 dot (the "int" path), not the int8 kernels
        return False
    if a.granularity not in ("token", "group"):
        return False
    if not a.symmetric and (a.granularity != "token" or w.granularity != "channel"):
        return False
    if not w.symmetric or q.weight.zero is not None or w.granularity not in ("channel", "group"):
        return False
    k, n = q.in_features, q.out_features
    if k % 128 or n % 128:
        return False
    groups = [g for g in (w.group_size if w.granularity == "group" else 0, _act_group(q)) if g]
    if any(g % 32 or k % g or g & (g - 1) for g in groups) or len(set(groups)) > 1:
        return False
    rot = q.transform.rotation
    block = 0 if rot is None else getattr(rot, "kernel_block", 0)
    if rot is not None and (block < 16 or block & (block - 1)):
        return False
    if _act_group(q) and block and block != _act_group(q):
        return False
    return True


def _hopper_selected(pol: Policy) -> bool:
    """Whether the kernel path's GEMM is the Mosaic GPU (Hopper) one under ``pol``."""
    return pol.gemm == "hopper" or (pol.gemm == "auto" and not pol.interpret and _is_hopper())


def progressive_kernel_supported(q: QLinear) -> bool:
    """Whether the Hopper GEMM computes ``q`` with a :class:`~jaxdq.quant.progressive.ProgressiveWeight`:
    packed codes, groups of 64 or 128, dynamic symmetric per-token integer activations of at
    most 8 bits, K and N multiples of 128, a block-Hadamard rotation of a power-of-two block
    ≥ 16 or none.  (Other GPUs, small M and the rest run the XLA integer path.)"""
    w = q.weight
    if not isinstance(w, ProgressiveWeight) or q.act is None or q.act.static:
        return False
    a = q.act.spec
    if not (a.symmetric and a.granularity == "token" and a.bits <= 8 and a.fmt == "int"):
        return False
    if not w.packed or w.group_size not in (64, 128) or q.in_features % 128 or q.out_features % 128:
        return False
    rot = q.transform.rotation
    block = 0 if rot is None else getattr(rot, "kernel_block", 0)
    return rot is None or (block >= 16 and not block & (block - 1))


def choose(q: QLinear, rows: int, pol: Policy) -> str:
    """The implementation of quantized linear ``q`` called on ``rows`` rows under ``pol``:
    "fake", "int", "weight_only" or "kernel" (see the module docstring)."""
    exact = "int" if q.int_path_ok() else "fake"
    if pol.mode == "reference":
        return "fake"
    if pol.mode == "integer":
        return exact
    accel = pol.interpret or _on_gpu()
    if not accel:
        return exact
    if q.act is None:
        return "weight_only"
    if twinlog_kernel_supported(q):  # the twin-log GEMM at every M (its XLA int path is int32 × int32)
        return "kernel"
    if isinstance(q.weight, ProgressiveWeight):  # only the Hopper GEMM expands its groups in the kernel
        if not (progressive_kernel_supported(q) and _hopper_selected(pol)) or rows <= pol.small_m:
            return exact
        return "kernel"
    if not kernel_supported(q):
        return exact
    if rows <= pol.small_m and q.int_path_ok():
        return "int"
    return "kernel"


def fuse_norm(node: Any, x_shape: tuple, batch: int) -> bool:
    """Whether the linear ``node`` reading ``h = norm(x)·(1 + scale) + shift`` (``x_shape``
    ``[..., K]``, ``batch`` modulation rows) takes the fused norm → quantize kernel
    (:mod:`jaxdq.norm_linear`, :func:`pallas_kernels.norm_quantize.norm_quantize`) instead of
    ``h`` then its own path.  Only a :class:`Bound` :class:`QLinear` under ``policy("kernels")``
    (a GPU, or ``interpret``) with uniform or FP8 codes, dynamic symmetric per-token
    activations and a kernel-block rotation (or none): int8 codes where :func:`choose` picks
    "kernel" for these rows; FP8 (e4m3 weights and activations) above ``small_m`` rows.  The
    kernel's row blocks must stay inside one sample (``supported``)."""
    from pallas_kernels.norm_quantize import norm_quantize_config, supported

    if not isinstance(node, Bound) or not isinstance(node.layer, QLinear):
        return False
    q, pol = node.layer, node.policy
    if pol.mode != "kernels" or not pol.fuse_norm or not isinstance(q.weight, QWeight):  # not twin-log codes
        return False
    if q.act is None or q.act.static or q.act.t is not None:
        return False
    a, w = q.act.spec, q.weight.spec
    if a.granularity != "token" or not a.symmetric:
        return False
    m = math.prod(x_shape[:-1])
    if a.fmt == "int":
        if choose(q, m, pol) != "kernel":
            return False
    elif (w.fmt != a.fmt or not q.int_path_ok() or not (pol.interpret or _on_gpu())
          or m <= pol.small_m):  # FP8: XLA's fp8 dot (or the e4m3 wgmma) after the kernel
        return False
    k = q.in_features
    if x_shape[-1] != k or m % batch:
        return False
    rot = q.transform.rotation
    had = 0 if rot is None else getattr(rot, "kernel_block", 0)
    if rot is not None and (had < 16 or had & (had - 1) or k % had):
        return False
    rank = q.transform.rank
    cfg = norm_quantize_config(m, k, tokens=m // batch, dot=bool(had or rank))
    return supported(m, k, m // batch, had_block=had, l1_rank=-(-rank // 16) * 16, block_m=cfg.block_m)


def execute(layer: Any, x: jax.Array, pol: Policy, epilogue: Optional[Epilogue] = None) -> jax.Array:
    """Run one linear layer on ``x [..., C_in]`` under ``pol``, then ``epilogue``."""
    if isinstance(layer, QLinear) and fuse_epilogue(layer, x, epilogue, pol):
        layer.act.check_resolved()
        e = epilogue
        y = _kernel_forward(layer, x.reshape(-1, layer.in_features), pol,
                            e.gate,
                            None if e.residual is None else e.residual.reshape(-1, layer.out_features), act=e.act)
        return y.reshape(*x.shape[:-1], layer.out_features).astype(x.dtype)
    y = _execute(layer, x, pol)
    return y if epilogue is None else epilogue.apply(y)


def _execute(layer: Any, x: jax.Array, pol: Policy) -> jax.Array:
    if isinstance(layer, FloatLinear):
        return layer(x)
    if not isinstance(layer, QLinear):
        raise TypeError(f"execute() runs linear layers, not {type(layer).__name__}")
    if layer.act is not None:
        layer.act.check_resolved()
    impl = choose(layer, math.prod(x.shape[:-1]), pol)
    if impl == "fake":
        return forward(layer.transform, layer.bias, x, layer.product_fake, jnp.float32)
    if impl == "int":
        return forward(layer.transform, layer.bias, x, layer.product_int, jnp.float32)
    if impl == "weight_only":
        return _weight_only(layer, x)
    fwd = _twinlog_kernel_forward if isinstance(layer.weight, TwinLogWeight) else _kernel_forward
    y = fwd(layer, x.reshape(-1, layer.in_features), pol)
    return y.reshape(*x.shape[:-1], layer.out_features).astype(x.dtype)


def _weight_only(q: QLinear, x: jax.Array) -> jax.Array:
    """W{b}A16: codes dequantized to ``x.dtype`` (one XLA fusion), XLA's dot, f32 accumulation."""
    w = q.weight.dequantize().astype(x.dtype)
    product = lambda xt: jnp.dot(xt, w, preferred_element_type=jnp.float32)  # noqa: E731
    return forward(q.transform, q.bias, x, product, x.dtype)


def _weight_nk(q: QLinear):
    """Weight codes K-major for the Hopper kernel: int8 ``[N, K]`` or ``jnp.int4 [N, K]``."""
    if q.weight.layout == "nk":
        return q.weight.stored()
    codes = q.weight.unpacked().T  # "kn" layout: one transpose (and unpack) per call
    return codes.astype(jnp.int4) if q.weight.packed else codes


# Jitted: a model calls it once per layer with the same few shapes, and jax lowers each
# (shapes, static config) once and calls that lowering from every site.  Without it,
# DiT-XL/2's ~170 kernel call sites took 87 s to lower.
@functools.partial(jax.jit, static_argnames=("pol", "act"))
def _kernel_forward(q: QLinear, x2: jax.Array, pol: Policy, gate=None, residual=None, act=None) -> jax.Array:
    """The kernel path on ``x2 [M, C_in]`` → bf16 ``[M, C_out]``; ``gate [B, C_out]``,
    ``residual [M, C_out]``, ``act``: an :class:`Epilogue` the Hopper GEMM fuses
    (:func:`fuse_epilogue` checked that it can)."""
    from pallas_kernels.int_gemm import GemmConfig, int_gemm
    from pallas_kernels.quantize_act import quantize_act, quantize_config

    m = x2.shape[0]
    bm = 128 if m >= 128 else 64
    m_pad = -(-m // bm) * bm
    if m_pad != m:  # zero rows quantize to zero codes and are sliced off
        x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0)))
    t = q.transform
    l1, l2 = t.lowrank_a, t.lowrank_b
    if l1 is not None and l1.shape[1] % 16:  # zero-pad the rank to the dot minimum (exact)
        pad = 16 - l1.shape[1] % 16
        l1 = jnp.pad(l1, ((0, 0), (0, pad)))
        l2 = jnp.pad(l2, ((0, pad), (0, 0)))
    had = 0 if t.rotation is None else t.rotation.kernel_block
    ag = _act_group(q)
    qcfg = quantize_config(m_pad, q.in_features, dot=l1 is not None or bool(had), smooth=t.smooth is not None,
                           grouped=bool(ag))
    qcfg = dataclasses.replace(qcfg, interpret=pol.interpret)
    sym = q.act.spec.symmetric
    outs = quantize_act(x2, bits=q.act.spec.bits, smooth=t.smooth, had_block=had, l1=l1, group_size=ag,
                        symmetric=sym, config=qcfg)
    codes, sx, xl1 = outs[:3]
    zx = None if sym else outs[3]
    bias = None if q.bias is None else q.bias.astype(jnp.float32)
    w = q.weight
    epi = dict(gate=gate, residual=residual, act=act)
    if isinstance(w, ProgressiveWeight):  # chosen only with the Hopper GEMM (choose)
        return _hopper_gemm(q, codes, sx, zx, xl1, l2, bias, 0, m_pad, pol, **epi)[:m]
    group = max(ag, w.spec.group_size if w.spec.granularity == "group" else 0)
    hopper = _hopper_selected(pol)
    if hopper and group in (0, 64, 128):
        y = _hopper_gemm(q, codes, sx, zx, xl1, l2, bias, group, m_pad, pol, **epi)
    else:
        y = int_gemm(codes, w.codes, sx, w.scale, bias=bias, xa=xl1, l2=l2, x_zero=zx, packed=w.packed,
                     w_kmajor=w.layout == "nk", out_dtype=jnp.bfloat16,
                     config=GemmConfig(block_m=bm, interpret=pol.interpret))
    return y[:m]


def _hopper_gemm(q, codes, sx, zx, xl1, l2, bias, group, m_pad, pol, gate=None, residual=None, act=None):
    from pallas_kernels.int_gemm_hopper import (HopperGemmConfig, device_num_sms, gpu_interpret_params,
                                                int8_gemm_ws, pick_tile_n)

    fuse = pol.fuse_lowrank and xl1 is not None
    w = q.weight
    pg = isinstance(w, ProgressiveWeight)
    if pg:  # QServe's W4A8: per-channel s1, the groups' integer zero/scale expanded in the kernel
        wt, w_zero, w_gscale = w.kernel_operands()
        sw = w.s1.reshape(-1)
    else:
        wt, w_zero, w_gscale = _weight_nk(q), None, None
        sw = w.scale.reshape(-1) if w.spec.granularity == "channel" else w.scale
    # The low-rank product goes into the scaled accumulator (no second one, so the plain
    # tile rule applies): −1 to +17% over the plain GEMM on the H200 vs +8 to +25% with a
    # second accumulator at tile_n 64 (bench/results/lowrank_alias_h200.json).  (The GPU interpreter
    # has no run_state rule: there the kernel uses the second accumulator itself.)
    tile_n = None  # the kernel's default (64) with group scales
    if not group:
        tile_n = pick_tile_n(m_pad, q.out_features, num_sms=device_num_sms())
    num_sms = None  # the persistent grid: one CTA per SM of the device
    if pol.interpret:
        # The GPU interpreter simulates every CTA (seconds each on a CPU, idle ones too, so
        # not the device's 132) and can deadlock at a barrier when a CTA walks several
        # output tiles (pallas_kernels/NOTES.md): one CTA per tile, at most, from the bound
        # ceil(M / 128) · N / 128 ≥ the kernel's tile count (its CTA tile is ≥ 128 × 128).
        num_sms = max(1, -(-m_pad // 128) * (q.out_features // 128))
    cfg = HopperGemmConfig(tile_n=tile_n, num_sms=num_sms, lr_in_acc=fuse,
                           interpret=gpu_interpret_params() if pol.interpret else None)
    y = int8_gemm_ws(codes, wt, sx if _act_group(q) else sx[:, 0], sw, bias=bias,
                     xa=xl1 if fuse else None, l2=l2 if fuse else None,
                     x_zero=None if zx is None else zx[:, 0], w_zero=w_zero, w_gscale=w_gscale,
                     gate=gate, residual=residual, activation=act, out_dtype=jnp.bfloat16, config=cfg)
    if xl1 is not None and not fuse:  # low rank after the GEMM: one XLA product + add
        y = (y.astype(jnp.float32) + jnp.dot(xl1, l2.astype(jnp.bfloat16),
                                             preferred_element_type=jnp.float32)).astype(jnp.bfloat16)
    return y


def twinlog_kernel_supported(q: QLinear) -> bool:
    """Whether :mod:`pallas_kernels.twinlog_gemm` computes ``q``: a 4-bit packed
    :class:`~jaxdq.quant.twinlog.TwinLogWeight`, dynamic symmetric per-token activations of
    at most 8 bits, K a multiple of 16 and N of 128.  Any rotation (DuQuant, full-width
    Hadamard) is applied before the quantize kernel (in XLA when the kernel cannot)."""
    w = q.weight
    if not isinstance(w, TwinLogWeight) or q.act is None or q.act.static:
        return False
    a = q.act.spec
    return (w.bits == 4 and w.packed and a.symmetric and a.granularity == "token" and a.bits <= 8
            and q.in_features % 16 == 0 and q.out_features % 128 == 0)


# Jitted for the reason _kernel_forward is.
@functools.partial(jax.jit, static_argnames=("pol",))
def _twinlog_kernel_forward(q: QLinear, x2: jax.Array, pol: Policy) -> jax.Array:
    """The twin-log kernel path on ``x2 [M, C_in]`` → bf16 ``[M, C_out]``: the input
    transform and per-token quantization by the quantize kernel (a rotation it cannot
    apply — DuQuant's, a full-width or large Hadamard — by XLA first), then the twin-log
    GEMM decoding the log codes in registers (bf16 tensor-core dot, ``acc · s_x + bias``)."""
    from pallas_kernels.quantize_act import quantize_act, quantize_config
    from pallas_kernels.twinlog_gemm import kernel_table, twinlog_gemm, twinlog_gemm_config

    m = x2.shape[0]
    gcfg = twinlog_gemm_config(m, interpret=pol.interpret)
    m_pad = -(-m // gcfg.block_m) * gcfg.block_m
    if m_pad != m:  # zero rows quantize to zero codes and are sliced off
        x2 = jnp.pad(x2, ((0, m_pad - m), (0, 0)))
    t = q.transform
    rot = t.rotation
    had = 0 if rot is None else rot.kernel_block
    smooth = t.smooth
    xt = None  # T(x) when XLA applies the transform (the low-rank branch reads it too)
    if rot is not None and not 16 <= had <= 128:  # not an in-kernel block Hadamard: rotate in XLA
        xt = t.apply(x2.astype(jnp.float32))
        x2, smooth, had = xt, None, 0
    qcfg = quantize_config(m_pad, q.in_features, dot=bool(had), smooth=smooth is not None, grouped=False)
    codes, sx = quantize_act(x2, bits=q.act.spec.bits, smooth=smooth, had_block=had,
                             config=dataclasses.replace(qcfg, interpret=pol.interpret))[:2]
    step, offset = kernel_table(*q.weight.params)
    y = twinlog_gemm(codes, sx, q.weight.codes, step, offset, bias=q.bias, out_dtype=jnp.float32, config=gcfg)
    if t.lowrank_a is not None:  # (x2 is already T(x) when XLA transformed it)
        lr = t.lowrank(xt if xt is not None else t.apply(x2.astype(jnp.float32)))
    else:
        lr = None
    if lr is not None:
        y = y + lr
    return y[:m].astype(jnp.bfloat16)


def stored_for_kernels(params: Mapping) -> Mapping:
    """The same model with every quantized linear's codes stored K-major ("nk",
    ``[C_out, C_in]``), the layout the Hopper wgmma kernels read without a per-call
    transpose; the function computed is unchanged.  (A storage choice, saved with the
    checkpoint; how layers run stays the policy's.)"""
    def relayout(_, layer):
        if isinstance(layer, Segmented):
            return layer.replace(variants=tuple(relayout(_, v) for v in layer.variants))
        if isinstance(layer, QLinear) and isinstance(layer.weight, QWeight):
            return layer.replace(weight=layer.weight.to_layout("nk"))
        return layer

    return map_layers(params, relayout)


def attention_kernel_selected(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether ``attention(..., impl="int8qk")`` runs the Hopper kernel
    (:func:`int8qk_attention`): an sm_90 GPU with Mosaic GPU, ``[N, T, H, d]`` operands with
    one head dimension of at most 256 and equal heads for Q, K and V."""
    if not _is_hopper():
        return False
    try:
        import pallas_kernels.attention_int8  # noqa: F401  (absent from jax builds without Mosaic GPU)
    except ImportError:  # pragma: no cover
        return False
    return (q.ndim == 4 and k.shape == v.shape and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]
            and q.shape[-1] <= 256)


def int8qk_kernel_operands(q: jax.Array, k: jax.Array, v: jax.Array, bias=None, *, block_kv: int = 128,
                           pad_64: bool = False):
    """The operands :func:`int8qk_attention` hands the kernel: ``(qc, kc, v16, sq, sk, kbias)``
    (:func:`pallas_kernels.attention_int8.int8qk_attention`'s arguments).  The codes are
    :func:`jaxdq.quant.attention_codes.int8_qk_codes`'s, the softmax scale and ``log2 e``
    folded into ``sq``, V in float16; tokens padded to the kernel's tiles (padded keys masked
    by ``kbias``), head dims padded with zero columns to the kernel's minimum (Q/K codes to a
    multiple of 32, V to 16: d = 72 → 96 / 80), or with ``pad_64`` to multiples of 64."""
    from jaxdq.quant.attention_codes import int8_qk_codes

    n, tq, h, d = q.shape
    tk = k.shape[1]
    qc, kc, sq, sk = int8_qk_codes(q, k)
    sq = sq * (math.log2(math.e) / math.sqrt(d))
    up = lambda x, m: -(-x // m) * m  # noqa: E731
    dk, dv = (up(d, 64), up(d, 64)) if pad_64 else (up(d, 32), up(d, 16))
    tqp, tkp = up(tq, 128), up(tk, block_kv)
    pad = lambda a, t, dd: jnp.pad(a, ((0, 0), (0, t - a.shape[1]), (0, 0), (0, dd - a.shape[3])))  # noqa: E731
    qc, kc, v16 = pad(qc, tqp, dk), pad(kc, tkp, dk), pad(v.astype(jnp.float16), tkp, dv)
    sq = jnp.pad(sq, ((0, 0), (0, tqp - tq), (0, 0))).transpose(0, 2, 1)
    sk = jnp.pad(sk, ((0, 0), (0, tkp - tk), (0, 0))).transpose(0, 2, 1)
    kb = None
    if bias is not None or tkp > tk:  # base-2 logit offsets; padded keys far below any real one
        kb = jnp.zeros((n, tk), jnp.float32) if bias is None else bias.astype(jnp.float32) * math.log2(math.e)
        kb = jnp.pad(kb, ((0, 0), (0, tkp - tk)), constant_values=-1e30)
    return qc, kc, v16, sq, sk, kb


def int8qk_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias=None, *, interpret: bool = False,
                     block_kv: int = 128, pad_64: bool = False) -> jax.Array:
    """``attention(q, k, v, bias, impl="int8qk")`` through the Hopper kernel
    (:func:`pallas_kernels.attention_int8.int8qk_attention`) on :func:`int8qk_kernel_operands`.

    q: ``[N, Tq, H, d]``; k, v: ``[N, Tk, H, d]``; bias ``[N, Tk]`` or None.  Returns
    ``v.dtype [N, Tq, H, d]``.  ``interpret``: jax's Mosaic GPU interpreter (CPU tests)."""
    from pallas_kernels.attention_int8 import AttentionConfig, int8qk_attention as kernel
    from pallas_kernels.int_gemm_hopper import gpu_interpret_params

    cfg = AttentionConfig(block_kv=block_kv, interpret=gpu_interpret_params() if interpret else None)
    out = kernel(*int8qk_kernel_operands(q, k, v, bias, block_kv=block_kv, pad_64=pad_64), config=cfg)
    return out[:, :q.shape[1], :, :q.shape[3]].astype(v.dtype)
