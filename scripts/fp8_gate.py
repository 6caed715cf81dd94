"""The FP8 quality gate's scoring (run by scripts/fp8-gate.sh on the GPU machine).

    python3 scripts/fp8_gate.py --dir OUT --base bf16 --runs fp8 fp8-edge1 [--data DIR] [--json F]

Each run is a folder OUT/<run> of PNGs named c<class>-s<seed>-<i>.png (what fp8-gate.sh has
`generate` write), the same file names in every run (same classes and seeds). For each run: the
classifier's accuracy on the requested classes and the Frechet distance of its features to the
Fashion-MNIST test split (training/evaluate.py's measures), and for each non-base run the
per-image PSNR against the base run's image of the same name. The gate: accuracy within 1 point
of the base and FD within 15 % of the base's. Prints a table; exits 1 if a run fails the gate.
"""

import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "training"))
from evaluate import features_and_predictions, frechet_distance, load_classifier  # noqa: E402
from fmnist import load_tensors, to_model_space  # noqa: E402

# The gate (issue 15): FP8 keeps accuracy within 1 point and FD within 15 % of bf16's.
MAX_ACCURACY_DROP = 0.01
MAX_FD_RATIO = 1.15


def load_run(directory):
    from PIL import Image

    names = sorted(n for n in os.listdir(directory) if n.endswith(".png"))
    if not names:
        raise SystemExit(f"{directory}: no PNGs")
    pixels = np.stack([np.asarray(Image.open(os.path.join(directory, n)).convert("L")) for n in names])
    labels = np.array([int(n.split("-")[0][1:]) for n in names])
    return names, pixels, labels


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(1, 2))
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10 * np.log10(255.0**2 / np.maximum(mse, 1e-12)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--base", default="bf16")
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--data", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_classifier(device=dev)
    test_x, _ = load_tensors("test", args.data)
    test_feats, _ = features_and_predictions(model, test_x)
    base_names, base_px, _ = load_run(os.path.join(args.dir, args.base))
    report, failed = {}, []
    for run in [args.base] + args.runs:
        names, px, labels = load_run(os.path.join(args.dir, run))
        if names != base_names:
            raise SystemExit(f"{run}: its file names differ from {args.base}'s")
        feats, preds = features_and_predictions(model, to_model_space(px))
        r = {"n": len(names), "accuracy": float((preds == labels).mean()),
             "fd_vs_test": frechet_distance(feats, test_feats)}
        if run != args.base:
            p = psnr(px, base_px)
            finite = p[np.isfinite(p)]
            r["psnr_vs_base"] = {
                "identical_images": int((~np.isfinite(p)).sum()),
                "mean_db_finite": float(finite.mean()) if finite.size else None,
                "median_db": float(np.median(p)),
                "p5_db": float(np.percentile(p, 5)),
                "min_db": float(p.min()),
            }
            b = report[args.base]
            r["gate"] = {"accuracy_drop": b["accuracy"] - r["accuracy"],
                         "fd_ratio": r["fd_vs_test"] / b["fd_vs_test"]}
            r["gate"]["pass"] = bool(r["gate"]["accuracy_drop"] <= MAX_ACCURACY_DROP
                                     and r["gate"]["fd_ratio"] <= MAX_FD_RATIO)
            if not r["gate"]["pass"]:
                failed.append(run)
        report[run] = r
    print("| run | images | accuracy | FD vs test | FD / base | PSNR vs base: mean, median, p5, min dB | gate |")
    print("|---|---|---|---|---|---|---|")
    for run, r in report.items():
        if run == args.base:
            print(f"| {run} | {r['n']} | {r['accuracy']:.3f} | {r['fd_vs_test']:.3f} | 1 | - | base |")
            continue
        p, g = r["psnr_vs_base"], r["gate"]
        mean = "-" if p["mean_db_finite"] is None else f"{p['mean_db_finite']:.1f}"
        print(f"| {run} | {r['n']} | {r['accuracy']:.3f} | {r['fd_vs_test']:.3f} | {g['fd_ratio']:.3f} "
              f"| {mean}, {p['median_db']:.1f}, {p['p5_db']:.1f}, {p['min_db']:.1f} "
              f"| {'pass' if g['pass'] else 'FAIL'} |")
    if args.json:
        json.dump(report, open(args.json, "w"), indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
