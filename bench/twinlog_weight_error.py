"""Weight-error study: uniform per-channel vs twin-log (LRQ-DiT TLQ) at 3 and 4 bits.

    python bench/twinlog_weight_error.py [--out bench/results/twinlog_weight_error]

On every linear of the default DiT (``jaxdq.models.default.load_default``) except
``x_embedder`` and ``final_layer/linear``: ``‖W_q − W‖_F / ‖W‖_F`` for

* ``uniform``: symmetric per output channel, min-max scale
  (``fake_quant(w, QuantSpec(bits=b, granularity="channel"), kind="weight")``);
* ``uniform-mse``: the same with ``range="mse"`` (clipping-ratio grid);
* ``twinlog``: :func:`jaxdq.quant.twinlog.fake_quant_twinlog` with the default
  grid (α, β and the log steps per output channel, weight error);
* ``twinlog-minmax``: twin-log with α = β = 1 and the literal min-max log range
  (no search), the ablation that shows what the search buys.

Also, per layer and bits, the largest integer-form fraction count ``I`` whose
weights ``w_int`` fit int8 (the "shift form into int8" a kernel could feed to
int8 tensor cores; -1 if none).  Writes ``OUT.json`` (with the command) and
``OUT.png`` (per-layer errors; one layer's weight histogram; one column's
histogram with the 3-bit twin-log and uniform level sets).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.models.default import load_default
from jaxdq.quant import twinlog as tl
from jaxdq.quant.quantizer import QuantSpec, compute_qparams, fake_quant

SKIP = ("x_embedder", "final_layer/linear")
BITS = (3, 4)
METHODS = ("uniform", "uniform-mse", "twinlog", "twinlog-minmax")
HIST_LAYER = "blocks_2/mlp/fc2"   # the widest C_in (512): the fullest column histogram


def linears(tree, prefix=""):
    """``(path, kernel [C_in, C_out] float32)`` of every linear with a 2-D kernel, in tree order."""
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict) and "kernel" in v and np.ndim(v["kernel"]) == 2:
            yield path, np.asarray(v["kernel"], np.float32)
        elif isinstance(v, dict):
            yield from linears(v, path)


def uniform_spec(bits: int, mse: bool) -> QuantSpec:
    return QuantSpec(bits=bits, granularity="channel", range="mse" if mse else "minmax")


def quantized(w: np.ndarray, method: str, bits: int) -> np.ndarray:
    """float32 ``W_q`` of ``w`` by ``method``."""
    if method.startswith("uniform"):
        return np.asarray(fake_quant(jnp.asarray(w), uniform_spec(bits, method == "uniform-mse"), kind="weight"))
    spec = tl.TwinLogSpec(bits=bits, search=method == "twinlog")
    return np.asarray(tl.fake_quant_twinlog(w, spec))


def rel_err(wq: np.ndarray, w: np.ndarray) -> float:
    return float(np.linalg.norm(wq.astype(np.float64) - w) / np.linalg.norm(w.astype(np.float64)))


def int8_frac_bits(w: np.ndarray, bits: int) -> int:
    """Largest I in 0..8 with ``max|w_int| ≤ 127`` (twin-log, default search), else −1."""
    tw = tl.quantize_twinlog(w, tl.TwinLogSpec(bits=bits))
    best = -1
    for i in range(9):
        if int(jnp.max(jnp.abs(tl.int_form(tw, i).w_int))) <= 127:
            best = i
    return best


def study(params) -> list[dict]:
    rows = []
    for path, w in linears(params):
        if any(path.startswith(s) for s in SKIP):
            continue
        row = {"layer": path, "shape": list(w.shape), "rel_error": {}, "int8_max_frac_bits": {}}
        for bits in BITS:
            for m in METHODS:
                row["rel_error"][f"{m}-w{bits}"] = rel_err(quantized(w, m, bits), w)
            row["int8_max_frac_bits"][f"w{bits}"] = int8_frac_bits(w, bits)
        rows.append(row)
        print(path, " ".join(f"{k}={v:.4f}" for k, v in row["rel_error"].items()), flush=True)
    return rows


def summary(rows: list[dict]) -> dict:
    keys = rows[0]["rel_error"].keys()
    out = {k: float(np.mean([r["rel_error"][k] for r in rows])) for k in keys}
    for bits in BITS:
        tlq, mse = (np.array([r["rel_error"][f"{m}-w{bits}"] for r in rows]) for m in ("twinlog", "uniform-mse"))
        out[f"twinlog_beats_uniform-mse_layers-w{bits}"] = f"{int(np.sum(tlq < mse))}/{len(rows)}"
    return out


def uniform_levels(w_col: np.ndarray, bits: int) -> np.ndarray:
    """Levels of the MSE-ranged symmetric uniform quantizer of one column ``[C_in]``."""
    s, _ = compute_qparams(jnp.asarray(w_col[:, None]), uniform_spec(bits, True), kind="weight")
    return float(np.asarray(s)[0, 0]) * np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1))


def plot(rows: list[dict], params, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 9))
    ax = fig.add_subplot(2, 1, 1)
    xs = np.arange(len(rows))
    style = {"uniform": ("#999999", "o"), "uniform-mse": ("#3264c8", "s"), "twinlog": ("#d62728", "D"),
             "twinlog-minmax": ("#e6a01e", "^")}
    for bits, ls in zip(BITS, ("-", "--")):
        for m in METHODS:
            if m == "twinlog-minmax" and bits == 3:
                continue   # off the scale at 3 bit (≈1.5); its 3-bit mean is in the JSON
            color, marker = style[m]
            ax.plot(xs, [r["rel_error"][f"{m}-w{bits}"] for r in rows], ls, color=color, marker=marker,
                    markersize=4, label=f"{m} W{bits}")
    ax.set_xticks(xs, [r["layer"] for r in rows], rotation=70, fontsize=7)
    ax.set_ylabel("‖W_q − W‖_F / ‖W‖_F")
    ax.set_title("Default DiT, per-layer relative weight error (per output channel)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=4, fontsize=8)

    w = dict(linears(params))[HIST_LAYER]
    ax = fig.add_subplot(2, 2, 3)
    ax.hist(w.ravel(), bins=200, color="#555555")
    ax.set_yscale("log")
    ax.set_title(f"{HIST_LAYER}: all weights {tuple(w.shape)}")
    ax.set_xlabel("weight")

    col = int(np.argmax(np.abs(w).max(axis=0)))   # the column with the longest tail
    wc = w[:, col]
    ax = fig.add_subplot(2, 2, 4)
    ax.hist(wc, bins=80, color="#bbbbbb", label=f"column {col} ({wc.size} weights)")
    tw = tl.quantize_twinlog(w, tl.TwinLogSpec(bits=3))
    for v in tl.level_sets(tw, col, 3):
        ax.axvline(v, color="#d62728", lw=1.5, ymax=0.9)
    for v in uniform_levels(wc, 3):
        ax.axvline(v, color="#3264c8", lw=1.5, ls="--", ymax=0.75)
    ax.plot([], [], color="#d62728", label="twin-log W3 levels (8)")
    ax.plot([], [], color="#3264c8", ls="--", label="uniform-mse W3 levels (8)")
    ax.set_title(f"{HIST_LAYER}, one output column, 3-bit level sets")
    ax.set_xlabel("weight")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/twinlog_weight_error")
    args = ap.parse_args(argv)
    t0 = time.time()
    cfg, params = load_default()
    rows = study(params)
    result = {
        "bench": "twinlog_weight_error",
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "model": f"default DiT (hidden {cfg.hidden_size}, depth {cfg.depth})",
        "skipped": list(SKIP),
        "metric": "||W_q - W||_F / ||W||_F per layer",
        "methods": {
            "uniform": "symmetric per output channel, min-max scale",
            "uniform-mse": "symmetric per output channel, range='mse' (QuantSpec defaults)",
            "twinlog": "TLQ, default TwinLogSpec grid (alpha, beta in [0.3, 1] x 15, log step in [0.2, 2] x 19), "
                       "weight error, zero underflow",
            "twinlog-minmax": "TLQ with alpha = beta = 1 and the literal min-max log range (no search)",
        },
        "code_levels": {"w3": "0, 3 positive, 4 negative (2^3 codes)", "w4": "0, 7 positive, 8 negative (2^4 codes)"},
        "mean_rel_error": None,
        "layers": rows,
        "jax": jax.__version__,
        "seconds": None,
    }
    result["mean_rel_error"] = summary(rows)
    result["seconds"] = round(time.time() - t0, 1)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, params, args.out + ".png")
    print(json.dumps(result["mean_rel_error"], indent=1))


if __name__ == "__main__":
    main()
