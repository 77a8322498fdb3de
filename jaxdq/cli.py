"""``jaxdq`` command line: convert | quantize | sample | export | load | compare | demo.

With no command it runs ``demo`` on the default model: quantizes it (W8A8
ViDiT-Q baseline, W4A8, and the naive static per-tensor contrast), samples each
from the same noise, and writes a side-by-side PNG plus a table of PSNR against
the float samples and weight bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

EXPECTED_ERRORS = (ValueError, FileNotFoundError, KeyError, OSError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"jaxdq: error: {message} (see 'jaxdq --help')\n")


def _classes(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"classes must be comma-separated integers, got {text!r}")


def _add_sampling(p):
    p.add_argument("--classes", type=_classes, default=list(range(10)),
                   help="comma-separated class ids, one grid row each (default 0..9)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class")
    p.add_argument("--solver", default="ddim", help="ddim | ddpm | dpm++2m")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=4.0, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from jaxdq.quant.recipes import METHODS

    ap = _Parser(prog="jaxdq", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", parser_class=_Parser)

    p = sub.add_parser("demo", help="quantize the model, sample FP vs quantized, write PNG + table")
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="jaxdq_out", help="output directory")
    p.add_argument("--methods", default="w8a8,w4a8,naive", help=f"comma-separated, from {', '.join(METHODS)}")
    _add_sampling(p)
    p.set_defaults(per_class=6)

    from jaxdq.models.registry import ARCH_NAMES

    p = sub.add_parser("convert", help="PyTorch checkpoint → jaxdq (orbax) checkpoint")
    p.add_argument("path", help=".safetensors/.pt/.pth/.bin file or diffusers folder")
    p.add_argument("--model", default="dit", choices=ARCH_NAMES, metavar="FAMILY",
                   help=f"model family: {', '.join(ARCH_NAMES)}")
    p.add_argument("--config", default=None,
                   help="named config (e.g. PixArt-sigma-1024, sd-1.5, flux1-dev) or a config.json path, "
                        "for checkpoints without their own config.json")
    p.add_argument("--out", required=True)
    p.add_argument("--num-heads", type=int, default=None, help="needed when the checkpoint has no config")

    for name, text in (("quantize", "quantize a model and export the checkpoint"),
                       ("export", "export a model (optionally quantized) as an orbax checkpoint")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--model", default="default")
        p.add_argument("--method", required=name == "quantize", choices=list(METHODS) if name == "quantize"
                       else list(METHODS) + ["float"], default=None if name == "quantize" else "float",
                       metavar="METHOD", help=f"one of {', '.join(METHODS)}")
        p.add_argument("--out", required=True)
        p.add_argument("--num-heads", type=int, default=None)
        p.add_argument("--calib-per-class", type=int, default=4)

    p = sub.add_parser("sample", help="sample a PNG grid (one row per class)")
    p.add_argument("--model", default="default")
    p.add_argument("--out", default="samples.png")
    p.add_argument("--num-heads", type=int, default=None)
    _add_sampling(p)

    from jaxdq.compare import DEFAULT_METHODS

    p = sub.add_parser("compare", help="float vs every method from the same noise: metrics table (md+json) + PNG")
    p.add_argument("--model", default="default", help="'default', a jaxdq checkpoint or a PyTorch DiT checkpoint")
    p.add_argument("--out", default="jaxdq_compare", help="output directory")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--calib-per-class", type=int, default=4)
    _add_sampling(p)
    p.set_defaults(per_class=10)

    p = sub.add_parser("load", help="load a jaxdq checkpoint and print its metadata and layers")
    p.add_argument("path")
    return ap


def _cmd_convert(args):
    from jaxdq.pipeline import convert_model, save_model, weight_bytes

    model = convert_model(args.path, args.model, config=args.config, num_heads=args.num_heads)
    path = save_model(args.out, model)
    print(f"converted {args.model} {args.path} → {path}  ({weight_bytes(model.params) / 1e6:.1f} MB of weights)")


def _cmd_export(args):
    from jaxdq.pipeline import load_model, quantize_model, save_model, weight_bytes

    model = quantize_model(load_model(args.model, num_heads=args.num_heads), args.method, args.calib_per_class)
    path = save_model(args.out, model)
    print(f"wrote {path}  ({args.method}, {weight_bytes(model.params) / 1e6:.2f} MB of weights)")


def _cmd_load(args):
    from jaxdq.pipeline import load_model, weight_bytes
    from jaxdq.quant.rules import summarize

    model = load_model(args.path)
    meta = {k: v for k, v in model.metadata.items() if k != "layers"}
    print(json.dumps(meta, indent=1))
    for row in summarize(model.params):
        print(f"  {row['path']:<40s} {str(row['shape']):>14s}  {row['bits']:>6s}  {row['weight_bytes']:>9d} B")
    print(f"total weight bytes: {weight_bytes(model.params)}")


def _cmd_sample(args):
    import jax
    import numpy as np

    from jaxdq.pipeline import load_model, make_sampler, noise_and_labels
    from jaxdq.viz import grid, write_png

    model = load_model(args.model, num_heads=args.num_heads)
    model.require_dit("jaxdq sample")
    _check_classes(args.classes, model.config.num_classes)
    x_T, y = noise_and_labels(model.config, args.classes, args.per_class, args.seed)
    run = make_sampler(model.config, solver=args.solver, num_steps=args.steps, cfg_scale=args.cfg, progress=True)
    t0 = time.time()
    x0 = np.asarray(jax.block_until_ready(run(model.params, x_T, y, jax.random.PRNGKey(args.seed + 1))))
    rows = [x0[i * args.per_class:(i + 1) * args.per_class] for i in range(len(args.classes))]
    write_png(args.out, grid(rows, upscale=max(1, 64 // model.config.input_size)))
    print(f"wrote {args.out}  ({x0.shape[0]} samples, {time.time() - t0:.1f}s)")


def _check_classes(classes, num_classes):
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad or not classes:
        raise ValueError(f"classes must be in [0, {num_classes}); got {classes}")


def _cmd_demo(args):
    import jax
    import numpy as np

    from jaxdq.metrics import psnr
    from jaxdq.pipeline import load_model, make_sampler, noise_and_labels, quantize_model, weight_bytes
    from jaxdq.quant.recipes import METHODS
    from jaxdq.viz import grid, labeled, side_by_side, write_png

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    model = load_model(args.model)
    _check_classes(args.classes, model.config.num_classes)
    os.makedirs(args.out, exist_ok=True)
    x_T, y = noise_and_labels(model.config, args.classes, args.per_class, args.seed)
    run = make_sampler(model.config, solver=args.solver, num_steps=args.steps, cfg_scale=args.cfg, progress=True)
    key = jax.random.PRNGKey(args.seed + 1)
    results, images = [], {}
    for name in ["float"] + methods:
        print(f"[{name}] {'quantizing' if name != 'float' else 'float model'}", file=sys.stderr)
        m = quantize_model(model, name, calib_per_class=2)
        t0 = time.time()
        x0 = np.asarray(jax.block_until_ready(run(m.params, x_T, y, key)))
        images[name] = x0
        results.append({"method": name, "description": "float32 reference" if name == "float" else METHODS[name],
                        "psnr_vs_float_db": None if name == "float" else round(psnr(x0, images["float"]), 2),
                        "weight_bytes": weight_bytes(m.params), "sampling_seconds": round(time.time() - t0, 2)})
    fp_bytes = results[0]["weight_bytes"]
    for r in results:
        r["compression_vs_fp32"] = round(fp_bytes / r["weight_bytes"], 2)
    # one panel per method, side by side: rows are classes, same noise in the same cell
    n = args.per_class
    up = max(1, 48 // model.config.input_size)
    panels = []
    for r in results:
        title = r["method"] if r["psnr_vs_float_db"] is None else f"{r['method']} {r['psnr_vs_float_db']:.1f}dB"
        panels.append(labeled(grid([images[r["method"]][i * n:(i + 1) * n] for i in range(len(args.classes))],
                                   upscale=up), title))
    side = side_by_side(panels)
    png = os.path.join(args.out, "compare.png")
    write_png(png, side)
    table = _table(results)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump({"model": args.model, "solver": args.solver, "steps": args.steps, "cfg": args.cfg,
                   "seed": args.seed, "classes": args.classes, "per_class": n, "results": results}, f, indent=1)
    print(table)
    print(f"\ncolumns of {png}: {' | '.join(r['method'] for r in results)}")


def _table(results) -> str:
    lines = ["| method | PSNR vs float (dB) | weight bytes | vs FP32 | sampling s |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        ps = "—" if r["psnr_vs_float_db"] is None else f"{r['psnr_vs_float_db']:.2f}"
        lines.append(f"| {r['method']} | {ps} | {r['weight_bytes']:,} | {r['compression_vs_fp32']:.2f}× "
                     f"| {r['sampling_seconds']:.1f} |")
    return "\n".join(lines)


def _cmd_compare(args):
    from jaxdq.compare import markdown_table, run_compare

    res = run_compare(args.model, [m for m in args.methods.split(",") if m], classes=args.classes,
                      per_class=args.per_class, solver=args.solver, num_steps=args.steps, cfg_scale=args.cfg,
                      seed=args.seed, calib_per_class=args.calib_per_class, out_dir=args.out)
    print(markdown_table(res["results"]))
    print(f"\nwrote {os.path.join(args.out, 'compare.md')}, compare.json, compare.png (a row per method)")


COMMANDS = {"demo": _cmd_demo, "compare": _cmd_compare, "convert": _cmd_convert, "quantize": _cmd_export, "export": _cmd_export,
            "sample": _cmd_sample, "load": _cmd_load}


def main(argv=None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["demo"]
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo"] + argv)
    try:
        COMMANDS[args.command](args)
    except EXPECTED_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"jaxdq: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
