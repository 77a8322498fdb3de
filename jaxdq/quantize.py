"""Quantize a loaded model with a named recipe, calibrating on its own family first when needed.

    model = load_model("default")                       # any family (jaxdq.models.sources)
    q = quantize_model(model, "vidit-q-w8a8")            # calibrates, then applies the recipe

:func:`calibration` runs one calibration for several recipes at once (the union of their
:class:`~jaxdq.quant.recipes.Needs`), as ``jaxdq compare`` does.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

from jaxdq.calibrate import calibrate
from jaxdq.models.sources import LoadedModel
from jaxdq.quant.recipes import Context, get_recipe, needs_of
from jaxdq.sampling.families import Request

#: Calibration defaults (Q-Diffusion / ViDiT-Q style: the float model's own trajectories):
#: up to 10 classes (or the model's captions), 4 samples each, noise seed 1234.
CALIB_SEED = 1234


def calibration_request(model: LoadedModel, per_class: int = 4, seed: int = CALIB_SEED,
                        **fields) -> Request:
    """The request a model is calibrated on by default (``fields`` override, e.g. captions)."""
    return Request(per_class=per_class, seed=seed, **fields)


def calibration(model: LoadedModel, methods: Sequence[str], *, request: Optional[Request] = None,
                solver: Optional[str] = None, num_steps: Optional[int] = None, guidance: Optional[float] = None,
                progress: bool = False, mesh=None) -> Optional[dict]:
    """One calibration serving every recipe of ``methods`` (None if none needs one);
    ``mesh``: data parallel over a ``jax.sharding.Mesh`` (:func:`jaxdq.calibrate.calibrate`)."""
    needs = needs_of(methods)
    if not needs.any:
        return None
    request = request or calibration_request(model)
    batch = model.family.batch(model.config, request)
    return calibrate(model, batch, solver=solver, num_steps=num_steps, guidance=guidance, samples=needs.samples,
                     keep_inputs=needs.trajectory, progress=progress, seed=request.seed + 1, mesh=mesh)


def quantize_model(model: LoadedModel, method: str, *, calib: Optional[dict] = None,
                   request: Optional[Request] = None, calib_steps: Optional[int] = None, progress: bool = False,
                   **options) -> LoadedModel:
    """Apply the recipe ``method`` (``"float"`` = unchanged) to a float model.

    Args:
      model: a float :class:`~jaxdq.models.sources.LoadedModel` of any family.
      method: a recipe name or alias (:func:`jaxdq.quant.recipes.get_recipe`).
      calib: a :func:`jaxdq.calibrate.calibrate` result to use (else one is made when the
        recipe needs it, on ``request`` or :func:`calibration_request`).
      options: the recipe's keyword options (e.g. ``budget_bits=6.0`` for mixed precision).
    Returns:
      The quantized model; its metadata records the recipe name, bits and report.
    """
    if method == "float":
        return model
    if model.quantized:
        raise ValueError(f"model is already quantized ({model.metadata['method']}); give a float model")
    recipe = get_recipe(method)
    if calib is None and recipe.needs.any:
        calib = calibration(model, [recipe.name], request=request, num_steps=calib_steps, progress=progress)
    elif calib is not None and recipe.needs.any:
        check_calibration(calib, model, recipe)
    ctx = Context(roles=model.roles, calib=calib, eps=model.family.eps_fn(model.config), options=options,
                  progress=progress, model=model)
    params, report = recipe.build(model.params, ctx)
    meta = dict(model.metadata, method=recipe.name, bits=recipe.bits)
    if report:
        meta["report"] = report
    return dataclasses.replace(model, params=params, metadata=meta)


def check_calibration(calib: dict, model: LoadedModel, recipe) -> None:
    """ValueError (one line) unless ``calib`` is a calibration of this model's layers with what
    ``recipe`` needs."""
    from jaxdq.quant.layers import get_path, iter_layers

    if "t" not in calib or "cond" not in calib:
        raise ValueError("not a jaxdq calibration (no 't' and 'cond' entries); make one with jaxdq calibrate")
    for path, _ in iter_layers(model.params):
        try:
            get_path(calib["cond"], path)
        except KeyError:
            raise ValueError(f"the calibration statistics are not of this model: no entry for layer {path!r}") from None
    if recipe.needs.trajectory and "inputs" not in calib:
        raise ValueError(f"{recipe.name} needs the calibration trajectory; calibrate with it (jaxdq calibrate "
                         f"--methods {recipe.name})")
    if recipe.needs.samples and not any("samples" in v for v in _leaf_dicts(calib["cond"])):
        raise ValueError(f"{recipe.name} needs stored input samples; calibrate with them (jaxdq calibrate "
                         f"--methods {recipe.name})")


def _leaf_dicts(tree):
    if isinstance(tree, dict) and "absmax" in tree:
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from _leaf_dicts(v)
