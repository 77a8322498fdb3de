"""pallas_kernels.twinlog_gemm_hopper: the Hopper twin-log GEMM in jax's Mosaic GPU interpreter
(CPU) against its pure-jnp reference and a float64 NumPy eq. 7 product; its exp2-free decode
against float64 ``2^(s q + o)``, the Triton kernel's decode and a jaxdq twin-log layer; its CUDA
lowering (bf16 wgmma into float32, no exp2); the tile rules and checks.

The interpreter runs each of the kernel's three warpgroups as an XLA CPU execution on XLA's
CPU thread pool, which has as many threads as cores: on 2 cores two warpgroups blocked at a
barrier starve the third and the run hangs.  So the interpreter cases run in one child
process with ``PJRT_NPROC=8`` (more pool threads), this file being its script.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

th = pytest.importorskip("pallas_kernels.twinlog_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (M, K, N, bias, out dtype, config fields, race detection).  tile_k = 64.
CASES = {
    # own decode, warpgroups split along N (CTA 128 × 256), 4 K-steps through a 4-deep pipeline
    "own_n_split_bias_4steps": (128, 256, 256, True, "bfloat16", {}, False),
    # N = 128 < 2 tiles: warpgroups split along M (CTA 256 × 128); 72 rows padded to 256
    "own_m_split_ragged_f32": (72, 256, 128, False, "float32", {}, False),
    # shared decode: turns by step parity over 3 K-steps, 2 output tiles on one CTA
    "shared_3steps_2tiles_bias": (512, 192, 128, True, "float32", {"shared_decode": True, "num_sms": 1}, False),
    # shared decode at CTA 128 × 64 (the 512 × 64 tiling's structure), 2 CTAs × 2 tiles,
    # under the interpreter's happens-before race detector (a missing barrier is a race)
    "shared_64x64_race_check": (200, 128, 128, False, "bfloat16",
                                {"shared_decode": True, "tile_m": 64, "tile_n": 64, "num_sms": 2}, True),
}


def _case_operands(name):
    """Deterministic operands of a case: bf16 int8-valued codes ``xq [M, K]``, ``sx [M]``,
    int8 twin-log codes ``c [N, K]`` (all 16 values), float32 ``step, offset [2, N]`` (the
    sides differ), ``bias [N]`` or None."""
    m, k, n, has_bias = CASES[name][:4]
    rng = np.random.default_rng(sum(map(ord, name)))
    xq = rng.integers(-127, 128, (m, k)).astype(np.float32)
    sx = rng.uniform(1e-3, 2e-2, m).astype(np.float32)
    c = rng.integers(-8, 8, (n, k)).astype(np.int8)
    step = rng.uniform(0.2, 1.6, (2, n)).astype(np.float32)
    offset = rng.uniform(-14.0, -6.0, (2, n)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if has_bias else None
    return xq, sx, c, step, offset, bias


def _run_case(name):
    """(child process) the kernel's output of one case and whether races were found."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    m, k, n, _, out, cfg, races = CASES[name]
    xq, sx, c, step, offset, bias = _case_operands(name)
    params = InterpretGPUParams(detect_races=races)
    config = th.TwinLogHopperConfig(interpret=params, **cfg)
    y = th.twinlog_gemm_hopper(jnp.asarray(xq, jnp.bfloat16), jnp.asarray(sx), jnp.asarray(c, jnp.int4),
                               th.decode_constants(step, offset), bias=None if bias is None else jnp.asarray(bias),
                               out_dtype=jnp.dtype(out), config=config)
    found = None
    if races:
        from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
        found = bool(interpret_pallas_call.get_races().races_found)
    return np.asarray(y.astype(jnp.float32)), str(y.dtype), found


