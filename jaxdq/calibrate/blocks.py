"""Block inputs for reconstruction (Q-Diffusion / TFMQ-DM calibration data), memory-bounded.

Reconstruction (:mod:`jaxdq.quant.reconstruct`) trains a block's rounding on the block's
own inputs and the float block's outputs.  This module makes that data from a calibration
(:func:`jaxdq.calibrate.calibrate` with ``keep_inputs=True``) without ever holding the
activations of the whole network:

* :func:`calibration_set` picks, from the float model's own sampling trajectories, a
  bounded number of samples at **every** calibration timestep (uniform over timesteps, as
  Q-Diffusion's time-step-aware calibration) and per CFG branch, the conditional and the
  null-condition calls kept apart (``branch`` 0 / 1): ``D = S · branches · per_step``
  network calls ``(x_t, t, condition)``.
* :class:`BlockCapture` replays the network on those calls in chunks and keeps, for the
  module paths asked for, the module's call arguments (its *block inputs*) and/or its
  output, as host arrays ``[D, ...]`` (the network runs each call alone, as a batch of 1,
  under :func:`jax.vmap`: the call axis is exact even where a module sees the batch
  reshaped, e.g. Latte's spatial blocks ``[F, T, D]`` and temporal blocks ``[T, F, D]`` per
  call; a per-call leading axis of 1, the call itself as the module's batch, is dropped:
  ``[D, L, C]``, not ``[D, 1, L, C]``; :func:`apply_calls` reruns a module the same way); optionally the gradient of the output error
  ``‖ε(params) − ε(reference)‖²`` w.r.t. the block output (BRECQ's Fisher weighting).
  Memory: one chunk's activations on the device, the requested blocks' inputs/outputs on
  the host.

A module is captured through ``flax.linen.intercept_methods``: its unbound clone (hashable:
equal blocks share compilations) runs standalone with :func:`apply_block`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------- calibration calls
@dataclasses.dataclass
class CalibSet:
    """``D`` network calls: ``x [D, ...]``, ``t [D]``, ``cond`` (keyword arguments, per-call
    arrays ``[D, ...]``; scalars shared), ``branch [D]`` (0: the condition, 1: the null
    condition), ``step [D]`` (index into the calibration timesteps ``timesteps [S]``)."""

    x: np.ndarray
    t: np.ndarray
    cond: dict
    branch: np.ndarray
    step: np.ndarray
    timesteps: np.ndarray

    @property
    def size(self) -> int:
        return int(self.x.shape[0])

    def take(self, idx) -> dict:
        """The calls ``idx`` as ``{"x", "t", "cond"}`` (device arrays)."""
        idx = np.asarray(idx)
        return {"x": jnp.asarray(self.x[idx]), "t": jnp.asarray(self.t[idx]),
                "cond": {k: jnp.asarray(v[idx]) if _per_call(v, self.size) else v for k, v in self.cond.items()}}


def _per_call(v, n: int) -> bool:
    return isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) >= 1 and v.shape[0] == n


def calibration_set(calib: Mapping, per_step: int = 4, seed: int = 0) -> CalibSet:
    """Up to ``per_step`` samples at every calibration timestep and per CFG branch.

    Args:
      calib: a calibration with its trajectory (``calibrate(..., keep_inputs=True)``):
        ``"t" [S]``, ``"inputs": {"x": [S, N, ...], "cond": {...}, "uncond": {...} | None}``.
      per_step: samples per timestep and branch (the bound on memory), at most N.
      seed: which samples (drawn without replacement, independently per step).
    Returns:
      :class:`CalibSet` of ``S · branches · min(per_step, N)`` calls, ordered by branch,
      then step, then sample.
    """
    if calib is None or "inputs" not in calib:
        raise ValueError("reconstruction needs the calibration trajectory (calibrate(..., keep_inputs=True))")
    inputs = calib["inputs"]
    xs = np.asarray(inputs["x"])
    steps, n = xs.shape[:2]
    k = max(1, min(int(per_step), n))
    rng = np.random.default_rng(seed)
    picks = [np.sort(rng.choice(n, size=k, replace=False)) for _ in range(steps)]
    ts = np.asarray(calib["t"])
    out = {"x": [], "t": [], "branch": [], "step": [], "cond": []}
    for b, name in enumerate(("cond", "uncond")):
        c = inputs.get(name)
        if c is None and name == "cond":
            c = {}  # an unconditional model: its one branch takes no condition
        if c is None:
            continue
        for s in range(steps):
            idx = picks[s]
            out["x"].append(xs[s, idx])
            out["t"].append(np.full((k,), ts[s], ts.dtype))
            out["branch"].append(np.full((k,), b, np.int32))
            out["step"].append(np.full((k,), s, np.int32))
            out["cond"].append({key: np.asarray(v)[idx] if _per_call(np.asarray(v), n) else v for key, v in c.items()})
    if not out["x"]:
        raise ValueError("the calibration holds no condition branch")
    conds = out["cond"]
    cond = {key: np.concatenate([c[key] for c in conds]) if _per_call(np.asarray(conds[0][key]), k) else conds[0][key]
            for key in conds[0]}
    return CalibSet(x=np.concatenate(out["x"]), t=np.concatenate(out["t"]), cond=cond,
                    branch=np.concatenate(out["branch"]), step=np.concatenate(out["step"]), timesteps=ts)


def condition_set(data: CalibSet) -> tuple[dict, np.ndarray]:
    """The distinct conditions of a calibration set: ``(cond, branch)`` with per-condition
    arrays ``[U, ...]`` and each one's branch (what the time-dependent modules of a
    class- or caption-conditioned model can see besides t)."""
    per = [k for k, v in data.cond.items() if _per_call(v, data.size)]
    if not per:  # an unconditional model (or shared arguments only): one condition per branch
        first = [int(np.nonzero(data.branch == b)[0][0]) for b in np.unique(data.branch)]
        return {k: v for k, v in data.cond.items()}, data.branch[first]
    seen: dict = {}
    for i in range(data.size):
        key = (int(data.branch[i]),) + tuple(np.ascontiguousarray(data.cond[k][i]).tobytes() for k in per)
        seen.setdefault(key, i)
    idx = np.asarray(sorted(seen.values()))
    return ({k: (v[idx] if k in per else v) for k, v in data.cond.items()}, data.branch[idx])


# --------------------------------------------------------------------------- capture
@dataclasses.dataclass(frozen=True)
class CallSpec:
    """How a captured module was called: the pytree structure of ``(args, kwargs)``, its
    static (non-array) leaves ``((index, value), ...)`` and which array leaves carry the
    call batch on axis 0 (the rest are shared by every call).  Hashable (a jit static)."""

    treedef: Any
    static: tuple
    per_call: tuple
    unit: tuple = ()  # per array leaf: its per-call leading axis of 1 dropped in storage

    def restore(self, arrays: Sequence) -> list:
        """One call's stored argument arrays as the module saw them (dropped unit axes back)."""
        unit = self.unit or (False,) * len(arrays)
        return [a[None] if u else a for a, u in zip(arrays, unit)]

    def build(self, arrays: Sequence) -> tuple[tuple, dict]:
        """``(args, kwargs)`` from the array leaves (in order) and the static ones."""
        leaves, it = [], iter(arrays)
        static = dict(self.static)
        for i in range(len(self.static) + len(self.per_call)):
            leaves.append(static[i] if i in static else next(it))
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


