"""Past one device: a mesh, data-parallel batches, sharded params and sequence-parallel
attention, with JAX's own sharding only (``Mesh``, ``NamedSharding``, ``PartitionSpec``,
``shard_map``); no communication layer of jaxdq's own.

Everything stays one SPMD ``jax.jit`` program: a sharding says where each piece of an
array lives and XLA's partitioner inserts the collectives, so a sharded run computes what
one device computes, up to the order of floating-point reductions (integer reductions,
e.g. the int8 × int8 → int32 GEMM split over its contraction axis, are exact)::

    mesh = make_mesh(model=1)                        # [data = all devices, model = 1]
    mesh = mesh_for(2, "tp")                         # what the CLI's --devices 2 --shard tp builds
    run = family.sampler(config, mesh=mesh)          # data parallel: batch split over "data"
    stats = calibrate(model, batch, mesh=mesh)       # the statistics come out global (max/min/sum
                                                     # reduce across devices inside the jit)
    mesh = make_mesh(model=4)                        # [data = n/4, model = 4]
    params = shard_params(qparams, mesh, "tp")       # weights split over "model"
    x0 = family.sampler(config, mesh=mesh)(params, x_T, cond, uncond, key)

The mesh has two axes, :data:`DATA` (the batch) and :data:`MODEL` (weights, heads, the
sequence).  Nothing here is module state: every function takes its mesh; the one
context jaxdq enters is jax's own (:func:`use_mesh`, around a call, so that the
sequence-parallel attention finds the mesh while the model is traced).

Params (:func:`param_specs` / :func:`shard_params`), per linear layer, consistently for a
weight and everything stored with it (float kernel ``[C_in, C_out]``, integer codes "kn"
``[C_in, C_out]`` or "nk" ``[C_out, C_in]``, packed 4-bit codes (half the packed axis),
per-channel scales ``[1, C_out]``, group scales ``[C_in // G, C_out]``, zero points, bias,
low-rank factors ``[C_in, r]`` / ``[r, C_out]``, smoothing ``[C_in]``):

* ``"tp"`` (tensor parallel, Megatron pairs): output projections of attention and MLP
  (``proj``, ``to_out``, ``fc2``, FLUX's single-block ``proj_out``, …) split their input
  channels C_in over ``"model"`` (row parallel); every other linear splits C_out (column
  parallel: q/k/v = heads, ``fc1`` = MLP columns, adaLN, embedders).  Replicated over
  ``"data"``.  Other params (norms, tables) replicated.
* ``"fsdp"``: every linear split along C_out (else C_in) over all mesh axes; other params of
  at least :data:`FSDP_MIN_SIZE` elements along their largest divisible axis.  XLA gathers
  what a layer needs where it is used.
* ``"replicate"``: every array on every device.

A layer whose dimensions do not divide the axis size falls back to the other dimension,
then to replication (never a partial spec: a weight and its scales agree).

The Pallas kernel path (``policy("kernels")``) is not partitioned by XLA (a custom call):
on a mesh use the reference or ``policy("integer")`` (XLA's int8 dot, partitioned).

Multi-host (several processes, each with its local devices): every process runs the same
script, and calls :func:`initialize` (``jax.distributed.initialize``) before any other jax
call; :func:`make_mesh` then spans the devices of all processes and the ``mesh=`` entry
points run one SPMD program over them (each process feeds the same global inputs; a
process holds only its own shards; :func:`to_host` gathers a result)::

    from jaxdq import distributed as dist
    dist.initialize()                                  # SLURM / Open MPI / TPU: detected
    dist.initialize("10.0.0.1:1234", num_processes=2, process_id=rank)   # explicit
    mesh = dist.make_mesh()                            # data = every device of every process
    x0 = dist.to_host(family.sampler(config, mesh=mesh)(params, x_T, cond, uncond, key))

On CPU (the test: 2 processes × 2 devices on localhost) cross-process collectives use gloo
(``jax_cpu_collectives_implementation``, set by :func:`initialize`); on GPUs NCCL (keep
``NCCL_NVLS_ENABLE=0`` where NVLink multicast is unavailable).

jax versions: ``shard_map`` is ``jax.shard_map`` (jax >= 0.6, incl. 0.10 / 0.11) or
``jax.experimental.shard_map.shard_map`` (older); :func:`shard_map` picks what exists.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdq.quant.layers import (FloatLinear, InputTransform, QConv, QLinear, QWeight, Segmented, as_layer,
                                get_path, map_layers, set_path, to_node)

DATA, MODEL = "data", "model"
STRATEGIES = ("replicate", "fsdp", "tp")
#: Linear names whose C_in is split under "tp" (the second layer of a Megatron pair).
ROW_PARALLEL = frozenset({"proj", "to_out", "to_out_0", "to_add_out", "fc2", "net_2", "proj_out"})
#: Roles never row parallel (their "proj"/"proj_out" is an embedder or the final layer).
COLUMN_ROLES = frozenset({"embedding", "final", "time-embedding", "adaLN"})
#: "fsdp": non-layer params smaller than this many elements stay replicated.
FSDP_MIN_SIZE = 1 << 14
#: additive logit bias of a padded key in the sequence-parallel attention (exp underflows to 0)
PAD_BIAS = -1e9


# --------------------------------------------------------------------------- jax compatibility
def shard_map(f: Callable, *, mesh, in_specs, out_specs, check: bool = False) -> Callable:
    """``jax.shard_map`` (jax >= 0.6), else ``jax.experimental.shard_map.shard_map``."""
    sm = getattr(jax, "shard_map", None)
    if sm is not None:
        return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check)
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(f, mesh, in_specs, out_specs, check_rep=check)


def use_mesh(mesh: Optional[Mesh]):
    """Context manager putting ``mesh`` in jax's mesh context (``jax.set_mesh``, older
    ``jax.sharding.use_mesh`` / ``with mesh``); a no-op for None.  Enter it outside jit."""
    if mesh is None:
        return contextlib.nullcontext()
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    if hasattr(jax.sharding, "use_mesh"):
        return jax.sharding.use_mesh(mesh)
    return mesh


def context_mesh():
    """The mesh of jax's mesh context (an ``AbstractMesh`` while tracing), or None."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    m = get() if get is not None else None
    if m is None or getattr(m, "empty", not getattr(m, "axis_names", ())):
        return None
    return m


