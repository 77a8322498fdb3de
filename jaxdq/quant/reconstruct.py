"""Reconstruction: AdaRound's learned rounding, trained BRECQ-style block by block.

AdaRound (Nagel et al. 2020) replaces round-to-nearest by a learned choice between
rounding down and up, per weight.  With ``s``, ``z`` the layer's (per output channel)
scale and zero point and ``V`` a free variable of the weight's shape::

    W_soft = s · (clip(⌊W/s⌋ + h(V) + z, qmin, qmax) − z),   h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)

with the rectified sigmoid's ζ = 1.1, γ = −0.1.  ``V`` starts where ``h(V)`` is the
fractional part of ``W/s`` (its sign fixed to round-to-nearest's choice, so **zero
iterations give round-to-nearest exactly**); the loss adds the rounding regulariser
``λ Σ (1 − |2h(V) − 1|^β)`` (λ = 0.01) after a warm-up without it (the first 20 % of the
iterations), β annealed linearly from 20 to 2 over the rest; the final codes are
``⌊W/s⌋ + [V ≥ 0]``.

BRECQ (Li et al. 2021) trains the rounding of all the layers of one block together, on the
block's output error ``mean_{calls, positions} Σ_channels (f_q(x) − f(x))²`` — optionally
weighted by the squared gradient of the network output error w.r.t. the block output
(``fisher=True``; weight ``(1 + |g|)²``) — over stored block inputs
(:mod:`jaxdq.calibrate.blocks`): the inputs come from the network as quantized so far
(blocks before reconstructed, the rest round-to-nearest; activations float during this
weight phase, as in BRECQ and Q-Diffusion), the targets from the float network.  A layer
outside every block (:data:`BLOCK_RE`) is its own block.

Training: Adam (optax) on ``V``, minibatches drawn without replacement from the stored
calls, everything jitted (chunks of iterations under ``lax.fori_loop``; equal blocks share
one compilation), deterministic from ``ReconConfig.seed``, a tqdm progress bar.
:func:`fit_rounding` is the generic loop; :func:`reconstruct_blocks` (BRECQ) and
:func:`jaxdq.quant.tfmq.reconstruct_temporal` (TIAR) are its two users.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxdq.calibrate.blocks import BlockCapture, CalibSet, apply_calls
from jaxdq.quant.layers import (FloatConv, FloatLinear, QConv, QLinear, QWeight, as_layer, get_path, iter_layers,
                                map_layers, set_path)
from jaxdq.quant.quantizer import QuantSpec, pack_int4

ZETA, GAMMA = 1.1, -0.1
#: Module path segments that make a reconstruction block (the top-most match on a layer's
#: path): UNet resnets / attentions / resamplers, transformer blocks of the DiT families
#: (Latte's temporal blocks included).
BLOCK_RE = re.compile(r"^(resnets|attentions|downsamplers|upsamplers|blocks|temporal_blocks|transformer_blocks|"
                      r"single_transformer_blocks)_\d+$")


@dataclasses.dataclass(frozen=True)
class ReconConfig:
    """Hyper-parameters of AdaRound / BRECQ (defaults: the papers' where CPU-affordable).

    iters: optimisation steps per block (BRECQ / TFMQ-DM: 20k; the default is lower so a
      CPU run finishes; recipes take ``iters=...``).  batch: calls per step (32).
    lr: Adam's learning rate on V (1e-3).  reg_weight: λ of the rounding regulariser (0.01).
    beta: (start, end) of the annealed β (20 → 2).  warmup: fraction of the iterations
    without the regulariser (0.2).  fisher: weight the block loss by the squared output
    gradient.  inputs: "quantized" (the block's input in the network quantized so far,
    BRECQ's asymmetric reconstruction) or "float".  chunk: network calls per capture
    replay; steps_per_call: iterations per jitted training call (progress granularity).
    seed: minibatch draws.
    """

    iters: int = 2000
    batch: int = 32
    lr: float = 1e-3
    reg_weight: float = 0.01
    beta: tuple = (20.0, 2.0)
    warmup: float = 0.2
    fisher: bool = False
    inputs: str = "quantized"
    chunk: int = 16
    steps_per_call: int = 100
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.iters, int) or self.iters < 0:
            raise ValueError(f"iters must be an int >= 0, got {self.iters!r}")
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {self.batch!r}")
        if self.inputs not in ("quantized", "float"):
            raise ValueError(f"inputs must be 'quantized' or 'float', got {self.inputs!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {self.warmup!r}")


# --------------------------------------------------------------------------- AdaRound
def rectified_sigmoid(v: jax.Array) -> jax.Array:
    """``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)`` elementwise (float32)."""
    return jnp.clip(jax.nn.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def rounding_regularizer(v: jax.Array, beta) -> jax.Array:
    """``Σ (1 − |2 h(V) − 1|^β)``: 0 when every ``h(V)`` is 0 or 1 (scalar float32)."""
    return jnp.sum(1.0 - jnp.abs(2.0 * rectified_sigmoid(v) - 1.0) ** beta)


def beta_and_weight(it, cfg: ReconConfig):
    """``(β, λ)`` at iteration ``it`` (traced): λ = 0 during the warm-up, then
    ``cfg.reg_weight`` with β decaying linearly from ``beta[0]`` to ``beta[1]``."""
    start = cfg.warmup * cfg.iters
    rel = (jnp.asarray(it, jnp.float32) - start) / max(cfg.iters - start, 1.0)
    b0, b1 = cfg.beta
    beta = b1 + (b0 - b1) * jnp.clip(1.0 - rel, 0.0, 1.0)
    lam = jnp.where(it >= start, cfg.reg_weight, 0.0)
    return beta, lam


@struct.dataclass
class AdaRound:
    """The learned rounding of one layer's weight (its ``V`` is held apart, the variable).

    floor: float32 ``⌊W/s⌋`` of the ``[K, C_out]`` (flattened) kernel; scale / zero: the
    round-to-nearest weight's (``[1, C_out]`` per channel or ``[]``); spec, packed: its
    static config; kernel_shape: the layer's kernel shape (``[K, C_out]`` or HWIO).
    """

    floor: jax.Array
    scale: jax.Array
    zero: Optional[jax.Array] = None
    spec: QuantSpec = struct.field(pytree_node=False, default=QuantSpec())
    packed: bool = struct.field(pytree_node=False, default=False)
    kernel_shape: tuple = struct.field(pytree_node=False, default=())

    @classmethod
    def init(cls, kernel, weight: QWeight) -> tuple["AdaRound", jax.Array]:
        """``(rounding, V₀)`` for a float ``kernel`` (any shape, flattened to ``[K, C_out]``)
        and its round-to-nearest :class:`QWeight` (whose scale, zero and spec are kept):
        ``h(V₀)`` is the fractional part of ``W/s``, and ``sign(V₀)`` round-to-nearest's
        choice, so the hard rounding of ``V₀`` is round-to-nearest exactly."""
        k = jnp.asarray(kernel, jnp.float32)
        w = k.reshape(-1, k.shape[-1])
        s = jnp.asarray(weight.scale, jnp.float32)
        ws = w / s  # the very division quantize() rounds
        fl = jnp.floor(ws)
        up = jnp.round(ws) - fl  # round-to-nearest's choice (half to even), 0 or 1
        p = jnp.clip((ws - fl - GAMMA) / (ZETA - GAMMA), 1e-6, 1 - 1e-6)
        v = jnp.log(p) - jnp.log1p(-p)
        eps = 1e-4
        v = jnp.where(up > 0, jnp.maximum(v, eps), jnp.minimum(v, -eps))
        return cls(floor=fl, scale=s, zero=weight.zero, spec=weight.spec, packed=weight.packed,
                   kernel_shape=tuple(int(d) for d in k.shape)), v

    def _codes(self, offset: jax.Array) -> jax.Array:
        q = self.floor + offset
        if self.zero is not None:
            q = q + self.zero
        return jnp.clip(q, self.spec.qmin, self.spec.qmax)

    def _decode(self, q: jax.Array) -> jax.Array:
        return ((q if self.zero is None else q - self.zero) * self.scale).reshape(self.kernel_shape)

    def soft(self, v: jax.Array) -> jax.Array:
        """The differentiable weight ``s (clip(⌊W/s⌋ + h(V) + z) − z)`` in ``kernel_shape``."""
        return self._decode(self._codes(rectified_sigmoid(v)))

    def hard_kernel(self, v: jax.Array) -> jax.Array:
        """The weight the final codes dequantize to (float32, ``kernel_shape``)."""
        return self._decode(self._codes((v >= 0).astype(jnp.float32)))

    def hard(self, v: jax.Array) -> QWeight:
        """The :class:`QWeight` of the final codes ``⌊W/s⌋ + [V ≥ 0]`` (packed as the original)."""
        codes = self._codes((v >= 0).astype(jnp.float32)).astype(self.spec.code_dtype)
        if self.packed:
            codes = pack_int4(codes)
        return QWeight(codes=codes, scale=self.scale, zero=self.zero, spec=self.spec, packed=self.packed)


def layer_float(layer: Any, kernel: jax.Array) -> Any:
    """A float layer of the same kind as ``layer`` (linear or conv) with ``kernel`` and its bias."""
    if isinstance(layer, (FloatConv, QConv)) or kernel.ndim == 4:
        return FloatConv(kernel=kernel, bias=layer.bias)
    return FloatLinear(kernel=kernel, bias=layer.bias)


def with_kernels(tree: Any, kernels: Mapping[str, jax.Array]) -> Any:
    """``tree`` (a params subtree, or one layer node) with the layers at ``kernels``' paths
    (relative; "" = the tree itself) replaced by float layers holding those kernels."""
    if "" in kernels:
        return layer_float(as_layer(tree), kernels[""])
    return map_layers(tree, lambda p, l: layer_float(l, kernels[p]) if p in kernels else l)


# --------------------------------------------------------------------------- the generic loop
class Problem:
    """A rounding problem for :func:`fit_rounding`: ``loss(vs, consts, data, idx) -> (rec,)``
    is the reconstruction error of the calls ``idx`` with the soft weights of ``vs``.
    Subclasses are frozen dataclasses (jit static arguments): equal problems share compilations."""

    size: int

    def rec_loss(self, vs, consts, data, idx):
        raise NotImplementedError


def _total_loss(vs, problem, cfg, consts, data, idx, beta, lam):
    rec = problem.rec_loss(vs, consts, data, idx)
    reg = sum(rounding_regularizer(v, beta) for v in jax.tree_util.tree_leaves(vs))
    return rec + lam * reg, (rec, reg)


@functools.partial(jax.jit, static_argnames=("problem", "cfg", "n"))
def _train_chunk(vs, opt_state, consts, data, it0, key, *, problem, cfg: ReconConfig, n: int):
    tx = optax.adam(cfg.lr)
    b = min(cfg.batch, problem.size)

    def body(i, carry):
        vs, opt_state, _ = carry
        it = it0 + i
        idx = jax.random.permutation(jax.random.fold_in(key, it), problem.size)[:b]
        beta, lam = beta_and_weight(it, cfg)
        (loss, (rec, _)), g = jax.value_and_grad(_total_loss, has_aux=True)(vs, problem, cfg, consts, data, idx,
                                                                             beta, lam)
        upd, opt_state = tx.update(g, opt_state, vs)
        return optax.apply_updates(vs, upd), opt_state, rec

    return jax.lax.fori_loop(0, n, body, (vs, opt_state, jnp.float32(0.0)))


@functools.partial(jax.jit, static_argnames=("problem",))
def _eval(vs, consts, data, idx, *, problem):
    return problem.rec_loss(vs, consts, data, idx)


def fit_rounding(problem: Problem, vs: Mapping, consts: Any, data: Any, cfg: ReconConfig, *, key=None,
                 bar=None, eval_idx=None) -> tuple[dict, dict]:
    """Train the rounding variables ``vs`` (``{name: V}``) of ``problem`` for ``cfg.iters``
    steps; returns ``(vs, info)`` with the reconstruction error on ``eval_idx`` (default:
    the first ≤ 256 calls) at round-to-nearest (``rtn_loss``: ``V₀``'s hard rounding) and
    after (``loss``: the final hard rounding), both with hard weights."""
    key = jax.random.PRNGKey(cfg.seed) if key is None else key
    vs = {k: jnp.asarray(v, jnp.float32) for k, v in vs.items()}
    if eval_idx is None:
        eval_idx = jnp.arange(min(problem.size, 256))
    hard = lambda vs: {k: jnp.where(v >= 0, 1e4, -1e4) for k, v in vs.items()}  # noqa: E731  h(±1e4) = 1 / 0
    rtn = float(_eval(hard(vs), consts, data, eval_idx, problem=problem))
    opt_state = optax.adam(cfg.lr).init(vs)
    done = 0
    while done < cfg.iters:
        n = min(cfg.steps_per_call, cfg.iters - done)
        vs, opt_state, _ = _train_chunk(vs, opt_state, consts, data, jnp.int32(done), key, problem=problem,
                                        cfg=cfg, n=n)
        done += n
        if bar is not None:
            bar.update(n)
    final = float(_eval(hard(vs), consts, data, eval_idx, problem=problem))
    return vs, {"rtn_loss": rtn, "loss": final, "iters": cfg.iters}


# --------------------------------------------------------------------------- BRECQ
def _sq_err(out, target, weight=None):
    """BRECQ's block loss: squared error summed over the channel (last) axis, averaged over
    calls and positions (weighted elementwise by ``weight`` if given); a block whose output
    is a pytree (several arrays) sums the loss of each leaf."""
    def one(o, t, w):
        e = jnp.square(o.astype(jnp.float32) - t)
        if w is not None:
            e = e * w
        return jnp.mean(jnp.sum(e, axis=-1))

    outs, treedef = jax.tree_util.tree_flatten(out)
    targets = treedef.flatten_up_to(target)
    weights = [None] * len(outs) if weight is None else treedef.flatten_up_to(weight)
    return sum(one(o, t, w) for o, t, w in zip(outs, targets, weights))


@dataclasses.dataclass(frozen=True)
class BlockProblem(Problem):
    """One block's output error over stored calls: ``data = (args, target, weight, template)``."""

    module: Any
    spec: Any
    size: int

    def rec_loss(self, vs, consts, data, idx):
        args, target, weight, template = data
        kernels = {k: consts[k].soft(v) for k, v in vs.items()}
        batch = [a[idx] if pc else a for a, pc in zip(args, self.spec.per_call)]
        out = apply_calls(self.module, with_kernels(template, kernels), self.spec, batch)
        take = lambda tree: jax.tree_util.tree_map(lambda a: a[idx], tree)  # noqa: E731
        return _sq_err(out, take(target), None if weight is None else take(weight))


def block_of(path: str) -> str:
    """The reconstruction block of a layer path: its top-most ancestor module whose name
    matches :data:`BLOCK_RE`, else the layer itself."""
    segs = path.split("/")
    for i, s in enumerate(segs[:-1]):
        if BLOCK_RE.match(s):
            return "/".join(segs[:i + 1])
    return path


def quantized_layers(params: Mapping) -> dict[str, Any]:
    """``{path: layer}`` of the uniformly quantized layers (QLinear / QConv with a QWeight)."""
    return {p: l for p, l in iter_layers(params)
            if isinstance(l, (QLinear, QConv)) and isinstance(l.weight, QWeight)}


def float_view(params: Mapping) -> dict:
    """The weight-quantized float network: every quantized layer a float layer holding its
    dequantized weight (activation quantization dropped, BRECQ's weight phase)."""
    def deq(_, l):
        if isinstance(l, QConv):
            return l.dequantized()
        if isinstance(l, QLinear):
            return FloatLinear(kernel=l.weight.dequantize(), bias=l.bias, transform=l.transform)
        return l
    return map_layers(params, deq)


def reconstruct_blocks(net: Callable, fp_params: Mapping, q_params: Mapping, data: CalibSet, cfg: ReconConfig, *,
                       select: Optional[Callable[[str], bool]] = None, progress: bool = False,
                       report: Optional[dict] = None) -> dict[str, QWeight]:
    """BRECQ + AdaRound over a whole network, block by block in call order.

    Args:
      net: ``net(params, x, t, **cond)`` (the family's network call, e.g. ``Context.eps``).
      fp_params: the float params (targets).
      q_params: the round-to-nearest quantized params (their scales, zero points and specs
        are the ones the rounding is learned for; layers decided earlier, e.g. a TIAR'd
        temporal block, are taken as they stand).
      data: the calibration calls (:func:`jaxdq.calibrate.blocks.calibration_set`).
      select: which quantized layers to reconstruct (default all); the others stay as they
        are in ``q_params`` (frozen).
      report: filled with ``{block: {"layers", "rtn_loss", "loss", "seconds"}}``.
    Returns:
      ``{path: QWeight}``: the learned weights of the reconstructed layers.
    """
    qlayers = quantized_layers(q_params)
    train = [p for p in qlayers if select is None or select(p)]
    blocks: dict[str, list[str]] = {}
    for p in train:
        blocks.setdefault(block_of(p), []).append(p)
    if not blocks:
        return {}
    capture = BlockCapture(net, list(blocks), chunk=cfg.chunk)
    current = float_view(q_params)
    order = capture.call_order(current, data)
    order += [b for b in blocks if b not in order]  # never called: reconstructed last (no data)
    bar = None
    if progress:
        from jaxdq.sampling.progress import ProgressBar

        bar = ProgressBar(cfg.iters * len(order), "BRECQ block reconstruction", unit="step")
    decided: dict[str, QWeight] = {}
    key = jax.random.PRNGKey(cfg.seed)
    try:
        for bi, b in enumerate(order):
            t0 = time.time()
            src = current if cfg.inputs == "quantized" else fp_params
            got = capture.run(src, data, inputs=[b], fisher=[b] if cfg.fisher else (), reference=fp_params)[b]
            target = capture.run(fp_params, data, outputs=[b])[b].output
            weight = (None if got.grad is None
                      else jax.tree_util.tree_map(lambda g: jnp.asarray((1.0 + np.abs(g)) ** 2), got.grad))
            rel = {p: p[len(b) + 1:] if p != b else "" for p in blocks[b]}
            consts, vs = {}, {}
            for p, r in rel.items():
                consts[r], vs[r] = AdaRound.init(_fp_kernel(fp_params, p), qlayers[p].weight)
            template = get_path(current, b)
            problem = BlockProblem(module=got.module, spec=got.spec, size=data.size)
            args = [jnp.asarray(a) for a in got.args]
            target = jax.tree_util.tree_map(jnp.asarray, target)
            vs, info = fit_rounding(problem, vs, consts, (args, target, weight, template), cfg,
                                    key=jax.random.fold_in(key, bi), bar=bar)
            for p, r in rel.items():
                decided[p] = consts[r].hard(vs[r])
                set_path(current, p, _to_float_node(qlayers[p], consts[r].hard_kernel(vs[r])))
            if report is not None:
                report[b] = dict(info, layers=len(rel), seconds=round(time.time() - t0, 2))
    finally:
        if bar is not None:
            bar.close()
    return decided


def _fp_kernel(fp_params: Mapping, path: str) -> jax.Array:
    layer = as_layer(get_path(fp_params, path))
    if not isinstance(layer, (FloatLinear, FloatConv)):
        raise TypeError(f"the float params hold no float layer at {path!r}")
    if isinstance(layer, FloatLinear) and not layer.transform.is_identity:
        raise ValueError(f"{path!r} has input transforms; reconstruction learns the rounding of plain layers")
    return layer.kernel


def _to_float_node(qlayer: Any, kernel: jax.Array) -> Any:
    from jaxdq.quant.layers import to_node

    return to_node(layer_float(qlayer, kernel))


def with_weights(q_params: Mapping, decided: Mapping[str, QWeight]) -> dict:
    """``q_params`` with the decided weights in place (activations, biases, transforms kept)."""
    return map_layers(q_params, lambda p, l: l.replace(weight=decided[p]) if p in decided else l)


__all__ = ["AdaRound", "BLOCK_RE", "BlockProblem", "Problem", "ReconConfig", "beta_and_weight", "block_of",
           "fit_rounding", "float_view", "layer_float", "quantized_layers", "reconstruct_blocks",
           "rectified_sigmoid", "rounding_regularizer", "with_kernels", "with_weights"]
