#!/usr/bin/env bash
# The accelerator figures README records, in one run on a machine with a GPU (or TPU): ResNet-50,
# EfficientNet-Lite0 and ViT-S/16 in bf16 at batch 256: the train step and end to end (images/s), forward
# (images/s), and the compiled step's memory analysis. Run from the repository root after the README's install:
#
#     JAXTL_DATA_DIR=../shared/data [WORKERS=16] bash benchmarks/accelerator.sh > accelerator.txt
#
# Every command prints its own table and JSON lines; nothing here needs PyTorch (train_throughput runs with
# --no-torch; forward.py's PyTorch column uses the GPU only where torch sees one). Targets (issue 18): ResNet-50
# train step >= 3,000 images/s, end to end within 10% of it.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
workers=${WORKERS:-$(nproc)}
models=resnet50,efficientnet_lite0,vit_s16
"$python" -c "import jax; print(jax.__version__, jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
# train step, end to end from JPEGs (worker processes) and from the decoded cache at the input size
"$python" benchmarks/train_throughput.py --models "$models" --batch-size 256 --iters 10 --no-torch --workers "$workers"
"$python" benchmarks/train_throughput.py --models "$models" --batch-size 256 --iters 10 --no-torch --workers "$workers" \
    --decoded
# forward, float32 and bf16
"$python" benchmarks/forward.py --models "$models" --batch-size 256 --iters 10
# saved activations per image and the compiled step's memory at batch 256, with and without rematerialisation
"$python" benchmarks/step_memory.py --models "$models" --batch-size 256 --remat none,blocks
# the input pipeline alone on this host's cores
"$python" benchmarks/input_pipeline.py
