"""Model sources: what ``--model`` names, resolved to a :class:`LoadedModel`.

A *model source* is one of:
  ``"default"``                 the shipped class-conditional digits DiT;
  ``"default-unet"``            the shipped class-conditional digits UNet (``UNet2DModel`` layout);
  ``"default-text"``            the shipped caption-conditioned digits model (PixArt layout);
  ``"default-video"``           the shipped caption-conditioned moving-digits model (Latte layout);
  a jaxdq checkpoint directory  written by :func:`save_model` (float or quantized, any family);
  a PyTorch DiT checkpoint      ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` or a diffusers
                                folder, converted on the fly (other families: ``jaxdq convert``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Any, Optional

from jaxdq import checkpoint
from jaxdq.models.registry import get_arch


@dataclasses.dataclass
class LoadedModel:
    """A model: its family (``arch``), config, params (float or quantized) and metadata."""

    config: Any
    params: dict
    metadata: dict

    @property
    def arch(self) -> str:
        """Model family (:data:`jaxdq.models.registry.ARCH_NAMES`); checkpoints before it was recorded are DiTs."""
        return self.metadata.get("arch", "dit")

    @property
    def module(self):
        return get_arch(self.arch).module(self.config)

    @property
    def family(self):
        """The family's sampling interface (:class:`jaxdq.sampling.families.Family`)."""
        return get_arch(self.arch).sampling()

    @property
    def roles(self) -> dict:
        """``{linear path: role tag}`` of the model's linears (a fresh dict; the table is
        computed once per family and config: for a UNet it traces the param shapes)."""
        try:
            return dict(_roles_of(self.arch, self.config))
        except TypeError:  # an unhashable config
            return get_arch(self.arch).roles(self.config)

    @property
    def quantized(self) -> bool:
        return self.metadata.get("method", "float") != "float"


@functools.lru_cache(maxsize=64)
def _roles_of(arch: str, config) -> dict:
    return get_arch(arch).roles(config)


DEFAULT_SOURCES = {
    "default": ("dit", "load_default", "the digits DiT"),
    "default-unet": ("unet", "load_default_unet", "the digits UNet"),
    "default-text": ("pixart", "load_default_text", "the caption-conditioned digits model"),
    "default-video": ("latte", "load_default_video", "the moving-digits video model"),
}


class ModelSourceError(ValueError):
    """A model argument that names nothing jaxdq can load."""


def _float_meta(arch: str, source: str) -> dict:
    return {"arch": arch, "method": "float", "bits": "W32A32", "source": source}


def load_model(source: str = "default", *, num_heads: Optional[int] = None) -> LoadedModel:
    """Resolve a model source (see module docstring) to config + params."""
    if source in DEFAULT_SOURCES:
        from jaxdq.models import default

        arch, loader, _ = DEFAULT_SOURCES[source]
        cfg, params = getattr(default, loader)()
        return LoadedModel(cfg, params, _float_meta(arch, source))
    if os.path.isdir(source) and checkpoint.looks_like_checkpoint(source):
        return load_checkpoint(source)
    if os.path.exists(source):
        from converters import convert_dit, load_state_dict

        with _naming(source):
            cfg, params = convert_dit(load_state_dict(source, require_finite=True), num_heads=num_heads)
        return LoadedModel(cfg, params, _float_meta("dit", os.path.abspath(source)))
    raise ModelSourceError(f"unknown model {source!r}: no such file or directory, and not a shipped model "
                           f"(give {', '.join(repr(s) for s in DEFAULT_SOURCES)}, a jaxdq checkpoint directory, "
                           "or a PyTorch DiT checkpoint: .safetensors/.pt/.pth/.bin or a diffusers folder)")


def load_checkpoint(path: str) -> LoadedModel:
    """A jaxdq checkpoint directory (any family) → :class:`LoadedModel`; every other path
    (missing, a file, an empty or unfinished directory) is a one-line
    :class:`jaxdq.checkpoint.CheckpointFormatError` or ``FileNotFoundError`` naming it."""
    params, meta = checkpoint.load(path)
    try:
        arch = get_arch(meta.get("arch", "dit"))
        config = arch.config_from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise checkpoint.CheckpointFormatError(f"{path}: damaged checkpoint: meta/metadata does not describe a "
                                               f"model ({type(e).__name__}: {e})") from None
    return LoadedModel(config, params, meta)


@contextlib.contextmanager
def _naming(path: str):
    """Conversion errors name the checkpoint they are about (a reader's :class:`CheckpointError`
    already names the file at fault, a shard perhaps, and passes unchanged)."""
    from converters import CheckpointError

    try:
        yield
    except CheckpointError:
        raise
    except ValueError as e:
        msg = str(e)
        if path in msg or os.path.abspath(path) in msg:
            raise
        raise ModelSourceError(f"{path}: {msg}") from None


def convert_model(path: str, arch: str = "dit", *, config: Optional[str] = None,
                  num_heads: Optional[int] = None) -> LoadedModel:
    """Convert a PyTorch checkpoint of model family ``arch`` (see :mod:`jaxdq.models.registry`)."""
    from jaxdq.models.registry import convert_checkpoint

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory (no checkpoint there)")
    if arch == "dit" and config is None:
        return load_model(path, num_heads=num_heads)
    kwargs = {"num_heads": num_heads} if num_heads and arch in ("dit", "pixart", "latte") else {}
    with _naming(path):
        cfg, params = convert_checkpoint(arch, path, config, **kwargs)
    return LoadedModel(cfg, params, _float_meta(arch, os.path.abspath(path)))


def save_model(path: str, model: LoadedModel, *, force: bool = False, **metadata: Any) -> str:
    """Write ``model`` as a jaxdq checkpoint (see :mod:`jaxdq.checkpoint`)."""
    meta = {k: v for k, v in model.metadata.items() if k not in ("nodes", "layers", "jaxdq_version",
                                                                    "format_version")}
    meta.update(metadata, arch=model.arch, model=dataclasses.asdict(model.config))
    return checkpoint.save(path, model.params, metadata=meta, force=force)