def _child_main(out_path):
    results, meta = {}, {}
    for name in CASES:
        y, dtype, races = _run_case(name)
        results[name] = y
        meta[name] = {"dtype": dtype, "races_found": races}
    np.savez(out_path, **results)
    with open(out_path + ".json", "w") as fh:
        json.dump(meta, fh)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    """``{case: (output float32, dtype name, races found)}`` from one child process."""
    from pallas_kernels.int_gemm_hopper import gpu_interpret_params

    if gpu_interpret_params() is None:  # pragma: no cover
        pytest.skip("this jax has no Mosaic GPU interpreter")
    out = str(tmp_path_factory.mktemp("twinlog_hopper") / "out.npz")
    env = dict(os.environ, PJRT_NPROC="8", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run([sys.executable, os.path.abspath(__file__), out], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=480)
    except subprocess.TimeoutExpired:
        pytest.fail("the Mosaic GPU interpreter cases hung (a barrier wait that never completes)")
    assert r.returncode == 0, r.stderr[-4000:]
    ys = np.load(out)
    with open(out + ".json") as fh:
        meta = json.load(fh)
    return {k: (ys[k], meta[k]["dtype"], meta[k]["races_found"]) for k in CASES}


def eq7_float64(c, step, offset):
    """Float64 eq. 7 weights ``[K, N]`` of the codes ``c [N, K]``: ``±2^(s q + o)`` per side."""
    c = np.asarray(c, np.int64)
    neg = c < 0
    q = np.abs(c) - 1
    s = np.where(neg, np.float64(step[1])[:, None], np.float64(step[0])[:, None])
    o = np.where(neg, np.float64(offset[1])[:, None], np.float64(offset[0])[:, None])
    w = np.where(neg, -1.0, 1.0) * np.exp2(s * q + o)
    return np.where(c == 0, 0.0, w).T


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_in_gpu_interpreter_vs_reference_and_float64(interpreted, name):
    m, k, n, has_bias, out, _, races = CASES[name]
    got, dtype, races_found = interpreted[name]
    assert got.shape == (m, n) and dtype == out
    if races:
        assert races_found is False
    xq, sx, c, step, offset, bias = _case_operands(name)
    got = got.astype(np.float64)
    out_tol = 2.0 ** -8 if out == "bfloat16" else 0.0            # the output cast
    want = _f64(th.twinlog_gemm_hopper_reference(jnp.asarray(xq), jnp.asarray(sx), jnp.asarray(c, jnp.int4),
                                                 th.decode_constants(step, offset),
                                                 bias=None if bias is None else jnp.asarray(bias),
                                                 out_dtype=jnp.float32))
    x_hat = xq.astype(np.float64) * sx.astype(np.float64)[:, None]
    w64 = eq7_float64(c, step, offset)
    scale = np.abs(x_hat) @ np.abs(w64) + (0.0 if bias is None else np.abs(bias))
    # the kernel is its reference up to float32 accumulation order and the output cast
    assert np.all(np.abs(got - want) <= out_tol * np.abs(want) + 1e-5 * scale), np.abs(got - want).max()
    # and the float64 eq. 7 product within the stated decode bound
    y64 = x_hat @ w64 + (0.0 if bias is None else bias.astype(np.float64))
    bound = th.HOPPER_DECODE_REL_ERROR * (np.abs(x_hat) @ np.abs(w64)) + out_tol * np.abs(y64) + 1e-5 * scale
    assert np.all(np.abs(got - y64) <= bound), np.abs(got - y64).max()


def test_decode_is_float64_eq7_within_the_stated_bounds():
    """Every code of every column, steps 0.05–2.5 and offsets −24–2 per side."""
    from pallas_kernels.twinlog_gemm import DECODE_REL_ERROR, decode_twinlog_reference

    rng = np.random.default_rng(0)
    n = 96
    c = np.tile(np.arange(-8, 8, dtype=np.int8), 6)[None, :].repeat(n, 0)          # [N, K = 96]
    step = rng.uniform(0.05, 2.5, (2, n)).astype(np.float32)
    offset = rng.uniform(-24.0, 2.0, (2, n)).astype(np.float32)
    wt, consts = jnp.asarray(c, jnp.int4), th.decode_constants(step, offset)
    w64 = eq7_float64(c, step, offset)
    w32 = _f64(th.decode_twinlog_hopper_reference(wt, consts, jnp.float32))
    nz = w64 != 0
    np.testing.assert_array_equal(w32 == 0, ~nz)
    np.testing.assert_array_equal(np.sign(w32), np.sign(w64))
    assert np.max(np.abs(w32[nz] - w64[nz]) / np.abs(w64[nz])) <= th.F32_DECODE_REL_ERROR
    wb = _f64(th.decode_twinlog_hopper_reference(wt, consts))
    assert np.all(np.abs(wb - w64) <= th.HOPPER_DECODE_REL_ERROR * np.abs(w64))
    # the Triton kernel's exp2 decode of the same codes: the same bf16 but at near-ties
    u = np.where(c < 0, c + 16, c).astype(np.uint8).T                                # nibbles [K, N]
    wq = jnp.asarray(u[:, 0::2] | (u[:, 1::2] << 4))
    wtri = _f64(decode_twinlog_reference(wq, jnp.asarray(step), jnp.asarray(offset)))
    differ = wtri != wb
    assert differ.mean() < 0.01
    assert np.all(np.abs(wtri - wb) <= 2 * DECODE_REL_ERROR * np.abs(w64))


def test_operands_of_a_jaxdq_twinlog_layer_decode_to_its_weight():
    from jaxdq.quant import twinlog as tl
    from pallas_kernels.twinlog_gemm import kernel_table

    rng = np.random.default_rng(1)
    w = (0.05 * rng.standard_t(4, size=(128, 64))).astype(np.float32)
    w[:, 3] = 0.0
    tw = tl.TwinLogWeight.from_kernel(w, tl.TwinLogSpec(bits=4, alpha_grid=5, step_grid=6))
    wt, consts = th.twinlog_hopper_operands(tw.codes, *kernel_table(*tw.params))
    assert wt.shape == (64, 128) and wt.dtype == jnp.int4 and consts.shape == (8, 64)
    np.testing.assert_array_equal(np.asarray(wt.astype(jnp.int8)).T, np.asarray(tw.unpacked()))
    w_f = _f64(tw.dequantize())                                  # the library's float32 eq. 7
    got = _f64(th.decode_twinlog_hopper_reference(wt, consts))
    np.testing.assert_array_equal(got == 0, w_f == 0)
    assert np.all(np.abs(got - w_f) <= (th.HOPPER_DECODE_REL_ERROR + 2.0 ** -20) * np.abs(w_f))


def test_reference_gemm_is_the_float64_product_of_its_decode():
    xq, sx, c, step, offset, bias = _case_operands("own_n_split_bias_4steps")
    wt, consts = jnp.asarray(c, jnp.int4), th.decode_constants(step, offset)
    got = _f64(th.twinlog_gemm_hopper_reference(jnp.asarray(xq, jnp.bfloat16), jnp.asarray(sx)[:, None], wt,
                                                consts, bias=jnp.asarray(bias), out_dtype=jnp.float32))
    wb = _f64(th.decode_twinlog_hopper_reference(wt, consts))
    want = (xq.astype(np.float64) @ wb) * sx.astype(np.float64)[:, None] + bias
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _mosaic_module_text(monkeypatch, f, *avals):
    """The Mosaic GPU module of ``f`` lowered for CUDA, after layout inference (its IR names the
    wgmma's operand types)."""
    import jax.experimental.mosaic.gpu as mgpu

    texts = []
    infer = mgpu.infer_layout

    def capture(module, **kw):
        out = infer(module, **kw)
        texts.append(str(module))
        return out
    monkeypatch.setattr(mgpu, "infer_layout", capture)
    txt = jax.jit(f).trace(*avals).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in txt
    return "\n".join(texts)


@pytest.mark.parametrize("cfg, n, out", [
    ({}, 512, jnp.bfloat16),                                                   # own decode, N split
    ({"shared_decode": True}, 384, jnp.float32),                               # shared, CTA 256 × 128
    ({"shared_decode": True, "tile_m": 256, "tile_n": 64}, 512, jnp.bfloat16),  # shared, CTA 512 × 64
])
def test_lowers_for_cuda_to_a_bf16_wgmma_without_exp2(monkeypatch, cfg, n, out):
    S = jax.ShapeDtypeStruct
    m, k = 520, 576   # (distinct shapes: no lowering cache hit)
    config = th.TwinLogHopperConfig(**cfg)

    def f(x, s, w, cst, b):
        return th.twinlog_gemm_hopper(x, s, w, cst, bias=b, out_dtype=out, config=config)
    mod = _mosaic_module_text(monkeypatch, f, S((m, k), jnp.bfloat16), S((m,), jnp.float32), S((n, k), jnp.int4),
                              S((8, n), jnp.float32), S((n,), jnp.float32))
    wgmma = [ln for ln in mod.splitlines() if "mosaic_gpu.wgmma" in ln]
    assert wgmma and all("xbf16" in ln and "xf32>" in ln for ln in wgmma)
    assert "exp2" not in mod and "xi4" in mod


def test_config_rule_shapes_and_checks():
    cfg = th.TwinLogHopperConfig()
    hash(cfg)
    with pytest.raises(Exception):
        cfg.tile_m = 64
    assert th.twinlog_hopper_config(2, 6912) == th.TwinLogHopperConfig(tile_m=64, tile_n=64)
    assert th.twinlog_hopper_config(8192, 4608) == th.TwinLogHopperConfig(shared_decode=True)
    assert th.twinlog_hopper_config(512, 3456).tile_n == 64         # 2 × 27 tiles of 256 × 128: too few
    # every DiT-XL/2 / PixArt-Σ / FLUX.1 shape of bench/bench_twinlog.py plans within the SMEM budget
    alternates = [{"shared_decode": True, "tile_m": 256, "tile_n": 64}, {"tile_m": 128, "tile_n": 128}]
    for m, k, n in [(2, 1152, 6912), (512, 1152, 3456), (512, 1152, 4608), (512, 4608, 1152), (8192, 1152, 3456),
                    (8192, 1152, 4608), (8192, 4608, 1152), (600, 1152, 2304), (2, 3072, 18432),
                    (4608, 3072, 9216), (4608, 3072, 12288), (4608, 12288, 3072)]:
        for c in [th.twinlog_hopper_config(m, n)] + [th.TwinLogHopperConfig(**a) for a in alternates]:
            for out in (jnp.bfloat16, jnp.float32):
                plan = th._plan(m, n, k, c, out)
                assert plan.m_pad % plan.cta_m == 0 and plan.m_pad >= m and plan.steps >= 2
    xq, sx = jnp.zeros((128, 256), jnp.bfloat16), jnp.ones((128,))
    w, cst = jnp.zeros((256, 256), jnp.int4), jnp.zeros((8, 256))
    with pytest.raises(ValueError, match="jnp.int4"):
        th.twinlog_gemm_hopper(xq, sx, w.astype(jnp.int8), cst)
    with pytest.raises(ValueError, match="multiples of 64"):
        th.twinlog_gemm_hopper(xq, sx, w, cst, config=th.TwinLogHopperConfig(tile_k=32))
    with pytest.raises(ValueError, match="wg_dim"):
        th.twinlog_gemm_hopper(xq, sx, w, cst, config=th.TwinLogHopperConfig(shared_decode=True, wg_dim="n"))
    with pytest.raises(ValueError, match="not divisible"):
        th.twinlog_gemm_hopper(xq, sx, w[:192], cst[:, :192])
    with pytest.raises(ValueError, match="SMEM"):
        th.twinlog_gemm_hopper(xq, sx, w, cst, config=th.TwinLogHopperConfig(tile_m=256, tile_n=256, tile_k=256))


if __name__ == "__main__":  # the child process of the ``interpreted`` fixture
    _child_main(sys.argv[1])
