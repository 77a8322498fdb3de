"""FLUX.1 transformer in Flax: parity with diffusers, both checkpoint layouts, latent packing,
position ids, parameter count, role tags, conversion errors."""
import ast
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from converters.dit import ConversionError
from converters.flux import convert_flux, detect_flux_layout
from jaxdq.models.flux import (Flux, FluxConfig, flux_config, image_ids, init_flux, layer_roles, pack_latents,
                               text_ids, unpack_latents)
from jaxdq.nn import ROLES

SMALL = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
LAT_C, LAT_H, LAT_W, TXT = 4, 16, 16, 6  # 4·2·2 = 16 packed features, 8×8 packed tokens, 6 text tokens
TOL = 1e-4
FLUX1_DEV_PARAMS = 11_901_408_320  # diffusers FluxTransformer2DModel(guidance_embeds=True) on the meta device


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@functools.lru_cache(maxsize=None)
def _diffusers_model(guidance_embeds: bool):
    """Small random FluxTransformer2DModel, every parameter (the RMSNorm scales too) re-drawn N(0, 0.1²)."""
    torch = pytest.importorskip("torch", reason="parity tests need PyTorch")
    diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(guidance_embeds=guidance_embeds, **SMALL).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def _numpy_sd(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs(seed: int = 1):
    """Batch 2 with different σ and guidance scales; float32 numpy."""
    rng = np.random.default_rng(seed)
    lat = rng.normal(size=(2, LAT_C, LAT_H, LAT_W)).astype(np.float32)
    txt = rng.normal(size=(2, TXT, SMALL["joint_attention_dim"])).astype(np.float32)
    pooled = rng.normal(size=(2, SMALL["pooled_projection_dim"])).astype(np.float32)
    return dict(lat=lat, txt=txt, pooled=pooled, t=np.array([0.25, 0.9], np.float32),
                g=np.array([3.5, 1.0], np.float32))


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, img, txt, pooled, t, img_ids, txt_ids, g):
    return Flux(cfg).apply({"params": params}, img, txt, pooled, t, img_ids, txt_ids, g)


def _pipeline_fns():
    """``FluxPipeline._pack_latents`` / ``_unpack_latents`` / ``_prepare_latent_image_ids`` from
    diffusers' own source (importing pipeline_flux needs ``transformers``, not installed here)."""
    torch = pytest.importorskip("torch", reason="parity tests need PyTorch")
    diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
    path = os.path.join(os.path.dirname(diffusers.__file__), "pipelines", "flux", "pipeline_flux.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FluxPipeline")
    want = ("_pack_latents", "_unpack_latents", "_prepare_latent_image_ids")
    fns = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in want]
    for fn in fns:
        fn.decorator_list = []
    ns = {"torch": torch}
    exec(compile(ast.Module(body=fns, type_ignores=[]), path, "exec"), ns)
    return ns


