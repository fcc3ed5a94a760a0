#!/usr/bin/env bash
# The one prepared GPU measurement for a device lease. Parts (default: all), in order:
#   step  the train-step table of benchmarks/train_step.py: cheap cases without compile, ResNet-50, then the
#         compiled default ViT-S/16 SimPool step (~6.5 min on an H200);
#   e2e   end-to-end training from a JPEG folder, GPU and CPU multi-crop (benchmarks/train_e2e.py, ~4-6 min:
#         the GPU pipeline compiles first).
#   profile  torch.profiler over the default ViT-S/16 SimPool step, compiled and not (benchmarks/profile_step.py,
#         ~3 min): which operators the step's time goes to.
# The parts together exceed one 10-minute device call: run them as separate calls, e.g.
#   OUT=$OUT bash benchmarks/gpu_check.sh e2e          # results land in $OUT
set -uo pipefail
OUT=${OUT:-/tmp/simpool_gpu}
PARTS=${*:-step e2e profile}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)" | tee -a "$OUT/gpu.txt"
nproc | sed 's/^/cpu cores: /' | tee -a "$OUT/gpu.txt"
if [[ " $PARTS " == *" step "* ]]; then
  timeout 120 python3 benchmarks/train_step.py --cases vit_small_official convnext_small_simpool vit_small_simpool \
      --no_compile vit_small_official convnext_small_simpool vit_small_simpool --steps 15 --warmup 3 \
      --reference_precision fp16 --json "$OUT/step_nocompile.json" 2>&1 | tee "$OUT/step_nocompile.txt"
  timeout 60 python3 benchmarks/train_step.py --cases resnet50_simpool --no_compile resnet50_simpool --steps 15 \
      --warmup 3 --reference_precision fp32 --json "$OUT/step_resnet.json" 2>&1 | tee "$OUT/step_resnet.txt"
  timeout 200 python3 benchmarks/train_step.py --cases vit_small_simpool --steps 30 --warmup 4 \
      --reference_precision fp16 --json "$OUT/step_compiled.json" 2>&1 | tee "$OUT/step_compiled.txt"
fi
if [[ " $PARTS " == *" e2e "* ]]; then
  timeout 540 python3 benchmarks/train_e2e.py --steps 100 --warmup_steps 50 --timeout 260 \
      --json "$OUT/e2e.json" 2>&1 | tee "$OUT/e2e.txt"
fi
if [[ " $PARTS " == *" profile "* ]]; then
  timeout 100 python3 benchmarks/profile_step.py --case vit_small_simpool --no_compile --trace "$OUT/trace_nocompile.json" \
      2>&1 | tee "$OUT/profile_nocompile.txt"
  timeout 200 python3 benchmarks/profile_step.py --case vit_small_simpool 2>&1 | tee "$OUT/profile_compiled.txt"
fi
