#!/usr/bin/env bash
# The checks of the training path on a GPU machine, in one run:
#   1. training speed at 256 px, batch 64: data alone, model alone, full pipeline (images/s) and
#      the full pipeline's ratio to the slower of the two (bench/training.py --device cuda);
#   2. with two or more GPUs: torchrun on every GPU, NCCL and synchronised batch norm, two epochs of
#      the built-in demo category, then the same run resumed (it must skip the finished run);
#   3. with DATA_DIR (the folder that holds magnetic_tile/, written by
#      `python -m self_sup_data.magnetic_tile SRC DATA_DIR`): magnetic tile at the paper's budget
#      (256 px, 320 epochs, batch 64) with its wall time and evaluation table.
#
#     bash bench/gpu_check.sh [DATA_DIR] [OUT]
#
# A second run into the same OUT trains and measures again (--force), replacing the first's models.
#
# Knobs (environment): EPOCHS (320), STEPS (30), WORKERS (CPUs - 1), DEVICE (cuda), SIZE (256),
# BATCH (64), RES_SCALE (1; magnetic tile's images are 256 px). With DEVICE=cpu and small values
# it runs on a CPU too (a check of the script itself).
set -euo pipefail
DATA_DIR=${1:+$(realpath "$1")}
OUT=$(realpath -m "${2:-$(dirname "$0")/../bench_out/gpu_check}")
cd "$(dirname "$0")/.."
EPOCHS=${EPOCHS:-320}
STEPS=${STEPS:-30}
WORKERS=${WORKERS:-$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-256}
BATCH=${BATCH:-64}
RES_SCALE=${RES_SCALE:-1}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

# the versions and GPUs, then (last line) the number of GPUs: one start of PyTorch
SYSTEM=$(python - "$DEVICE" <<'EOF'
import sys, torch
device = sys.argv[1]
print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)')
for i in range(torch.cuda.device_count()):
    print(f'  {i}: {torch.cuda.get_device_name(i)}, bf16: {torch.cuda.is_bf16_supported()}')
if device.startswith('cuda') and not torch.cuda.is_available():
    sys.exit(f'bench/gpu_check.sh: no CUDA device (torch {torch.__version__}, CUDA '
             f'{torch.version.cuda}); DEVICE=cpu runs the script on the CPU')
print(torch.cuda.device_count())
EOF
)
echo "${SYSTEM%$'\n'*}"
GPUS=${SYSTEM##*$'\n'}

echo "== 1. training speed, ${SIZE} px, batch ${BATCH}, ${WORKERS} workers"
python bench/training.py --device "$DEVICE" --size "$SIZE" --batch-size "$BATCH" \
    --workers "$WORKERS" --steps "$STEPS" | tee "$OUT/training_speed.txt"

if [ "$GPUS" -ge 2 ]; then
    echo "== 2. torchrun on $GPUS GPUs, demo category, 2 epochs, then resumed"
    python -m self_sup_data.demo "$OUT/demo_data"
    for attempt in force resume; do  # --force: a run again into the same OUT trains again
        torchrun --standalone --nproc-per-node "$GPUS" train_mvtec.py -s Shift-Intensity \
            -d "$OUT/demo_data" -n demo_texture -o "$OUT/torchrun" --epochs 2 \
            --batch-size $(( 8 * GPUS )) --workers 2 --no-figures --$attempt \
            2>&1 | tee "$OUT/torchrun_$attempt.txt"
    done
else
    echo "== 2. torchrun: skipped (one GPU; the two-process path is tested on the CPU with gloo)"
fi

if [ -n "$DATA_DIR" ]; then
    echo "== 3. magnetic tile, ${EPOCHS} epochs, batch ${BATCH}, res-scale ${RES_SCALE}"
    start=$(date +%s)
    python train_mvtec.py -s Shift-Intensity-M -d "$DATA_DIR" -n magnetic_tile \
        -o "$OUT/magnetic_tile" --res-scale "$RES_SCALE" --epochs "$EPOCHS" --batch-size "$BATCH" \
        --workers "$WORKERS" --device "$DEVICE" --no-figures --no-progress --evaluate --force \
        2>&1 | tee "$OUT/magnetic_tile.txt"
    echo "magnetic tile: wall time $(( $(date +%s) - start )) s (training, evaluation and start)" \
        | tee -a "$OUT/magnetic_tile.txt"
fi
