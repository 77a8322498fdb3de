"""A quantized DiT end to end through the kernel composition, under jax.jit, on CPU.

``use_kernels`` sets every quantized linear to ``impl="kernel"`` (K-major codes);
:func:`pallas_kernels.ops.qlinear_apply` is forced onto its GPU path with the Pallas
kernels interpreted: the Triton path (quantize kernel + Triton GEMM) for W8A8, W4A8 and
SVDQuant W4A4 (per-group scales, low-rank branch, smoothing).  (The Hopper kernel is
compared with the reference per layer in tests/test_kernels.py; through the whole model
the GPU interpreter takes over 10 minutes on 2 cores.)  The model's output
must equal the same quantized params run by the float reference (``impl="fake"``) up
to the kernels' bf16 rounding.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.quant.qlinear import QLinear
from jaxdq.quant.recipes import quantize_method
from jaxdq.quant.rules import iter_linears, is_quantized_linear, use_kernels
from pallas_kernels import ops
from pallas_kernels import triton_kernels as tk


@pytest.fixture(scope="module")
def dit():
    from jaxdq.calibrate import collect_act_stats
    from jaxdq.models.default import load_default
    from jaxdq.models.dit import DiT

    cfg, params = load_default()
    module = DiT(cfg)
    rng = np.random.default_rng(0)
    steps = {"x": jnp.asarray(rng.normal(size=(2, 4, 1, 16, 16)), jnp.float32),
             "t": jnp.asarray(rng.integers(0, 1000, (2, 4))), "y": jnp.asarray(rng.integers(0, 10, (2, 4)))}
    stats = collect_act_stats(module.apply, params, steps)
    x = jnp.asarray(rng.normal(size=(4, 1, 16, 16)), jnp.float32)
    t, y = jnp.asarray([10, 300, 600, 900]), jnp.asarray([0, 3, 7, 10])
    return module, params, stats, (x, t, y)


def _force_gpu_path(monkeypatch, backend):
    monkeypatch.setattr(ops, "on_gpu", lambda: True)
    monkeypatch.setattr(ops, "GEMM_BACKEND", "auto" if backend == "hopper" else "triton")
    monkeypatch.setattr(ops, "_is_hopper", lambda: backend == "hopper")
    monkeypatch.setattr(tk, "quantize_act", functools.partial(tk.quantize_act, interpret=True))
    monkeypatch.setattr(tk, "int_gemm", functools.partial(tk.int_gemm, interpret=True))
    if backend == "hopper":
        mk = pytest.importorskip("pallas_kernels.mosaic_kernels")
        params = mk.gpu_interpret_params()
        if params is None:
            pytest.skip("this jax has no Mosaic GPU interpreter")
        monkeypatch.setattr(mk, "int8_gemm_ws", functools.partial(mk.int8_gemm_ws, interpret=params, num_sms=8))


def _kernel_calls(q_params):
    n = 0
    for _, layer in iter_linears(q_params):
        if is_quantized_linear(layer) and ops.kernel_supported(layer["qlinear"]):
            n += 1
    return n


@pytest.mark.parametrize("method,backend", [("dynamic-w8a8", "triton"), ("dynamic-w4a8", "triton"),
                                            ("svdquant", "triton")])
def test_quantized_dit_through_kernels_matches_reference(dit, monkeypatch, method, backend):
    module, params, stats, (x, t, y) = dit
    kw = {"alpha": 0.5, "iters": 0} if method == "svdquant" else {}
    q = quantize_method(method, params, stats if method == "svdquant" else None, **kw)
    qk = use_kernels(q)
    layers = [l["qlinear"] for _, l in iter_linears(qk) if is_quantized_linear(l)]
    assert layers and all(isinstance(l, QLinear) and l.impl == "kernel" and l.w_layout == "nk" for l in layers)
    n_kernel = _kernel_calls(qk)
    # every W·A-quantized linear of the 128-wide DiT is kernel-eligible (weight-only adaLN is not)
    assert n_kernel == sum(1 for l in layers if l.act_spec is not None) >= 24
    want = np.asarray(jax.jit(lambda p: module.apply({"params": p}, x, t, y))(q), np.float64)
    _force_gpu_path(monkeypatch, backend)
    got = np.asarray(jax.jit(lambda p: module.apply({"params": p}, x, t, y))(qk), np.float64)
    assert got.shape == want.shape and np.isfinite(got).all()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    # each layer rounds its output to bf16 (2^-8 relative) and, with 4-bit activations, an
    # input that lands within a bf16 ulp of a rounding boundary can flip one code
    assert rel < (3e-2 if method == "svdquant" else 1e-2), rel
    assert rel > 0  # the kernel path ran (bf16 outputs), not the float reference
