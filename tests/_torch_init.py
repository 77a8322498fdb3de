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
