"""Past one GPU (issue 21): a FLUX.1-dev W8A8 sampling step sharded over N devices vs 1, and
data-parallel calibration throughput over N devices vs 1.  JSON out (the command inside).

    python bench/bench_multigpu.py --out $OUT/multigpu.json              # every local GPU
    python bench/bench_multigpu.py --out $OUT/multigpu.json --devices 1  # validates on one GPU

1. **FLUX.1-dev 1024² W8A8 step, tensor parallel** (``--strategy tp``: q/k/v and MLP
   columns split over the mesh's ``"model"`` axis, output projections their rows;
   :func:`jaxdq.distributed.param_specs`).  The weights are made on the devices layer by
   layer, already split: a random float kernel ``N(0, 1/C_in)`` per linear, quantized in the
   same jitted call to per-channel int8 codes + scales with dynamic per-token int8
   activations (the ``dynamic-w8a8`` recipe's layers; embedders and the final layer float),
   each output leaf placed with its sharding, so no device ever holds the whole float model.
   One network call (guidance-distilled, batch 1: 4096 image + 512 text tokens) under
   ``policy("integer")`` (XLA's int8 dot, which the partitioner splits; the Pallas kernels are
   custom calls it cannot).  Reported per mesh: compile s, median/min step ms over ``--reps``,
   weight bytes per device, XLA's per-device argument/temp bytes, the peak bytes in use of
   every device, and the output's max relative difference to the 1-device output.
2. **Data-parallel calibration**: :func:`jaxdq.calibrate.calibrate` of DiT-XL/2 (random
   weights, 256², CFG: sampling trajectory + per-step statistics replay) on
   ``--calib-samples`` samples, batch split over the mesh's ``"data"`` axis, run for 2 and
   for ``--calib-steps`` steps (``calibrate`` compiles on every call, the same for both):
   throughput = samples · (steps − 2) / (difference of the two wall times), and the
   statistics' max relative difference to the 1-device statistics (they must agree).

``NCCL_NVLS_ENABLE=0`` is set before jax starts (NVLink multicast off on these machines).
``--tiny``: the same code on tiny FLUX / DiT configs, 2 steps (a CPU dry run of this script:
``XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu python
bench/bench_multigpu.py --tiny --out /tmp/m.json``); it also checks that the direct build
equals :func:`jaxdq.quant.rules.quantize_params` on the same kernels.
"""
from __future__ import annotations

import os

os.environ["NCCL_NVLS_ENABLE"] = "0"  # before jax / NCCL start

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxdq import distributed as dist  # noqa: E402
from jaxdq.backend import bind, policy  # noqa: E402
from jaxdq.quant.layers import (ActQuant, FloatLinear, QLinear, QWeight, as_layer, get_path, iter_layers,  # noqa: E402
                                map_layers, set_path, to_node)
from jaxdq.quant.quantizer import compute_qparams, quantize  # noqa: E402
from jaxdq.quant.recipes import dynamic_cfg  # noqa: E402
from jaxdq.quant.rules import FIRST_LAST, Rule, keep_float, quantize_params  # noqa: E402

CFG = dynamic_cfg(8, 8)
RULES = [keep_float(), Rule(CFG)]
TINY_FLUX = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6), in_channels=16)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def peaks(mesh) -> list:
    """Peak bytes in use of every device of ``mesh`` (None where the backend has no stats)."""
    out = []
    for d in mesh.devices.flat:
        s = d.memory_stats() if hasattr(d, "memory_stats") else None
        out.append(None if not s else s.get("peak_bytes_in_use"))
    return out


def quantized_layer(kernel, bias, quantize_it: bool):
    """The ``dynamic-w8a8`` layer of a float kernel ``[C_in, C_out]`` (what ``quantize_linear``
    builds, without its host-side NaN check: the kernel is random normal), or the float layer."""
    if not quantize_it:
        return FloatLinear(kernel=kernel, bias=bias)
    scale, zero = compute_qparams(kernel, CFG.weight, kind="weight")
    codes = quantize(kernel, scale, zero, CFG.weight, kind="weight")
    return QLinear(weight=QWeight(codes=codes, scale=scale, zero=zero, spec=CFG.weight), act=ActQuant(spec=CFG.act),
                   bias=bias)


