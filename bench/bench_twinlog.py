"""Time the twin-log (LRQ-DiT TLQ) Pallas GEMM against XLA bf16 and the uniform W4A8 kernel; JSON out.

Usage (device machine, repo root):
    python3 bench/bench_twinlog.py --out $OUT/twinlog_h200.json [--ptx $OUT/ptx] [--reps 20]
        [--hopper all|default|none]
CPU check of the script itself (tiny shapes, Pallas-Triton and the Mosaic GPU kernel
interpreted, no PTX):
    python3 bench/bench_twinlog.py --cpu-dry-run --out /tmp/twinlog_dry.json

Per layer shape ``(M, K, N)`` of DiT-XL/2, PixArt-Σ and FLUX.1 at M = 2 (adaLN /
modulation on the conditioning vector, and the GEMV-like case of every layer), 512 and
4608–8192 (the image tokens), the variants are

* ``xla_bf16``: ``jnp.dot`` of bf16 ``[M, K] × [K, N]`` (the float model's product);
* ``gemm_twinlog_w4a8``: :func:`pallas_kernels.twinlog_gemm.twinlog_gemm` alone (int8
  activation codes × packed 4-bit log codes decoded in registers, bf16 tensor-core dot);
* ``gemm_twinlog_hopper_w4a8`` (sm_90 only): :func:`pallas_kernels.twinlog_gemm_hopper.twinlog_gemm_hopper`
  alone at its default tiles (``twinlog_hopper_config``): the Mosaic GPU warp-specialized
  kernel, log codes decoded in registers without ``ex2`` (selects and three multiplies),
  bf16 wgmma.  Its operands as a layer stored for it would hold them: the codes K-major
  ``jnp.int4 [N, K]``, the 8 decode constants per column, the activation codes as bf16 (the
  quantize step would emit them so), all made outside the timed call.  At M ≥ 512 also
  ``…_cta512x64`` (shared decode, ``tile_m`` 256 × ``tile_n`` 64: 512 rows per decoded
  weight) and ``…_own128`` (each consumer decodes its own 128 × 128 tile: 128 or 256 rows);
  ``--hopper default`` times the default tiles only, ``none`` none;
* ``gemm_triton_w4a8``: the uniform W4A8 Triton GEMM alone (``int_gemm(packed=True)``,
  per-channel int4 weights);
* ``linear_twinlog_w4a8`` / ``linear_uniform_w4a8``: the whole quantized linear (dynamic
  per-token quantize kernel + GEMM + bias) through ``jaxdq.backend.execute`` under
  ``backend.policy("kernels")``, i.e. the route a quantized model takes: the twin-log
  layer's twin-log kernel; the uniform layer's Hopper wgmma W4A8 kernel on sm_90 (the
  Triton one elsewhere), or the integer XLA path at M ≤ ``small_m`` — the ``impl`` field
  says which (``backend.choose``).

Device time per call from CUDA kernel timestamps (``jax.experimental.mosaic.gpu.profiler``,
all kernels of the call summed), wall clock as fallback; median of ``--reps``.  Each
twin-log GEMM is checked against :func:`twinlog_gemm_reference` (relative Frobenius error;
the Hopper rows also against their own decode's reference, ``rel_err_vs_hopper_reference``).

``--ptx DIR``: dump the compiled PTX of two probe calls of the twin-log kernel (M = 2 →
``block_m`` 16, M = 512 → 128) and record which tensor-core instruction the main loop uses
(counts of ``wgmma.mma_async`` and ``mma.sync`` in the kernel's ``.entry``) under
``meta["main_loop_instruction"]``.  XLA_FLAGS must be set before jax starts, so the
script re-executes itself for the probe (a child process writing DIR/probe.json).  On sm_90
a second child compiles the Hopper kernel at the same probe shapes with Mosaic GPU's PTX /
SASS / ptxas dumps on (``MOSAIC_GPU_DUMP_TO=DIR/mosaic``) and records, under
``meta["hopper_main_loop_instruction"]``, the ``wgmma.mma_async`` forms in the PTX (e.g.
``m64n128k16.f32.bf16.bf16``), the SASS ``HGMMA`` and ``MUFU.EX2`` counts and ptxas's spill
lines, beside the instruction the code states (``MAIN_LOOP_INSTRUCTION``).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [  # (model, layer, M, K, N); PixArt-Σ's linears have DiT-XL/2's widths (hidden 1152)
    ("DiT-XL/2+PixArt-Sigma", "adaLN", 2, 1152, 6912),
    ("DiT-XL/2+PixArt-Sigma", "qkv", 512, 1152, 3456), ("DiT-XL/2+PixArt-Sigma", "fc1", 512, 1152, 4608),
    ("DiT-XL/2+PixArt-Sigma", "fc2", 512, 4608, 1152),
    ("DiT-XL/2+PixArt-Sigma", "qkv", 8192, 1152, 3456), ("DiT-XL/2+PixArt-Sigma", "fc1", 8192, 1152, 4608),
    ("DiT-XL/2+PixArt-Sigma", "fc2", 8192, 4608, 1152),
    ("PixArt-Sigma", "cross-kv", 600, 1152, 2304),
    ("FLUX.1", "modulation", 2, 3072, 18432),
    ("FLUX.1", "qkv", 4608, 3072, 9216), ("FLUX.1", "fc1", 4608, 3072, 12288),
    ("FLUX.1", "fc2", 4608, 12288, 3072),
]
DRY_SHAPES = [("dry", "tiny", 2, 128, 128), ("dry", "tiny", 64, 256, 256)]
PROBE_M = (2, 512)
PROBE_KN = (1152, 3456)
HOPPER_ALTERNATES = {  # M >= 512 only: variant suffix -> TwinLogHopperConfig fields
    "_cta512x64": {"shared_decode": True, "tile_m": 256, "tile_n": 64},
    "_own128": {"shared_decode": False, "tile_m": 128, "tile_n": 128},
}


def make_timer(reps: int):
    """bench_kernels' CUPTI / wall timer, 2 warm-up calls."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.bench_kernels import make_timer as kernels_timer

    return kernels_timer(reps, warmup=2)


