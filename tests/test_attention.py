"""jaxdq.models.attention: the float32 reference vs float64 NumPy, the jax.nn paths vs the
reference, and a model sampled with another ``attention`` than it was built with."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.models.attention import attention


def _np_attention(q, k, v, bias):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(q.shape[-1])
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)[:, None, None, :]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nhqk,nkhd->nqhd", p, v)


def _qkv(dtype=jnp.float32, tq=24, tk=40):
    ks = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(ks[0], (2, tq, 3, 16)).astype(dtype)
    k = jax.random.normal(ks[1], (2, tk, 3, 16)).astype(dtype)
    v = jax.random.normal(ks[2], (2, tk, 3, 16)).astype(dtype)
    keep = jax.random.bernoulli(ks[3], 0.7, (2, tk)).at[:, 0].set(True)
    return q, k, v, jnp.where(keep, 0.0, -10000.0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_reference_vs_float64(with_bias):
    q, k, v, bias = _qkv()
    b = bias if with_bias else None
    got = attention(q, k, v, b)
    assert got.dtype == jnp.float32 and got.shape == (2, 24, 3, 16)
    np.testing.assert_allclose(np.asarray(got), _np_attention(q, k, v, b), rtol=1e-5, atol=1e-5)


def test_jax_nn_path_matches_reference():
    q, k, v, bias = _qkv()
    want = _np_attention(q, k, v, bias)
    np.testing.assert_allclose(np.asarray(attention(q, k, v, bias, impl="xla")), want, rtol=1e-5, atol=1e-5)
    qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
    got = attention(qb, kb.astype(jnp.float32), vb, bias, impl="xla")  # k promoted (RoPE): cast to v's dtype
    assert got.dtype == jnp.bfloat16
    rel = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert rel < 2e-2, rel
    with pytest.raises(ValueError, match="attention="):
        attention(q, k, v, impl="flash")


def test_cudnn_path_casts_float32_to_bf16(monkeypatch):
    """cuDNN takes half types only: float32 q/k/v (PixArt's) go in as bf16, come out float32.

    No GPU here, so jax.nn's cuDNN call is replaced by its XLA implementation after
    checking what it was given."""
    seen = []
    orig = jax.nn.dot_product_attention

    def fake(q, k, v, bias=None, implementation=None):
        seen.append((implementation, q.dtype, k.dtype, v.dtype, None if bias is None else bias.dtype))
        return orig(q, k, v, bias=bias, implementation="xla")

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    q, k, v, bias = _qkv(jnp.float32)
    got = attention(q, k, v, bias, impl="cudnn")
    assert seen == [("cudnn", jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16)]
    assert got.dtype == jnp.float32
    want = _np_attention(q, k, v, bias)
    assert np.abs(np.asarray(got, np.float64) - want).max() < 3e-2  # bf16 inputs and probabilities


def test_model_config_selects_attention():
    from jaxdq.models.dit import DiT, dit_config, init_dit
    from jaxdq.models.pixart import PixArt, init_pixart, pixart_config

    with pytest.raises(ValueError, match="attention="):
        dit_config("DiT-S/4", attention="sdpa")
    dcfg = dit_config("DiT-S/4", num_classes=10, input_size=8, depth=2)
    pcfg = pixart_config("PixArt-Σ-1024", sample_size=8, depth=2, hidden_size=96, num_heads=4,
                         caption_channels=32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 4, 8, 8)), jnp.float32)
    t = jnp.asarray([10, 700])
    ctx = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    cases = [(DiT, dcfg, init_dit, (x, t, jnp.asarray([1, 3]))), (PixArt, pcfg, init_pixart, (x, t, ctx, mask))]
    for model, cfg, init, args in cases:
        # adaLN-zero init outputs 0: every leaf redrawn (from the shapes alone, nothing compiled)
        leaves, tree = jax.tree_util.tree_flatten(jax.eval_shape(lambda: init(cfg, jax.random.PRNGKey(1))))
        draw = np.random.default_rng(2)
        params = tree.unflatten([jnp.asarray(0.1 * draw.normal(size=a.shape), jnp.float32) for a in leaves])
        want = jax.jit(model(cfg).apply)({"params": params}, *args)  # jitted: one compile, not one per op
        got = jax.jit(model(dataclasses.replace(cfg, attention="xla")).apply)({"params": params}, *args)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
        # ... and the config really reaches every attention: float32 logits only on the reference path
        logits = {DiT: ["f32[2,6,4,4]"], PixArt: ["f32[2,4,16,16]", "f32[2,4,16,6]"]}[model]
        pb = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
        for impl in ("float32", "xla"):
            jaxpr = str(jax.make_jaxpr(lambda p, *a: model(dataclasses.replace(cfg, attention=impl)).apply(
                {"params": p}, *a))(pb, *args))
            assert all((shape in jaxpr) == (impl == "float32") for shape in logits), impl
        # bf16 activations through the jax.nn path stay close to the float32 model
        argsb = tuple(a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in args)
        gotb = jax.jit(model(dataclasses.replace(cfg, attention="xla")).apply)({"params": pb}, *argsb)
        rel = np.linalg.norm(np.asarray(gotb, np.float64) - np.asarray(want)) / np.linalg.norm(np.asarray(want))
        assert rel < 5e-2, (model.__name__, rel)
