"""One jitted sampling step of a quantized model through the Pallas kernels vs bf16 (random weights, real sizes).

One (model, method) per process, so the device's peak memory belongs to that configuration:

    python bench/bench_e2e.py --model pixart-sigma-1024 --method w8a8 --out e2e.jsonl [--profile]

Methods (each layer built by the library: the recipe, or SVDQuant's rules, transforms and
quantizer, on a one-layer tree; the step runs under the method's
:class:`jaxdq.backend.Policy`, bound inside the jitted step):
  bf16           the float model (bf16 weights and activations).
  w8a8, w4a8     the ``dynamic-w8a8`` / ``dynamic-w4a8`` recipes: per-channel symmetric
                 weights (int4 packed), dynamic per-token int8 activations, every linear
                 except the first/last (roles ``embedding``, ``final``); codes stored K-major
                 (:func:`jaxdq.backend.stored_for_kernels`), ``policy("kernels")``.
  w8a8-xla       the same W8A8 model through XLA's own int8 dot (``policy("integer")``).
  svdquant-w4a4  SVDQuant's layer structure with the paper's precision rules
                 (:func:`jaxdq.quant.svdquant.svdquant_rules`): W4A4 per group of 64
                 (weights and activations), a rank-32 fp16 low-rank branch and a smoothing
                 vector on every such linear; adaLN linears W4A16 (fp16 scales); embedders,
                 first/last and cross-attention K/V float.  Each layer is
                 :func:`jaxdq.quant.svdquant.svdquant_layer` (fp16 weight scales, the
                 paper's storage) with synthetic calibration
                 statistics (random per-channel absmax, α = 0.5) and no SVD (rank 0); the
                 rank-32 factors are then random: the float64 SVD of 12B random weights
                 would measure nothing and take hours, and the step's cost and the bytes do
                 not depend on the factors' values.  ``policy("kernels")``.
  svdquant-w4a4-unfused  the same, with the low-rank product added by XLA after the GEMM
                 (``policy("kernels", fuse_lowrank=False)``).
  svdquant-w4a8  the ``svdquant-w4a8`` recipe's layers built the same way: progressive-group
                 4-bit weights (INT8 per channel, UINT4 group-64 integer zero/scale), per-token
                 8-bit activations, the rank-32 branch; the Hopper progressive GEMM.

The quantized trees are built one linear at a time from random bf16 weights (never
the whole bf16 model), so ``peak_device_bytes`` is the quantized model's.  The step is
what the sampler calls: CFG-doubled batch for DiT/PixArt, one batch for FLUX.1-dev.
With ``--profile`` one step's CUDA kernels are timed (CUPTI) and grouped into
quantize kernel / integer GEMM kernel / XLA GEMMs / the rest.  ``--smoke``: the model
family at a tiny width and depth with the kernels interpreted (CPU check of this script).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import quiet_gpu  # noqa: E402
from bench.bench_models import emit, setup, time_step  # noqa: E402
from jaxdq import backend  # noqa: E402
from jaxdq.models.attention import EIGHT_BIT  # noqa: E402
from jaxdq.quant.layers import FloatLinear, QLinear, get_path, is_float_dict, set_path  # noqa: E402

BF16 = jnp.bfloat16
METHODS = ("bf16", "w8a8", "w4a8", "w8a8-xla", "svdquant-w4a4", "svdquant-w4a4-unfused", "svdquant-w4a8")
ARCH_OF = {"dit-xl2-256": "dit", "pixart-sigma-1024": "pixart", "flux1-dev-1024": "flux"}
RECIPE_OF = {"w8a8": "dynamic-w8a8", "w8a8-xla": "dynamic-w8a8", "w4a8": "dynamic-w4a8"}
RANK = 32


def method_policy(method: str, *, small_m: int | None = None, interpret: bool = False,
                  fuse_epilogue: bool = True, fuse_residual: bool = False) -> backend.Policy:
    """How ``method``'s layers execute: the kernels (``-unfused``: the Hopper GEMM without the
    low-rank accumulator), XLA's integer dot for ``w8a8-xla``, the float model as it is.
    ``small_m``: rows up to which a layer takes XLA's integer path (None: the policy's 64)."""
    kw = {} if small_m is None else {"small_m": small_m}
    if method == "bf16":
        return backend.policy("reference", **kw)
    if method == "w8a8-xla":
        return backend.policy("integer", **kw)
    return backend.policy("kernels", fuse_lowrank=not method.endswith("-unfused"), interpret=interpret,
                          fuse_epilogue=fuse_epilogue, fuse_residual=fuse_residual, **kw)


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
        if is_float_dict(node):  # also true of a ShapeDtypeStruct tree's linears
            layer = {k: draw(v.shape) for k, v in node.items()}
            out = convert(path, layer)
            jax.block_until_ready(out)
            return out
        if isinstance(node, dict):
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in node.items()}
        return draw(node.shape)

    return walk(shapes, "")


def make_converter(method: str, key, roles):
    """``convert(path, float layer dict) -> node`` building ``method``'s layer (see the
    module docstring); float layers come back as they are (bf16)."""
    method = method.removesuffix("-unfused")
    if method == "bf16":
        return lambda path, layer: layer
    if method not in RECIPE_OF and method not in ("svdquant-w4a4", "svdquant-w4a8"):
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    kernels = method != "w8a8-xla"
    counter = [0]

    def stored(q):  # the layout the Hopper kernels read without a per-call transpose
        return backend.stored_for_kernels({"l": q})["l"] if kernels else q

    if method in RECIPE_OF:
        from jaxdq.quant.recipes import Context, get_recipe

        recipe = get_recipe(RECIPE_OF[method])
        ctx = Context(roles=roles)

        def convert(path, layer):
            tree: dict = {}
            set_path(tree, path, layer)  # a one-layer tree at the layer's path: the recipe's rules see its role
            node = get_path(recipe.build(tree, ctx)[0], path)
            return stored(node) if isinstance(node, QLinear) else layer

        return convert

    from jaxdq.quant.rules import config_of, quantize_linear
    from jaxdq.quant.svdquant import svdquant_layer, svdquant_rules

    # paper defaults: W4A4 g64, adaLN W4A16, embedders/first/last/cross-KV float; svdquant-w4a8: the recipe's
    # Hopper form (progressive-group 4-bit weights, per-token 8-bit activations)
    w4a8 = method == "svdquant-w4a8"
    cfg_of = config_of(svdquant_rules(act_bits=8, progressive=True) if w4a8 else svdquant_rules(), roles)

    def convert(path, layer):
        cfg = cfg_of(path)
        if cfg is None:
            return layer
        fl = FloatLinear(kernel=layer["kernel"].astype(jnp.float32), bias=layer.get("bias"))
        if cfg.act is None:  # weight-only (adaLN): 4-bit group weights, fp16 scales
            return stored(quantize_linear(fl, dataclasses.replace(cfg, scale_dtype=jnp.float16)))
        counter[0] += 1
        k1, k2, k3 = jax.random.split(jax.random.fold_in(key, counter[0]), 3)
        c_in, c_out = fl.in_features, fl.out_features
        absmax = jax.random.uniform(k1, (c_in,), minval=0.5, maxval=8.0)  # synthetic calibration statistics
        # fp16 group scales, as the paper stores them (4.25 bits per weight at group 64, not 4.5)
        q = svdquant_layer(fl, cfg, act_absmax=absmax, alpha=0.5, rank=0,
                           scale_dtype=None if w4a8 else jnp.float16)  # (progressive: int8 group scales)
        lr = dict(lowrank_a=(jax.random.normal(k2, (c_in, RANK)) / np.sqrt(c_in)).astype(jnp.float16),
                  lowrank_b=(jax.random.normal(k3, (RANK, c_out)) * 0.02).astype(jnp.float16))
        return stored(q.replace(transform=q.transform.replace(**lr)))

    return convert


def bytes_by_part(params) -> dict:
    """Weight bytes by what they are: quantized ``codes``, weight ``scale``/``zero``
    (``weight_scales``), the low-rank factors, smoothing vectors, other input-transform leaves
    (``transform_other``), activation statistics (``act``), and every other leaf as ``float`` (embedders, final layer, norms, unquantized linears, biases)."""
    parts: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = [str(getattr(k, "name", getattr(k, "key", k))) for k in path]
        last = names[-1]
        if "act" in names:
            part = "act"
        elif "weight" in names:
            part = "codes" if last == "codes" else "weight_scales"
        elif last in ("lowrank_a", "lowrank_b"):
            part = "lowrank"
        elif last == "smooth":
            part = "smooth"
        elif "transform" in names:  # e.g. a stored rotation
            part = "transform_other"
        else:
            part = "float"
        parts[part] = parts.get(part, 0) + int(leaf.size * leaf.dtype.itemsize)
    return dict(sorted(parts.items()))


def categorize(name: str) -> str:
    n = name.lower()
    if "quantize_act" in n:
        return "quantize_kernel"
    if "attention_int8" in n:
        return "attention_int8_kernel"
    if any(s in n for s in ("sdpa", "fmha", "flash")):
        return "attention_cudnn"
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
    ap.add_argument("--attention", default="float32", choices=("float32", "cudnn", "xla") + EIGHT_BIT,
                    help="attention implementation of the model (jaxdq.models.attention)")
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    ap.add_argument("--weights-only", action="store_true",
                    help="build the quantized tree and record its bytes; no step (runs anywhere)")
    ap.add_argument("--small-m-xla", type=int, default=None,
                    help="Policy.small_m: rows up to which a layer takes XLA's integer path (default 64)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of this script: the model family at a tiny width and depth, kernels interpreted")
    ap.add_argument("--no-fuse-epilogue", action="store_true",
                    help="Policy.fuse_epilogue=False: the blocks' GELU / gate · y + residual by XLA after the GEMMs")
    ap.add_argument("--fuse-residual", action="store_true",
                    help="Policy.fuse_residual=True: gate · y + residual in the GEMM epilogues too, not only the GELU "
                         "(the rows of bench/results/epilogue_defaults_h200.jsonl ran before this flag: there it was "
                         "the default and --no-fuse-residual turned it off)")
    ap.add_argument("--no-dot-merger", action="store_true",
                    help="compile the step with XLA's dot merger off (measured in bench/results/dit_dot_merger_h200.jsonl, "
                         "whose rows ran before this flag: there --dot-merger turned it on)")
    quiet_gpu.add_arguments(ap)
    args = ap.parse_args()
    quiet = quiet_gpu.from_args(args)
    pol = method_policy(args.method, small_m=args.small_m_xla, interpret=args.smoke,
                        fuse_epilogue=not args.no_fuse_epilogue, fuse_residual=args.fuse_residual)

    t0 = time.time()
    key = jax.random.PRNGKey(0)
    # the model's float structure (shapes only), its step function (binding pol) and layer roles
    shapes, step, x, roles = setup(args.model, 1, make_params=lambda init_fn, k: jax.eval_shape(init_fn, k),
                                   attention=args.attention, policy=pol, tiny=args.smoke)
    convert = make_converter(args.method, key, roles)
    params = build_params(shapes, key, convert)
    jax.block_until_ready(params)
    build_s = time.time() - t0
    print(f"built in {build_s:.1f} s", file=sys.stderr, flush=True)  # progress: a timeout says where
    leaves = jax.tree_util.tree_leaves(params)
    wbytes = int(sum(l.size * l.dtype.itemsize for l in leaves))

    smoke = " --smoke" if args.smoke else ""
    if args.weights_only:
        row = {"model": args.model, "method": args.method, "weight_bytes": wbytes, "build_s": round(build_s, 1),
               "bytes_by_part": bytes_by_part(params),
               "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
               "command": f"python bench/bench_e2e.py --model {args.model} --method {args.method} --weights-only --out OUT"
                          + smoke}
        return emit(dict(row, smoke=True) if args.smoke else row, args.out)
    options = {"xla_disable_hlo_passes": "dot-merger"} if args.no_dot_merger else {}
    f = jax.jit(step, compiler_options=options or None)
    t = jnp.full((1,), 500, jnp.int32)
    out, compile_s, times, peak = time_step(f, params, x, t, args.reps, quiet)
    print(f"compiled in {compile_s:.1f} s, step {1e3 * float(np.median(times)):.3f} ms", file=sys.stderr, flush=True)
    row = {"model": args.model, "method": args.method, "attention": args.attention,
           "step_ms_median": round(1e3 * float(np.median(times)), 3),
           "step_ms_min": round(1e3 * min(times), 3), "compile_s": round(compile_s, 1),
           "build_s": round(build_s, 1), "weight_bytes": wbytes,
           "peak_device_bytes": peak, "out_finite": bool(jnp.isfinite(out).all()),
           "out_abs_mean": float(jnp.abs(out.astype(jnp.float32)).mean()),
           "small_m_xla": pol.small_m, "xla_flags": os.environ.get("XLA_FLAGS", ""),
           "fuse_epilogue": pol.fuse_epilogue, "fuse_residual": pol.fuse_residual,
           "compiler_options": options,
           "device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "reps": args.reps,
           "command": f"python bench/bench_e2e.py --model {args.model} --method {args.method} --out OUT"
                      + f" --attention {args.attention}" + (" --profile" if args.profile else "")
                      + ("" if args.small_m_xla is None else f" --small-m-xla {args.small_m_xla}")
                      + (" --no-fuse-epilogue" if args.no_fuse_epilogue else "")
                      + (" --fuse-residual" if args.fuse_residual else "")
                      + (" --no-dot-merger" if args.no_dot_merger else "") + smoke}
    if quiet.report is not None:
        row["quiet_gpu"] = quiet.report
    if args.smoke:
        row["smoke"] = True
    if args.profile:
        try:
            from jax.experimental.mosaic.gpu import profiler

            with quiet.timing():  # the profile too under the lock: parallel processes would disturb it
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
    emit(row, args.out)


if __name__ == "__main__":
    main()
