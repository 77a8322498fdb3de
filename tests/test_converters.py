"""PyTorch → Flax DiT conversion: parity with diffusers, both layouts, file formats, strictness."""
import argparse
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="conversion tests need PyTorch")
diffusers = pytest.importorskip("diffusers", reason="parity tests need diffusers")

from converters import CheckpointError, ConversionError, StateDict, convert_dit, load_state_dict  # noqa: E402
from jaxdq.models.dit import DiT, DiTConfig  # noqa: E402

HEADS, HEAD_DIM, LAYERS, CLASSES, SIZE = 2, 16, 3, 10, 8
TOL = 1e-4


def _diffusers_model(seed: int, identical_embedders: bool):
    """Small random DiTTransformer2DModel with every parameter re-drawn N(0, 0.1²)
    (its own init zeroes some layers, which would hide mistakes)."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8,
        num_layers=LAYERS, sample_size=SIZE, patch_size=2, num_embeds_ada_norm=CLASSES).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
        if identical_embedders:
            first = model.transformer_blocks[0].norm1.emb.state_dict()
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(first)
    return model


@functools.lru_cache(maxsize=None)
def _model(identical_embedders: bool):
    return _diffusers_model(0, identical_embedders)


def _numpy_sd(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _inputs():
    """A CFG-style batch: 3 labels, then the same noise with the null class; int timesteps."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, SIZE, SIZE, generator=g)
    t = torch.tensor([0, 421, 999])
    y = torch.tensor([0, 7, 9])
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, CLASSES)])


def _torch_out(model) -> np.ndarray:
    x, t, y = _inputs()
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg: DiTConfig, params, x, t, y):
    return DiT(cfg).apply({"params": params}, x, t, y)


