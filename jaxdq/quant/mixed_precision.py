"""ViDiT-Q's metric-decoupled mixed precision (arXiv 2406.02540 §4.3), measured on generated samples.

1. The sampling steps are split into ``K`` timestep segments (default 4), by the thresholds
   between ``K`` equal runs of the calibration trajectory's timesteps.
2. Layers are grouped by their role (:func:`group_of`), each group judged by its own metric
   of the generated samples (:data:`GROUP_METRIC`), as the paper pairs them:

   ===============  ===========================  ==============================================
   group            layers                       metric (paper → in project)
   ===============  ===========================  ==============================================
   conditioning     cross-attention              text alignment, CLIPScore → **alignment**: loss
                                                 of the digits classifier's margin for the
                                                 conditioning digit (class / prompted digit)
   spatial          spatial self-attention, FFN  visual quality, VQA → **quality**: FD-digits
                                                 of the samples' classifier features (PSNR
                                                 where no feature network applies)
   temporal         temporal attention           temporal consistency, FlowScore → **temporal**:
                                                 change of each video's frame-to-frame feature
                                                 consistency (:func:`jaxdq.metrics.temporal_consistency`)
   ===============  ===========================  ==============================================

   The conditioning path (``adaLN`` and the ``time-embedding`` MLP feeding it) goes where the
   paper's reasoning puts the layers that carry the condition into the image: the paper
   ranks cross-attention by alignment because it injects the text; in a class-conditional
   DiT (no cross-attention) the class enters only through adaLN (``c = t_emb + y_emb`` →
   scale/shift/gate of every block), so there adaLN and the time embedding form the
   conditioning group, ranked by alignment.  In text models (PixArt, Latte, SD)
   adaLN-single sees only the timestep and modulates every block's features — the static
   channel imbalance the paper traces to the scale-shift table, a visual-quality effect —
   so it joins the spatial group.  (ViDiT-Q's released OpenSora configs keep ``t_block``
   and ``t_embedder`` float, ``remain_fp.txt``; jaxdq quantizes them in every recipe, so
   they are allocated like the rest.)
3. Group budgets from output MSE: per segment, the MSE of the generated samples (against
   the all-``high`` model's, same noise) when the whole group alone drops to ``low`` weight
   bits in that segment; the promotion budget (``budget_bits`` average over the allocated
   layers) is shared between the groups in proportion to it.
4. Inside a group the layers are ranked by the group's metric when that layer alone drops
   to ``low`` bits in that segment, and promoted to ``high`` bits greedily (most sensitive
   first, skipping layers that do not fit) within the group's share; what is left is spent
   the same way, group by group in order of their MSE.  The result never exceeds the
   budget and no further layer fits.

Every measurement is one jitted sampling run from the same noise (``per_class`` samples of
each of up to 10 classes / digit captions, ``steps`` solver steps) in which the candidate
layers' weights are swapped per segment inside the sampler (one compilation serves every
candidate).  Weights are fake-quantized per output channel (round to nearest, after the
channel balancing the caller applied); activations stay float in the measurement (the
allocation is over weight bits).  Cost: ``2 + K·(G + L)`` sampling runs (``2 + G + L`` for
one allocation over all timesteps), G groups and L layers.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.quant.layers import FloatLinear, Segmented, iter_layers, map_layers
from jaxdq.quant.quantizer import QuantSpec, fake_quant
from jaxdq.quant.rules import LayerQuant, quantize_linear
from jaxdq.quant.timestep import segment_bounds, segment_of

GROUPS = ("conditioning", "spatial", "temporal")
#: The metric each group's layers are ranked by.
GROUP_METRIC = {"conditioning": "alignment", "spatial": "quality", "temporal": "temporal"}
METRICS = ("mse", "alignment", "quality", "temporal")
MP_SEED = 4321  # noise of the sensitivity samples (neither the evaluation's nor the calibration's)


def conditioning_in_adaln(roles: Mapping[str, str]) -> bool:
    """Whether the condition reaches the blocks only through adaLN (no cross-attention)."""
    return not any((r or "").split(":")[0] == "cross-attn" for r in roles.values())


def group_of(role: Optional[str], cond_in_adaln: bool) -> str:
    """The mixed-precision group of a layer's role tag (see the module docstring)."""
    base = (role or "").split(":")[0]
    if base == "cross-attn":
        return "conditioning"
    if base == "temporal-attn":
        return "temporal"
    if base in ("adaLN", "time-embedding"):
        return "conditioning" if cond_in_adaln else "spatial"
    return "spatial"