# --------------------------------------------------------------------------- mesh
def make_mesh(model: int = 1, *, data: Optional[int] = None, devices: Optional[Sequence] = None) -> Mesh:
    """A ``[data, model]`` mesh (axes :data:`DATA`, :data:`MODEL`) of ``devices``.

    Args:
      model: devices per model-parallel group (weights / heads / sequence split over them).
      data: data-parallel groups; None: ``len(devices) // model``.
      devices: default ``jax.devices()``: every device of every process (one process: all
        its local devices; after :func:`initialize`, the global devices, process-major).
    """
    devs = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devs) % model:
        raise ValueError(f"model={model} does not divide the {len(devs)} devices")
    data = len(devs) // model if data is None else data
    if data * model != len(devs):
        raise ValueError(f"data={data} × model={model} != {len(devs)} devices")
    return Mesh(np.asarray(devs, dtype=object).reshape(data, model), (DATA, MODEL))


def mesh_for(devices: Optional[int] = None, strategy: str = "replicate") -> Mesh:
    """The mesh the CLI's ``--devices N --shard STRATEGY`` use: the first ``devices`` of
    ``jax.devices()`` (None: all); ``"tp"``: ``[data 1, model n]`` (weights split, the
    batch whole); ``"replicate"`` / ``"fsdp"``: ``[data n, model 1]`` (the batch split,
    FSDP splitting the weights over the same devices)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    devs = jax.devices()
    if devices is not None and devices > len(devs):
        raise ValueError(f"--devices {devices}: only {len(devs)} {devs[0].platform} device(s) here")
    devs = devs[:devices] if devices is not None else devs
    return make_mesh(model=len(devs) if strategy == "tp" else 1, devices=devs)


def axis_size(mesh, axis) -> int:
    """Devices along ``axis`` (a name, a tuple of names, or None = 1); 1 if absent."""
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(dict(mesh.shape).get(a, 1) for a in names)


def describe(mesh: Mesh) -> dict:
    """JSON-able summary: axis sizes, device kinds, process count."""
    devs = list(mesh.devices.flat)
    return {"shape": {k: int(v) for k, v in mesh.shape.items()}, "devices": len(devs),
            "kind": sorted({d.device_kind for d in devs}), "processes": len({d.process_index for d in devs})}


# --------------------------------------------------------------------------- placing arrays
def _put(x: Any, sharding: NamedSharding) -> Any:
    """``x`` placed with ``sharding`` (kept as it is if already so); from host data in a
    multi-process run (every process holds the same global value)."""
    if x is None or not hasattr(x, "shape"):
        return x
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if isinstance(x, jax.Array) and x.is_fully_addressable and not sharding.is_fully_addressable:
        x = np.asarray(x)
    return jax.device_put(x, sharding)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def place_params(params: Any, mesh: Mesh) -> Any:
    """Every leaf already on ``mesh`` (e.g. :func:`shard_params`) kept, the rest replicated."""
    def put(x):
        if isinstance(x, jax.Array) and isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh:
            return x
        return _put(x, replicated(mesh))

    return jax.tree_util.tree_map(put, params)


def check_batch(n: int, mesh: Mesh) -> None:
    """ValueError unless a batch of ``n`` splits evenly over the mesh's data axis."""
    d = axis_size(mesh, DATA)
    if n % d:
        raise ValueError(f"a batch of {n} samples does not split over the mesh's {d} data-parallel devices "
                         f"(axis {DATA!r}); use a multiple of {d}")


