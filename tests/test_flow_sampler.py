"""Flow-matching Euler sampler: FLUX sigma schedule and steps vs diffusers, exactness on a straight path."""
import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdq.sampling.flow import flow_euler_sample, flux_shift_mu, flux_sigmas, flux_velocity_fn


def _diffusers_calculate_shift():
    """diffusers' ``calculate_shift`` taken from pipeline_flux.py's source (importing the
    module needs ``transformers``, which the parity tests do not)."""
    diffusers = pytest.importorskip("diffusers", reason="schedule parity needs diffusers")
    path = os.path.join(os.path.dirname(diffusers.__file__), "pipelines", "flux", "pipeline_flux.py")
    with open(path) as f:
        tree = ast.parse(f.read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_shift")
    ns: dict = {}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns["calculate_shift"]


def _flux_scheduler(dynamic: bool):
    """The scheduler as FLUX.1-dev (dynamic shifting) / FLUX.1-schnell configure it."""
    diffusers = pytest.importorskip("diffusers", reason="schedule parity needs diffusers")
    if dynamic:
        return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0,
                                                         use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                         base_image_seq_len=256, max_image_seq_len=4096)
    return diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def _set_pipeline_timesteps(sched, num_steps: int, seq_len: int, dynamic: bool):
    """What ``FluxPipeline.__call__`` does before its loop."""
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = _diffusers_calculate_shift()(seq_len, 256, 4096, 0.5, 1.15) if dynamic else None
    sched.set_timesteps(sigmas=sigmas, mu=mu)


@pytest.mark.parametrize("num_steps,seq_len,dynamic", [(28, 4096, True), (50, 1024, True), (7, 64, True),
                                                       (4, 4096, False), (1, 256, True)])
def test_flux_sigmas_match_diffusers(num_steps, seq_len, dynamic):
    sched = _flux_scheduler(dynamic)
    _set_pipeline_timesteps(sched, num_steps, seq_len, dynamic)
    ours = flux_sigmas(num_steps, seq_len, shift=dynamic)
    ref = sched.sigmas.double().numpy()
    assert ours.shape == ref.shape == (num_steps + 1,)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert ours[-1] == 0.0 and np.all(np.diff(ours) < 0)
    if dynamic:
        assert flux_shift_mu(seq_len) == pytest.approx(_diffusers_calculate_shift()(seq_len), abs=1e-12)


def _toy_velocity_np(x, sigma):
    """A nonlinear velocity field ``v(x, σ)`` (float64 NumPy reference)."""
    return np.tanh(x[:, ::-1] * (1.0 + sigma[:, None])) - 0.5 * x * sigma[:, None] + sigma[:, None] ** 2


def _toy_velocity_jnp(x, sigma):
    return jnp.tanh(x[:, ::-1] * (1.0 + sigma[:, None])) - 0.5 * x * sigma[:, None] + sigma[:, None] ** 2


def test_euler_matches_diffusers_scheduler_steps():
    torch = pytest.importorskip("torch", reason="scheduler parity needs torch")
    num_steps, seq_len = 12, 1024
    sched = _flux_scheduler(True)
    _set_pipeline_timesteps(sched, num_steps, seq_len, True)
    x_T = np.random.default_rng(0).normal(size=(3, 5))

    x = x_T.copy()
    seen = []
    for t in sched.timesteps:
        sigma = np.full((3,), float(t) / 1000.0)  # the pipeline passes timestep / 1000 to the model
        seen.append(sigma[0])
        v = torch.from_numpy(_toy_velocity_np(x, sigma))
        x = sched.step(v, t, torch.from_numpy(x), return_dict=False)[0].double().numpy()

    ours, traj = jax.jit(lambda x0: flow_euler_sample(_toy_velocity_jnp, x0, sigmas=flux_sigmas(num_steps, seq_len),
                                                      return_trajectory=True))(jnp.asarray(x_T, jnp.float32))
    np.testing.assert_allclose(np.asarray(traj["sigma"]), np.array(seen), rtol=0, atol=1e-6)
    assert traj["x"].shape == (num_steps, 3, 5)
    np.testing.assert_allclose(np.asarray(traj["x"][0]), x_T, atol=1e-6)
    assert np.max(np.abs(np.asarray(ours) - x)) <= 1e-5
    assert np.max(np.abs(x - x_T)) > 0.5  # the toy field moved the sample


