"""Every distinct quantized linear of a model through ``ops.qlinear_apply`` on the GPU vs its reference.

One jitted call per (layer shape, role, method): relative error against the layer's
own reference path (``impl="int"``/``"fake"``), the kernel time, or the error text.
Run before ``bench_e2e.py`` on a new device/jax, so a failing layer is named:

    python bench/diag_layers.py --model dit-xl2-256 --methods w8a8,w4a8,svdquant-w4a4 --out diag.jsonl
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_e2e import ARCH_OF, _emit, make_converter  # noqa: E402
from bench.bench_models import setup  # noqa: E402
from jaxdq.quant.rules import is_float_linear  # noqa: E402

TOKENS = {"dit-xl2-256": 512, "pixart-sigma-1024": 8192, "flux1-dev-1024": 4608}
SHORT_M = {"adaLN": 2, "time-embedding": 2, "embedding": 600, "cross-attn": 600}


def distinct_linears(shapes, roles):
    out, seen = [], set()

    def walk(n, p):
        if is_float_linear(n):
            key = (tuple(n["kernel"].shape), roles.get(p))
            if key not in seen:
                seen.add(key)
                out.append((p, tuple(n["kernel"].shape), roles.get(p)))
            return
        if isinstance(n, dict):
            for k, v in n.items():
                walk(v, f"{p}/{k}" if p else k)
    walk(shapes, "")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, choices=tuple(ARCH_OF))
    ap.add_argument("--methods", default="w8a8,w4a8,svdquant-w4a4")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from pallas_kernels import ops

    key = jax.random.PRNGKey(0)
    shapes, _, _, roles = setup(a.model, 1, make_params=lambda f, k: jax.eval_shape(f, k))
    for method in a.methods.split(","):
        conv = make_converter(method, ARCH_OF[a.model], key, roles)
        for path, (k, n), role in distinct_linears(shapes, roles):
            layer = {"kernel": (0.02 * jax.random.normal(key, (k, n))).astype(jnp.bfloat16),
                     "bias": jnp.zeros((n,), jnp.bfloat16)}
            node = conv(path, layer)
            if "qlinear" not in node:
                continue
            q = node["qlinear"]
            m = SHORT_M.get(role, TOKENS[a.model])
            # the time embedder's input is the float32 sinusoidal embedding
            xdt = jnp.float32 if role == "time-embedding" else jnp.bfloat16
            x = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.float32).astype(xdt)
            row = {"model": a.model, "method": method, "path": path, "role": role, "M": m, "K": k, "N": n,
                   "x_dtype": str(x.dtype), "kernel_path": bool(ops.kernel_supported(q)), "w_layout": q.w_layout}
            t0 = time.time()
            try:
                got = jax.jit(ops.qlinear_apply)(q, x)
                got.block_until_ready()
                row["first_call_s"] = round(time.time() - t0, 2)
                want = jax.jit(ops._reference)(q, x)
                d = jnp.linalg.norm((got.astype(jnp.float32) - want.astype(jnp.float32)).ravel())
                row["rel_err_vs_ref"] = float(d / (jnp.linalg.norm(want.astype(jnp.float32).ravel()) + 1e-30))
                row["finite"] = bool(jnp.isfinite(got).all())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
                row["where"] = traceback.format_exc()[-2500:]
            _emit(row, a.out)


if __name__ == "__main__":
    main()
