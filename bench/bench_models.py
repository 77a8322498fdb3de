"""bf16 float baselines at real sizes (random weights): jitted latency of one sampling step and peak memory.

One model per process (peak memory is per process):

    python bench/bench_models.py --model dit-xl2-256 --out results.jsonl

A step is one network evaluation as the sampler makes it: the CFG-doubled batch
(class/text conditional + unconditional) for DiT, PixArt and SD, the guidance-
distilled single batch for FLUX.1-dev, plus the guidance combination.  Reported:
median of ``--reps`` timed steps after warm-up, compile time, weight bytes and the
device's peak bytes in use.

:func:`setup` is shared with ``bench_e2e.py`` / ``diag_layers.py``: its step binds the
params to an execution policy (:func:`jaxdq.backend.bind`, inside the jitted step), so
a quantized tree runs the way the policy says.  ``--smoke``: the same model family with
a tiny width and depth (CPU check of this script; what it measures means nothing).
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

from bench.quiet_gpu import QuietGPU  # noqa: E402
from jaxdq.backend import REFERENCE, Policy, bind  # noqa: E402

BF16 = jnp.bfloat16
#: --smoke: width/depth overrides per family (token counts kept where cheap)
TINY = {
    "dit": dict(hidden_size=128, depth=1, num_heads=2),
    "pixart": dict(hidden_size=128, depth=1, num_heads=2, sample_size=32),
    "unet": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=8, sample_size=16),
    "flux": dict(num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=4,
                 axes_dims_rope=(8, 12, 12)),
}


def random_params(init_fn, key, std=0.02):
    """bf16 params with the shapes of ``init_fn(key)`` without running the float32 init."""
    shapes = jax.eval_shape(init_fn, key)
    leaves, tree = jax.tree_util.tree_flatten(shapes)
    gen = jax.jit(lambda k, shape: (std * jax.random.normal(k, shape, jnp.float32)).astype(BF16),
                  static_argnums=1)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(tree, [gen(k, tuple(l.shape)) for k, l in zip(keys, leaves)])


def setup(name: str, batch: int, make_params=random_params, attention: str = "float32",
          policy: Policy = REFERENCE, tiny: bool = False):
    """``(params, step, x, roles)`` of model ``name``; ``make_params(init_fn, key)`` builds the
    params from the model's init function (default: random bf16 without the float32 init);
    ``roles``: linear path → role tag; ``attention``: the transformers' attention
    implementation (:mod:`jaxdq.models.attention`; the UNet has only "float32");
    ``policy``: how the quantized layers of a quantized tree execute (the step binds it,
    inside the caller's jit; the default reference policy leaves a float tree as it is);
    ``tiny``: the family's :data:`TINY` width and depth (``--smoke``)."""
    if name.startswith("sd15") and attention != "float32":
        raise ValueError(f"{name} has only the float32 attention, got {attention!r}")
    key = jax.random.PRNGKey(0)
    r = lambda *s: jax.random.normal(jax.random.PRNGKey(len(s)), s, jnp.float32).astype(BF16)  # noqa: E731
    small = lambda fam: TINY[fam] if tiny else {}  # noqa: E731
    if name == "dit-xl2-256":
        from jaxdq.models.dit import DiT, dit_config, init_dit, layer_roles

        cfg = dit_config("DiT-XL/2", attention=attention, **small("dit"))
        params = make_params(lambda k: init_dit(cfg, k), key)
        m = DiT(cfg)
        x, y = r(batch, 4, 32, 32), jnp.arange(batch) % 1000
        lab = jnp.concatenate([y, jnp.full_like(y, 1000)])

        def step(p, x, t):
            out = m.apply({"params": bind(p, policy)}, jnp.concatenate([x, x]), jnp.concatenate([t, t]), lab)
            c, u = out[:batch, :4], out[batch:, :4]
            return u + 4.0 * (c - u)
        return params, step, x, layer_roles(cfg)
    if name == "pixart-sigma-1024":
        from jaxdq.models.pixart import PixArt, init_pixart, layer_roles, pixart_config

        cfg = pixart_config("PixArt-sigma-1024", attention=attention, **small("pixart"))
        params = make_params(lambda k: init_pixart(cfg, k), key)
        m = PixArt(cfg)
        x = r(batch, 4, cfg.sample_size, cfg.sample_size)
        states = jnp.concatenate([r(batch, 300, 4096), jnp.zeros((batch, 300, 4096), BF16)])
        mask = jnp.ones((2 * batch, 300), jnp.int32)

        def step(p, x, t):
            out = m.apply({"params": bind(p, policy)}, jnp.concatenate([x, x]), jnp.concatenate([t, t]), states,
                          mask)
            c, u = out[:batch, :4], out[batch:, :4]
            return u + 4.5 * (c - u)
        return params, step, x, layer_roles(cfg)
    if name == "sd15-unet-512":
        from jaxdq.models.unet import UNet, init_unet, layer_roles, unet_config

        cfg = unet_config("sd-1.5", **small("unet"))
        params = make_params(lambda k: init_unet(cfg, k), key)
        m = UNet(cfg)
        x = r(batch, 4, cfg.sample_size, cfg.sample_size)
        states = jnp.concatenate([r(batch, 77, 768), jnp.zeros((batch, 77, 768), BF16)])

        def step(p, x, t):
            out = m.apply({"params": bind(p, policy)}, jnp.concatenate([x, x]), jnp.concatenate([t, t]), states)
            c, u = out[:batch], out[batch:]
            return u + 7.5 * (c - u)
        return params, step, x, layer_roles(cfg)
    if name.startswith("flux1-dev"):
        from jaxdq.models.flux import Flux, flux_config, image_ids, init_flux, layer_roles, text_ids

        res = int(name.rsplit("-", 1)[1])
        cfg = flux_config("flux1-dev", attention=attention, **small("flux"))
        params = make_params(lambda k: init_flux(cfg, k), key)
        m = Flux(cfg)
        h = 16 if tiny else res // 8
        seq = (h // 2) ** 2
        n_txt = 32 if tiny else 512
        x = r(batch, seq, 64)
        txt, pooled = r(batch, n_txt, 4096), r(batch, 768)
        ii, ti = jnp.asarray(image_ids(h, h)), jnp.asarray(text_ids(n_txt))
        g = jnp.full((batch,), 3.5, jnp.float32)

        def step(p, x, t):
            return m.apply({"params": bind(p, policy)}, x, txt, pooled, t.astype(jnp.float32) / 1000, ii, ti, g)
        return params, step, x, layer_roles(cfg)
    raise ValueError(f"unknown model {name}")


def time_step(f, params, x, t, reps, quiet=None):
    """Compile + run the jitted step once, then ``reps`` timed calls (inside
    ``quiet.timing()`` when a :class:`bench.quiet_gpu.QuietGPU` is given: the GPU shared by
    parallel benchmark processes, the timing alone on it).
    Returns ``(out, compile_s, times_s, peak_device_bytes)``."""
    t0 = time.time()
    out = jax.block_until_ready(f(params, x, t))
    compile_s = time.time() - t0
    times = []
    with (quiet or QuietGPU(None)).timing():
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(params, x, t))
            times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    return out, compile_s, times, stats.get("peak_bytes_in_use")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=1, help="images per step (CFG doubles the network batch)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of this script: the model family at a tiny width and depth")
    args = ap.parse_args()
    t0 = time.time()
    params, step, x, _ = setup(args.model, args.batch, tiny=args.smoke)
    jax.block_until_ready(params)
    build = time.time() - t0
    wbytes = int(sum(l.size * l.dtype.itemsize for l in jax.tree_util.tree_leaves(params)))
    t = jnp.full((args.batch,), 500, jnp.int32)
    _, compile_s, times, peak = time_step(jax.jit(step), params, x, t, args.reps)
    row = {"model": args.model, "dtype": "bfloat16", "batch_images": args.batch,
           "step_ms_median": round(1e3 * float(np.median(times)), 3), "step_ms_min": round(1e3 * min(times), 3),
           "compile_s": round(compile_s, 1), "weights_build_s": round(build, 1), "weight_bytes": wbytes,
           "peak_device_bytes": peak, "device": str(jax.devices()[0]),
           "jax": jax.__version__, "reps": args.reps,
           "command": f"python bench/bench_models.py --model {args.model} --batch {args.batch} --out OUT"
                      + (" --smoke" if args.smoke else "")}
    if args.smoke:
        row["smoke"] = True
    emit(row, args.out)


def emit(row: dict, path: str) -> None:
    """Print ``row`` and append it to the JSON-lines file ``path`` (every bench's row writer)."""
    print(json.dumps(row), flush=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