def shard_leading(tree: Any, mesh: Mesh, n: int, axis: int = 0) -> Any:
    """Leaves whose dimension ``axis`` is ``n`` split over :data:`DATA` along it; other
    array leaves replicated (e.g. position ids).  ``n`` must divide over the data axis."""
    check_batch(n, mesh)

    def put(x):
        if not hasattr(x, "shape"):
            return x
        if x.ndim > axis and x.shape[axis] == n:
            return _put(x, NamedSharding(mesh, P(*([None] * axis), DATA)))
        return _put(x, replicated(mesh))

    return jax.tree_util.tree_map(put, tree)


def shard_batch(batch, mesh: Mesh):
    """A :class:`jaxdq.sampling.families.Batch` with ``x_T [N, ...]`` and every
    conditioning array ``[N, ...]`` split over :data:`DATA` along N."""
    n = int(batch.x_T.shape[0])
    x_T, cond, uncond = shard_leading((batch.x_T, batch.cond, batch.uncond), mesh, n)
    return dataclasses.replace(batch, x_T=x_T, cond=cond, uncond=uncond)


def call(fn: Callable, mesh: Mesh, params: Any, batched: Any, *rest: Any, batch_axis: int = 0) -> Any:
    """``fn(params, batched, *rest)`` data parallel on ``mesh``: params placed
    (:func:`place_params`), ``batched`` split along ``batch_axis`` (:func:`shard_leading`,
    N the size most of its leaves have there), run inside :func:`use_mesh`.  ``batched`` is passed as one
    argument (a tuple is not unpacked)."""
    sizes = [int(x.shape[batch_axis]) for x in jax.tree_util.tree_leaves(batched)
             if hasattr(x, "shape") and x.ndim > batch_axis]
    if not sizes:
        raise ValueError("no batched array to split")
    n = max(set(sizes), key=sizes.count)  # the batch size: what most leaves have along batch_axis
    with use_mesh(mesh):
        return fn(place_params(params, mesh), shard_leading(batched, mesh, n, batch_axis), *rest)


def data_parallel(run: Callable, mesh: Mesh) -> Callable:
    """A sampler ``run(params, x_T, cond, uncond, key)`` (:meth:`Family.sampler`) that splits
    ``x_T``/``cond``/``uncond`` over :data:`DATA` and places the params (kept where they are
    if on ``mesh``, else replicated); outputs are global arrays, batch split."""
    @functools.wraps(run)
    def sharded_run(params, x_T, cond, uncond, key):
        return call(lambda p, b, k: run(p, *b, k), mesh, params, (x_T, cond, uncond), key)

    sharded_run.mesh = mesh
    return sharded_run


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of a (possibly multi-process) global array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# --------------------------------------------------------------------------- params
def _replicated_specs(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda _: P(), tree)


def _kn(col: bool, ax) -> P:
    """Spec of a ``[C_in, C_out]``-shaped array split along C_out (col) or C_in."""
    return P(None, ax) if col else P(ax, None)


def _scale_spec(scale: Any, col: bool, ax) -> Optional[P]:
    """Per tensor ``[]`` → replicated; per channel ``[1, C_out]`` → C_out or replicated;
    per group ``[C_in // G, C_out]`` → like the weight."""
    if scale is None:
        return None
    if scale.ndim == 0:
        return P()
    if scale.ndim == 2 and scale.shape[0] == 1:
        return P(None, ax) if col else P()
    return _kn(col, ax) if scale.ndim == 2 else P()


