"""TFMQ-DM (Huang et al., CVPR 2024): the temporal information block, TIAR and FSC.

The **temporal information block** (TIB) of a UNet is the time embedding
``h(t)`` (sinusoid → Linear → SiLU → Linear) with every resnet's ``g_i`` (SiLU → Linear,
``time_emb_proj``): the layers of role "time-embedding".  Their outputs, the *temporal
features* ``emb_{t,i} = g_i(h(t))``, depend on t alone, never on x_t.  In a
class-conditional UNet (jaxdq's default: ``emb = h(t) + E[y]``, null class = the last
label) ``g_i`` reads ``h(t) + E[y]``: the TIB depends on ``(t, y)``, a finite set too.
Here the TIB is evaluated on ``(t, condition)`` pairs only — every sampler timestep × every
distinct condition of the calibration, the conditional and the null-condition (CFG) ones
kept apart — with ``x_t = 0`` (:func:`temporal_set`, :class:`TemporalCapture`; the rest of
the network is dead code under ``jit``).

* **TIAR** (:func:`reconstruct_temporal`): AdaRound on all TIB layers together, minimising
  ``Σ_i ‖emb_{t,i} − ê_{t,i}‖²`` over those pairs (no x_t involved): the mean over the
  conditional pairs plus the mean over the null-condition pairs.  The residual and
  attention blocks are reconstructed after it with the TIB frozen
  (:func:`jaxdq.quant.reconstruct.reconstruct_blocks` with ``select`` excluding it), so its
  weights never see x_t.
* **FSC** (:func:`fsc_ranges`, :func:`apply_fsc`): one ``(s_t, z_t)`` per sampler timestep
  for every TIB layer's input activation, by min-max over the exact activations at that t
  (all conditions: one range per t covering both CFG branches, since one batched CFG call
  shares its t), resolved per step by :func:`jaxdq.quant.timestep.at_timestep`.

:func:`temporal_error` measures ``‖emb_{t,i} − ê_{t,i}‖`` per timestep (the paper's Fig. 2).
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.calibrate.blocks import CalibSet, condition_set
from jaxdq.quant.layers import QConv, QLinear, QWeight, map_layers, static_act_quant
from jaxdq.quant.quantizer import QuantSpec
from jaxdq.quant.reconstruct import (AdaRound, Problem, ReconConfig, _fp_kernel, fit_rounding, float_view,
                                     quantized_layers, with_kernels)

TIME_EMBEDDING = "time-embedding"


def tib_paths(roles: Mapping[str, str]) -> list[str]:
    """The temporal information block: every layer of role "time-embedding"."""
    return sorted(p for p, r in roles.items() if r == TIME_EMBEDDING)


def tib_outputs(roles: Mapping[str, str]) -> list[str]:
    """The layers whose outputs are the temporal features ``emb_{t,i}``: every resnet's
    ``time_emb_proj`` (UNets); in a model without them (the DiT families, whose time
    embedding feeds adaLN) the last time-embedding layer of each module (``linear_2``, ...)."""
    tib = tib_paths(roles)
    outs = [p for p in tib if p.split("/")[-1] == "time_emb_proj"]
    if outs:
        return outs
    last: dict = {}
    for p in tib:
        parent = p.rpartition("/")[0]
        last[parent] = max(last.get(parent, p), p)
    return sorted(last.values())


# --------------------------------------------------------------------------- (t, condition) pairs
@dataclasses.dataclass
class TemporalSet:
    """The TIB's finite input set: ``t [P]``, ``cond`` (per-pair arrays ``[P, ...]``),
    ``branch [P]`` (0 conditional, 1 null condition), ``step [P]`` (index of t in
    ``timesteps [S]``), and ``x_shape`` (one sample's x, fed as zeros)."""

    t: np.ndarray
    cond: dict
    branch: np.ndarray
    step: np.ndarray
    timesteps: np.ndarray
    x_shape: tuple

    @property
    def size(self) -> int:
        return int(self.t.shape[0])


def temporal_set(data: CalibSet) -> TemporalSet:
    """Every calibration timestep × every distinct condition of ``data`` (both branches)."""
    conds, branch = condition_set(data)
    u = len(branch)
    s = len(data.timesteps)
    per = {k for k, v in conds.items() if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == u}
    cond = {k: (np.tile(v, (s,) + (1,) * (v.ndim - 1)) if k in per else v) for k, v in conds.items()}
    return TemporalSet(t=np.repeat(data.timesteps, u), cond=cond, branch=np.tile(branch, s),
                       step=np.repeat(np.arange(s, dtype=np.int32), u), timesteps=np.asarray(data.timesteps),
                       x_shape=tuple(data.x.shape[1:]))


class TemporalCapture:
    """``features(params, t [B], cond) -> {path: [B, C]}``: the outputs (or, with
    ``inputs=True``, the inputs) of the layers at ``paths`` in one network call with
    ``x_t = 0`` — a function of ``(t, condition)`` only."""

    def __init__(self, net: Callable, paths: Sequence[str], x_shape: tuple, inputs: bool = False):
        self.net, self.paths, self.x_shape, self.inputs = net, tuple(paths), tuple(x_shape), inputs

    def __hash__(self):
        return hash((id(self.net), self.paths, self.x_shape, self.inputs))

    def __eq__(self, other):
        return (isinstance(other, TemporalCapture) and self.net is other.net and self.paths == other.paths
                and self.x_shape == other.x_shape and self.inputs == other.inputs)

    def __call__(self, params, t, cond) -> dict:
        rec: dict = {}
        paths = set(self.paths)

        def icpt(next_fun, args, kwargs, ctx):
            out = next_fun(*args, **kwargs)
            if ctx.method_name == "__call__":
                p = "/".join(ctx.module.path)
                if p in paths:
                    rec[p] = args[0] if self.inputs else out
            return out

        x = jnp.zeros((t.shape[0],) + self.x_shape, jnp.float32)
        with nn.intercept_methods(icpt):
            self.net(params, x, t, **cond)
        missing = paths - set(rec)
        if missing:
            raise ValueError(f"the network call did not reach {sorted(missing)}")
        return {p: rec[p].astype(jnp.float32).reshape(t.shape[0], -1) for p in self.paths}


def _take(ts: TemporalSet, idx) -> tuple:
    per = lambda v: isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == ts.size  # noqa: E731
    return jnp.asarray(ts.t[idx]), {k: jnp.asarray(v[idx]) if per(v) else v for k, v in ts.cond.items()}


# --------------------------------------------------------------------------- TIAR
@dataclasses.dataclass(frozen=True)
class TemporalProblem(Problem):
    """TIAR's objective over ``(t, condition)`` pairs:
    ``data = (template, t, cond, branch, targets)``; the loss of a minibatch is
    ``mean_cond Σ_i ‖ê − e‖² + mean_null Σ_i ‖ê − e‖²`` (each branch's mean over its pairs)."""

    capture: TemporalCapture
    size: int

    def rec_loss(self, vs, consts, data, idx):
        template, t, cond, branch, targets = data
        params = with_kernels(template, {k: consts[k].soft(v) for k, v in vs.items()})
        per = lambda v: hasattr(v, "ndim") and v.ndim >= 1 and v.shape[0] == self.size  # noqa: E731
        feats = self.capture(params, t[idx], {k: v[idx] if per(v) else v for k, v in cond.items()})
        err = sum(jnp.sum(jnp.square(feats[p] - targets[p][idx]), axis=-1) for p in self.capture.paths)
        b = branch[idx]
        loss = 0.0
        for k in (0, 1):
            m = (b == k).astype(jnp.float32)
            loss = loss + jnp.sum(err * m) / jnp.maximum(jnp.sum(m), 1.0)
        return loss


def reconstruct_temporal(net: Callable, fp_params: Mapping, q_params: Mapping, data: CalibSet,
                         roles: Mapping[str, str], cfg: ReconConfig, *, progress: bool = False,
                         report: Optional[dict] = None) -> dict[str, QWeight]:
    """TIAR: AdaRound on the TIB's quantized layers, all together, minimising the temporal
    feature error over every (sampler timestep, condition) pair (module docstring).  The
    minibatch is the whole pair set when it has at most 1024 pairs, else ``cfg.batch``.
    Returns ``{path: QWeight}`` of the TIB layers."""
    t0 = time.time()
    qlayers = quantized_layers(q_params)
    tib = [p for p in tib_paths(roles) if p in qlayers]
    if not tib:
        return {}
    ts = temporal_set(data)
    outs = tib_outputs(roles)
    cap = TemporalCapture(net, outs, ts.x_shape)
    t_all, cond_all = _take(ts, np.arange(ts.size))
    targets = jax.jit(cap)(fp_params, t_all, cond_all)
    consts, vs = {}, {}
    for p in tib:
        consts[p], vs[p] = AdaRound.init(_fp_kernel(fp_params, p), qlayers[p].weight)
    current = float_view(q_params)
    batch = ts.size if ts.size <= 1024 else cfg.batch
    tcfg = dataclasses.replace(cfg, batch=batch)
    problem = TemporalProblem(capture=cap, size=ts.size)
    bar = None
    if progress:
        from jaxdq.sampling.progress import ProgressBar

        bar = ProgressBar(tcfg.iters, "TIAR (temporal information block)", unit="step")
    try:
        data_tuple = (current, t_all, cond_all, jnp.asarray(ts.branch), targets)
        vs, info = fit_rounding(problem, vs, consts, data_tuple, tcfg, key=jax.random.PRNGKey(cfg.seed + 7919),
                                bar=bar, eval_idx=jnp.arange(ts.size))
    finally:
        if bar is not None:
            bar.close()
    if report is not None:
        report.update(info, layers=len(tib), pairs=ts.size, seconds=round(time.time() - t0, 2))
    return {p: consts[p].hard(vs[p]) for p in tib}


# --------------------------------------------------------------------------- FSC
def fsc_ranges(net: Callable, fp_params: Mapping, ts: TemporalSet, paths: Sequence[str]) -> dict:
    """``{path: (lo [S], hi [S])}``: min and max of each TIB layer's input over the exact
    activations at each timestep (every condition of ``ts``, both branches)."""
    if not paths:
        return {}
    cap = TemporalCapture(net, paths, ts.x_shape, inputs=True)
    t_all, cond_all = _take(ts, np.arange(ts.size))
    xs = jax.device_get(jax.jit(cap)(fp_params, t_all, cond_all))
    s = len(ts.timesteps)
    out = {}
    for p in paths:
        x = np.asarray(xs[p])
        lo = np.stack([x[ts.step == k].min() for k in range(s)])
        hi = np.stack([x[ts.step == k].max() for k in range(s)])
        out[p] = (lo, hi)
    return out


def apply_fsc(q_params: Mapping, ranges: Mapping, timesteps, spec: QuantSpec) -> dict:
    """``q_params`` with the TIB layers' activation quantizers replaced by FSC's: one static
    ``(s_t, z_t)`` per timestep from ``ranges`` (:func:`fsc_ranges`)."""
    t = jnp.asarray(timesteps, jnp.int32)

    def fsc(path, layer):
        if path not in ranges or not isinstance(layer, (QLinear, QConv)) or layer.act is None:
            return layer
        lo, hi = ranges[path]
        return layer.replace(act=static_act_quant(lo, hi, spec, t=t))

    return map_layers(q_params, fsc)


# --------------------------------------------------------------------------- measurement
@functools.partial(jax.jit, static_argnames=("cap",))
def _features_at(params, t0, t, cond, *, cap):
    from jaxdq.quant.timestep import at_timestep

    return cap(at_timestep(params, t0), t, cond)


def temporal_error(net: Callable, fp_params: Mapping, q_params: Mapping, ts: TemporalSet,
                   paths: Sequence[str]) -> dict:
    """The temporal feature error per timestep (TFMQ-DM's Fig. 2), over the pairs of ``ts``.

    Returns ``{"t": [S], "l2": [S]`` mean over conditions of ``sqrt(Σ_i ‖emb_{t,i} −
    ê_{t,i}‖²)``, ``"rel"`` the same divided by ``sqrt(Σ_i ‖emb_{t,i}‖²)``, ``"cosine"``
    mean cosine similarity of the concatenated features, ``"sq_sum"`` ``Σ_{t,i,cond}
    ‖·‖²`` (TIAR's objective summed), ``"per_layer": {path: [S]}`` mean ‖emb_{t,i} −
    ê_{t,i}‖``}``; ``q_params`` may hold per-timestep activation quantizers (resolved at each t)."""
    cap = TemporalCapture(net, paths, ts.x_shape)
    s = len(ts.timesteps)
    l2, rel, cos, per_layer, sq = [], [], [], {p: [] for p in paths}, 0.0
    for k in range(s):
        idx = np.nonzero(ts.step == k)[0]
        t, cond = _take(ts, idx)
        e = jax.device_get(_features_at(fp_params, t[0], t, cond, cap=cap))
        q = jax.device_get(_features_at(q_params, t[0], t, cond, cap=cap))
        ef = np.concatenate([np.asarray(e[p], np.float64) for p in paths], axis=1)
        qf = np.concatenate([np.asarray(q[p], np.float64) for p in paths], axis=1)
        d = np.sqrt(np.sum((ef - qf) ** 2, axis=1))
        n = np.sqrt(np.sum(ef ** 2, axis=1))
        l2.append(float(d.mean()))
        rel.append(float((d / np.maximum(n, 1e-12)).mean()))
        cos.append(float((np.sum(ef * qf, 1) / np.maximum(n * np.sqrt(np.sum(qf ** 2, 1)), 1e-12)).mean()))
        sq += float(np.sum(d ** 2))
        for p in paths:
            per_layer[p].append(float(np.sqrt(np.sum((np.asarray(e[p], np.float64) - np.asarray(q[p])) ** 2,
                                                     axis=1)).mean()))
    return {"t": [int(v) for v in ts.timesteps], "l2": l2, "rel": rel, "cosine": cos, "sq_sum": sq,
            "per_layer": per_layer}


__all__ = ["TIME_EMBEDDING", "TemporalCapture", "TemporalProblem", "TemporalSet", "apply_fsc", "fsc_ranges",
           "reconstruct_temporal", "temporal_error", "temporal_set", "tib_outputs", "tib_paths"]