@dataclasses.dataclass
class BlockData:
    """What was captured of one module: its unbound ``module``, the ``spec`` of its call,
    the array arguments ``args`` (host arrays; per-call ones ``[D, ...]``), its ``output``
    (the module's output pytree with leaves ``[D, ...]``, or None) and ``grad`` (the
    squared-error gradient w.r.t. the output, the same pytree, or None)."""

    module: Any
    spec: CallSpec
    args: list
    output: Optional[np.ndarray] = None
    grad: Optional[np.ndarray] = None

    def batch(self, idx) -> list:
        """The argument arrays of calls ``idx`` (shared arguments as they are)."""
        return [jnp.asarray(a[idx]) if pc else jnp.asarray(a) for a, pc in zip(self.args, self.spec.per_call)]


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, jax.core.Tracer))


def _is_unit(a) -> bool:
    """Whether one call's array has a leading axis of 1 (the call itself, as a batch of 1)."""
    return np.ndim(a) >= 1 and a.shape[0] == 1


def _drop_unit(a):
    """One call's array without its leading axis of 1 (stored ``[D, ...]`` as the call's batch)."""
    return a[0] if _is_unit(a) else a


class BlockCapture:
    """Replays ``net(params, x, t, **cond)`` (a family's network call, e.g.
    :meth:`jaxdq.sampling.families.Family.eps_fn`) and captures the modules at ``paths``.

    One jitted replay serves every capture (the paths are fixed here): the device holds
    one chunk's activations of all the paths, the host keeps what :meth:`run` is asked for.
    """

    def __init__(self, net: Callable, paths: Sequence[str], chunk: int = 16):
        self.net, self.paths, self.chunk = net, tuple(paths), int(chunk)
        self._specs: dict = {}
        self._modules: dict = {}
        self._fwd = jax.jit(self._forward, static_argnames=("per",))
        self._grad = jax.jit(self._fisher, static_argnames=("per",))

    # -- the traced replay
    def _intercept(self, rec: dict, deltas: Optional[Mapping] = None):
        paths = set(self.paths)

        def icpt(next_fun, args, kwargs, ctx):
            if ctx.method_name != "__call__":
                return next_fun(*args, **kwargs)
            path = "/".join(ctx.module.path)
            if path not in paths:
                return next_fun(*args, **kwargs)
            if path in rec:
                raise ValueError(f"module {path!r} is called more than once per network call; "
                                 "reconstruct its parent (or its layers) instead")
            out = next_fun(*args, **kwargs)
            if deltas is not None and path in deltas:
                out = jax.tree_util.tree_map(lambda o, d: o + d.astype(o.dtype).reshape(o.shape), out, deltas[path])
            leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
            arrays = [l for l in leaves if _is_array(l)]
            self._modules.setdefault(path, ctx.module.clone(parent=None, name=None))
            static = tuple((i, l) for i, l in enumerate(leaves) if not _is_array(l))
            rec[path] = (treedef, static, arrays, out)
            return out

        return icpt

    def _one_call(self, params, x, t, cond, per, rec, deltas=None):
        """The network on ONE call (``x``, ``t`` and the ``per`` keys of ``cond`` without
        their call axis, run as a batch of 1): under :func:`jax.vmap` over the calls, every
        captured array gets the call axis in front, whatever the modules do with their own
        leading axis (frames or patches folded into the batch, as Latte's ``[N·F, T, D]``
        spatial and ``[N·T, F, D]`` temporal blocks)."""
        c = {k: (v[None] if k in per else v) for k, v in cond.items()}
        with nn.intercept_methods(self._intercept(rec, deltas)):
            eps = self.net(params, x[None], t[None], **c)
        return eps[0]

    def _vmapped(self, params, x, t, cond, per, deltas=None):
        """``(eps [B, ...], {path: (arrays, output)})`` with every captured leaf ``[B, ...]``
        (per call; an argument shared by all calls is repeated)."""
        shapes: dict = {}

        def one(x, t, cond, deltas):
            rec: dict = {}
            eps = self._one_call(params, x, t, cond, per, rec, deltas)
            got = {}
            for p, (treedef, static, arrays, o) in rec.items():
                shapes[p] = (treedef, static, tuple(_is_unit(a) for a in arrays))
                got[p] = ([_drop_unit(a) for a in arrays], jax.tree_util.tree_map(_drop_unit, o))
            return eps, got

        cond_axes = {k: (0 if k in per else None) for k in cond}
        eps, out = jax.vmap(one, in_axes=(0, 0, cond_axes, 0))(x, t, cond, deltas)
        for p, (treedef, static, unit) in shapes.items():
            self._specs.setdefault(p, (treedef, static, tuple(True for _ in unit), unit))
        return eps, out

    def _forward(self, params, x, t, cond, per):
        return self._vmapped(params, x, t, cond, per)

    def _fisher(self, params, x, t, cond, per, target, zeros):
        """d ‖ε(params) − target‖² / d(block output) at ``zeros`` (one per path asked for,
        leaves ``[B, ...]``), in one backward pass."""
        def loss(deltas):
            eps, _ = self._vmapped(params, x, t, cond, per, deltas)
            return jnp.sum(jnp.square(eps.astype(jnp.float32) - target))

        return jax.grad(loss)(zeros)

    # -- host side
    def _chunks(self, data: CalibSet):
        n, c = data.size, min(self.chunk, data.size)
        for start in range(0, n, c):
            idx = np.arange(start, start + c) % n  # the last chunk wraps (one compiled shape)
            yield start, min(start + c, n) - start, data.take(idx)

    def run(self, params: Mapping, data: CalibSet, *, inputs: Sequence[str] = (), outputs: Sequence[str] = (),
            fisher: Sequence[str] = (), reference: Optional[Mapping] = None, progress: bool = False,
            desc: str = "capturing") -> dict[str, BlockData]:
        """Capture over all calls of ``data`` with ``params``: the call arguments of the
        modules in ``inputs``, the outputs of those in ``outputs``, and (``fisher``, needs
        ``reference`` params) the gradient of ``‖ε(params) − ε(reference)‖²`` w.r.t. the
        outputs.  Returns ``{path: BlockData}`` for every path named."""
        want = set(inputs) | set(outputs) | set(fisher)
        missing = want - set(self.paths)
        if missing:
            raise ValueError(f"not captured by this replay: {sorted(missing)}")
        if fisher and reference is None:
            raise ValueError("Fisher weights need the reference (float) params")
        acc: dict = {p: {"args": [], "out": [], "grad": []} for p in want}
        per = tuple(sorted(k for k, v in data.cond.items() if _per_call(v, data.size)))  # the rest: shared
        bar = None
        if progress:
            from jaxdq.sampling.progress import ProgressBar

            bar = ProgressBar(data.size, desc, unit="call")
        for _, k, call in self._chunks(data):
            eps, got = self._fwd(params, call["x"], call["t"], call["cond"], per=per)
            for p in want:
                arrays, o = got[p]
                if p in inputs:
                    acc[p]["args"].append([np.asarray(a)[:k] if pc else np.asarray(a)
                                           for a, pc in zip(arrays, self._specs[p][2])])
                if p in outputs:  # the output may be a pytree (e.g. an attention returning several arrays)
                    acc[p]["out"].append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:k], o))
            if fisher:
                target, _ = self._fwd(reference, call["x"], call["t"], call["cond"], per=per)
                zeros = {p: jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, jnp.float32), got[p][1])
                         for p in fisher}
                g = self._grad(params, call["x"], call["t"], call["cond"], per, target.astype(jnp.float32), zeros)
                for p in fisher:
                    acc[p]["grad"].append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:k], g[p]))
            if bar is not None:
                bar.update(k)
        if bar is not None:
            bar.close()
        result = {}
        for p in want:
            treedef, static, per_call, unit = self._specs[p]
            spec = CallSpec(treedef, static, per_call, unit)
            args = []
            if acc[p]["args"]:
                for j, pc in enumerate(per_call):
                    args.append(np.concatenate([c[j] for c in acc[p]["args"]]) if pc else acc[p]["args"][0][j])
            result[p] = BlockData(module=self._modules[p], spec=spec, args=args, output=_concat(acc[p]["out"]),
                                  grad=_concat(acc[p]["grad"]))
        return result

    def call_order(self, params: Mapping, data: CalibSet) -> list[str]:
        """The captured paths in the order the network calls them (one traced call)."""
        order: list = []

        def icpt(next_fun, args, kwargs, ctx):
            if ctx.method_name == "__call__":
                p = "/".join(ctx.module.path)
                if p in self.paths and p not in order:
                    order.append(p)
            return next_fun(*args, **kwargs)

        call = data.take(np.arange(min(1, data.size)))
        with nn.intercept_methods(icpt):
            jax.eval_shape(lambda p: self.net(p, call["x"], call["t"], **call["cond"]), params)
        return order


