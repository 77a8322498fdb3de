"""One jitted sampling step of a quantized model through the Pallas kernels vs bf16 (random weights, real sizes).

One (model, method) per process, so the device's peak memory belongs to that configuration:

    python bench/bench_e2e.py --model pixart-sigma-1024 --method w8a8 --out e2e.jsonl [--profile]

Methods:
  bf16           the float model (bf16 weights and activations).
  w8a8, w4a8     per-channel symmetric weights (int4 packed), dynamic per-token int8
                 activations, every linear except the arch's keep-float layers
                 (first/last); ``use_kernels`` → the Pallas kernels, codes K-major.
  w8a8-xla       the same W8A8 model through XLA's own int8 dot (``impl="int"``).
  svdquant-w4a4  SVDQuant's layer structure with the paper's precision rules
                 (:func:`jaxdq.quant.svdquant.svdquant_rules`): W4A4 per group of 64
                 (weights and activations), a rank-32 fp16 low-rank branch and a smoothing
                 vector on every such linear; adaLN linears W4A16; embedders, first/last
                 and cross-attention K/V float.  The factors and smoothing vector are
                 random here (the SVD of 12B random weights would measure nothing): the
                 step's cost and the bytes do not depend on their values.
  svdquant-w4a4-unfused  the same, with the low-rank product added by XLA after the GEMM.

The quantized trees are built one linear at a time from random bf16 weights (never
the whole bf16 model), so ``peak_device_bytes`` is the quantized model's.  The step is
what the sampler calls: CFG-doubled batch for DiT/PixArt, one batch for FLUX.1-dev.
With ``--profile`` one step's CUDA kernels are timed (CUPTI) and grouped into
quantize kernel / integer GEMM kernel / XLA GEMMs / the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_models import setup, time_step  # noqa: E402
from jaxdq.quant.rules import is_float_linear  # noqa: E402

BF16 = jnp.bfloat16
METHODS = ("bf16", "w8a8", "w4a8", "w8a8-xla", "svdquant-w4a4", "svdquant-w4a4-unfused")
ARCH_OF = {"dit-xl2-256": "dit", "pixart-sigma-1024": "pixart", "flux1-dev-1024": "flux"}


def build_params(shapes, key, convert, std=0.02):
    """Random bf16 params with the structure of ``shapes`` (a ShapeDtypeStruct tree); each
    linear ``{"kernel", "bias"}`` is drawn and handed to ``convert(path, layer)`` at once."""
    gen = jax.jit(lambda k, shape: (std * jax.random.normal(k, shape, jnp.float32)).astype(BF16),
                  static_argnums=1)
    counter = [0]

    def draw(shape):
        counter[0] += 1
        return gen(jax.random.fold_in(key, counter[0]), tuple(shape))

    def walk(node, path):
        if is_float_linear(node):  # also true of a ShapeDtypeStruct tree's linears
            layer = {k: draw(v.shape) for k, v in node.items()}
            out = convert(path, layer)
            jax.block_until_ready(out)
            return out
        if isinstance(node, dict):
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in node.items()}
        return draw(node.shape)

    return walk(shapes, "")


def make_converter(method: str, arch_name: str, key, roles):
    from jaxdq.models.registry import get_arch
    from jaxdq.quant.recipes import dynamic_cfg
    from jaxdq.quant.rules import Rule, quantize_linear, use_kernels

    if method == "bf16":
        return lambda path, layer: layer
    keep = [Rule(p, None) for p in get_arch(arch_name).keep_float]
    if method.startswith("svdquant"):
        from jaxdq.quant.svdquant import fit_config, quantize_weight_layer, svdquant_rules

        # paper defaults: W4A4 g64, adaLN W4A16, embedders/first/last/cross-KV float
        rules = keep + svdquant_rules()
    else:
        bits = {"w8a8": 8, "w8a8-xla": 8, "w4a8": 4}[method]
        rules = keep + [Rule(".*", dynamic_cfg(bits, 8, impl="int"))]
    counter = [0]
    jitted: dict = {}  # (rule, shape) → the jitted quantizer: eager ops would dispatch one by one

    def quantize(layer, k, config):
        f32 = {name: v.astype(jnp.float32) for name, v in layer.items()}
        if method.startswith("svdquant"):
            c_in, c_out = f32["kernel"].shape
            cfg = fit_config(config, c_in, c_out)
            q = quantize_weight_layer(f32, cfg, jnp.float16 if cfg.act is None else None)
            if cfg.act is not None:
                k1, k2, k3 = jax.random.split(k, 3)
                q = q.replace(
                    smooth=jax.random.uniform(k1, (c_in,), minval=0.5, maxval=2.0),
                    lowrank_a=(jax.random.normal(k2, (c_in, 32)) / np.sqrt(c_in)).astype(jnp.float16),
                    lowrank_b=(jax.random.normal(k3, (32, c_out)) * 0.02).astype(jnp.float16))
        else:
            q = quantize_linear(f32, config)
        node = {"qlinear": q}
        return node if method == "w8a8-xla" else use_kernels(node)

    def convert(path, layer):
        i, rule = next(((i, r) for i, r in enumerate(rules) if r.matches(path, roles.get(path))), (None, None))
        if rule is None or rule.config is None:
            return layer
        sig = (i, tuple((name, v.shape) for name, v in sorted(layer.items())))
        if sig not in jitted:
            jitted[sig] = jax.jit(lambda l, k, c=rule.config: quantize(l, k, c))
        counter[0] += 1
        return jitted[sig](layer, jax.random.fold_in(key, counter[0]))

    return convert


def categorize(name: str) -> str:
    n = name.lower()
    if "quantize_act" in n:
        return "quantize_kernel"
    if "int_gemm" in n or "mosaic" in n or "jaxdq" in n or n.startswith("kernel"):
        return "int_gemm_kernel"
    if any(s in n for s in ("gemm", "cutlass", "xmma", "cublas", "sm90", "nvjet", "wgmma", "triton_dot")):
        return "xla_gemm"
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, choices=tuple(ARCH_OF))
    ap.add_argument("--method", required=True, choices=METHODS)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--attention", default="float32", choices=("float32", "cudnn", "xla"),
                    help="attention implementation of the model (jaxdq.models.attention)")
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    ap.add_argument("--weights-only", action="store_true",
                    help="build the quantized tree and record its bytes; no step (runs anywhere)")
    ap.add_argument("--small-m-xla", type=int, default=None,
                    help="set pallas_kernels.ops.SMALL_M_XLA (rows up to which a layer takes XLA's integer path)")
    args = ap.parse_args()
    from pallas_kernels import ops

    if args.small_m_xla is not None:  # a module constant read at trace time
        ops.SMALL_M_XLA = args.small_m_xla

    t0 = time.time()
    key = jax.random.PRNGKey(0)
    # the model's float structure (shapes only), its step function and layer roles
    shapes, step, x, roles = setup(args.model, 1, make_params=lambda init_fn, k: jax.eval_shape(init_fn, k),
                                   attention=args.attention)
    fuse = not args.method.endswith("-unfused")
    convert = make_converter(args.method.replace("-unfused", ""), ARCH_OF[args.model], key, roles)
    params = build_params(shapes, key, convert)
    jax.block_until_ready(params)
    build_s = time.time() - t0
    print(f"built in {build_s:.1f} s", file=sys.stderr, flush=True)  # progress: a timeout says where
    leaves = jax.tree_util.tree_leaves(params)
    wbytes = int(sum(l.size * l.dtype.itemsize for l in leaves))

    if args.weights_only:
        row = {"model": args.model, "method": args.method, "weight_bytes": wbytes, "build_s": round(build_s, 1),
               "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "command": f"python bench/bench_e2e.py --model {args.model} --method {args.method} --weights-only --out OUT"}
        return _emit(row, args.out)
    if args.method.startswith("svdquant"):
        # the fused/unfused low-rank choice is a module constant read at trace time
        ops.FUSE_LOWRANK_HOPPER = fuse
    f = jax.jit(step)
    t = jnp.full((1,), 500, jnp.int32)
    out, compile_s, times, peak = time_step(f, params, x, t, args.reps)
    print(f"compiled in {compile_s:.1f} s, step {1e3 * float(np.median(times)):.3f} ms", file=sys.stderr, flush=True)
    row = {"model": args.model, "method": args.method, "attention": args.attention,
           "step_ms_median": round(1e3 * float(np.median(times)), 3),
           "step_ms_min": round(1e3 * min(times), 3), "compile_s": round(compile_s, 1),
           "build_s": round(build_s, 1), "weight_bytes": wbytes,
           "peak_device_bytes": peak, "out_finite": bool(jnp.isfinite(out).all()),
           "out_abs_mean": float(jnp.abs(out.astype(jnp.float32)).mean()),
           "small_m_xla": ops.SMALL_M_XLA,
           "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "reps": args.reps,
           "command": f"python bench/bench_e2e.py --model {args.model} --method {args.method} --out OUT"
                      + f" --attention {args.attention}" + (" --profile" if args.profile else "")
                      + ("" if args.small_m_xla is None else f" --small-m-xla {args.small_m_xla}")}
    if args.profile:
        try:
            from jax.experimental.mosaic.gpu import profiler

            _, kt = profiler.measure(f, aggregate=False)(params, x, t)
            cats: dict = {}
            for name, ms in kt:
                c = categorize(name)
                cats[c] = cats.get(c, 0.0) + ms
            row["profile_ms"] = {k: round(v, 3) for k, v in sorted(cats.items())}
            row["profile_kernels"] = len(kt)
            top: dict = {}
            for name, ms in kt:
                top[name[:80]] = top.get(name[:80], 0.0) + ms
            row["profile_top"] = sorted(([k, round(v, 3)] for k, v in top.items()), key=lambda r: -r[1])[:12]
        except Exception as e:  # pragma: no cover
            row["profile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    _emit(row, args.out)


def _emit(row: dict, path: str) -> None:
    """Print ``row`` and append it to the JSON-lines file ``path``."""
    print(json.dumps(row), flush=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
