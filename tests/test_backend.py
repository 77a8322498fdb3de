"""jaxdq.backend: the frozen execution Policy, bind, the routing (choose) and the kernel
composition (execute), against the fake-quant reference and float64 NumPy, on CPU.

The kernel composition runs here because interpret mode is part of the policy:
``policy("kernels", gemm="triton", interpret=True)`` runs the Pallas-Triton quantize
kernel and GEMM in Pallas' interpreter, ``gemm="hopper"`` the Mosaic GPU wgmma GEMM in
jax's GPU interpreter (no monkeypatching, no module state).  Whether a call took the
kernels is read off its jaxpr (``pallas_call`` equations).
"""
import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import backend
from jaxdq.quant.hadamard import BlockHadamard
from jaxdq.quant.layers import (ActQuant, InputTransform, QLinear, QWeight, Segmented, forward, iter_layers,
                                static_act_quant)
from jaxdq.quant.quantizer import QuantSpec, quantize_activation

K, N, R = 128, 128, 16
TRITON = backend.policy("kernels", gemm="triton", interpret=True)
INTEGER = backend.policy("integer")
C8 = QuantSpec(8, granularity="channel")
G64 = QuantSpec(4, granularity="group", group_size=64)


def _keys(seed, n):
    return jax.random.split(jax.random.key(seed), n)


