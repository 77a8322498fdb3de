"""jaxdq.distributed: sharded runs equal one device's.

The multi-device checks need several CPU devices, i.e. ``XLA_FLAGS`` set before jax starts,
and the test workers have started jax already: they run in a subprocess
(:func:`run_snippet`, ``--xla_force_host_platform_device_count=4``) that prints one JSON
line, and each test asserts one part of it.  What they assert (tight tolerances: the same
computation, partitioned; only the order of float reductions differs):

* data parallel (mesh ``data=4``): a DiT's sampler, its calibration statistics (max / min /
  sums reduced across devices inside the jit) and ``run_compare`` equal one device's;
  FSDP-sharded weights too;
* tensor parallel (mesh ``model=4``): a W8A8 FLUX quantized layer by layer from host
  weights (:func:`quantize_params_sharded`) equals the unsharded quantization bit for bit,
  every quantized weight (codes and scales) is split 4 ways, the integer-path sampler
  equals the unsharded one, and per device the compiled step's arguments are about a
  quarter of the replicated ones; quantizing one sharded layer needs, per device, about
  a quarter of that layer's memory;
* sequence-parallel attention (``attention="a2a"``): equal to the reference (odd
  lengths padded, key bias), a Latte video model sampled with it equals the reference
  model, and its per-device temporaries are a quarter of the reference's;
* multi-host: two processes × two CPU devices (``jax.distributed.initialize`` on
  localhost, gloo collectives) sample data parallel over the four devices and get the
  single-process samples; activation statistics collected over them equal one device's.

The spec assignment itself (which dimension of which leaf) is checked in-process on an
``AbstractMesh``.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from jaxdq import distributed as dist
from jaxdq.quant.hadamard import BlockHadamard
from jaxdq.quant.layers import FloatLinear, InputTransform, QLinear, QWeight, Segmented
from jaxdq.quant.quantizer import QuantSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_snippet(code: str, devices: int = 4, timeout: int = 240, args=()) -> dict:
    """Run ``code`` in a fresh Python with ``devices`` CPU devices; its last stdout line is JSON."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                       env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# The models, from NumPy (the same params in every process, no eager device work).
MODELS = r'''
import dataclasses, json, sys, time
import jax, jax.numpy as jnp, numpy as np
from jaxdq import distributed as dist
from jaxdq.models.sources import LoadedModel
from jaxdq.sampling.families import Request

def np_params(init, seed, std=0.05):
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(lambda s: (std * rng.standard_normal(s.shape)).astype(np.float32), shapes)

def dit():
    from jaxdq.models.dit import DiTConfig, init_dit
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    return LoadedModel(cfg, np_params(lambda k: init_dit(cfg, k), 0), {"arch": "dit"})

def dit_batch(model):
    return model.family.batch(model.config, Request(classes=(1, 2), per_class=2, seed=0))

from jax.sharding import NamedSharding, PartitionSpec as P
T0 = time.time()

def lap(name):
    print(f"{name}: {time.time() - T0:.1f} s", file=sys.stderr, flush=True)

def spec(x):
    """A placed array's PartitionSpec as a JSON list (its repr differs between jax versions)."""
    return [list(e) if isinstance(e, tuple) else e for e in x.sharding.spec]

def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))

def stat_diffs(c0, c1):
    """Per statistic, the largest relative difference over layers / steps / branches."""
    l1 = dict(jax.tree_util.tree_leaves_with_path(c1))
    out = {}
    for p, a in jax.tree_util.tree_leaves_with_path(c0):
        k = str(getattr(p[-1], "key", p[-1]))
        b = np.asarray(l1[p], np.float64); a = np.asarray(a, np.float64)
        d = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-30))) if a.size else 0.0
        out[k] = max(out.get(k, 0.0), d)
    return out
'''

