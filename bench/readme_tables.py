"""README tables generated from committed JSON, so the README cannot drift from the results.

The README marks each generated table with a pair of comments::

    <!-- generated: KIND PATH -->
    ...table...
    <!-- /generated -->

``KIND`` names a renderer below and ``PATH`` a JSON file under the repository.  Run

    python bench/readme_tables.py          # rewrite README.md's generated tables in place
    python bench/readme_tables.py --check  # exit 1 if any is stale (tests/test_readme.py does this)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdq.compare import markdown_table  # noqa: E402

MARK = re.compile(r"<!-- generated: (\S+) (\S+) -->\n(.*?)<!-- /generated -->", re.S)


def _compare(d: dict) -> str:
    """The comparison table of a ``compare.json`` (``jaxdq compare`` / ``jaxdq demo`` output);
    over several seeds each metric is ``mean ± half-width of its 95% interval``."""
    seeds = d.get("settings", {}).get("seeds") or []
    note = (f"\n\nMean ± 95% interval (Student t) over {len(seeds)} noise seeds ({', '.join(map(str, seeds))})."
            if len(seeds) > 1 else "")
    return markdown_table(d["results"]) + note


#: Metrics an ordering is stated for: (key, label, larger is better).
ORDER_METRICS = (("psnr_db", "PSNR", True), ("ssim", "SSIM", True), ("fd_vs_float", "FD vs float", False))


def _interval(r: dict, key: str):
    v, h = r.get(key), (r.get("ci95") or {}).get(key)
    return None if v is None or h is None else (v - h, v + h)


def separated(a: dict, b: dict, key: str, larger_better: bool = True) -> int:
    """+1 if ``a``'s 95% interval lies wholly on the better side of ``b``'s, −1 if wholly on
    the worse side, 0 if they overlap or either has no interval."""
    ia, ib = _interval(a, key), _interval(b, key)
    if ia is None or ib is None:
        return 0
    if ia[0] > ib[1]:
        return 1 if larger_better else -1
    if ia[1] < ib[0]:
        return -1 if larger_better else 1
    return 0


def _ordering(d: dict) -> str:
    """Generated statements of what a multi-seed ``compare.json`` separates: per bit width and
    metric, the methods whose interval does not separate from the best mean's (the top), and
    the methods below it; an ordering is stated only where 95% intervals do not overlap."""
    rows = [r for r in d["results"] if r["method"] != "float"]
    if not any(r.get("ci95") for r in rows):
        return "_One seed: no intervals, so no ordering is stated._\n"
    fmt = {"psnr_db": "{:.2f}", "ssim": "{:.4f}", "fd_vs_float": "{:.3f}"}
    lines = []
    for bits in dict.fromkeys(r["bits"] for r in rows):
        group = [r for r in rows if r["bits"] == bits]
        for key, label, up in ORDER_METRICS:
            have = [r for r in group if _interval(r, key) is not None]
            if len(have) < 2:
                continue
            best = max(have, key=lambda r: r[key] if up else -r[key])
            top = [r["method"] for r in have if separated(best, r, key, up) == 0]
            below = [r for r in have if separated(best, r, key, up) == 1]
            f = fmt[key]
            show = lambda r: f"{r['method']} ({f.format(r[key])} ± {f.format(r['ci95'][key])})"  # noqa: E731
            text = (f"- **{bits}, {label}**: best mean {show(best)}; not separated from it: "
                    f"{', '.join(m for m in top if m != best['method']) or 'none'}; separated from it and worse: "
                    f"{', '.join(show(r) for r in below) or 'none'}.")
            lines.append(text)
    return "\n".join(lines) + "\n"


def _times(d: dict) -> str:
    """Per bit width, each method's quantization wall time (calibration set, reconstruction;
    the float trajectories shared by every row excluded), from a ``compare.json``."""
    rows = [r for r in d["results"] if r["method"] != "float"]
    lines = []
    for bits in dict.fromkeys(r["bits"] for r in rows):
        cells = ", ".join(f"{r['method'].split('@')[0]} {r['quantize_s']:.1f} s" for r in rows if r["bits"] == bits)
        lines.append(f"- **{bits}**: {cells}.")
    return "\n".join(lines) + "\n"


def _hadamard(rows: list) -> str:
    """``bench/bench_hadamard.py`` JSON lines as a table: per width and tokens, the dispatch-
    amortized time (``loop`` median, µs) of copy / block / full / dense matmul, and full ÷ copy."""
    by = {}
    for r in rows:
        by.setdefault((r["width"], r["tokens"]), {})[r["method"]] = r
    head = ("| width | tokens | copy µs | block Hadamard µs | full Hadamard µs | dense bf16 matmul µs "
            "| full ÷ copy | full GB/s |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    out = [head]
    for (w, t), m in sorted(by.items()):
        us = {k: 1e3 * v["loop"]["median_ms"] for k, v in m.items()}
        if not {"copy", "block", "full", "matmul"} <= set(us):
            continue
        out.append(f"| {w} | {t} | {us['copy']:.1f} | {us['block']:.1f} | {us['full']:.1f} | {us['matmul']:.1f} "
                   f"| {us['full'] / us['copy']:.1f}× | {m['full']['gbps']:.0f} |")
    first = rows[0] if rows else {}
    return "\n".join(out) + (f"\n\n{first.get('device', '')}, jax {first.get('jax', '')}, bf16 `[tokens, width]`; "
                              "`python3 bench/bench_hadamard.py`.\n")


def _attention(d: dict) -> str:
    """``bench/attention_8bit_quality.py`` output: PSNR vs float with the 8-bit attention and
    with float attention (same quantized linears, seeds and noise), and the mean per-seed change."""
    out = ["| attention | method | PSNR vs float, 8-bit attention | PSNR, float attention | mean Δ (dB) | Δ per seed |",
           "|---|---|---:|---:|---:|---|"]
    for r in d["rows"]:
        out.append(f"| {r['attention']} | {r['method']} | {r['psnr_db']:.2f} ± {r['ci95']:.2f} "
                   f"| {r['linear_only_psnr_db']:.2f} ± {r['linear_only_ci95']:.2f} | {r['delta_db_mean']:+.2f} "
                   f"| {', '.join(f'{x:+.2f}' for x in r['delta_db_per_seed'])} |")
    return "\n".join(out) + "\n"


def _label(r: dict) -> str:
    if r.get("framework") == "pytorch":
        return f"PyTorch {r['mode']}"
    att = r.get("attention")
    method = r.get("quant") or r.get("method")
    flags = [f"{att} attention"] if att else []
    if r.get("fuse_epilogue") is False and method != "bf16":
        flags.append("epilogue by XLA")
    elif r.get("fuse_residual") and method != "bf16":
        flags.append("gate · y + residual in the GEMMs too")
    if r.get("compiler_options", {}).get("xla_disable_hlo_passes") == "dot-merger":
        flags.append("dot merger off")
    if r.get("small_m_xla") not in (None, 64):
        flags.append(f"XLA int8 path ≤ {r['small_m_xla']} rows")
    return f"jaxdq {method}" + "".join(f", {f}" for f in flags)


def _steps(rows: list) -> str:
    """One-step benchmark JSON lines (``bench_unet_sd.py``, ``bench_e2e.py``,
    ``bench_torch_anchor.py``): per row the median / min step time, the speed relative to
    the jaxdq bf16 row of the same run (rows grouped by their ``session``), weights, peak
    device memory, and whether the row was timed alone after every process compiled
    (``quiet_gpu``); a failed row shows its error."""
    out = ["| run | configuration | step median ms | step min ms | × jaxdq bf16 | weights GB | peak GB | timed alone |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    base = {}
    for r in rows:
        if r.get("framework") != "pytorch" and (r.get("quant") or r.get("method")) == "bf16" and "step_ms_median" in r:
            base.setdefault(r.get("session", "first"), r["step_ms_median"])
    for r in rows:
        run = r.get("session", "first")
        if "step_ms_median" not in r:
            out.append(f"| {run} | {_label(r)} | failed: {r.get('error', '?')[:80]} | | | | | |")
            continue
        b = base.get(run)
        ratio = f"{b / r['step_ms_median']:.2f}×" if b else "—"
        wb = f"{r['weight_bytes'] / 1e9:.2f}" if r.get("weight_bytes") and r.get("framework") != "pytorch" else "—"
        pk = f"{r['peak_device_bytes'] / 1e9:.2f}" if r.get("peak_device_bytes") else "—"
        q = r.get("quiet_gpu")
        alone = "yes" if q and q.get("all_ready") else ("no (a process was still compiling)" if q else "not recorded")
        out.append(f"| {run} | {_label(r)} | {r['step_ms_median']:.2f} | {r.get('step_ms_min', float('nan')):.2f} "
                   f"| {ratio} | {wb} | {pk} | {alone} |")
    dev = next((r.get("device") for r in rows if r.get("device")), "")
    return "\n".join(out) + f"\n\n{dev}; the command of each row is in the file.\n"


def _progressive(d: dict) -> str:
    """``bench_kernels.py --progressive`` JSON: per GEMM shape the time (µs) of XLA bf16 and the
    Mosaic GPU W8A8 / W4A8 (per channel, float group-64, progressive group-64) kernels, and
    each one's speed relative to bf16."""
    cols = (("pg_xla_bf16", "XLA bf16"), ("pg_mgpu_ws_w8a8", "W8A8"), ("pg_mgpu_ws_w4a8", "W4A8 per channel"),
            ("pg_mgpu_ws_w4a8_g64", "W4A8 float g64"), ("pg_mgpu_ws_w4a8_pg", "W4A8 progressive g64"))
    by = {}
    for r in d["rows"]:
        by.setdefault((r["model"], r["layer"], r["shape"]), {})[r["variant"]] = r["time_ms"]
    out = ["| layer | M×K×N | " + " | ".join(f"{c} µs (× bf16)" for _, c in cols) + " |",
           "|---|---|" + "---:|" * len(cols)]
    for (model, layer, shape), t in by.items():
        b = t.get("pg_xla_bf16")
        cells = [f"{1e3 * t[v]:.1f} ({b / t[v]:.2f}×)" if v in t and b else "—" for v, _ in cols]
        out.append(f"| {model} {layer} | {shape} | " + " | ".join(cells) + " |")
    m = d.get("meta", {})
    return "\n".join(out) + f"\n\n{m.get('device', '')}, jax {m.get('jax', '')}; `{m.get('command', '')}`.\n"


