"""Class-conditional UNet2DModel (diffusers ``num_class_embeds``, ``class_embed_type=None``):
parity with diffusers at a tiny random config, the converter's key for the table, config checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="UNet parity tests need PyTorch")
diffusers = pytest.importorskip("diffusers", reason="UNet parity tests need diffusers")
from _torch_init import randomize_  # noqa: E402

from converters.dit import ConversionError  # noqa: E402
from converters.unet import convert_unet, expected_keys  # noqa: E402
from jaxdq.models.unet import UNet, UNetConfig, unet_param_shapes  # noqa: E402

TOL = 1e-4  # as tests/test_unet.py
SIZE, CLASSES = 16, 11
TIMESTEPS = [3, 250, 640, 999]
LABELS = [0, 7, 10, 3]


@functools.lru_cache(maxsize=None)
def class_model():
    torch.manual_seed(0)
    m = diffusers.UNet2DModel(
        sample_size=SIZE, in_channels=1, out_channels=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, norm_num_groups=8, attention_head_dim=16, num_class_embeds=CLASSES)
    return randomize_(m, 5)


def numpy_sd(model) -> dict:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@functools.partial(jax.jit, static_argnums=0)
def _apply(cfg, params, x, t, y):
    return UNet(cfg).apply({"params": params}, x, t, None, y)


def test_class_conditional_unet2d_parity_with_diffusers():
    model = class_model()
    cfg, params = convert_unet(numpy_sd(model), dict(model.config))
    assert cfg.num_class_embeds == CLASSES
    assert params["class_embedding"]["embedding"].shape == (CLASSES, 4 * 16)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, SIZE, SIZE, generator=g).repeat(2, 1, 1, 1)
    t, y = torch.tensor(TIMESTEPS), torch.tensor(LABELS)
    with torch.no_grad():
        ref = model(x, t, class_labels=y).sample.numpy()
    out = np.asarray(_apply(cfg, params, jnp.asarray(x.numpy()), jnp.asarray(t.numpy()), jnp.asarray(y.numpy())))
    delta = float(np.max(np.abs(out - ref)))
    print(f"class-conditional UNet2DModel max |Δ| vs diffusers: {delta:.2e} (output std {ref.std():.2f})")
    assert ref.std() > 0.1
    assert delta <= TOL
    # the label matters: same x and t, other labels
    y2 = jnp.asarray([5, 1, 2, 10])
    out2 = np.asarray(_apply(cfg, params, jnp.asarray(x.numpy()), jnp.asarray(t.numpy()), y2))
    assert float(np.max(np.abs(out2 - out))) > 1e-2


def test_class_embedding_key_and_errors():
    model = class_model()
    cfg = UNetConfig.from_diffusers(dict(model.config))
    keys = expected_keys(unet_param_shapes(cfg))
    assert keys["class_embedding.weight"] == (CLASSES, 64)
    sd = numpy_sd(model)
    sd.pop("class_embedding.weight")
    with pytest.raises(ConversionError, match="missing key class_embedding.weight"):
        convert_unet(sd, dict(model.config))
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers({**dict(model.config), "class_embed_type": "timestep"})
    _, params = convert_unet(numpy_sd(model), dict(model.config))
    x = jnp.zeros((1, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="needs class_labels"):
        UNet(cfg).apply({"params": params}, x, jnp.zeros((1,), jnp.int32))
    plain = UNetConfig(**{**cfg.__dict__, "num_class_embeds": None})
    with pytest.raises(ValueError, match="no class embedding"):
        UNet(plain).init(jax.random.PRNGKey(0), x, jnp.zeros((1,), jnp.int32), None, jnp.zeros((1,), jnp.int32))
