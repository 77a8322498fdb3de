"""README tables generated from committed JSON, so the README cannot drift from the results.

The README marks each generated table with a pair of comments::

    <!-- generated: KIND PATH -->
    ...table...
    <!-- /generated -->

``KIND`` names a renderer below and ``PATH`` a JSON file under the repository.  Run

    python bench/readme_tables.py          # rewrite README.md's generated tables in place
    python bench/readme_tables.py --check  # exit 1 if any is stale (tests/test_readme.py does this)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxdq.compare import markdown_table  # noqa: E402

MARK = re.compile(r"<!-- generated: (\S+) (\S+) -->\n(.*?)<!-- /generated -->", re.S)


def _compare(d: dict) -> str:
    """The comparison table of a ``compare.json`` (``jaxdq compare`` / ``jaxdq demo`` output)."""
    return markdown_table(d["results"])


RENDERERS = {"compare": _compare}


def render(kind: str, path: str) -> str:
    with open(os.path.join(ROOT, path)) as f:
        data = json.load(f)
    return RENDERERS[kind](data).rstrip("\n") + "\n"


def regenerate(text: str) -> str:
    return MARK.sub(lambda m: f"<!-- generated: {m[1]} {m[2]} -->\n{render(m[1], m[2])}<!-- /generated -->", text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if a generated table is stale")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    args = ap.parse_args(argv)
    with open(args.readme) as f:
        text = f.read()
    new = regenerate(text)
    if args.check:
        stale = [f"{m[1]} {m[2]}" for m, n in zip(MARK.finditer(text), MARK.finditer(new)) if m[3] != n[3]]
        if stale:
            print("stale generated tables in README.md: " + ", ".join(stale) + " (run python bench/readme_tables.py)")
            return 1
        return 0
    if new != text:
        with open(args.readme, "w") as f:
            f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
