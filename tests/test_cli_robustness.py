"""The CLI on every bad input of issue 18, and on fuzzed checkpoints.

Every bad input must end with exit code 2, exactly one non-empty line on stderr (no
filtering: not even absl / XLA warnings are tolerated), no ``Traceback`` anywhere, that
line naming the file or argument at fault, and every file that existed before untouched
(sha256 of every file and the set of directories, before and after; a failed command
leaves nothing new behind).

Most cases run in-process through ``jaxdq.cli.main`` with ``capfd`` (file-descriptor
capture, so output written by C++ below Python — orbax / tensorstore / XLA — is seen too);
the ones whose exit path matters run ``python -m jaxdq.cli`` as a subprocess (``SUB``):
the headline cases of each group, every damaged orbax checkpoint through ``jaxdq load``
(the issue saw asyncio "Event loop is closed" tracebacks at interpreter exit), Ctrl-C and
``--help``.  Each case's comment says what the issue reported before the change.

Runs as root in CI containers: root may write in a read-only directory, so the
"unwritable --out" cases use a path whose parent is a regular file (the read-only
directory case runs only when not root).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxdq.cli import build_parser, main

# orbax's late asyncio tracebacks reach an in-process run as unraisable exceptions (pytest
# reports them as warnings): they fail the test here
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu",
           PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
TINY_SAMPLE = ["--classes", "0", "--per-class", "1", "--steps", "2"]
SUB = "subprocess"
IN = "in-process"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ----------------------------------------------------------------------------------- helpers

def snapshot(root: Path) -> dict:
    """``{relative path: sha256}`` of every file and ``{relative path: 'dir'}`` of every directory."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs:
            out[os.path.relpath(os.path.join(d, name), root)] = "dir"
        for name in files:
            full = os.path.join(d, name)
            out[os.path.relpath(full, root)] = hashlib.sha256(Path(full).read_bytes()).hexdigest()
    return out


def run_cli(argv, cwd, mode, capfd=None, monkeypatch=None, timeout=180):
    """``(exit code, stdout, stderr, seconds)`` of ``jaxdq ARGV`` run in ``cwd``."""
    argv = [str(a) for a in argv]
    t0 = time.time()
    if mode == SUB:
        r = subprocess.run([sys.executable, "-m", "jaxdq.cli", *argv], cwd=cwd, env=ENV, capture_output=True,
                           text=True, timeout=timeout)
        return r.returncode, r.stdout, r.stderr, time.time() - t0
    monkeypatch.chdir(cwd)
    capfd.readouterr()
    try:
        rc = main(argv)  # any other exception escapes and fails the test
    except SystemExit as e:  # argparse's one-line usage error
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    out, err = capfd.readouterr()
    return rc, out, err, time.time() - t0


def one_error_line(rc, out, err, *names, forbid=()) -> str:
    """Assert the failure contract; return the one stderr line."""
    assert "Traceback" not in out + err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit code {rc}; stderr:\n{err}"
    assert len(lines) == 1, f"{len(lines)} stderr lines:\n{err}"
    line = lines[0]
    assert line.startswith("jaxdq: error:"), line
    for n in names:
        assert n.lower() in line.lower(), f"{n!r} not in: {line}"
    for n in forbid:
        assert n.lower() not in line.lower(), f"{n!r} in: {line}"
    return line


def expect_failure(tmp_path, argv, names, mode, capfd, monkeypatch, forbid=(), max_seconds=None):
    before = snapshot(tmp_path)
    rc, out, err, secs = run_cli(argv, tmp_path, mode, capfd, monkeypatch)
    line = one_error_line(rc, out, err, *names, forbid=forbid)
    assert snapshot(tmp_path) == before, "files changed or left behind"
    if max_seconds is not None:
        assert secs < max_seconds, f"took {secs:.1f}s: the check did not run before the work"
    return line