def layers(k: int, n: int, seed: int):
    """A twin-log W4A8 QLinear and a uniform per-channel W4A8 QLinear of one random
    ``[k, n]`` weight (dynamic per-token 8-bit activations, bias, no rotation: the GEMMs
    compared as they are).  Twin-log params by min-max (``search=False``): the timing does
    not depend on them and the grid search of a 12288 × 3072 weight takes a while."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxdq.quant.layers import FloatLinear
    from jaxdq.quant.quantizer import QuantSpec
    from jaxdq.quant.recipes import dynamic_cfg
    from jaxdq.quant.rules import LayerQuant, quantize_linear
    from jaxdq.quant.twinlog import TwinLogSpec

    kw, kb = jax.random.split(jax.random.key(seed))
    w = jax.random.t(kw, 4.0, (k, n), jnp.float32) * (0.5 / np.sqrt(k))
    lay = FloatLinear(kernel=w, bias=jax.random.normal(kb, (n,), jnp.float32) * 0.1)
    a8 = QuantSpec(bits=8, granularity="token")
    tlq = quantize_linear(lay, LayerQuant(weight=TwinLogSpec(bits=4, search=False), act=a8, pack=True))
    uni = quantize_linear(lay, dynamic_cfg(4, 8))
    return lay, tlq, uni


def rel_err(a, b) -> float:
    import numpy as np
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def is_sm90(dev) -> bool:
    return dev.platform == "gpu" and getattr(dev, "compute_capability", "") in ("9.0", "9.0a")


def hopper_variants(m, n, xq, sx, tlq, step, offset, *, mode, interpret):
    """``{name: (jitted fn, args, impl, reference fn)}`` of the Hopper twin-log kernel rows:
    the default tiles, and at M ≥ 512 (``mode="all"``) the alternates; operands prepared
    outside the timed call."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from pallas_kernels.int_gemm_hopper import device_num_sms, gpu_interpret_params
    from pallas_kernels.twinlog_gemm_hopper import (TwinLogHopperConfig, twinlog_gemm_hopper,
                                                    twinlog_gemm_hopper_reference, twinlog_hopper_config,
                                                    twinlog_hopper_operands)

    if mode == "none":
        return {}
    wt, consts = twinlog_hopper_operands(tlq.weight.codes, step, offset)
    xb = xq[:m].astype(jnp.bfloat16)
    s1 = sx[:m, 0]
    extra = dict(interpret=gpu_interpret_params(), num_sms=1) if interpret else {}
    base = twinlog_hopper_config(m, n, num_sms=1 if interpret else device_num_sms())
    cfgs = {"": dataclasses.replace(base, **extra)}
    if mode == "all" and m >= 512:
        cfgs.update({suf: TwinLogHopperConfig(**kw, **extra) for suf, kw in HOPPER_ALTERNATES.items()})
    out = {}
    for suf, cfg in cfgs.items():
        def f(a, s, w, c, b, cfg=cfg):
            return twinlog_gemm_hopper(a, s, w, c, bias=b, config=cfg)

        def ref(a, s, w, c, b):
            return twinlog_gemm_hopper_reference(a, s, w, c, bias=b)
        fields = {fld.name: getattr(cfg, fld.name) for fld in dataclasses.fields(cfg) if fld.name != "interpret"}
        out["gemm_twinlog_hopper_w4a8" + suf] = (jax.jit(f), (xb, s1, wt, consts, tlq.bias),
                                                 "interpret" if interpret else "kernel", ref, fields)
    return out


