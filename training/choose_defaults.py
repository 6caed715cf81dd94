"""Picks the server's default sampling settings for the trained model by measurement: for each
candidate (sampler, steps, guidance) it samples 100 images per class (for each of --seeds seeds)
with the server's sampler, decodes them, and scores them with evaluate.py's classifier (means over
the seeds). The winner is written into the DiffiT file's `defaults` metadata.

Rule: only candidates of at most --max-forwards network forwards per image (50 by default: the
server's CPU cost of one default image, measured at about 3.5 CPU-seconds for 100 forwards, must
stay low), and only those whose class accuracy is at least the classifier's accuracy on real test
images; of these the lowest FD to the test split wins, where candidates within 5 % of that FD count
as ties and the cheapest of them wins (fewest network forwards, then lowest FD).

    python3 training/choose_defaults.py --diffit weights/diffit_fmnist.safetensors \
        --vae weights/vae_fmnist.safetensors --classifier training/classifier.safetensors
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from safetensors.torch import load_file, safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import Log, pick_device, save_weights, setup_cuda  # noqa: E402
from diffusion import sample  # noqa: E402
from evaluate import Reference, load_classifier, score  # noqa: E402
from models import DiffiT  # noqa: E402
from train_diffit import load_vae  # noqa: E402

CANDIDATES = [
    ("ddpm", 50, 1.0, "constant"),
    ("ddpm", 50, 1.5, "constant"),
    ("ddpm", 50, 2.0, "constant"),
    ("ddpm", 50, 3.0, "constant"),
    ("ddpm", 50, 4.0, "power-cosine"),
    ("ddim", 50, 2.0, "constant"),
    ("dpm-solver++", 50, 2.0, "constant"),
    ("ddpm", 25, 4.0, "power-cosine"),
    ("ddim", 25, 2.0, "constant"),
    ("dpm-solver++", 25, 1.5, "constant"),
    ("dpm-solver++", 25, 1.75, "constant"),
    ("dpm-solver++", 25, 2.0, "constant"),
    ("dpm-solver++", 25, 2.5, "constant"),
    ("dpm-solver++", 25, 3.0, "constant"),
    ("dpm-solver++", 25, 3.0, "power-cosine"),
    ("dpm-solver++", 25, 4.0, "power-cosine"),
    ("dpm-solver++", 25, 5.0, "power-cosine"),
    ("dpm-solver++", 20, 1.75, "constant"),
    ("dpm-solver++", 20, 2.0, "constant"),
    ("dpm-solver++", 20, 4.0, "power-cosine"),
]


def load_diffit(path, device):
    with safe_open(path, "pt") as f:
        md = f.metadata()
    cfg = json.loads(md["config"])
    model = DiffiT(**cfg)
    model.load_state_dict(load_file(path), strict=True)
    return model.to(device).eval(), md


def to_u8_and_back(decoded):
    """What a PNG holds: clamp((x+1)*127.5, 0, 255) truncated to uint8, back in [-1,1]."""
    u8 = ((decoded.float() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)
    return u8, u8.float() / 127.5 - 1.0


@torch.no_grad()
def generate(model, vae, labels, sampler, steps, scale, schedule, seed, device):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (len(labels), model.in_channels, model.grid * model.patch, model.grid * model.patch)
    z = torch.randn(shape, device=device, generator=gen)
    lat = sample(model, z, labels, steps, sampler, scale, schedule,
                 noise_fn=lambda k: torch.randn(shape, device=device, generator=gen))
    return to_u8_and_back(vae.decode(lat / vae.scaling_factor))


def grid_png(u8, rows, path):
    from PIL import Image

    n, _, h, w = u8.shape
    cols = n // rows
    a = u8[:, 0].cpu().numpy().reshape(rows, cols, h, w).transpose(0, 2, 1, 3).reshape(rows * h, cols * w)
    Image.fromarray(a).save(path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--diffit", default="weights/diffit_fmnist.safetensors")
    ap.add_argument("--vae", default="weights/vae_fmnist.safetensors")
    ap.add_argument("--classifier", default="training/classifier.safetensors")
    ap.add_argument("--data", default=None)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--seeds", type=int, default=2, help="sampling seeds per candidate (averaged)")
    ap.add_argument("--max-forwards", type=int, default=50)
    ap.add_argument("--reference", default=None, help=".npz from evaluate.py --save-reference")
    ap.add_argument("--log", default="training/logs/train.jsonl")
    ap.add_argument("--table", default="training/logs/defaults_eval.json")
    ap.add_argument("--grid", default=None, help="write a 10x10 sample grid PNG with the defaults")
    ap.add_argument("--quick", action="store_true", help="only two candidates (smoke tests)")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    setup_cuda()
    torch.backends.cuda.matmul.allow_tf32 = False  # sample in true fp32, like the server
    torch.backends.cudnn.allow_tf32 = False
    dev = pick_device(args.device)
    log = Log(args.log, "defaults")
    model, md = load_diffit(args.diffit, dev)
    vae = load_vae(args.vae, dev)
    clf = load_classifier(args.classifier, dev)
    ref = Reference(path=args.reference) if args.reference else Reference(clf, args.data)
    log(event="reference", classifier_test_accuracy=ref.test_accuracy,
        fd_real1000_train_vs_test=ref.real_fd, real1000_accuracy=ref.real_accuracy)
    nc = model.num_classes
    labels = torch.arange(nc, device=dev).repeat_interleave(args.per_class)
    rows = []
    for sampler, steps, scale, schedule in (CANDIDATES[:2] if args.quick else CANDIDATES):
        t0 = time.time()
        scores = []
        for k in range(args.seeds):
            _, imgs = generate(model, vae, labels, sampler, steps, scale, schedule, args.seed + k, dev)
            scores.append(score(clf, ref, imgs, labels.cpu().numpy()))
        cost = steps * (2 if scale != 1.0 else 1)
        row = dict(sampler=sampler, steps=steps, guidance_scale=scale, guidance_schedule=schedule,
                   forwards_per_image=cost,
                   accuracy=round(float(np.mean([r["accuracy"] for r in scores])), 4),
                   fd_vs_test=round(float(np.mean([r["fd_vs_test"] for r in scores])), 4),
                   fd_per_seed=[round(r["fd_vs_test"], 4) for r in scores],
                   seconds=round(time.time() - t0, 1))
        rows.append(row)
        log(event="candidate", **row)

    cheap = [r for r in rows if r["forwards_per_image"] <= args.max_forwards] or rows
    ok = [r for r in cheap if r["accuracy"] >= ref.test_accuracy] or \
        [max(cheap, key=lambda r: r["accuracy"])]
    best_fd = min(r["fd_vs_test"] for r in ok)
    ties = [r for r in ok if r["fd_vs_test"] <= 1.05 * best_fd]
    win = min(ties, key=lambda r: (r["forwards_per_image"], r["fd_vs_test"]))
    defaults = {"steps": win["steps"], "sampler": win["sampler"],
                "guidance_scale": win["guidance_scale"], "guidance_schedule": win["guidance_schedule"]}
    log(event="chosen", defaults=defaults, accuracy=win["accuracy"], fd_vs_test=win["fd_vs_test"])

    md = dict(md, defaults=json.dumps(defaults),
              evaluation=json.dumps({"defaults_accuracy": win["accuracy"],
                                     "defaults_fd_vs_test": win["fd_vs_test"],
                                     "real1000_fd_vs_test": round(ref.real_fd, 4),
                                     "classifier_test_accuracy": ref.test_accuracy,
                                     "n": len(labels), "seeds": args.seeds}))
    save_weights(args.diffit, load_file(args.diffit), md)
    os.makedirs(os.path.dirname(os.path.abspath(args.table)), exist_ok=True)
    json.dump({"reference": {"classifier_test_accuracy": ref.test_accuracy,
                             "fd_real1000_train_vs_test": ref.real_fd,
                             "real1000_accuracy": ref.real_accuracy},
               "rule": {"max_forwards": args.max_forwards, "min_accuracy": ref.test_accuracy,
                        "fd_tie": 1.05, "n_per_seed": len(labels), "seeds": args.seeds},
               "candidates": rows, "chosen": defaults}, open(args.table, "w"), indent=1)
    if args.grid:
        lab = torch.arange(nc, device=dev).repeat_interleave(10)
        u8, _ = generate(model, vae, lab, defaults["sampler"], defaults["steps"],
                         defaults["guidance_scale"], defaults["guidance_schedule"], 7, dev)
        grid_png(u8, nc, args.grid)


if __name__ == "__main__":
    main()
