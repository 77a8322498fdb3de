"""Write ``tests/data/norm_linear_fixture.npz``: the reference-policy outputs of the tiny
DiT / PixArt / FLUX models of ``tests/norm_linear_cases.py`` (float and every quantized
variant; float and W8A8 with bf16 activations too), computed by the model code as it was
before the models called ``jaxdq.norm_linear.norm_linear`` (issue 19, item 1).
``tests/test_norm_quantize.py`` checks the current code reproduces them to float32 / bf16 rounding.

Written 2026-12-02 with ``jaxdq/models/{dit,pixart,flux}.py`` of commit 36c3439 (the files
before the change) over the working tree of that day: a copy of the tree with those three
files from ``git show 36c3439:jaxdq/models/NAME.py``, this script and
``tests/norm_linear_cases.py`` run from the copy.  Usage: ``python tests/data/make_norm_linear_fixture.py``.
"""
import os
import sys

import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from norm_linear_cases import MODELS, VARIANTS, build, quantized  # noqa: E402

if __name__ == "__main__":
    out = {}
    for model in MODELS:
        apply, params, roles = build(model)
        for variant in VARIANTS:
            y = np.asarray(apply(quantized(params, roles, variant)))
            assert np.isfinite(y).all() and np.abs(y).max() > 0, (model, variant)
            out[f"{model}/{variant}"] = y
            print(model, variant, y.shape, y.dtype, float(np.abs(y).mean()))
        apply16, _, _ = build(model, jnp.bfloat16)  # bf16 activations: the modulate's op order matters most here
        for variant in ("float", "dynamic-w8a8"):
            y = np.asarray(apply16(quantized(params, roles, variant)).astype(jnp.float32))
            assert np.isfinite(y).all() and np.abs(y).max() > 0, (model, variant)
            out[f"{model}/{variant}/bf16"] = y
            print(model, variant, "bf16", float(np.abs(y).mean()))
    np.savez_compressed(os.path.join(HERE, "norm_linear_fixture.npz"), **out)