def test_euler_is_exact_on_a_straight_path():
    """For x_σ = (1 − σ)x0 + σε the exact velocity is ε − x0, so Euler stays on the path
    for any step sizes; the velocity is computed from x (not handed ε − x0) so a wrong
    step would leave the path and show."""
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.normal(size=(2, 4, 6, 6)), jnp.float32)
    eps = jnp.asarray(rng.normal(size=(2, 4, 6, 6)), jnp.float32)
    sigmas = flux_sigmas(9, 4096)

    def velocity(x, sigma):
        return (x - x0) / sigma[:, None, None, None]

    out, traj = flow_euler_sample(velocity, eps, sigmas=sigmas, return_trajectory=True)
    assert float(jnp.max(jnp.abs(out - x0))) <= 1e-5
    for i, s in enumerate(sigmas[:-1]):
        np.testing.assert_allclose(np.asarray(traj["x"][i]), np.asarray((1 - s) * x0 + s * eps), atol=1e-5)


def test_traced_sigmas_and_dtype():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 3)), jnp.float32)
    sig = flux_sigmas(5, 256)
    eager = flow_euler_sample(_toy_velocity_jnp, x, sigmas=sig)
    jitted = jax.jit(lambda s: flow_euler_sample(_toy_velocity_jnp, x, sigmas=s))(jnp.asarray(sig, jnp.float32))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6)
    bf = flow_euler_sample(_toy_velocity_jnp, x.astype(jnp.bfloat16), sigmas=sig)
    assert bf.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(bf.astype(jnp.float32) - eager))) < 0.05
    with pytest.raises(ValueError, match="sigmas"):
        flow_euler_sample(_toy_velocity_jnp, x, sigmas=np.array([1.0]))


def test_progress_bar(capsys):
    x = jnp.ones((1, 2), jnp.float32)
    out = flow_euler_sample(_toy_velocity_jnp, x, sigmas=flux_sigmas(4, 256), progress=True)
    jax.block_until_ready(out)
    jax.effects_barrier()
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("sampling flow-euler: 100%") and "| 4/4 " in last


def _toy_apply(img, txt, pooled, timestep, img_ids, txt_ids, guidance):
    """Stands in for Flux.apply: depends on every input, so a mix-up shows."""
    g = 0.0 if guidance is None else guidance[:, None, None]
    return (img * timestep[:, None, None] + txt.mean(axis=1, keepdims=True)[..., :img.shape[-1]]
            + pooled[:, None, :img.shape[-1]] * (1 + g) + img_ids.sum() - txt_ids.sum())


def test_flux_velocity_fn_guidance_and_true_cfg():
    rng = np.random.default_rng(3)
    b, l, c, t = 2, 4, 3, 5
    x = jnp.asarray(rng.normal(size=(b, l, c)), jnp.float32)
    txt, neg = (jnp.asarray(rng.normal(size=(b, t, 6)), jnp.float32) for _ in range(2))
    pooled, neg_pooled = (jnp.asarray(rng.normal(size=(b, 4)), jnp.float32) for _ in range(2))
    iid, tid = jnp.asarray(rng.normal(size=(l, 3)), jnp.float32), jnp.asarray(rng.normal(size=(t, 3)), jnp.float32)
    sigma = jnp.array([0.7, 0.7], jnp.float32)
    g = jnp.full((b,), 3.5, jnp.float32)

    v = flux_velocity_fn(_toy_apply, txt, pooled, iid, tid, guidance=3.5)(x, sigma)
    np.testing.assert_allclose(np.asarray(v), np.asarray(_toy_apply(x, txt, pooled, sigma, iid, tid, g)), atol=1e-6)
    v_none = flux_velocity_fn(_toy_apply, txt, pooled, iid, tid)(x, sigma)
    np.testing.assert_allclose(np.asarray(v_none), np.asarray(_toy_apply(x, txt, pooled, sigma, iid, tid, None)),
                               atol=1e-6)

    scale = 4.0
    v_cfg = flux_velocity_fn(_toy_apply, txt, pooled, iid, tid, guidance=3.5, neg_txt=neg, neg_pooled=neg_pooled,
                             true_cfg_scale=scale)(x, sigma)
    pos = np.asarray(_toy_apply(x, txt, pooled, sigma, iid, tid, g), np.float64)
    negv = np.asarray(_toy_apply(x, neg, neg_pooled, sigma, iid, tid, g), np.float64)
    np.testing.assert_allclose(np.asarray(v_cfg), negv + scale * (pos - negv), atol=1e-5)
    assert np.max(np.abs(pos - negv)) > 0.1
    # scale 1 is the positive prompt alone
    v_one = flux_velocity_fn(_toy_apply, txt, pooled, iid, tid, guidance=3.5, neg_txt=neg, neg_pooled=neg_pooled,
                             true_cfg_scale=1.0)(x, sigma)
    np.testing.assert_allclose(np.asarray(v_one), pos, atol=1e-6)
