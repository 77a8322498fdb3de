"""Pallas kernels vs their pure-jnp references (CPU, interpret mode, small shapes).

The Triton kernels (:mod:`pallas_kernels.quantize_act`, :mod:`pallas_kernels.int_gemm`)
run with ``config.interpret=True``; the Mosaic GPU wgmma kernel
(:mod:`pallas_kernels.int_gemm_hopper`) runs in jax's Mosaic GPU interpreter (simulated
SMEM, TMA, barriers, wgmma) and is also traced to Mosaic GPU IR for the CUDA platform.
The references are also checked against jaxdq's own quantizer and Hadamard (tests may
import jaxdq; the kernel package may not).
"""
import dataclasses
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.quant.hadamard import block_hadamard as lead_block_hadamard
from jaxdq.quant.hadamard import hadamard_matrix as lead_hadamard_matrix
from jaxdq.quant.quantizer import QuantSpec, pack_int4, quantize_activation, unpack_int4
from pallas_kernels._common import sylvester_pm1, unpack_int4_reference
from pallas_kernels.int_gemm import GemmConfig, int_gemm, int_gemm_reference
from pallas_kernels.quantize_act import (QuantizeConfig, block_hadamard_reference, quantize_act,
                                         quantize_act_reference, quantize_config, transform_input_reference)

M, K, N, R = 32, 128, 64, 16
#: the Triton GEMM's tiles in these tests, interpreted
GEMM_CPU = GemmConfig(block_m=16, block_n=32, interpret=True)


def _keys(seed, n):
    return jax.random.split(jax.random.key(seed), n)


