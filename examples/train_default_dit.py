"""Train jaxdq's default model: a small class-conditional DiT on scikit-learn's digits.

The data ship inside the scikit-learn wheel (1797 grey 8×8 digits, 10 classes),
so this needs no download.  Images are upsampled to 16×16 (bilinear) and scaled
to [-1, 1]; the DiT (patch 2, hidden 128, depth 6, 4 heads, learned sigma) is
trained with DiT's objective (ε-MSE + the variational bound for the learned
variance, "hybrid" loss of improved DDPM) on the linear β schedule, 10% label
dropout for classifier-free guidance, AdamW and an EMA of the weights.

    python examples/train_default_dit.py --steps 30000 --out /tmp/dit_digits

writes ``dit_digits16.safetensors`` (EMA weights, float16), ``dit_digits16.json``
(config + training record) and ``samples.png`` (one row per class).  The shipped
default model in ``jaxdq/assets/`` was made by this script on the GPU (see
``bench/results/train_default_dit.json`` for the command and the log).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdq.models.default import DEFAULT_CONFIG, save_default_weights
from jaxdq.models.dit import DiT, init_dit
from jaxdq.sampling import cfg_model_fn, linear_schedule, sample
from jaxdq.viz import grid, write_png


def load_digits_16() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits → images ``[1797, 1, 16, 16]`` float32 in [-1, 1], labels ``[1797]``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = jnp.asarray(d.images, jnp.float32)[:, None] / 16.0
    x = jax.image.resize(x, (x.shape[0], 1, 16, 16), "bilinear")
    return np.asarray(jnp.clip(x, 0, 1) * 2 - 1), d.target.astype(np.int32)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def hybrid_loss(out, x0, xt, t, noise, sched):
    """DiT's training loss for learned-sigma models: mse(ε) + VB term (in bits/dim)."""
    c = x0.shape[1]
    eps, v = out[:, :c], out[:, c:]
    mse = jnp.mean((eps - noise) ** 2, axis=(1, 2, 3))
    b = lambda a: a[t][:, None, None, None]
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
    kl = jnp.mean(kl, axis=(1, 2, 3)) / np.log(2.0)
    # t = 0: Gaussian negative log-likelihood of x0 (continuous stand-in for the discretized decoder)
    nll = 0.5 * (np.log(2 * np.pi) + model_logvar + (x0 - model_mean) ** 2 * jnp.exp(-model_logvar))
    nll = jnp.mean(nll, axis=(1, 2, 3)) / np.log(2.0)
    vb = jnp.where(t == 0, nll, kl)
    return jnp.mean(mse + vb)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ema", type=float, default=0.9995)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="dit_digits_out")
    ap.add_argument("--max-seconds", type=float, default=None, help="stop early (and save) after this long")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    cfg = DEFAULT_CONFIG
    model = DiT(cfg)
    images, labels = load_digits_16()
    images, labels = jnp.asarray(images), jnp.asarray(labels)
    n = images.shape[0]
    schedule = linear_schedule()
    sched = {"betas": jnp.asarray(schedule.betas, jnp.float32),
             "alphas_cumprod": jnp.asarray(schedule.alphas_cumprod, jnp.float32)}
    key = jax.random.PRNGKey(args.seed)
    params = init_dit(cfg, key)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, min(500, args.steps // 10), args.steps, args.lr * 0.1),
                                  weight_decay=0.0))
    opt_state = opt.init(params)
    ema = params

    @jax.jit
    def train_step(params, opt_state, ema, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        idx = jax.random.randint(k1, (args.batch,), 0, n)
        x0, y = images[idx], labels[idx]
        y = jnp.where(jax.random.uniform(k2, y.shape) < cfg.class_dropout_prob, cfg.num_classes, y)
        t = jax.random.randint(k3, (args.batch,), 0, 1000)
        noise = jax.random.normal(k4, x0.shape)
        acp = sched["alphas_cumprod"][t][:, None, None, None]
        xt = jnp.sqrt(acp) * x0 + jnp.sqrt(1 - acp) * noise

        def loss_fn(p):
            return hybrid_loss(model.apply({"params": p}, xt, t, y), x0, xt, t, noise, sched)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: args.ema * e + (1 - args.ema) * p, ema, params)
        return params, opt_state, ema, loss

    log, t0, running = [], time.time(), []
    for step in range(1, args.steps + 1):
        key, sub = jax.random.split(key)
        params, opt_state, ema, loss = train_step(params, opt_state, ema, sub)
        running.append(loss)
        if step % 1000 == 0 or step == args.steps:
            mean = float(jnp.mean(jnp.stack(running)))
            running = []
            log.append({"step": step, "loss": mean, "seconds": round(time.time() - t0, 1)})
            print(f"step {step:6d}  loss {mean:.4f}  {time.time() - t0:.0f}s", flush=True)
            if args.max_seconds and time.time() - t0 > args.max_seconds:
                print(f"stopping at step {step}: --max-seconds {args.max_seconds} reached", flush=True)
                break

    weights_path = save_default_weights(ema, os.path.join(args.out, "dit_digits16.safetensors"))
    with open(os.path.join(args.out, "dit_digits16.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "args": vars(args), "log": log,
                   "device": str(jax.devices()[0]), "jax": jax.__version__}, f, indent=1)

    # one row per class, 10 samples each, DDIM 50 steps, CFG 4
    y = jnp.repeat(jnp.arange(10), 10)
    x_T = jax.random.normal(jax.random.PRNGKey(1), (100, 1, 16, 16))
    apply = lambda x, t, yy: model.apply({"params": ema}, x, t, yy)
    x0 = sample(cfg_model_fn(apply, y, cfg.num_classes, 4.0), x_T, jax.random.PRNGKey(2),
                schedule=schedule, solver="ddim", num_steps=50)
    write_png(os.path.join(args.out, "samples.png"),
              grid([np.asarray(x0[i * 10:(i + 1) * 10]) for i in range(10)], upscale=4))
    print("wrote", weights_path)


if __name__ == "__main__":
    main()