def build_on_mesh(shapes, mesh, strategy, roles, key):
    """Params of ``shapes`` (``jax.eval_shape`` of an init) made on ``mesh`` one layer at a
    time: each linear's random kernel is drawn and quantized in one jitted call whose
    outputs carry the layer's shardings (:func:`jaxdq.distributed.param_specs`)."""
    cache: dict = {}
    counter = [0]

    def make(path, layer):
        counter[0] += 1
        q = roles.get(path) not in FIRST_LAST
        c_in, c_out = layer.kernel.shape
        has_bias = layer.bias is not None
        sig = (c_in, c_out, has_bias, q, dist.row_parallel(path, roles.get(path)))
        if sig not in cache:
            def fn(k, c_in=c_in, c_out=c_out, has_bias=has_bias, q=q):
                kk, kb = jax.random.split(k)
                w = jax.random.normal(kk, (c_in, c_out), jnp.float32) / np.sqrt(c_in)
                b = 0.02 * jax.random.normal(kb, (c_out,), jnp.float32) if has_bias else None
                return to_node(quantized_layer(w, b, q))

            one: dict = {}
            set_path(one, path, jax.eval_shape(fn, key))
            specs = get_path(dist.param_specs(one, mesh, strategy, roles), path)
            cache[sig] = jax.jit(fn, out_shardings=jax.tree_util.tree_map(
                lambda s: jax.sharding.NamedSharding(mesh, s), specs,
                is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec)))
        return as_layer(cache[sig](jax.random.fold_in(key, counter[0])))

    params = map_layers(shapes, make)
    rep = dist.replicated(mesh)

    def plain(x):  # norms' scales: ones; anything else small noise; replicated
        if isinstance(x, jax.ShapeDtypeStruct):
            f = (lambda: jnp.ones(x.shape, x.dtype)) if x.ndim == 1 else (lambda: jnp.full(x.shape, 0.02, x.dtype))
            return jax.jit(f, out_shardings=rep)()
        return x

    return jax.tree_util.tree_map(plain, params), len(cache)


def time_calls(f, args, reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - t0)
    return out, first, times