def bench_shape(model, layer, m, k, n, *, timer, interpret, rows, check, hopper="none"):
    import jax
    import jax.numpy as jnp
    from jaxdq import backend
    from pallas_kernels.int_gemm import GemmConfig, int_gemm
    from pallas_kernels.quantize_act import quantize_act_reference
    from pallas_kernels.twinlog_gemm import kernel_table, twinlog_gemm, twinlog_gemm_config, twinlog_gemm_reference

    t0 = time.perf_counter()
    lay, tlq, uni = layers(k, n, seed=m + 3 * k + 7 * n)
    x = jax.random.normal(jax.random.key(m), (m, k), jnp.float32).astype(jnp.bfloat16)
    tcfg = twinlog_gemm_config(m, interpret=interpret)
    mp = -(-m // tcfg.block_m) * tcfg.block_m                      # the twin-log kernel's row padding
    bm_u = 128 if m >= 128 else 64
    mpu = -(-m // bm_u) * bm_u                                     # the Triton W4A8 kernel's
    xq, sx, _ = quantize_act_reference(jnp.pad(x, ((0, max(mp, mpu) - m), (0, 0))))
    step, offset = kernel_table(*tlq.weight.params)
    wb = lay.kernel.astype(jnp.bfloat16)
    pol = backend.policy("kernels", interpret=interpret)
    flops = 2.0 * m * k * n
    shape = f"{m}x{k}x{n}"

    def tl_gemm(a, s, c, st, of, b):
        return twinlog_gemm(a, s, c, st, of, bias=b, config=tcfg)

    variants = {
        "xla_bf16": (jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16)), (x, wb), "xla"),
        "gemm_twinlog_w4a8": (jax.jit(tl_gemm), (xq[:mp], sx[:mp], tlq.weight.codes, step, offset, tlq.bias),
                              "kernel"),
        "gemm_triton_w4a8": (jax.jit(lambda a, s, c, sw, b: int_gemm(
            a, c, s, sw, bias=b, packed=True, config=GemmConfig(block_m=bm_u, interpret=interpret))),
            (xq[:mpu], sx[:mpu], uni.weight.codes, uni.weight.scale, uni.bias), "kernel"),
        "linear_twinlog_w4a8": (jax.jit(lambda q, a: backend.execute(q, a, pol)), (tlq, x), backend.choose(tlq, m, pol)),
        "linear_uniform_w4a8": (jax.jit(lambda q, a: backend.execute(q, a, pol)), (uni, x), backend.choose(uni, m, pol)),
    }
    hop = {}
    if hopper != "none":  # (main: "none" unless on sm_90 or in the CPU dry run)
        try:
            hop = hopper_variants(m, n, xq, sx, tlq, step, offset, mode=hopper, interpret=interpret)
        except Exception as e:  # noqa: BLE001  (an import or operand error must not lose the other rows)
            rows.append({"model": model, "layer": layer, "shape": shape, "M": m, "K": k, "N": n,
                         "variant": "gemm_twinlog_hopper_w4a8", "error": f"{type(e).__name__}: {str(e)[:400]}"})
            traceback.print_exc()
    order = list(variants)  # the Hopper rows right after the Triton twin-log kernel's
    order[order.index("gemm_twinlog_w4a8") + 1:order.index("gemm_twinlog_w4a8") + 1] = list(hop)
    variants.update({name: h[:3] for name, h in hop.items()})
    variants = {name: variants[name] for name in order}
    base = None
    for name, (f, args, impl) in variants.items():
        row = {"model": model, "layer": layer, "shape": shape, "M": m, "K": k, "N": n, "variant": name, "impl": impl}
        if name in hop:
            row["config"] = hop[name][4]
        try:
            ms, how = timer(f, *args)
            row.update(time_ms=ms, timing=how, tops=flops / (ms * 1e-3) / 1e12)
            if name == "xla_bf16":
                base = ms
            if base:
                row["speedup_vs_xla_bf16"] = base / ms
            if check and name == "gemm_twinlog_w4a8":
                want = twinlog_gemm_reference(xq[:mp], sx[:mp], tlq.weight.codes, step, offset, bias=tlq.bias)
                row["rel_err_vs_reference"] = rel_err(f(*args), want)
            if check and name in hop:
                got = f(*args)
                want = twinlog_gemm_reference(xq[:m], sx[:m], tlq.weight.codes, step, offset, bias=tlq.bias)
                row["rel_err_vs_reference"] = rel_err(got, want)
                row["rel_err_vs_hopper_reference"] = rel_err(got, hop[name][3](*args))
            if check and name == "linear_twinlog_w4a8":
                row["rel_err_vs_fake_quant"] = rel_err(f(*args), backend.execute(tlq, x.astype(jnp.float32),
                                                                               backend.REFERENCE))
        except Exception as e:  # noqa: BLE001  (one failing variant must not lose the others)
            row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
            traceback.print_exc()
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"# {shape} done in {time.perf_counter() - t0:.1f} s", flush=True)


