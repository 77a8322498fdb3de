"""Benchmark the Pallas quantized-linear kernels against XLA on one GPU; JSON out.

Usage (device machine, repo root):  python3 bench/bench_kernels.py --out $OUT/kernels_h100.json
Per layer shape ``(M, K, N)``: XLA bf16 / int8 / fp8 dots, our W8A8 GEMMs (Mosaic GPU
wgmma and Pallas-Triton, with and without the rank-32 branch), W4A8 (Triton), the unfused
XLA composition, the whole quantized linear (quantize kernel + GEMM) vs its XLA
composition, and the fused quantize kernel's bandwidth.  Device time per call from CUDA
kernel timestamps (``jax.experimental.mosaic.gpu.profiler.measure``, all kernels of the
call summed; wall clock with block_until_ready as fallback), median of ``--reps``.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int_gemm import GemmConfig, int_gemm, int_gemm_reference
from pallas_kernels.quantize_act import QuantizeConfig, quantize_act, quantize_act_reference, quantize_config

try:
    from pallas_kernels import int_gemm_hopper as mk
except Exception:  # pragma: no cover
    mk = None

#: --smoke: the Triton kernels run in Pallas' interpreter (CPU); set by main()
INTERPRET = False


def gcfg(**kw) -> GemmConfig:
    """The Triton GEMM's config (``GemmConfig`` fields; interpreted under --smoke)."""
    return GemmConfig(**kw, interpret=INTERPRET)


def qcfg(cfg: QuantizeConfig) -> QuantizeConfig:
    """A quantize-kernel config, interpreted under --smoke."""
    return dataclasses.replace(cfg, interpret=INTERPRET)


_LAUNCH_FIELDS = frozenset(f.name for f in dataclasses.fields(QuantizeConfig))


def _launch_kw(cfg: dict) -> dict:
    """The launch parameters (``QuantizeConfig`` fields) of a quantize-bench entry."""
    return {k: v for k, v in cfg.items() if k in _LAUNCH_FIELDS}


def _act_kw(cfg: dict) -> dict:
    """The op's own arguments (``bits``, ``group_size``) of a quantize-bench entry."""
    return {k: v for k, v in cfg.items() if k not in _LAUNCH_FIELDS}


def hcfg(**kw):
    """The Hopper GEMM's config (``HopperGemmConfig`` fields)."""
    return mk.HopperGemmConfig(**kw)


def ref_qlinear_forward(x, wq, sw, *, bias=None, smooth=None, l1=None, l2=None, out_dtype=jnp.bfloat16):
    """Quantize then integer GEMM, both references: the composed W8A8 linear ``[M, K] → [M, N]``
    (was ``pallas_kernels.reference.qlinear_forward``)."""
    codes, sx, xl1 = quantize_act_reference(x, smooth=smooth, l1=l1)
    return int_gemm_reference(codes, wq, sx, sw, bias=bias, xa=xl1, l2=l2 if l1 is not None else None,
                              out_dtype=out_dtype)


SHAPES = [  # (model, layer, M, K, N)
    ("DiT-XL/2", "qkv", 512, 1152, 3456), ("DiT-XL/2", "proj", 512, 1152, 1152),
    ("DiT-XL/2", "fc1", 512, 1152, 4608), ("DiT-XL/2", "fc2", 512, 4608, 1152),
    ("DiT-XL/2", "qkv", 8192, 1152, 3456), ("DiT-XL/2", "proj", 8192, 1152, 1152),
    ("DiT-XL/2", "fc1", 8192, 1152, 4608), ("DiT-XL/2", "fc2", 8192, 4608, 1152),
    ("DiT-XL/2", "adaLN", 2, 1152, 6912),
    ("PixArt-Sigma-1024", "qkv", 8192, 1152, 3456), ("PixArt-Sigma-1024", "proj", 8192, 1152, 1152),
    ("PixArt-Sigma-1024", "fc1", 8192, 1152, 4608), ("PixArt-Sigma-1024", "fc2", 8192, 4608, 1152),
    ("PixArt-Sigma-1024", "cross-kv", 600, 1152, 2304),
    ("FLUX.1", "qkv", 4608, 3072, 9216), ("FLUX.1", "fc1", 4608, 3072, 12288),
    ("FLUX.1", "fc2", 4608, 12288, 3072),
    ("square", "8192^3", 8192, 8192, 8192),
    ("FLUX.1", "modulation", 2, 3072, 18432), ("DiT-XL/2", "adaLN (B=32)", 64, 1152, 6912),
    ("DiT-XL/2", "adaLN (B=8)", 16, 1152, 6912),
]
RANK = 32


def make_timer(reps, warmup: int = 3):
    """``timer(f, *args) -> (ms, "cupti" | "wall")``: the median of ``reps`` runs after
    ``warmup`` calls (compilation included); CUPTI kernel time on a GPU, wall time elsewhere
    or when CUPTI fails."""
    try:
        from jax.experimental.mosaic.gpu import profiler
    except Exception:  # pragma: no cover
        profiler = None

    def wall(f, *args):
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append((time.perf_counter() - t) * 1e3)
        return float(statistics.median(ts)), "wall"

    def timer(f, *args):
        for _ in range(warmup):  # compile + warm up
            jax.block_until_ready(f(*args))
        if profiler is not None and jax.devices()[0].platform == "gpu":
            try:
                _, ts = profiler.measure(f, iterations=reps)(*args)
                if ts:
                    return float(statistics.median(ts)), "cupti"
            except Exception as e:  # pragma: no cover
                print("cupti timing failed:", type(e).__name__, str(e)[:200], flush=True)
        return wall(f, *args)
    return timer