def _transform_specs(t: InputTransform, col: bool, ax) -> InputTransform:
    return InputTransform(
        smooth=None if t.smooth is None else (P() if col else P(ax)),
        rotation=_replicated_specs(t.rotation),
        lowrank_a=None if t.lowrank_a is None else (P() if col else P(ax, None)),
        lowrank_b=None if t.lowrank_b is None else (P(None, ax) if col else P()))


def _qweight_specs(w: Any, col: bool, ax) -> Any:
    """A :class:`QWeight`'s specs; other weight nodes (e.g. twin-log) replicated."""
    if not isinstance(w, QWeight):
        return _replicated_specs(w)
    codes = _kn(col, ax) if w.layout == "kn" else _kn(not col, ax)  # "nk" is [C_out, C_in]
    return w.replace(codes=codes, scale=_scale_spec(w.scale, col, ax), zero=_scale_spec(w.zero, col, ax))


def _bias_spec(bias, col: bool, ax):
    return None if bias is None else (P(ax) if col else P())


def layer_specs(layer: Any, col: bool, ax) -> Any:
    """The layer's pytree with a ``PartitionSpec`` per array: split along C_out (``col``)
    or C_in over mesh axis ``ax`` (module docstring); activation qparams replicated."""
    if isinstance(layer, Segmented):
        return layer.replace(variants=tuple(layer_specs(v, col, ax) for v in layer.variants))
    if isinstance(layer, FloatLinear):
        return FloatLinear(kernel=_kn(col, ax), bias=_bias_spec(layer.bias, col, ax),
                           transform=_transform_specs(layer.transform, col, ax))
    if isinstance(layer, QLinear):
        return layer.replace(weight=_qweight_specs(layer.weight, col, ax), act=_replicated_specs(layer.act),
                             bias=_bias_spec(layer.bias, col, ax),
                             transform=_transform_specs(layer.transform, col, ax))
    if isinstance(layer, QConv):  # weight [kh·kw·C_in, C_out]
        return layer.replace(weight=_qweight_specs(layer.weight, col, ax), act=_replicated_specs(layer.act),
                             bias=_bias_spec(layer.bias, col, ax))
    return _replicated_specs(layer)


def _fits(layer: Any, specs: Any, mesh) -> bool:
    """Every split dimension of ``layer``'s arrays divides its axes' size."""
    arrays = jax.tree_util.tree_leaves(layer)
    spec_leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))
    for a, s in zip(arrays, spec_leaves):
        for dim, entry in zip(a.shape, tuple(s)):
            if entry is not None and dim % axis_size(mesh, entry):
                return False
    return True


