"""Records a sampling run of the PyTorch sampler (diffusion.sample, which mirrors the server's)
with the trained model's default settings, for the Rust parity test:

    python3 training/make_fixture.py  ->  tests/fixtures/fmnist_sample.safetensors

Tensors: z [2,4,8,8] start latent, noise [S,2,4,8,8] (the draw for iteration k, k = 0 the
noisiest step; all zeros for deterministic samplers; for DDPM the last iteration's draw is
recorded but unused, since no noise is added at i = 0), y [2] int64, final [2,4,8,8].
Runs on the CPU in float32."""

import argparse
import hashlib
import json
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from choose_defaults import load_diffit  # noqa: E402
from diffusion import sample  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffit", default="weights/diffit_fmnist.safetensors")
    ap.add_argument("--out", default="tests/fixtures/fmnist_sample.safetensors")
    ap.add_argument("--labels", default="7,3")
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, md = load_diffit(args.diffit, "cpu")
    d = json.loads(md["defaults"])
    y = torch.tensor([int(v) for v in args.labels.split(",")], dtype=torch.int64)
    b, s = len(y), d["steps"]
    shape = (b, model.in_channels, model.grid * model.patch, model.grid * model.patch)
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.randn(shape, generator=gen)
    if d["sampler"] == "ddpm":
        noise = torch.randn((s, *shape), generator=gen)
    else:
        noise = torch.zeros((s, *shape))
    used = []
    final = sample(model, z, y, s, d["sampler"], d["guidance_scale"], d["guidance_schedule"],
                   noise_fn=lambda k: (used.append(k), noise[k])[1])
    sha = hashlib.sha256(open(args.diffit, "rb").read()).hexdigest()
    meta = {"steps": str(s), "sampler": d["sampler"], "guidance_scale": str(d["guidance_scale"]),
            "guidance_schedule": d["guidance_schedule"], "model": os.path.basename(args.diffit),
            "model_sha256": sha, "seed": str(args.seed),
            "note": "noise[k] is the draw used at iteration k (k=0 noisiest); "
                    f"iterations that drew noise: {len(used)} of {s}. PyTorch float32 on CPU."}
    save_file({"z": z.contiguous(), "noise": noise.contiguous(), "y": y,
               "final": final.contiguous()}, args.out, metadata=meta)
    print(json.dumps(meta, indent=1))
    print("final norm", final.norm().item(), "range", final.min().item(), final.max().item())


if __name__ == "__main__":
    main()
