"""bench/quiet_gpu.py: benchmark processes compile in parallel, time one at a time.

Real processes (the lock is an fcntl lock on a shared file; readiness is a file per pid), with
sleeps standing in for compilation and for the timed calls."""
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.quiet_gpu import QuietGPU  # noqa: E402


def _participant(directory, expected, wait_max, compile_s, timed_s, log):
    q = QuietGPU(directory, expected, wait_max)
    time.sleep(compile_s)  # "compiling"
    ready = time.time()
    with q.timing():
        start = time.time()
        time.sleep(timed_s)  # "timed calls"
        end = time.time()
    with open(log, "a") as f:
        f.write(json.dumps({"ready": ready, "start": start, "end": end, "report": q.report}) + "\n")


def _run(tmp_path, specs, expected, wait_max):
    log = str(tmp_path / "log.jsonl")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_participant, args=(str(tmp_path / "q"), expected, wait_max, c, t, log))
             for c, t in specs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [json.loads(line) for line in open(log)]


def test_timing_waits_for_every_compile_and_never_overlaps(tmp_path):
    rows = _run(tmp_path, [(0.0, 0.4), (0.1, 0.4), (1.5, 0.4)], expected=3, wait_max=30)
    last_ready = max(r["ready"] for r in rows)
    for r in rows:
        assert r["start"] >= last_ready - 0.01  # nothing timed while another still compiles
        assert r["report"]["all_ready"] is True
    spans = sorted((r["start"], r["end"]) for r in rows)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.01  # one process times at a time
    assert max(r["report"]["lock_wait_s"] for r in rows) >= 0.3  # someone queued for the lock


def test_a_missing_participant_is_waited_for_at_most_wait_max(tmp_path):
    t0 = time.time()
    rows = _run(tmp_path, [(0.0, 0.1), (0.0, 0.1)], expected=3, wait_max=1.0)
    assert all(r["report"]["all_ready"] is False for r in rows)
    assert all(0.9 <= r["report"]["waited_s"] <= 5.0 for r in rows)
    assert time.time() - t0 < 30


def test_an_external_ready_file_counts(tmp_path):
    """A shell script joins by touching ready.NAME (the compares in gpu_compare_session.sh)."""
    os.makedirs(tmp_path / "q")
    (tmp_path / "q" / "ready.compares").touch()
    rows = _run(tmp_path, [(0.0, 0.1)], expected=2, wait_max=20)
    assert rows[0]["report"]["all_ready"] is True and rows[0]["report"]["waited_s"] < 5


def test_no_directory_is_a_lone_run():
    q = QuietGPU(None)
    with q.timing():
        pass
    assert q.report is None
