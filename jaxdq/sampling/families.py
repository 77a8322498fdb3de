"""Per-family sampling: conditioning, noise, jitted samplers and one-call model inputs.

Every model family jaxdq samples has a :class:`Family` here; the model registry
(:func:`jaxdq.models.registry.family`) hands it to calibration, mixed precision, compare
and the CLI, so those run on every family through one interface:

* :meth:`Family.batch` — the initial noise and conditioning of N samples
  (:class:`Batch`): class labels (DiT, class-conditional UNets), text states and masks
  (PixArt, Latte, SD UNet; from a captions ``.npz`` or prompts, else random states, said
  so in ``Batch.notes``), T5 + pooled CLIP states and distilled guidance (FLUX), frames
  (Latte);
* :meth:`Family.sampler` — ``run(params, x_T, cond, uncond, key) -> x_0`` under ``jax.jit``
  (and the trajectory of model inputs), float or quantized params, time-dependent layers
  resolved per step, quantized layers executed under a :class:`jaxdq.backend.Policy`;
* :meth:`Family.model_kwargs` — the keyword arguments of one network call at ``(x_t, t)``
  for a condition (what calibration replays along the trajectory).

=========  =====================================  ==========================================
family     schedule                               default solver / guidance
=========  =====================================  ==========================================
DiT        linear β 1e-4 … 0.02, 1000 steps       DDIM 50 steps, CFG 4
PixArt     linear β                               DPM-Solver++(2M) 20 steps, CFG 4.5
Latte      linear β                               DDIM 50 steps, CFG 7.5
UNet2D     linear β                               DDIM 50 steps (CFG 4 if class-conditional)
SD / LDM   scaled-linear β 0.00085 … 0.012        DDIM 50 steps, CFG 7.5
FLUX.1     flow matching, resolution-shifted σ    Euler 28 steps, distilled guidance 3.5
=========  =====================================  ==========================================

A conditioning dict holds the network's keyword arguments that carry the condition
(``{"y": [N]}``, ``{"encoder_hidden_states": [N, L, D], "encoder_attention_mask": [N, L]}``,
...); ``uncond`` is the null condition of classifier-free guidance, or None (FLUX.1-dev's
distilled guidance, unconditional UNets).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdq.backend import REFERENCE, Policy, bind
from jaxdq.quant.timestep import timestep_aware
from jaxdq.sampling.api import sample
from jaxdq.sampling.schedule import linear_schedule, scaled_linear_schedule

Cond = dict


@dataclasses.dataclass
class Batch:
    """Initial noise and conditioning of N samples, grouped in rows of ``per_row``.

    x_T: ``[N, C, H, W]`` (Latte ``[N, C, F, H, W]``) float32 noise.
    cond / uncond: conditioning dicts with leading batch N (``uncond`` None: no CFG).
    labels: ``[N]`` int class (or prompted digit) of each sample, where known (class agreement).
    rows: a label per row (class ids, prompts).
    notes: what a user should know (e.g. random caption states).
    """

    x_T: jax.Array
    cond: Cond
    uncond: Optional[Cond]
    labels: Optional[np.ndarray]
    rows: list
    per_row: int
    notes: list = dataclasses.field(default_factory=list)

    @property
    def size(self) -> int:
        return int(self.x_T.shape[0])


@dataclasses.dataclass(frozen=True)
class Request:
    """What to sample: ``classes`` (class-conditional families), ``prompts`` or a ``captions``
    ``.npz`` path (text families), ``per_class`` samples per row, noise ``seed``."""

    classes: Optional[tuple] = None
    prompts: Optional[tuple] = None
    captions: Optional[str] = None
    per_class: int = 4
    seed: int = 0


def guided(apply: Callable[..., jax.Array], cond: Cond, uncond: Optional[Cond], scale,
           out_channels: Optional[int] = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Classifier-free guidance as ``model_fn(x, t)``: one call on the doubled batch
    ``[x; x]`` with ``[cond; uncond]``, ``ε = ε_u + scale (ε_c − ε_u)`` on the first
    ``out_channels`` (default: x's) channels, the rest (learned variance) from the cond
    half.  ``uncond`` None or a Python ``scale == 1`` is conditional sampling, one call."""
    if uncond is None or (isinstance(scale, (int, float)) and scale == 1):
        return lambda x, t: apply(x, t, **cond)

    def model_fn(x, t):
        b, c = x.shape[0], out_channels or x.shape[1]
        both = {k: jnp.concatenate([v, jnp.asarray(uncond[k]).astype(v.dtype)]) for k, v in cond.items()}
        out = apply(jnp.concatenate([x, x]), jnp.concatenate([t, t]), **both)
        oc, ou = out[:b], out[b:]
        eps = ou[:, :c] + scale * (oc[:, :c] - ou[:, :c])
        return jnp.concatenate([eps.astype(out.dtype), oc[:, c:]], axis=1)

    return model_fn


