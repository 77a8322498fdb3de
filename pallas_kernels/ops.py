"""``qlinear_apply(q, x)``: a :class:`jaxdq.quant.qlinear.QLinear` through the Pallas kernels.

On a CUDA backend, for the configurations the kernels cover, the layer runs as two
kernels (both jit-able, shapes static):

1. :func:`pallas_kernels.triton_kernels.quantize_act`: ``X' = H(X / smooth)``, int8
   codes (``bits`` = act_spec.bits; 4-bit codes carried in int8) with per-token or
   per-(token, group) scales, and ``X' L1`` (bf16).
2. the integer GEMM with the fused epilogue ``acc·s_x·s_w + bias + (X'L1) L2``:
   * Hopper (sm_90): :func:`pallas_kernels.mosaic_kernels.int8_gemm_ws`, Mosaic GPU
     ``wgmma ... .s32.s8.s8``, for int8 and int4 weights (int4 unpacked to int8 in the
     kernel), per-channel or per-group (64/128) scales; the low-rank product is fused
     as a second wgmma accumulator when ``fuse_lowrank`` (:data:`FUSE_LOWRANK_HOPPER`),
     else added by XLA after the GEMM;
   * other GPUs (or ``GEMM_BACKEND="triton"``): the Pallas-Triton kernel (int8 ``tt.dot``,
     int4 codes unpacked in registers, the whole epilogue fused).
   Codes stored K-major (``QLinear.w_layout == "nk"``, see
   :func:`jaxdq.quant.rules.use_kernels`) are read as they are; "kn" codes are
   transposed per call.

Layers called on at most :data:`SMALL_M_XLA` rows run the QLinear's XLA integer path
(``impl="int"``, reading the codes as stored).  Weight-only layers (``act_spec`` None)
dequantize to the activation dtype and use XLA's dot.  Asymmetric per-token activations (with per-channel weights) are quantized
to shifted int8 codes plus a zero point, and the GEMM epilogue subtracts
``zero ⊗ colsum(W)`` before the scales.  Everything else (CPU/TPU backends, static
activations, asymmetric weights, tensor-granularity scales, shapes not multiples of 128) returns
the QLinear's own reference: ``impl="int"`` where :meth:`QLinear.int_path_ok`, else
``impl="fake"``.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import triton_kernels

#: "auto": Mosaic GPU warp-specialized wgmma (``int8_gemm_ws``) on sm_90, Triton
#: otherwise; "triton": always the Triton GEMM.
GEMM_BACKEND = "auto"
#: Fuse the low-rank up-projection into the Hopper wgmma kernel (a second accumulator).
#: H100 (bench/results/kernels_h100_run2.json): correct (rel. err 1.4e-5) and faster than
#: the XLA product after the GEMM (DiT fc1 0.097 vs 0.230 ms, W4A4 g64 0.301 vs 0.464 ms;
#: PixArt-Σ SVDQuant step 146 vs 156 ms).
FUSE_LOWRANK_HOPPER = True
#: Layers called on at most this many rows (tokens × batch: adaLN / modulation linears
#: on the conditioning vector) run the QLinear's ``impl="int"`` path (XLA's integer dot on
#: the codes as stored) when it applies: a GEMV-like product is weight-bandwidth-bound,
#: and the kernel path pads the rows to 64 and adds a quantize launch.  0 turns it off.
#: H100 (bench/results/kernels_h100_run4.json, call 3), one layer: DiT adaLN 1152→6912 at
#: M = 2 / 16 / 64, W8A8 7.2 / 8.3 / 8.6 µs vs 15.8 / 15.3 / 14.3 through the kernels,
#: W4A8 9.2 / 11.2 / 12.3 vs 20.9 / 21.4 / 20.8 (rows ``qlinear_*_small_m``, the int path
#: since it reads the stored codes; it unpacked and transposed int4 codes per call before:
#: 26.5 / 27.9 / 28.6); FLUX modulation 3072→18432 at M = 2:
#: W8A8 26.2 µs (1.46× bf16) vs 39.9, W4A8 33.3 vs 51.4.  Whole step
#: (e2e_h100_run3.json): DiT-XL/2 256² W8A8 4.62 → 4.16 ms, W4A8 5.71 → 5.26 ms.
SMALL_M_XLA = 64


def _is_hopper() -> bool:
    try:
        dev = jax.devices()[0]
        return dev.platform == "gpu" and getattr(dev, "compute_capability", "") in ("9.0", "9.0a")
    except Exception:  # pragma: no cover
        return False


def on_gpu() -> bool:
    return jax.default_backend() in ("gpu", "cuda")


def _act_group(q) -> int:
    a = q.act_spec
    return a.group_size if a.granularity == "group" else 0


def kernel_supported(q) -> bool:
    """Whether :func:`qlinear_apply` runs ``q`` through the kernels (on a GPU)."""
    a, w = q.act_spec, q.w_spec
    if a is None or q.act_static or a.granularity not in ("token", "group"):
        return False
    if not a.symmetric and (a.granularity != "token" or w.granularity != "channel"):
        return False  # zero-point correction: per-token activations, per-channel weights
    if not w.symmetric or q.w_zero is not None or w.granularity not in ("channel", "group"):
        return False
    k, n = q.in_features, q.out_features
    if k % 128 or n % 128:
        return False
    groups = [g for g in (w.group_size if w.granularity == "group" else 0, _act_group(q)) if g]
    if any(g % 32 or k % g or g & (g - 1) for g in groups) or len(set(groups)) > 1:
        return False  # one group size (a power of two ≥ 32) shared by weights and activations
    if q.had_block and (q.had_block < 16 or q.had_block & (q.had_block - 1)):
        return False
    if _act_group(q) and q.had_block and q.had_block != _act_group(q):
        return False
    return True


def _reference(q, x):
    return q.replace(impl="int" if q.int_path_ok() else "fake")(x)


def _pad_rows(a, m_pad):
    return a if a.shape[0] == m_pad else jnp.pad(a, ((0, m_pad - a.shape[0]), (0, 0)))


def _weight_nk(q):
    """The weight codes K-major for the Hopper kernel: int8 ``[N, K]`` or ``jnp.int4 [N, K]``."""
    if q.w_layout == "nk":  # packed: jnp.int4 [N, K], a view of the uint8 [N, K/2] bytes
        return q.stored_codes()
    codes = q.weight_codes().T  # "kn" layout: one transpose (and unpack) per call
    return codes.astype(jnp.int4) if q.packed else codes


def _weight_only(q, x):
    """W{b}A16: codes dequantized to ``x.dtype`` (one XLA fusion), then XLA's dot."""
    xt = q.transform_input(x)
    y = jnp.dot(xt, q.dequantized_weight().astype(x.dtype), preferred_element_type=jnp.float32)
    if q.lowrank_a is not None:
        y = y + jnp.dot(jnp.dot(xt, q.lowrank_a.astype(x.dtype)), q.lowrank_b.astype(x.dtype),
                        preferred_element_type=jnp.float32)
    if q.bias is not None:
        y = y + q.bias.astype(jnp.float32)
    return y.astype(x.dtype)


