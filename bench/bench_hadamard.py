"""Online cost of the Hadamard input rotation: block-diagonal vs full width; JSON lines out.

Usage (device machine, repo root):
    python3 bench/bench_hadamard.py --out $OUT/hadamard_h200.jsonl
    python3 bench/bench_hadamard.py --small --out /tmp/hadamard_smoke.jsonl   # CPU smoke

Per (width n, tokens T), bf16 input ``x [T, n]``, all jitted:
  copy    ``x * s`` (s a runtime scalar): reads and writes the same bytes, the
          memory-bound floor of any online transform;
  block   :func:`jaxdq.quant.hadamard.block_hadamard`, blocks of the largest power of
          two dividing n (today's rotation);
  full    :func:`jaxdq.quant.hadamard_orders.full_hadamard`, ``(H_m ⊗ H_p)/sqrt(n)``;
  matmul  XLA bf16 ``x @ W`` with ``W [n, n]`` (a dense rotation / an n → n linear).
Timings: ``call`` = median over ``--reps`` of one call each followed by
``jax.block_until_ready`` (includes dispatch); ``loop`` = one jitted ``fori_loop`` of
``--inner`` chained applications, timed the same way and divided by ``--inner``
(dispatch amortized; the number to compare with the GEMM).  Warm-up calls first.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.quant.hadamard import block_hadamard
from jaxdq.quant.hadamard_orders import full_hadamard, hadamard_order_split

WIDTHS = [1152, 3072, 4608, 6912, 12288, 15360]  # DiT/PixArt, FLUX, their MLP/adaLN widths
TOKENS = [4096, 8192]
SMALL_WIDTHS = [1152, 3072]
SMALL_TOKENS = [256]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON-lines output path (appended)")
    ap.add_argument("--widths", type=int, nargs="+", default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=None, help="timed samples per method (median)")
    ap.add_argument("--inner", type=int, default=None, help="chained applications per loop sample")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--small", action="store_true", help="CPU smoke sizes")
    a = ap.parse_args(argv)
    a.widths = a.widths or (SMALL_WIDTHS if a.small else WIDTHS)
    a.tokens = a.tokens or (SMALL_TOKENS if a.small else TOKENS)
    a.reps = a.reps or (5 if a.small else 100)
    a.inner = a.inner or (2 if a.small else 20)
    return a


def median_ms(f, args, reps: int, warmup: int, per: int = 1) -> dict:
    """Median / p10 / p90 wall milliseconds of ``f(*args)`` (block_until_ready), / per."""
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append((time.perf_counter() - t) * 1e3 / per)
    q = np.percentile(ts, [10, 90])
    return {"median_ms": float(statistics.median(ts)), "p10_ms": float(q[0]),
            "p90_ms": float(q[1])}


def chained(step, inner: int):
    """jit of ``inner`` chained ``y ← step(y, *consts)`` inside one fori_loop."""
    def run(x, *consts):
        return jax.lax.fori_loop(0, inner, lambda i, y: step(y, *consts), x)
    return jax.jit(run)


def methods(n: int):
    """name → (step(y, *consts), consts builder) for width ``n``; steps map [T, n] bf16 → same."""
    block = n & -n

    def matmul_consts(key):
        w = jax.random.normal(key, (n, n), jnp.float32) / np.sqrt(n)
        return (w.astype(jnp.bfloat16),)

    return {
        "copy": (lambda y, s: y * s, lambda key: (jnp.asarray(1.0, jnp.bfloat16),)),
        "block": (lambda y: block_hadamard(y, block), lambda key: ()),
        "full": (full_hadamard, lambda key: ()),
        "matmul": (lambda y, w: jnp.dot(y, w), matmul_consts),
    }


def bench_case(n: int, t: int, args, meta: dict) -> list[dict]:
    m, p = hadamard_order_split(n)
    key = jax.random.key(n * 31 + t)
    x = jax.random.normal(key, (t, n), jnp.float32).astype(jnp.bfloat16)
    io_bytes = 2 * x.size * x.dtype.itemsize
    rows = []
    for name, (step, consts_of) in methods(n).items():
        consts = consts_of(jax.random.fold_in(key, 1))
        call = jax.jit(step)
        y = jax.block_until_ready(call(x, *consts))
        row = dict(meta, width=n, tokens=t, method=name, m=m, p=p, block=n & -n,
                   dtype="bfloat16", io_bytes=int(io_bytes),
                   norm_ratio=float(jnp.linalg.norm(y.astype(jnp.float32))
                                    / jnp.linalg.norm(x.astype(jnp.float32))))
        row["call"] = median_ms(call, (x, *consts), args.reps, args.warmup)
        row["loop"] = median_ms(chained(step, args.inner), (x, *consts), args.reps,
                                args.warmup, per=args.inner)
        ms = row["loop"]["median_ms"]
        row["gbps"] = io_bytes / (ms * 1e-3) / 1e9
        if name == "matmul":
            row["tflops"] = 2 * t * n * n / (ms * 1e-3) / 1e12
        rows.append(row)
        del y
    return rows


def print_table(rows: list[dict]) -> None:
    by = {}
    for r in rows:
        by.setdefault((r["width"], r["tokens"]), {})[r["method"]] = r
    print("milliseconds per application: loop median (dispatch amortized)")
    head = (f"{'width':>6} {'m':>4} {'p':>5} {'blk':>5} {'T':>5} | {'copy':>8} {'block':>8} "
            f"{'full':>8} {'matmul':>8} | {'full/copy':>9} {'full/block':>10} "
            f"{'full/matmul':>11} | {'full GB/s':>9}")
    print(head)
    print("-" * len(head))
    for (n, t), d in sorted(by.items()):
        ms = {k: v["loop"]["median_ms"] for k, v in d.items()}
        f = d["full"]
        print(f"{n:>6} {f['m']:>4} {f['p']:>5} {f['block']:>5} {t:>5} | {ms['copy']:8.4f} "
              f"{ms['block']:8.4f} {ms['full']:8.4f} {ms['matmul']:8.4f} | "
              f"{ms['full'] / ms['copy']:9.2f} {ms['full'] / ms['block']:10.2f} "
              f"{ms['full'] / ms['matmul']:11.3f} | {f['gbps']:9.1f}")


def main(argv=None) -> None:
    args = parse_args(argv)
    dev = jax.devices()[0]
    meta = {"cmd": shlex.join([sys.executable] + (sys.argv if argv is None else
                                                   ["bench/bench_hadamard.py", *argv])),
            "jax": jax.__version__, "backend": jax.default_backend(),
            "device": getattr(dev, "device_kind", str(dev)), "host": platform.node(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "reps": args.reps,
            "inner": args.inner, "warmup": args.warmup}
    print(f"# {meta['device']} ({meta['backend']}), jax {meta['jax']}: {meta['cmd']}", flush=True)
    rows = []
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "a") as fh:
        for n in args.widths:
            for t in args.tokens:
                case = bench_case(n, t, args, meta)
                for r in case:
                    fh.write(json.dumps(r) + "\n")
                fh.flush()
                rows += case
                print(f"  done width {n} tokens {t}", flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
