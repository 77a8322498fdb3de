"""A quantized DiT end to end through the kernel composition, under jax.jit, on CPU.

:func:`jaxdq.backend.stored_for_kernels` stores every quantized linear's codes K-major
("nk"); the model runs on params bound (:func:`jaxdq.backend.bind`, inside the jitted
function) to ``policy("kernels", gemm=..., interpret=True)``, so every kernel-eligible
layer takes the GPU composition with the Pallas kernels interpreted: the Triton path
(quantize kernel + Triton GEMM) for W8A8, W4A8 and SVDQuant W4A4 (per-group scales,
low-rank branch, smoothing), and the Hopper path (quantize kernel + the Mosaic GPU wgmma
GEMM in jax's GPU interpreter) for W8A8.  The model's output must equal the same
quantized params run by the fake-quant reference (the default policy) up to the kernels'
bf16 rounding.

The Hopper case runs the default DiT cut to its first block, on two images (128 tokens)
instead of four: the GPU interpreter simulates every CTA, seconds each on 2 cores (the
whole model took 95-160 s).  It is W8A8 only: int4 weights (fc2 has 4 K-steps at K = 512)
and the fused low-rank branch deadlock, always or intermittently, in jax 0.10.2's GPU
interpreter (pallas_kernels/NOTES.md); on the GPU bench/bench_kernels.py checks those
kernels against the reference.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import backend
from jaxdq.quant.layers import QLinear, iter_layers
from jaxdq.quant.recipes import Context, get_recipe


@pytest.fixture(scope="module")
def dit():
    from jaxdq.calibrate import collect_step_stats
    from jaxdq.models.default import load_default
    from jaxdq.models.dit import DiT, layer_roles

    cfg, params = load_default()
    module = DiT(cfg)
    rng = np.random.default_rng(0)
    steps = {"x": jnp.asarray(rng.normal(size=(2, 4, 1, 16, 16)), jnp.float32),
             "t": jnp.asarray(rng.integers(0, 1000, (2, 4))), "y": jnp.asarray(rng.integers(0, 10, (2, 4)))}
    calib = collect_step_stats(module.apply, params, steps)  # per-step statistics, pooled by the recipe
    x = jnp.asarray(rng.normal(size=(4, 1, 16, 16)), jnp.float32)
    t, y = jnp.asarray([10, 300, 600, 900]), jnp.asarray([0, 3, 7, 10])
    return module, params, layer_roles(cfg), calib, (x, t, y)


def _first_block(module, params):
    """The default DiT cut to its first block (embedders, block 0, final layer: trained weights)."""
    from jaxdq.models.dit import DiT

    cfg = dataclasses.replace(module.config, depth=1)
    return DiT(cfg), {k: v for k, v in params.items() if not k.startswith("blocks_") or k == "blocks_0"}


def _apply(module, pol, x, t, y):
    return jax.jit(lambda p: module.apply({"params": backend.bind(p, pol)}, x, t, y))


@pytest.mark.parametrize("method,gemm", [("dynamic-w8a8", "triton"), ("dynamic-w4a8", "triton"),
                                         ("svdquant", "triton"), ("dynamic-w8a8", "hopper")])
def test_quantized_dit_through_kernels_matches_reference(dit, method, gemm):
    module, params, roles, calib, (x, t, y) = dit
    if gemm == "hopper":
        mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
        if mk.gpu_interpret_params() is None:
            pytest.skip("this jax has no Mosaic GPU interpreter")
        module, params = _first_block(module, params)
        x, t, y = x[:2], t[:2], y[:2]
    opts = {"alpha": 0.5, "iters": 0} if method == "svdquant" else {}
    ctx = Context(roles=roles, calib=calib if method == "svdquant" else None, options=opts)
    q, _ = get_recipe(method).build(params, ctx)
    qk = backend.stored_for_kernels(q)
    quantized = {p: l for p, l in iter_layers(qk) if isinstance(l, QLinear)}
    layers = list(quantized.values())
    assert layers and all(l.weight.layout == "nk" for l in layers)
    # every W·A-quantized linear of the 128-wide DiT is kernel-eligible (weight-only adaLN is not)
    n_kernel = sum(1 for l in layers if backend.kernel_supported(l))
    assert n_kernel == sum(1 for l in layers if l.act is not None) >= 4 * module.config.depth
    pol = backend.policy("kernels", gemm=gemm, interpret=True, fuse_lowrank=gemm != "hopper")
    tokens = x.shape[0] * (x.shape[-1] // 2) ** 2  # rows of the attention and MLP linears (patch 2)
    block = [l for p, l in quantized.items() if roles[p] in ("self-attn", "ffn")]
    assert block and {backend.choose(l, tokens, pol) for l in block} == {"kernel"}
    want = np.asarray(_apply(module, backend.REFERENCE, x, t, y)(q), np.float64)
    got = np.asarray(_apply(module, pol, x, t, y)(qk), np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    # each layer rounds its output to bf16 (2^-8 relative) and, with 4-bit activations, an
    # input that lands within a bf16 ulp of a rounding boundary can flip one code
    assert rel < (3e-2 if method == "svdquant" else 1e-2), rel
    assert rel > 0  # the kernel path ran (bf16 outputs), not the float reference
