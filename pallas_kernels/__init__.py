"""Pallas GPU kernels of quantized linear layers: one op per file, each with its jnp
reference and its frozen tuning config beside it (``op(arrays..., config=Config())``, as
the Hopper matmul examples that ship with jax take a ``TuningConfig``).

Ops:

* :mod:`pallas_kernels.quantize_act` (Pallas-Triton): ``quantize_act(x, *, bits, smooth,
  had_block, l1, group_size, symmetric, config=QuantizeConfig())``: ``X' = H(X / smooth)``
  → int8 codes, per-token / per-(token, group) scales (and zero points when asymmetric)
  and ``X' L1`` in one kernel; ``quantize_config(m, k, *, dot, smooth, grouped)`` (the
  H100-measured launch table); references ``quantize_act_reference``,
  ``transform_input_reference``, ``block_hadamard_reference``.
* :mod:`pallas_kernels.norm_quantize` (Pallas-Triton): ``norm_quantize(x, mul, add, *, norm,
  eps, bits, fmt, had_block, l1, config=NormQuantizeConfig())``: LayerNorm / RMSNorm → the
  per-sample affine rows (adaLN modulate with the smoothing folded in, ``fold_modulation``)
  → block Hadamard → int8 or float8 e4m3 codes + per-token scales → ``X' L1``, one read of X;
  ``norm_quantize_config(m, k, *, tokens, dot)``; reference ``norm_quantize_reference``.
* :mod:`pallas_kernels.int_gemm` (Pallas-Triton): ``int_gemm(xq, wq, sx, sw, *, ...,
  config=GemmConfig())``: int8 × int8 (int4 unpacked in registers) → int32 with the fused
  epilogue (scales, zero-point correction, bias, low-rank ``XA @ L2``, gate, residual);
  reference ``int_gemm_reference``.
* :mod:`pallas_kernels.int_gemm_hopper` (Mosaic GPU, sm_90a): ``int8_gemm_ws(xq, wt, sx,
  sw, *, ..., config=HopperGemmConfig())``: the warp-specialized persistent s8 wgmma GEMM
  (int8 / ``jnp.int4`` K-major weights, per-channel or per-group scales, fused low rank);
  ``pick_tile_n``, ``device_num_sms``, ``gpu_interpret_params``, ``smem_bytes``; its
  reference is ``int_gemm_reference``.
* :mod:`pallas_kernels.attention_int8` (Mosaic GPU, sm_90a): ``int8qk_attention(qc, kc, v, sq,
  sk, kbias, config=AttentionConfig())``: FlashAttention-3-style attention with INT8 ``Q Kᵀ``
  (s8 wgmma), per-token Q/K scales and key offsets in registers, online softmax, f16/bf16
  ``P̃ V``; reference ``int8qk_attention_reference``.
* :mod:`pallas_kernels.twinlog_gemm` (Pallas-Triton): ``twinlog_gemm(xq, sx, wq, step,
  offset, *, bias, config=TwinLogGemmConfig())``: int8 activation codes × packed 4-bit
  twin-log (LRQ-DiT) codes decoded in registers (``±2^(step·q + offset)``, one ``ex2`` per
  weight) → bf16 tensor-core dot, f32 accumulation, ``acc · sx + bias``;
  ``twinlog_gemm_config``, ``kernel_table``; references ``twinlog_gemm_reference``,
  ``decode_twinlog_reference``.
* :mod:`pallas_kernels.twinlog_gemm_hopper` (Mosaic GPU, sm_90a): ``twinlog_gemm_hopper(xq, sx,
  wt, consts, *, bias, config=TwinLogHopperConfig())``: the twin-log GEMM as a warp-specialized
  persistent kernel: ``jnp.int4 [N, K]`` log codes decoded in registers without ``ex2`` (bit
  selects and three multiplies by per-column constants) to a bf16 SMEM tile, optionally shared
  by both consumer warpgroups, bf16 wgmma into f32, ``acc · sx + bias``;
  ``twinlog_hopper_config``, ``twinlog_hopper_operands``, ``decode_constants``; references
  ``twinlog_gemm_hopper_reference``, ``decode_twinlog_hopper_reference``.
* :mod:`pallas_kernels._common`: ``sylvester_pm1``, ``pow2_divisor``,
  ``triton_compiler_params``, ``unpack_int4_reference``, ``weight_colsum``.

The kernels are jitted with their configs static (lowered once per shape and config).
This package imports nothing from ``jaxdq`` (tests/test_import_graph.py); composing the
kernels into a quantized layer is the library's job.  Measurements: ``NOTES.md``.
"""
from pallas_kernels._common import pow2_divisor, sylvester_pm1, unpack_int4_reference, weight_colsum
from pallas_kernels.int_gemm import GemmConfig, int_gemm_reference
from pallas_kernels.norm_quantize import (NormQuantizeConfig, fold_modulation, norm_quantize_config,
                                          norm_quantize_reference)
from pallas_kernels.twinlog_gemm import (TwinLogGemmConfig, decode_twinlog_reference, kernel_table,
                                         twinlog_gemm_config, twinlog_gemm_reference)
from pallas_kernels.quantize_act import (QuantizeConfig, block_hadamard_reference, quantize_act_reference,
                                         quantize_config, transform_input_reference)

__all__ = [
    "sylvester_pm1", "pow2_divisor", "unpack_int4_reference", "weight_colsum",
    "QuantizeConfig", "quantize_config", "quantize_act_reference",
    "transform_input_reference", "block_hadamard_reference",
    "GemmConfig", "int_gemm_reference",
    "NormQuantizeConfig", "norm_quantize_config", "norm_quantize_reference", "fold_modulation",
    "TwinLogGemmConfig", "twinlog_gemm_config", "twinlog_gemm_reference", "decode_twinlog_reference", "kernel_table",
]

try:  # Mosaic GPU (jax.experimental.pallas.mosaic_gpu) is absent from some jax builds
    from pallas_kernels.int_gemm_hopper import (HopperGemmConfig, device_num_sms, gpu_interpret_params,
                                                int8_gemm_ws, pick_tile_n, smem_bytes)
except ImportError:  # pragma: no cover
    pass
else:
    __all__ += ["HopperGemmConfig", "int8_gemm_ws", "pick_tile_n", "device_num_sms", "gpu_interpret_params",
                "smem_bytes"]
    try:
        from pallas_kernels.twinlog_gemm_hopper import TwinLogHopperConfig, twinlog_hopper_config
    except ImportError:  # pragma: no cover
        pass
    else:
        __all__ += ["TwinLogHopperConfig", "twinlog_hopper_config"]