SINGLE = MODELS + r'''
out = {"devices": jax.device_count()}
key = jax.random.PRNGKey(1)
tp = dist.make_mesh(model=4)
dp = dist.make_mesh()

# ---- data parallel: DiT sampling, calibration, compare, FSDP weights
from jaxdq.calibrate import calibrate
from jaxdq.compare import run_compare
model = dit(); fam = model.family; cfg = model.config; batch = dit_batch(model)
ref = np.asarray(fam.sampler(cfg, num_steps=2)(model.params, batch.x_T, batch.cond, batch.uncond, key))
got = fam.sampler(cfg, num_steps=2, mesh=dp)(model.params, batch.x_T, batch.cond, batch.uncond, key)
out["dp_sample"] = {"rel": rel(got, ref), "spec": spec(got),
                    "shard_rows": int(got.addressable_shards[0].data.shape[0])}
lap('dp sampling')
fsdp = dist.shard_params(model.params, dp, "fsdp", roles=model.roles)
got = fam.sampler(cfg, num_steps=2, mesh=dp)(fsdp, batch.x_T, batch.cond, batch.uncond, key)
out["fsdp_sample"] = {"rel": rel(got, ref), "fc1": spec(fsdp["blocks_0"]["mlp"]["fc1"]["kernel"])}
lap('fsdp')
c0 = calibrate(model, batch, num_steps=2)
c1 = calibrate(model, batch, num_steps=2, mesh=dp)
out["dp_calib"] = stat_diffs(c0, c1)
np.savez(sys.argv[1], sample=ref)  # the multi-host test compares against it
lap('dp calibration')
res = run_compare("tiny", methods=("w8a8",), per_class=2, classes=(1, 2), num_steps=2, progress=False, model=model,
                  mesh=dp)  # its float row samples the same batch with PRNGKey(seed + 1) = the key above
out["dp_compare"] = {"float_rel": rel(res["images"]["float"], ref), "psnr": res["results"][1]["psnr_db"]}
lap('dp compare')
try:
    fam.sampler(cfg, num_steps=2, mesh=dp)(model.params, batch.x_T[:3], {"y": batch.cond["y"][:3]},
                                           {"y": batch.uncond["y"][:3]}, key)
    out["odd_batch_error"] = None
except ValueError as e:
    out["odd_batch_error"] = str(e)

lap('odd batch')
# ---- tensor parallel: W8A8 FLUX quantized layer by layer from host weights
from jaxdq.backend import policy
from jaxdq.models.flux import FluxConfig, init_flux, layer_roles
from jaxdq.quant.layers import QLinear, iter_layers, nbytes
from jaxdq.quant.rules import Rule, keep_float, quantize_params
from jaxdq.quant.recipes import dynamic_cfg
fcfg = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
                  joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
host = np_params(lambda k: init_flux(fcfg, k), 1, std=0.03)
roles = layer_roles(fcfg)
rules = [keep_float(), Rule(dynamic_cfg(8, 8))]  # the dynamic-w8a8 recipe's rules
q0 = quantize_params(jax.tree_util.tree_map(jnp.asarray, host), rules, roles=roles)
import jaxdq.quant.rules as R
seen = []  # what each quantize step is given: one layer's arrays, already split over the mesh
def spy(tree, *a, **kw):
    leaves = jax.tree_util.tree_leaves(tree)
    seen.append({"layers": len(list(iter_layers(tree))), "elements": sum(x.size for x in leaves),
                 "placed": all(isinstance(x, jax.Array) and len(x.sharding.device_set) == 4 for x in leaves),
                 "kernel_fraction": max(x.addressable_shards[0].data.size / x.size for x in leaves if x.ndim == 2)})
    return quantize_params(tree, *a, **kw)
R.quantize_params = spy
q1 = dist.quantize_params_sharded(host, rules, tp, roles=roles)
R.quantize_params = quantize_params
same = [bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in zip(jax.tree_util.tree_leaves(q0), jax.tree_util.tree_leaves(q1))]
fractions = {}
for path, layer in iter_layers(q1):
    if isinstance(layer, QLinear):
        w = layer.weight
        fractions[path] = [x.addressable_shards[0].data.size / x.size for x in (w.codes, w.scale)]
        fractions[path][1] = (fractions[path][1], spec(w.codes) == [None, "model"])
out["tp_quantize"] = {"equal": all(same) and len(same) == len(jax.tree_util.tree_leaves(q0)),
                      "code_fractions": sorted({v[0] for v in fractions.values()}),
                      "scale_fractions": sorted({v[1] for v in fractions.values()}),
                      "quantized_layers": len(fractions),
                      "bytes_per_device": dist.bytes_per_device(q1), "bytes_total": nbytes(q1),
                      "steps": len(seen), "layers_per_step": sorted({r["layers"] for r in seen}),
                      "placed": all(r["placed"] for r in seen),
                      "kernel_fractions": sorted({r["kernel_fraction"] for r in seen}),
                      "max_step_elements": max(r["elements"] for r in seen),
                      "largest_layer_elements": max(sum(x.size for x in jax.tree_util.tree_leaves(l))
                                                    for _, l in iter_layers(host)),
                      "float_elements": sum(x.size for x in jax.tree_util.tree_leaves(host)),
                      "host_layers": len(list(iter_layers(host)))}
lap('tp quantization')
ffam = LoadedModel(fcfg, host, {"arch": "flux"}).family
fb = ffam.batch(fcfg, Request(classes=(0,), per_class=2, seed=0))
s0 = np.asarray(ffam.sampler(fcfg, num_steps=2)(q0, fb.x_T, fb.cond, fb.uncond, key))
s1 = ffam.sampler(fcfg, num_steps=2, mesh=tp)(q1, fb.x_T, fb.cond, fb.uncond, key)
out["tp_sample"] = {"rel": rel(s1, s0)}
pol = policy("integer")  # XLA's int8 dot: the row-parallel int32 partial sums add up exactly
lap('tp sampling')
# per-device bytes of a compiled column → row pair (FLUX's ff: fc1 [D, 4D] splits C_out, fc2 [4D, D] C_in)
from jaxdq import backend
def mlp(p, x):
    h = jax.nn.gelu(backend.execute(p["fc1"], x, pol))
    return backend.execute(p["fc2"], h, pol)
ff_sh = {k: q1["transformer_blocks_0"]["ff"][k] for k in ("fc1", "fc2")}
ff_rep = dist.place_params({k: q0["transformer_blocks_0"]["ff"][k] for k in ("fc1", "fc2")}, tp)
xs = jax.device_put(jnp.asarray(np.random.default_rng(1).standard_normal((2, 512, 64)), jnp.float32), dist.replicated(tp))
f = jax.jit(mlp)
out["tp_memory"] = {"sharded": dist.compiled_memory(f.lower(ff_sh, xs).compile()),
                    "replicated": dist.compiled_memory(f.lower(ff_rep, xs).compile()),
                    "rel": rel(f(ff_sh, xs), f(ff_rep, xs)),
                    "codes": [spec(ff_sh[k].weight.codes) for k in ("fc1", "fc2")]}
lap('tp memory')
# quantizing one sharded layer: per-device memory of the jitted quantizer
from jaxdq.quant.quantizer import QuantSpec, compute_qparams, quantize
qspec = QuantSpec(bits=8, granularity="channel")
def qlayer(w):
    s, z = compute_qparams(w, qspec, kind="weight")
    return quantize(w, s, z, qspec, kind="weight"), s
w = jnp.asarray(np.random.default_rng(0).standard_normal((512, 1024)), jnp.float32)
qmem = {"unsharded": dist.compiled_memory(jax.jit(qlayer).lower(w).compile())}
for name, sp in (("column", P(None, "model")), ("row", P("model", None))):
    ws = jax.device_put(w, NamedSharding(tp, sp))
    f = jax.jit(qlayer)
    qmem[name] = dist.compiled_memory(f.lower(ws).compile())
    codes, s = f(ws)
    qmem[name]["codes_spec"] = spec(codes)
    qmem[name]["equal"] = bool(np.array_equal(np.asarray(codes), np.asarray(qlayer(w)[0])))
out["quantize_memory"] = qmem

lap('quantization memory')
# ---- sequence-parallel attention
from jaxdq.models.attention import attention
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 8, 16)), jnp.float32) for _ in range(3))
kc, vc = (jnp.asarray(rng.standard_normal((2, 13, 8, 16)), jnp.float32) for _ in range(2))
bias = jnp.asarray(np.where(rng.random((2, 13)) < 0.3, -10000.0, 0.0), jnp.float32)
a2a = jax.jit(lambda q, k, v, b: attention(q, k, v, b, impl="a2a"))
with dist.use_mesh(tp):
    self_ = a2a(q, k, v, None)
    cross = a2a(q, kc, vc, bias)
out["a2a_attention"] = {"self": rel(self_, attention(q, k, v)), "cross": rel(cross, attention(q, kc, vc, bias)),
                        "no_mesh": rel(a2a(q, k, v, None), attention(q, k, v))}
try:
    with dist.use_mesh(tp):
        a2a(q[:, :, :6], k[:, :, :6], v[:, :, :6], None)
    out["a2a_heads_error"] = None
except ValueError as e:
    out["a2a_heads_error"] = str(e)
lap('a2a attention')
from jaxdq.models.latte import LatteConfig, init_latte
lc = LatteConfig(sample_size=8, patch_size=2, in_channels=4, out_channels=8, hidden_size=32, depth=1, num_heads=4,
                 caption_channels=16, video_length=4, max_text_tokens=8)
lm = LoadedModel(lc, np_params(lambda k: init_latte(lc, k), 2), {"arch": "latte"})
lb = lm.family.batch(lc, Request(classes=(0,), per_class=2, seed=0))
l0 = np.asarray(lm.family.sampler(lc, num_steps=2)(lm.params, lb.x_T, lb.cond, lb.uncond, key))
lc2 = dataclasses.replace(lc, attention="a2a")
l1 = lm.family.sampler(lc2, num_steps=2, mesh=tp)(lm.params, lb.x_T, lb.cond, lb.uncond, key)
out["latte_a2a"] = {"rel": rel(l1, l0)}
lap('latte a2a')
def attn_mem(impl):
    x = jax.device_put(jnp.zeros((1, 1024, 8, 16)), dist.replicated(tp))
    with dist.use_mesh(tp):
        return dist.compiled_memory(jax.jit(lambda q: attention(q, q, q, impl=impl)).lower(x).compile())
out["a2a_memory"] = {"a2a": attn_mem("a2a"), "reference": attn_mem("float32"), "logits_bytes": 8 * 1024 * 1024 * 4}
lap('a2a memory')
# ---- the CLI: jaxdq sample --devices 4 --shard tp (the shipped default model) = one device
import contextlib, io, os, tempfile
from jaxdq.cli import main
from jaxdq.viz import read_png
tmp = tempfile.mkdtemp()
cli = {}
for name, extra in (("one", []), ("tp", ["--devices", "4", "--shard", "tp"]), ("dp", ["--devices", "all"])):
    path = os.path.join(tmp, name + ".png")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        cli[name + "_rc"] = main(["sample", "--steps", "2", "--per-class", "1", "--classes", "0,1,2,3", "--out", path,
                                  *extra])
    cli[name] = path
one = read_png(cli["one"]).astype(int)
out["cli"] = {"rc": [cli[k + "_rc"] for k in ("one", "tp", "dp")],
              "tp_max_diff": int(np.abs(read_png(cli["tp"]).astype(int) - one).max()),
              "dp_max_diff": int(np.abs(read_png(cli["dp"]).astype(int) - one).max()), "pixels": int(one.size)}
lap('cli')
print(json.dumps(out))
'''

