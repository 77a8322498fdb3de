"""Issue 19, items 1 and 5: the quantize fused into the norm, and FP8 W8A8, on the GPU.

Part ``kernels`` (one process): at DiT-XL/2 256² (M = 512, CFG 2), PixArt-Σ 1024²
(M = 8192, CFG 2; K = 1152) and FLUX.1 1024² (image stream M = 4096, single blocks
M = 4608, K = 3072) shapes, CUPTI kernel time (bench_kernels.make_timer) of

* ``bf16_norm``: XLA's ``layer_norm(x)·(1+scale)+shift`` → bf16 h (what the bf16 model runs);
* ``separate``: the same XLA norm, then the separate quantize kernel
  (:func:`pallas_kernels.quantize_act.quantize_act`, launch table ``quantize_config``): the
  W8A8 path before this issue;
* ``fused``: :func:`pallas_kernels.norm_quantize.norm_quantize` with the launch table
  (int8; ``+lr32``: with the rank-32 down-projection; ``e4m3``: FP8 codes), and a sweep of
  launch configs (the table is unmeasured);

each with the essential bytes (x read once, codes + scales [+ X'L1] written) as a share of
the HBM bandwidth measured in the same run by a copy (``a*2`` over 512 MiB, read + write).
Correctness: the fused codes vs :func:`norm_quantize_reference` (fraction of codes that
differ; ±1 ties are documented).

Then the GEMMs at the same shapes: XLA bf16 dot, XLA int8 dot, XLA fp8 (e4m3) dot, and the
Hopper wgmma kernel with int8 and with e4m3 operands (``int8_gemm_ws``), rel. error vs the
float64-free jnp reference.

Part ``e2e`` (one process per (model, fuse)): one jitted sampling step of DiT-XL/2 256² or
PixArt-Σ 1024² W8A8 by ``bench/bench_e2e.py``'s public-API path (``setup``,
``make_converter``, ``build_params``, ``time_step``), under ``policy("kernels")`` with
``fuse_norm`` True / False.

CPU check: ``--tiny`` (tiny shapes, kernels interpreted, wall-clock timer).
Usage: ``python bench/bench_fused_norm.py kernels --out F.json [--tiny]``;
``python bench/bench_fused_norm.py e2e --model dit-xl2-256 --fuse-norm 1 --out F.jsonl [--tiny]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.norm_quantize import (NormQuantizeConfig, fold_modulation, norm_quantize,  # noqa: E402
                                          norm_quantize_config, norm_quantize_reference)
from pallas_kernels.quantize_act import quantize_act, quantize_config  # noqa: E402

BF16 = jnp.bfloat16
PEAK_SPEC_BPS = 4.8e12  # H200 HBM3e, datasheet
#: (name, M, K, samples, [N of the linears that read h])
SHAPES = [("dit-xl2-256", 512, 1152, 2, [3456, 4608]),
          ("pixart-sigma-1024", 8192, 1152, 2, [3456, 4608]),
          ("flux-img-1024", 4096, 3072, 1, [3072, 12288]),
          ("flux-single-1024", 4608, 3072, 1, [21504])]
TINY_SHAPES = [("tiny-dit", 64, 256, 2, [256]), ("tiny-flux", 64, 512, 1, [512])]
SWEEP = [dict(block_m=4, num_warps=4, single_pass=True), dict(block_m=8, num_warps=4, single_pass=True),
         dict(block_m=16, num_warps=8, single_pass=True), dict(block_m=8, num_warps=4, num_stages=3, single_pass=False),
         dict(block_m=16, num_warps=4, num_stages=2, single_pass=False)]


def layer_norm_modulate(x, scale, shift, eps=1e-6):
    """The models' bf16 h: ``layer_norm(x)·(1+scale)+shift`` (jaxdq.norm_linear.reference_input)."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, -1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
    h = ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    b = scale.shape[0]
    h = h.reshape(b, -1, h.shape[-1])
    return (h * (1 + scale[:, None].astype(x.dtype)) + shift[:, None].astype(x.dtype)).reshape(x.shape)


