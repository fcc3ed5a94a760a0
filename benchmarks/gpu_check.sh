#!/usr/bin/env bash
# The one prepared GPU measurement (device lease): the train-step table of benchmarks/train_step.py.
# Cheap cases first (no compile), the compiled default ViT-S/16 SimPool step last. Results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/simpool_gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 benchmarks/train_step.py --cases vit_small_official convnext_small_simpool vit_small_simpool \
    --no_compile vit_small_official convnext_small_simpool vit_small_simpool --steps 15 --warmup 3 \
    --reference_precision fp16 --json "$OUT/step_nocompile.json" 2>&1 | tee "$OUT/step_nocompile.txt"
timeout 60 python3 benchmarks/train_step.py --cases resnet50_simpool --no_compile resnet50_simpool --steps 15 \
    --warmup 3 --reference_precision fp32 --json "$OUT/step_resnet.json" 2>&1 | tee "$OUT/step_resnet.txt"
timeout 200 python3 benchmarks/train_step.py --cases vit_small_simpool --steps 30 --warmup 4 \
    --reference_precision fp16 --json "$OUT/step_compiled.json" 2>&1 | tee "$OUT/step_compiled.txt"
