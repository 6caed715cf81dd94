"""Scores generated images with the classifier of classifier.py:

* accuracy: how often the classifier's prediction equals the requested class;
* FD: the Frechet distance between the classifier's 128-d penultimate features of the images
  and of the Fashion-MNIST test split (10,000 images), printed next to the same distance for
  1,000 real training images (seeded random pick), the floor that a perfect generator of the
  same sample size would reach.

    python3 training/evaluate.py --images DIR [--manifest DIR/manifest.json] [--out report.json]

The manifest maps file names (relative to DIR) to the requested class, as an index 0-9 or a
class name ({"img_0001.png": 7, "b.png": "Sneaker"}). Without one, every *.png in DIR is used
with the class recorded in its tEXt chunk `class_label` (what the server writes).
Images must be 32x32 gray (RGB is converted to gray); 28x28 ones are padded like the training data.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fmnist import CLASS_NAMES, load_split, load_tensors, to_model_space  # noqa: E402
from models import Classifier  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def load_classifier(path=os.path.join(HERE, "classifier.safetensors"), device="cpu"):
    from safetensors.torch import load_file

    model = Classifier()
    model.load_state_dict(load_file(path), strict=True)
    return model.to(device).eval()


@torch.no_grad()
def features_and_predictions(model, x, batch=1000):
    """x: [N,1,32,32] in [-1,1]. Returns (float64 numpy features [N,128], int predictions [N])."""
    feats, preds = [], []
    dev = next(model.parameters()).device
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(dev).float()
        f = model.penultimate(xb)
        feats.append(f.double().cpu())
        preds.append(model.head(f).argmax(1).cpu())
    return torch.cat(feats).numpy(), torch.cat(preds).numpy()


def _sqrtm_psd(m):
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(f1, f2):
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2), in float64."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = _sqrtm_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


class Reference:
    """Test-split features and the real-data baseline, computed once (or loaded from an .npz
    written by `save`, so that a machine without the data set can score samples)."""

    FIELDS = ("test_feats", "test_accuracy", "real_fd", "real_accuracy", "n_real")

    def __init__(self, model=None, data_dir=None, n_real=1000, seed=0, path=None):
        if path is not None:
            z = np.load(path)
            for k in self.FIELDS:
                setattr(self, k, z[k] if k == "test_feats" else z[k].item())
            return
        xt, yt = load_tensors("test", data_dir)
        self.test_feats, preds = features_and_predictions(model, xt)
        self.test_accuracy = float((preds == yt.numpy()).mean())
        imgs, labels = load_split("train", data_dir)
        pick = np.random.default_rng(seed).choice(len(imgs), n_real, replace=False)
        real = to_model_space(imgs[pick])
        f, p = features_and_predictions(model, real)
        self.real_fd = frechet_distance(f, self.test_feats)
        self.real_accuracy = float((p == labels[pick]).mean())
        self.n_real = n_real

    def save(self, path):
        np.savez(path, **{k: getattr(self, k) for k in self.FIELDS})


def score(model, ref, images, labels):
    """images [N,1,32,32] in [-1,1], labels [N] (requested classes)."""
    f, p = features_and_predictions(model, images)
    labels = np.asarray(labels)
    per_class = {CLASS_NAMES[c][0]: float((p[labels == c] == c).mean())
                 for c in range(len(CLASS_NAMES)) if (labels == c).any()}
    return {"n": int(len(labels)), "accuracy": float((p == labels).mean()),
            "fd_vs_test": frechet_distance(f, ref.test_feats),
            "per_class_accuracy": per_class}


def parse_class(v):
    if isinstance(v, int) or (isinstance(v, str) and v.strip().isdigit()):
        return int(v)
    key = str(v).strip().lower()
    for i, names in enumerate(CLASS_NAMES):
        if key in (n.lower() for n in names):
            return i
    raise ValueError(f"unknown class {v!r}")


def load_images(directory, manifest=None):
    from PIL import Image

    if manifest is None and os.path.isfile(os.path.join(directory, "manifest.json")):
        manifest = os.path.join(directory, "manifest.json")
    if manifest:
        entries = json.load(open(manifest))
        items = [(os.path.join(directory, k), parse_class(v)) for k, v in sorted(entries.items())]
    else:
        items = []
        for name in sorted(os.listdir(directory)):
            if name.lower().endswith(".png"):
                path = os.path.join(directory, name)
                text = Image.open(path).text
                if "class_label" not in text:
                    raise ValueError(f"{path}: no manifest entry and no class_label tEXt chunk")
                items.append((path, parse_class(text["class_label"])))
    arrays = []
    for path, _ in items:
        a = np.asarray(Image.open(path).convert("L"), dtype=np.uint8)
        if a.shape not in ((32, 32), (28, 28)):
            raise ValueError(f"{path}: image is {a.shape}, expected 32x32 (or 28x28)")
        if a.shape == (28, 28):
            a = np.pad(a, 2)
        arrays.append(a)
    return to_model_space(np.stack(arrays)), np.array([c for _, c in items])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default=None)
    ap.add_argument("--manifest", default=None)
    ap.add_argument("--classifier", default=os.path.join(HERE, "classifier.safetensors"))
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--reference", default=None,
                    help="cached reference (.npz from --save-reference) instead of the data set")
    ap.add_argument("--save-reference", default=None, help="write the reference to this .npz and exit")
    ap.add_argument("--device", default=None)
    args = ap.parse_args()
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_classifier(args.classifier, dev)
    if args.save_reference:
        Reference(model, args.data).save(args.save_reference)
        return
    if args.images is None:
        ap.error("--images is required")
    x, y = load_images(args.images, args.manifest)
    ref = Reference(path=args.reference) if args.reference else Reference(model, args.data)
    report = score(model, ref, x, y)
    report.update(fd_real_train_vs_test=ref.real_fd, real_train_n=ref.n_real,
                  real_train_accuracy=ref.real_accuracy, classifier_test_accuracy=ref.test_accuracy)
    print(json.dumps(report, indent=1))
    if args.out:
        json.dump(report, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