def hbm_bandwidth(timer):
    x = jnp.ones((256, 1024, 1024), jnp.bfloat16)  # 512 MiB
    f = jax.jit(lambda a: a * 2)
    ms, _ = timer(f, x)
    return 2 * x.size * 2 / (ms * 1e-3)


def rel_err(a, b):
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def bench_shape(model, layer, m, k, n, timer, bw, rows, check, want=lambda name: True):
    keys = jax.random.split(jax.random.key(m * 7 + k * 3 + n), 8)
    mp = max(64, -(-m // 128) * 128) if m >= 128 else 64  # our kernels' row padding
    bm = 128 if mp % 128 == 0 else 64
    x = jax.random.normal(keys[0], (mp, k), jnp.float32).astype(jnp.bfloat16)
    w = (jax.random.normal(keys[1], (k, n), jnp.float32) / np.sqrt(k)).astype(jnp.bfloat16)
    l1 = (jax.random.normal(keys[2], (k, RANK)) / np.sqrt(k)).astype(jnp.bfloat16)
    l2 = (jax.random.normal(keys[3], (RANK, n)) * 0.1).astype(jnp.bfloat16)
    bias = jax.random.normal(keys[4], (n,), jnp.float32) * 0.1
    wf = w.astype(jnp.float32)
    sw = jnp.maximum(jnp.max(jnp.abs(wf), axis=0, keepdims=True) / 127, 1e-8)
    wq = jnp.clip(jnp.round(wf / sw), -127, 127).astype(jnp.int8)
    wt = wq.T
    xq, sx, xl1 = quantize_act_reference(x, l1=l1)
    xl1 = xl1.astype(jnp.bfloat16)
    xqa, sxa, _, zxa = quantize_act_reference(x, symmetric=False)  # asymmetric per-token codes + zero points
    # W4, group 64
    g = 64
    wg = wf.reshape(k // g, g, n)
    sw4 = jnp.maximum(jnp.max(jnp.abs(wg), axis=1) / 7, 1e-8)
    w4 = jnp.clip(jnp.round(wg / sw4[:, None, :]), -8, 7).astype(jnp.int8).reshape(k, n)
    from jaxdq.quant.quantizer import pack_int4
    w4p = pack_int4(w4)
    xm = x[:m]
    xqm = xq[:m]
    gate = jax.random.normal(keys[6], (2, n), jnp.float32).astype(jnp.bfloat16)
    resid = jax.random.normal(keys[7], (m, n), jnp.float32).astype(jnp.bfloat16)
    flops = 2.0 * m * k * n
    f8 = jnp.float8_e4m3fn

    variants = {
        "xla_bf16": (jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)), (xm, w)),
        "xla_int8": (jax.jit(lambda a, b: jax.lax.dot_general(
            a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)), (xqm, wq)),
        "xla_fp8_e4m3": (jax.jit(lambda a, b: jax.lax.dot_general(
            a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.bfloat16)),
            (xm.astype(f8), w.astype(f8))),
        "unfused_xla_int8_lr32": (jax.jit(lambda a, b, s1, s2, bb, xa, ll: (
            jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
            .astype(jnp.float32) * s1 * s2 + bb + jnp.dot(xa, ll, preferred_element_type=jnp.float32)
        ).astype(jnp.bfloat16)), (xqm, wq, sx[:m], sw, bias, xl1[:m], l2)),
        "triton_w8a8": (jax.jit(lambda a, b, s1, s2, bb: int_gemm(
            a, b, s1, s2, bias=bb, config=gcfg(block_m=bm))), (xq, wq, sx, sw, bias)),
        "triton_w8a8_lr32": (jax.jit(lambda a, b, s1, s2, bb, xa, ll: int_gemm(
            a, b, s1, s2, bias=bb, xa=xa, l2=ll, config=gcfg(block_m=bm))), (xq, wq, sx, sw, bias, xl1, l2)),
        "triton_w4a8_g64": (jax.jit(lambda a, b, s1, s2, bb: int_gemm(
            a, b, s1, s2, bias=bb, packed=True, config=gcfg(block_m=bm))), (xq, w4p, sx, sw4, bias)),
    }
    # K-major codes (QLinear w_layout="nk"): int8 [N, K]; int4 as jnp.int4 [N, K]
    w4t = w4.T.astype(jnp.int4)
    w4c_scale = jnp.maximum(jnp.max(jnp.abs(wf), axis=0, keepdims=True) / 7, 1e-8)  # W4 per channel
    w4c = jnp.clip(jnp.round(wf / w4c_scale), -8, 7).astype(jnp.int8)
    w4ct = w4c.T.astype(jnp.int4)
    xq4, sx4, xl14 = quantize_act_reference(x, bits=4, l1=l1, group_size=64)  # W4A4: per (token, group 64)
    xl14 = xl14.astype(jnp.bfloat16)
    variants["triton_w8a8_kmajor"] = (jax.jit(lambda a, b, s1, s2, bb: int_gemm(
        a, b, s1, s2, bias=bb, w_kmajor=True, config=gcfg(block_m=bm))), (xq, wt, sx, sw, bias))
    if mk is not None:
        ws = mk.int8_gemm_ws
        variants["mgpu_ws_w8a8"] = (jax.jit(lambda a, b, s1, s2, bb: ws(
            a, b, s1[:, 0], s2[0], bias=bb)), (xq, wt, sx, sw, bias))
        variants["mgpu_ws_w8a8_asym"] = (jax.jit(lambda a, b, s1, s2, bb, z: ws(
            a, b, s1[:, 0], s2[0], bias=bb, x_zero=z[:, 0])), (xqa, wt, sxa, sw, bias, zxa))
        variants["mgpu_ws_w8a8_tn64"] = (jax.jit(lambda a, b, s1, s2, bb: ws(
            a, b, s1[:, 0], s2[0], bias=bb, config=hcfg(tile_n=64))), (xq, wt, sx, sw, bias))
        variants["mgpu_ws_w8a8_lr32_fused"] = (jax.jit(lambda a, b, s1, s2, bb, xa, ll: ws(
            a, b, s1[:, 0], s2[0], bias=bb, xa=xa, l2=ll)), (xq, wt, sx, sw, bias, xl1, l2))
        variants["mgpu_ws_w8a8_lr32_inacc"] = (jax.jit(lambda a, b, s1, s2, bb, xa, ll: ws(
            a, b, s1[:, 0], s2[0], bias=bb, xa=xa, l2=ll, config=hcfg(lr_in_acc=True))),
            (xq, wt, sx, sw, bias, xl1, l2))
        # the low-rank tiles in their own SMEM (the kernel's default before lr_smem="alias"):
        # at tile_n 128 the pipeline drops to 3 stages; "_s3" is the plain kernel at that depth
        variants["mgpu_ws_w8a8_lr32_fused_sep"] = (jax.jit(lambda a, b, s1, s2, bb, xa, ll: ws(
            a, b, s1[:, 0], s2[0], bias=bb, xa=xa, l2=ll, config=hcfg(lr_smem="separate"))),
            (xq, wt, sx, sw, bias, xl1, l2))
        variants["mgpu_ws_w8a8_lr32_inacc_sep"] = (jax.jit(lambda a, b, s1, s2, bb, xa, ll: ws(
            a, b, s1[:, 0], s2[0], bias=bb, xa=xa, l2=ll, config=hcfg(lr_in_acc=True, lr_smem="separate"))),
            (xq, wt, sx, sw, bias, xl1, l2))
        # each K-step's wgmma waited for before its slot is released (no delay_release): the
        # setting under which the GPU interpreter's multi-tile runs are exact (NOTES.md)
        variants["mgpu_ws_w8a8_inflight0"] = (jax.jit(lambda a, b, s1, s2, bb: ws(
            a, b, s1[:, 0], s2[0], bias=bb, config=hcfg(mma_in_flight=0))), (xq, wt, sx, sw, bias))
        variants["mgpu_ws_w8a8_s3"] = (jax.jit(lambda a, b, s1, s2, bb: ws(
            a, b, s1[:, 0], s2[0], bias=bb, config=hcfg(max_concurrent_steps=3))), (xq, wt, sx, sw, bias))
        variants["mgpu_ws_w8a8_xla_lr32"] = (jax.jit(lambda a, b, s1, s2, bb, xa, ll: (
            ws(a, b, s1[:, 0], s2[0], bias=bb).astype(jnp.float32)
            + jnp.dot(xa, ll, preferred_element_type=jnp.float32)).astype(jnp.bfloat16)),
            (xq, wt, sx, sw, bias, xl1, l2))
        # DiT's x + gate · proj(h): in the epilogue vs XLA after the GEMM (2 samples of M/2 tokens)
        variants["mgpu_ws_w8a8_gate_res"] = (jax.jit(lambda a, b, s1, s2, bb, g_, r_: ws(
            a, b, s1[:, 0], s2[0], bias=bb, gate=g_, residual=r_)), (xqm, wt, sx[:m], sw, bias, gate, resid))
        # the residual tile TMA-copied into shared memory at the output tile's start (res_load="tma")
        variants["mgpu_ws_w8a8_gate_res_tma"] = (jax.jit(lambda a, b, s1, s2, bb, g_, r_: ws(
            a, b, s1[:, 0], s2[0], bias=bb, gate=g_, residual=r_, config=hcfg(res_load="tma"))),
            (xqm, wt, sx[:m], sw, bias, gate, resid))
        variants["mgpu_ws_w8a8_xla_gate_res"] = (jax.jit(lambda a, b, s1, s2, bb, g_, r_: (
            r_.astype(jnp.float32) + jnp.repeat(g_.astype(jnp.float32), a.shape[0] // g_.shape[0], axis=0)
            * ws(a, b, s1[:, 0], s2[0], bias=bb).astype(jnp.float32)).astype(jnp.bfloat16)),
            (xqm, wt, sx[:m], sw, bias, gate, resid))
        variants["mgpu_ws_w4a8"] = (jax.jit(lambda a, b, s1, s2, bb: ws(
            a, b, s1[:, 0], s2[0], bias=bb)), (xq, w4ct, sx, w4c_scale, bias))
        variants["mgpu_ws_w4a8_tn64"] = (jax.jit(lambda a, b, s1, s2, bb: ws(
            a, b, s1[:, 0], s2[0], bias=bb, config=hcfg(tile_n=64))), (xq, w4ct, sx, w4c_scale, bias))
        variants["mgpu_ws_w4a8_g64"] = (jax.jit(lambda a, b, s1, s2, bb: ws(
            a, b, s1[:, 0], s2, bias=bb)), (xq, w4t, sx, sw4, bias))
        variants["mgpu_ws_w4a4_g64"] = (jax.jit(lambda a, b, s1, s2, bb: ws(
            a, b, s1, s2, bias=bb)), (xq4, w4t, sx4, sw4, bias))
        variants["mgpu_ws_w4a4_g64_lr32_fused"] = (jax.jit(lambda a, b, s1, s2, bb, xa, ll: ws(
            a, b, s1, s2, bias=bb, xa=xa, l2=ll)), (xq4, w4t, sx4, sw4, bias, xl14, l2))
        variants["mgpu_ws_w4a4_g64_xla_lr32"] = (jax.jit(lambda a, b, s1, s2, bb, xa, ll: (
            ws(a, b, s1, s2, bias=bb).astype(jnp.float32)
            + jnp.dot(xa, ll, preferred_element_type=jnp.float32)).astype(jnp.bfloat16)),
            (xq4, w4t, sx4, sw4, bias, xl14, l2))
    variants["triton_w4a4_g64_lr32"] = (jax.jit(lambda a, b, s1, s2, bb, xa, ll: int_gemm(
        a, b, s1, s2, bias=bb, xa=xa, l2=ll, packed=True, config=gcfg(block_m=bm))),
        (xq4, w4p, sx4, sw4, bias, xl14, l2))

    refs = {}
    if check:
        refs["w8"] = int_gemm_reference(xq, wq, sx, sw, bias=bias)
        refs["w8asym"] = int_gemm_reference(xqa, wq, sxa, sw, bias=bias, x_zero=zxa)
        refs["w8gr"] = int_gemm_reference(xqm, wq, sx[:m], sw, bias=bias, gate=gate, residual=resid)
        refs["w8lr"] = int_gemm_reference(xq, wq, sx, sw, bias=bias, xa=xl1, l2=l2)
        refs["w4"] = int_gemm_reference(xq, w4p, sx, sw4, bias=bias, packed=True)
        refs["w4c"] = int_gemm_reference(xq, w4c, sx, w4c_scale, bias=bias)
        refs["w4a4"] = int_gemm_reference(xq4, w4, sx4, sw4, bias=bias)
        refs["w4a4lr"] = int_gemm_reference(xq4, w4, sx4, sw4, bias=bias, xa=xl14, l2=l2)
    ref_of = {"triton_w8a8": "w8", "triton_w8a8_kmajor": "w8", "mgpu_ws_w8a8": "w8", "triton_w8a8_lr32": "w8lr",
              "mgpu_ws_w8a8_xla_lr32": "w8lr", "mgpu_ws_w8a8_tn64": "w8", "mgpu_ws_w8a8_inflight0": "w8", "mgpu_ws_w8a8_lr32_fused": "w8lr",
              "mgpu_ws_w8a8_lr32_inacc": "w8lr", "mgpu_ws_w8a8_asym": "w8asym",
              "mgpu_ws_w8a8_gate_res": "w8gr", "mgpu_ws_w8a8_gate_res_tma": "w8gr", "mgpu_ws_w8a8_xla_gate_res": "w8gr",
              "triton_w4a8_g64": "w4", "mgpu_ws_w4a8": "w4c", "mgpu_ws_w4a8_tn64": "w4c", "mgpu_ws_w4a8_g64": "w4",
              "mgpu_ws_w4a4_g64": "w4a4", "mgpu_ws_w4a4_g64_lr32_fused": "w4a4lr",
              "mgpu_ws_w4a4_g64_xla_lr32": "w4a4lr", "triton_w4a4_g64_lr32": "w4a4lr"}
    base = None
    shape = f"{m}x{k}x{n}"
    for name, (f, args) in variants.items():
        if not want(name):
            continue
        row = {"model": model, "layer": layer, "shape": shape, "M": m, "K": k, "N": n,
               "variant": name, "M_padded": mp if name.startswith(("triton", "mgpu")) else m}
        try:
            ms, how = timer(f, *args)
            row.update(time_ms=ms, tops=flops / (ms * 1e-3) / 1e12, timer=how)
            if name == "xla_bf16":
                base = ms
            if check and name in ref_of:
                row["rel_err_vs_ref"] = rel_err(f(*args)[:m], refs[ref_of[name]][:m])
        except Exception as e:  # record and go on
            row.update(error=f"{type(e).__name__}: {str(e)[:300]}", where=traceback.format_exc()[-700:])
        if base and "time_ms" in row:
            row["speedup_vs_xla_bf16"] = base / row["time_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    # whole quantized linear: quantize (+ smooth + down-proj) + GEMM (+ up-proj) vs XLA composition
    smooth = jax.random.uniform(keys[5], (k,), minval=0.5, maxval=2.0)
    gemm = "mgpu" if mk is not None else "triton"

    def fused(a, s, la, lb, b_, wq_, wt_, sw_):
        c, s1, xa = quantize_act(a, smooth=s, l1=la, config=qcfg(quantize_config(a.shape[0], a.shape[1], dot=True,
                                                                                  smooth=True, grouped=False)))
        if gemm == "mgpu":  # the backend's Hopper path with fuse_lowrank=False
            y = mk.int8_gemm_ws(c, wt_, s1[:, 0], sw_[0], bias=b_).astype(jnp.float32)
            return (y + jnp.dot(xa, lb, preferred_element_type=jnp.float32)).astype(jnp.bfloat16)
        return int_gemm(c, wq_, s1, sw_, bias=b_, xa=xa, l2=lb, config=gcfg(block_m=bm))

    def xla_comp(a, s, la, lb, b_, wq_, wt_, sw_):
        xt = a.astype(jnp.float32) / s
        s1 = jnp.maximum(jnp.max(jnp.abs(xt), axis=1, keepdims=True) / 127, 1e-8)
        c = jnp.clip(jnp.round(xt / s1), -128, 127).astype(jnp.int8)
        acc = jax.lax.dot_general(c, wq_, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        xa = jnp.dot(xt.astype(jnp.bfloat16), la, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
        return (acc.astype(jnp.float32) * s1 * sw_ + b_
                + jnp.dot(xa, lb, preferred_element_type=jnp.float32)).astype(jnp.bfloat16)

    for name, f, a in (("qlinear_fused_kernels_lr32", fused, x), ("qlinear_xla_composition_lr32", xla_comp, xm)):
        if not want(name):
            continue
        row = {"model": model, "layer": layer, "shape": shape, "M": m, "K": k, "N": n, "variant": name,
               "gemm": ("mgpu_ws+xla_lowrank" if gemm == "mgpu" else gemm) if name.startswith("qlinear_fused") else "xla"}
        try:
            ms, how = timer(jax.jit(f), a, smooth, l1, l2, bias, wq, wt, sw)
            row.update(time_ms=ms, tops=flops / (ms * 1e-3) / 1e12, timer=how)
            if base:
                row["speedup_vs_xla_bf16"] = base / ms
            if check and name.startswith("qlinear_fused"):
                r0 = ref_qlinear_forward(x, wq, sw, bias=bias, smooth=smooth, l1=l1, l2=l2)
                row["rel_err_vs_ref"] = rel_err(jax.jit(f)(a, smooth, l1, l2, bias, wq, wt, sw)[:m], r0[:m])
        except Exception as e:
            row.update(error=f"{type(e).__name__}: {str(e)[:300]}", where=traceback.format_exc()[-700:])
        rows.append(row)
        print(json.dumps(row), flush=True)

    # one whole QLinear (dynamic per-token A8, per-channel W, K-major codes): the backend's
    # kernel path (quantize kernel + GEMM kernel, rows padded; Hopper GEMM where the Mosaic GPU
    # kernels import, low rank unfused, small_m=0 so every M takes it) vs the layer's XLA
    # integer path (XLA's quantize fusion + XLA's integer dot on the codes as stored), which
    # policy("kernels") takes at <= Policy.small_m rows.
    from jaxdq import backend
    from jaxdq.quant.layers import ActQuant, QLinear, QWeight
    from jaxdq.quant.quantizer import QuantSpec

    pol_kernels = backend.policy("kernels", gemm="hopper" if mk is not None else "triton", fuse_lowrank=False,
                                 small_m=0, interpret=INTERPRET)
    pol_int = backend.policy("integer")
    a8 = ActQuant(spec=QuantSpec(8, granularity="token"))
    qls = {"w8a8": QLinear(weight=QWeight(codes=wq, scale=sw, spec=QuantSpec(8, granularity="channel")),
                           act=a8, bias=bias),
           "w4a8": QLinear(weight=QWeight(codes=pack_int4(w4c), scale=w4c_scale, packed=True,
                                          spec=QuantSpec(4, granularity="channel")), act=a8, bias=bias)}
    for wname, q in qls.items():
        q = backend.stored_for_kernels({"q": q})["q"]
        for path in ("kernels", "xla_int"):
            name = f"qlinear_{wname}_{path}"
            if not want(name):
                continue
            row = {"model": model, "layer": layer, "shape": shape, "M": m, "K": k, "N": n, "variant": name}
            try:
                pol = pol_kernels if path == "kernels" else pol_int
                if backend.choose(q, m, pol) != ("kernel" if path == "kernels" else "int"):
                    raise ValueError(f"{name}: the backend would run {backend.choose(q, m, pol)!r} here")
                f = jax.jit(lambda a, q, pol=pol: backend.execute(q, a, pol))
                ms, how = timer(f, xm, q)
                row.update(time_ms=ms, tops=flops / (ms * 1e-3) / 1e12, timer=how)
                if base:
                    row["speedup_vs_xla_bf16"] = base / ms
                if check:
                    ref = jax.jit(lambda a, q: backend.execute(q, a, backend.REFERENCE))
                    row["rel_err_vs_fake_ref"] = rel_err(f(xm, q), ref(xm, q))
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}", where=traceback.format_exc()[-700:])
            rows.append(row)
            print(json.dumps(row), flush=True)

    # the quantize kernel alone: bytes moved vs measured HBM bandwidth
    qcfgs = [("2sweep_bm16_w4_s1", dict(block_m=16, num_warps=4, num_stages=1)),
             ("2sweep_bm64_w8_s3", dict(block_m=64, num_warps=8, num_stages=3)),
             ("2sweep_bm32_w4_s3", dict(block_m=32, num_warps=4, num_stages=3)),
             ("g64_bm32_w4_s3", dict(block_m=32, num_warps=4, num_stages=3, group_size=64, bits=4)),
             ("g64_bm64_w8_s3", dict(block_m=64, num_warps=8, num_stages=3, group_size=64, bits=4))]
    if k <= 4608:
        qcfgs += [("1pass_bm16_w8", dict(block_m=16, num_warps=8, single_pass=True)),
                  ("1pass_bm32_w8", dict(block_m=32, num_warps=8, single_pass=True))]
    # which part limits the fused kernel: the same kernel without the down-projection (rows
    # per program no longer tied to the dot's 16-row minimum) and without smoothing, and
    # XLA's own fusion of the same math
    small = [("2sweep_bm4_w4_s3", dict(block_m=4, num_warps=4, num_stages=3)),
             ("2sweep_bm8_w4_s3", dict(block_m=8, num_warps=4, num_stages=3)),
             ("2sweep_bm16_w4_s3", dict(block_m=16, num_warps=4, num_stages=3)),
             ("2sweep_bm64_w8_s3", dict(block_m=64, num_warps=8, num_stages=3))]
    if k <= 4608:
        small += [("1pass_bm2_w4", dict(block_m=2, num_warps=4, single_pass=True)),
                  ("1pass_bm4_w4", dict(block_m=4, num_warps=4, single_pass=True)),
                  ("1pass_bm4_w8", dict(block_m=4, num_warps=8, single_pass=True)),
                  ("1pass_bm8_w4", dict(block_m=8, num_warps=4, single_pass=True))]
    families = [(f"quantize_smooth_lr32{'_had128' if had else ''}", True, True, had, cfgs)
                for had in (0, 128) for cfgs in [[c for c in qcfgs if not (had and "group_size" in c[1])]]]
    families += [("quantize_smooth", True, False, 0, small), ("quantize_plain", False, False, 0, small),
                 ("quantize_asym", False, False, 0, [c for c in small if c[0] in ("1pass_bm4_w4", "2sweep_bm8_w4_s3")])]
    # the divisions' share: the same launches with reciprocals multiplied in (exact_divide=False)
    recip = lambda cs, keep: [(n, {**c, "exact_divide": False}) for n, c in cs if n in keep]
    families += [("quantize_recip_plain", False, False, 0, recip(small, ("1pass_bm4_w4", "2sweep_bm8_w4_s3"))),
                 ("quantize_recip_smooth", True, False, 0, recip(small, ("1pass_bm4_w4", "1pass_bm4_w8",
                                                                          "2sweep_bm4_w4_s3"))),
                 ("quantize_recip_smooth_lr32", True, True, 0, recip(qcfgs, ("2sweep_bm64_w8_s3", "1pass_bm16_w8",
                                                                              "2sweep_bm16_w4_s1")))]
    xla_q = {"quantize_xla_smooth_lr32": (True, True), "quantize_xla_plain": (False, False)}
    for fam, use_s, use_l1, had, cfgs in families + [(n, s_, l_, 0, [("", None)]) for n, (s_, l_) in xla_q.items()]:
        for cfg_name, cfg in cfgs:
            name = f"{fam}_{cfg_name}" if cfg_name else fam
            if not want(name):
                continue
            row = {"model": model, "layer": layer, "shape": f"{mp}x{k}", "M": mp, "K": k, "variant": name}
            try:
                if cfg is None:  # XLA: the reference under jit
                    f = jax.jit(lambda a, s, la, use_s=use_s, use_l1=use_l1: quantize_act_reference(
                        a, smooth=s if use_s else None, l1=la if use_l1 else None))
                else:
                    f = jax.jit(lambda a, s, la, cfg=cfg, had=had, use_s=use_s, use_l1=use_l1, sym=fam != "quantize_asym":
                                quantize_act(a, smooth=s if use_s else None, l1=la if use_l1 else None,
                                             had_block=had, symmetric=sym, **_act_kw(cfg),
                                             config=qcfg(QuantizeConfig(**_launch_kw(cfg))))[:3])
                ms, how = timer(f, x, smooth, l1)
                cfg = cfg or {}
                nsc = k // cfg["group_size"] if "group_size" in cfg else 1
                nbytes = (mp * k * 2 + mp * k + mp * 4 * nsc + (mp * RANK * 2 + k * RANK * 2 if use_l1 else 0)
                          + (k * 4 if use_s else 0))
                row.update(time_ms=ms, bytes_moved=nbytes, gbps=nbytes / (ms * 1e-3) / 1e9,
                           hbm_fraction=nbytes / (ms * 1e-3) / bw, timer=how)
                if check:
                    c, s1, xa = f(x, smooth, l1)
                    c0, s0, xa0 = quantize_act_reference(x, smooth=smooth if use_s else None,
                                                         l1=l1 if use_l1 else None,
                                                         had_block=had, bits=cfg.get("bits", 8),
                                                         group_size=cfg.get("group_size", 0),
                                                         symmetric=fam != "quantize_asym")[:3]
                    d = np.abs(np.asarray(c, np.int32) - np.asarray(c0, np.int32))
                    row.update(codes_max_abs_diff=int(d.max()), codes_mismatch_frac=float((d > 0).mean()),
                               scale_rel_err=rel_err(s1, s0))
                    if use_l1:
                        row["xl1_rel_err"] = rel_err(xa, xa0)
            except Exception as e:
                row.update(error=f"{type(e).__name__}: {str(e)[:300]}", where=traceback.format_exc()[-700:])
            rows.append(row)
            print(json.dumps(row), flush=True)

#: --progressive: QServe's progressive-group W4A8 beside W8A8, W4A8 per channel, W4A8 with float
#: group-64 scales and XLA bf16 (model, layer, M, K, N)
PG_SHAPES = [("FLUX.1", "qkv", 4608, 3072, 9216), ("FLUX.1", "fc2", 4608, 12288, 3072),
             ("square", "8192^3", 8192, 8192, 8192), ("DiT-XL/2", "fc1 (M=256)", 256, 1152, 4608)]


def bench_progressive(model, layer, m, k, n, timer, rows, check, interpret=None):
    """Rows ``pg_*`` at one shape: ``xla_bf16``, ``mgpu_ws_w8a8``, ``mgpu_ws_w4a8`` (int4 per
    channel), ``mgpu_ws_w4a8_g64`` (int4, float group-64 scales: the per-K-step rescale),
    ``mgpu_ws_w4a8_pg`` (progressive groups: integer zero/scale in the int4 → int8 expansion,
    the W8A8 main loop), each checked against its jnp reference (``rel_err_vs_ref``).
    ``interpret``: the Mosaic GPU interpreter's params (--smoke on a CPU; one CTA per tile)."""
    from jaxdq.quant.progressive import ProgressiveWeight

    keys = jax.random.split(jax.random.key(m * 7 + k * 3 + n + 1), 3)
    x = jax.random.normal(keys[0], (m, k), jnp.float32).astype(jnp.bfloat16)
    wf = jax.random.normal(keys[1], (k, n), jnp.float32) / np.sqrt(k)
    w = wf.astype(jnp.bfloat16)
    bias = jax.random.normal(keys[2], (n,), jnp.float32) * 0.1
    xq, sx, _ = quantize_act_reference(x)
    sx = sx[:, 0]
    sw = jnp.maximum(jnp.max(jnp.abs(wf), axis=0) / 127, 1e-8)
    wq = jnp.clip(jnp.round(wf / sw), -127, 127).astype(jnp.int8)
    sw4c = jnp.maximum(jnp.max(jnp.abs(wf), axis=0) / 7, 1e-8)
    w4c = jnp.clip(jnp.round(wf / sw4c), -8, 7).astype(jnp.int8)
    wg = wf.reshape(k // 64, 64, n)
    sw4 = jnp.maximum(jnp.max(jnp.abs(wg), axis=1) / 7, 1e-8)
    w4 = jnp.clip(jnp.round(wg / sw4[:, None, :]), -8, 7).astype(jnp.int8).reshape(k, n)
    pw = ProgressiveWeight.from_kernel(wf)
    wt_pg, wz_pg, ws_pg = pw.kernel_operands()
    s1 = pw.s1.reshape(-1)
    num_sms = None
    if interpret is not None:  # one persistent CTA (the GPU interpreter simulates each; pallas_kernels/NOTES.md)
        num_sms = 1
    cfg = mk.HopperGemmConfig(num_sms=num_sms, interpret=interpret)
    ws = functools.partial(mk.int8_gemm_ws, config=cfg)
    variants = {
        "xla_bf16": (jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)), (x, w), None),
        "mgpu_ws_w8a8": (jax.jit(lambda a, b, s1_, s2, bb: ws(a, b, s1_, s2, bias=bb)), (xq, wq.T, sx, sw, bias),
                         lambda: int_gemm_reference(xq, wq, sx[:, None], sw[None], bias=bias)),
        "mgpu_ws_w4a8": (jax.jit(lambda a, b, s1_, s2, bb: ws(a, b, s1_, s2, bias=bb)),
                         (xq, w4c.T.astype(jnp.int4), sx, sw4c, bias),
                         lambda: int_gemm_reference(xq, w4c, sx[:, None], sw4c[None], bias=bias)),
        "mgpu_ws_w4a8_g64": (jax.jit(lambda a, b, s1_, s2, bb: ws(a, b, s1_, s2, bias=bb)),
                             (xq, w4.T.astype(jnp.int4), sx, sw4, bias),
                             lambda: int_gemm_reference(xq, w4, sx[:, None], sw4, bias=bias)),
        "mgpu_ws_w4a8_pg": (jax.jit(lambda a, b, s1_, s2, bb, z, g: ws(a, b, s1_, s2, bias=bb, w_zero=z, w_gscale=g)),
                            (xq, wt_pg, sx, s1, bias, wz_pg, ws_pg),
                            lambda: mk.progressive_gemm_reference(xq, wt_pg, wz_pg, ws_pg, sx, s1, bias=bias)),
    }
    flops = 2.0 * m * k * n
    base = None
    if interpret is not None:  # float-group int4 hangs in jax 0.10.2's GPU interpreter (NOTES.md)
        variants.pop("mgpu_ws_w4a8_g64")
    for name, (f, args, ref) in variants.items():
        row = {"model": model, "layer": layer, "shape": f"{m}x{k}x{n}", "M": m, "K": k, "N": n,
               "variant": "pg_" + name}
        try:
            ms, how = timer(f, *args)
            row.update(time_ms=ms, tops=flops / (ms * 1e-3) / 1e12, timer=how)
            if name == "xla_bf16":
                base = ms
            if check and ref is not None:
                row["rel_err_vs_ref"] = rel_err(f(*args), ref())
            if name == "mgpu_ws_w4a8_pg":  # the format's weight error vs float-scale g64
                row["weight_rel_err"] = rel_err(pw.dequantize(), wf)
                row["weight_rel_err_g64"] = rel_err((w4.reshape(k // 64, 64, n) * sw4[:, None]).reshape(k, n), wf)
        except Exception as e:  # record and go on
            row.update(error=f"{type(e).__name__}: {str(e)[:300]}", where=traceback.format_exc()[-700:])
        if base and "time_ms" in row:
            row["speedup_vs_xla_bf16"] = base / row["time_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--only", default="", help="comma-separated indices into SHAPES")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check of this script: one tiny shape, Triton kernels interpreted, no Mosaic GPU")
    p.add_argument("--variants", default="all",
                   help="comma-separated name prefixes to run (NAME$: exactly NAME), or 'all'")
    p.add_argument("--progressive", action="store_true",
                   help="only the progressive-group W4A8 rows (PG_SHAPES; with --smoke one tiny shape in the "
                        "Mosaic GPU interpreter)")
    a = p.parse_args()
    global SHAPES, mk, INTERPRET
    if a.progressive:
        return main_progressive(a)
    if a.smoke:
        SHAPES = [("smoke", "tiny", 128, 256, 256)]
        a.only = ""
        mk = None
        INTERPRET = True
    if a.variants == "all":
        want = lambda name: True
    else:
        names = a.variants.split(",")  # prefixes; a trailing "$" asks for that exact name
        prefixes = tuple(v for v in names if not v.endswith("$"))
        exact = {v[:-1] for v in names if v.endswith("$")}
        want = lambda name: name in exact or name.startswith(prefixes)
    timer = make_timer(a.reps)
    bw = hbm_bandwidth(timer)
    dev = jax.devices()[0]
    meta = {"command": " ".join(["python3"] + sys.argv), "jax": jax.__version__,
            "device": str(dev.device_kind), "hbm_bandwidth_measured_Bps": bw, "rank": RANK,
            "reps": a.reps, "statistic": "median",
            "notes": "our kernels pad M up to a multiple of 128 (64 for M<128); time includes the padded rows. "
                     "mgpu variants take the weight pre-transposed to [N, K] (K-major, required by 8-bit wgmma)."}
    print(json.dumps(meta), flush=True)
    rows = []
    idx = [int(i) for i in a.only.split(",")] if a.only else range(len(SHAPES))
    for i in idx:
        bench_shape(*SHAPES[i], timer=timer, bw=bw, rows=rows, check=not a.no_check, want=want)
        with open(a.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print_summary(rows, extra="hbm_fraction")


def print_summary(rows: list, extra: str) -> None:
    """One line per row: shape, variant, ms, TOPS, × XLA bf16 and the row's ``extra`` field."""
    print(f"{'shape':>20} {'variant':>30} {'ms':>9} {'TOPS':>7} {'x bf16':>7} {extra:>12}")
    for r in rows:
        if "time_ms" in r:
            print(f"{r['shape']:>20} {r['variant']:>30} {r['time_ms']:9.4f} {r.get('tops', 0):7.1f} "
                  f"{r.get('speedup_vs_xla_bf16', float('nan')):7.2f} {r.get(extra, '')!s:>12}")
        else:
            print(f"{r['shape']:>20} {r['variant']:>30} ERROR {r.get('error', '')[:80]}")


def main_progressive(a):
    """``--progressive``: :func:`bench_progressive` over :data:`PG_SHAPES` (``--only`` indexes
    them), JSON to ``--out``."""
    if mk is None:
        raise SystemExit("--progressive needs the Mosaic GPU kernels (pallas_kernels.int_gemm_hopper)")
    shapes, interpret = PG_SHAPES, None
    if a.smoke:
        shapes, interpret = [("smoke", "tiny", 128, 128, 256)], mk.gpu_interpret_params()
    if a.only:
        shapes = [shapes[int(i)] for i in a.only.split(",")]
    timer = make_timer(1 if a.smoke else a.reps, warmup=1 if a.smoke else 3)
    dev = jax.devices()[0]
    meta = {"command": " ".join(["python3"] + sys.argv), "jax": jax.__version__, "device": str(dev.device_kind),
            "reps": a.reps, "statistic": "median", "interpret": interpret is not None,
            "notes": "pg_* rows: activations per-token int8 codes (reference quantizer), weights K-major; "
                     "progressive groups of 64 (jaxdq.quant.progressive.ProgressiveWeight)."}
    print(json.dumps(meta), flush=True)
    rows = []
    for sh in shapes:
        bench_progressive(*sh, timer=timer, rows=rows, check=not a.no_check, interpret=interpret)
        with open(a.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print_summary(rows, extra="rel_err_vs_ref")


if __name__ == "__main__":
    main()