def _strategy_axis(mesh, strategy: str):
    """The mesh axis (or axes tuple) a strategy splits params over; None: replicated."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "replicate":
        return None
    if strategy == "tp":
        if MODEL not in mesh.axis_names:
            raise ValueError(f"strategy 'tp' splits weights over a {MODEL!r} mesh axis; this mesh has {mesh.axis_names}")
        return MODEL if axis_size(mesh, MODEL) > 1 else None
    axes = tuple(a for a in mesh.axis_names if axis_size(mesh, a) > 1)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def row_parallel(path: str, role: Optional[str] = None) -> bool:
    """Whether "tp" splits this linear's C_in: an output projection of attention / MLP by
    name (:data:`ROW_PARALLEL`), not an embedder, a top-level layer or a :data:`COLUMN_ROLES` role."""
    if role is not None and role.split(":")[0] in COLUMN_ROLES:
        return False
    parts = path.split("/")
    return len(parts) > 1 and not parts[0].endswith("embedder") and parts[-1] in ROW_PARALLEL


def param_specs(params: Mapping, mesh, strategy: str = "tp", roles: Optional[Mapping[str, str]] = None) -> Any:
    """A tree like ``params`` with a ``PartitionSpec`` per array (module docstring).

    Args:
      params: float or quantized params (float dicts, typed layers, other arrays).
      mesh: the ``Mesh`` (or ``AbstractMesh``).
      strategy: "tp" | "fsdp" | "replicate".
      roles: path → role tag (the model's ``layer_roles``); refines the row/column choice.
    """
    ax = _strategy_axis(mesh, strategy)
    roles = roles or {}

    def for_layer(path, layer):
        if ax is None:
            return _replicated_specs(layer)
        first = not (strategy == "tp" and row_parallel(path, roles.get(path)))
        for col in (first, not first):
            specs = layer_specs(layer, col, ax)
            if _fits(layer, specs, mesh):
                return specs
        return _replicated_specs(layer)

    tree = map_layers(params, for_layer)
    n = axis_size(mesh, ax)

    def plain(x):
        if isinstance(x, P):
            return x
        if strategy != "fsdp" or ax is None or x.size < FSDP_MIN_SIZE:
            return P()
        for d in np.argsort(x.shape)[::-1]:
            if x.shape[d] % n == 0:
                return P(*[ax if i == d else None for i in range(x.ndim)])
        return P()

    return jax.tree_util.tree_map(plain, tree, is_leaf=lambda x: isinstance(x, P))


def shardings(specs: Any, mesh: Mesh) -> Any:
    """``NamedSharding(mesh, spec)`` for every spec of a :func:`param_specs` tree."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def shard_params(params: Mapping, mesh: Mesh, strategy: str = "tp", roles: Optional[Mapping[str, str]] = None) -> Any:
    """``params`` placed on ``mesh`` by :func:`param_specs` (host arrays are sent shard by
    shard; arrays already placed so are kept)."""
    return jax.tree_util.tree_map(_put, params, shardings(param_specs(params, mesh, strategy, roles), mesh))


def map_layers_sharded(params: Mapping, fn: Callable[[str, Any], Any], mesh: Mesh, strategy: str = "tp",
                       roles: Optional[Mapping[str, str]] = None) -> dict:
    """``map_layers(params, fn)`` one layer at a time on ``mesh``: each layer is placed
    with its ``strategy`` shardings (from wherever it is, e.g. host memory), ``fn(path,
    layer)`` runs on the shards (jax's ops keep them split), and the result is placed
    with its own shardings; then the non-layer params.  The whole float model never sits
    on one device: per device, one layer's arrays / n plus that layer's temporaries."""
    def on_mesh(path, layer):
        one: dict = {}
        set_path(one, path, to_node(layer))
        return as_layer(get_path(shard_params(one, mesh, strategy, roles), path))

    out = map_layers(params, lambda path, layer: on_mesh(path, fn(path, on_mesh(path, layer))))
    return shard_params(out, mesh, strategy, roles)


def quantize_params_sharded(params: Mapping, rules: Sequence, mesh: Mesh, *, roles: Mapping[str, str],
                            strategy: str = "tp", stats: Optional[Mapping] = None) -> dict:
    """:func:`jaxdq.quant.rules.quantize_params` layer by layer on sharded weights
    (:func:`map_layers_sharded`): the result is placed by ``strategy`` and equals the
    unsharded quantization (every op of the quantizer is elementwise or a max/min over C_in).
    (``QWeight.from_kernel``'s NaN check reads one layer to the host at a time.)"""
    from jaxdq.quant.rules import quantize_params

    def convert(path, layer):
        one: dict = {}
        set_path(one, path, layer)
        return get_path(quantize_params(one, rules, roles=roles, stats=stats), path)

    return map_layers_sharded(params, convert, mesh, strategy, roles)


def shard_shapes(params: Any) -> Any:
    """Per-device shard shape of every array leaf (what one device holds)."""
    return jax.tree_util.tree_map(lambda x: tuple(x.sharding.shard_shape(x.shape)), params)


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of placed arrays (the largest over devices)."""
    per: dict = {}
    for x in jax.tree_util.tree_leaves(tree):
        for s in x.addressable_shards:
            per[s.device] = per.get(s.device, 0) + s.data.size * s.data.dtype.itemsize
    return max(per.values()) if per else 0


def compiled_memory(compiled) -> dict:
    """Per-device bytes of a compiled executable (``jit(f).lower(...).compile()``):
    arguments, outputs, temporaries (XLA's memory analysis), or {} where unavailable."""
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (backends without the analysis)
        return {}
    if ma is None:
        return {}
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes")
    return {k.replace("_size_in_bytes", "_bytes"): int(getattr(ma, k, 0) or 0) for k in keys}


# --------------------------------------------------------------------------- sequence parallel attention
def sequence_parallel_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: Optional[jax.Array],
                                local: Callable, *, mesh=None, axis: str = MODEL) -> jax.Array:
    """All-to-all (DeepSpeed-Ulysses) attention: sequence split over ``axis``, heads
    gathered per device for the softmax.

    Inside ``shard_map`` each device holds ``[N_b, S / n, H, d]`` of q, k, v (the
    sequence split over the n devices of ``axis``; the batch over :data:`DATA` where it
    divides); one ``all_to_all`` trades the sequence split for a head split
    (``[N_b, S, H / n, d]``), ``local(q, k, v, bias)`` computes exact attention for those
    heads over the whole sequence, and a second ``all_to_all`` trades back.  Per device,
    the logits are ``[N_b, H / n, S, S]``, 1/n of the reference's.

    Args:
      q: ``[N, Tq, H, d]``; k, v: ``[N, Tk, H, d]``; bias: ``[N, Tk]`` key bias or None.
      local: the attention of one device (:func:`jaxdq.models.attention.attention` with an
        implementation), ``(q, k, v, bias) -> [N, Tq, H, d]``.
      mesh: default: jax's mesh context (:func:`use_mesh`, entered by the
        ``mesh=`` entry points); without one (or ``axis`` of size 1) this is ``local``.
    Returns:
      ``[N, Tq, H, d]`` as ``local`` returns it.  Sequences that do not divide are padded
      (padded keys get :data:`PAD_BIAS`, padded queries are dropped); H must divide.
    """
    mesh = mesh if mesh is not None else context_mesh()
    n = axis_size(mesh, axis) if mesh is not None and axis in mesh.axis_names else 1
    if n == 1:
        return local(q, k, v, bias)
    nb, tq, h, _ = q.shape
    tk = k.shape[1]
    if h % n:
        raise ValueError(f"sequence-parallel attention splits the {h} heads over the {n} devices of mesh axis "
                         f"{axis!r}: {h} is not a multiple of {n}")
    pq, pk = -tq % n, -tk % n
    if pk:
        pad_bias = jnp.concatenate([jnp.zeros((tk,), jnp.float32), jnp.full((pk,), PAD_BIAS, jnp.float32)])
        bias = jnp.broadcast_to(pad_bias, (nb, tk + pk)) + (0.0 if bias is None else jnp.pad(
            bias.astype(jnp.float32), ((0, 0), (0, pk))))
    seq_pad = lambda x, p: jnp.pad(x, ((0, 0), (0, p), (0, 0), (0, 0))) if p else x  # noqa: E731
    q, k, v = seq_pad(q, pq), seq_pad(k, pk), seq_pad(v, pk)
    d_ax = DATA if DATA in mesh.axis_names and axis_size(mesh, DATA) > 1 and nb % axis_size(mesh, DATA) == 0 else None
    seq = P(d_ax, axis, None, None)
    heads = lambda x: jax.lax.all_to_all(x, axis, 2, 1, tiled=True)  # noqa: E731  split H, gather S
    back = lambda x: jax.lax.all_to_all(x, axis, 1, 2, tiled=True)  # noqa: E731   split S, gather H
    if bias is None:
        out = shard_map(lambda q, k, v: back(local(heads(q), heads(k), heads(v), None)), mesh=mesh,
                        in_specs=(seq, seq, seq), out_specs=seq)(q, k, v)
    else:
        out = shard_map(lambda q, k, v, b: back(local(heads(q), heads(k), heads(v), b)), mesh=mesh,
                        in_specs=(seq, seq, seq, P(d_ax, None)), out_specs=seq)(q, k, v, bias)
    return out[:, :tq] if pq else out


# --------------------------------------------------------------------------- multi-host
def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, local_device_ids: Optional[Sequence[int]] = None,
               cpu_collectives: Optional[str] = "gloo") -> dict:
    """Start jax's multi-controller runtime (``jax.distributed.initialize``): call it first
    in every process, before any other jax call; then :func:`make_mesh` spans every
    process's devices and the ``mesh=`` entry points run one SPMD program over them.

    Every process runs the same script on the same inputs (a :class:`Batch` made from the
    same seed): :func:`shard_leading` places each process's part, results that are global
    arrays come back with :func:`to_host`.  On clusters jax detects the arguments (SLURM,
    Open MPI, Cloud TPU): call ``initialize()``.  On one machine (the CPU test)::

        initialize("localhost:12345", num_processes=2, process_id=i)

    ``cpu_collectives``: the CPU backend's cross-process collectives ("gloo"; None leaves
    jax's setting), needed for CPU processes only.  Returns ``{"process": i,
    "processes": n, "local_devices": k, "devices": total}``.
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count()}


__all__ = ["DATA", "MODEL", "STRATEGIES", "bytes_per_device", "call", "check_batch", "compiled_memory",
           "context_mesh", "data_parallel", "describe", "initialize", "layer_specs", "make_mesh",
           "map_layers_sharded", "mesh_for", "param_specs", "place_params", "quantize_params_sharded", "row_parallel",
           "sequence_parallel_attention", "shard_batch", "shard_leading", "shard_map", "shard_params",
           "shard_shapes", "shardings", "to_host", "use_mesh"]
