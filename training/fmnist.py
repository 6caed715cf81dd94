"""Fashion-MNIST loading: the raw IDX files (as Debian's `dataset-fashion-mnist` installs them) to
32x32 tensors in [-1, 1], zero-padded 2 pixels on each side (background stays black = -1)."""

import gzip
import os

import numpy as np
import torch

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"

CLASS_NAMES = [
    ["T-shirt/top", "T-shirt", "top", "tee"],
    ["Trouser", "trousers", "pants"],
    ["Pullover", "sweater", "jumper"],
    ["Dress"],
    ["Coat", "jacket"],
    ["Sandal"],
    ["Shirt"],
    ["Sneaker", "trainer"],
    ["Bag", "handbag"],
    ["Ankle boot", "boot"],
]

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()
    return arr.reshape(dims)


def find_data_dir(explicit=None, split="train"):
    """The first of these directories that holds `split`'s images."""
    for d in [explicit, os.environ.get("FMNIST_DIR"), ".carry/fashion-mnist", DEFAULT_DIR]:
        if d and os.path.isfile(os.path.join(d, _FILES[split][0])):
            return d
    raise FileNotFoundError(
        "Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or pass --data DIR"
    )


def load_split(split, data_dir=None, limit=None):
    """Returns (images uint8 [N,28,28], labels int64 [N]) as numpy arrays."""
    d = find_data_dir(data_dir, split)
    imgs = _read_idx(os.path.join(d, _FILES[split][0]))
    labels = _read_idx(os.path.join(d, _FILES[split][1])).astype(np.int64)
    if limit:
        imgs, labels = imgs[:limit], labels[:limit]
    return imgs, labels


def to_model_space(u8):
    """uint8 [N,28,28] (or [N,32,32]) -> float32 tensor [N,1,32,32] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(u8)).float().div(127.5).sub(1.0)
    if x.shape[-1] == 28:
        x = torch.nn.functional.pad(x, (2, 2, 2, 2), value=-1.0)
    return x.unsqueeze(1)


def load_tensors(split, data_dir=None, limit=None, device="cpu"):
    imgs, labels = load_split(split, data_dir, limit)
    return to_model_space(imgs).to(device), torch.from_numpy(labels).to(device)