def allocate(sizes: Mapping[str, int], groups: Mapping[str, str], group_mse: Mapping[str, float],
             rank: Mapping[str, float], budget_bits: float, low: int = 4, high: int = 8) -> tuple[set, dict]:
    """Choose the layers promoted to ``high`` weight bits under an average-bit budget.

    Args:
      sizes: path → weight elements.
      groups: path → group name.
      group_mse: group → its output MSE effect (≥ 0); the budget shares are proportional
        (equal to the groups' sizes when every effect is 0).
      rank: path → sensitivity by its group's own metric (larger = more sensitive).
      budget_bits: average weight bits allowed over ``sizes``.
    Returns:
      ``(promoted, accounting)``; accounting has ``budget``, ``used`` (total bits),
      ``left``, and per group its ``share`` and ``spent`` (extra bits).
    """
    total = sum(sizes.values())
    base = low * total
    budget = budget_bits * total
    if budget < base:
        raise ValueError(f"budget {budget_bits} bits is below the {low}-bit floor")
    extra = budget - base
    cost = {p: (high - low) * n for p, n in sizes.items()}
    members: dict[str, list[str]] = {}
    for p in sizes:
        members.setdefault(groups[p], []).append(p)
    weight = {g: max(float(group_mse.get(g, 0.0)), 0.0) for g in members}
    if not sum(weight.values()):
        weight = {g: float(sum(sizes[p] for p in ps)) for g, ps in members.items()}
    wsum = sum(weight.values())
    order = sorted(members, key=lambda g: -weight[g])
    ranked = {g: sorted(members[g], key=lambda p: (-rank[p], p)) for g in members}
    promoted: set = set()
    acct = {g: {"share": extra * weight[g] / wsum, "spent": 0.0} for g in members}
    used = 0.0
    for g in order:
        for p in ranked[g]:
            if acct[g]["spent"] + cost[p] <= acct[g]["share"] and used + cost[p] <= extra:
                promoted.add(p)
                acct[g]["spent"] += cost[p]
                used += cost[p]
    for g in order:  # what the shares left: same order, same rankings
        for p in ranked[g]:
            if p not in promoted and used + cost[p] <= extra:
                promoted.add(p)
                acct[g]["spent"] += cost[p]
                used += cost[p]
    return promoted, {"budget": budget, "used": base + used, "left": extra - used, "groups": acct}


