"""bench/bench_e2e.py's weight accounting: ``bytes_by_part`` splits a quantized tree's bytes into
codes / weight scales / low-rank / smoothing / float, and the parts add up to every leaf's bytes."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.bench_e2e import bytes_by_part  # noqa: E402
from jaxdq.quant.layers import FloatLinear  # noqa: E402
from jaxdq.quant.svdquant import svdquant_config, svdquant_layer  # noqa: E402


def test_bytes_by_part_adds_up_and_names_each_part():
    k, n, r = 128, 64, 16
    w = jax.random.normal(jax.random.key(0), (k, n)) * 0.05
    fl = FloatLinear(kernel=w, bias=jnp.zeros((n,)))
    q = svdquant_layer(fl, svdquant_config(4, 4), act_absmax=jnp.linspace(0.5, 4.0, k), alpha=0.5, rank=r,
                       scale_dtype=jnp.float16)
    tree = {"blocks": {"attn": q}, "embed": {"kernel": jnp.zeros((8, k), jnp.bfloat16)}}
    parts = bytes_by_part(tree)
    total = sum(int(leaf.size * leaf.dtype.itemsize) for leaf in jax.tree_util.tree_leaves(tree))
    assert sum(parts.values()) == total
    assert parts["codes"] == k * n // 2  # 4-bit codes, two per byte
    assert parts["weight_scales"] == (k // 64) * n * 2  # fp16, one per group of 64 inputs and output
    assert parts["lowrank"] == np.dtype(q.transform.lowrank_a.dtype).itemsize * r * (k + n)
    assert parts["smooth"] == k * q.transform.smooth.dtype.itemsize
    assert parts["float"] == 8 * k * 2 + n * q.bias.dtype.itemsize  # the embedder and the bias
