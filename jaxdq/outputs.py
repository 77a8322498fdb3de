"""Writing outputs without ever losing what jaxdq did not write.

* A checkpoint output must be a new path or an existing jaxdq checkpoint, and replacing one
  needs ``force``; it is written to a sibling temporary directory and renamed into place,
  so an interrupted run leaves the old checkpoint (or nothing), never a half-written one.
* A file output (a PNG) must be new unless ``force``; written to a sibling temporary file
  and renamed.
* An output directory of ``compare``/``demo`` may exist; the files jaxdq writes there
  (``compare.md``, ``compare.json``, ``compare.png``) are replaced only when they are a
  previous jaxdq comparison's; nothing else in it is touched.
* Every check runs before any work (an unwritable location fails first).

The temporaries of the write in progress are listed so an interrupt can remove them
(:func:`remove_temporaries`, called by the CLI's SIGINT handler).
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from typing import Optional

COMPARE_FILES = ("compare.md", "compare.json", "compare.png")
PARTIAL_COMPARE = "compare.partial.json"  # the rows finished so far, while a comparison runs
_TEMPORARIES: set = set()  # paths of the write in progress (process-level, for the interrupt handler)


def is_jaxdq_checkpoint(path: str) -> bool:
    """A directory whose ``meta/metadata`` is jaxdq's JSON (it records a jaxdq version)."""
    meta = os.path.join(path, "meta", "metadata")
    try:
        with open(meta) as f:
            return "jaxdq_version" in json.load(f)
    except (OSError, ValueError):
        return False


def _check_writable_parent(path: str, what: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{what} {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{what} {path}: cannot write in {parent}")


def _inside(a: str, b: str) -> bool:
    """Whether path ``a`` is ``b`` or inside it."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def check_new_checkpoint(path: str, *, force: bool = False, source: Optional[str] = None) -> None:
    """ValueError unless ``path`` may receive a checkpoint (module docstring); ``source``
    (the input being converted, if a path) must not be ``path``, inside it or contain it."""
    if source is not None and os.path.exists(source) and (_inside(path, source) or _inside(source, path)):
        raise ValueError(f"--out {path} is the source {source} or inside it (or contains it); give a new path")
    if os.path.lexists(path):
        if not is_jaxdq_checkpoint(path):
            raise ValueError(f"--out {path} exists and is not a jaxdq checkpoint; refusing to overwrite it "
                             "(give a new path)")
        if not force:
            raise ValueError(f"--out {path} is an existing jaxdq checkpoint; pass --force to replace it")
    _check_writable_parent(path, "--out")


def check_new_file(path: str, *, force: bool = False) -> None:
    if os.path.isdir(path):
        raise ValueError(f"--out {path} is a directory; give a file name")
    if os.path.lexists(path) and not force:
        raise ValueError(f"--out {path} exists; pass --force to replace it")
    _check_writable_parent(path, "--out")


def check_output_dir(path: str) -> None:
    """ValueError unless ``path`` is a new directory, or one whose comparison files (if any)
    are a previous jaxdq comparison's."""
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ValueError(f"--out {path} exists and is not a directory")
        present = [n for n in COMPARE_FILES + (PARTIAL_COMPARE,) if os.path.lexists(os.path.join(path, n))]
        ours = [n for n in ("compare.json", PARTIAL_COMPARE) if n in present]
        if present and not (ours and all(_is_jaxdq_compare(os.path.join(path, n)) for n in ours)):
            raise ValueError(f"--out {path} holds {', '.join(present)} that jaxdq did not write; "
                             "refusing to overwrite them (give a new directory)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(f"--out {path}: cannot write in it")
    else:
        _check_writable_parent(path, "--out")


def _is_jaxdq_compare(path: str) -> bool:
    try:
        with open(path) as f:
            d = json.load(f)
        return isinstance(d, dict) and "settings" in d and "results" in d
    except (OSError, ValueError):
        return False


def _sibling(path: str, tag: str) -> str:
    path = os.path.abspath(path)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.jaxdq-{tag}-{os.getpid()}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def write_checkpoint(path: str, write: Callable[[str], object], *, force: bool = False) -> str:
    """``write(tmp)`` a checkpoint at a sibling temporary path, then rename it to ``path``
    (an existing checkpoint there — already checked by :func:`check_new_checkpoint` — is
    moved aside first and removed only after the new one is in place)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = _sibling(path, "tmp")
    _remove(tmp)
    _TEMPORARIES.add(tmp)
    try:
        write(tmp)
        if os.path.lexists(path):
            if not (force and is_jaxdq_checkpoint(path)):
                raise ValueError(f"--out {path} appeared while writing; refusing to overwrite it")
            old = _sibling(path, "old")
            os.rename(path, old)
            os.rename(tmp, path)
            _remove(old)
        else:
            os.rename(tmp, path)
    finally:
        _remove(tmp)
        _TEMPORARIES.discard(tmp)
    return path


def write_file(path: str, write: Callable[[str], object], *, force: bool = False) -> str:
    """``write(tmp)`` a file at a sibling temporary path, then rename it to ``path``."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = _sibling(root, "tmp") + ext
    _TEMPORARIES.add(tmp)
    try:
        write(tmp)
        if os.path.lexists(path) and not force:
            raise ValueError(f"--out {path} appeared while writing; refusing to overwrite it")
        os.replace(tmp, path)
    finally:
        _remove(tmp)
        _TEMPORARIES.discard(tmp)
    return path


def write_compare(out_dir: str, result: dict) -> None:
    """The comparison's files written to a temporary directory, then moved into ``out_dir``."""
    from jaxdq.compare import write_outputs

    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tmp = _sibling(os.path.join(out_dir, "compare"), "tmp")
    _TEMPORARIES.add(tmp)
    try:
        write_outputs(result, tmp)
        for name in COMPARE_FILES:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
        _remove(os.path.join(out_dir, PARTIAL_COMPARE))
    finally:
        _remove(tmp)
        _TEMPORARIES.discard(tmp)


def write_partial_compare(out_dir: str, partial: dict) -> None:
    """The rows finished so far as ``out_dir/compare.partial.json`` (temp + rename), so a
    comparison that is stopped keeps them; :func:`write_compare` removes it at the end."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, PARTIAL_COMPARE)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(partial, f, indent=1)
    write_file(path, write, force=True)


def remove_temporaries() -> None:
    """Remove the temporaries of the write in progress (after an interrupt)."""
    for p in list(_TEMPORARIES):
        _remove(p)
    _TEMPORARIES.clear()
