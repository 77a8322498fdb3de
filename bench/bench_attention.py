"""8-bit attention (issue 19, item 2): the INT8-QKᵀ Mosaic GPU kernel vs cuDNN's bf16 flash
attention at the models' shapes, one process, side by side; CUPTI kernel time (all kernels
of the call: the int8 path's Q/K quantize included), errors vs float32 attention.

    python bench/bench_attention.py --out bench/results/attention_h200.json [--smoke]

Rows per shape (``B × T × H × d``, random bf16 Q/K/V, K with a shared offset so smoothing
matters; PixArt's cross-attention has 300 caption keys, the second half of one sample's masked):

* ``cudnn_bf16``: ``attention(..., impl="cudnn")`` (jax.nn.dot_product_attention, cuDNN).
* ``int8qk``: ``jaxdq.backend.int8qk_attention`` (what ``impl="int8qk"`` runs on Hopper):
  smoothing + per-block INT8 codes (XLA) + padding + the kernel, per ``block_kv`` (and with
  head dims padded to 64, ``_pad64``, instead of the tight 32 / 16).
* ``int8qk_kernel_*``: the kernel alone on ready operands (``int8qk_kernel_operands``), per
  tuning (``block_kv``, ping-pong schedule barrier, pipeline depth, padding).
* ``mgpu_fa3_f16``: jax's own Pallas FlashAttention-3 example (float16 operands: its tiles
  are float16), where its head dim (a multiple of 64) allows: the same machinery without
  8-bit ``Q Kᵀ``.

Errors (relative Frobenius) vs ``impl="float32"`` and, for the int8 rows, vs the jnp
semantics ``attention_8bit(qk="int8", pv="float16")``.  ``--smoke``: tiny shapes, the
kernel in jax's Mosaic GPU interpreter (CPU check of this script).
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

from bench import quiet_gpu  # noqa: E402
from bench.bench_kernels import make_timer, rel_err  # noqa: E402
from jaxdq import backend  # noqa: E402
from jaxdq.models.attention import attention, attention_8bit  # noqa: E402

# name, batch, Tq, Tk, heads, head dim, masked keys
SHAPES = [
    ("PixArt-Σ 1024² self (CFG 2)", 2, 4096, 4096, 16, 72, False),
    ("PixArt-Σ 1024² cross (CFG 2)", 2, 4096, 300, 16, 72, True),
    ("FLUX.1 1024² joint", 1, 4608, 4608, 24, 128, False),
    ("DiT-XL/2 256² (CFG 2)", 2, 256, 256, 16, 72, False),
]
SMOKE_SHAPES = [("smoke self", 1, 128, 128, 2, 40, False), ("smoke cross", 1, 128, 77, 1, 64, True)]
# (block_kv, schedule barrier, pipeline depth, head dims padded to 64)
TUNINGS = [(128, True, 2, False), (128, True, 2, True), (64, True, 2, False), (128, False, 2, False),
           (128, True, 3, False), (192, True, 2, False)]


def operands(b, tq, tk, h, d, masked, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (b, tq, h, d), jnp.float32).astype(jnp.bfloat16)
    k = (jax.random.normal(ks[1], (b, tk, h, d), jnp.float32) + 2.0).astype(jnp.bfloat16)
    v = jax.random.normal(ks[2], (b, tk, h, d), jnp.float32).astype(jnp.bfloat16)
    bias = None
    if masked:
        keep = jnp.ones((b, tk)).at[b - 1, tk // 2:].set(0.0)
        bias = (1.0 - keep) * -10000.0
    return q, k, v, bias


def run(smoke: bool, reps: int, quiet=None) -> dict:
    from pallas_kernels.attention_int8 import AttentionConfig, int8qk_attention
    from pallas_kernels.int_gemm_hopper import gpu_interpret_params

    timer = make_timer(reps)
    interp = gpu_interpret_params() if smoke else None
    rows, jobs = [], []
    for name, b, tq, tk, h, d, masked in (SMOKE_SHAPES if smoke else SHAPES):
        q, k, v, bias = operands(b, tq, tk, h, d, masked)
        flops = 4 * b * h * tq * tk * d
        ref32 = jax.jit(lambda q, k, v, bias: attention(q, k, v, bias, impl="float32"))(q, k, v, bias)
        sem = jax.jit(lambda q, k, v, bias: attention_8bit(q, k, v, bias, qk="int8", pv="float16"))(q, k, v, bias)
        base = {"shape": name, "B": b, "Tq": tq, "Tk": tk, "H": h, "d": d, "masked": masked, "flop": flops}

        def record(variant, f, *args, sem_err=True):
            """Compile and check now; time later (all compiles done, the GPU alone: ``quiet``)."""
            row = dict(base, variant=variant)
            try:
                out = f(*args)
                row["rel_err_vs_f32"] = rel_err(out.astype(jnp.float32), ref32)
                if sem_err:
                    row["rel_err_vs_int8qk_jnp"] = rel_err(out.astype(jnp.float32), sem)
                jobs.append((row, f, args))
            except Exception as e:  # one failing variant must not lose the others
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            rows.append(row)
            print(json.dumps(row), flush=True)

        if not smoke:
            record("cudnn_bf16", jax.jit(lambda q, k, v, bias: attention(q, k, v, bias, impl="cudnn")), q, k, v, bias,
                   sem_err=False)
        for bkv, pad_64 in ((64, False), (128, False), (128, True)):
            tag = f"int8qk_bkv{bkv}" + ("_pad64" if pad_64 else "")
            record(tag, jax.jit(lambda q, k, v, bias, bkv=bkv, p=pad_64: backend.int8qk_attention(
                q, k, v, bias, interpret=smoke, block_kv=bkv, pad_64=p)), q, k, v, bias)
        for bkv, sched, steps, pad_64 in (TUNINGS[:1] if smoke else TUNINGS):
            if pad_64 and d % 64 == 0:
                continue  # the same operands as the tight padding
            ins = backend.int8qk_kernel_operands(q, k, v, bias, block_kv=bkv, pad_64=pad_64)
            cfg = AttentionConfig(block_kv=bkv, schedule_barrier=sched, max_concurrent_steps=steps, interpret=interp)
            tag = f"int8qk_kernel_bkv{bkv}_{'pp' if sched else 'free'}_s{steps}" + ("_pad64" if pad_64 else "")
            record(tag, jax.jit(lambda *a, cfg=cfg: int8qk_attention(*a, config=cfg)[:, :tq, :, :d]), *ins)
        if not smoke and d % 64 == 0 and not masked:
            from jax.experimental.pallas.ops.gpu import attention_mgpu as fa3

            for bkv in (128, 64):
                cfg = fa3.TuningConfig(block_q=64, block_kv=bkv, max_concurrent_steps=2)
                # (the example's shared-memory tiles are float16: it takes float16 operands)
                f16 = [a.astype(jnp.float16) for a in (q, k, v)]
                record(f"mgpu_fa3_f16_bkv{bkv}", jax.jit(lambda q, k, v, cfg=cfg: fa3.attention(q, k, v, cfg)),
                       *f16, sem_err=False)
    with (quiet or quiet_gpu.QuietGPU(None)).timing():
        for row, f, args in jobs:
            try:
                ms, how = timer(f, *args)
                row.update(ms=round(ms, 4), timing=how, tflops=round(row["flop"] / (ms * 1e-3) / 1e12, 1))
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            print(row["shape"], row["variant"], row.get("ms"), flush=True)
    out = {"rows": rows}
    if quiet is not None and quiet.report is not None:
        out["quiet_gpu"] = quiet.report
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    quiet_gpu.add_arguments(ap)
    a = ap.parse_args(argv)
    t0 = time.time()
    res = run(a.smoke, 1 if a.smoke else a.reps, quiet_gpu.from_args(a))
    res.update(command="python bench/bench_attention.py --out OUT" + (" --smoke" if a.smoke else ""),
               device=str(jax.devices()[0].device_kind), jax=jax.__version__, wall_s=round(time.time() - t0, 1))
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