MULTIHOST = MODELS + r'''
pid, port = int(sys.argv[1]), sys.argv[2]
info = dist.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
import flax.linen as nn
from jaxdq.calibrate import collect_step_stats
from jaxdq.nn import Linear
model = dit(); fam = model.family; batch = dit_batch(model)
mesh = dist.make_mesh()  # data = 4 devices over 2 processes
got = fam.sampler(model.config, num_steps=2, mesh=mesh)(model.params, batch.x_T, batch.cond, batch.uncond,
                                                         jax.random.PRNGKey(1))
ref = np.load(sys.argv[3])

class TwoLayer(nn.Module):  # statistics reduced across the two processes
    @nn.compact
    def __call__(self, x):
        return Linear(5, name="fc2")(jnp.tanh(Linear(12, name="fc1")(x)))

xs = np.random.default_rng(0).standard_normal((3, 8, 6, 7)).astype(np.float32)  # [S, B, T, C]
m = TwoLayer()
with jax.default_device(jax.local_devices()[0]):
    p = m.init(jax.random.PRNGKey(0), jnp.asarray(xs[0]))["params"]
    p = jax.tree_util.tree_map(np.asarray, p)
    s0 = collect_step_stats(m.apply, p, {"x": xs})
s1 = collect_step_stats(m.apply, p, {"x": xs}, mesh=mesh)
print(json.dumps(dict(info, mesh=dist.describe(mesh), local_shards=len(got.addressable_shards),
                      sample_rel=rel(dist.to_host(got), ref["sample"]), stats=stat_diffs(s0, s1))))
jax.distributed.shutdown()
'''