def _split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _with_header(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# ----------------------------------------------------------------------------------- fixtures

class _Assets:
    """Inputs built once per module: ``ck``, a W8A8 jaxdq checkpoint of the default model;
    and, on first use (skipping the test without torch / diffusers), a tiny diffusers DiT as
    one safetensors file of its state dict (``dit``) and as a sharded diffusers folder
    (``dit_sharded``), and a tiny diffusers UNet2DModel folder (``unet``).  Tests copy what
    they need into their own tmp dir."""

    def __init__(self, root: Path):
        self.root = root
        assert main(["quantize", "--method", "w8a8", "--out", str(root / "ck")]) == 0
        self.paths = {"ck": root / "ck"}

    def __getitem__(self, key: str) -> Path:
        if key not in self.paths:
            self._build_torch_models()
        return self.paths[key]

    def _build_torch_models(self):
        torch = pytest.importorskip("torch")
        diffusers = pytest.importorskip("diffusers")
        from safetensors.torch import save_file

        root = self.root
        torch.manual_seed(0)
        dit = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                              out_channels=8, num_layers=1, sample_size=8, patch_size=2,
                                              num_embeds_ada_norm=10).eval()
        save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(root / "dit.safetensors"))
        dit.save_pretrained(str(root / "dit_sharded"), max_shard_size="40KB")
        assert any(f.endswith(".index.json") for f in os.listdir(root / "dit_sharded"))
        unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                     up_block_types=("AttnUpBlock2D", "UpBlock2D"), layers_per_block=1,
                                     norm_num_groups=8, attention_head_dim=8)
        unet.save_pretrained(str(root / "unet"))
        self.paths.update(dit=root / "dit.safetensors", dit_sharded=root / "dit_sharded", unet=root / "unet")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return _Assets(tmp_path_factory.mktemp("assets"))