def _concat(chunks: list) -> Any:
    """The per-chunk pytrees (arrays ``[k, ...]`` at the leaves) joined along axis 0, or None."""
    if not chunks:
        return None
    return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *chunks)


class _Host(nn.Module):
    """Runs one captured module standalone: params ``{"child": the module's params}``."""

    child: nn.Module

    @nn.compact
    def __call__(self, *args, **kwargs):
        return self.child(*args, **kwargs)


def apply_block(module: nn.Module, params: Any, spec: CallSpec, arrays: Sequence) -> Any:
    """``module(*args, **kwargs)`` with its params (a dict subtree or one layer node) and the
    call rebuilt from ``spec`` and the argument ``arrays``."""
    args, kwargs = spec.build(arrays)
    return _Host(module).apply({"params": {"child": params}}, *args, **kwargs)


def apply_calls(module: nn.Module, params: Any, spec: CallSpec, arrays: Sequence) -> Any:
    """The captured module on a batch of captured calls: ``arrays`` as :meth:`BlockData.batch`
    gives them (per-call ones ``[B, ...]``), the module run on each call's own arguments
    (as it was in the network, its own leading axis included) under :func:`jax.vmap`;
    returns its output pytree with leaves ``[B, ...]``."""
    axes = [0 if pc else None for pc in spec.per_call]
    one = lambda *a: jax.tree_util.tree_map(_drop_unit, apply_block(module, params, spec, spec.restore(a)))  # noqa: E731
    return jax.vmap(one, in_axes=axes)(*arrays)


__all__ = ["BlockCapture", "BlockData", "CalibSet", "CallSpec", "apply_block", "apply_calls", "calibration_set", "condition_set"]