def _noise(shape, seed: int) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _repeat(cond: Mapping, per_row: int) -> Cond:
    return {k: jnp.repeat(jnp.asarray(v), per_row, axis=0) for k, v in cond.items()}


# --------------------------------------------------------------------------- text conditioning
@dataclasses.dataclass
class Captions:
    """Caption embeddings: ``states [P, L, D]`` float32, ``mask [P, L]`` int, the null
    caption ``null_states [1, L, D]`` / ``null_mask [1, L]``, and optionally ``labels [P]``
    (digit of each caption) and ``texts``."""

    states: np.ndarray
    mask: np.ndarray
    null_states: np.ndarray
    null_mask: np.ndarray
    labels: Optional[np.ndarray] = None
    texts: Optional[list] = None


def load_captions(path: str) -> Captions:
    """Read a captions ``.npz``: ``states [P, L, D]`` and ``mask [P, L]`` (required), and
    ``null_states``/``null_mask`` (default: zeros with the first token kept), ``labels``,
    ``captions`` (optional).  ValueError naming the file and the problem."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no captions file at {path}")
    try:
        z = np.load(path, allow_pickle=False)
        data = {k: z[k] for k in z.files}
    except Exception as e:  # noqa: BLE001  (any unreadable file gets the same one line)
        raise ValueError(f"{path}: not a readable .npz of caption embeddings ({type(e).__name__})") from None
    if "states" not in data or "mask" not in data:
        raise ValueError(f"{path}: a captions file needs arrays 'states' [P, L, D] and 'mask' [P, L]; "
                         f"found {sorted(data)}")
    states, mask = np.asarray(data["states"], np.float32), np.asarray(data["mask"])
    if states.ndim != 3 or mask.shape != states.shape[:2]:
        raise ValueError(f"{path}: 'states' must be [P, L, D] and 'mask' [P, L]; got {states.shape} and {mask.shape}")
    if not np.all(np.isfinite(states)):
        raise ValueError(f"{path}: 'states' holds NaN or inf")
    null_states = data.get("null_states")
    if null_states is None:
        null_states = np.zeros((1,) + states.shape[1:], np.float32)
        null_mask = np.zeros((1, states.shape[1]), mask.dtype)
        null_mask[:, 0] = 1
    else:
        null_mask = data.get("null_mask", np.ones(null_states.shape[:2], mask.dtype))
    texts = [str(t) for t in data["captions"]] if "captions" in data else None
    labels = np.asarray(data["labels"], np.int32) if "labels" in data else None
    return Captions(states, mask.astype(np.int32), np.asarray(null_states, np.float32),
                    np.asarray(null_mask, np.int32), labels, texts)


def _captions_for(req: Request, length: int, width: int, default: Optional[Callable[[], Captions]]
                  ) -> tuple[Captions, list]:
    """The caption rows for a request: prompts (encoded, cached), a captions file, the
    model's own captions, or random states (with a note)."""
    if req.prompts:
        from jaxdq.text import encode_prompts, null_caption

        states, mask = encode_prompts(list(req.prompts))
        null_states, null_mask = null_caption()
        caps = Captions(states, mask, null_states, null_mask, texts=list(req.prompts),
                        labels=_digits_in(req.prompts))
        return caps, []
    if req.captions:
        return load_captions(req.captions), []
    if default is not None:
        return default(), []
    rows = len(req.classes) if req.classes else 4
    rng = np.random.default_rng(req.seed)
    states = rng.standard_normal((rows, length, width)).astype(np.float32)
    caps = Captions(states, np.ones((rows, length), np.int32), np.zeros((1, length, width), np.float32),
                    np.pad(np.ones((1, 1), np.int32), ((0, 0), (0, length - 1))),
                    texts=[f"random caption {i}" for i in range(rows)])
    return caps, [f"no --captions file or --prompt given: sampling from {rows} random caption embeddings "
                  f"[{length}, {width}] (pass --captions FILE.npz with 'states' and 'mask' for real text)"]


