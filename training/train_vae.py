"""Trains the small AutoencoderKL (1-channel 32x32 <-> 4x8x8 latents) on Fashion-MNIST and
exports it in the diffusers key layout with its config (incl. scaling_factor = 1/std of the
training latents) in the safetensors metadata key `config`.

    python3 training/train_vae.py --out weights/vae_fmnist.safetensors
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (DATASET, LICENCE, Log, autocast, cosine_lr, param_count, pick_device,  # noqa: E402
                    save_weights, seed_all, setup_cuda)
from fmnist import load_tensors  # noqa: E402
from models import AutoencoderKL  # noqa: E402


def kl_per_image(mean, logvar):
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


@torch.no_grad()
def encode_all(vae, x, batch=2000):
    means, logvars = [], []
    for i in range(0, len(x), batch):
        m, lv = vae.encode(x[i:i + batch])
        means.append(m.float())
        logvars.append(lv.float())
    return torch.cat(means), torch.cat(logvars)


@torch.no_grad()
def psnr(vae, x, batch=2000):
    err = 0.0
    for i in range(0, len(x), batch):
        m, _ = vae.encode(x[i:i + batch])
        rec = vae.decode(m).clamp(-1, 1)
        err += (rec - x[i:i + batch]).pow(2).mean(dim=(1, 2, 3)).sum().item()
    mse = err / len(x) / 4.0  # [-1,1] -> [0,1] scale
    return 10 * math.log10(1.0 / mse)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="weights/vae_fmnist.safetensors")
    ap.add_argument("--log", default="training/logs/train.jsonl")
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kl-weight", type=float, default=1e-5,
                    help="KL weight relative to the per-image summed reconstruction loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="use only this many images (smoke tests)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    seed_all(args.seed)
    setup_cuda()
    dev = pick_device(args.device)
    log = Log(args.log, "vae")
    x, _ = load_tensors("train", args.data, args.limit, dev)
    xt, _ = load_tensors("test", args.data, args.limit, dev)

    vae = AutoencoderKL().to(dev)
    log(event="start", params=param_count(vae), decoder_params=param_count(vae.decoder) +
        param_count(vae.post_quant_conv), steps=args.steps, batch=args.batch, device=str(dev))
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99),
                            fused=dev.type == "cuda")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    npix = x[0].numel()
    t0 = time.time()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, args.steps, args.lr, warmup=200, final_frac=0.05)
        idx = torch.randint(0, len(x), (args.batch,), device=dev, generator=gen)
        xb = x[idx]
        with autocast(dev):
            mean, logvar = vae.encode(xb)
            z = mean + torch.exp(0.5 * logvar.float()) * torch.randn(mean.shape, device=dev, generator=gen)
            rec = vae.decode(z).float()
        l1 = (rec - xb).abs().mean()
        mse = (rec - xb).pow(2).mean()
        kl = kl_per_image(mean.float(), logvar.float()).mean()
        loss = l1 + mse + args.kl_weight * kl / npix
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == args.steps:
            log(step=step + 1, l1=round(l1.item(), 5), mse=round(mse.item(), 6),
                kl_per_image=round(kl.item(), 2), lr=opt.param_groups[0]["lr"],
                it_per_s=round((step + 1) / (time.time() - t0), 1))

    vae.eval()
    mean, logvar = encode_all(vae, x)
    zs = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, device=dev, generator=gen)
    std = zs.std().item()
    vae.scaling_factor = 1.0 / std
    test_psnr = psnr(vae, xt)
    log(event="done", latent_mean=round(zs.mean().item(), 4), latent_std=round(std, 4),
        posterior_std_mean=round(torch.exp(0.5 * logvar).mean().item(), 4),
        scaling_factor=vae.scaling_factor, test_psnr_db=round(test_psnr, 2),
        train_seconds=round(time.time() - t0, 1))
    cfg = vae.config_json()
    save_weights(args.out, vae.state_dict(), {
        "config": json.dumps(cfg),
        "format": "diffusers AutoencoderKL (decoder + encoder); decode(z / scaling_factor)",
        "dataset": DATASET, "training_steps": str(args.steps), "seed": str(args.seed),
        "licence": LICENCE, "test_psnr_db": f"{test_psnr:.2f}",
    })
    log(event="saved", path=args.out, bytes=os.path.getsize(args.out))


if __name__ == "__main__":
    main()
