"""tqdm progress bars on stderr, for host loops and for jitted ``lax.scan`` bodies.

Host loop::

    with ProgressBar(total=len(items), desc="quantizing") as bar:
        for item in items:
            ...
            bar.update()

Inside a jitted ``lax.scan`` body, :func:`scan_progress` drives a tqdm bar from a
``jax.debug.callback``: the callback opens the bar when step 1 has finished, moves it
to each step count that arrives, and closes it at ``total``.

Where the bar's state lives: tqdm needs a bar object across steps (for the elapsed time,
rate and ETA), so a display derived from the count alone would lose what tqdm is for.
The object is held by the callback itself — one :class:`_ScanBar` made per traced
``scan_progress`` call, captured by the compiled function — not in a module-level table:
two scans with the same ``desc`` never share a bar, and there is nothing global to reset.
A count lower than the bar's (a new run after an interrupted one) starts a fresh bar; a
repeated count (``vmap`` calls the callback once per batch element) is ignored.

When the stream is not a terminal (a log file, CI, pytest's capture), bars print whole
lines (no ``\\r`` redraws), at most about one per tenth of the run (:data:`LOG_LINES`).
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import jax
import jax.numpy as jnp
from tqdm.std import tqdm

LOG_LINES = 10  # lines per bar (plus the last) when the stream is not a terminal


class _LogTqdm(tqdm):
    """tqdm for a stream that is not a terminal: one full line per display, no ``\\r``,
    no monitor thread (it would reset ``miniters`` and print every step)."""

    monitor_interval = 0

    def display(self, msg=None, pos=None):
        if msg == "":  # tqdm clearing the bar on close(leave=False): nothing to clear in a log
            return False
        self.fp.write((self.__str__() if msg is None else msg) + "\n")
        self.fp.flush()
        self._printed_n = self.n
        return True

    def close(self):
        if not self.disable and getattr(self, "_printed_n", None) != self.n:
            self.refresh()  # the final count, unless it was the last line printed
        super().close()


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def make_bar(total: int, desc: str = "", stream=None, *, unit: str = "it", initial: int = 0, **kwargs) -> tqdm:
    """A tqdm bar on ``stream`` (default ``sys.stderr`` now): redrawn in place on a terminal,
    about :data:`LOG_LINES` whole lines otherwise."""
    stream = stream if stream is not None else sys.stderr
    total = int(total)
    if _is_terminal(stream):
        return tqdm(total=total, desc=desc, file=stream, unit=unit, initial=initial, dynamic_ncols=True, **kwargs)
    every = max(1, math.ceil(total / LOG_LINES))
    return _LogTqdm(total=total, desc=desc, file=stream, unit=unit, initial=initial, leave=False,
                    mininterval=0, maxinterval=float("inf"), miniters=every, **kwargs)


def render(desc: str, n: int, total: int) -> str:
    """One tqdm-style bar line for ``n``/``total`` without timing, e.g.
    ``'sampling ddim:  46%|####6     | 23/50'`` (no ``\\r``/newline)."""
    n = max(0, min(int(n), int(total)))
    return tqdm.format_meter(n, int(total), 0, prefix=desc, ascii=True,
                             bar_format="{l_bar}{bar:10}| {n_fmt}/{total_fmt}")


class ProgressBar:
    """A tqdm progress bar on stderr (or ``stream``); ``close()`` ends it.

    Args:
      total: number of ``update()`` units at completion.
      desc: text before the bar.
      stream: file-like with ``write``/``flush``; default ``sys.stderr`` when the bar is made.
      unit: what one update counts (tqdm's ``unit``).
    """

    def __init__(self, total: int, desc: str = "", stream=None, *, unit: str = "it"):
        self.total, self.desc = int(total), desc
        self._bar = make_bar(self.total, desc, stream, unit=unit)

    @property
    def n(self) -> int:
        return int(self._bar.n)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _ScanBar:
    """The host side of one :func:`scan_progress` call site (see the module docstring)."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit = total, desc, unit
        self.bar: Optional[tqdm] = None

    def __call__(self, count, *_after) -> None:
        count = int(count)
        if self.bar is not None and count < self.bar.n:  # a new run after an unfinished one
            self.bar.close()
            self.bar = None
        if self.bar is None:
            if count < 1:
                return
            # opened once step 1 is done: the time to it (compilation, first step) is not in the rate
            self.bar = make_bar(self.total, self.desc, unit=self.unit, initial=min(count, self.total))
        elif count > self.bar.n:
            self.bar.update(min(count, self.total) - self.bar.n)
        if count >= self.total:
            self.bar.close()
            self.bar = None


def scan_progress(count: jax.Array, total: int, desc: str, after=None, *, unit: str = "step") -> None:
    """Advance a tqdm bar to ``count``/``total`` from inside traced code (e.g. a scan body).

    Emits an (unordered) ``jax.debug.callback``; the bar opens at count 1 and closes at
    ``count >= total``.

    Args:
      count: int scalar, possibly traced: steps completed (1-based).
      total: Python int, steps in all.
      desc: text before the bar.
      after: optional pytree of arrays; the bar advances only once its first leaf is
        computed (one element is sent to the host), so it moves when a step has finished
        rather than whenever XLA schedules the callback.
      unit: what a step is called in the rate (``step/s``).
    """
    args = [count]
    if after is not None:
        leaf = jax.tree_util.tree_leaves(after)[0]
        args.append(jnp.ravel(leaf)[0])
    jax.debug.callback(_ScanBar(int(total), desc, unit), *args)
