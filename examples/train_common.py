"""Shared trainer of jaxdq's default models (DiT, UNet, PixArt text, Latte video).

Objective: DDPM noise prediction on the linear β schedule (1000 steps, β 1e-4 … 0.02), t
uniform; ε-MSE for models that output C channels, DiT's hybrid loss (ε-MSE + the variational
bound for the learned variance, improved DDPM) for models that output 2C (learned sigma).
AdamW (no weight decay) with global-norm clipping 1.0, linear warmup to ``--lr`` over
``min(500, steps // 10)`` steps then cosine decay to ``lr / 10`` at ``--steps``, an EMA of the
weights (optionally with the usual ``min(decay, (1 + n) / (10 + n))`` warmup).  Deterministic
from ``--seed`` (params initialised from ``PRNGKey(seed)``, batch ``n`` from the n-th split).
Time-bounded: ``--max-seconds`` stops the loop (wall time since the loop started, compilation
included), and the record says it did.

Two opt-in settings (off unless a script or the command line turns them on):

* ``--fit-steps`` (with ``--max-seconds``): ``--steps`` becomes an upper bound; at the end of
  the LR warmup (at least 20 steps in) the loop measures its own rate and shortens the schedule
  so that the cosine decay ends inside the time budget (:data:`FIT_MARGIN` of the time left).
  The LR before that point does not depend on the schedule's length, so the same command with
  ``--schedule-steps N`` added (N = the record's ``steps_planned``; nothing measured) repeats the
  run exactly (when the warmup is at least those 20 steps: ``--steps`` ≥ 200).  With
  ``--fit-steps`` the LR is computed in the step from a traced schedule length (the formula of
  optax's ``warmup_cosine_decay_schedule``; the warmup stays ``min(500, --steps // 10)``).
* ``--min-snr-gamma γ``: Min-SNR-γ weighting of the ε-MSE term (Hang et al. 2023), per example
  ``min(SNR_t, γ) / SNR_t`` with ``SNR_t = ᾱ_t / (1 − ᾱ_t)``: the low-noise steps (on this
  schedule, γ = 5: t < 130) count less, so the mid/high-noise steps where the condition
  decides the sample get more of the update.  The logged loss stays the unweighted objective
  (comparable across runs).

A script describes its model as a :class:`Task` and calls :func:`run`, which writes into
``--out``: ``<name>.safetensors`` (EMA weights, float16, Flax paths as keys), ``<name>.json``
(config, exact command, args, loss log, wall times, device, parameter count, sample settings)
and whatever the task's ``sample`` writes (PNG grids, GIFs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdq.models.default import save_default_weights
from jaxdq.sampling import linear_schedule

NUM_TRAIN_TIMESTEPS = 1000


# ---------------------------------------------------------------------------------------------
# losses


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def hybrid_loss(out, x0, xt, t, noise, sched, mse_weight=None):
    """DiT's training loss for learned-sigma models: mse(ε) + VB term (in bits/dim).

    ``out [B, 2C, ...]`` (ε, then the variance interpolation v), ``x0, xt, noise [B, C, ...]``
    (images or videos), ``t [B]``; ``mse_weight [B]`` (optional) weights each example's ε-MSE
    (the VB term is not weighted)."""
    c = x0.shape[1]
    axes = tuple(range(1, x0.ndim))
    eps, v = out[:, :c], out[:, c:]
    mse = jnp.mean((eps - noise) ** 2, axis=axes)
    b = lambda a: a[t].reshape((-1,) + (1,) * (x0.ndim - 1))  # noqa: E731
    betas, acp = sched["betas"], sched["alphas_cumprod"]
    acp_prev = jnp.concatenate([jnp.ones(1), acp[:-1]])
    post_var = betas * (1 - acp_prev) / (1 - acp)
    post_logvar = jnp.log(jnp.concatenate([post_var[1:2], post_var[1:]]))
    c1 = betas * jnp.sqrt(acp_prev) / (1 - acp)
    c2 = (1 - acp_prev) * jnp.sqrt(1 - betas) / (1 - acp)
    true_mean = b(c1) * x0 + b(c2) * xt
    # model mean from a frozen ε (the VB term trains only the variance)
    x0_pred = (xt - b(jnp.sqrt(1 - acp)) * jax.lax.stop_gradient(eps)) / b(jnp.sqrt(acp))
    model_mean = b(c1) * jnp.clip(x0_pred, -1, 1) + b(c2) * xt
    frac = (v + 1) / 2
    model_logvar = frac * b(jnp.log(betas)) + (1 - frac) * b(post_logvar)
    kl = normal_kl(true_mean, b(post_logvar), model_mean, model_logvar)
    kl = jnp.mean(kl, axis=axes) / np.log(2.0)
    # t = 0: Gaussian negative log-likelihood of x0 (continuous stand-in for the discretized decoder)
    nll = 0.5 * (np.log(2 * np.pi) + model_logvar + (x0 - model_mean) ** 2 * jnp.exp(-model_logvar))
    nll = jnp.mean(nll, axis=axes) / np.log(2.0)
    vb = jnp.where(t == 0, nll, kl)
    if mse_weight is not None:
        mse = mse_weight * mse
    return jnp.mean(mse + vb)


def diffusion_loss(out, x0, xt, t, noise, sched, mse_weight=None):
    """ε-MSE for a C-channel output, :func:`hybrid_loss` for a 2C-channel (learned sigma) one;
    ``mse_weight [B]`` (optional): per-example weights of the ε-MSE."""
    c = x0.shape[1]
    if out.shape[1] == 2 * c:
        return hybrid_loss(out, x0, xt, t, noise, sched, mse_weight)
    if out.shape[1] != c:
        raise ValueError(f"model output has {out.shape[1]} channels; expected {c} or {2 * c}")
    if mse_weight is None:
        return jnp.mean((out - noise) ** 2)
    return jnp.mean(mse_weight * jnp.mean((out - noise) ** 2, axis=tuple(range(1, out.ndim))))


def min_snr_weight(t, alphas_cumprod, gamma: float):
    """Min-SNR-γ weight of the ε-MSE at timesteps ``t [B]``: ``min(SNR, γ) / SNR``."""
    acp = alphas_cumprod[t]
    snr = acp / (1.0 - acp)
    return jnp.minimum(snr, gamma) / snr


# ---------------------------------------------------------------------------------------------
# the task a script describes


@dataclasses.dataclass
class Task:
    """One model to train.

    Attributes:
      name: output file stem (``<name>.safetensors``, ``<name>.json``).
      config: the model's config dataclass (recorded with ``dataclasses.asdict``).
      init: ``key -> params`` (float32).
      apply: ``(params, x_t, t, cond) -> out`` (ε, or ε and v for learned sigma).
      data: arrays the batch function reads (moved to the device once, passed to the step).
      batch: ``(data, k_draw, k_drop, batch_size) -> (x0, cond)`` inside jit: draw a batch with
        ``k_draw`` and replace the conditioning by the null condition with probability
        ``drop_prob`` using ``k_drop``.
      sample: ``(ema_params, out_dir, args) -> dict`` writes the sample pictures after
        training and returns what to record about them (settings, file names).
      extra: anything else for the JSON record (e.g. captions used).
    """

    name: str
    config: Any
    init: Callable[[jax.Array], dict]
    apply: Callable[..., jax.Array]
    data: Mapping[str, Any]
    batch: Callable[..., tuple[jax.Array, Any]]
    sample: Callable[[dict, str, argparse.Namespace], dict]
    extra: dict = dataclasses.field(default_factory=dict)


def add_train_args(ap: argparse.ArgumentParser, *, steps: int, batch: int, lr: float = 3e-4, ema: float = 0.9995,
                   ema_warmup: bool = False, log_every: int = 1000, out: str = "out", fit_steps: bool = False,
                   min_snr_gamma: Optional[float] = None) -> argparse.ArgumentParser:
    """The arguments every training script takes (defaults per script)."""
    ap.add_argument("--steps", type=int, default=steps,
                    help="optimizer steps (the LR schedule's length; with --fit-steps an upper bound)")
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--ema", type=float, default=ema, help="EMA decay")
    ap.add_argument("--ema-warmup", action=argparse.BooleanOptionalAction, default=ema_warmup,
                    help="EMA decay min(ema, (1+n)/(10+n)) at step n")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=out)
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop early (and save) once the training loop has run this long")
    ap.add_argument("--log-every", type=int, default=log_every, help="mean loss logged every N steps")
    ap.add_argument("--drop-prob", type=float, default=0.1, help="condition dropout (null condition) for CFG")
    ap.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of the sample pictures")
    ap.add_argument("--sample-steps", type=int, default=50, help="DDIM steps of the sample pictures")
    ap.add_argument("--fit-steps", action=argparse.BooleanOptionalAction, default=fit_steps,
                    help="with --max-seconds: at the end of the LR warmup, shorten the schedule to what the "
                         "measured rate fits into the time left")
    ap.add_argument("--min-snr-gamma", type=float, default=min_snr_gamma,
                    help="Min-SNR-gamma weighting of the eps-MSE (none: unweighted)")
    ap.add_argument("--schedule-steps", type=int, default=None,
                    help="with --fit-steps: replay a fitted run (its record's steps_planned) instead of measuring")
    return ap


def schedule_arrays() -> dict[str, jax.Array]:
    s = linear_schedule()
    return {"betas": jnp.asarray(s.betas, jnp.float32), "alphas_cumprod": jnp.asarray(s.alphas_cumprod, jnp.float32)}


def param_count(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


FIT_MARGIN = 0.95  # --fit-steps plans for this fraction of the time left (the rate wanders by ~±20%)
FIT_MIN_STEPS = 20  # ... and measures the rate over at least this many steps


def warmup_steps(steps: int) -> int:
    return min(500, steps // 10)


def make_optimizer(args) -> optax.GradientTransformation:
    warmup = warmup_steps(args.steps)
    lr = optax.warmup_cosine_decay_schedule(0.0, args.lr, warmup, args.steps, args.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=0.0))


def warmup_cosine_lr(count, total, peak: float, warmup: int):
    """optax's ``warmup_cosine_decay_schedule(0, peak, warmup, total, peak / 10)`` at update
    ``count`` (0-based) with a traced ``total`` (float32 scalar)."""
    end = peak * 0.1
    warm = peak * count / max(warmup, 1)
    frac = jnp.clip((count - warmup) / jnp.maximum(total - warmup, 1.0), 0.0, 1.0)
    cos = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(count < warmup, warm, cos)


def train(task: Task, args) -> tuple[dict, dict]:
    """Run the training loop; returns ``(ema params, record)`` (record: log, steps, timings)."""
    sched = schedule_arrays()
    key = jax.random.PRNGKey(args.seed)
    params = task.init(key)
    fit = bool(getattr(args, "fit_steps", False))  # the LR from a traced schedule length
    gamma = getattr(args, "min_snr_gamma", None)
    warmup = warmup_steps(args.steps)
    opt = (optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1.0, weight_decay=0.0)) if fit
           else make_optimizer(args))
    opt_state = opt.init(params)
    ema = params
    data = jax.device_put(dict(task.data))
    batch_size, decay, warm, peak = args.batch, args.ema, bool(args.ema_warmup), float(args.lr)

    @jax.jit
    def train_step(params, opt_state, ema, key, step, total, data):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        x0, cond = task.batch(data, k1, k2, batch_size)
        t = jax.random.randint(k3, (batch_size,), 0, NUM_TRAIN_TIMESTEPS)
        noise = jax.random.normal(k4, x0.shape)
        acp = sched["alphas_cumprod"][t].reshape((-1,) + (1,) * (x0.ndim - 1))
        xt = jnp.sqrt(acp) * x0 + jnp.sqrt(1 - acp) * noise

        if gamma is None:
            def loss_fn(p):
                loss = diffusion_loss(task.apply(p, xt, t, cond), x0, xt, t, noise, sched)
                return loss, loss
        else:
            w = min_snr_weight(t, sched["alphas_cumprod"], float(gamma))

            def loss_fn(p):
                out = task.apply(p, xt, t, cond)
                return (diffusion_loss(out, x0, xt, t, noise, sched, w),
                        jax.lax.stop_gradient(diffusion_loss(out, x0, xt, t, noise, sched)))

        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        if fit:
            lr = warmup_cosine_lr(step - 1.0, total, peak, warmup)
            updates = jax.tree_util.tree_map(lambda u: lr * u, updates)
        params = optax.apply_updates(params, updates)
        d = jnp.minimum(decay, (1.0 + step) / (10.0 + step)) if warm else decay
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1 - d) * p, ema, params)
        return params, opt_state, ema, loss

    log, running = [], []
    stopped_early, steps_done, first_step_s, fitted = False, 0, None, None
    total = args.steps  # the schedule's length (shortened once by --fit-steps)
    replay = getattr(args, "schedule_steps", None) if fit else None
    if replay is not None:
        if not warmup < replay <= args.steps:
            raise ValueError(f"--schedule-steps {replay} must lie in ({warmup}, --steps {args.steps}]")
        total = int(replay)
    fit_at = max(warmup, FIT_MIN_STEPS) if fit and args.max_seconds and replay is None else None
    check_every = max(1, min(100, args.log_every))
    t0 = time.time()
    step = 0
    while step < total:
        step += 1
        key, sub = jax.random.split(key)
        params, opt_state, ema, loss = train_step(params, opt_state, ema, sub, jnp.float32(step),
                                                  jnp.float32(total), data)
        running.append(loss)
        steps_done = step
        if step == 1:
            jax.block_until_ready(loss)
            first_step_s = time.time() - t0  # compilation + one step
        if step == fit_at and step < total:
            jax.block_until_ready(loss)
            elapsed = time.time() - t0
            rate = (step - 1) / max(elapsed - first_step_s, 1e-6)
            left = args.max_seconds - elapsed
            total = int(min(args.steps, step + max(1, int(rate * left * FIT_MARGIN))))
            fitted = {"at_step": step, "seconds": round(elapsed, 2), "steps_per_second": round(rate, 2),
                      "seconds_left": round(left, 2), "margin": FIT_MARGIN, "upper_bound": args.steps,
                      "steps": total}
            print(f"fit: {rate:.1f} it/s after compilation, {left:.0f}s left -> schedule of {total} steps "
                  f"(upper bound {args.steps})", flush=True)
        if step % args.log_every == 0 or step == total:
            mean = float(jnp.mean(jnp.stack(running)))
            running = []
            log.append({"step": step, "loss": mean, "seconds": round(time.time() - t0, 1)})
            print(f"step {step:6d}  loss {mean:.4f}  {time.time() - t0:.0f}s", flush=True)
            if not np.isfinite(mean):
                raise FloatingPointError(f"loss is {mean} at step {step}")
        if args.max_seconds and step < total and step % check_every == 0:
            jax.block_until_ready(loss)
            if time.time() - t0 > args.max_seconds:
                if running:
                    mean = float(jnp.mean(jnp.stack(running)))
                    log.append({"step": step, "loss": mean, "seconds": round(time.time() - t0, 1)})
                stopped_early = True
                print(f"stopping at step {step}: --max-seconds {args.max_seconds} reached", flush=True)
                break
    jax.block_until_ready(ema)
    train_s = time.time() - t0
    rate = (steps_done - 1) / (train_s - first_step_s) if steps_done > 1 and train_s > first_step_s else None
    info = {"log": log, "steps_done": steps_done, "steps_planned": total, "stopped_early": stopped_early,
            "train_seconds": round(train_s, 2), "first_step_seconds": round(first_step_s or 0.0, 2),
            "steps_per_second_after_first": None if rate is None else round(rate, 2),
            "final_loss": log[-1]["loss"] if log else None}
    if fit:
        info["fit_steps"] = fitted or {"steps": total, "warmup": warmup, "note": (
            "replayed (--schedule-steps)" if replay is not None
            else "not fitted (no --max-seconds, or it ran out first)")}
        info["fit_steps"]["warmup"] = warmup
    return ema, info


def command_line(script: str, argv) -> str:
    return shlex.join(["python", os.path.relpath(script) if os.path.isabs(script) else script] + list(argv))


def run(task: Task, args, argv, script: str) -> dict:
    """Train, then write ``<name>.safetensors``, ``<name>.json`` and the samples into ``args.out``."""
    os.makedirs(args.out, exist_ok=True)
    t_start = time.time()
    ema, info = train(task, args)
    weights_path = save_default_weights(ema, os.path.join(args.out, f"{task.name}.safetensors"))
    t_sample = time.time()
    samples = task.sample(ema, args.out, args)
    sample_s = time.time() - t_sample
    dev = jax.devices()[0]
    record = {"model": task.name, "config": dataclasses.asdict(task.config), "command": command_line(script, argv),
              "args": vars(args), "params": param_count(ema), **info,
              "sample": {**samples, "seconds": round(sample_s, 2)},
              "wall_seconds": round(time.time() - t_start, 2), "device": str(dev),
              "device_kind": getattr(dev, "device_kind", ""), "jax": jax.__version__, **task.extra}
    with open(os.path.join(args.out, f"{task.name}.json"), "w") as f:
        json.dump(record, f, indent=1, default=_jsonable)
    print(f"wrote {weights_path} ({record['params']} params, {info['steps_done']} steps"
          f"{', stopped early' if info['stopped_early'] else ''}, {record['wall_seconds']:.0f}s)", flush=True)
    return record


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


# ---------------------------------------------------------------------------------------------
# sampling helpers shared by the scripts


def ddim_cfg_sample(apply_fn: Callable, params: Any, cond: jax.Array, null: int, x_T: jax.Array, key: jax.Array, *,
                    scale: float, num_steps: int) -> np.ndarray:
    """DDIM + classifier-free guidance on the linear schedule, jitted with ``params`` (any pytree)
    as an argument; ``apply_fn(params, x, t, c)`` takes an int condition index ``c`` (a class
    label or a caption index; ``null`` is the unconditional one)."""
    from jaxdq.sampling import cfg_model_fn, sample

    def go(p, x, k):
        fn = cfg_model_fn(lambda xx, tt, cc: apply_fn(p, xx, tt, cc), cond, null, scale)
        return sample(fn, x, k, schedule=linear_schedule(), solver="ddim", num_steps=num_steps)

    return np.asarray(jax.jit(go)(params, x_T, key))


def ddim_cfg_sampler(apply_fn: Callable, null: int, *, num_steps: int) -> Callable:
    """:func:`ddim_cfg_sample` as one jitted ``fn(params, cond, x_T, key, scale) -> x0`` with a
    traced guidance ``scale`` (a CFG sweep compiles once per batch shape)."""
    from jaxdq.sampling import cfg_model_fn, sample

    @jax.jit
    def go(p, cond, x, k, scale):
        fn = cfg_model_fn(lambda xx, tt, cc: apply_fn(p, xx, tt, cc), cond, null, scale)
        return sample(fn, x, k, schedule=linear_schedule(), solver="ddim", num_steps=num_steps)

    return go


def class_predictions(images) -> Optional[np.ndarray]:
    """The shipped digits classifier's (:func:`jaxdq.metrics.features.load_digits_classifier`)
    class of each ``[N, 1, 16, 16]`` sample (clipped to [-1, 1]), or None if it cannot be loaded."""
    try:
        from jaxdq.metrics.features import load_digits_classifier

        return np.argmax(load_digits_classifier().logits(np.clip(np.asarray(images), -1, 1)), axis=1)
    except Exception as e:  # noqa: BLE001  (a record without the number beats no record)
        print(f"class agreement not computed: {e}", file=sys.stderr)
        return None


def class_agreement(images, labels) -> Optional[float]:
    """Fraction of ``[N, 1, 16, 16]`` samples that the shipped digits classifier puts in the
    intended class (None if it cannot be loaded): the "recognisable at a glance" number of the
    records."""
    pred = class_predictions(images)
    return None if pred is None else float(np.mean(pred == np.asarray(labels)))


def labeled_grid(rows, labels, upscale: int = 4) -> np.ndarray:
    """:func:`jaxdq.viz.grid` with a label left of each row where this jaxdq's ``grid`` can write
    text (``row_labels``), else the plain grid."""
    from jaxdq.viz import grid

    rows = [np.asarray(r) for r in rows]
    try:
        return grid(rows, upscale=upscale, row_labels=[str(s) for s in labels])
    except TypeError:
        return grid(rows, upscale=upscale)


def write_gif(path: str, frames: list[np.ndarray], duration_ms: int = 150) -> Optional[str]:
    """Animated GIF of ``[H, W, 3|1]`` uint8 frames via Pillow (None, with a note, without Pillow)."""
    try:
        from PIL import Image
    except ImportError:
        print(f"Pillow not installed: {path} not written", file=sys.stderr)
        return None
    imgs = [Image.fromarray(f[..., 0] if f.ndim == 3 and f.shape[-1] == 1 else f) for f in frames]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=duration_ms, loop=0)
    return path
