"""Run one ``jaxdq compare`` as several processes over chunks of its method list, and merge.

A GPU call has a hard time limit, so a long method list is split into chunks, each its own
``jaxdq compare`` process with its own timeout; a chunk that times out keeps the rows it
finished (``compare.partial.json``, which ``jaxdq compare`` rewrites after every row).  Every chunk uses the same model, seeds,
steps and calibration settings, so each chunk's float row and noise are identical and the
method rows line up.  The merged ``compare.json`` has the first finished chunk's settings and
float row, every chunk's method rows in the order asked, the notes of all chunks, ``command``
(this script's command line) and ``chunks`` (each chunk's command, exit code, wall seconds).

    python bench/compare_chunks.py --model default --methods a,b,c,d --chunks 2 --timeout 300 \
        --out DIR -- --seeds 0,1,2 --per-class 4 --steps 50

Arguments after ``--`` go to every ``jaxdq compare`` unchanged.  Writes DIR/compare.json,
DIR/compare.md, DIR/compare.png (the first chunk's picture; the others as compare_part<i>.png)
and DIR/chunk<i>.log.  Exit code 0 when at least one chunk produced rows.

    python bench/compare_chunks.py --merge-into BASE.json EXTRA.json

adds a later run's rows to BASE when its settings and float row are the same (:func:`merge_into`).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time


def split(methods: list[str], chunks: int) -> list[list[str]]:
    """Round-robin split, so that slow families (listed together) spread over the chunks."""
    parts = [methods[i::chunks] for i in range(chunks)]
    return [p for p in parts if p]


def merge(methods: list[str], results: list[dict]) -> dict:
    """One compare result from per-chunk results (``compare.json`` dicts)."""
    if not results:
        raise ValueError("no chunk produced a compare.json")
    first = results[0]
    rows = {}
    for res in results:
        for r in res["results"]:
            rows.setdefault(r["method"], r)
    order = ["float"] + [m for m in methods if m in rows] + [m for m in rows if m not in methods and m != "float"]
    notes = []
    for res in results:
        notes += [n for n in res.get("notes", []) if n not in notes]
    return {"settings": first["settings"], "results": [rows[m] for m in order if m in rows], "notes": notes}


MISSING = "no row (chunk failed or timed out): "


def _still_missing(notes: list[str], have: set[str]) -> list[str]:
    """The notes with the methods that now have a row dropped from each "no row" note (and a
    note that lists none any more dropped)."""
    out = []
    for n in notes:
        if n.startswith(MISSING):
            left = [m for m in n[len(MISSING):].split(", ") if m not in have]
            if not left:
                continue
            n = MISSING + ", ".join(left)
        out.append(n)
    return out


def merge_into(base_path: str, extra_path: str) -> dict:
    """Add the method rows of ``extra_path`` (a ``compare.json`` from another run) to
    ``base_path`` in place, only when both runs have the same settings and the same float row
    (same model, seeds, noise, steps and calibration: the rows compare); the added rows' command
    goes to ``added_rows``, and the "no row" notes no longer list them.  ValueError otherwise."""
    base, extra = json.load(open(base_path)), json.load(open(extra_path))
    if base["settings"] != extra["settings"]:
        diff = {k: (base["settings"].get(k), extra["settings"].get(k))
                for k in set(base["settings"]) | set(extra["settings"])
                if base["settings"].get(k) != extra["settings"].get(k)}
        raise ValueError(f"different settings, the rows would not compare: {diff}")
    f0, f1 = base["results"][0], extra["results"][0]
    if f0["method"] != "float" or f1["method"] != "float" or f0.get("per_seed") != f1.get("per_seed"):
        raise ValueError("the float rows differ: not the same noise / model")
    have = {r["method"] for r in base["results"]}
    new = [r for r in extra["results"][1:] if r["method"] not in have]
    base["results"] += new
    notes = base.get("notes", []) + [n for n in extra.get("notes", []) if n not in base.get("notes", [])]
    base["notes"] = _still_missing(notes, {r["method"] for r in base["results"]})
    base.setdefault("added_rows", []).append({"methods": [r["method"] for r in new],
                                              "command": extra.get("command", "")})
    with open(base_path, "w") as f:
        json.dump(base, f, indent=1)
    return base


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--merge-into":  # --merge-into BASE.json EXTRA.json
        merged = merge_into(argv[1], argv[2])
        print(f"{argv[1]}: {len(merged['results']) - 1} method rows")
        return 0
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--methods", required=True, help="comma-separated method list")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per chunk")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    os.makedirs(args.out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="chunks_", dir=args.out)
    procs = []
    for i, part in enumerate(split(methods, max(1, args.chunks))):
        cmd = [sys.executable, "-m", "jaxdq.cli", "compare", "--model", args.model, "--methods", ",".join(part),
               "--keep-going", "--out", os.path.join(tmp, f"c{i}"), *extra]
        log = open(os.path.join(args.out, f"chunk{i}.log"), "w")
        procs.append((i, part, cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), time.time(), log))
    chunks, results = [], []
    deadline = time.time() + args.timeout
    ended = {}
    while len(ended) < len(procs):  # poll, so each chunk's wall time is its own
        for i, part, cmd, p, t0, log in procs:
            if i not in ended and p.poll() is not None:
                ended[i] = (p.returncode, time.time() - t0)
        if time.time() > deadline:
            for i, part, cmd, p, t0, log in procs:
                if i not in ended:
                    p.kill()
                    p.wait()
                    ended[i] = ("timeout", time.time() - t0)
        time.sleep(0.5)
    for i, part, cmd, p, t0, log in procs:
        rc, wall = ended[i]
        log.close()
        path = os.path.join(tmp, f"c{i}", "compare.json")
        if not os.path.exists(path):  # stopped: the rows it finished (jaxdq compare writes them as it goes)
            path = os.path.join(tmp, f"c{i}", "compare.partial.json")
        ok = os.path.exists(path)
        chunks.append({"methods": part, "command": "jaxdq " + shlex.join(cmd[3:]), "rc": rc,
                       "wall_s": round(wall, 1), "rows": ok, "partial": ok and path.endswith(".partial.json")})
        if ok:
            results.append(json.load(open(path)))
            png = os.path.join(tmp, f"c{i}", "compare.png")
            if os.path.exists(png):
                shutil.copy(png, os.path.join(args.out, "compare.png" if len(results) == 1 else f"compare_part{i}.png"))
    if not results:
        print(json.dumps(chunks, indent=1))
        shutil.rmtree(tmp, ignore_errors=True)
        return 1
    merged = merge(methods, results)
    merged["command"] = "python bench/compare_chunks.py " + shlex.join(sys.argv[1:])
    merged["chunks"] = chunks
    missing = [m for m in methods if m not in {r["method"] for r in merged["results"]}]
    if missing:
        merged["notes"].append(MISSING + ", ".join(missing))
    from jaxdq.compare import markdown_table

    with open(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(merged, f, indent=1)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(markdown_table(merged["results"]) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.model}: {len(merged['results']) - 1}/{len(methods)} method rows; chunks "
          + ", ".join(f"{c['rc']}@{c['wall_s']}s" for c in chunks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
