#!/usr/bin/env bash
# The whole training run, as executed on one H100 (see weights/README.md). Seeded; every
# stage appends to training/logs/train.jsonl. Knobs (environment): VAE_STEPS, DIFFIT_STEPS,
# DIFFIT_BATCH, CLS_EPOCHS, PER_CLASS, QUICK=1 (smoke test), COMPILE=1, OUTDIR (weights),
# CLS_OUT (classifier file). The recorded run: OUTDIR=/tmp/w CLS_OUT=/tmp/w/classifier.safetensors.
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
DATA=${FMNIST_DIR:-.carry/fashion-mnist}
W=${OUTDIR:-weights}
CLS=${CLS_OUT:-training/classifier.safetensors}
mkdir -p "$W" training/logs
rm -f training/logs/train.jsonl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import torch, safetensors, PIL; print('torch', torch.__version__, 'safetensors', safetensors.__version__, 'PIL', PIL.__version__)"

python3 training/train_vae.py --data "$DATA" --out "$W/vae_fmnist.safetensors" --steps "${VAE_STEPS:-2500}"
python3 training/classifier.py --data "$DATA" --out "$CLS" --epochs "${CLS_EPOCHS:-10}"
python3 training/train_diffit.py --data "$DATA" --vae "$W/vae_fmnist.safetensors" \
    --out "$W/diffit_fmnist.safetensors" --steps "${DIFFIT_STEPS:-6500}" \
    --batch "${DIFFIT_BATCH:-1024}" ${COMPILE:+--compile} --max-seconds "${DIFFIT_MAX_SECONDS:-300}"
python3 training/choose_defaults.py --data "$DATA" --diffit "$W/diffit_fmnist.safetensors" \
    --vae "$W/vae_fmnist.safetensors" --classifier "$CLS" \
    --per-class "${PER_CLASS:-100}" ${QUICK:+--quick} --grid training/logs/samples_grid.png
echo "run_device.sh: total ${SECONDS}s"
