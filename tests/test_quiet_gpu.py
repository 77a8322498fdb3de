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


def test_as_participant_strips_the_quiet_arguments_and_marks_itself_ready(tmp_path):
    """bench/as_participant.sh runs the command without the appended quiet-GPU arguments, keeps its
    exit code, counts as ready only once it has ended, and refuses a command line without them."""
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "as_participant.sh")
    d = tmp_path / "q"
    d.mkdir()
    out = tmp_path / "args.txt"
    cmd = ["bash", script, "bash", "-c", f'ls {d} > {out}.before; echo "$@" > {out}; exit 3', "_", "a", "b",
           "--quiet-dir", str(d), "--quiet-n", "2", "--wait-max", "5"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 3
    assert out.read_text().split() == ["a", "b"]  # the quiet arguments never reach the command
    assert (tmp_path / "args.txt.before").read_text() == ""  # not ready while it ran
    assert len([p for p in os.listdir(d) if p.startswith("ready.")]) == 1
    assert QuietGPU(str(d), 1)._n_ready() == 1  # the barrier counts it
    r = subprocess.run(["bash", script, "true"], capture_output=True, text=True)
    assert r.returncode == 2 and "no trailing --quiet-dir" in r.stderr
