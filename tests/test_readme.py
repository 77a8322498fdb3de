"""The README cannot go stale: its generated tables equal what the committed JSON renders, and its
library example runs and writes a checkpoint that ``jaxdq load`` reads."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def test_generated_tables_match_the_committed_json():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import readme_tables

    text = open(README).read()
    marks = list(readme_tables.MARK.finditer(text))
    assert len(marks) >= 2, "the README's main-job and compare tables are generated"
    for m in marks:
        assert m[3] == readme_tables.render(m[1], m[2]), f"stale table {m[1]} {m[2]}: run bench/readme_tables.py"


def test_library_example_runs_and_its_checkpoint_loads(tmp_path):
    text = open(README).read()
    block = re.search(r"<!-- example: library -->\n```python\n(.*?)```", text, re.S)
    assert block, "README has the library example"
    code = block[1]
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = re.search(r'save_model\("([^"]+)"', code)[1]
    r = subprocess.run([sys.executable, "-m", "jaxdq.cli", "load", ckpt], cwd=tmp_path, capture_output=True,
                       text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"bits": "W4/8A8"' in r.stdout and "W4A16" in r.stdout and "W8A8" in r.stdout
