"""Train the digits feature network behind jaxdq's offline metrics (FD-digits, class agreement).

Data: scikit-learn's digits preprocessed exactly as the default DiT's training data
(16x16, [-1, 1]; :func:`jaxdq.metrics.features.load_digits_16`), split 80/20 by a
fixed seed (:func:`digits_split`).  Training: AdamW with warmup-cosine learning rate,
label smoothing 0.1, augmentation by random shifts of ±1 px (background-padded) and
Gaussian pixel noise of a random σ in [0, 0.3].  CPU, about a minute.

    python examples/train_digits_classifier.py --out /tmp/digits_clf [--check-default-model]

writes ``digits_classifier.safetensors`` (float16) and ``digits_classifier.json``
(held-out accuracy, args, log, and with ``--check-default-model`` the class agreement
and FD-digits of 100 samples of the default DiT, DDIM 50 steps, CFG 4, vs the real data).
The shipped ``jaxdq/assets/digits_classifier.safetensors`` and
``bench/results/digits_classifier.json`` were made by this script.
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
import optax

from jaxdq.metrics.features import (apply, digits_split, init_params, load_digits_16, load_digits_classifier,
                                    save_classifier_weights)


def augment(key, x, max_noise: float):
    """Random ±1 px shift per image (padding with the background value -1) + Gaussian noise."""
    k1, k2, k3 = jax.random.split(key, 3)
    n = x.shape[0]
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-1.0)
    off = jax.random.randint(k1, (n, 2), 0, 3)
    x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (0, o[0], o[1]), (1, 16, 16)))(xp, off)
    sigma = jax.random.uniform(k2, (n, 1, 1, 1), maxval=max_noise)
    return jnp.clip(x + sigma * jax.random.normal(k3, x.shape), -1, 1)


def accuracy(params, x, y) -> float:
    return float(np.mean(np.argmax(np.asarray(jax.jit(apply)(params, x)[1]), axis=1) == y))


def check_default_model(clf, images, labels, n: int = 100, seed: int = 0) -> dict:
    """Class agreement and FD-digits of ``n`` default-DiT samples (DDIM 50, CFG 4) vs real data."""
    from jaxdq.metrics import class_agreement, frechet_distance
    from jaxdq.models.sources import load_model
    from jaxdq.sampling.families import Request

    model = load_model("default")
    b = model.family.batch(model.config, Request(classes=tuple(range(10)), per_class=n // 10, seed=seed))
    y = b.labels
    t0 = time.time()
    x0 = np.asarray(model.family.sampler(model.config, solver="ddim", num_steps=50, guidance=4.0)(
        model.params, b.x_T, b.cond, b.uncond, jax.random.PRNGKey(seed + 1)))
    sample_s = time.time() - t0
    f_gen, f_real = clf.features(x0), clf.features(images)
    rng = np.random.default_rng(seed)
    halves = rng.permutation(len(images))
    floor_n = []  # FD of n real images vs the rest, the floor at this sample size
    for _ in range(10):
        p = rng.permutation(len(images))
        floor_n.append(frechet_distance(f_real[p[:n]], f_real[p[n:]]))
    return {"samples": n, "sampler": "ddim 50 steps, cfg 4.0", "noise_seed": seed,
            "sampling_seconds": round(sample_s, 1),
            "class_agreement": class_agreement(clf.logits(x0), np.asarray(y)),
            "real_class_agreement_all": class_agreement(clf.logits(images), labels),
            "fd_samples_vs_real_all": frechet_distance(f_gen, f_real),
            f"fd_real_{n}_vs_rest_mean_of_10": float(np.mean(floor_n)),
            f"fd_real_{n}_vs_rest_min_max": [float(np.min(floor_n)), float(np.max(floor_n))],
            "fd_real_half_vs_half": frechet_distance(f_real[halves[: len(halves) // 2]],
                                                     f_real[halves[len(halves) // 2:]])}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--max-noise", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0, help="init / batches / augmentation")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--out", default="digits_clf_out")
    ap.add_argument("--check-default-model", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    images, labels = load_digits_16()
    tr, te = digits_split(len(images), seed=args.split_seed)
    x_tr, y_tr = jnp.asarray(images[tr]), jnp.asarray(labels[tr])
    opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, args.lr, args.steps // 20, args.steps, args.lr * 0.01),
                      weight_decay=args.weight_decay)
    key = jax.random.PRNGKey(args.seed)
    key, sub = jax.random.split(key)
    params = init_params(sub)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, key):
        k1, k2 = jax.random.split(key)
        idx = jax.random.randint(k1, (args.batch,), 0, x_tr.shape[0])
        x, y = augment(k2, x_tr[idx], args.max_noise), y_tr[idx]

        def loss_fn(p):
            logits = apply(p, x)[1]
            target = optax.smooth_labels(jax.nn.one_hot(y, 10), 0.1)
            return jnp.mean(optax.softmax_cross_entropy(logits, target))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    log, t0, running = [], time.time(), []
    for i in range(1, args.steps + 1):
        key, sub = jax.random.split(key)
        params, opt_state, loss = step(params, opt_state, sub)
        running.append(loss)
        if i % 200 == 0 or i == args.steps:
            entry = {"step": i, "loss": round(float(jnp.mean(jnp.stack(running))), 4),
                     "test_acc": accuracy(params, images[te], labels[te]), "seconds": round(time.time() - t0, 1)}
            running = []
            log.append(entry)
            print(entry, flush=True)
    train_s = time.time() - t0

    path = save_classifier_weights(params, os.path.join(args.out, "digits_classifier.safetensors"))
    clf = load_digits_classifier(path)  # evaluate the float16-rounded weights that ship
    record = {
        "test_accuracy": float(np.mean(np.argmax(clf.logits(images[te]), 1) == labels[te])),
        "train_accuracy": float(np.mean(np.argmax(clf.logits(images[tr]), 1) == labels[tr])),
        "n_train": int(len(tr)), "n_test": int(len(te)), "split": f"digits_split(1797, seed={args.split_seed}, test_fraction=0.2)",
        "weights": "float16", "train_seconds": round(train_s, 1),
        "command": "python " + " ".join([os.path.relpath(__file__)] + (argv if argv is not None else sys.argv[1:])),
        "args": vars(args), "log": log, "device": str(jax.devices()[0]), "jax": jax.__version__,
    }
    if args.check_default_model:
        record["default_model_check"] = check_default_model(clf, images, labels)
    with open(os.path.join(args.out, "digits_classifier.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps({k: v for k, v in record.items() if k != "log"}, indent=1))


if __name__ == "__main__":
    main()