@pytest.fixture(scope="module")
def reference_npz(tmp_path_factory):
    return str(tmp_path_factory.mktemp("dist") / "single.npz")


@pytest.fixture(scope="module")
def four(reference_npz):
    """The 4-device checks (one subprocess for all of them)."""
    return run_snippet(SINGLE, 4, args=(reference_npz,))


# --------------------------------------------------------------------------- data parallel
def test_data_parallel_sampling_equals_one_device(four):
    assert four["devices"] == 4
    r = four["dp_sample"]
    assert r["spec"] == ["data"] and r["shard_rows"] == 1  # 4 samples, one per device
    assert r["rel"] < 1e-5
    assert four["fsdp_sample"]["rel"] < 1e-5
    assert four["fsdp_sample"]["fc1"] == [None, "data"]  # weights split over the data axis


def test_data_parallel_calibration_statistics_are_global(four):
    d = four["dp_calib"]
    assert set(d) >= {"absmax", "min", "max", "token_absmax_max", "token_absmax_min", "sq_sum", "count", "t"}
    assert d["count"] == 0 and d["t"] == 0  # a per-device count would be a quarter
    assert max(d.values()) < 1e-5, d  # max/min/sum reduced across the 4 devices


def test_data_parallel_compare(four):
    r = four["dp_compare"]
    assert r["float_rel"] < 1e-5  # run_compare(mesh=...)'s float row = the one-device sampler
    assert r["psnr"] > 60  # W8A8 of a tiny random model: close to float