def flux_step(args, n):
    from jaxdq.models.flux import Flux, flux_config, image_ids, layer_roles, init_flux, text_ids

    cfg = flux_config("flux1-dev", **(TINY_FLUX if args.tiny else {}))
    roles = layer_roles(cfg)
    mesh = dist.mesh_for(n, args.strategy)
    shapes = jax.eval_shape(lambda k: init_flux(cfg, k), jax.random.PRNGKey(0))
    t0 = time.time()
    params, kinds = build_on_mesh(shapes, mesh, args.strategy, roles, jax.random.PRNGKey(0))
    jax.block_until_ready(params)
    build_s = time.time() - t0
    row = {"devices": n, "mesh": dist.describe(mesh), "strategy": args.strategy, "build_s": round(build_s, 1),
           "compiled_layer_builders": kinds, "weight_bytes_per_device": dist.bytes_per_device(params),
           "weight_bytes_total": int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))}
    codes = [layer.weight.codes for _, layer in iter_layers(params) if isinstance(layer, QLinear)]
    row["quantized_layers"] = len(codes)
    row["codes_split"] = sum(c.addressable_shards[0].data.size < c.size for c in codes)
    if args.tiny and n == args.devices_list[0]:  # the direct build = quantize_params on the same kernels
        row["build_equals_quantize_params"] = check_build(shapes, mesh, args.strategy, roles)
    h = 16 if args.tiny else args.resolution // 8
    n_txt = 32 if args.tiny else 512
    rng = np.random.default_rng(0)
    rep = dist.replicated(mesh)
    put = lambda a: jax.device_put(jnp.asarray(a, jnp.float32), rep)  # noqa: E731
    x = put(rng.standard_normal((args.batch, (h // 2) ** 2, cfg.in_channels)))
    txt = put(rng.standard_normal((args.batch, n_txt, cfg.joint_attention_dim)))
    pooled = put(rng.standard_normal((args.batch, cfg.pooled_projection_dim)))
    t = put(np.full((args.batch,), 0.5))
    ii, ti = put(image_ids(h, h)), put(text_ids(n_txt))
    g = put(np.full((args.batch,), 3.5))
    m = Flux(cfg)
    pol = policy("integer")

    def step(p, x, txt, pooled, t, ii, ti, g):
        return m.apply({"params": bind(p, pol)}, x, txt, pooled, t, ii, ti, g)

    f = jax.jit(step)
    call = (params, x, txt, pooled, t, ii, ti, g)
    with dist.use_mesh(mesh):
        t0 = time.time()
        compiled = f.lower(*call).compile()
        row["compile_s"] = round(time.time() - t0, 1)
        row["xla_memory_per_device"] = dist.compiled_memory(compiled)
        out, first, times = time_calls(compiled, call, args.reps)
    row.update(first_call_s=round(first, 3), step_ms_median=round(1e3 * float(np.median(times)), 2),
               step_ms_min=round(1e3 * min(times), 2), reps=args.reps, peak_bytes_per_device=peaks(mesh),
               finite=bool(np.isfinite(np.asarray(out)).all()))
    out = np.asarray(out)
    del params, compiled, f
    return row, out


def check_build(shapes, mesh, strategy, roles) -> bool:
    """The jitted per-layer build equals ``quantize_params`` of the same float kernels."""
    floats, _ = build_on_mesh_float(shapes, mesh, strategy, roles)
    q_ref = quantize_params(jax.tree_util.tree_map(np.asarray, floats), RULES, roles=roles)
    q_dir = map_layers(floats, lambda p, l: quantized_layer(l.kernel, l.bias, roles.get(p) not in FIRST_LAST))  # noqa
    a, b = jax.tree_util.tree_leaves(q_ref), jax.tree_util.tree_leaves(q_dir)
    return len(a) == len(b) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)) and \
        jax.tree_util.tree_structure(q_ref) == jax.tree_util.tree_structure(q_dir)


def build_on_mesh_float(shapes, mesh, strategy, roles):
    key = jax.random.PRNGKey(3)
    out = map_layers(shapes, lambda p, l: FloatLinear(  # noqa: E741
        kernel=jax.random.normal(jax.random.fold_in(key, zlib.crc32(p.encode()) % 997), l.kernel.shape) / np.sqrt(l.kernel.shape[0]),
        bias=None if l.bias is None else jnp.zeros(l.bias.shape)))
    out = jax.tree_util.tree_map(lambda x: jnp.ones(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, out)
    return dist.shard_params(out, mesh, strategy, roles), None


def calibration_throughput(args, n):
    from jaxdq.calibrate import calibrate
    from jaxdq.models.dit import dit_config, init_dit
    from jaxdq.models.sources import LoadedModel
    from jaxdq.sampling.families import Request

    cfg = dit_config("DiT-S/8", depth=1) if args.tiny else dit_config("DiT-XL/2")
    mesh = dist.mesh_for(n, "replicate")
    shapes = jax.eval_shape(lambda k: init_dit(cfg, k), jax.random.PRNGKey(0))
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    rep = dist.replicated(mesh)
    gen = {}
    out = []
    for i, s in enumerate(leaves):  # random, replicated on the mesh (adaLN/final not zero)
        k = (tuple(s.shape), s.dtype)
        if k not in gen:
            gen[k] = jax.jit(lambda key, shape=s.shape, dt=s.dtype: (0.02 * jax.random.normal(key, shape)).astype(dt),
                             out_shardings=rep)
        out.append(gen[k](jax.random.PRNGKey(i)))
    model = LoadedModel(cfg, jax.tree_util.tree_unflatten(tree, out), {"arch": "dit", "method": "float"})
    classes = args.calib_samples // 2 if args.calib_samples >= 2 else 1
    batch = model.family.batch(cfg, Request(classes=tuple(range(classes)), per_class=args.calib_samples // classes,
                                            seed=1234))
    lo, hi = (1, 3) if args.tiny else (2, args.calib_steps)
    times = {}
    for steps in (lo, hi):  # calibrate compiles on every call: the marginal time of hi - lo steps is compute
        t0 = time.time()
        stats = calibrate(model, batch, num_steps=steps, mesh=mesh)
        jax.block_until_ready(jax.tree_util.tree_leaves(stats))
        times[steps] = time.time() - t0
    samples = int(batch.x_T.shape[0])
    row = {"devices": n, "mesh": dist.describe(mesh), "model": "DiT-S/8 (1 block)" if args.tiny else "DiT-XL/2 256²",
           "samples": samples, "cfg_batch": 2 * samples, "steps": [lo, hi],
           "seconds": [round(times[lo], 2), round(times[hi], 2)],
           "marginal_s": round(times[hi] - times[lo], 2),
           # None when compile-time noise exceeds the extra steps' compute (tiny models)
           "sample_steps_per_s": round(samples * (hi - lo) / (times[hi] - times[lo]), 2)
           if times[hi] - times[lo] > 0.05 * times[hi] else None,
           "peak_bytes_per_device": peaks(mesh)}
    flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(
        {k: stats[k] for k in ("cond", "uncond") if k in stats})}
    return row, flat


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--devices", type=int, default=None, help="N (default: every local device); 1 vs N measured")
    ap.add_argument("--strategy", default="tp", choices=("tp", "fsdp"), help="how the FLUX weights are split")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1, help="FLUX images per step")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration samples (N must divide them)")
    ap.add_argument("--calib-steps", type=int, default=22)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: flux,calib")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run of this script (tiny configs)")
    args = ap.parse_args()
    n = args.devices or jax.device_count()
    # N first: a device's peak bytes in use is a process-lifetime peak, and the 1-device run
    # (more per device) after it leaves the N-device peaks clean
    args.devices_list = [1] if n == 1 else [n, 1]
    if args.tiny:
        args.reps = 2
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "jax": jax.__version__,
              "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
              "local_devices": jax.local_device_count(), "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
              "tiny": args.tiny, "flux_w8a8_step": [], "dp_calibration": [],
              "note": "rows: 1 device, then N; peak_bytes_per_device is the process-lifetime peak (N ran "
                      "first; run the parts in separate processes with --skip for clean peaks); "
                      "xla_memory_per_device is the compiled step's own analysis"}

    def save():
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)

    skip = set(filter(None, args.skip.split(",")))
    if "flux" not in skip:
        outs = []
        for k in args.devices_list:
            row, out = flux_step(args, k)
            outs.append(out)
            print(json.dumps(row), flush=True)
            result["flux_w8a8_step"].insert(0, row)  # rows in order 1, N
            save()
        if len(outs) == 2:
            b, a = result["flux_w8a8_step"][1], result["flux_w8a8_step"][0]
            b["rel_diff_vs_1_device"] = rel(outs[0], outs[1])
            result["flux_speedup"] = round(a["step_ms_median"] / b["step_ms_median"], 3)
            result["flux_weight_bytes_per_device_ratio"] = round(b["weight_bytes_per_device"]
                                                                 / a["weight_bytes_per_device"], 3)
    if "calib" not in skip:
        flats = []
        for k in args.devices_list:
            row, flat = calibration_throughput(args, k)
            flats.append(flat)
            print(json.dumps(row), flush=True)
            result["dp_calibration"].insert(0, row)
            save()
        if len(flats) == 2:
            a, b = result["dp_calibration"]
            b["stats_max_rel_diff_vs_1_device"] = max(
                float(np.max(np.abs(flats[0][k].astype(np.float64) - flats[1][k]) / np.maximum(np.abs(flats[1][k]), 1e-30)))
                if flats[1][k].size else 0.0 for k in flats[1])
            if a["sample_steps_per_s"] and b["sample_steps_per_s"]:
                result["calibration_speedup"] = round(b["sample_steps_per_s"] / a["sample_steps_per_s"], 3)
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