def _copy(src: Path, dst: Path) -> Path:
    (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    return dst


def _data_files(ck: Path) -> list[Path]:
    """The checkpoint's array data files (orbax OCDBT ``d/`` files), largest first."""
    files = [p for p in ck.rglob("*") if p.is_file() and p.parent.name == "d"]
    return sorted(files, key=lambda p: -p.stat().st_size)


# ----------------------------------------------------------------------------------- 1, 2: outputs

def _setup_user_dir(t, a):
    (t / "d").mkdir()
    (t / "d" / "notes.txt").write_text("x\n")
    return ["quantize", "--method", "w8a8", "--out", "d"], ["--out d", "not a jaxdq checkpoint"]


def _setup_dot(t, a):
    (t / "notes.txt").write_text("x\n")
    return ["quantize", "--method", "w8a8", "--out", "."], ["--out .", "not a jaxdq checkpoint"]


def _setup_ck_no_force(t, a):
    _copy(a["ck"], t / "ck")
    return ["quantize", "--method", "w8a8", "--out", "ck"], ["--out ck", "--force"]


def _setup_convert_onto_source(t, a):
    _copy(a["unet"], t / "src")
    return ["convert", "--model", "unet", "src", "--out", "src"], ["--out src", "source"]


def _setup_convert_into_source(t, a):
    _copy(a["unet"], t / "src")
    return ["convert", "--model", "unet", "src", "--out", "src/sub"], ["--out src/sub", "source"]


def _setup_sample_existing_png(t, a):
    (t / "s.png").write_bytes(b"my picture")
    return ["sample", "--out", "s.png", *TINY_SAMPLE], ["--out s.png", "--force"]


def _setup_demo_user_compare(t, a):
    (t / "o").mkdir()
    (t / "o" / "compare.md").write_text("my notes\n")
    return ["demo", "--out", "o", *TINY_SAMPLE], ["--out o", "compare.md"]


OUTPUT_CASES = {
    # issue 1: `--out d` deleted d/notes.txt (checkpoint.save(..., force=True)) and returned 0
    "out-user-dir": (_setup_user_dir, SUB),
    # issue 1: `--out .` wiped the working directory
    "out-dot": (_setup_dot, IN),
    # issue 1: an existing checkpoint was replaced without being asked
    "out-checkpoint-without-force": (_setup_ck_no_force, IN),
    # issue 2: `convert SRC --out SRC` returned 0 and replaced the user's PyTorch checkpoint
    "convert-out-is-source": (_setup_convert_onto_source, SUB),
    # issue 2: an output inside the source folder was written into it
    "convert-out-inside-source": (_setup_convert_into_source, IN),
    # nothing jaxdq did not write is overwritten: a PNG of the user's
    "sample-out-existing-file": (_setup_sample_existing_png, IN),
    # ... nor a compare.md of the user's in a demo --out directory
    "demo-out-user-compare-md": (_setup_demo_user_compare, IN),
}


@pytest.mark.parametrize("case", list(OUTPUT_CASES))
def test_outputs_never_overwrite(case, assets, tmp_path, capfd, monkeypatch):
    setup, mode = OUTPUT_CASES[case]
    argv, names = setup(tmp_path, assets)
    expect_failure(tmp_path, argv, names, mode, capfd, monkeypatch)


def _no_temporaries(root: Path):
    left = [p for p in snapshot(root) if ".jaxdq-" in p or "orbax-checkpoint-tmp" in p]
    assert not left, left


def test_force_replaces_a_checkpoint_which_then_loads(assets, tmp_path, capfd, monkeypatch):
    _copy(assets["ck"], tmp_path / "ck")
    (tmp_path / "notes.txt").write_text("x\n")
    rc, out, err, _ = run_cli(["export", "--method", "float", "--out", "ck", "--force"], tmp_path, IN, capfd,
                              monkeypatch)
    assert rc == 0, err
    assert (tmp_path / "notes.txt").read_text() == "x\n"
    _no_temporaries(tmp_path)
    rc, out, err, _ = run_cli(["load", "ck"], tmp_path, IN, capfd, monkeypatch)
    assert rc == 0, err
    assert '"method": "float"' in out


def test_interrupted_checkpoint_write_leaves_the_old_one(assets, tmp_path):
    """A writer that fails half-way (some files written): the old checkpoint is intact and
    loads, a new path stays absent, and no temporary is left (in-process: the failure is
    injected into the write function)."""
    from jaxdq import outputs
    from jaxdq.models.sources import load_model

    _copy(assets["ck"], tmp_path / "ck")
    before = snapshot(tmp_path)

    def half_write(tmp):
        shutil.copytree(assets["ck"] / "params", os.path.join(tmp, "params"))
        raise OSError(28, "No space left on device")

    for target in ("ck", "new"):
        with pytest.raises(OSError, match="No space left"):
            outputs.check_new_checkpoint(str(tmp_path / target), force=True)
            outputs.write_checkpoint(str(tmp_path / target), half_write, force=True)
        assert snapshot(tmp_path) == before
    assert load_model(str(tmp_path / "ck")).metadata["method"] == "dynamic-w8a8"


# ----------------------------------------------------------------------------------- 3: bad safetensors

def _text_file(t, a):
    f = t / "w.safetensors"
    f.write_text("These are my notes, not weights.\n" * 40)
    return f, ["w.safetensors", "not a safetensors file"]


def _empty_file(t, a):
    f = t / "w.safetensors"
    f.write_bytes(b"")
    return f, ["w.safetensors", "empty"]


def _truncated_file(t, a):
    f = t / "w.safetensors"
    data = a["dit"].read_bytes()
    f.write_bytes(data[:len(data) - 1000])
    return f, ["w.safetensors", "truncated"]


def _truncated_shard(t, a):
    d = _copy(a["dit_sharded"], t / "hf")
    shard = sorted(p for p in d.iterdir() if p.name.endswith(".safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    return d, [shard.name, "truncated"]


BAD_FILES = {
    # issue 3: a 19-line MemoryError traceback (the text's first 8 bytes read as the header length)
    "text-file": _text_file,
    # issue 3: a struct.error traceback
    "zero-bytes": _empty_file,
    # issue 4: `cannot reshape array of size 4778 into shape (72,256)`: no file, no word of truncation
    "truncated": _truncated_file,
    # issue 4: the same for a diffusers folder with a truncated shard
    "truncated-shard": _truncated_shard,
}


@pytest.mark.parametrize("command", ["convert", "sample"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_safetensors(case, command, assets, tmp_path, capfd, monkeypatch):
    path, names = BAD_FILES[case](tmp_path, assets)
    if command == "convert":
        argv = ["convert", path.name, "--out", "out", "--num-heads", "2"]
    else:
        argv = ["sample", "--model", path.name, "--num-heads", "2", "--out", "s.png", *TINY_SAMPLE]
    mode = SUB if (case, command) in {("text-file", "convert"), ("truncated-shard", "sample")} else IN
    expect_failure(tmp_path, argv, names, mode, capfd, monkeypatch)


# ----------------------------------------------------------------------------------- 4, 5: bad checkpoints

def _deleted_data_file(ck):
    f = _data_files(ck)[0]
    f.unlink()
    return [str(f.relative_to(ck)), "missing"]


def _no_manifest(ck):
    (ck / "params" / "manifest.ocdbt").unlink()
    return ["params/manifest.ocdbt", "missing"]


def _corrupt_metadata(ck):
    (ck / "meta" / "metadata").write_bytes(b"{ this is not json")
    return ["meta/metadata"]


def _byte_flip(ck):
    f = _data_files(ck)[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x40
    f.write_bytes(bytes(data))
    return [str(f.relative_to(ck)), "corrupt"]


def _legacy(damage, names=None):
    """The same damage to a checkpoint without jaxdq_files.json (written before the file list):
    without digests a deleted data file is found by reading the arrays, so the line names the
    array that cannot be read under params/ rather than the file."""
    def f(ck):
        (ck / "jaxdq_files.json").unlink()
        found = damage(ck)
        return found if names is None else names
    return f


DAMAGE = {
    # issue 5: "Truncated Zstd-compressed stream" plus 4 `RuntimeError: Event loop is closed` tracebacks
    "data-file-deleted": _deleted_data_file,
    # issue 5: the same without manifest.ocdbt
    "manifest-deleted": _no_manifest,
    # issue 5: `Expecting value: line 1 column 1 (char 0)`, no file named
    "metadata-corrupt": _corrupt_metadata,
    # a flipped byte in array data was read as (other) numbers or failed in the decoder
    "data-byte-flip": _byte_flip,
    # checkpoints written before the file list: structural checks only, still one line
    "legacy-data-file-deleted": _legacy(_deleted_data_file, ["array", "params/", "cannot be read"]),
    "legacy-manifest-deleted": _legacy(_no_manifest),
    "legacy-metadata-corrupt": _legacy(_corrupt_metadata),
}


@pytest.mark.parametrize("command", ["load", "sample"])
@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint(case, command, assets, tmp_path, capfd, monkeypatch):
    ck = _copy(assets["ck"], tmp_path / "ck")
    names = ["ck", *DAMAGE[case](ck)]
    argv = ["load", "ck"] if command == "load" else ["sample", "--model", "ck", "--out", "s.png", *TINY_SAMPLE]
    expect_failure(tmp_path, argv, names, SUB if command == "load" else IN, capfd, monkeypatch)


def _orbax_tmp(t, a):
    # what orbax leaves when a save is interrupted: a *.orbax-checkpoint-tmp-* directory, partly written
    d = t / "ck.orbax-checkpoint-tmp-1733000000"
    d.mkdir()
    _copy(a["ck"] / "params", d / "params")
    return d.name


def _jaxdq_tmp(t, a):
    # what a killed `jaxdq quantize --out ck` leaves: jaxdq.outputs' hidden sibling temporary, complete or not
    d = _copy(a["ck"], t / ".ck.jaxdq-tmp-4242")
    (d / "jaxdq_files.json").unlink()  # the list is written last
    return d.name


LOAD_CASES = {
    # issue 6: "unknown model ... PyTorch DiT" (nothing about the missing path)
    "nonexistent": (lambda t, a: "/nonexistent", ["/nonexistent", "no such file or directory"], SUB),
    "missing-relative": (lambda t, a: "missing_ck", ["missing_ck", "no such file or directory"], IN),
    # issue 6: talked about diffusers weight files
    "empty-dir": (lambda t, a: (t / "empty").mkdir() or "empty", ["empty", "empty"], IN),
    # issue 6: talked about diffusers weight files
    "orbax-tmp-dir": (_orbax_tmp, ["ck.orbax-checkpoint-tmp-1733000000", "unfinished"], IN),
    # loaded as if it were a finished checkpoint
    "jaxdq-tmp-dir": (_jaxdq_tmp, [".ck.jaxdq-tmp-4242", "unfinished"], IN),
}


@pytest.mark.parametrize("case", list(LOAD_CASES))
def test_load_names_what_is_there(case, assets, tmp_path, capfd, monkeypatch):
    setup, names, mode = LOAD_CASES[case]
    path = setup(tmp_path, assets)
    expect_failure(tmp_path, ["load", path], names, mode, capfd, monkeypatch,
                   forbid=("diffusers", "PyTorch DiT"))


def test_sample_missing_model_path(tmp_path, capfd, monkeypatch):
    # `--model ./missing.safetensors` said "unknown model" and listed the shipped names
    expect_failure(tmp_path, ["sample", "--model", "./missing.safetensors", "--out", "s.png", *TINY_SAMPLE],
                   ["missing.safetensors", "no such file or directory"], IN, capfd, monkeypatch)


# ----------------------------------------------------------------------------------- 6: bad numbers

def _file_parent(t):
    (t / "afile").write_text("x\n")
    return "afile/s.png"


ARG_CASES = {
    # issue 7: IndexError traceback
    "per-class-0": (["--per-class", "0"], ["--per-class", "0"], SUB),
    # issue 7: TypeError traceback
    "per-class-negative": (["--per-class", "-2"], ["--per-class", "-2"], IN),
    # a 0-step sampler
    "steps-0": (["--steps", "0"], ["--steps", "0"], IN),
    # issue 7: accepted, wrote a garbage PNG
    "cfg-nan": (["--cfg", "nan"], ["--cfg", "nan"], IN),
    "cfg-inf": (["--cfg", "inf"], ["--cfg", "inf"], IN),
    # a class the model does not have (one line before the change too: a regression guard)
    "classes-out-of-range": (["--classes", "42"], ["classes", "42"], IN),
    "classes-not-numbers": (["--classes", "a,b"], ["--classes", "a,b"], IN),
}


@pytest.mark.parametrize("case", list(ARG_CASES))
def test_bad_sampling_arguments(case, tmp_path, capfd, monkeypatch):
    extra, names, mode = ARG_CASES[case]
    argv = ["sample", "--out", "s.png", "--classes", "0", "--per-class", "1", "--steps", "2", *extra]
    expect_failure(tmp_path, argv, names, mode, capfd, monkeypatch)


def test_unwritable_sample_out_fails_before_sampling(tmp_path, capfd, monkeypatch):
    # issue 7: detected only after sampling finished (default settings: 8 per class, 50 steps)
    out = _file_parent(tmp_path)
    before = snapshot(tmp_path)
    rc, o, err, secs = run_cli(["sample", "--out", out], tmp_path, SUB)
    one_error_line(rc, o, err, "--out", out, "not a directory")
    assert secs < 10 and "sampling" not in err, (secs, err)
    assert snapshot(tmp_path) == before


@pytest.mark.skipif(IS_ROOT, reason="root may write in a read-only directory")
def test_read_only_out_dir_fails_before_sampling(tmp_path, capfd, monkeypatch):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        expect_failure(tmp_path, ["sample", "--out", "ro/s.png"], ["ro/s.png", "cannot write"], IN, capfd,
                       monkeypatch, max_seconds=10)
    finally:
        os.chmod(tmp_path / "ro", 0o755)


def test_unwritable_quantize_out_fails_before_calibrating(tmp_path, capfd, monkeypatch):
    (tmp_path / "afile").write_text("x\n")
    line = expect_failure(tmp_path, ["quantize", "--method", "vidit-q-w8a8", "--out", "afile/q"],
                          ["--out afile/q", "not a directory"], IN, capfd, monkeypatch, max_seconds=10)
    assert "calibrat" not in line


# ----------------------------------------------------------------------------------- 7, 8: family, NaN

def test_wrong_family_suggests_the_right_one(assets, tmp_path, capfd, monkeypatch):
    # a UNet2DModel folder converted as an SD UNet: a list of missing keys before the change
    _copy(assets["unet"], tmp_path / "hf")
    expect_failure(tmp_path, ["convert", "--model", "sd-unet", "hf", "--out", "out"], ["hf", "--model unet"], IN,
                   capfd, monkeypatch)


def _poisoned(t, a, value):
    from safetensors.numpy import load_file, save_file

    sd = load_file(str(a["dit"]))
    name = sorted(k for k in sd if k.endswith("attn1.to_q.weight"))[0]
    sd[name][1, 2] = value
    save_file(sd, str(t / "w.safetensors"))
    return name


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize("command", ["convert", "sample"])
def test_non_finite_weights_name_the_tensor(value, command, assets, tmp_path, capfd, monkeypatch):
    # issue 9: NaN/inf weights went through and gave NaN scales / NaN samples
    name = _poisoned(tmp_path, assets, value)
    argv = (["convert", "w.safetensors", "--out", "out", "--num-heads", "2"] if command == "convert"
            else ["sample", "--model", "w.safetensors", "--num-heads", "2", "--out", "s.png", *TINY_SAMPLE])
    mode = SUB if (command, np.isnan(value)) == ("sample", True) else IN
    expect_failure(tmp_path, argv, ["w.safetensors", name, "NaN" if np.isnan(value) else "inf"], mode, capfd,
                   monkeypatch)


# ----------------------------------------------------------------------------------- 9: Ctrl-C

def test_ctrl_c_during_calibration(tmp_path):
    """Issue 8: Ctrl-C landed ~12 s later (when the jitted scan returned) with a
    KeyboardInterrupt traceback.  Now: exit 130 within 3 s, one last line, nothing left."""
    before = snapshot(tmp_path)
    p = subprocess.Popen([sys.executable, "-m", "jaxdq.cli", "quantize", "--method", "vidit-q-w8a8", "--out", "q"],
                         cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    chunks = []
    started = threading.Event()

    def pump():
        for raw in iter(lambda: p.stderr.read1(4096), b""):
            chunks.append(raw)
            text = b"".join(chunks)
            if b"calibrating" in text or b"sampling" in text:
                started.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        # quantize's calibration first samples the float trajectories ("sampling ddim"), then replays them
        assert started.wait(180), "calibration progress never appeared: " + b"".join(chunks).decode(errors="replace")
        assert p.poll() is None, "finished before the signal"
        t_signal = time.time()
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=30)
        latency = time.time() - t_signal
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    reader.join(5)
    err = b"".join(chunks).decode(errors="replace")
    out = p.stdout.read().decode(errors="replace")
    assert rc == 130, (rc, err)
    assert latency < 3.0, f"the interrupt took {latency:.1f}s to land"
    assert "Traceback" not in err + out, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1] == "jaxdq: interrupted", err
    assert sum("interrupt" in ln for ln in lines) == 1, err
    assert snapshot(tmp_path) == before, "partial output or temporaries left"


# ----------------------------------------------------------------------------------- --help

def test_help(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jaxdq.cli", "--help"], cwd=tmp_path, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    text = " ".join(r.stdout.split())
    assert "``" not in r.stdout
    assert "with no arguments" in text.lower() and "demo" in text
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        assert "``" not in p.format_help(), name


# ----------------------------------------------------------------------------------- 10: fuzz

FUZZ = settings(max_examples=25, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


def _fuzz_run(argv, root: Path, capfd, keep: set):
    """``main(argv)`` in-process: exit 0, or 2 with one stderr line; nothing of ``keep`` changed."""
    before = {k: v for k, v in snapshot(root).items() if k in keep}
    capfd.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err
    assert rc in (0, 2), (rc, err)
    if rc == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("jaxdq: error:"), err
    else:
        assert err.strip() == "", err
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k in keep} == before
    assert not [p for p in after if ".jaxdq-" in p], after
    return rc, err


_HEADER_EDITS = st.one_of(
    st.tuples(st.just("dtype"), st.sampled_from(["F16", "BF16", "F64", "I8", "U8", "BOOL", "F4", "", 7, None])),
    st.tuples(st.just("shape"), st.one_of(st.lists(st.integers(-2, 300), max_size=4), st.just("3"),
                                          st.just([1.5]))),
    st.tuples(st.just("data_offsets"), st.lists(st.integers(-5, 10 ** 6), max_size=3)),
    st.tuples(st.just("offset_shift"), st.integers(-64, 64)),
    st.tuples(st.just("delete"), st.sampled_from(["dtype", "shape", "data_offsets", "entry"])),
    st.tuples(st.just("header_length"), st.integers(0, 2 ** 64 - 1)),
    st.tuples(st.just("metadata"), st.sampled_from([{"format": "pt"}, {"a": 1}, [], "x"])),
)


def _edit_header(data: bytes, edit, which: int) -> bytes:
    n, header, body = _split(data)
    names = sorted(k for k in header if k != "__metadata__")
    name = names[which % len(names)]
    kind, v = edit
    if kind == "header_length":
        return struct.pack("<Q", v) + data[8:]
    if kind == "metadata":
        header["__metadata__"] = v
    elif kind == "delete":
        if v == "entry":
            del header[name]
        else:
            del header[name][v]
    elif kind == "offset_shift":
        b, e = header[name]["data_offsets"]
        header[name]["data_offsets"] = [b + v, e + v]
    else:
        header[name][kind] = v
    return _with_header(header, body)


@FUZZ
@given(kind=st.sampled_from(["truncate", "flip-header", "flip-data", "non-finite", "header"]), frac=st.floats(0, 1),
       count=st.integers(1, 4), edit=_HEADER_EDITS, which=st.integers(0, 10 ** 6), bit=st.integers(0, 7))
def test_fuzz_safetensors_through_convert(assets, capfd, kind, frac, count, edit, which, bit):
    """Truncations, byte flips (in the header, or in the tensor data: a valid file with other
    numbers, perhaps NaN/inf), a NaN or inf written over one value, and header edits of a
    real DiT safetensors file (float32, so every 4-byte-aligned data position is a value)."""
    data = assets["dit"].read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    if kind == "truncate":
        data = data[:int(frac * (len(data) - 1))]
    elif kind.startswith("flip"):
        buf = bytearray(data)
        lo, hi = (0, 8 + n) if kind == "flip-header" else (8 + n, len(buf))
        for i in range(count):
            buf[lo + (int(frac * (hi - lo)) + i * 7919) % (hi - lo)] ^= 1 << bit
        data = bytes(buf)
    elif kind == "non-finite":
        at = 8 + n + 4 * int(frac * ((len(data) - 8 - n) // 4 - 1))
        data = data[:at] + struct.pack("<f", [np.nan, np.inf, -np.inf][which % 3]) + data[at + 4:]
    else:
        data = _edit_header(data, edit, which)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "w.safetensors").write_bytes(data)
        rc, err = _fuzz_run(["convert", root / "w.safetensors", "--out", root / "out", "--num-heads", "2"], root,
                            capfd, keep={"w.safetensors"})
        if kind == "non-finite":
            assert rc == 2 and ("NaN" in err or "inf" in err), err
        if rc == 2:
            assert "w.safetensors" in err, err
        else:
            assert (root / "out" / "meta" / "metadata").is_file()


@FUZZ
@given(legacy=st.booleans(),
       ops=st.lists(st.tuples(st.sampled_from(["delete", "truncate", "flip"]), st.integers(0, 10 ** 6),
                              st.floats(0, 1), st.integers(0, 7)), min_size=1, max_size=3))
def test_fuzz_orbax_checkpoint_through_load(assets, capfd, legacy, ops):
    """Random file deletions, truncations and byte flips of a real orbax checkpoint, with its
    file list (every change is found by the digests) or without it (a checkpoint written
    before the list: structural checks and the array read, then orbax)."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        ck = _copy(assets["ck"], root / "ck")
        if legacy:
            (ck / "jaxdq_files.json").unlink()
        for op, which, frac, bit in ops:
            files = sorted(p for p in ck.rglob("*") if p.is_file())
            if not files:
                break
            f = files[which % len(files)]
            if op == "delete":
                f.unlink()
            elif op == "truncate":
                f.write_bytes(f.read_bytes()[:int(frac * f.stat().st_size)])
            else:
                buf = bytearray(f.read_bytes())
                if buf:
                    buf[int(frac * (len(buf) - 1))] ^= 1 << bit
                f.write_bytes(bytes(buf))
        keep = set(snapshot(root))
        rc, err = _fuzz_run(["load", ck], root, capfd, keep=keep)
        if rc == 2:
            assert "ck" in err, err
