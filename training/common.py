"""Small helpers shared by the training scripts."""

import json
import os
import random
import time

import numpy as np
import torch
from safetensors.torch import save_file

LICENCE = ("Apache-2.0 (these weights, like the diffit-server repository); trained on "
           "Fashion-MNIST, (c) Zalando SE, MIT licence")
DATASET = ("Fashion-MNIST train split (60,000 28x28 gray images, 10 classes; Debian package "
           "dataset-fashion-mnist), zero-padded to 32x32, scaled to [-1, 1]")


def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name=None):
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def setup_cuda():
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def autocast(device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def save_weights(path, state_dict, metadata):
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu()
        tensors[k] = v.contiguous() if not v.is_floating_point() else v.float().contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path, metadata={k: (v if isinstance(v, str) else json.dumps(v))
                                       for k, v in metadata.items()})


class Log:
    """Prints a line and appends the record, as JSON, to a .jsonl file."""

    def __init__(self, path, stage):
        self.path, self.stage, self.t0 = path, stage, time.time()
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def __call__(self, **rec):
        rec = {"stage": self.stage, "elapsed_s": round(time.time() - self.t0, 2), **rec}
        print(json.dumps(rec), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def cosine_lr(step, total, base, warmup, final_frac=0.1):
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + np.cos(np.pi * min(1.0, p))))


def param_count(module):
    return sum(p.numel() for p in module.parameters())
