"""Every distinct quantized linear of a model through the backend's kernel policy on the GPU vs its reference.

One jitted call per (layer shape, role, method): ``backend.execute(q, x, policy)`` under
the method's policy (:func:`bench.bench_e2e.method_policy`: the kernels, with their
small-M integer route), its relative error against the layer's own reference path
(``policy("integer")``: the integer path where the layer allows it, else fake
quantization), the first call's time, or the error text.  Run before ``bench_e2e.py`` on
a new device/jax, so a failing layer is named:

    python bench/diag_layers.py --model dit-xl2-256 --methods w8a8,w4a8,svdquant-w4a4 --out diag.jsonl

``--smoke``: the model family at a tiny width and depth, at most 256 rows a layer, the
kernels interpreted (CPU check of this script).
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

from bench.bench_e2e import ARCH_OF, emit, make_converter, method_policy  # noqa: E402
from bench.bench_models import setup  # noqa: E402
from jaxdq import backend  # noqa: E402
from jaxdq.quant.layers import QLinear, is_float_dict  # noqa: E402

TOKENS = {"dit-xl2-256": 512, "pixart-sigma-1024": 8192, "flux1-dev-1024": 4608}
SHORT_M = {"adaLN": 2, "time-embedding": 2, "embedding": 600, "cross-attn": 600}
SMOKE_M = 256


def distinct_linears(shapes, roles):
    out, seen = [], set()

    def walk(n, p):
        if is_float_dict(n):
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
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of this script: tiny width and depth, <= 256 rows, kernels interpreted")
    a = ap.parse_args()

    key = jax.random.PRNGKey(0)
    shapes, _, _, roles = setup(a.model, 1, make_params=lambda f, k: jax.eval_shape(f, k), tiny=a.smoke)
    reference = backend.policy("integer")
    for method in a.methods.split(","):
        pol = method_policy(method, interpret=a.smoke)
        conv = make_converter(method, key, roles)
        for path, (k, n), role in distinct_linears(shapes, roles):
            layer = {"kernel": (0.02 * jax.random.normal(key, (k, n))).astype(jnp.bfloat16),
                     "bias": jnp.zeros((n,), jnp.bfloat16)}
            q = conv(path, layer)
            if not isinstance(q, QLinear):
                continue
            m = SHORT_M.get(role, TOKENS[a.model])
            if a.smoke:
                m = min(m, SMOKE_M)
            # the time embedder's input is the float32 sinusoidal embedding
            xdt = jnp.float32 if role == "time-embedding" else jnp.bfloat16
            x = jax.random.normal(jax.random.fold_in(key, 1), (m, k), jnp.float32).astype(xdt)
            row = {"model": a.model, "method": method, "path": path, "role": role, "M": m, "K": k, "N": n,
                   "x_dtype": str(x.dtype), "kernel_path": bool(backend.kernel_supported(q)),
                   "w_layout": q.weight.layout}
            t0 = time.time()
            try:
                got = jax.jit(lambda q_, x_: backend.execute(q_, x_, pol))(q, x)
                got.block_until_ready()
                row["first_call_s"] = round(time.time() - t0, 2)
                want = jax.jit(lambda q_, x_: backend.execute(q_, x_, reference))(q, x)
                d = jnp.linalg.norm((got.astype(jnp.float32) - want.astype(jnp.float32)).ravel())
                row["rel_err_vs_ref"] = float(d / (jnp.linalg.norm(want.astype(jnp.float32).ravel()) + 1e-30))
                row["finite"] = bool(jnp.isfinite(got).all())
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
                row["where"] = traceback.format_exc()[-2500:]
            if a.smoke:
                row["smoke"] = True
            emit(row, a.out)


if __name__ == "__main__":
    main()
