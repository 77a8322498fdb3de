"""A dependency-free progress bar on stderr, for host loops and for ``lax.scan`` bodies.

Host loop::

    with ProgressBar(total=len(items), desc="quantizing") as bar:
        for item in items:
            ...
            bar.update()

Inside a jitted ``lax.scan`` body, :func:`scan_progress` prints the bar from a
``jax.debug.callback``; the line is rendered from the step count alone, so no
state is kept anywhere.
"""
from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp

BAR_WIDTH = 20


def render(desc: str, n: int, total: int) -> str:
    """One bar line (no ``\\r``/newline), e.g. ``'sampling ddim 23/50 [#########-----------]'``."""
    n = max(0, min(int(n), total))
    filled = BAR_WIDTH * n // total if total > 0 else BAR_WIDTH
    width = len(str(total))
    return f"{desc} {n:>{width}}/{total} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}]"


class ProgressBar:
    """``\\r``-redrawn progress bar on stderr (or ``stream``); ``close()`` ends the line.

    Args:
      total: number of ``update()`` units at completion.
      desc: text before the counter.
      stream: file-like with ``write``/``flush``; default ``sys.stderr`` at each write.
    """

    def __init__(self, total: int, desc: str = "", stream=None):
        self.total, self.desc, self.n = int(total), desc, 0
        self._stream, self._closed = stream, False
        self._write("\r" + render(desc, 0, self.total))

    def _write(self, text: str) -> None:
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(text)
        stream.flush()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._write("\r" + render(self.desc, self.n, self.total))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write("\n")

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _print_step(count, *_, total: int, desc: str) -> None:
    count = int(count)
    done = count >= total
    # A log file (not a terminal) gets a line per tenth instead of a redraw per step.
    if not sys.stderr.isatty():
        tenth = max(1, total // 10)
        if count % tenth and not done:
            return
        sys.stderr.write(render(desc, count, total) + "\n")
    else:
        sys.stderr.write("\r" + render(desc, count, total) + ("\n" if done else ""))
    sys.stderr.flush()


def scan_progress(count: jax.Array, total: int, desc: str, after=None) -> None:
    """Print the bar at ``count``/``total`` from inside traced code (e.g. a scan body).

    Emits an (unordered) ``jax.debug.callback``; the line is ended with a newline
    when ``count >= total``.

    Args:
      count: int scalar, possibly traced: steps completed (1-based).
      total: Python int, steps in all.
      desc: text before the counter.
      after: optional pytree of arrays; the bar is drawn only once its first
        leaf is computed (one element is sent to the host), so it advances when
        a step has finished rather than whenever XLA schedules the callback.
    """
    args = [count]
    if after is not None:
        leaf = jax.tree_util.tree_leaves(after)[0]
        args.append(jnp.ravel(leaf)[0])
    jax.debug.callback(functools.partial(_print_step, total=int(total), desc=desc), *args)