def qlinear_apply(q, x: jax.Array, *, fuse_lowrank: bool | None = None) -> jax.Array:
    """``y = QLinear(x)`` for ``x [..., C_in]`` → ``[..., C_out]`` in ``x.dtype``.

    ``fuse_lowrank``: on the Hopper path, add the low-rank up-projection inside the GEMM
    (second wgmma accumulator) instead of as an XLA product after it;
    None = :data:`FUSE_LOWRANK_HOPPER`.
    """
    if on_gpu() and q.act_spec is None:
        return _weight_only(q, x)
    if not (on_gpu() and kernel_supported(q)):
        return _reference(q, x)
    if math.prod(x.shape[:-1]) <= SMALL_M_XLA and q.int_path_ok():
        return _reference(q, x)  # impl="int": XLA's integer dot on the stored codes
    fuse = FUSE_LOWRANK_HOPPER if fuse_lowrank is None else fuse_lowrank
    lead = x.shape[:-1]
    hopper = GEMM_BACKEND == "auto" and _is_hopper()
    y = _kernel_forward(q, x.reshape(-1, q.in_features), fuse=bool(fuse), hopper=hopper)
    return y.reshape(*lead, q.out_features).astype(x.dtype)


# A jitted function: a model calls it once per layer with the same few shapes, and jax
# lowers each (shapes, static config) once and calls that lowering from every site.
# Without it, DiT-XL/2's ~170 kernel call sites took 87 s to lower.  (Code that swaps
# the kernel functions, as the tests do, calls ``_kernel_forward.clear_cache()``.)
@functools.partial(jax.jit, static_argnames=("fuse", "hopper"))
def _kernel_forward(q, x2: jax.Array, *, fuse: bool, hopper: bool) -> jax.Array:
    """The kernel path of :func:`qlinear_apply` on ``x2 [M, C_in]`` → bf16 ``[M, C_out]``."""
    m = x2.shape[0]
    bm = 128 if m >= 128 else 64
    m_pad = -(-m // bm) * bm
    x2 = _pad_rows(x2, m_pad)  # zero rows quantize to zero codes and are sliced off
    l1, l2 = q.lowrank_a, q.lowrank_b
    if l1 is not None and l1.shape[1] % 16:  # zero-pad the rank to the dot minimum (exact)
        pad = 16 - l1.shape[1] % 16
        l1 = jnp.pad(l1, ((0, 0), (0, pad)))
        l2 = jnp.pad(l2, ((0, pad), (0, 0)))
    ag = _act_group(q)
    qcfg = triton_kernels.quantize_config(m_pad, q.in_features, dot=l1 is not None or bool(q.had_block),
                                          smooth=q.smooth is not None, grouped=bool(ag))
    sym = q.act_spec.symmetric
    outs = triton_kernels.quantize_act(x2, bits=q.act_spec.bits, smooth=q.smooth, had_block=q.had_block, l1=l1,
                                       group_size=ag, symmetric=sym, **qcfg)
    codes, sx, xl1 = outs[:3]
    zx = None if sym else outs[3]
    bias = None if q.bias is None else q.bias.astype(jnp.float32)
    group = max(ag, q.w_spec.group_size if q.w_spec.granularity == "group" else 0)
    use_ws = hopper and group in (0, 64, 128)
    if use_ws:
        from pallas_kernels import mosaic_kernels

        fuse = fuse and xl1 is not None
        sw = q.w_scale.reshape(-1) if q.w_spec.granularity == "channel" else q.w_scale
        tile_n = None  # the kernel's default (64) with group scales or a second accumulator
        if not (group or fuse):
            tile_n = mosaic_kernels.pick_tile_n(m_pad, q.out_features, num_sms=mosaic_kernels.device_num_sms())
        y = mosaic_kernels.int8_gemm_ws(codes, _weight_nk(q), sx if ag else sx[:, 0], sw, bias=bias,
                                        xa=xl1 if fuse else None, l2=l2 if fuse else None,
                                        x_zero=None if zx is None else zx[:, 0],
                                        tile_n=tile_n, out_dtype=jnp.bfloat16)
        if xl1 is not None and not fuse:  # low rank after the GEMM: one XLA product + add
            y = (y.astype(jnp.float32) + jnp.dot(xl1, l2.astype(jnp.bfloat16),
                                                 preferred_element_type=jnp.float32)).astype(jnp.bfloat16)
    else:
        y = triton_kernels.int_gemm(codes, q.qweight, sx, q.w_scale, bias=bias, xa=xl1, l2=l2, x_zero=zx,
                                    packed=q.packed, w_kmajor=q.w_layout == "nk",
                                    out_dtype=jnp.bfloat16, block_m=bm)
    return y[:m]