def make_timer(reps, tiny):
    if tiny:
        def wall(f, *args):
            jax.block_until_ready(f(*args))
            t = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(f(*args))
            return (time.perf_counter() - t) * 1e3 / reps, "wall"
        return wall
    from bench.bench_kernels import make_timer as mk

    return mk(reps)


def copy_bandwidth(timer, tiny):
    x = jnp.ones((4, 1024, 1024) if tiny else (256, 1024, 1024), BF16)
    ms, how = timer(jax.jit(lambda a: a * 2), x)
    return 2 * x.size * 2 / (ms * 1e-3), ms, how


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_kernels(args):
    tiny = args.tiny
    timer = make_timer(2 if tiny else args.reps, tiny)
    bw, copy_ms, how = copy_bandwidth(timer, tiny)
    print(f"copy: {copy_ms:.4f} ms -> {bw / 1e12:.3f} TB/s ({how})", flush=True)
    rows = []

    def add(row):  # the JSON is rewritten after every row: a timeout keeps what ran
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as fh:
            json.dump(dict(args.meta, partial=True, copy_ms=copy_ms, copy_bandwidth_Bps=bw, rows=rows), fh, indent=1)

    rng = np.random.default_rng(0)
    for name, m, k, b, ns in (TINY_SHAPES if tiny else SHAPES):
        x = jnp.asarray(rng.normal(size=(m, k)) * 2 + rng.normal(size=(1, k)), BF16)
        scale = jnp.asarray(rng.normal(size=(b, k)) * 0.3, jnp.float32)
        shift = jnp.asarray(rng.normal(size=(b, k)) * 0.2, jnp.float32)
        mul, addv = fold_modulation(scale, shift, k=k)
        l1 = jnp.asarray(rng.normal(size=(k, 32)) / np.sqrt(k), BF16)
        base = dict(shape=name, m=m, k=k, samples=b)

        def bytes_of(code_bytes=1, r=0):
            return m * k * 2 + m * k * code_bytes + m * 4 + m * r * 2 + 2 * b * k * 4

        def entry(variant, f, fargs, nbytes, **extra):
            try:
                ms, how = timer(f, *fargs)
                add(dict(base, variant=variant, ms=round(ms, 5), timer=how, bytes=nbytes,
                         gbps=round(nbytes / (ms * 1e-3) / 1e9, 1), pct_of_copy=round(100 * nbytes / (ms * 1e-3) / bw, 1),
                         pct_of_spec=round(100 * nbytes / (ms * 1e-3) / PEAK_SPEC_BPS, 1), **extra))
            except Exception as e:  # noqa: BLE001  a failing variant is a row, not a lost run
                add(dict(base, variant=variant, error=f"{type(e).__name__}: {str(e)[:300]}"))

        # the bf16 model's norm (x read, h written)
        entry("bf16_norm", jax.jit(layer_norm_modulate), (x, scale, shift), m * k * 4 + 2 * b * k * 4)
        # XLA norm → h, then the separate quantize kernel (h written and read again)
        for r in (0, 32):
            qc = dataclasses.replace(quantize_config(m, k, dot=bool(r), smooth=False, grouped=False), interpret=tiny)

            def sep(x, scale, shift, l1, qc=qc, r=r):
                h = layer_norm_modulate(x, scale, shift)
                return quantize_act(h, bits=8, l1=l1 if r else None, config=qc)[:2]

            entry("separate" + (f"+lr{r}" if r else ""), jax.jit(sep), (x, scale, shift, l1), bytes_of(r=r),
                  bytes_actually_moved=m * k * 2 * 3 + m * k + m * 4 + m * r * 2)
        # fused: the launch table, int8 / +lr32 / e4m3
        for variant, fmt, r in (("fused", "int", 0), ("fused+lr32", "int", 32), ("fused_e4m3", "e4m3", 0)):
            cfg = dataclasses.replace(norm_quantize_config(m, k, tokens=m // b, dot=bool(r)), interpret=tiny)
            f = jax.jit(lambda x, mul, a, l1, cfg=cfg, fmt=fmt, r=r: norm_quantize(
                x, mul, a, fmt=fmt, l1=l1 if r else None, config=cfg))
            extra = {"config": dataclasses.asdict(cfg)}
            try:
                got = f(x, mul, addv, l1)
                want = norm_quantize_reference(x, mul, addv, fmt=fmt, l1=l1 if r else None)
                gq, wq = (np.asarray(a.astype(jnp.float32)) for a in (got[0], want[0]))
                extra.update(codes_differ_frac=float((gq != wq).mean()), scale_rel_err=rel_err(got[1], want[1]))
                if r:
                    extra["xl1_rel_err"] = rel_err(got[2], want[2])
            except Exception as e:  # noqa: BLE001
                extra["check_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            entry(variant, f, (x, mul, addv, l1), bytes_of(1, r), **extra)
        # launch-config sweep (plain int8)
        for sw in SWEEP:
            cfg = NormQuantizeConfig(interpret=tiny, **sw)
            if (m // b) % cfg.block_m:
                continue
            f = jax.jit(lambda x, mul, a, cfg=cfg: norm_quantize(x, mul, a, config=cfg))
            entry("fused_sweep", f, (x, mul, addv), bytes_of(), config=dataclasses.asdict(cfg))
        if args.no_gemm:
            continue
        gemm_rows(base, x, ns, timer, tiny, add, rng)
    return {"copy_ms": copy_ms, "copy_bandwidth_Bps": bw, "timer": how, "rows": rows}


def gemm_rows(base, x, ns, timer, tiny, add, rng):
    """XLA bf16 / int8 / fp8 dots and the Hopper wgmma (int8, e4m3) at ``[M, K] × [K, N]``."""
    m, k = x.shape
    for n in ns:
        w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), BF16)
        xs = jnp.max(jnp.abs(x.astype(jnp.float32)), 1) / 127
        ws = jnp.max(jnp.abs(w.astype(jnp.float32)), 0) / 127
        xq = jnp.round(x / xs[:, None]).astype(jnp.int8)
        wq = jnp.round(w / ws[None]).astype(jnp.int8)
        x8 = (x.astype(jnp.float32) / (xs[:, None] * 127 / 448)).astype(jnp.float8_e4m3fn)
        w8 = (w.astype(jnp.float32) / (ws[None] * 127 / 448)).astype(jnp.float8_e4m3fn)
        sx8, sw8 = xs * 127 / 448, ws * 127 / 448
        ref = jnp.dot(x, w, preferred_element_type=jnp.float32)
        g = dict(base, n=n, flop=2 * m * k * n)

        def entry(variant, f, fargs, check=True):
            try:
                ms, how = timer(f, *fargs)
                row = dict(g, variant=variant, ms=round(ms, 5), timer=how, tflops=round(2 * m * k * n / (ms * 1e-3) / 1e12, 1))
                if check:
                    row["rel_err_vs_bf16"] = rel_err(f(*fargs), ref)
                add(row)
            except Exception as e:  # noqa: BLE001
                add(dict(g, variant=variant, error=f"{type(e).__name__}: {str(e)[:300]}"))

        dot = lambda a, b, t: jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=t)  # noqa: E731
        entry("gemm_xla_bf16", jax.jit(lambda a, b: dot(a, b, jnp.float32).astype(BF16)), (x, w))
        entry("gemm_xla_int8", jax.jit(lambda a, b, sa, sb: (dot(a, b, jnp.int32).astype(jnp.float32)
                                                           * sa[:, None] * sb[None]).astype(BF16)), (xq, wq, xs, ws))
        entry("gemm_xla_fp8", jax.jit(lambda a, b, sa, sb: (dot(a, b, jnp.float32) * sa[:, None] * sb[None]).astype(BF16)),
              (x8, w8, sx8, sw8))
        if tiny or not _is_hopper():
            continue
        from pallas_kernels.int_gemm_hopper import HopperGemmConfig, int8_gemm_ws

        cfg = HopperGemmConfig()
        entry("gemm_wgmma_int8", jax.jit(lambda a, b, sa, sb: int8_gemm_ws(a, b, sa, sb, config=cfg)),
              (xq, wq.T, xs, ws))
        entry("gemm_wgmma_fp8", jax.jit(lambda a, b, sa, sb: int8_gemm_ws(a, b, sa, sb, config=cfg)),
              (x8, w8.T, sx8, sw8))


def _is_hopper():
    d = jax.devices()[0]
    return d.platform == "gpu" and "H" in str(d.device_kind).upper() and getattr(d, "compute_capability", "") in ("9.0", "9.0a")


def run_e2e(args):
    from bench.bench_e2e import build_params, make_converter
    from bench.bench_models import setup, time_step
    from jaxdq import backend

    pol = backend.policy("kernels", interpret=args.tiny, fuse_norm=bool(args.fuse_norm))
    t0 = time.time()
    key = jax.random.PRNGKey(0)
    shapes, step, x, roles = setup(args.model, 1, make_params=lambda init_fn, k: jax.eval_shape(init_fn, k),
                                   attention=args.attention, policy=pol, tiny=args.tiny)
    params = build_params(shapes, key, make_converter("w8a8", key, roles))
    jax.block_until_ready(params)
    build_s = time.time() - t0
    import jaxdq.norm_linear as nl

    calls = []
    orig = nl._fused_group
    nl._fused_group = lambda layers, *a, **kw: (calls.append(len(layers)), orig(layers, *a, **kw))[1]
    f = jax.jit(step)
    t = jnp.full((1,), 500, jnp.int32)
    out, compile_s, times, peak = time_step(f, params, x, t, 1 if args.tiny else args.reps)
    nl._fused_group = orig
    return {"model": args.model, "method": "w8a8", "fuse_norm": bool(args.fuse_norm), "attention": args.attention,
            "fused_norm_calls_traced": len(calls), "step_ms_median": round(1e3 * float(np.median(times)), 3),
            "step_ms_min": round(1e3 * min(times), 3), "compile_s": round(compile_s, 1), "build_s": round(build_s, 1),
            "peak_device_bytes": peak, "out_finite": bool(jnp.isfinite(out).all())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=("kernels", "e2e"))
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU check: tiny shapes, kernels interpreted, wall timer")
    ap.add_argument("--no-gemm", action="store_true")
    ap.add_argument("--model", default="dit-xl2-256", choices=("dit-xl2-256", "pixart-sigma-1024"))
    ap.add_argument("--fuse-norm", type=int, default=1)
    ap.add_argument("--attention", default="cudnn", choices=("float32", "cudnn", "xla"))
    args = ap.parse_args()
    if args.tiny and args.attention == "cudnn":
        args.attention = "xla"
    meta = {"command": "python " + " ".join(sys.argv), "device": str(jax.devices()[0].device_kind),
            "jax": jax.__version__, "tiny": args.tiny}
    args.meta = meta
    t0 = time.time()
    try:
        res = run_kernels(args) if args.part == "kernels" else run_e2e(args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        res = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
    res = dict(meta, wall_s=round(time.time() - t0, 1), **res)
    if args.part == "e2e":
        with open(args.out, "a") as fh:
            fh.write(json.dumps(res) + "\n")
    else:
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}), flush=True)
    return 1 if "error" in res else 0


if __name__ == "__main__":
    sys.exit(main())