# ----------------------------------------------------------------------------- PTX probe
def probe_child(dump: str) -> None:
    """(child process, XLA_FLAGS set by the parent) compile the twin-log kernel at the
    probe shapes, then count the tensor-core instructions in each dumped kernel entry."""
    import jax
    import jax.numpy as jnp
    from pallas_kernels.twinlog_gemm import twinlog_gemm, twinlog_gemm_config

    k, n = PROBE_KN
    out = {"probe_K_N": [k, n], "by_M": {}}
    for m in PROBE_M:
        cfg = twinlog_gemm_config(m)
        mp = -(-m // cfg.block_m) * cfg.block_m

        def twinlog_ptx_probe(a, s, c, st, of, cfg=cfg):
            return twinlog_gemm(a, s, c, st, of, config=cfg)

        before = set(glob.glob(os.path.join(dump, "*.ptx")))
        args = (jnp.ones((mp, k), jnp.int8), jnp.ones((mp, 1), jnp.float32), jnp.zeros((k, n // 2), jnp.uint8),
                jnp.full((2, n), 0.5, jnp.float32), jnp.full((2, n), -4.0, jnp.float32))
        jax.block_until_ready(jax.jit(twinlog_ptx_probe)(*args))
        new = sorted(set(glob.glob(os.path.join(dump, "*.ptx"))) - before)
        entry = {"block_m": cfg.block_m, "num_warps": cfg.num_warps, "ptx_files": [os.path.basename(p) for p in new]}
        text = "".join(open(p).read() for p in new)
        # the kernel's own .entry (Pallas names it jaxdq_twinlog_gemm); else the whole dump
        blocks = [b for b in re.split(r"(?=\.visible \.entry|\.entry )", text) if "twinlog" in b[:400]]
        body = "".join(blocks) or text
        entry["kernel_entry_found"] = bool(blocks)
        entry["wgmma.mma_async"] = body.count("wgmma.mma_async")
        entry["mma.sync"] = body.count("mma.sync")
        entry["ex2.approx"] = body.count("ex2.approx")
        entry["main_loop_instruction"] = ("wgmma" if entry["wgmma.mma_async"] else "mma.sync" if entry["mma.sync"]
                                          else "none found")
        out["by_M"][str(m)] = entry
    with open(os.path.join(dump, "probe.json"), "w") as fh:
        json.dump(out, fh, indent=1)


def _dump_summary(texts: dict) -> dict:
    """Tensor-core and SFU instruction counts in Mosaic GPU's dumps ``{name: text}``: the PTX
    ``wgmma.mma_async`` forms, SASS ``HGMMA`` forms, ``ex2`` / ``MUFU.EX2``, ptxas spill lines."""
    import collections

    ptx, sass, spills = collections.Counter(), collections.Counter(), []
    ex2 = mufu = 0
    for text in texts.values():
        ptx.update(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k\d+\.[\w.]+?)\s", text))
        sass.update(re.findall(r"\bHGMMA\.(\S+)", text))
        ex2 += text.count("ex2.approx")
        mufu += text.count("MUFU.EX2")
        spills += [ln.strip() for ln in text.splitlines()  # (not the MLIR line that embeds the ELF binary)
                   if len(ln) < 400 and ("spill" in ln or re.search(r"Used \d+ registers", ln))]
    main = ptx.most_common(1)[0][0] if ptx else (("HGMMA." + sass.most_common(1)[0][0]) if sass else "none found")
    return {"main_loop_instruction": main, "ptx_wgmma_forms": dict(ptx), "sass_hgmma_forms": dict(sass),
            "ptx_ex2.approx": ex2, "sass_MUFU.EX2": mufu, "ptxas_lines": spills[:20]}


def probe_hopper_child(dump: str) -> None:
    """(child process, MOSAIC_GPU_DUMP_* set by the parent) compile the Hopper twin-log kernel at
    the probe shapes and summarize the dumped PTX / SASS / ptxas output of each compile."""
    import io
    from contextlib import redirect_stdout

    import jax
    import jax.numpy as jnp
    from pallas_kernels.int_gemm_hopper import device_num_sms
    from pallas_kernels.twinlog_gemm_hopper import MAIN_LOOP_INSTRUCTION, twinlog_gemm_hopper, twinlog_hopper_config

    k, n = PROBE_KN
    out = {"from_code": MAIN_LOOP_INSTRUCTION, "probe_K_N": [k, n], "by_M": {}}
    if not is_sm90(jax.devices()[0]):
        out["note"] = f"not an sm_90 device ({jax.devices()[0].device_kind}): nothing compiled"
    mosaic = os.path.join(dump, "mosaic")
    listing = lambda: {os.path.join(r, f) for r, _, fs in os.walk(mosaic) for f in fs}  # noqa: E731
    for m in PROBE_M if "note" not in out else ():
        cfg = twinlog_hopper_config(m, n, num_sms=device_num_sms())

        def twinlog_hopper_probe(a, s, w, c, cfg=cfg):
            return twinlog_gemm_hopper(a, s, w, c, config=cfg)
        before = listing()
        buf = io.StringIO()
        with redirect_stdout(buf):
            jax.block_until_ready(jax.jit(twinlog_hopper_probe)(
                jnp.ones((m, k), jnp.bfloat16), jnp.ones((m,), jnp.float32), jnp.zeros((n, k), jnp.int4),
                jnp.ones((8, n), jnp.float32)))
        new = sorted(listing() - before)
        texts = {os.path.relpath(p, dump): open(p, errors="replace").read() for p in new
                 if os.path.getsize(p) < 64 << 20}
        texts["stdout"] = buf.getvalue()
        entry = {"config": {kk: v for kk, v in vars(cfg).items() if kk != "interpret"}, "dump_files": sorted(texts)}
        entry.update(_dump_summary(texts))
        out["by_M"][str(m)] = entry
    with open(os.path.join(dump, "hopper_probe.json"), "w") as fh:
        json.dump(out, fh, indent=1)


def _run_child(flag: str, dump: str, env: dict, timeout: int, result: str, post=None) -> dict:
    """This script as a child process (``flag dump``) with ``env``; the JSON it wrote to
    ``dump/result``, passed through ``post(out, completed)`` if given; ``{"error": ...}`` on failure."""
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), flag, dump], env=env,
                           capture_output=True, text=True, timeout=timeout)
        if r.returncode:
            return {"error": f"{flag[2:]} rc={r.returncode}: {r.stderr[-1500:]}"}
        with open(os.path.join(dump, result)) as fh:
            out = json.load(fh)
        return post(out, r) if post else out
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def run_hopper_probe(dump: str) -> dict:
    os.makedirs(os.path.join(dump, "mosaic"), exist_ok=True)
    env = dict(os.environ, MOSAIC_GPU_DUMP_TO=os.path.join(dump, "mosaic"), MOSAIC_GPU_DUMP_PTX="1",
               MOSAIC_GPU_DUMP_SASS="1", MOSAIC_GPU_DUMP_PTXAS="1")

    def with_child_output(out, r):  # dumps written to the process's own stdout / stderr (C++ streams)
        out["child_output"] = _dump_summary({"child": r.stdout + r.stderr})
        return out

    return _run_child("--probe-hopper-child", dump, env, 180, "hopper_probe.json", with_child_output)


