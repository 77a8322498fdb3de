"""Shared by the diffusers parity tests: re-draw every parameter of a torch module."""
import numpy as np


def randomize_(model, seed: int):
    """Re-draw every parameter (diffusers zero-initializes some): norm weights 1 + N(0, 0.1²),
    other weights N(0, 1/fan_in), biases N(0, 0.1²), so activations stay O(1) through the net."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p[0].numel()))
    return model.eval()


def tiny_diffusers(family: str):
    """A tiny random diffusers model of a jaxdq family (seed 0), for save_pretrained round trips."""
    import diffusers
    import torch

    torch.manual_seed(0)
    if family == "pixart":
        return diffusers.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                  out_channels=8, num_layers=1, cross_attention_dim=32,
                                                  sample_size=8, patch_size=2, caption_channels=24,
                                                  use_additional_conditions=False)
    if family == "latte":
        return diffusers.LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                 out_channels=8, num_layers=1, cross_attention_dim=32,
                                                 sample_size=8, patch_size=2, caption_channels=24, video_length=2,
                                                 norm_type="ada_norm_single", activation_fn="gelu-approximate",
                                                 attention_bias=True, norm_elementwise_affine=False)
    if family == "unet":
        return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                     norm_num_groups=8, attention_head_dim=8)
    if family == "sd-unet":
        return diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
                                              down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                                              norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4)
    if family == "vae":
        return diffusers.AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                       down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                                       norm_num_groups=8, layers_per_block=1)
    if family == "flux":
        return diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                                pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    raise AssertionError(family)
