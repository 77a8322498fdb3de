"""The PyTorch anchor of the end-to-end step benchmark (issue 19, item 6): the diffusers model at
the config ``bench/bench_e2e.py`` builds in JAX, random weights, one denoiser call as the sampler
makes it (CFG-doubled batch for DiT-XL/2 and PixArt-Σ, one batch for FLUX.1-dev), bf16 on the GPU.

Modes (``--mode``, one per process so the peak memory is that configuration's):
  eager           the module as it is;
  compile         ``torch.compile`` (default mode);
  compile-cg      ``torch.compile(mode="reduce-overhead")`` (CUDA graphs);
  torchao-int8    torchao ``Int8DynamicActivationInt8WeightConfig`` on the ``nn.Linear`` layers of the
                  transformer blocks (what jaxdq's W8A8 quantizes; torchao's int8 matmul needs more
                  than 16 rows, and the timestep / caption embedders see the 2 CFG rows), compiled;
  torchao-fp8     torchao ``Float8DynamicActivationFloat8WeightConfig``, compiled.

A mode that fails (torchao missing, a compile error, torchao's int8 on M = 1 rows) is a row with
its ``error``; a non-finite output (torchao FP8 on PixArt's all-zero unconditional caption rows)
is a row with ``out_finite: false``: recorded, not hidden.  JSON lines out, the command in each::

    python bench/bench_torch_anchor.py --model pixart-sigma-1024 --mode compile --out anchor.jsonl
    python bench/bench_torch_anchor.py --model dit-xl2-256 --mode eager --smoke --out /tmp/a.jsonl  # CPU check

``--smoke``: the same classes at a tiny width and depth, float32 on the CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import quiet_gpu  # noqa: E402

MODELS = ("dit-xl2-256", "pixart-sigma-1024", "flux1-dev-1024")
MODES = ("eager", "compile", "compile-cg", "torchao-int8", "torchao-fp8")


def build(name: str, smoke: bool, device: str, dtype):
    """``(module, kwargs)``: the diffusers transformer at ``name``'s config and one call's inputs."""
    import diffusers

    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    if name == "dit-xl2-256":
        cfg = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   sample_size=32, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero")
        if smoke:
            cfg.update(num_attention_heads=2, attention_head_dim=16, num_layers=1, sample_size=8)
        with torch.device(device):
            m = diffusers.DiTTransformer2DModel(**cfg)
        s = cfg["sample_size"]
        kw = dict(hidden_states=randn(2, 4, s, s), timestep=torch.full((2,), 500, device=device),
                  class_labels=torch.tensor([3, 1000], device=device))  # cond + the null class
    elif name == "pixart-sigma-1024":
        cfg = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                   cross_attention_dim=1152, caption_channels=4096, sample_size=128, patch_size=2,
                   norm_type="ada_norm_single", use_additional_conditions=False, interpolation_scale=2)
        tokens, width = 300, 4096
        if smoke:
            cfg.update(num_attention_heads=2, attention_head_dim=16, num_layers=1, cross_attention_dim=32,
                       caption_channels=24, sample_size=8)
            tokens, width = 5, 24
        with torch.device(device):
            m = diffusers.PixArtTransformer2DModel(**cfg)
        s = cfg["sample_size"]
        text = randn(2, tokens, width)
        text[1] = 0  # the unconditional row: all-zero caption states, as PixArt's null embedding
        mask = torch.ones(2, tokens, device=device)
        kw = dict(hidden_states=randn(2, 4, s, s), encoder_hidden_states=text, encoder_attention_mask=mask,
                  timestep=torch.full((2,), 500, device=device), added_cond_kwargs={"resolution": None,
                                                                                    "aspect_ratio": None})
    elif name == "flux1-dev-1024":
        cfg = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        img, txt = 4096, 512
        if smoke:
            cfg.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                       joint_attention_dim=24, pooled_projection_dim=8, axes_dims_rope=(4, 6, 6))
            img, txt = 16, 5
        with torch.device(device):
            m = diffusers.FluxTransformer2DModel(**cfg)
        kw = dict(hidden_states=randn(1, img, 64), encoder_hidden_states=randn(1, txt, cfg["joint_attention_dim"]),
                  pooled_projections=randn(1, cfg["pooled_projection_dim"]),
                  timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
                  img_ids=torch.zeros(img, 3, device=device), txt_ids=torch.zeros(txt, 3, device=device),
                  guidance=torch.full((1,), 3.5, device=device, dtype=dtype))
    else:
        raise ValueError(f"unknown model {name!r}: one of {MODELS}")
    return m.to(dtype).eval(), kw


def prepare(m, mode: str):
    """The callable ``mode`` times (module docstring)."""
    if mode.startswith("torchao"):
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig,
                                          Int8DynamicActivationInt8WeightConfig, quantize_)

        if mode == "torchao-int8":
            quantize_(m, Int8DynamicActivationInt8WeightConfig(),
                      filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and "blocks." in fqn)
        else:
            quantize_(m, Float8DynamicActivationFloat8WeightConfig())
    if mode == "eager":
        return m
    return torch.compile(m, mode="reduce-overhead" if mode == "compile-cg" else None)


def time_calls(f, kw, reps: int, warmup: int, cuda: bool, quiet=None) -> tuple[list, object]:
    """Per-call seconds after ``warmup`` calls (CUDA events on the GPU, wall time on the CPU);
    the timed calls inside ``quiet.timing()`` when a :class:`bench.quiet_gpu.QuietGPU` is given
    (compiles in parallel with other benchmark processes, times alone on the GPU)."""
    with torch.inference_mode():
        for _ in range(warmup):
            out = f(**kw, return_dict=False)[0]
        if cuda:
            torch.cuda.synchronize()
        times = []
        with (quiet or quiet_gpu.QuietGPU(None)).timing():
            for _ in range(reps):
                if cuda:
                    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    a.record()
                    out = f(**kw, return_dict=False)[0]
                    b.record()
                    b.synchronize()
                    times.append(a.elapsed_time(b) / 1e3)
                else:
                    t0 = time.perf_counter()
                    out = f(**kw, return_dict=False)[0]
                    times.append(time.perf_counter() - t0)
    return times, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=MODELS)
    ap.add_argument("--mode", required=True, choices=MODES)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", required=True, help="JSON-lines file to append to")
    ap.add_argument("--smoke", action="store_true", help="CPU check: tiny configs, float32")
    quiet_gpu.add_arguments(ap)
    a = ap.parse_args(argv)
    quiet = quiet_gpu.from_args(a)
    cuda = torch.cuda.is_available() and not a.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    row = {"model": a.model, "mode": a.mode, "framework": "pytorch", "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype).split(".")[-1],
           "reps": a.reps, "command": f"python bench/bench_torch_anchor.py --model {a.model} --mode {a.mode} "
                                      f"--reps {a.reps} --out OUT" + (" --smoke" if a.smoke else "")}
    try:
        import diffusers

        row["diffusers"] = diffusers.__version__
        t0 = time.time()
        m, kw = build(a.model, a.smoke, device, dtype)
        f = prepare(m, a.mode)
        row["build_s"] = round(time.time() - t0, 1)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        times, out = time_calls(f, kw, a.reps, a.warmup, cuda, quiet)
        row.update(step_ms_median=round(1e3 * statistics.median(times), 3), step_ms_min=round(1e3 * min(times), 3),
                   warmup_and_timing_s=round(time.time() - t0, 1), out_finite=bool(torch.isfinite(out).all()),
                   weight_bytes=int(sum(p.numel() * p.element_size() for p in m.parameters())))
        if cuda:
            row["peak_device_bytes"] = int(torch.cuda.max_memory_allocated())
    except Exception as e:  # recorded, not hidden: torchao missing, compile errors, M = 1 int8 rows
        row["error"] = f"{type(e).__name__}: {str(e)[:400]}"
    if quiet.report is not None:
        row["quiet_gpu"] = quiet.report
    if a.smoke:
        row["smoke"] = True
    print(json.dumps(row), flush=True)
    with open(a.out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