def _f32(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _rel(got, want):
    g, w = _f32(got), _f32(want)
    return np.linalg.norm(g - w) / np.linalg.norm(w)


def _pallas_calls(fn, *args) -> int:
    """``pallas_call`` equations in the jaxpr of ``fn(*args)`` (nested jaxprs included)."""
    return str(jax.make_jaxpr(fn)(*args)).count("pallas_call")


def _qlinear(seed, *, w_spec, bits=8, packed=False, had=0, lowrank=True, bias=True, smooth=True, act_group=0,
             act_symmetric=True, n=N, layout="kn"):
    """A QLinear [K, n] with random codes and transforms (the kernels compute whatever layer
    they are given, so the transforms need not be inverted into the weight here)."""
    k = _keys(seed, 6)
    w = jax.random.normal(k[0], (K, n)) / math.sqrt(K)
    weight = QWeight.from_kernel(w, w_spec, pack=packed).to_layout(layout)
    spec = (QuantSpec(bits, granularity="group", group_size=act_group) if act_group
            else QuantSpec(bits, granularity="token", symmetric=act_symmetric))
    t = InputTransform(smooth=jax.random.uniform(k[2], (K,), minval=0.5, maxval=2.0) if smooth else None,
                       rotation=BlockHadamard(had) if had else None,
                       lowrank_a=jax.random.normal(k[3], (K, R)) / math.sqrt(K) if lowrank else None,
                       lowrank_b=jax.random.normal(k[4], (R, n)) * 0.1 if lowrank else None)
    return QLinear(weight=weight, act=ActQuant(spec=spec), bias=jax.random.normal(k[1], (n,)) * 0.1 if bias else None,
                   transform=t)


CASES = {
    "w8a8": dict(w_spec=C8),
    "w8a8_had": dict(w_spec=C8, had=32),
    "w4a8_group": dict(w_spec=G64, packed=True),
    "w4a4_channel": dict(w_spec=QuantSpec(4, granularity="channel"), packed=True, bits=4),
    "w4a4_group_nk": dict(w_spec=G64, packed=True, bits=4, act_group=64, layout="nk"),  # SVDQuant's W4A4
    "w8a8_nk": dict(w_spec=C8, layout="nk"),
    # asymmetric per-token activations: shifted codes + zero-point correction
    "w8a8_asym": dict(w_spec=C8, act_symmetric=False),
    "w4a8_asym_nk": dict(w_spec=QuantSpec(4, granularity="channel"), packed=True, act_symmetric=False, layout="nk"),
}


# --------------------------------------------------------------------------- the kernel composition
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_pipeline_matches_reference(case):
    """execute() under the kernels policy (Triton interpreted) vs the fake-quant reference.
    96 rows: above Policy.small_m, so every case takes the kernels (at ≤ 64 rows the
    layers the integer path computes would take it instead)."""
    cfg = CASES[case]
    q = _qlinear(30, **cfg)
    x = jax.random.normal(jax.random.key(31), (2, 48, K)).astype(jnp.bfloat16)
    assert backend.kernel_supported(q) and backend.choose(q, 96, TRITON) == "kernel"
    want = backend.execute(q, x.astype(jnp.float32), backend.REFERENCE)
    got = backend.execute(q, x, TRITON)
    assert got.shape == (2, 48, N) and got.dtype == jnp.bfloat16
    rel = _rel(got, want)
    # differences: bf16 output rounding and the bf16 low-rank branch; rare ±1 code flips with Hadamard
    assert rel < (2e-2 if cfg.get("had") else 1e-2), rel


HOPPER_CASES = {
    "w8a8": CASES["w8a8"], "w8a8_asym": CASES["w8a8_asym"],
    "w8a4_group_nk": dict(w_spec=QuantSpec(8, granularity="group", group_size=64), bits=4, act_group=64,
                          layout="nk"),
}


@pytest.mark.parametrize("case", list(HOPPER_CASES))
def test_hopper_kernel_pipeline_matches_reference(case):
    """The same composition with the Mosaic GPU GEMM in jax's GPU interpreter, int8 weights
    (per channel, or per group of 64 with 4-bit per-group activations), the low rank added
    after the GEMM: int4 weights and the fused low-rank branch deadlock intermittently in
    jax 0.10.2's interpreter (pallas_kernels/NOTES.md; here W4A4 g64 hung 1 run in 4)."""
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    if mk.gpu_interpret_params() is None:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    pol = backend.policy("kernels", gemm="hopper", interpret=True, fuse_lowrank=False)
    q = _qlinear(32, **HOPPER_CASES[case])
    x = jax.random.normal(jax.random.key(33), (96, K)).astype(jnp.bfloat16)
    assert backend.choose(q, 96, pol) == "kernel"
    got = backend.execute(q, x, pol)
    assert got.shape == (96, N) and got.dtype == jnp.bfloat16
    rel = _rel(got, backend.execute(q, x.astype(jnp.float32), backend.REFERENCE))
    assert 0 < rel < 1e-2, rel


@pytest.mark.parametrize("act,gated", [("gelu_tanh", False), (None, True)])
def test_hopper_epilogue_fuses_and_matches_reference(act, gated):
    """An :class:`~jaxdq.backend.Epilogue` (DiT's ``x + gate · proj(h)`` / fc1's GELU) inside
    the Mosaic GPU GEMM (interpreted) vs the reference linear then :meth:`Epilogue.apply` in
    float32, and vs the same kernel path with the epilogue by XLA (``fuse_epilogue=False``)."""
    mk = pytest.importorskip("pallas_kernels.int_gemm_hopper", reason="no Pallas Mosaic GPU in this jax")
    if mk.gpu_interpret_params() is None:
        pytest.skip("this jax has no Mosaic GPU interpreter")
    pol = backend.policy("kernels", gemm="hopper", interpret=True, fuse_residual=True)
    q = _qlinear(34, w_spec=C8, lowrank=False, smooth=False, layout="nk")
    k = _keys(35, 3)
    x = (jax.random.normal(k[0], (1, 256, K)) * 4).astype(jnp.bfloat16)  # one sample of 256 tokens (two: tests/test_kernels.py)
    gate = jax.random.normal(k[1], (1, N)).astype(jnp.bfloat16) if gated else None
    res = jax.random.normal(k[2], (1, 256, N)).astype(jnp.bfloat16) if gated else None
    epi = backend.Epilogue(gate=gate, residual=res, act=act)
    assert backend.fuse_epilogue(q, x, epi, pol)
    # not fused: an f32 residual stream or model (it would be rounded to the kernel's bf16
    # output), a CTA tile spanning two samples, or the policy's switch
    assert not backend.fuse_epilogue(q, x, epi.replace(residual=jnp.zeros((1, 256, N))), pol) or not gated
    assert not backend.fuse_epilogue(q, x.astype(jnp.float32), epi, pol)
    assert not backend.fuse_epilogue(q, jax.ShapeDtypeStruct((4, 128, K), jnp.bfloat16), epi, pol)
    off = backend.policy("kernels", gemm="hopper", interpret=True, fuse_epilogue=False)
    assert not backend.fuse_epilogue(q, x, epi, off)
    act_only = backend.policy("kernels", gemm="hopper", interpret=True)  # the default: the GELU alone
    assert backend.fuse_epilogue(q, x, epi, act_only) == (not gated)
    got = backend.linear(backend.Bound(q, pol), x, epi)
    assert got.shape == (1, 256, N) and got.dtype == jnp.bfloat16
    f32 = lambda a: None if a is None else a.astype(jnp.float32)  # noqa: E731
    want = backend.Epilogue(gate=f32(gate), residual=f32(res), act=act).apply(
        backend.execute(q, x.astype(jnp.float32), backend.REFERENCE))
    y = _f32(x) @ _f32(q.weight.dequantize())  # sanity: GELU's curved range is used
    assert np.abs(y).max() > 2
    assert 0 < _rel(got, want) < 1e-2, _rel(got, want)
    unfused = backend.linear(backend.Bound(q, off), x, epi)
    assert _rel(got, unfused) < 1e-2


@pytest.mark.parametrize("rows,route,case", [(2, "int", "w8_nk"), (2, "int", "w8_kn"), (2, "int", "w4_nk"),
                                             (2, "int", "w4_kn"), (64, "int", "w8_nk"), (65, "kernel", "w4_nk"),
                                             (96, "kernel", "w8_nk")])
def test_small_m_takes_the_integer_path(rows, route, case):
    """GEMV-like calls (≤ Policy.small_m = 64 rows) run the layer's integer path (4-bit codes
    read as jnp.int4 in either layout) without the kernels; larger ones the kernels;
    ``small_m=0`` sends every size through the kernels."""
    w4 = case.startswith("w4")
    q = _qlinear(45, w_spec=QuantSpec(4 if w4 else 8, granularity="channel"), packed=w4, layout=case[-2:])
    x = jax.random.normal(jax.random.key(46), (rows, K)).astype(jnp.bfloat16)
    assert TRITON.small_m == 64
    assert backend.choose(q, rows, TRITON) == route
    run = lambda pol: lambda x_: backend.execute(q, x_, pol)  # noqa: E731
    assert _pallas_calls(run(TRITON), x) == (0 if route == "int" else 2)  # quantize kernel + GEMM
    got = run(TRITON)(x)
    assert got.shape == (rows, N) and got.dtype == jnp.bfloat16
    if route == "int":
        # the integer path in float64 NumPy, from the unpacked [K, N] codes
        xt = q.transform.apply(x.astype(jnp.float32))
        codes, s_x, _ = quantize_activation(xt, q.act.spec)
        t = q.transform
        y64 = (np.asarray(codes, np.int64) @ np.asarray(q.weight.unpacked(), np.int64)) * _f32(s_x) \
            * _f32(q.weight.scale).reshape(-1)
        y64 = y64 + _f32(xt) @ _f32(t.lowrank_a) @ _f32(t.lowrank_b) + _f32(q.bias)
        assert np.all(np.abs(_f32(got) - y64) <= 2 ** -8 * np.abs(y64) + 1e-5 * np.abs(y64).max())
    else:
        assert _rel(got, backend.execute(q, x.astype(jnp.float32), backend.REFERENCE)) < 1e-2
    off = backend.policy("kernels", gemm="triton", interpret=True, small_m=0)  # every size through the kernels
    assert backend.choose(q, rows, off) == "kernel"
    assert _pallas_calls(run(off), x) == 2
    assert _rel(run(off)(x), backend.execute(q, x.astype(jnp.float32), backend.REFERENCE)) < 1e-2


def test_kernels_policy_off_gpu_is_the_integer_path():
    """policy("kernels") without interpret on a CPU: the integer path where the layer allows
    it (any size), the reference elsewhere; no kernel in the trace."""
    if jax.default_backend() != "cpu":
        pytest.skip("the off-GPU route")
    pol = backend.policy("kernels")
    assert not pol.interpret
    q = _qlinear(40, w_spec=C8)
    x = jax.random.normal(jax.random.key(41), (4, K))
    assert backend.choose(q, 4, pol) == backend.choose(q, 4096, pol) == "int"
    got = jax.jit(lambda q_, x_: backend.execute(q_, x_, pol))(q, x)
    want = jax.jit(lambda q_, x_: backend.execute(q_, x_, INTEGER))(q, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    assert _pallas_calls(lambda x_: backend.execute(q, x_, pol), x) == 0
    qg = _qlinear(42, **CASES["w4a4_group_nk"])  # per-group activations: no integer path
    assert backend.choose(qg, 4096, pol) == "fake"
    np.testing.assert_array_equal(np.asarray(backend.execute(qg, x, pol)),
                                  np.asarray(backend.execute(qg, x, backend.REFERENCE)))
    wo = q.replace(act=None)  # weight-only: XLA's dot on a GPU, the reference here
    assert backend.choose(wo, 4096, pol) == "fake" and backend.choose(wo, 4096, TRITON) == "weight_only"


# --------------------------------------------------------------------------- kernel_supported
def test_kernel_supported_rules():
    assert not backend.kernel_supported(_qlinear(50, w_spec=C8, n=64))  # N = 64 is not a multiple of 128
    q2 = _qlinear(50, w_spec=C8, bias=False, lowrank=False)
    assert backend.kernel_supported(q2)
    # asymmetric per-token activations: zero-point correction in the GEMM epilogue
    asym = ActQuant(spec=QuantSpec(8, symmetric=False, granularity="token"))
    assert backend.kernel_supported(q2.replace(act=asym))
    assert not backend.kernel_supported(q2.replace(
        act=ActQuant(spec=QuantSpec(8, symmetric=False, granularity="group", group_size=64))))
    g8 = QWeight(codes=jnp.zeros((K, 128), jnp.int8), scale=jnp.ones((2, 128)),
                 spec=QuantSpec(8, granularity="group", group_size=64))
    assert backend.kernel_supported(q2.replace(weight=g8))
    assert not backend.kernel_supported(q2.replace(weight=g8, act=asym))  # zero points need one scale group
    assert not backend.kernel_supported(q2.replace(act=None))  # weight-only
    static = static_act_quant(-1.0, 1.0, QuantSpec(8, granularity="tensor"))
    assert not backend.kernel_supported(q2.replace(act=static))  # static activations


def test_kernel_supported_group_rules():
    q = QLinear(weight=QWeight(codes=jnp.zeros((256, 128), jnp.uint8), scale=jnp.ones((4, 256)), spec=G64,
                               packed=True, layout="nk"),
                act=ActQuant(spec=QuantSpec(4, granularity="group", group_size=64)))
    assert (q.in_features, q.out_features) == (256, 256) and backend.kernel_supported(q)
    assert not backend.kernel_supported(q.replace(act=ActQuant(spec=QuantSpec(4, granularity="group",
                                                                              group_size=128))))
    had = lambda b: q.replace(transform=InputTransform(rotation=BlockHadamard(b)))  # noqa: E731
    assert not backend.kernel_supported(had(32))  # the Hadamard block must equal the activation group
    assert backend.kernel_supported(had(64))


# --------------------------------------------------------------------------- stored_for_kernels
def _walk_keys(node):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _walk_keys(v)
    elif isinstance(node, (list, tuple)):
        for v in node:
            yield from _walk_keys(v)


def test_stored_for_kernels_keeps_outputs_and_checkpoint(tmp_path):
    """stored_for_kernels: K-major codes, same outputs on every path; saved and reloaded as
    such, with no execution choice in the checkpoint."""
    from jaxdq import checkpoint
    from jaxdq.quant.layers import FloatLinear
    from jaxdq.quant.rules import LayerQuant, quantize_linear

    w = jax.random.normal(jax.random.key(80), (128, 256)) / 12
    x = jax.random.normal(jax.random.key(81), (8, 128))
    kernels = backend.policy("kernels", gemm="triton", interpret=True, small_m=0)
    for cfg in (LayerQuant(weight=C8, act=QuantSpec(8, granularity="token")),
                LayerQuant(weight=G64, act=QuantSpec(4, granularity="group", group_size=64), pack=True)):
        q = quantize_linear(FloatLinear(kernel=w), cfg)
        p = backend.stored_for_kernels({"blk": {"fc": q}})
        qk = p["blk"]["fc"]
        assert isinstance(qk, QLinear) and qk.weight.layout == "nk" and q.weight.layout == "kn"
        assert qk.weight.codes.shape == ((256, 64) if cfg.pack else (256, 128))
        assert np.array_equal(np.asarray(qk.weight.unpacked()), np.asarray(q.weight.unpacked()))
        assert np.array_equal(np.asarray(qk.weight.to_layout("kn").codes), np.asarray(q.weight.codes))
        for pol in (backend.REFERENCE, INTEGER, kernels):
            np.testing.assert_allclose(np.asarray(backend.execute(qk, x, pol)), np.asarray(backend.execute(q, x, pol)),
                                       rtol=1e-5, atol=1e-5)
        path = checkpoint.save(tmp_path / f"c{int(cfg.pack)}", p, metadata={"method": "t"})
        back, meta = checkpoint.load(path)
        qb = back["blk"]["fc"]
        assert isinstance(qb, QLinear) and qb.weight.layout == "nk" and qb.weight.packed == cfg.pack
        assert np.array_equal(np.asarray(qb.weight.codes), np.asarray(qk.weight.codes))
        keys = set(_walk_keys(meta["nodes"]))
        assert "layout" in keys and not keys & {"impl", "policy"}, keys
    # time-dependent layers: every variant relayouts
    seg = Segmented(variants=(_qlinear(82, w_spec=C8), _qlinear(83, **CASES["w4a8_group"])), index=(0, 1),
                    bounds=(500,))
    out = backend.stored_for_kernels({"s": seg})["s"]
    assert isinstance(out, Segmented) and [v.weight.layout for v in out.variants] == ["nk", "nk"]


# --------------------------------------------------------------------------- bind
class _OneLinear(nn.Module):
    @nn.compact
    def __call__(self, x):
        from jaxdq.nn import Linear

        return Linear(N, name="fc")(x)


@functools.lru_cache(maxsize=None)
def _tiny_dit(input_size=16):
    """A random 128-wide one-block DiT (64 tokens per 16 × 16 input), W8A8 (per-channel weights, dynamic per-token
    activations) on every linear but the first and last; DiT's zero-initialised adaLN and
    final layers get small noise, so the output is not zero."""
    from jaxdq.models.dit import DiT, DiTConfig, init_dit, layer_roles
    from jaxdq.quant.rules import LayerQuant, Rule, keep_float, quantize_params

    cfg = DiTConfig(input_size=input_size, patch_size=2, in_channels=4, hidden_size=128, depth=1, num_heads=2,
                    num_classes=10)
    params = init_dit(cfg, jax.random.PRNGKey(0))

    @jax.jit  # one compile, not one per leaf shape
    def perturb(params, key):
        leaves, tree = jax.tree_util.tree_flatten(params)
        keys = jax.random.split(key, len(leaves))
        leaves = [jnp.where(l == 0, 0.02 * jax.random.normal(k, l.shape, l.dtype), l) for l, k in zip(leaves, keys)]
        return jax.tree_util.tree_unflatten(tree, leaves)

    params = perturb(params, jax.random.PRNGKey(1))
    rules = [keep_float(), Rule(LayerQuant(weight=C8, act=QuantSpec(8, granularity="token")))]
    return cfg, DiT(cfg), params, quantize_params(params, rules, roles=layer_roles(cfg))


def test_bind():
    q = _qlinear(60, w_spec=C8)
    fl = {"kernel": jnp.ones((K, N)), "bias": jnp.zeros((N,))}
    params = {"blk": {"fc": q, "float": fl}, "scale": jnp.ones((3,))}
    assert backend.bind(params, backend.REFERENCE) is params
    assert backend.bind(params, backend.policy()) is params
    b = backend.bind(params, INTEGER)
    assert isinstance(b["blk"]["fc"], backend.Bound)
    assert b["blk"]["fc"].layer is q and b["blk"]["fc"].policy == INTEGER
    assert set(b["blk"]["float"]) == {"kernel", "bias"} and b["blk"]["float"]["kernel"] is fl["kernel"]
    assert b["scale"] is params["scale"]
    # the policy is static pytree data of a bound layer; the arrays are the layer's
    assert jax.tree_util.tree_leaves(b["blk"]["fc"]) == jax.tree_util.tree_leaves(q)
    assert (jax.tree_util.tree_structure(backend.bind(params, INTEGER))
            != jax.tree_util.tree_structure(backend.bind(params, TRITON)))

    # one Linear: bound under "integer" it is the layer's integer path, unbound its reference
    x = jax.random.normal(jax.random.key(61), (4, K))
    m = _OneLinear()
    one = jax.jit(lambda p, x_: m.apply({"params": p}, x_))  # jitted: one compile, not one per op
    ref = jax.jit(lambda q_, x_, name: forward(q_.transform, q_.bias, x_, getattr(q_, name), jnp.float32),
                  static_argnums=2)
    np.testing.assert_array_equal(np.asarray(one(backend.bind({"fc": q}, INTEGER), x)),
                                  np.asarray(ref(q, x, "product_int")))
    np.testing.assert_array_equal(np.asarray(one({"fc": q}, x)), np.asarray(ref(q, x, "product_fake")))

    # a model: every quantized linear takes its integer path (one int32 dot each, no kernel)
    _, dit, _, qp = _tiny_dit()
    xd = jax.random.normal(jax.random.key(62), (2, 4, 16, 16))
    t, y = jnp.asarray([10, 700]), jnp.asarray([1, 10])
    apply = lambda pol: jax.jit(lambda p: dit.apply({"params": backend.bind(p, pol)}, xd, t, y))  # noqa: E731
    n_q = sum(isinstance(l, QLinear) for _, l in iter_layers(qp))
    assert n_q >= 6
    jaxpr = lambda pol: str(jax.make_jaxpr(apply(pol))(qp))  # noqa: E731
    j_int = jaxpr(INTEGER)
    assert j_int.count("preferred_element_type=int32") == n_q and "pallas_call" not in j_int
    assert jaxpr(backend.REFERENCE).count("preferred_element_type=int32") == 0
    y_int = np.asarray(apply(INTEGER)(qp))
    # policy("kernels") off-GPU is the same integer path, bit for bit
    np.testing.assert_array_equal(np.asarray(apply(backend.policy("kernels"))(qp)), y_int)
    assert _rel(y_int, apply(backend.REFERENCE)(qp)) < 1e-4

    # bind runs after timestep resolution: a tree with a Segmented layer is refused
    seg = Segmented(variants=(q, q), index=(0, 1), bounds=(500,))
    with pytest.raises(TypeError, match="Segmented"):
        backend.bind({"blk": {"fc": seg}}, INTEGER)
    with pytest.raises(TypeError, match="resolved"):
        backend.linear(seg, x)


def test_sampler_runs_the_kernels_under_its_policy():
    """family.sampler(config, policy=...) binds the policy inside the jitted sampler: a
    quantized DiT (stored K-major) through the interpreted kernels equals the reference
    sampler up to the kernels' bf16 rounding."""
    from jaxdq.sampling.families import Request, get_family

    cfg, _, _, qp = _tiny_dit()  # 64 tokens per image, 128 rows with CFG: the kernel path
    fam = get_family("dit")
    batch = fam.batch(cfg, Request(classes=(3,), per_class=1, seed=0))
    key = jax.random.PRNGKey(1)
    args = (batch.x_T, batch.cond, batch.uncond, key)
    run_ref = fam.sampler(cfg, num_steps=2)
    run_k = fam.sampler(cfg, num_steps=2, policy=TRITON)
    qk = backend.stored_for_kernels(qp)
    assert _pallas_calls(run_k, qk, *args) > 0 and _pallas_calls(run_ref, qp, *args) == 0
    want = run_ref(qp, *args)
    got = run_k(qk, *args)
    assert got.shape == want.shape == batch.x_T.shape and np.isfinite(np.asarray(got)).all()
    assert 0 < _rel(got, want) < 1e-2


# --------------------------------------------------------------------------- Policy
def test_policy_validates_its_fields():
    assert backend.policy() == backend.REFERENCE == backend.Policy()
    assert backend.policy("kernels").gemm == "auto" and backend.policy("kernels").small_m == 64
    with pytest.raises(ValueError, match="mode"):
        backend.policy("fast")
    with pytest.raises(ValueError, match="gemm"):
        backend.policy("kernels", gemm="cuda")
    for bad in (-1, 2.5, "64"):
        with pytest.raises(ValueError, match="small_m"):
            backend.policy("kernels", small_m=bad)
    with pytest.raises(TypeError):
        backend.policy("kernels", bogus=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        TRITON.mode = "integer"


def test_policy_is_hashable_and_jit_specialises_on_it():
    a, b = backend.policy("integer"), backend.Policy(mode="integer")
    assert a == b and hash(a) == hash(b) and a is not b
    assert len({a, b, backend.REFERENCE, TRITON, dataclasses.replace(TRITON, small_m=0)}) == 4
    q = _qlinear(70, w_spec=C8)
    x = jax.random.normal(jax.random.key(71), (4, K))
    traces = []

    @functools.partial(jax.jit, static_argnames="pol")
    def f(q_, x_, pol):
        traces.append(pol)
        return backend.execute(q_, x_, pol)

    y_ref = f(q, x, pol=backend.REFERENCE)
    y_int = f(q, x, pol=a)
    f(q, x, pol=b)  # an equal policy: the cached trace
    f(q, x, pol=backend.REFERENCE)
    assert traces == [backend.REFERENCE, a]  # two policies → two traces
    assert _rel(y_int, y_ref) < 1e-5

    # bound params carry the policy in their tree structure: a jitted model call retraces per policy
    seen = []

    @jax.jit
    def g(p, x_):
        seen.append(1)
        return backend.linear(p["fc"], x_)

    g(backend.bind({"fc": q}, a), x)
    g(backend.bind({"fc": q}, b), x)
    g(backend.bind({"fc": q}, TRITON), x)
    assert len(seen) == 2