def _digits_in(prompts: Sequence[str]) -> Optional[np.ndarray]:
    """The digit each prompt names (a word or numeral), for class agreement; None if one names none."""
    from jaxdq.data import DIGIT_WORDS

    out = []
    for p in prompts:
        words = p.lower().replace(",", " ").split()
        hit = [i for i, w in enumerate(DIGIT_WORDS) if w in words] + [int(w) for w in words if w.isdigit() and len(w) == 1]
        if len(set(hit)) != 1:
            return None
        out.append(hit[0])
    return np.asarray(out, np.int32)


def _select_caption_rows(caps: Captions, req: Request) -> tuple[Captions, list]:
    """Rows of a caption set chosen by ``req.classes``: for captions with labels, the first
    caption of each requested digit; otherwise the first ``len(classes)`` captions."""
    if req.prompts or not req.classes:
        return caps, list(caps.texts or range(len(caps.states)))
    if caps.labels is not None:
        idx = []
        for c in req.classes:
            hits = np.nonzero(caps.labels == c)[0]
            if not len(hits):
                raise ValueError(f"no caption for class {c} in the captions (labels {sorted(set(caps.labels.tolist()))})")
            idx.append(int(hits[0]))
    else:
        if max(req.classes) >= len(caps.states):
            raise ValueError(f"caption rows must be in [0, {len(caps.states)}); got {list(req.classes)}")
        idx = list(req.classes)
    pick = dataclasses.replace(caps, states=caps.states[idx], mask=caps.mask[idx],
                               labels=None if caps.labels is None else caps.labels[idx],
                               texts=None if caps.texts is None else [caps.texts[i] for i in idx])
    return pick, list(pick.texts or idx)


# --------------------------------------------------------------------------- families
class Family:
    """Sampling knowledge of one model family (see module docstring); subclasses fill in
    the schedule, conditioning and call convention."""

    name = "?"
    latent = False          # x_0 are latents (decode with a VAE to see images)
    solver = "ddim"
    steps = 50
    guidance = 4.0
    schedule = staticmethod(linear_schedule)

    def module(self, config):
        raise NotImplementedError

    def batch(self, config, req: Request) -> Batch:
        raise NotImplementedError

    def model_kwargs(self, config, x: jax.Array, t: jax.Array, cond: Cond) -> dict:
        """Keyword arguments of ``module.apply`` for one call at ``x [B, ...]``, ``t [B]``."""
        return {"x": x, "t": t, **cond}

    def out_channels(self, config) -> Optional[int]:
        return None

    def call_cond(self, cond: Cond, guidance: Optional[float]) -> Cond:
        """The condition as the network sees it in one call (FLUX adds its distilled guidance)."""
        return cond

    def eps_fn(self, config, policy: Policy = REFERENCE):
        """``eps(params, x, t, **cond) -> [B, C, ...]``: the network's noise (or velocity)
        prediction in ``x``'s layout (learned-variance channels dropped)."""
        apply = self.apply_fn(config, policy)
        return lambda params, x, t, **cond: self.to_eps(apply(params, x, t, **cond), x)

    def to_eps(self, out: jax.Array, x: jax.Array) -> jax.Array:
        return out[:, :x.shape[1]]

    def apply_fn(self, config, policy: Policy):
        """``apply(params, x, t, **cond)``: one network call, quantized layers under ``policy``."""
        module = self.module(config)

        def apply(params, x, t, **cond):
            return module.apply({"params": bind(params, policy)}, **self.model_kwargs(config, x, t, cond))

        return apply

    def sampler(self, config, *, solver: Optional[str] = None, num_steps: Optional[int] = None,
                guidance: Optional[float] = None, policy: Policy = REFERENCE, return_trajectory: bool = False,
                progress: bool = False, mesh=None, params_at: Optional[Callable] = None):
        """``run(params, x_T, cond, uncond, key) -> x_0`` (``, trajectory`` with
        ``{"x": [S, N, ...], "t": [S]}``: the model input and timestep of every step).
        ``params_at(params, t0) -> params``: the network's params at each step's timestep
        ``t0`` (a scalar), for callers whose ``params`` is their own pytree (mixed precision's
        candidate swaps); default: the time-dependent layers resolved for ``t0``.
        ``mesh``: a ``jax.sharding.Mesh`` to run on, data parallel over its "data" axis
        (:func:`jaxdq.distributed.data_parallel`; params sharded beforehand with
        :func:`jaxdq.distributed.shard_params` stay as placed, others are replicated)."""
        solver, num_steps = solver or self.solver, num_steps or self.steps
        scale = self.guidance if guidance is None else guidance
        schedule, apply = self.schedule(), self.apply_fn(config, policy)
        oc = self.out_channels(config)

        @jax.jit
        def run(params, x_T, cond, uncond, key):
            fn = guided(_network_at(apply, params, params_at), cond, uncond, scale, oc)
            return sample(fn, x_T, key, schedule=schedule, solver=solver, num_steps=num_steps,
                          return_trajectory=return_trajectory, progress=progress)

        return _on_mesh(run, mesh)


