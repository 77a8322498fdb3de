"""pallas_kernels.twinlog_gemm: the twin-log GEMM in Pallas' interpreter (CPU) vs its jnp
reference, the reference vs eq. 7 (jaxdq.quant.twinlog) to the stated bf16 bound, the
backend's kernel path on a twin-log layer, and the kernel's lowering for CUDA (its main
loop's dot takes bf16 operands; the decode is an ``exp2``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import backend
from jaxdq.quant import duquant as dq
from jaxdq.quant import twinlog as tl
from jaxdq.quant.hadamard import BlockHadamard
from jaxdq.quant.layers import FloatLinear
from jaxdq.quant.quantizer import QuantSpec, quantize_activation
from jaxdq.quant.rules import LayerQuant, quantize_linear
from jaxdq.quant.transforms import rotate_layer
from pallas_kernels.twinlog_gemm import (DECODE_REL_ERROR, TwinLogGemmConfig, decode_twinlog_reference,
                                         kernel_table, twinlog_gemm, twinlog_gemm_config, twinlog_gemm_reference)

SMALL = dict(alpha_grid=5, step_grid=6)
CPU = TwinLogGemmConfig(block_m=16, block_n=32, block_k=32, interpret=True)


def _weight(seed, k, n, bits=4):
    rng = np.random.default_rng(seed)
    w = (0.05 * rng.standard_t(4, size=(k, n))).astype(np.float32)
    w[:, 1] = 0.0          # a zero column (DiT's zero-initialized layers)
    w[3, :] = 0.0          # exact zeros
    return tl.TwinLogWeight.from_kernel(w, tl.TwinLogSpec(bits=bits, **SMALL))


def _acts(seed, m, k, bits=8):
    x = jax.random.normal(jax.random.key(seed), (m, k)) * 2.0
    xq, sx, _ = quantize_activation(x, QuantSpec(bits=bits, granularity="token"))
    return xq, sx


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def test_decode_is_eq7_and_bf16_within_its_bound():
    tw = _weight(0, 64, 32)
    step, offset = kernel_table(*tw.params)
    w_f = _f64(tw.dequantize())                             # eq. 7 (jaxdq.quant.twinlog.decode)
    w32 = _f64(decode_twinlog_reference(tw.codes, step, offset, jnp.float32))
    np.testing.assert_allclose(w32, w_f, rtol=2e-6, atol=0)
    np.testing.assert_array_equal(w32 == 0, w_f == 0)
    wb = _f64(decode_twinlog_reference(tw.codes, step, offset))
    assert np.all(np.abs(wb - w_f) <= DECODE_REL_ERROR * np.abs(w_f))


@pytest.mark.parametrize("m, k, n, bias, act_bits, w_bits", [
    (32, 64, 64, True, 8, 4),
    (16, 96, 32, False, 4, 4),     # A4 codes in int8; K = 3 steps of 32
    (48, 64, 64, True, 6, 3),      # a 3-bit weight's codes, carried in nibbles
])
def test_kernel_matches_reference(m, k, n, bias, act_bits, w_bits):
    tw = _weight(1 + m, k, n, w_bits)
    codes4 = tl.pack_codes(tw.unpacked(), 4)                 # the kernel reads 4-bit nibbles
    step, offset = kernel_table(*tw.params)
    xq, sx = _acts(2, m, k, act_bits)
    b = jnp.linspace(-1, 1, n) if bias else None
    got = twinlog_gemm(xq, sx, codes4, step, offset, bias=b, out_dtype=jnp.float32, config=CPU)
    want = twinlog_gemm_reference(xq, sx, codes4, step, offset, bias=b, out_dtype=jnp.float32)
    scale = np.abs(_f64(xq) * _f64(sx)) @ np.abs(_f64(tw.dequantize())) + 1.0
    assert np.all(np.abs(_f64(got) - _f64(want)) <= 1e-5 * scale)
    # and the reference against the float eq. 7 product, to the stated bf16 bound
    x_hat = _f64(xq) * _f64(sx)
    y_f = x_hat @ _f64(tw.dequantize()) + (0 if b is None else _f64(b))
    bound = DECODE_REL_ERROR * (np.abs(x_hat) @ np.abs(_f64(tw.dequantize())))
    assert np.all(np.abs(_f64(want) - y_f) <= bound + 1e-5 * scale)


def test_config_and_shape_checks():
    assert twinlog_gemm_config(2).block_m == 16 and twinlog_gemm_config(512).block_m == 128
    assert twinlog_gemm_config(64).block_m == 64
    cfg = TwinLogGemmConfig()
    with pytest.raises(dataclasses_frozen_error()):
        cfg.block_m = 64
    hash(cfg)
    tw = _weight(3, 64, 32)
    step, offset = kernel_table(*tw.params)
    xq, sx = _acts(4, 24, 64)
    with pytest.raises(ValueError, match="do not tile"):
        twinlog_gemm(xq, sx, tw.codes, step, offset, config=CPU)   # M = 24 is not a multiple of 16


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


@pytest.mark.parametrize("rotation", ["none", "block", "duquant"])
def test_backend_kernel_path_on_a_twinlog_layer(rotation):
    """policy("kernels", interpret=True) runs the quantize kernel + the twin-log GEMM on a
    4-bit twin-log layer (a DuQuant rotation applied by XLA first) and matches the
    fake-quant reference to the bf16 bound; W3 layers take the integer path."""
    rng = np.random.default_rng(5)
    k, n = 128, 128
    x = rng.standard_normal((3, 7, k)).astype(np.float32)
    x[..., 5] *= 40.0
    layer = FloatLinear(kernel=jnp.asarray(0.05 * rng.standard_normal((k, n)), jnp.float32),
                        bias=jnp.asarray(rng.standard_normal(n), jnp.float32))
    if rotation == "block":
        layer = rotate_layer(layer, BlockHadamard(64))
    elif rotation == "duquant":
        layer = rotate_layer(layer, dq.duquant_rotation(np.abs(x).max(axis=(0, 1))))
    cfg = LayerQuant(weight=tl.TwinLogSpec(bits=4, **SMALL), act=QuantSpec(8, granularity="token"), pack=True)
    q = quantize_linear(layer, cfg)
    pol = backend.policy("kernels", interpret=True)
    assert backend.choose(q, 21, pol) == "kernel" and backend.twinlog_kernel_supported(q)
    got = _f64(backend.execute(q, jnp.asarray(x), pol))
    want = _f64(backend.execute(q, jnp.asarray(x), backend.REFERENCE))
    assert str(jax.make_jaxpr(lambda a: backend.execute(q, a, pol))(jnp.asarray(x))).count("pallas_call") == 2
    xt = _f64(q.transform.apply(jnp.asarray(x)))
    scale = np.abs(xt) @ np.abs(_f64(q.weight.dequantize()))
    # bf16 decode bound + the kernel's bf16 output rounding (2^-9 relative) + quantization-code ties
    assert np.all(np.abs(got - want) <= 2 * DECODE_REL_ERROR * (scale + np.abs(want)) + 1e-3 * scale.max())
    q3 = quantize_linear(layer, cfg.__class__(weight=tl.TwinLogSpec(bits=3, **SMALL), act=cfg.act, pack=True))
    assert not backend.twinlog_kernel_supported(q3) and backend.choose(q3, 21, pol) == "int"


def _triton_ir(lowered) -> list[str]:
    """TTIR text of every Pallas-Triton custom call of a lowered computation."""
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    texts = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for o in block.operations:
                    try:
                        data = ir.StringAttr(ir.DictAttr(o.attributes["mhlo.backend_config"])["ir"]).value_bytes
                    except Exception:  # noqa: BLE001  (not a Triton call)
                        data = None
                    if data:
                        ctx = ir.Context()
                        triton.dialect.register_dialect(ctx)
                        with ctx:
                            texts.append(str(ir.Module.parse(data)))
                    walk(o)

    walk(lowered.compiler_ir("stablehlo").operation)
    return texts


def test_lowers_for_cuda_with_a_bf16_dot_and_exp2_decode():
    S = jax.ShapeDtypeStruct
    m, k, n = 256, 1152, 1152
    f = lambda x, s, w, st, of: twinlog_gemm(x, s, w, st, of, config=TwinLogGemmConfig())  # noqa: E731
    try:
        low = jax.jit(f).trace(S((m, k), jnp.int8), S((m, 1), jnp.float32), S((k, n // 2), jnp.uint8),
                               S((2, n), jnp.float32), S((2, n), jnp.float32)).lower(lowering_platforms=("cuda",))
        texts = _triton_ir(low)
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"cannot lower Pallas-Triton for CUDA here: {type(e).__name__}")
    assert len(texts) == 1
    dots = [line for line in texts[0].splitlines() if "tt.dot" in line]
    assert len(dots) == 1 and "tensor<128x64xbf16> * tensor<64x128xbf16> -> tensor<128x128xf32>" in dots[0]
    assert texts[0].count("exp2") >= 2    # one ex2 per nibble half of the weight tile