def _jax_out(cfg, params) -> np.ndarray:
    x, t, y = (jnp.asarray(a.numpy()) for a in _inputs())
    return np.asarray(_apply(cfg, params, x, t, y))


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def to_original_dit_state_dict(sd: dict) -> dict:
    """diffusers DiTTransformer2DModel keys → facebookresearch/DiT keys (block 0's embedder
    becomes the shared one; q/k/v concatenated into qkv).  Adds the ``pos_embed`` buffer."""
    out = {}
    emb = "transformer_blocks.0.norm1.emb."
    ren = {"pos_embed.proj": "x_embedder.proj",
           emb + "timestep_embedder.linear_1": "t_embedder.mlp.0",
           emb + "timestep_embedder.linear_2": "t_embedder.mlp.2",
           "proj_out_1": "final_layer.adaLN_modulation.1", "proj_out_2": "final_layer.linear"}
    for i in range(LAYERS):
        s, b = f"transformer_blocks.{i}.", f"blocks.{i}."
        ren.update({s + "attn1.to_out.0": b + "attn.proj", s + "ff.net.0.proj": b + "mlp.fc1",
                    s + "ff.net.2": b + "mlp.fc2", s + "norm1.linear": b + "adaLN_modulation.1"})
        for w in ("weight", "bias"):
            out[f"{b}attn.qkv.{w}"] = np.concatenate([sd[f"{s}attn1.to_{n}.{w}"] for n in "qkv"])
    for src, dst in ren.items():
        for w in ("weight", "bias"):
            out[f"{dst}.{w}"] = sd[f"{src}.{w}"]
    out["y_embedder.embedding_table.weight"] = sd[emb + "class_embedder.embedding_table.weight"]
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    d = sd["pos_embed.proj.weight"].shape[0]
    out["pos_embed"] = get_2d_sincos_pos_embed(d, SIZE // 2, base_size=SIZE // 2).float()[None].numpy()
    return out


# ---------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("identical", [False, True], ids=["per-block-embedders", "identical-embedders"])
def test_parity_with_diffusers(identical):
    model = _model(identical)
    cfg, params = convert_dit(_numpy_sd(model), num_heads=HEADS)
    assert cfg.shared_embedder is identical
    assert (cfg.freq_shift, cfg.mlp_norm_eps, cfg.depth, cfg.num_classes, cfg.learn_sigma) == (1, 1e-5, 3, 10, True)
    ref, out = _torch_out(model), _jax_out(cfg, params)
    delta = float(np.max(np.abs(out - ref)))
    print(f"max |Δ| vs diffusers ({'identical' if identical else 'per-block'} embedders): {delta:.2e}")
    assert delta <= TOL
    assert float(np.max(np.abs(ref[:3] - ref[3:]))) > 1e-2  # the null class matters


def test_original_layout_matches_diffusers_layout():
    model = _model(True)
    sd = _numpy_sd(model)
    cfg_d, params_d = convert_dit(sd, num_heads=HEADS)
    cfg_o, params_o = convert_dit(to_original_dit_state_dict(sd), num_heads=HEADS)
    assert (cfg_o.freq_shift, cfg_o.mlp_norm_eps, cfg_o.shared_embedder, cfg_o.input_size) == (0, None, True, SIZE)
    _assert_trees_equal(params_o, params_d)
    # original DiT's conditioning differs (freq_shift 0, pre-MLP eps 1e-6) ...
    assert float(np.max(np.abs(_jax_out(cfg_o, params_o) - _torch_out(model)))) > 1e-3
    # ... set to diffusers' values, the original-layout conversion reproduces diffusers
    cfg = dataclasses.replace(cfg_o, freq_shift=1, mlp_norm_eps=1e-5)
    delta = float(np.max(np.abs(_jax_out(cfg, params_o) - _torch_out(model))))
    print(f"max |Δ| original layout vs diffusers: {delta:.2e}")
    assert delta <= TOL


def test_explicit_config_and_unshared_conversion_of_identical_embedders():
    sd = _numpy_sd(_model(True))
    cfg, _ = convert_dit(sd, num_heads=HEADS)
    cfg_u, params_u = convert_dit(sd, dataclasses.replace(cfg, shared_embedder=False))
    assert "t_embedder" in params_u["blocks_2"]
    np.testing.assert_allclose(_jax_out(cfg_u, params_u), _torch_out(_model(True)), atol=TOL)


# ---------------------------------------------------------------------------------- files


def test_load_formats_give_same_params(tmp_path):
    from safetensors.torch import save_file

    model = _model(False)
    tsd = model.state_dict()
    _, ref = convert_dit(_numpy_sd(model), num_heads=HEADS)

    save_file({k: v.contiguous() for k, v in tsd.items()}, tmp_path / "w.safetensors")
    torch.save(tsd, tmp_path / "w.pt")
    # DiT train.py layout: {"model", "ema", "opt", "args"}; the EMA weights are the ones to use
    junk = {k: torch.zeros_like(v) for k, v in tsd.items()}
    torch.save({"model": junk, "ema": tsd, "opt": {"step": 3}, "args": argparse.Namespace(lr=1e-4)},
               tmp_path / "train.pt")
    model.save_pretrained(tmp_path / "folder")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    model.save_pretrained(tmp_path / "pipeline" / "transformer")  # DiTPipeline.save_pretrained layout
    assert any(f.endswith(".index.json") for f in os.listdir(tmp_path / "sharded"))

    for name in ("w.safetensors", "w.pt", "train.pt", "folder", "sharded", "pipeline"):
        sd = load_state_dict(tmp_path / name)
        assert isinstance(sd, StateDict) and all(v.dtype == np.float32 for v in sd.values()), name
        if name in ("folder", "sharded", "pipeline"):
            assert sd.config["num_attention_heads"] == HEADS
            cfg, params = convert_dit(sd)  # heads, eps and sample size from config.json
            assert (cfg.num_heads, cfg.input_size, cfg.mlp_norm_eps) == (HEADS, SIZE, 1e-5)
        else:
            assert sd.config is None
            cfg, params = convert_dit(sd, num_heads=HEADS)
        _assert_trees_equal(params, ref)


def test_bfloat16_safetensors(tmp_path):
    from safetensors.torch import save_file

    tsd = {k: v.to(torch.bfloat16) for k, v in _model(False).state_dict().items()}
    save_file(tsd, tmp_path / "bf16.safetensors")
    sd = load_state_dict(tmp_path / "bf16.safetensors")
    for k, v in tsd.items():
        np.testing.assert_array_equal(sd[k], v.float().numpy())


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickled_code_is_refused(tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"model": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to load .*evil.pt.*arbitrary code"):
        load_state_dict(tmp_path / "evil.pt")
    assert not os.path.exists(marker)


def test_missing_torch_is_a_clear_error(tmp_path, monkeypatch):
    torch.save(_model(False).state_dict(), tmp_path / "w.pt")
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match="needs PyTorch"):
        load_state_dict(tmp_path / "w.pt")


def test_bad_files(tmp_path):
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="unsupported checkpoint"):
        load_state_dict(tmp_path / "w.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint folder"):
        load_state_dict(tmp_path / "empty")
    torch.save({"epoch": 3}, tmp_path / "nothing.pt")
    with pytest.raises(CheckpointError, match="no state dict found"):
        load_state_dict(tmp_path / "nothing.pt")