class ClassFamily(Family):
    """Class-conditional families: ``cond = {label_key: [N] int}``, null class for CFG."""

    label_key = "y"

    def num_classes(self, config) -> Optional[int]:
        raise NotImplementedError

    def null_label(self, config) -> int:
        return self.num_classes(config)

    def image_shape(self, config) -> tuple:
        raise NotImplementedError

    def batch(self, config, req: Request) -> Batch:
        nc = self.num_classes(config)
        if nc is None:  # unconditional model: one row of samples
            n = max(1, len(req.classes or (0,))) * req.per_class
            return Batch(_noise((n,) + self.image_shape(config), req.seed), {}, None, None,
                         ["unconditional"] * (n // req.per_class), req.per_class)
        classes = list(range(min(nc, 10))) if req.classes is None else list(req.classes)
        if not classes or any(not 0 <= c < nc for c in classes):
            raise ValueError(f"classes must be in [0, {nc}); got {classes}")
        y = jnp.repeat(jnp.asarray(classes, jnp.int32), req.per_class)
        x_T = _noise((y.shape[0],) + self.image_shape(config), req.seed)
        return Batch(x_T, {self.label_key: y}, {self.label_key: jnp.full_like(y, self.null_label(config))},
                     np.asarray(y), [str(c) for c in classes], req.per_class)


class DiTFamily(ClassFamily):
    name = "dit"

    def module(self, config):
        from jaxdq.models.dit import DiT

        return DiT(config)

    def num_classes(self, config):
        return config.num_classes

    def image_shape(self, config):
        return (config.in_channels, config.input_size, config.input_size)


class UNetFamily(ClassFamily):
    """DDPM ``UNet2DModel`` (unconditional, or class-conditional with ``num_class_embeds``)."""

    name = "unet"
    label_key = "class_labels"

    def module(self, config):
        from jaxdq.models.unet import UNet

        return UNet(config)

    def num_classes(self, config):
        n = getattr(config, "num_class_embeds", None)
        return None if n is None else n - 1  # the last label is the CFG null class

    def image_shape(self, config):
        size = config.sample_size or 32
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (config.in_channels, h, w)

    def model_kwargs(self, config, x, t, cond):
        return {"sample": x, "timesteps": t, **cond}


class TextFamily(Family):
    """Text-conditioned transformers (PixArt, Latte): T5-style states + masks."""

    latent = True

    def caption_width(self, config) -> int:
        return config.caption_channels

    def caption_length(self, config) -> int:
        return config.max_text_tokens

    def image_shape(self, config) -> tuple:
        raise NotImplementedError

    def default_captions(self, config) -> Optional[Callable[[], Captions]]:
        """The model's own caption set, if it ships one: jaxdq's digit captions for models
        trained on them (caption width 384, the default text and video models)."""
        from jaxdq.data import CAPTIONS_ASSET

        if getattr(config, "caption_channels", None) != 384 or not os.path.exists(CAPTIONS_ASSET):
            return None
        return lambda: load_captions(CAPTIONS_ASSET)

    def out_channels(self, config):
        return config.in_channels

    def batch(self, config, req: Request) -> Batch:
        caps, notes = _captions_for(req, self.caption_length(config), self.caption_width(config),
                                    self.default_captions(config))
        caps, rows = _select_caption_rows(caps, req)
        if caps.states.shape[-1] != self.caption_width(config):
            raise ValueError(f"caption states are {caps.states.shape[-1]}-wide but this model's captions are "
                             f"{self.caption_width(config)}-wide")
        k = req.per_class
        n = len(caps.states) * k
        cond = _repeat({"encoder_hidden_states": caps.states, "encoder_attention_mask": caps.mask}, k)
        uncond = {"encoder_hidden_states": jnp.repeat(jnp.asarray(caps.null_states), n, axis=0),
                  "encoder_attention_mask": jnp.repeat(jnp.asarray(caps.null_mask), n, axis=0)}
        labels = None if caps.labels is None else np.repeat(caps.labels, k)
        return Batch(_noise((n,) + self.image_shape(config), req.seed), cond, uncond, labels, rows, k, notes)


class PixArtFamily(TextFamily):
    name = "pixart"
    solver, steps, guidance = "dpm++2m", 20, 4.5

    def module(self, config):
        from jaxdq.models.pixart import PixArt

        return PixArt(config)

    def image_shape(self, config):
        return (config.in_channels, config.sample_size, config.sample_size)


class LatteFamily(TextFamily):
    name = "latte"
    solver, steps, guidance = "ddim", 50, 7.5

    def module(self, config):
        from jaxdq.models.latte import Latte

        return Latte(config)

    def image_shape(self, config):
        return (config.in_channels, config.video_length, config.sample_size, config.sample_size)


class SDFamily(TextFamily):
    """LDM / Stable Diffusion ``UNet2DConditionModel``: text states, no mask."""

    name = "sd-unet"
    schedule = staticmethod(scaled_linear_schedule)
    solver, steps, guidance = "ddim", 50, 7.5

    def module(self, config):
        from jaxdq.models.unet import UNet

        return UNet(config)

    def caption_width(self, config):
        return config.cross_attention_dim

    def caption_length(self, config):
        return 77

    def default_captions(self, config):
        return None

    def out_channels(self, config):
        return None

    def image_shape(self, config):
        size = config.sample_size or 64
        return (config.in_channels, size, size)

    def batch(self, config, req):
        b = super().batch(config, req)
        drop = lambda c: {"encoder_hidden_states": c["encoder_hidden_states"]}  # noqa: E731
        return dataclasses.replace(b, cond=drop(b.cond), uncond=drop(b.uncond))

    def model_kwargs(self, config, x, t, cond):
        return {"sample": x, "timesteps": t, **cond}


class FluxFamily(Family):
    """FLUX.1: flow-matching Euler over the resolution-shifted σ schedule; the network
    sees packed latents ``[N, (H/2)(W/2), 4C]``; guidance-distilled (dev) or not (schnell)."""

    name = "flux"
    latent = True
    solver, steps, guidance = "euler", 28, 3.5
    text_tokens = 64
    size = 32  # latent height = width of the default request

    def module(self, config):
        from jaxdq.models.flux import Flux

        return Flux(config)

    def batch(self, config, req: Request) -> Batch:
        notes = []
        if req.captions:
            z = np.load(req.captions)
            if "txt" not in z.files or "pooled" not in z.files:
                raise ValueError(f"{req.captions}: a FLUX captions file needs 'txt' [P, T, J] and 'pooled' [P, P']")
            txt, pooled = np.asarray(z["txt"], np.float32), np.asarray(z["pooled"], np.float32)
        else:
            rows = len(req.classes) if req.classes else 2
            rng = np.random.default_rng(req.seed)
            txt = rng.standard_normal((rows, self.text_tokens, config.joint_attention_dim)).astype(np.float32)
            pooled = rng.standard_normal((rows, config.pooled_projection_dim)).astype(np.float32)
            notes.append(f"no --captions file given: sampling from {rows} random T5/CLIP embeddings "
                         "(pass --captions FILE.npz with 'txt' and 'pooled')")
        k = req.per_class
        c = config.in_channels // 4
        n = txt.shape[0] * k
        x_T = _noise((n, c, self.size, self.size), req.seed)
        return Batch(x_T, _repeat({"txt": txt, "pooled": pooled}, k), None, None,
                     [f"prompt {i}" for i in range(txt.shape[0])], k, notes)

    def call_cond(self, cond, guidance):
        return dict(cond, guidance=self.guidance if guidance is None else guidance)

    def to_eps(self, out, x):
        from jaxdq.models.flux import unpack_latents

        return unpack_latents(out, *x.shape[-2:])

    def model_kwargs(self, config, x, t, cond):
        from jaxdq.models.flux import image_ids, pack_latents, text_ids

        h, w = x.shape[-2:]
        g = None if not config.guidance_embeds else jnp.full((x.shape[0],), cond.get("guidance", self.guidance),
                                                             jnp.float32)
        return {"img": pack_latents(x), "txt": cond["txt"], "pooled": cond["pooled"], "timestep": t,
                "img_ids": jnp.asarray(image_ids(h, w)), "txt_ids": jnp.asarray(text_ids(cond["txt"].shape[1])),
                "guidance": g}

    def sampler(self, config, *, solver=None, num_steps=None, guidance=None, policy: Policy = REFERENCE,
                return_trajectory: bool = False, progress: bool = False, mesh=None,
                params_at: Optional[Callable] = None):
        from jaxdq.models.flux import pack_latents, unpack_latents
        from jaxdq.sampling.flow import flow_euler_sample, flux_sigmas

        if solver not in (None, "euler"):
            raise ValueError(f"FLUX samples with the flow-matching Euler solver, not {solver!r}")
        num_steps = num_steps or self.steps
        g = self.guidance if guidance is None else guidance
        apply = self.apply_fn(config, policy)

        @jax.jit
        def run(params, x_T, cond, uncond, key):
            del uncond, key  # distilled guidance; the Euler solver is deterministic
            h, w = x_T.shape[-2:]
            sigmas = jnp.asarray(flux_sigmas(num_steps, (h // 2) * (w // 2)), jnp.float32)
            net = _network_at(apply, params, params_at)
            c = self.call_cond(cond, g)

            def velocity(packed, sigma):  # the network takes latents and returns packed tokens
                return net(unpack_latents(packed, h, w), sigma, **c)

            out = flow_euler_sample(velocity, pack_latents(x_T), sigmas=sigmas, progress=progress,
                                    return_trajectory=return_trajectory)
            if not return_trajectory:
                return unpack_latents(out, h, w)
            x0, traj = out
            xs = jax.vmap(lambda p: unpack_latents(p, h, w))(traj["x"])
            return unpack_latents(x0, h, w), {"x": xs, "t": traj["sigma"]}

        return _on_mesh(run, mesh)


def _network_at(apply, params, params_at: Optional[Callable]):
    """``f(x, t, **cond)``: ``apply`` with ``params`` resolved at the step's timestep
    (:func:`timestep_aware`, or the caller's ``params_at(params, t0)``)."""
    if params_at is None:
        return timestep_aware(apply, params)
    return lambda x, t, *a, **kw: apply(params_at(params, jnp.reshape(t, (-1,))[0]), x, t, *a, **kw)


def _on_mesh(run, mesh):
    """``run`` itself, or data parallel on ``mesh`` (:func:`jaxdq.distributed.data_parallel`)."""
    if mesh is None:
        return run
    from jaxdq.distributed import data_parallel

    return data_parallel(run, mesh)


FAMILIES = {f.name: f for f in (DiTFamily(), PixArtFamily(), LatteFamily(), UNetFamily(), SDFamily(), FluxFamily())}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"model family {name!r} has no sampler; families with one: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def trajectory_kwargs(family: Family, config, traj: Mapping, cond: Cond) -> dict:
    """Per-step keyword arguments ``{name: [S, B, ...]}`` of the network along a sampling
    trajectory (``traj["x"] [S, B, ...]``, ``traj["t"] [S]``) for one condition (what
    :func:`jaxdq.calibrate.collect_step_stats` replays)."""
    steps, n = traj["x"].shape[:2]
    t = jnp.broadcast_to(jnp.asarray(traj["t"])[:, None], (steps, n))
    per_step = lambda x, tt: family.model_kwargs(config, x, tt, cond)  # noqa: E731
    return jax.vmap(per_step)(jnp.asarray(traj["x"]), t)


__all__ = ["Batch", "Captions", "FAMILIES", "Family", "Request", "get_family", "guided", "load_captions",
           "trajectory_kwargs"]