# ---------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_parity_with_diffusers(guidance_embeds):
    torch = pytest.importorskip("torch", reason="parity tests need PyTorch")
    model = _diffusers_model(guidance_embeds)
    cfg, params = convert_flux(_numpy_sd(model), dict(model.config))
    assert cfg == FluxConfig(guidance_embeds=guidance_embeds, out_channels=16, **SMALL)
    x = _inputs()
    img = np.array(pack_latents(jnp.asarray(x["lat"])))
    iid, tid = image_ids(LAT_H, LAT_W), text_ids(TXT)
    g = x["g"] if guidance_embeds else None
    with torch.no_grad():
        ref = model(torch.from_numpy(img), torch.from_numpy(x["txt"]), torch.from_numpy(x["pooled"]),
                    torch.from_numpy(x["t"]), torch.from_numpy(iid), torch.from_numpy(tid),
                    None if g is None else torch.from_numpy(g)).sample.numpy()
    out = np.asarray(_apply(cfg, params, img, x["txt"], x["pooled"], x["t"], iid, tid, g))
    assert out.shape == ref.shape == (2, (LAT_H // 2) * (LAT_W // 2), 16)
    err = np.max(np.abs(out - ref))
    assert err <= TOL, f"max |Δ| = {err:.3g}"
    assert np.max(np.abs(ref[0] - ref[1])) > 0.1 and np.max(np.abs(ref)) > 0.5  # inputs and weights matter


def _to_bfl(sd: dict, cfg: FluxConfig) -> dict:
    """diffusers keys → Black Forest Labs keys: the inverse of diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers`` (loaders/single_file_utils.py)."""
    sd = dict(sd)
    out = {}

    def take(dst, src):
        for suffix in (".weight", ".bias"):
            out[dst + suffix] = sd.pop(src + suffix)

    def fuse(dst, srcs):
        for suffix in (".weight", ".bias"):
            out[dst + suffix] = np.concatenate([sd.pop(s + suffix) for s in srcs], axis=0)

    take("img_in", "x_embedder")
    take("txt_in", "context_embedder")
    for bfl, dif in (("time_in", "timestep_embedder"), ("vector_in", "text_embedder"),
                     ("guidance_in", "guidance_embedder")):
        if f"time_text_embed.{dif}.linear_1.weight" in sd:
            take(f"{bfl}.in_layer", f"time_text_embed.{dif}.linear_1")
            take(f"{bfl}.out_layer", f"time_text_embed.{dif}.linear_2")
    for i in range(cfg.num_layers):
        b, s = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        take(b + "img_mod.lin", s + "norm1.linear")
        take(b + "txt_mod.lin", s + "norm1_context.linear")
        fuse(b + "img_attn.qkv", [s + f"attn.to_{n}" for n in "qkv"])
        fuse(b + "txt_attn.qkv", [s + f"attn.add_{n}_proj" for n in "qkv"])
        take(b + "img_attn.proj", s + "attn.to_out.0")
        take(b + "txt_attn.proj", s + "attn.to_add_out")
        for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
            out[b + f"{stream}_attn.norm.query_norm.scale"] = sd.pop(s + f"attn.{q}.weight")
            out[b + f"{stream}_attn.norm.key_norm.scale"] = sd.pop(s + f"attn.{k}.weight")
        for stream, ff in (("img", "ff"), ("txt", "ff_context")):
            take(b + f"{stream}_mlp.0", s + f"{ff}.net.0.proj")
            take(b + f"{stream}_mlp.2", s + f"{ff}.net.2")
    for j in range(cfg.num_single_layers):
        b, s = f"single_blocks.{j}.", f"single_transformer_blocks.{j}."
        take(b + "modulation.lin", s + "norm.linear")
        fuse(b + "linear1", [s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp"])
        take(b + "linear2", s + "proj_out")
        out[b + "norm.query_norm.scale"] = sd.pop(s + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = sd.pop(s + "attn.norm_k.weight")
    for suffix in (".weight", ".bias"):
        scale, shift = np.split(sd.pop("norm_out.linear" + suffix), 2, axis=0)
        out["final_layer.adaLN_modulation.1" + suffix] = np.concatenate([shift, scale], axis=0)
    take("final_layer.linear", "proj_out")
    assert not sd, f"unmapped diffusers keys {sorted(sd)}"
    return out


def test_bfl_layout_gives_the_same_params():
    model = _diffusers_model(True)
    cfg, ref = convert_flux(_numpy_sd(model), dict(model.config))
    bfl = _to_bfl(_numpy_sd(model), cfg)
    assert detect_flux_layout(bfl) == "bfl"
    prefixed = {"model.diffusion_model." + k: v for k, v in bfl.items()}
    for sd, conf in ((bfl, cfg), (prefixed, {"axes_dims_rope": [4, 6, 6]})):
        cfg2, params = convert_flux(sd, conf)
        assert cfg2 == cfg
        assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref)
        for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, bf16 = convert_flux(bfl, cfg, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree_util.tree_leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}
    np.testing.assert_array_equal(np.asarray(bf16["proj_out"]["kernel"]),
                                  np.asarray(ref["proj_out"]["kernel"].astype(jnp.bfloat16)))


# ------------------------------------------------------------------------------- packing and ids


def test_pack_unpack_and_ids_match_the_pipeline():
    torch = pytest.importorskip("torch", reason="parity tests need PyTorch")
    ref = _pipeline_fns()
    lat = _inputs()["lat"]
    packed_ref = ref["_pack_latents"](torch.from_numpy(lat), 2, LAT_C, LAT_H, LAT_W).numpy()
    packed = np.asarray(pack_latents(jnp.asarray(lat)))
    np.testing.assert_array_equal(packed, packed_ref)
    vae_scale = 8  # _unpack_latents takes the pixel size
    unpacked_ref = ref["_unpack_latents"](torch.from_numpy(packed_ref), LAT_H * vae_scale, LAT_W * vae_scale,
                                          vae_scale).numpy()
    np.testing.assert_array_equal(np.asarray(unpack_latents(jnp.asarray(packed), LAT_H, LAT_W)), unpacked_ref)
    np.testing.assert_array_equal(unpacked_ref, lat)
    ids_ref = ref["_prepare_latent_image_ids"](2, LAT_H // 2, LAT_W // 2, "cpu", torch.float32)
    np.testing.assert_array_equal(image_ids(LAT_H, LAT_W), ids_ref.numpy())
    # non-square: 6 × 10 latent → 3 × 5 tokens, row-major (0, row, col)
    ids = image_ids(6, 10)
    np.testing.assert_array_equal(ids, ref["_prepare_latent_image_ids"](1, 3, 5, "cpu", torch.float32).numpy())
    assert ids.shape == (15, 3) and tuple(ids[7]) == (0.0, 1.0, 2.0)
    assert text_ids(5).shape == (5, 3) and not text_ids(5).any()


# --------------------------------------------------------------------------- structure and roles


def test_flux1_dev_param_count_without_allocating():
    shapes = jax.eval_shape(lambda k: init_flux(flux_config("flux1-dev"), k), jax.random.PRNGKey(0))
    assert _count(shapes) == FLUX1_DEV_PARAMS
    assert shapes["transformer_blocks_18"]["attn"]["add_q_proj"]["kernel"].shape == (3072, 3072)
    assert shapes["single_transformer_blocks_37"]["proj_out"]["kernel"].shape == (3072 + 12288, 3072)
    assert shapes["single_transformer_blocks_37"]["attn"]["norm_q"]["scale"].shape == (128,)
    assert "single_transformer_blocks_38" not in shapes and "transformer_blocks_19" not in shapes


def test_param_count_equals_diffusers_meta_model():
    torch = pytest.importorskip("torch", reason="parity tests need PyTorch")
    diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(guidance_embeds=True)
    assert sum(p.numel() for p in model.parameters()) == FLUX1_DEV_PARAMS
    small = _diffusers_model(False)
    shapes = jax.eval_shape(lambda k: init_flux(FluxConfig(guidance_embeds=False, **SMALL), k), jax.random.PRNGKey(0))
    assert _count(shapes) == sum(p.numel() for p in small.parameters())


def _linear_paths(tree, prefix=""):
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and "kernel" in v and v["kernel"].ndim == 2:
            yield path
        elif isinstance(v, dict):
            yield from _linear_paths(v, path + "/")


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_layer_roles_cover_every_linear(guidance_embeds):
    cfg = FluxConfig(guidance_embeds=guidance_embeds, **SMALL)
    shapes = jax.eval_shape(lambda k: init_flux(cfg, k), jax.random.PRNGKey(0))
    roles = layer_roles(cfg)
    assert set(_linear_paths(shapes)) == set(roles)
    assert set(roles.values()) <= set(ROLES)
    assert roles["transformer_blocks_0/attn/to_q"] == roles["transformer_blocks_0/attn/add_q_proj"] == "self-attn"
    assert roles["single_transformer_blocks_1/proj_mlp"] == "ffn"
    assert roles["transformer_blocks_0/norm1_context/linear"] == roles["norm_out/linear"] == "adaLN"
    assert roles["x_embedder"] == roles["context_embedder"] == "embedding"
    assert roles["proj_out"] == "final"
    assert ("time_text_embed/guidance_embedder/linear_1" in roles) == guidance_embeds


def test_guidance_required_and_config_checks():
    cfg = FluxConfig(guidance_embeds=True, **SMALL)
    args = [jnp.zeros((1, 4, 16)), jnp.zeros((1, 2, 32)), jnp.zeros((1, 16)), jnp.zeros((1,)),
            jnp.zeros((4, 3)), jnp.zeros((2, 3))]
    with pytest.raises(ValueError, match="guidance"):
        jax.eval_shape(lambda k: Flux(cfg).init(k, *args, None), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="axes_dims_rope"):
        FluxConfig(**{**SMALL, "axes_dims_rope": (4, 6, 4)})
    with pytest.raises(ValueError, match="unknown FLUX config"):
        flux_config("flux2")


# ------------------------------------------------------------------------------------ conversion


def test_missing_unexpected_and_misshaped_keys_in_one_error():
    model = _diffusers_model(True)
    cfg = FluxConfig(guidance_embeds=True, out_channels=16, **SMALL)
    sd = _numpy_sd(model)
    del sd["single_transformer_blocks.1.proj_mlp.bias"]
    sd["transformer_blocks.0.attn.add_k_proj.weight"] = np.zeros((32, 31), np.float32)
    sd["transformer_blocks.0.attn.to_out.1.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_flux(sd, cfg)
    err = info.value
    assert err.missing == ["single_transformer_blocks.1.proj_mlp.bias"]
    assert err.unexpected == ["transformer_blocks.0.attn.to_out.1.weight"]
    assert err.mismatched == [("transformer_blocks.0.attn.add_k_proj.weight", (32, 32), (32, 31))]
    msg = str(err)
    for key in ("single_transformer_blocks.1.proj_mlp.bias", "transformer_blocks.0.attn.add_k_proj.weight",
                "transformer_blocks.0.attn.to_out.1.weight"):
        assert key in msg
    # the BFL layout reports the same way
    bfl = _to_bfl(_numpy_sd(model), cfg)
    del bfl["single_blocks.0.norm.key_norm.scale"]
    bfl["double_blocks.0.txt_attn.qkv.weight"] = np.zeros((96, 31), np.float32)
    with pytest.raises(ConversionError) as info:
        convert_flux(bfl, cfg)
    assert "single_blocks.0.norm.key_norm.scale" in str(info.value)
    assert "double_blocks.0.txt_attn.qkv.weight: expected (96, 32), got (96, 31)" in str(info.value)


def test_unrecognized_layout_and_uninferable_rope_split():
    with pytest.raises(ConversionError, match="unrecognized layout"):
        convert_flux({"foo.weight": np.zeros((2, 2))})
    model = _diffusers_model(True)
    with pytest.raises(ConversionError, match="axes_dims_rope"):
        convert_flux(_numpy_sd(model))  # head dim 16: the RoPE split must come from the config


def test_weight_only_quantized_params_run_through_every_linear():
    """Every matmul goes through jaxdq.nn.linear: with all but the kept-float layers
    replaced by QLinear the model still runs, and its output moves by a quantization-sized amount."""
    from jaxdq.quant.layers import FloatLinear, QLinear, iter_layers
    from jaxdq.quant.recipes import Context, get_recipe

    cfg = FluxConfig(guidance_embeds=True, **SMALL)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(lambda k: init_flux(cfg, k), jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32), shapes)
    qparams, _ = get_recipe("w8a16").build(params, Context(roles=layer_roles(cfg)))
    n_linear = len(layer_roles(cfg))
    floats = sorted(path for path, layer in iter_layers(qparams) if isinstance(layer, FloatLinear))
    assert floats == ["context_embedder", "proj_out", "x_embedder"]  # roles embedding / final stay float
    assert isinstance(qparams["single_transformer_blocks_1"]["proj_out"], QLinear)
    assert len(list(iter_layers(params))) == n_linear
    x = _inputs()
    img = pack_latents(jnp.asarray(x["lat"]))
    args = (img, x["txt"], x["pooled"], x["t"], image_ids(LAT_H, LAT_W), text_ids(TXT), x["g"])
    ref = np.asarray(_apply(cfg, params, *args))
    out = np.asarray(jax.jit(lambda p: Flux(cfg).apply({"params": p}, *args))(qparams))
    rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel < 0.02, rel