def run_probe(dump: str) -> dict:
    os.makedirs(dump, exist_ok=True)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={dump} "
                        "--xla_dump_hlo_module_re=.*twinlog_ptx_probe.*").strip()
    return _run_child("--probe-child", dump, env, 60, "probe.json")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--only", default="", help="comma-separated indices into SHAPES")
    p.add_argument("--ptx", default="", help="dump the twin-log kernel's PTX here and record its MMA instruction")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="CPU check of this script: two tiny shapes, Pallas-Triton interpreted, 2 reps")
    p.add_argument("--hopper", choices=("all", "default", "none"), default="all",
                   help="Hopper twin-log kernel rows (sm_90, or interpreted in --cpu-dry-run): default tiles "
                        "and the M >= 512 alternates, the default tiles only, or none")
    p.add_argument("--probe-child", default="", help=argparse.SUPPRESS)
    p.add_argument("--probe-hopper-child", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.probe_child:
        probe_child(a.probe_child)
        return
    if a.probe_hopper_child:
        probe_hopper_child(a.probe_hopper_child)
        return
    if not a.out:
        p.error("--out is required")
    probe = run_probe(a.ptx) if a.ptx and not a.cpu_dry_run else None   # before this process starts jax
    hprobe = run_hopper_probe(a.ptx) if a.ptx and not a.cpu_dry_run and a.hopper != "none" else None
    if a.cpu_dry_run:  # the Mosaic GPU interpreter's 3 warpgroups need 3+ XLA CPU pool threads
        os.environ.setdefault("PJRT_NPROC", "8")

    import jax
    shapes = DRY_SHAPES if a.cpu_dry_run else SHAPES
    reps = 2 if a.cpu_dry_run else a.reps
    if a.only:
        shapes = [shapes[int(i)] for i in a.only.split(",")]
    dev = jax.devices()[0]
    interpret = a.cpu_dry_run or dev.platform != "gpu"
    hopper = a.hopper if (a.cpu_dry_run or is_sm90(dev)) else "none"
    try:
        from pallas_kernels.twinlog_gemm_hopper import MAIN_LOOP_INSTRUCTION
    except ImportError:  # pragma: no cover  (no Mosaic GPU in this jax)
        MAIN_LOOP_INSTRUCTION, hopper = None, "none"
    meta = {"command": " ".join(["python3"] + sys.argv), "jax": jax.__version__, "device": str(dev.device_kind),
            "platform": dev.platform, "interpret": interpret, "reps": reps, "statistic": "median",
            "main_loop_instruction": (probe or {}).get("by_M", {}) if probe and "by_M" in probe else
            (probe or {"note": "not probed (run with --ptx DIR on the GPU)"}),
            "hopper_main_loop_instruction": hprobe or {"from_code": MAIN_LOOP_INSTRUCTION,
                                                       "note": "not probed (run with --ptx DIR on an sm_90 GPU)"},
            "hopper_rows": hopper,
            "notes": "twin-log GEMM: 4-bit log codes decoded in registers (exp2 per weight) to bf16, tl.dot bf16 "
                     "x bf16 -> f32 (int8 activation codes converted to bf16, exact); uniform W4A8: int4 codes "
                     "unpacked to int8, int8 x int8 -> int32. linear_* include the quantize kernel and the "
                     "backend's padding; impl = backend.choose(layer, M, policy('kernels')). Weights random "
                     "(t4), twin-log params by min-max; the timing does not depend on the values. "
                     "gemm_twinlog_hopper_*: Mosaic GPU warp-specialized kernel, log codes decoded without exp2 "
                     "(bit selects + 3 f32 multiplies) to bf16 in registers, stored to SMEM, bf16 wgmma -> f32; "
                     "operands (int4 [N, K] codes, 8 decode constants per column, bf16 activation codes) made "
                     "outside the timed call; config per row."}
    print(json.dumps(meta), flush=True)
    timer = make_timer(reps)
    rows: list = []
    for s in shapes:
        bench_shape(*s, timer=timer, interpret=interpret, rows=rows, check=not a.no_check, hopper=hopper)
        with open(a.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print(f"{'shape':>18} {'model/layer':>22} {'variant':>34} {'impl':>9} {'ms':>9} {'x bf16':>7}")
    for r in rows:
        lab = f"{r['model']}/{r['layer']}"
        if "time_ms" in r:
            print(f"{r['shape']:>18} {lab:>22} {r['variant']:>34} {r['impl']:>9} {r['time_ms']:9.4f} "
                  f"{r.get('speedup_vs_xla_bf16', float('nan')):7.2f}")
        else:
            print(f"{r['shape']:>18} {lab:>22} {r['variant']:>34} ERROR {r.get('error', '')[:80]}")
    bad = [r for r in rows if "error" in r]
    if bad:
        sys.exit(f"{len(bad)} variant(s) failed")


if __name__ == "__main__":
    main()
