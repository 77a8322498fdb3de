"""Benchmark processes that share one GPU: compile in parallel, time one at a time.

Device time is scarce and compilation (XLA autotuning, ``torch.compile``) takes minutes, so a
session script starts its benchmark processes together.  Each process builds and warms up
freely, then enters :meth:`QuietGPU.timing`: it marks itself ready, waits until ``expected``
participants are ready (every compile done, so no autotuning runs on the GPU while anything is
timed), and times under an exclusive file lock (one process times at a time).  A process that
exits early (an error) still counts as ready, so the others do not wait for it; ``wait_max``
bounds the wait for one killed by a timeout.  ``QuietGPU(None, ...)`` is a no-op: a lone run.

A script can be a participant without Python: ``touch DIR/ready.NAME`` once its own GPU work ends.
"""
from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import time


class QuietGPU:
    def __init__(self, directory: str | None, expected: int = 1, wait_max: float = 600.0):
        self.directory, self.expected, self.wait_max = directory, expected, wait_max
        self.report: dict | None = None
        if directory:
            os.makedirs(directory, exist_ok=True)
            self._ready = os.path.join(directory, f"ready.{os.getpid()}")
            atexit.register(self._mark_ready)

    def _mark_ready(self) -> None:
        open(self._ready, "a").close()

    def _n_ready(self) -> int:
        return sum(name.startswith("ready.") for name in os.listdir(self.directory))

    @contextlib.contextmanager
    def timing(self):
        """Wait for the others' compiles, then hold the GPU alone for the timed calls.
        Afterwards ``self.report`` = ``{"waited_s", "all_ready", "lock_wait_s"}``."""
        if not self.directory:
            yield
            return
        self._mark_ready()
        t0 = time.time()
        while self._n_ready() < self.expected and time.time() - t0 < self.wait_max:
            time.sleep(0.25)
        waited, all_ready = time.time() - t0, self._n_ready() >= self.expected
        with open(os.path.join(self.directory, "timing.lock"), "a") as fh:
            t1 = time.time()
            fcntl.flock(fh, fcntl.LOCK_EX)
            self.report = {"waited_s": round(waited, 1), "all_ready": all_ready,
                           "lock_wait_s": round(time.time() - t1, 1)}
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def add_arguments(ap) -> None:
    """``--quiet-dir DIR --quiet-n N --wait-max S`` on an argparse parser."""
    ap.add_argument("--quiet-dir", default=None, metavar="DIR",
                    help="share the GPU with other benchmark processes: compile in parallel, time "
                         "only after N participants are ready, one at a time (bench/quiet_gpu.py)")
    ap.add_argument("--quiet-n", type=int, default=1, help="participants to wait for (with --quiet-dir)")
    ap.add_argument("--wait-max", type=float, default=600.0, help="longest wait for the others, seconds")


def from_args(a) -> QuietGPU:
    return QuietGPU(a.quiet_dir, a.quiet_n, a.wait_max)
