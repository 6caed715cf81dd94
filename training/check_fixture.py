"""Checks the PyTorch DiffiT and sampler of this folder against the reference fixtures made
with the released DiffiT code (tests/fixtures/diffit_tiny_*.safetensors).

    python3 training/check_fixture.py

Exits non-zero if any check is off by more than its tolerance (relative error
||a - b|| / ||b||: 1e-4 for forwards and tables, 1e-3 for the 250-step sampling run)."""

import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file, safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from diffusion import Schedule, guidance_scale_at, sample  # noqa: E402
from models import AutoencoderKL, DiffiT, relative_position_index, sincos_pos_embed_2d  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")


def rel(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def load_diffit(path):
    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    cfg = {k: cfg[k] for k in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                               "num_heads", "mlp_ratio", "num_classes", "learn_sigma")}
    model = DiffiT(**cfg)
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()


def main():
    torch.set_grad_enabled(False)
    failures = []

    def check(name, a, b, tol):
        e = rel(a, b)
        ok = e <= tol
        print(f"{'ok  ' if ok else 'FAIL'} {name:32s} rel err {e:.3e} (tol {tol:g})")
        if not ok:
            failures.append(name)

    model = load_diffit(os.path.join(ROOT, "diffit_tiny_model.safetensors"))
    g = load_file(os.path.join(ROOT, "diffit_tiny_golden.safetensors"))
    sd = load_file(os.path.join(ROOT, "diffit_tiny_model.safetensors"))

    # Rebuilt buffers equal the stored ones.
    check("pos_embed (rebuilt)", sincos_pos_embed_2d(64, 4)[None], sd["pos_embed"], 1e-6)
    idx_ok = torch.equal(relative_position_index(4), sd["blocks.0.attn.relative_position_index"])
    print(f"{'ok  ' if idx_ok else 'FAIL'} relative_position_index (rebuilt) exact")
    if not idx_ok:
        failures.append("relative_position_index")

    # Plain forward, with every traced activation.
    trace = {}
    out = model(g["fwd.x"], g["fwd.t"], g["fwd.y"], trace=trace)
    for k in sorted(trace):
        check(f"act.{k}", trace[k], g[f"act.{k}"], 1e-4)
    check("fwd.out", out, g["fwd.out"], 1e-4)

    # Guided forward as released: the first half of x is duplicated, labels [y; null].
    x = g["cfg.x"]
    half = x.shape[0] // 2
    xx = torch.cat([x[:half], x[:half]])
    raw = model(xx, g["cfg.t"], g["cfg.y"])
    check("cfg.raw", raw, g["cfg.raw"], 1e-4)
    scale, power = float(g["cfg.scale"]), float(g["cfg.scale_pow"])
    assert power == 4.0, power
    s = torch.tensor([guidance_scale_at(scale, "power-cosine", int(t)) for t in g["cfg.t"][:half]])
    c, u = raw[:half, :3], raw[half:, :3]
    ge = u + (c - u) * s[:, None, None, None].float()
    guided = torch.cat([torch.cat([ge, raw[:half, 3:]], 1), torch.cat([ge, raw[half:, 3:]], 1)])
    check("cfg.out", guided, g["cfg.out"], 1e-4)

    # Respaced tables (250 steps).
    sched = Schedule(250)
    for k in ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_recip_alphas_cumprod",
              "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
              "posterior_mean_coef1", "posterior_mean_coef2", "log_betas"):
        check(f"sched.{k}", getattr(sched, k), g[f"sched.{k}"], 1e-12)
    tm_ok = np.array_equal(sched.timestep_map, g["sched.timestep_map"].numpy())
    print(f"{'ok  ' if tm_ok else 'FAIL'} sched.timestep_map exact")
    if not tm_ok:
        failures.append("timestep_map")

    # The whole 250-step guided DDPM run: B latents, network on [x; x] / [y; null].
    z, y, noise = g["samp.z"], g["samp.y"], g["samp.noise"]
    b = z.shape[0] // 2
    final = sample(model, z[:b], y[:b], 250, "ddpm", scale, "power-cosine",
                   noise_fn=lambda k: noise[k][:b])
    check("samp.final_cond (250 DDPM)", final, g["samp.final_cond"], 1e-3)

    # The VAE: diffusers' reference decode of the tiny kl model (key layout and decoder maths).
    vcfg = json.load(open(os.path.join(ROOT, "vae_tiny_config.json")))["config"]
    vae = AutoencoderKL(in_channels=vcfg["in_channels"], out_channels=vcfg["out_channels"],
                        block_out_channels=vcfg["block_out_channels"],
                        layers_per_block=vcfg["layers_per_block"],
                        latent_channels=vcfg["latent_channels"],
                        norm_num_groups=vcfg["norm_num_groups"])
    vae.load_state_dict(load_file(os.path.join(ROOT, "vae_tiny_model.safetensors")), strict=True)
    vg = load_file(os.path.join(ROOT, "vae_tiny_golden.safetensors"))
    check("vae decoded", vae.eval().decode(vg["z"] / vcfg["scaling_factor"]), vg["decoded"], 1e-4)

    if failures:
        print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