# --------------------------------------------------------------------------- sample metrics
def _margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``logit[y] − max_{j≠y} logit[j]`` per sample."""
    lg = np.asarray(logits, np.float64)
    idx = np.arange(lg.shape[0])
    target = lg[idx, labels]
    other = lg.copy()
    other[idx, labels] = -np.inf
    return target - other.max(axis=1)


class SampleScorer:
    """The group metrics of generated samples against the reference (all-``high``) samples
    from the same noise.

    ``samples``: ``[N, C, H, W]`` or video ``[N, C, F, H, W]``; ``labels [N]`` (or None): the
    conditioning digit; ``extractor``: a feature network with ``logits`` (the digits
    classifier) or None (then alignment and quality fall back to the sample MSE and
    temporal consistency is computed on the raw frames; :attr:`kinds` says which).
    """

    def __init__(self, reference: np.ndarray, labels: Optional[np.ndarray], extractor=None):
        self.video = reference.ndim == 5
        self.labels = None if labels is None else np.asarray(labels)
        self.extractor = extractor
        self.kinds = {"mse": "sample MSE",
                      "alignment": ("classifier margin loss" if extractor is not None and labels is not None
                                    else "sample MSE (no classifier or labels)"),
                      "quality": "FD-digits" if extractor is not None else "sample MSE (no feature network)",
                      "temporal": ("frame-feature consistency change" if extractor is not None
                                   else "frame-pixel consistency change") if self.video else None}
        self.ref = self._summary(np.asarray(reference))

    def _frames(self, x: np.ndarray) -> np.ndarray:
        """``[N·F, C, h, w]`` images the extractor takes (video frames cropped to the digit)."""
        if self.video:
            x = x.transpose(0, 2, 1, 3, 4).reshape(-1, x.shape[1], *x.shape[3:])
        if x.shape[1:] != (1, 16, 16) and x.shape[1] == 1 and min(x.shape[2:]) >= 16:
            from jaxdq.data import ink_crop

            x = ink_crop(x)
        return x

    def _summary(self, x: np.ndarray) -> dict:
        out = {"x": x}
        if self.extractor is not None:
            imgs = self._frames(x)
            feats = np.asarray(self.extractor(imgs), np.float64)
            out["feats"] = feats
            if self.labels is not None:
                lg = np.asarray(self.extractor.logits(imgs))
                frames = lg.shape[0] // len(self.labels)
                out["margin"] = _margin(lg, np.repeat(self.labels, frames))
        if self.video:
            n, f = x.shape[0], x.shape[2]
            per_frame = out["feats"].reshape(n, f, -1) if "feats" in out else \
                x.transpose(0, 2, 1, 3, 4).reshape(n, f, -1).astype(np.float64)
            from jaxdq.metrics import temporal_consistency

            out["tc"] = np.array([temporal_consistency(per_frame[i:i + 1]) for i in range(n)])
        return out

    def __call__(self, x: np.ndarray) -> dict:
        """``{metric: sensitivity}`` of samples ``x`` (≥ 0; 0 = identical to the reference)."""
        from jaxdq.metrics import frechet_distance

        s = self._summary(np.asarray(x))
        r = self.ref
        mse = float(np.mean((s["x"].astype(np.float64) - r["x"]) ** 2))
        out = {"mse": mse, "alignment": mse, "quality": mse, "temporal": 0.0}
        if "feats" in s and s["feats"].shape[0] >= 2:
            out["quality"] = max(frechet_distance(s["feats"], r["feats"]), 0.0)
        if "margin" in s:
            out["alignment"] = float(np.mean(np.maximum(r["margin"] - s["margin"], 0.0)))
        if self.video:
            out["temporal"] = float(np.mean(np.abs(s["tc"] - r["tc"])))
        return out


# --------------------------------------------------------------------------- candidate sampler
def candidate_sampler(family, config, bounds: tuple, *, solver: Optional[str] = None, steps: int = 12,
                      guidance: Optional[float] = None):
    """``run(tree, low, on, seg, x_T, cond, uncond, key) -> x_0``, jitted once: sampling with
    the params ``tree`` in which every layer ``p`` of ``low`` (``{path: kernel}``) uses
    ``low[p]`` instead of its kernel at the steps whose timestep lies in segment ``seg``
    (``bounds``; ``seg = -1``: every step) when ``on[p]`` (a bool scalar) is set.  Samples
    with the family's own sampler (diffusion solvers, FLUX's flow-matching Euler, ...)."""
    from jaxdq.backend import REFERENCE

    def params_at(packed, t0):
        tree, low, on, seg = packed
        active = (seg < 0) | (segment_of(t0, bounds) == seg)

        def swap(path, layer):
            if path not in low:
                return layer
            return layer.replace(kernel=jnp.where(on[path] & active, low[path], layer.kernel))

        return map_layers(tree, swap)

    sample = family.sampler(config, solver=solver, num_steps=steps, guidance=guidance, policy=REFERENCE,
                            params_at=params_at)

    def run(tree, low, on, seg, x_T, cond, uncond, key):
        return sample((tree, low, on, seg), x_T, cond, uncond, key)

    return run


def _digits_like(x: np.ndarray) -> bool:
    """Samples the in-project digits classifier can score: grey 16×16 images or larger
    grey frames (cropped around the digit)."""
    return x.shape[1] == 1 and min(x.shape[-2:]) >= 16 and x.ndim in (4, 5)


def mixed_precision(params: Mapping, calib: Mapping, *, roles: Mapping[str, str], select: Callable[[str], bool],
                    model, layer_config: Callable[[int], LayerQuant], budget_bits: float = 6.0,
                    num_segments: int = 4, low: int = 4, high: int = 8, steps: int = 12, per_class: int = 2,
                    classes: Optional[tuple] = None, seed: int = MP_SEED, solver: Optional[str] = None,
                    guidance: Optional[float] = None, per_segment: bool = True, extractor: Any = "auto",
                    progress: bool = False) -> tuple[dict, dict]:
    """Metric-decoupled timestep-segment mixed precision of a (balanced) float params tree.

    Args:
      params: float params (already channel-balanced by the caller, if wanted).
      calib: a calibration result (its ``"t"``: the timesteps that define the segments).
      roles: path → role tag; ``select(path)``: the layers to allocate (the rest stay as they are).
      model: the float :class:`~jaxdq.models.sources.LoadedModel` (family, config).
      layer_config: ``bits -> LayerQuant`` of a layer at ``low`` or ``high`` weight bits.
      steps, per_class, classes, seed, solver, guidance: the sensitivity samples: up to 10
        classes (or digit captions) × ``per_class``, ``steps`` solver steps.
      per_segment: one allocation per segment (True) or one for all timesteps.
      extractor: the feature network of the metrics; "auto": the digits classifier when the
        samples are digits-like, else None (MSE fallbacks, said in the report).
    Returns:
      ``(params, report)``: the report has the budget, groups, metric kinds, the cost, and per
      segment the group MSEs, every layer's sensitivities, the promoted layers and average bits.
    """
    t_start = time.time()
    if calib is None or "t" not in calib:
        raise ValueError("mixed precision needs a calibration (its timesteps define the segments)")
    from jaxdq.sampling.families import Request

    fam, config = model.family, model.config
    paths = [p for p, l in iter_layers(params) if isinstance(l, FloatLinear) and select(p)]
    layers = dict(iter_layers(params))
    sizes = {p: int(np.prod(layers[p].kernel.shape)) for p in paths}
    cond_adaln = conditioning_in_adaln(roles)
    groups = {p: group_of(roles.get(p), cond_adaln) for p in paths}
    present = [g for g in GROUPS if g in groups.values()]
    deq = lambda k, bits: fake_quant(jnp.asarray(k, jnp.float32), QuantSpec(bits=bits, granularity="channel"),  # noqa: E731
                                     kind="weight")
    low_k = {p: deq(layers[p].kernel, low) for p in paths}
    tree = map_layers(params, lambda p, l: l.replace(kernel=deq(l.kernel, high)) if p in sizes else l)
    bounds = segment_bounds(np.asarray(calib["t"]), num_segments)

    req = Request(classes=classes if classes is not None else _default_classes(fam, config), per_class=per_class,
                  seed=seed)
    batch = fam.batch(config, req)
    run = candidate_sampler(fam, config, bounds, solver=solver, steps=steps, guidance=guidance)
    key = jax.random.PRNGKey(seed + 1)
    off = {p: jnp.asarray(False) for p in paths}

    def sample_with(on: Mapping[str, bool], seg: int, p=None) -> np.ndarray:
        flags = {q: jnp.asarray(bool(on.get(q, False))) for q in paths}
        x = run(p if p is not None else tree, low_k, flags, jnp.int32(seg), batch.x_T, batch.cond, batch.uncond, key)
        return np.asarray(jax.block_until_ready(x))

    reference = sample_with({}, -1)                          # every allocated layer at `high` bits
    float_x = np.asarray(run(params, low_k, off, jnp.int32(-1), batch.x_T, batch.cond, batch.uncond, key))
    if isinstance(extractor, str) and extractor == "auto":
        from jaxdq.metrics import load_digits_classifier

        extractor = load_digits_classifier() if _digits_like(reference) else None
    labels = batch.labels if batch.labels is not None and extractor is not None else None
    scorer = SampleScorer(reference, labels, extractor)
    runs = 2
    segs = list(range(num_segments)) if per_segment else [-1]
    bar = None
    if progress:
        from jaxdq.sampling.progress import ProgressBar

        bar = ProgressBar(len(segs) * (len(present) + len(paths)), "mixed precision")
    report = {"budget_bits": budget_bits, "low": low, "high": high, "per_segment": per_segment,
              "num_segments": num_segments, "bounds": list(bounds), "groups": {p: groups[p] for p in paths},
              "group_metric": {g: GROUP_METRIC[g] for g in present}, "metric_kinds": scorer.kinds,
              "conditioning_in_adaln": cond_adaln, "samples": int(batch.size), "steps": steps,
              "high_vs_float_mse": float(np.mean((reference - float_x) ** 2)), "segments": []}
    promoted = []
    for seg in segs:
        group_mse = {}
        for g in present:
            group_mse[g] = scorer(sample_with({p: True for p in paths if groups[p] == g}, seg))["mse"]
            runs += 1
            if bar:
                bar.update(1)
        sens = {}
        for p in paths:
            sens[p] = scorer(sample_with({p: True}, seg))
            runs += 1
            if bar:
                bar.update(1)
        rank = {p: sens[p][GROUP_METRIC[groups[p]]] for p in paths}
        chosen, acct = allocate(sizes, groups, group_mse, rank, budget_bits, low, high)
        promoted.append(chosen)
        report["segments"].append({"segment": seg, "group_mse": group_mse, "promoted": sorted(chosen),
                                   "avg_bits": acct["used"] / max(sum(sizes.values()), 1),
                                   "group_budget": acct["groups"], "sensitivity": sens})
    if bar:
        bar.close()
    if not per_segment:
        report["static"] = {"promoted": report["segments"][0]["promoted"],
                            "avg_bits": report["segments"][0]["avg_bits"]}
        promoted = promoted * num_segments
    report["cost"] = {"sampling_runs": runs, "samples_per_run": int(batch.size), "steps_per_run": steps,
                      "seconds": round(time.time() - t_start, 1)}

    cfg_lo, cfg_hi = layer_config(low), layer_config(high)

    def build(path: str, layer: Any):
        if path not in sizes:
            return layer
        index = tuple(int(path in ch) for ch in promoted)
        if all(index):
            return quantize_linear(layer, cfg_hi)
        if not any(index):
            return quantize_linear(layer, cfg_lo)
        return Segmented(variants=(quantize_linear(layer, cfg_lo), quantize_linear(layer, cfg_hi)),
                         index=index, bounds=bounds)

    return map_layers(params, build), report


def _default_classes(fam, config) -> Optional[tuple]:
    """Up to 10 rows: the digits of class-conditional models, the first caption of each
    digit of the caption-conditioned default models (other models: the family's default)."""
    nc = getattr(fam, "num_classes", None)
    if nc is not None:
        n = nc(config)
        return None if n is None else tuple(range(min(n, 10)))
    dc = getattr(fam, "default_captions", None)
    if dc is not None and dc(config) is not None:
        return tuple(range(10))
    return None