def test_batch_must_divide_over_the_data_axis(four):
    assert "does not split over the mesh's 4 data-parallel devices" in four["odd_batch_error"]


# --------------------------------------------------------------------------- sharded models
def test_quantize_layer_by_layer_on_sharded_weights(four):
    r = four["tp_quantize"]
    assert r["equal"]  # codes and scales bit for bit
    # each quantize step got exactly one layer, already split 4 ways: never the whole float model
    assert r["steps"] == r["host_layers"] and r["layers_per_step"] == [1] and r["placed"]
    assert r["kernel_fractions"] == [0.25]
    assert r["max_step_elements"] == r["largest_layer_elements"] < 0.2 * r["float_elements"]
    assert r["quantized_layers"] > 10
    assert r["code_fractions"] == [0.25]  # every quantized weight's codes split 4 ways
    # per-channel scales [1, C_out] split with C_out (column parallel), replicated when C_in is split
    assert sorted(map(tuple, r["scale_fractions"])) == [(0.25, True), (1.0, False)]
    assert r["bytes_per_device"] < 0.35 * r["bytes_total"]


def test_tensor_parallel_w8a8_flux_equals_unsharded(four):
    assert four["tp_sample"]["rel"] < 1e-5
    m = four["tp_memory"]  # the compiled fc1 → GELU → fc2 pair, per device
    assert m["rel"] < 1e-6 and m["codes"] == [[None, "model"], ["model", None]]
    weights = lambda k: m[k]["argument_bytes"] - 2 * 512 * 64 * 4  # noqa: E731  (minus the replicated input)
    assert weights("sharded") < 0.3 * weights("replicated")
    assert m["sharded"]["temp_bytes"] < 0.5 * m["replicated"]["temp_bytes"]  # the [.., 4D] hidden split too


def test_quantizing_one_sharded_layer_needs_a_quarter_per_device(four):
    r = four["quantize_memory"]
    total = lambda m: m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"]  # noqa: E731
    for name, spec in (("column", [None, "model"]), ("row", ["model", None])):
        m = r[name]
        assert m["equal"] and m["codes_spec"] == spec
        assert total(m) < 0.3 * total(r["unsharded"]), (name, m, r["unsharded"])


# --------------------------------------------------------------------------- sequence parallel
def test_a2a_attention_equals_reference(four):
    r = four["a2a_attention"]
    assert r["self"] < 1e-5 and r["cross"] < 1e-5 and r["no_mesh"] < 1e-6
    assert "splits the 6 heads over the 4 devices" in four["a2a_heads_error"]


def test_latte_with_a2a_attention_equals_reference(four):
    assert four["latte_a2a"]["rel"] < 1e-5


def test_a2a_attention_per_device_memory_is_a_quarter(four):
    m = four["a2a_memory"]
    assert m["reference"]["temp_bytes"] >= m["logits_bytes"]
    assert m["a2a"]["temp_bytes"] < 0.3 * m["reference"]["temp_bytes"]