def _gemm8(d: dict) -> str:
    """The GEMM rows of ``bench_fused_norm.py kernels``: per shape, µs of XLA bf16 / int8 / FP8
    and of the Hopper wgmma int8 / FP8 (e4m3) kernels."""
    cols = ("gemm_xla_bf16", "gemm_xla_int8", "gemm_xla_fp8", "gemm_wgmma_int8", "gemm_wgmma_fp8")
    by = {}
    for r in d["rows"]:
        if r["variant"] in cols:
            by.setdefault((r["shape"], r["m"], r["k"], r["n"]), {})[r["variant"]] = r["ms"]
    out = ["| shape | M×K×N | XLA bf16 µs | XLA int8 µs | XLA FP8 µs | wgmma int8 µs | wgmma FP8 µs | FP8 ÷ int8 (wgmma) |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (shape, m, k, n), t in by.items():
        cells = [f"{1e3 * t[c]:.1f}" if c in t else "—" for c in cols]
        ratio = f"{t['gemm_wgmma_fp8'] / t['gemm_wgmma_int8']:.2f}" if {"gemm_wgmma_fp8", "gemm_wgmma_int8"} <= set(t) else "—"
        out.append(f"| {shape} | {m}×{k}×{n} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(out) + f"\n\n{d.get('device', '')}, jax {d.get('jax', '')}; `{d.get('command', '')}`.\n"

def _attention_kernel(d: dict) -> str:
    """``bench/bench_attention.py`` JSON: per attention shape, µs of cuDNN's bf16 flash attention,
    the int8qk path (XLA quantize + the Mosaic GPU kernel) and the kernel alone on ready codes
    (default tuning, and the fastest tuning measured), each with its speed relative to cuDNN,
    and the errors vs float32 attention."""
    by = {}
    for r in d["rows"]:
        if "ms" in r:
            by.setdefault(r["shape"], {})[r["variant"]] = r
    out = ["| shape (B × T_q × T_k × H × d) | cuDNN bf16 µs | int8qk path µs (× cuDNN) | kernel µs (× cuDNN) "
           "| fastest kernel tuning µs (× cuDNN) | rel. error vs float32: cuDNN / int8qk |",
           "|---|---:|---:|---:|---:|---|"]
    for shape, v in by.items():
        c = v.get("cudnn_bf16")
        if c is None:
            continue
        any_r = next(iter(v.values()))
        dims = f"{any_r['B']}×{any_r['Tq']}×{any_r['Tk']}×{any_r['H']}×{any_r['d']}" + (" masked" if any_r["masked"] else "")
        cell = lambda r: f"{1e3 * r['ms']:.1f} ({c['ms'] / r['ms']:.2f}×)" if r else "—"  # noqa: E731
        kern = {k: r for k, r in v.items() if k.startswith("int8qk_kernel")}
        best_name = min(kern, key=lambda k: kern[k]["ms"]) if kern else None
        best = f"{cell(kern[best_name])} `{best_name[len('int8qk_kernel_'):]}`" if best_name else "—"
        path, k0 = v.get("int8qk_bkv128"), v.get("int8qk_kernel_bkv128_pp_s2")
        err = f"{c['rel_err_vs_f32']:.4f} / {(path or k0)['rel_err_vs_f32']:.4f}" if (path or k0) else "—"
        out.append(f"| {shape} {dims} | {1e3 * c['ms']:.1f} | {cell(path)} | {cell(k0)} | {best} | {err} |")
    return "\n".join(out) + f"\n\n{d.get('device', '')}, jax {d.get('jax', '')}, CUPTI kernel time; `{d.get('command', '')}`.\n"


def _twinlog(d: dict) -> str:
    """``bench/bench_twinlog.py`` JSON: per layer shape, µs of XLA bf16, the uniform W4A8 GEMM
    (Pallas-Triton), the twin-log GEMMs (Pallas-Triton; Mosaic GPU at its default tiling and at its fastest
    tiling measured) and each one's speed relative to bf16."""
    by = {}
    for r in d["rows"]:
        by.setdefault((r["model"], r["layer"], r["shape"]), {})[r["variant"]] = r["time_ms"]
    out = ["| layer | M×K×N | XLA bf16 µs | uniform W4A8 GEMM µs (× bf16) | twin-log Triton µs (× bf16) "
           "| twin-log Hopper µs (× bf16) | fastest Hopper tiling µs (× bf16) |", "|---|---|---:|---:|---:|---:|---|"]
    for (model, layer, shape), t in by.items():
        b = t.get("xla_bf16")
        cell = lambda v: f"{1e3 * t[v]:.1f} ({b / t[v]:.2f}×)" if v in t and b else "—"  # noqa: E731
        hop = {k: v for k, v in t.items() if k.startswith("gemm_twinlog_hopper_w4a8")}
        best = min(hop, key=hop.get) if hop else None
        tiling = best[len("gemm_twinlog_hopper_w4a8"):].lstrip("_") or "default" if best else ""
        out.append(f"| {model} {layer} | {shape} | {1e3 * b:.1f} | {cell('gemm_triton_w4a8')} "
                   f"| {cell('gemm_twinlog_w4a8')} | {cell('gemm_twinlog_hopper_w4a8')} "
                   f"| {cell(best) + f' `{tiling}`' if best else '—'} |")
    m = d.get("meta", {})
    hm = m.get("hopper_main_loop_instruction", {})
    instr = f" Hopper main loop: `{hm['from_code']}`." if hm.get("from_code") else ""
    return "\n".join(out) + f"\n\n{m.get('device', '')}, jax {m.get('jax', '')}, median of {m.get('reps', '')};{instr} `{m.get('command', '')}`.\n"


RENDERERS = {"attention": _attention, "compare": _compare, "compare-order": _ordering, "compare-times": _times, "hadamard": _hadamard,
             "steps": _steps, "progressive": _progressive, "gemm8": _gemm8, "attention-kernel": _attention_kernel,
             "twinlog": _twinlog}


def render(kind: str, path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        if path.endswith(".jsonl"):
            data = [json.loads(line) for line in f if line.strip()]
        else:
            data = json.load(f)
    return RENDERERS[kind](data).rstrip("\n") + "\n"


def regenerate(text: str) -> str:
    return MARK.sub(lambda m: f"<!-- generated: {m[1]} {m[2]} -->\n{render(m[1], m[2])}<!-- /generated -->", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if a generated table is stale")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = ap.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    new = regenerate(text)
    if args.check:
        stale = [f"{m[1]} {m[2]}" for m, n in zip(MARK.finditer(text), MARK.finditer(new)) if m[3] != n[3]]
        if stale:
            print("stale generated tables in README.md: " + ", ".join(stale) + " (run python bench/readme_tables.py)")
            return 1
        return 0
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
