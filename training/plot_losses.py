"""Draws training/loss_curves.png from training/logs/train.jsonl (needs matplotlib)."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

src = sys.argv[1] if len(sys.argv) > 1 else "training/logs/train.jsonl"
dst = sys.argv[2] if len(sys.argv) > 2 else "training/loss_curves.png"
recs = [json.loads(line) for line in open(src)]
vae = [r for r in recs if r["stage"] == "vae" and "step" in r]
dit = [r for r in recs if r["stage"] == "diffit" and "step" in r]
cls = [r for r in recs if r["stage"] == "classifier" and "epoch" in r]

fig, ax = plt.subplots(1, 4, figsize=(18, 4))
ax[0].plot([r["step"] for r in vae], [r["l1"] for r in vae], label="L1")
ax[0].plot([r["step"] for r in vae], [r["mse"] for r in vae], label="MSE")
ax[0].set_yscale("log"); ax[0].set_title("VAE reconstruction"); ax[0].set_xlabel("step"); ax[0].legend()
ax[1].plot([r["step"] for r in dit], [r["mse"] for r in dit])
ax[1].set_yscale("log"); ax[1].set_title("DiffiT eps MSE (200-step means)"); ax[1].set_xlabel("step")
ax[2].plot([r["step"] for r in dit], [r["vb"] for r in dit])
ax[2].set_title("DiffiT L_t term (bits/dim)"); ax[2].set_xlabel("step")
ax[3].plot([r["epoch"] for r in cls], [r["test_acc"] for r in cls], marker="o")
ax[3].set_title("classifier test accuracy"); ax[3].set_xlabel("epoch")
fig.tight_layout()
fig.savefig(dst, dpi=80)
print("wrote", dst)
