"""Trains the class-conditional latent DiffiT on the VAE's Fashion-MNIST latents and exports
its EMA weights with the official key names and the metadata the server reads.

    python3 training/train_diffit.py --vae weights/vae_fmnist.safetensors \
        --out weights/diffit_fmnist.safetensors
"""

import argparse
import copy
import json
import os
import sys
import time

import torch
from safetensors.torch import load_file, safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DATASET, LICENCE, Log, autocast, cosine_lr, param_count, pick_device,  # noqa: E402
                    save_weights, seed_all, setup_cuda)
from diffusion import TrainingTables, hybrid_loss  # noqa: E402
from fmnist import CLASS_NAMES, load_tensors  # noqa: E402
from models import AutoencoderKL, DiffiT  # noqa: E402
from train_vae import encode_all  # noqa: E402

# Provisional defaults; choose_defaults.py replaces them with the measured best.
DEFAULTS = {"steps": 50, "sampler": "ddpm", "guidance_scale": 2.0, "guidance_schedule": "constant"}


def load_vae(path, device):
    with safe_open(path, "pt") as f:
        cfg = json.loads(f.metadata()["config"])
    vae = AutoencoderKL(in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                        block_out_channels=cfg["block_out_channels"],
                        layers_per_block=cfg["layers_per_block"],
                        latent_channels=cfg["latent_channels"],
                        norm_num_groups=cfg["norm_num_groups"],
                        scaling_factor=cfg["scaling_factor"])
    vae.load_state_dict(load_file(path), strict=True)
    return vae.to(device).eval()


def diffit_metadata(model, steps, seed, defaults, extra=None):
    md = {
        "config": json.dumps(model.config),
        "class_names": json.dumps(CLASS_NAMES),
        "defaults": json.dumps(defaults),
        "dataset": DATASET,
        "training_steps": str(steps),
        "seed": str(seed),
        "licence": LICENCE,
        "vae": "vae_fmnist.safetensors",
    }
    md.update(extra or {})
    return md


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--vae", default="weights/vae_fmnist.safetensors")
    ap.add_argument("--out", default="weights/diffit_fmnist.safetensors")
    ap.add_argument("--log", default="training/logs/train.jsonl")
    ap.add_argument("--steps", type=int, default=6500)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--ema", type=float, default=0.9995)
    ap.add_argument("--class-dropout", type=float, default=0.1)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="safety stop; logged if hit (the run is then not the nominal one)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    seed_all(args.seed)
    setup_cuda()
    dev = pick_device(args.device)
    log = Log(args.log, "diffit")

    vae = load_vae(args.vae, dev)
    sf = vae.scaling_factor
    x, labels = load_tensors("train", args.data, args.limit, dev)
    with autocast(dev):
        mean, logvar = encode_all(vae, x)
    std = torch.exp(0.5 * logvar)
    del vae, x

    model = DiffiT(input_size=mean.shape[-1], patch_size=args.patch, in_channels=mean.shape[1],
                   hidden_size=args.hidden, depth=args.depth, num_heads=args.heads,
                   num_classes=len(CLASS_NAMES), learn_sigma=True,
                   class_dropout_prob=args.class_dropout).to(dev)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    log(event="start", params=param_count(model), steps=args.steps, batch=args.batch,
        scaling_factor=sf, latent_shape=list(mean.shape[1:]), device=str(dev), compile=args.compile)
    fwd = torch.compile(model) if args.compile else model
    tabs = TrainingTables(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99),
                            fused=dev.type == "cuda")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    null = model.num_classes
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    sums = dict(loss=0.0, mse=0.0, vb=0.0, n=0)
    t0 = time.time()
    done = args.steps
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr, args.warmup, final_frac=0.1)
        idx = torch.randint(0, len(mean), (args.batch,), device=dev, generator=gen)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, device=dev, generator=gen)) * sf
        y = labels[idx]
        drop = torch.rand(y.shape, device=dev, generator=gen) < args.class_dropout
        y = torch.where(drop, torch.full_like(y, null), y)
        t = torch.randint(0, 1000, (args.batch,), device=dev, generator=gen)
        noise = torch.randn(z.shape, device=dev, generator=gen)
        with autocast(dev):
            mse, vb = hybrid_loss(fwd, tabs, z, y, t, noise)
        loss = mse + vb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        sums["loss"] += loss.detach()
        sums["mse"] += mse.detach()
        sums["vb"] += vb.detach()
        sums["n"] += 1
        if (step + 1) % 200 == 0 or step + 1 == args.steps:
            n = sums.pop("n")
            avg = {k: round((v / n).item(), 5) for k, v in sums.items()}
            log(step=step + 1, **avg, lr=round(opt.param_groups[0]["lr"], 7),
                it_per_s=round((step + 1) / (time.time() - t0), 1))
            sums = dict(loss=0.0, mse=0.0, vb=0.0, n=0)
            if args.max_seconds and time.time() - t0 > args.max_seconds and step + 1 < args.steps:
                done = step + 1
                log(event="stopped_early", step=done, reason="max-seconds")
                break

    log(event="done", train_seconds=round(time.time() - t0, 1), steps=done)
    save_weights(args.out, ema.state_dict(), diffit_metadata(
        ema, done, args.seed, DEFAULTS,
        {"training": json.dumps({"batch": args.batch, "lr": args.lr, "warmup": args.warmup,
                                 "ema": args.ema, "class_dropout": args.class_dropout,
                                 "loss": "eps MSE + L_t (improved-DDPM hybrid, lambda 1e-3)",
                                 "optimizer": "AdamW(0.9, 0.99), wd 0, cosine to 10%",
                                 "latent_scaling_factor": sf})}))
    log(event="saved", path=args.out, bytes=os.path.getsize(args.out))


if __name__ == "__main__":
    main()
