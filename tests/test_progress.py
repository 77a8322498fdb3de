"""tqdm progress bars: host loops (ProgressBar) and jitted lax.scan bodies (scan_progress)."""
from __future__ import annotations

import io

import jax
import jax.numpy as jnp

from jaxdq.sampling import progress
from jaxdq.sampling.progress import ProgressBar, scan_progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_host_bar_writes_tqdm_lines_to_the_stream():
    buf = io.StringIO()
    with ProgressBar(1000, desc="sensitivity", stream=buf) as bar:
        for _ in range(1000):
            bar.update()
    text = buf.getvalue()
    lines = text.splitlines()
    assert lines[-1].startswith("sensitivity: 100%|") and "1000/1000" in lines[-1]
    assert "it/s" in lines[-1]  # tqdm's rate
    # not a terminal: whole lines, about one per tenth, no redraws
    assert "\r" not in text and text.endswith("\n") and len(lines) <= progress.LOG_LINES + 2
    assert bar.n == 1000


def test_host_bar_redraws_in_place_on_a_terminal():
    buf = _Terminal()
    bar = ProgressBar(3, desc="calib", stream=buf)
    for _ in range(3):
        bar.update()
    bar.close()
    text = buf.getvalue()
    assert "\r" in text and "3/3" in text and text.count("\n") == 1


def test_scan_progress_in_jitted_scan_emits_the_final_count(capfd):
    def body(c, i):
        c = c * 0.5 + 1.0
        scan_progress(i + 1, 40, "toy scan", after=c)
        return c, None

    f = jax.jit(lambda x: jax.lax.scan(body, x, jnp.arange(40))[0])
    for _ in range(2):  # the compiled function reuses its bar: one full bar per run
        jax.block_until_ready(f(jnp.ones(3)))
        jax.effects_barrier()
    err = capfd.readouterr().err
    finals = [ln for ln in err.splitlines() if "40/40" in ln]
    assert len(finals) == 2 and all(ln.startswith("toy scan: 100%|") and "step/s" in ln for ln in finals)
    assert "\r" not in err and len(err.splitlines()) <= 2 * (progress.LOG_LINES + 2)


def test_scan_bar_restarts_after_an_unfinished_run_and_ignores_repeats(capsys):
    cb = progress._ScanBar(5, "steps", "step")
    for count in (1, 2, 3):  # interrupted after step 3
        cb(count)
    for count in (1, 1, 2, 2, 3, 4, 5):  # vmap repeats each count once per element
        cb(count)
    err = capsys.readouterr().err
    assert err.count("5/5") == 1 and cb.bar is None
    assert [ln.split("|")[-1].split()[0] for ln in err.splitlines()] == ["1/5", "2/5", "3/5",
                                                                         "1/5", "2/5", "3/5", "4/5", "5/5"]


def test_render_is_a_tqdm_line():
    assert progress.render("sampling ddim", 23, 50) == "sampling ddim:  46%|####6     | 23/50"
