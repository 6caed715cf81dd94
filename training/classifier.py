"""Trains the small CNN used to score generated images (class accuracy and the Frechet distance
of its 128-d penultimate features), on the Fashion-MNIST train split at the same 32x32 padding.

    python3 training/classifier.py --out training/classifier.safetensors
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import LICENCE, Log, param_count, pick_device, save_weights, seed_all, setup_cuda  # noqa: E402
from fmnist import load_tensors  # noqa: E402
from models import Classifier  # noqa: E402


def augment(x, gen, cpu_gen):
    """Random horizontal flip per image and a random shift of up to 2 pixels per batch
    (background -1)."""
    b = x.shape[0]
    flip = torch.rand(b, device=x.device, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    pad = F.pad(x, (2, 2, 2, 2), value=-1.0)
    dx, dy = torch.randint(0, 5, (2,), generator=cpu_gen).tolist()
    return pad[:, :, dy:dy + 32, dx:dx + 32]


@torch.no_grad()
def accuracy(model, x, y, batch=2000):
    correct = 0
    for i in range(0, len(x), batch):
        correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / len(x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default="training/classifier.safetensors")
    ap.add_argument("--log", default="training/logs/train.jsonl")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--device", default=None)
    args = ap.parse_args()

    seed_all(args.seed)
    setup_cuda()
    dev = pick_device(args.device)
    log = Log(args.log, "classifier")
    x, y = load_tensors("train", args.data, args.limit, dev)
    xt, yt = load_tensors("test", args.data, args.limit, dev)
    model = Classifier().to(dev)
    steps_per_epoch = max(1, len(x) // args.batch)
    total = args.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total)
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    cpu_gen = torch.Generator().manual_seed(args.seed)
    log(event="start", params=param_count(model), epochs=args.epochs)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x), device=dev, generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * args.batch:(s + 1) * args.batch]
            loss = F.cross_entropy(model(augment(x[idx], gen, cpu_gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        log(epoch=epoch + 1, loss=round(loss.item(), 4), test_acc=round(accuracy(model, xt, yt), 4))
    acc = accuracy(model.eval(), xt, yt)
    log(event="done", test_accuracy=acc, train_seconds=round(time.time() - t0, 1))
    save_weights(args.out, model.state_dict(), {
        "test_accuracy": f"{acc:.4f}", "seed": str(args.seed), "epochs": str(args.epochs),
        "input": "1x32x32 in [-1,1] (28x28 Fashion-MNIST padded with -1)",
        "features": json.dumps({"penultimate": Classifier.FEATURES}), "licence": LICENCE})
    log(event="saved", path=args.out, bytes=os.path.getsize(args.out))


if __name__ == "__main__":
    main()