def _f32(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def test_block_hadamard_reference_matches_float64_and_lead():
    x = np.random.default_rng(0).standard_normal((3, 5, 96))
    for block in (1, 2, 32):
        h = sylvester_pm1(block) / math.sqrt(block)
        want = (x.reshape(3, 5, 96 // block, block) @ h).reshape(x.shape)
        got = _f32(block_hadamard_reference(jnp.asarray(x, jnp.float32), block))
        assert np.abs(got - want).max() < 1e-5
        lead = _f32(lead_block_hadamard(jnp.asarray(x, jnp.float32), block))
        assert np.abs(got - lead).max() < 1e-5
    h8 = sylvester_pm1(8) / math.sqrt(8)
    assert np.allclose(h8 @ h8.T, np.eye(8)) and set(np.unique(sylvester_pm1(8))) == {-1.0, 1.0}
    for n in (1, 2, 8, 64, 128):  # the library's normalized matrix, bit for bit
        assert np.array_equal(sylvester_pm1(n) / math.sqrt(n), lead_hadamard_matrix(n))
    with pytest.raises(ValueError, match="power of two"):
        sylvester_pm1(12)


def test_unpack_int4_reference_matches_quantizer():
    codes = jax.random.randint(jax.random.key(1), (16, 32), -8, 8).astype(jnp.int8)
    p = pack_int4(codes)
    assert np.array_equal(np.asarray(unpack_int4_reference(p)), np.asarray(codes))
    assert np.array_equal(np.asarray(unpack_int4_reference(p)), np.asarray(unpack_int4(p, signed=True)))


@pytest.mark.parametrize("bits,had,single", [(8, 0, False), (8, 64, False), (4, 0, False), (8, 64, True)])
def test_quantize_kernel_vs_reference(bits, had, single):
    k = _keys(2 + had + bits, 3)
    x = (jax.random.normal(k[0], (M, K)) * jnp.linspace(0.1, 4.0, K)).astype(jnp.bfloat16)
    smooth = jax.random.uniform(k[1], (K,), minval=0.5, maxval=2.0)
    l1 = jax.random.normal(k[2], (K, R)) / math.sqrt(K)
    q, s, xl1 = quantize_act(x, bits=bits, smooth=smooth, had_block=had, l1=l1,
                             config=QuantizeConfig(single_pass=single, interpret=True))
    q0, s0, xl10 = quantize_act_reference(x, bits=bits, smooth=smooth, had_block=had, l1=l1)
    assert q.dtype == jnp.int8 and q.shape == (M, K) and s.shape == (M, 1) and xl1.shape == (M, R)
    d = np.abs(np.asarray(q, np.int32) - np.asarray(q0, np.int32))
    qmax = 2 ** (bits - 1) - 1
    assert np.asarray(q).min() >= -qmax - 1 and np.asarray(q).max() <= qmax
    if had:  # Hadamard on a bf16 hi/lo split (~2^-16 relative): a code may flip at a .5 tie
        assert d.max() <= 1 and (d > 0).mean() < 2e-3
        assert np.abs(_f32(s) - _f32(s0)).max() / np.abs(_f32(s0)).max() < 1e-4
    else:
        assert d.max() == 0
        assert np.array_equal(np.asarray(s), np.asarray(s0))
    err = np.abs(_f32(xl1) - _f32(xl10)).max() / np.abs(_f32(xl10)).max()
    assert err < 1.5e-2  # bf16 operands, f32 accumulation


@pytest.mark.parametrize("m,k,dot,smooth,grouped", [
    (64, 128, True, True, False), (1152, 128, True, True, False), (64, 5120, True, True, False),
    (64, 128, False, True, False), (64, 5120, False, True, False),
    (64, 128, False, False, False), (64, 5120, False, False, False), (64, 128, True, True, True)])
def test_quantize_config_choices_run_exactly(m, k, dot, smooth, grouped):
    """Every launch configuration ``quantize_config`` picks gives the reference's codes."""
    cfg = quantize_config(m, k, dot=dot, smooth=smooth, grouped=grouped)
    assert isinstance(cfg, QuantizeConfig) and not cfg.interpret
    assert m % cfg.block_m == 0 and (not dot or cfg.block_m >= 16)
    ks = _keys(m + k, 3)
    x = (jax.random.normal(ks[0], (m, k)) * jnp.linspace(0.1, 4.0, k)).astype(jnp.bfloat16)
    kw = dict(smooth=jax.random.uniform(ks[1], (k,), minval=0.5, maxval=2.0) if smooth else None,
              l1=jax.random.normal(ks[2], (k, R)) / math.sqrt(k) if dot else None,
              group_size=64 if grouped else 0, bits=4 if grouped else 8)
    q, s, xl1 = quantize_act(x, **kw, config=dataclasses.replace(cfg, interpret=True))
    q0, s0, xl10 = quantize_act_reference(x, **kw)
    assert np.array_equal(np.asarray(q), np.asarray(q0)) and np.array_equal(np.asarray(s), np.asarray(s0))
    if dot:
        assert np.abs(_f32(xl1) - _f32(xl10)).max() / np.abs(_f32(xl10)).max() < 1.5e-2


@pytest.mark.parametrize("single", [False, True])
def test_quantize_kernel_reciprocal_division_is_within_one_code(single):
    """``exact_divide=False`` multiplies by 1/smooth and 1/scale: a code moves by at most one."""
    ks = _keys(90, 3)
    x = (jax.random.normal(ks[0], (M, K)) * jnp.linspace(0.1, 4.0, K)).astype(jnp.bfloat16)
    smooth = jax.random.uniform(ks[1], (K,), minval=0.5, maxval=2.0)
    l1 = jax.random.normal(ks[2], (K, R)) / math.sqrt(K)
    q, s, xl1 = quantize_act(x, smooth=smooth, l1=l1,
                             config=QuantizeConfig(single_pass=single, exact_divide=False, interpret=True))
    q0, s0, xl10 = quantize_act_reference(x, smooth=smooth, l1=l1)
    d = np.abs(np.asarray(q, np.int32) - np.asarray(q0, np.int32))
    assert d.max() <= 1 and (d > 0).mean() < 1e-2
    # x · (1/s) is within an ulp of x / s: the row maxima, hence the scales, agree to ~1e-7
    np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=1e-6)
    assert np.abs(_f32(xl1) - _f32(xl10)).max() / np.abs(_f32(xl10)).max() < 1.5e-2


def test_configs_are_frozen_and_keep_the_old_keyword_defaults():
    """The configs replace the kernels' former keyword arguments, with the same defaults."""
    assert QuantizeConfig() == QuantizeConfig(block_m=16, num_warps=4, num_stages=1, single_pass=False,
                                              exact_divide=True, interpret=False)
    assert GemmConfig() == GemmConfig(block_m=128, block_n=128, block_k=None, num_warps=8, num_stages=3,
                                      interpret=False)
    for cfg in (QuantizeConfig(), GemmConfig()):
        hash(cfg)  # static jit arguments
        with pytest.raises(dataclasses.FrozenInstanceError):
            cfg.interpret = True
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    assert mk.HopperGemmConfig() == mk.HopperGemmConfig(
        tile_m=128, tile_n=None, tile_k=None, max_concurrent_steps=4, epi_tile_n=64, epi_tile_m=64,
        grid_tile_width=8, wg_dim="auto", num_sms=None, lr_in_acc=False, lr_smem="alias", res_load="direct",
        mma_in_flight=1, interpret=None)
    params = mk.gpu_interpret_params()
    hash(mk.HopperGemmConfig(interpret=params))


@pytest.mark.parametrize("m,k,dot,smooth,grouped,want", [  # the table as it was (keyword dicts)
    (64, 128, True, True, True, dict(block_m=32, num_warps=4, num_stages=3)),
    (64, 5120, True, True, False, dict(block_m=16, num_warps=4, num_stages=1)),
    (1024, 1152, True, False, False, dict(block_m=16, num_warps=8, single_pass=True)),
    (8192, 1152, True, True, False, dict(block_m=64, num_warps=8, num_stages=3)),
    (512, 1152, False, True, False, dict(block_m=4, num_warps=8, single_pass=True)),
    (512, 3072, False, True, False, dict(block_m=4, num_warps=4, num_stages=3)),
    (512, 4608, False, False, False, dict(block_m=4, num_warps=4, single_pass=True)),
    (512, 12288, False, False, False, dict(block_m=8, num_warps=4, num_stages=3))])
def test_quantize_config_table_is_unchanged(m, k, dot, smooth, grouped, want):
    assert quantize_config(m, k, dot=dot, smooth=smooth, grouped=grouped) == QuantizeConfig(**want)


def test_pick_tile_n_follows_the_h100_measurements():
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    # (M, N) → the faster tile_n measured on an H100 (bench/results/kernels_h100_run3.json)
    measured = {(512, 3456): 64, (512, 1152): 64, (640, 2304): 64, (512, 4608): 128, (8192, 4608): 128,
                (8192, 3456): 128, (4608, 9216): 128, (4608, 12288): 128, (4608, 3072): 128}
    for (m, n), want in measured.items():
        assert mk.pick_tile_n(m, n, num_sms=132) == want, (m, n)
    assert mk.pick_tile_n(512, 3456, num_sms=32) == 128  # few SMs: the 128 tiles fill them


@pytest.mark.parametrize("bits,single", [(8, False), (8, True), (4, False)])
def test_quantize_kernel_asymmetric_matches_the_library_quantizer(bits, single):
    """Asymmetric per-token codes: the kernel = the reference = jaxdq's quantizer, shifted."""
    k = _keys(80 + bits, 3)
    # mostly-positive rows (post-GELU-like) and a row of zeros: asymmetric ranges
    x = (jax.random.normal(k[0], (M, K)) * jnp.linspace(0.1, 4.0, K) + 1.5).astype(jnp.bfloat16)
    x = x.at[3].set(0)
    smooth = jax.random.uniform(k[1], (K,), minval=0.5, maxval=2.0)
    l1 = jax.random.normal(k[2], (K, R)) / math.sqrt(K)
    q, s, xl1, z = quantize_act(x, bits=bits, smooth=smooth, l1=l1, symmetric=False,
                                config=QuantizeConfig(block_m=16, single_pass=single, interpret=True))
    q0, s0, xl10, z0 = quantize_act_reference(x, bits=bits, smooth=smooth, l1=l1, symmetric=False)
    assert np.array_equal(np.asarray(q), np.asarray(q0)) and np.array_equal(np.asarray(s), np.asarray(s0))
    assert np.array_equal(np.asarray(z), np.asarray(z0)) and z.shape == (M, 1)
    half = 2 ** (bits - 1)
    assert np.asarray(q).min() >= -half and np.asarray(q).max() <= half - 1
    lib_q, lib_s, lib_z = quantize_activation(transform_input_reference(x, smooth),
                                              QuantSpec(bits, symmetric=False, granularity="token"))
    assert np.array_equal(np.asarray(q0, np.int32) + half, np.asarray(lib_q, np.int32))
    assert np.array_equal(np.asarray(s0), np.asarray(lib_s)) and np.array_equal(np.asarray(z0) + half, np.asarray(lib_z))
    assert np.abs(_f32(xl1) - _f32(xl10)).max() / np.abs(_f32(xl10)).max() < 1.5e-2
    with pytest.raises(ValueError, match="per token"):
        quantize_act(x, symmetric=False, group_size=64, config=QuantizeConfig(interpret=True))


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_act_reference_equals_the_library_quantizer(bits):
    """The kernel package's reference writes the quantizer's formulas inline (it may not import
    jaxdq): asymmetric per token (codes and zero points shifted by 2^(b-1)), symmetric per
    token and per (token, group), equal to ``jaxdq.quant.quantizer.quantize_activation``."""
    k = _keys(120 + bits, 2)
    x = jax.random.normal(k[0], (M, K)) * jnp.linspace(0.1, 4.0, K)
    x = x.at[0].set(jnp.abs(x[0]) + 0.5).at[1].set(-jnp.abs(x[1]) - 0.5).at[2].set(0.0)  # > 0, < 0, zeros
    x = x.at[3].set(jnp.round(x[3] * 4) / 4)  # exact ties for the rounding
    smooth = jax.random.uniform(k[1], (K,), minval=0.5, maxval=2.0)
    xt = transform_input_reference(x, smooth)
    half = 2 ** (bits - 1)
    q0, s0, _, z0 = quantize_act_reference(x, bits=bits, smooth=smooth, symmetric=False)
    lib_q, lib_s, lib_z = quantize_activation(xt, QuantSpec(bits, symmetric=False, granularity="token"))
    assert q0.dtype == jnp.int8 and s0.shape == z0.shape == (M, 1)
    assert np.array_equal(np.asarray(q0, np.int32) + half, np.asarray(lib_q, np.int32))
    assert np.array_equal(np.asarray(s0), np.asarray(lib_s)) and np.array_equal(np.asarray(z0) + half, np.asarray(lib_z))
    for group in (0, 64):
        spec = (QuantSpec(bits, granularity="group", group_size=group) if group
                else QuantSpec(bits, granularity="token"))
        q1, s1, _ = quantize_act_reference(x, bits=bits, smooth=smooth, group_size=group)
        lib_q, lib_s, lib_z = quantize_activation(xt, spec)
        assert lib_z is None and np.array_equal(np.asarray(q1), np.asarray(lib_q))
        assert np.array_equal(np.asarray(s1), np.asarray(lib_s))


@pytest.mark.parametrize("packed,kmajor", [(False, False), (True, True)])
def test_int_gemm_zero_point_correction(packed, kmajor):
    """``(xq - z) @ W`` through ``xq @ W - z ⊗ colsum(W)`` vs a float64 product."""
    xq, wq, sx, sw, bias, _, _, _, _ = _gemm_inputs(85, packed=packed)
    z = jnp.round(jax.random.uniform(jax.random.key(86), (M, 1), minval=-128, maxval=127))
    w = np.asarray(unpack_int4_reference(wq) if packed else wq, np.float64)
    want64 = ((np.asarray(xq, np.float64) - _f32(z)) @ w) * _f32(sx) * _f32(sw) + _f32(bias)
    want = int_gemm_reference(xq, wq, sx, sw, bias=bias, packed=packed, x_zero=z, out_dtype=jnp.float32)
    np.testing.assert_allclose(_f32(want), want64, rtol=1e-5, atol=1e-5 * np.abs(want64).max())
    wk = wq
    if kmajor:
        wk = pack_int4(unpack_int4_reference(wq).T) if packed else wq.T
    got = int_gemm(xq, wk, sx, sw, bias=bias, x_zero=z, packed=packed, w_kmajor=kmajor, config=GEMM_CPU)
    _close_bf16(got, int_gemm_reference(xq, wq, sx, sw, bias=bias, packed=packed, x_zero=z))
    # the reference reads the K-major layout too
    _close_bf16(got, int_gemm_reference(xq, wk, sx, sw, bias=bias, packed=packed, w_kmajor=kmajor, x_zero=z))
    with pytest.raises(ValueError, match="one scale group"):
        int_gemm_reference(xq, wq, jnp.ones((M, 2)), sw, packed=packed, x_zero=z)


def _gemm_inputs(seed, packed=False, group=None):
    k = _keys(seed, 9)
    xq = jax.random.randint(k[0], (M, K), -128, 128).astype(jnp.int8)
    sx = jax.random.uniform(k[1], (M, 1), minval=1e-3, maxval=2e-2)
    if packed:
        w = jax.random.randint(k[2], (K, N), -8, 8).astype(jnp.int8)
        wq = pack_int4(w)
    else:
        wq = jax.random.randint(k[2], (K, N), -128, 128).astype(jnp.int8)
    rows = K // group if group else 1
    sw = jax.random.uniform(k[3], (rows, N), minval=1e-3, maxval=2e-2)
    bias = jax.random.normal(k[4], (N,))
    xa = jax.random.normal(k[5], (M, R)).astype(jnp.bfloat16)
    l2 = (jax.random.normal(k[6], (R, N)) * 0.3).astype(jnp.bfloat16)
    gate = jax.random.normal(k[7], (2, N)).astype(jnp.bfloat16)
    res = jax.random.normal(k[8], (M, N)).astype(jnp.bfloat16)
    return xq, wq, sx, sw, bias, xa, l2, gate, res


def _close_bf16(got, want):
    got, want = _f32(got), _f32(want)
    assert got.shape == want.shape and np.isfinite(got).all()
    # both round the same float32 value to bf16: at most one bf16 ulp apart
    assert np.all(np.abs(got - want) <= 2 ** -7 * np.abs(want) + 1e-6)


@pytest.mark.parametrize("epi", ["plain", "full"])
def test_int8_gemm_kernel_vs_reference(epi):
    xq, wq, sx, sw, bias, xa, l2, gate, res = _gemm_inputs(10)
    kw = dict(bias=bias, xa=xa, l2=l2, gate=gate, residual=res) if epi == "full" else {}
    got = int_gemm(xq, wq, sx, sw, config=GEMM_CPU, **kw)
    want = int_gemm_reference(xq, wq, sx, sw, **kw)
    assert got.dtype == jnp.bfloat16
    _close_bf16(got, want)
    # the integer part is exact: compare with a float64 NumPy product
    if epi == "plain":
        acc = np.asarray(xq, np.int64) @ np.asarray(wq, np.int64)
        want64 = acc * np.asarray(sx, np.float64) * np.asarray(sw, np.float64)
        assert np.abs(_f32(got) - want64).max() <= 2 ** -7 * np.abs(want64).max()


@pytest.mark.parametrize("group", [None, 64, 32])
def test_w4_packed_gemm_kernel_vs_reference(group):
    xq, wq, sx, sw, bias, xa, l2, _, _ = _gemm_inputs(20 + (group or 0), packed=True, group=group)
    xq = jnp.clip(xq, -8, 7)  # W4A4: 4-bit activation codes carried in int8
    got = int_gemm(xq, wq, sx, sw, bias=bias, xa=xa, l2=l2, packed=True, config=GEMM_CPU)
    want = int_gemm_reference(xq, wq, sx, sw, bias=bias, xa=xa, l2=l2, packed=True)
    _close_bf16(got, want)


def test_mosaic_ws_variants_lower_for_cuda():
    """int4 weights, per-group scales and the fused low-rank branch trace to Mosaic GPU IR."""
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    S = jax.ShapeDtypeStruct
    m, k, n = 256, 512, 512
    f32, bf = jnp.float32, jnp.bfloat16
    cases = [  # (weight dtype, sx shape, sw shape, low rank: 0 none, 1 second accumulator, 2 in the result)
        (jnp.int4, (m,), (n,), 0), (jnp.int4, (m, k // 64), (k // 64, n), 1),
        (jnp.int8, (m, k // 128), (k // 128, n), 0), (jnp.int8, (m,), (n,), 1), (jnp.int8, (m,), (n,), 2),
        (jnp.int8, (m,), (n,), 3), (jnp.int8, (m,), (n,), 4),  # 3: zero points; 4: gate + residual
        (jnp.int8, (m,), (n,), 5)]  # 5: gate + residual read by TMA (res_load="tma")
    for wdt, sxs, sws, lr in cases:
        def f(x, w, sx, sw, b, xa, l2):
            return mk.int8_gemm_ws(x, w, sx, sw, bias=b, xa=xa if lr in (1, 2) else None,
                                   l2=l2 if lr in (1, 2) else None,
                                   x_zero=sx if lr == 3 else None, gate=b.reshape(1, n) if lr >= 4 else None,
                                   residual=xa @ l2 if lr >= 4 else None,
                                   config=mk.HopperGemmConfig(lr_in_acc=lr == 2,
                                                              res_load="tma" if lr == 5 else "direct"))
        txt = jax.jit(f).trace(S((m, k), jnp.int8), S((n, k), wdt), S(sxs, f32), S(sws, f32), S((n,), f32),
                               S((m, 32), bf), S((32, n), bf)).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in txt
    with pytest.raises(ValueError, match="group size"):
        mk.int8_gemm_ws(jnp.zeros((m, k), jnp.int8), jnp.zeros((n, k), jnp.int8), jnp.ones((m, 16)),
                        jnp.ones((n,)))


# name: (M, K, N, weight bits, group, act bits, low rank, bias).  Not here: a CTA with 3
# output tiles, int4 weights with more than 2 K-steps and the fused low-rank branch,
# which deadlock in jax 0.10.2's GPU interpreter at a barrier wait (pallas_kernels/NOTES.md).
WS_CASES = {
    "w8a8": (256, 256, 256, 8, 0, 8, False, True),
    "w8a8_wg_m": (256, 256, 128, 8, 0, 8, False, False),  # N=128 < 2 tiles: warpgroups split M
    "w8a8_4steps": (128, 512, 256, 8, 0, 8, False, False),
    "w4a8_int4": (128, 256, 256, 4, 0, 8, False, True),  # int4 [N, K] → int8 in the kernel
    "w8a8_g128": (128, 256, 256, 8, 128, 8, False, False),
    "w8a4_g64": (128, 256, 256, 8, 64, 4, False, True),  # per-(token, group) scales, 4 K-steps
    "w8a8_m_pad": (72, 256, 256, 8, 0, 8, False, True),  # M below the CTA tile: padded inside
}


@pytest.mark.parametrize("case", list(WS_CASES))
def test_mosaic_ws_gemm_in_gpu_interpreter_vs_reference(case):
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    params = mk.gpu_interpret_params()
    if params is None:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    m, k, n, wbits, group, abits, lr, has_bias = WS_CASES[case]
    ks = _keys(90 + len(case), 8)
    qa, qw = 2 ** (abits - 1), 2 ** (wbits - 1)
    xq = jax.random.randint(ks[0], (m, k), -qa, qa).astype(jnp.int8)
    w = jax.random.randint(ks[1], (k, n), -qw, qw).astype(jnp.int8)
    g = k // group if group else 1
    sx = jax.random.uniform(ks[2], (m, g), minval=1e-3, maxval=2e-2)
    sw = jax.random.uniform(ks[3], (g, n), minval=1e-3, maxval=2e-2)
    bias = jax.random.normal(ks[4], (n,)) if has_bias else None
    xa = jax.random.normal(ks[5], (m, 32)).astype(jnp.bfloat16) if lr else None
    l2 = (jax.random.normal(ks[6], (32, n)) * 0.3).astype(jnp.bfloat16) if lr else None
    wt = w.T.astype(jnp.int4) if wbits == 4 else w.T  # K-major, int4 packed two per byte
    got = mk.int8_gemm_ws(xq, wt, sx if group else sx[:, 0], sw if group else sw[0], bias=bias, xa=xa, l2=l2,
                          config=mk.HopperGemmConfig(num_sms=2, interpret=params))
    want = mk.int_gemm_reference(xq, w, sx, sw, bias=bias, xa=xa, l2=l2)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    _close_bf16(got, want)
    if not (lr or has_bias):  # the integer part against a float64 NumPy product
        xf = (np.asarray(xq, np.float64).reshape(m, g, -1) * _f32(sx)[..., None]).reshape(m, k)
        wf = (np.asarray(w, np.float64).reshape(g, -1, n) * _f32(sw)[:, None, :]).reshape(k, n)
        assert np.abs(_f32(got) - xf @ wf).max() <= 2 ** -7 * np.abs(xf @ wf).max()


@pytest.mark.parametrize("w4", [False, True])
def test_mosaic_ws_zero_point_in_gpu_interpreter(w4):
    """Asymmetric activations on the Hopper kernel: the epilogue's ``- z ⊗ colsum(W)``."""
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    params = mk.gpu_interpret_params()
    if params is None:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    m, k, n = 128, 256, 256
    ks = _keys(95 + w4, 5)
    xq = jax.random.randint(ks[0], (m, k), -128, 128).astype(jnp.int8)
    qw = 8 if w4 else 128
    w = jax.random.randint(ks[1], (k, n), -qw, qw).astype(jnp.int8)
    sx = jax.random.uniform(ks[2], (m, 1), minval=1e-3, maxval=2e-2)
    sw = jax.random.uniform(ks[3], (1, n), minval=1e-3, maxval=2e-2)
    z = jnp.round(jax.random.uniform(ks[4], (m, 1), minval=-128, maxval=127))
    wt = w.T.astype(jnp.int4) if w4 else w.T
    got = mk.int8_gemm_ws(xq, wt, sx[:, 0], sw[0], x_zero=z[:, 0],
                          config=mk.HopperGemmConfig(num_sms=2, interpret=params))
    _close_bf16(got, mk.int_gemm_reference(xq, w, sx, sw, x_zero=z))
    want64 = ((np.asarray(xq, np.float64) - _f32(z)) @ np.asarray(w, np.float64)) * _f32(sx) * _f32(sw)
    assert np.abs(_f32(got) - want64).max() <= 2 ** -7 * np.abs(want64).max()


# (the low-rank branch in jax 0.10.2's GPU interpreter deadlocks at a barrier wait, see
# WS_CASES; on the GPU bench_kernels checks gate + residual + low rank against the reference)
@pytest.mark.parametrize("m,n", [(256, 256), (512, 128)])
def test_mosaic_ws_gate_residual_in_gpu_interpreter(m, n):
    """DiT's ``x + gate · proj(h)`` in the Hopper epilogue (n=128: warpgroups split M, CTA 256 rows)."""
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    params = mk.gpu_interpret_params()
    if params is None:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    k = 128
    ks = _keys(97 + m, 7)
    xq = jax.random.randint(ks[0], (m, k), -128, 128).astype(jnp.int8)
    w = jax.random.randint(ks[1], (k, n), -128, 128).astype(jnp.int8)
    sx = jax.random.uniform(ks[2], (m, 1), minval=1e-3, maxval=2e-2)
    sw = jax.random.uniform(ks[3], (1, n), minval=1e-3, maxval=2e-2)
    bias = jax.random.normal(ks[4], (n,))
    gate = jax.random.normal(ks[5], (2, n)).astype(jnp.bfloat16)  # two samples of m/2 tokens
    res = jax.random.normal(ks[6], (m, n)).astype(jnp.bfloat16)
    got = mk.int8_gemm_ws(xq, w.T, sx[:, 0], sw[0], bias=bias, gate=gate, residual=res,
                          config=mk.HopperGemmConfig(num_sms=2, interpret=params))
    _close_bf16(got, mk.int_gemm_reference(xq, w, sx, sw, bias=bias, gate=gate, residual=res))
    y64 = (np.asarray(xq, np.float64) @ np.asarray(w, np.float64)) * _f32(sx) * _f32(sw) + _f32(bias)
    want64 = _f32(res) + np.repeat(_f32(gate), m // 2, axis=0) * y64
    assert np.abs(_f32(got) - want64).max() <= 2 ** -6 * np.abs(want64).max()
    with pytest.raises(ValueError, match="whole CTA tiles"):  # a tile would span two samples
        mk.int8_gemm_ws(xq, w.T, sx[:, 0], sw[0], gate=jnp.ones((4 if m == 256 else 8, n)),
                        config=mk.HopperGemmConfig(interpret=params))


def _rerun_with_8_pool_threads(test_id: str) -> None:
    """Run ``test_id`` of this file again in a child pytest with ``PJRT_NPROC=8``: the Mosaic GPU
    interpreter runs each warpgroup on XLA's CPU pool, one thread per core, and the consumers'
    waits starve it on 2 cores (pallas_kernels/NOTES.md)."""
    node = f"{os.path.abspath(__file__)}::{test_id}"
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:randomly", node],
                           env=dict(os.environ, PJRT_NPROC="8"), capture_output=True, text=True, timeout=480)
    except subprocess.TimeoutExpired:
        pytest.fail("the interpreted kernel hung (a barrier wait that never completes)")
    assert r.returncode == 0, r.stdout[-4000:]


def test_mosaic_ws_several_tiles_per_cta_in_gpu_interpreter():
    """Two output tiles on one CTA (the persistent loop re-entering the pipeline) with
    ``mma_in_flight=0``: exact integer products, three runs.  (At the default 1 the interpreter
    gets the first tile wrong about half the time: pallas_kernels/NOTES.md.)"""
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    params = mk.gpu_interpret_params()
    if params is None:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    if os.environ.get("PJRT_NPROC") != "8":
        return _rerun_with_8_pool_threads("test_mosaic_ws_several_tiles_per_cta_in_gpu_interpreter")
    ks = _keys(141, 2)
    xq = jax.random.randint(ks[0], (256, 128), -128, 128).astype(jnp.int8)
    w = jax.random.randint(ks[1], (128, 256), -128, 128).astype(jnp.int8)
    want = np.asarray(xq, np.float64) @ np.asarray(w, np.float64)
    cfg = mk.HopperGemmConfig(num_sms=1, mma_in_flight=0, interpret=params)
    for _ in range(3):
        got = _f32(mk.int8_gemm_ws(xq, w.T, jnp.ones((256,)), jnp.ones((256,)), config=cfg))
        assert np.abs(got - want).max() <= 2 ** -8 * np.abs(want).max()  # bf16 output rounding
    with pytest.raises(ValueError, match="mma_in_flight"):
        mk.HopperGemmConfig(mma_in_flight=2)


def _gelu_tanh64(y):
    """float64 GELU, tanh form (jax.nn.gelu(approximate=True))."""
    return 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))


@pytest.mark.parametrize("res_load", ["direct", "tma"])
def test_mosaic_ws_gelu_gate_residual_in_gpu_interpreter(res_load):
    """DiT's ``x + gate · fc(GELU(h))`` composition: ``residual + gate · gelu(y)`` in the Hopper
    epilogue, against the reference and float64 NumPy; the reference's activation follows too.
    ``res_load="tma"``: the residual tile copied into shared memory at each output tile's start
    (one tile per CTA: with several, jax 0.10.2's GPU interpreter gets the plain kernel wrong too,
    while the GPU runs of bench_kernels.py check it at every shape)."""
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    params = mk.gpu_interpret_params()
    if params is None:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    if res_load == "tma" and os.environ.get("PJRT_NPROC") != "8":  # (waits on its own TMA copies)
        return _rerun_with_8_pool_threads("test_mosaic_ws_gelu_gate_residual_in_gpu_interpreter[tma]")
    m, k, n = 256, 128, 256
    ks = _keys(131, 6)
    xq = jax.random.randint(ks[0], (m, k), -128, 128).astype(jnp.int8)
    w = jax.random.randint(ks[1], (k, n), -128, 128).astype(jnp.int8)
    sx = jax.random.uniform(ks[2], (m, 1), minval=1e-3, maxval=2e-2)
    sw = jax.random.uniform(ks[3], (1, n), minval=1e-3, maxval=2e-2)
    gate = jax.random.normal(ks[4], (2, n)).astype(jnp.bfloat16)
    res = jax.random.normal(ks[5], (m, n)).astype(jnp.bfloat16)
    got = mk.int8_gemm_ws(xq, w.T, sx[:, 0], sw[0], gate=gate, residual=res, activation="gelu_tanh",
                          config=mk.HopperGemmConfig(num_sms=2, res_load=res_load, interpret=params))
    ref = mk.int_gemm_reference(xq, w, sx, sw, gate=gate, residual=res, activation="gelu_tanh")
    _close_bf16(got, ref)
    y64 = (np.asarray(xq, np.float64) @ np.asarray(w, np.float64)) * _f32(sx) * _f32(sw)
    assert np.abs(y64).max() > 2  # GELU's nonlinear range is exercised, not only its linear part
    want64 = _f32(res) + np.repeat(_f32(gate), m // 2, axis=0) * _gelu_tanh64(y64)
    scale = np.abs(want64).max()
    assert np.abs(_f32(got) - want64).max() <= 2 ** -6 * scale
    assert np.abs(_f32(ref) - want64).max() <= 2 ** -7 * scale
    with pytest.raises(ValueError, match="activation"):
        mk.int8_gemm_ws(xq, w.T, sx[:, 0], sw[0], activation="relu", config=mk.HopperGemmConfig(interpret=params))
    with pytest.raises(ValueError, match="res_load"):
        mk.HopperGemmConfig(res_load="smem")


@pytest.mark.parametrize("had", [0, 64])
def test_quantize_kernel_per_group_scales(had):
    k = _keys(60 + had, 3)
    x = (jax.random.normal(k[0], (M, K)) * jnp.linspace(0.1, 4.0, K)).astype(jnp.bfloat16)
    smooth = jax.random.uniform(k[1], (K,), minval=0.5, maxval=2.0)
    l1 = jax.random.normal(k[2], (K, R)) / math.sqrt(K)
    q, s, xl1 = quantize_act(x, bits=4, smooth=smooth, had_block=had, l1=l1, group_size=64,
                             config=QuantizeConfig(interpret=True))
    q0, s0, xl10 = quantize_act_reference(x, bits=4, smooth=smooth, had_block=had, l1=l1, group_size=64)
    assert s.shape == s0.shape == (M, K // 64)
    # the reference's per-group scale is each group's absmax / 7 (float64 check)
    xt = _f32(transform_input_reference(x, smooth, had))
    np.testing.assert_allclose(_f32(s0), np.abs(xt.reshape(M, K // 64, 64)).max(-1) / 7, rtol=1e-6)
    d = np.abs(np.asarray(q, np.int32) - np.asarray(q0, np.int32))
    assert np.asarray(q).min() >= -8 and np.asarray(q).max() <= 7
    if had:
        assert d.max() <= 1 and (d > 0).mean() < 2e-3
        assert np.abs(_f32(s) - _f32(s0)).max() / np.abs(_f32(s0)).max() < 1e-4
    else:
        assert d.max() == 0 and np.array_equal(np.asarray(s), np.asarray(s0))
    assert np.abs(_f32(xl1) - _f32(xl10)).max() / np.abs(_f32(xl10)).max() < 1.5e-2


@pytest.mark.parametrize("kmajor,packed", [(False, False), (True, False), (True, True), (False, True)])
def test_gemm_per_token_group_scales_and_kmajor(kmajor, packed):
    """W4A4 with one scale per (token, 64 channels) and per (64 channels, column), weights
    stored [K, N] or K-major [N, K]; the reference equals the float64 product of the
    dequantized operands, the kernel equals the reference."""
    k = _keys(70, 4)
    xq = jax.random.randint(k[0], (M, K), -8, 8).astype(jnp.int8)
    w = jax.random.randint(k[1], (K, N), -8, 8).astype(jnp.int8)
    sx = jax.random.uniform(k[2], (M, K // 64), minval=1e-3, maxval=2e-2)
    sw = jax.random.uniform(k[3], (K // 64, N), minval=1e-3, maxval=2e-2)
    want = int_gemm_reference(xq, w, sx, sw, out_dtype=jnp.float32)
    xf = (np.asarray(xq, np.float64).reshape(M, K // 64, 64) * _f32(sx)[..., None]).reshape(M, K)
    wf = (np.asarray(w, np.float64).reshape(K // 64, 64, N) * _f32(sw)[:, None, :]).reshape(K, N)
    np.testing.assert_allclose(_f32(want), xf @ wf, rtol=1e-5, atol=1e-6)
    wq = w.T if kmajor else w
    wq = pack_int4(wq) if packed else wq
    got = int_gemm(xq, wq, sx, sw, packed=packed, w_kmajor=kmajor, config=GEMM_CPU)
    _close_bf16(got, want)


def test_mosaic_ws_gemm_lowers_for_cuda():
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    S = jax.ShapeDtypeStruct
    for n in (512, 384):  # warpgroups split along N, and along M when N % 256 != 0
        f = lambda x, w, sx, sw, b: mk.int8_gemm_ws(x, w, sx, sw, bias=b)
        txt = jax.jit(f).trace(S((256, 256), jnp.int8), S((n, 256), jnp.int8), S((256,), jnp.float32),
                               S((n,), jnp.float32), S((n,), jnp.float32)).lower(
                                   lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in txt


def test_mosaic_ws_smem_budget_fits_int4_with_m_split():
    """H100, jax 0.11.2: int4 weights with warpgroups split along M (N % 256 != 0) asked for
    262208 B of SMEM > 232448 B (bench/results/e2e_h100.json diag rows); the pipeline is now
    shortened until it fits.  The byte count reproduces the GPU's figure (less 64 B of barriers)."""
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    cfg = dict(cta_m=256, cta_n=128, tile_m=128, tile_n=128, tile_k=128, w4=True, grouped=False, rank=0,
               out_slots=2 * 64 * 64, out_bytes=2)
    assert mk.smem_bytes(4, **cfg) == 262208 - 64
    assert mk.smem_bytes(3, **cfg) <= mk.SMEM_BUDGET < mk.smem_bytes(4, **cfg)
    # the int8 kernel at the same tiles (run on the GPU with 4 stages) fits as it is
    assert mk.smem_bytes(4, **{**cfg, "w4": False}) <= mk.SMEM_BUDGET