def test_cli_devices_and_shard_sample_like_one_device(four):
    r = four["cli"]
    assert r["rc"] == [0, 0, 0] and r["pixels"] > 1000
    assert r["tp_max_diff"] <= 1 and r["dp_max_diff"] <= 1  # 8-bit PNGs: at most a rounding step apart


# --------------------------------------------------------------------------- multi-host
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_sample_and_collect_statistics_like_one(four, reference_npz):
    port = str(_free_port())
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST, str(i), port, reference_npz], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=240)
            assert p.returncode == 0, se[-4000:]
            outs.append(json.loads(so.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, r in enumerate(outs):
        assert r["process"] == i and r["processes"] == 2 and r["devices"] == 4 and r["local_devices"] == 2
        assert r["mesh"] == {"shape": {"data": 4, "model": 1}, "devices": 4, "kind": ["cpu"], "processes": 2}
        assert r["local_shards"] == 2  # each process holds its half of the batch
        assert r["sample_rel"] < 1e-5
        assert r["stats"]["count"] == 0 and max(r["stats"].values()) < 1e-5, r["stats"]


# --------------------------------------------------------------------------- spec assignment (in process)
MESH = AbstractMesh((1, 4), (dist.DATA, dist.MODEL))


def _qlinear(c_in, c_out, *, layout="kn", packed=False, group=None, lowrank=0, smooth=False, rotate=False):
    spec = QuantSpec(bits=4 if packed else 8, granularity="group" if group else "channel", group_size=group)
    w = QWeight.from_kernel(jnp.ones((c_in, c_out)), spec, pack=packed).to_layout(layout)
    t = InputTransform(smooth=jnp.ones((c_in,)) if smooth else None,
                       rotation=BlockHadamard(block=16) if rotate else None,
                       lowrank_a=jnp.ones((c_in, lowrank)) if lowrank else None,
                       lowrank_b=jnp.ones((lowrank, c_out)) if lowrank else None)
    return QLinear(weight=w, bias=jnp.zeros((c_out,)), transform=t)


def test_column_parallel_quantized_layer_specs():
    params = {"blocks_0": {"attn": {"qkv": _qlinear(64, 192, packed=True, group=16, lowrank=8, smooth=True,
                                                    rotate=True)}}}
    s = dist.param_specs(params, MESH, "tp")["blocks_0"]["attn"]["qkv"]
    m = dist.MODEL
    assert s.weight.codes == P(None, m)           # packed [C_in, C_out / 2]: C_out split
    assert s.weight.scale == P(None, m)           # group scales [C_in / G, C_out]
    assert s.bias == P(m)
    assert s.transform.smooth == P() and s.transform.lowrank_a == P() and s.transform.lowrank_b == P(None, m)


def test_row_parallel_quantized_layer_specs_nk_layout():
    params = {"blocks_0": {"mlp": {"fc2": _qlinear(256, 64, layout="nk", lowrank=4, smooth=True)}}}
    s = dist.param_specs(params, MESH, "tp")["blocks_0"]["mlp"]["fc2"]
    m = dist.MODEL
    assert s.weight.codes == P(None, m)           # "nk" [C_out, C_in]: C_in split
    assert s.weight.scale == P() and s.bias == P()  # per channel [1, C_out]: replicated
    assert s.transform.smooth == P(m) and s.transform.lowrank_a == P(m, None) and s.transform.lowrank_b == P()


def test_layers_that_do_not_divide_fall_back_whole():
    params = {"blocks_0": {"mlp": {"fc2": _qlinear(30, 64)},       # C_in 30: row → column
                           "fc1": {"kernel": jnp.ones((6, 10)), "bias": jnp.ones((10,))}},  # neither
              "final_layer": {"linear": _qlinear(64, 8)}}
    s = dist.param_specs(params, MESH, "tp")
    assert s["blocks_0"]["mlp"]["fc2"].weight.codes == P(None, dist.MODEL)
    assert s["blocks_0"]["mlp"]["fc2"].weight.scale == P(None, dist.MODEL)
    assert s["blocks_0"]["fc1"] == {"kernel": P(), "bias": P()}
    assert s["final_layer"]["linear"].weight.codes == P(None, dist.MODEL)


def test_fsdp_replicate_and_plain_params():
    params = {"blocks_0": {"attn": {"proj": {"kernel": jnp.ones((64, 64)), "bias": jnp.ones((64,))}},
                           "norm": {"scale": jnp.ones((64,))}},
              "y_embedder": {"embedding_table": jnp.ones((1001, 128))},
              "seg": Segmented(variants=(_qlinear(64, 64), FloatLinear(kernel=jnp.ones((64, 64)))), index=(0, 1),
                               bounds=(500,))}
    f = dist.param_specs(params, MESH, "fsdp")
    assert f["blocks_0"]["attn"]["proj"] == {"kernel": P(None, dist.MODEL), "bias": P(dist.MODEL)}
    assert f["blocks_0"]["norm"]["scale"] == P()                       # small: replicated
    assert f["y_embedder"]["embedding_table"] == P(None, dist.MODEL)   # 128 divides, 1001 does not
    assert f["seg"].variants[0].weight.codes == P(None, dist.MODEL)
    t = dist.param_specs(params, MESH, "tp")
    assert t["y_embedder"]["embedding_table"] == P() and t["blocks_0"]["attn"]["proj"]["kernel"] == P(dist.MODEL, None)
    r = dist.param_specs(params, MESH, "replicate")
    assert all(s == P() for s in jax.tree_util.tree_leaves(r))
    with pytest.raises(ValueError, match="strategy must be one of"):
        dist.param_specs(params, MESH, "zero3")


def test_row_parallel_names_and_roles():
    assert dist.row_parallel("blocks_3/attn/proj") and dist.row_parallel("single_transformer_blocks_0/proj_out")
    assert not dist.row_parallel("proj_out")                      # FLUX's final layer (top level)
    assert not dist.row_parallel("x_embedder/proj")               # the patch embedding
    assert not dist.row_parallel("blocks_0/attn/proj", role="adaLN")
    assert not dist.row_parallel("blocks_0/attn/qkv")


def test_batch_check_and_mesh_shape_errors():
    dist.check_batch(7, MESH)  # a data axis of 1 takes any batch
    with pytest.raises(ValueError, match="does not split"):
        dist.check_batch(6, AbstractMesh((4, 1), (dist.DATA, dist.MODEL)))
    with pytest.raises(ValueError, match="does not divide"):
        dist.make_mesh(model=2, devices=jax.devices()[:1])


def test_sequence_parallel_attention_without_mesh_is_the_inner_implementation():
    from jaxdq.models.attention import attention

    q = jnp.asarray(np.random.default_rng(0).standard_normal((1, 9, 2, 8)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(attention(q, q, q, impl="a2a")), np.asarray(attention(q, q, q)))
    with pytest.raises(ValueError, match="attention="):
        from jaxdq.models.attention import check_attention_impl

        check_attention_impl("ring")


def test_shard_map_falls_back_to_the_experimental_location(monkeypatch):
    """jax without ``jax.shard_map`` (older releases): the ``jax.experimental`` one is used."""
    import warnings

    from jax.sharding import Mesh

    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), (dist.DATA, dist.MODEL))
    x = jnp.arange(8.0).reshape(2, 4)
    f = lambda a: jax.lax.psum(a, dist.MODEL) * 2  # noqa: E731
    new = dist.shard_map(f, mesh=mesh, in_specs=P(dist.DATA, dist.MODEL), out_specs=P(dist.DATA, dist.MODEL))(x)
    monkeypatch.delattr(jax, "shard_map")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = dist.shard_map(f, mesh=mesh, in_specs=P(dist.DATA, dist.MODEL), out_specs=P(dist.DATA, dist.MODEL))(x)
    np.testing.assert_array_equal(np.asarray(old), 2 * np.arange(8.0).reshape(2, 4))
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_mesh_for_cli_shapes():
    m = dist.mesh_for(1, "tp")
    assert dict(m.shape) == {dist.DATA: 1, dist.MODEL: 1}
    assert dict(dist.mesh_for(None, "fsdp").shape) == {dist.DATA: jax.device_count(), dist.MODEL: 1}
    with pytest.raises(ValueError, match="only"):
        dist.mesh_for(jax.device_count() + 1)
    with pytest.raises(ValueError, match="strategy must be one of"):
        dist.mesh_for(1, "ring")