# ---------------------------------------------------------------------------------- strictness


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_missing_unexpected_misshaped_keys_in_one_error(layout):
    sd = _numpy_sd(_model(True))
    if layout == "original":
        sd = to_original_dit_state_dict(sd)
        gone, bad = "blocks.1.mlp.fc2.bias", "blocks.2.attn.proj.weight"
    else:
        gone, bad = "transformer_blocks.1.attn1.to_k.bias", "transformer_blocks.2.ff.net.2.weight"
    del sd[gone]
    sd[bad] = sd[bad][:, :-1]
    sd["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_dit(sd, num_heads=HEADS)
    err, msg = e.value, str(e.value)
    assert err.missing == [gone] and err.unexpected == ["extra.weight"]
    assert [k for k, _, _ in err.mismatched] == [bad]
    for part in (f"missing key {gone}", "unexpected key extra.weight", f"mis-shaped key {bad}: expected (32,"):
        assert part in msg


def test_num_heads_required_and_config_conflicts():
    sd = _numpy_sd(_model(False))
    with pytest.raises(ConversionError, match="num_heads cannot be inferred"):
        convert_dit(sd)
    with pytest.raises(ConversionError, match="num_heads=4 contradicts"):
        convert_dit(sd, {"num_attention_heads": 2}, num_heads=4)
    with pytest.raises(ConversionError, match="num_layers=5"):
        convert_dit(sd, {"num_attention_heads": 2, "num_layers": 5})
    # a DiT-XL/2-shaped original checkpoint names the heads it probably has
    from converters.dit import _named_config_hint
    assert "DiT-XL/2, which uses num_heads=16" in _named_config_hint(1152, 28, 2)


def test_distinct_embedders_cannot_be_shared():
    sd = _numpy_sd(_model(False))
    cfg, _ = convert_dit(sd, num_heads=HEADS)
    with pytest.raises(ConversionError, match="transformer_blocks.1.norm1.emb.* differs from .*shared_embedder=False"):
        convert_dit(sd, dataclasses.replace(cfg, shared_embedder=True))


def test_wrong_pos_embed_and_unknown_layout():
    sd = to_original_dit_state_dict(_numpy_sd(_model(True)))
    sd["pos_embed"] = sd["pos_embed"][:, ::-1].copy()
    with pytest.raises(ConversionError, match="pos_embed is not the 2D sin-cos"):
        convert_dit(sd, num_heads=HEADS)
    with pytest.raises(ConversionError, match="unrecognized layout"):
        convert_dit({"encoder.weight": np.zeros(2, np.float32)}, num_heads=HEADS)
