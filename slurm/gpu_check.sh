#!/usr/bin/env bash
# Check a GPU node before booking hours on it, from the repo alone, with no arguments:
#   bash slurm/gpu_check.sh                 # or: sbatch --gres=gpu:1 --time=00:15:00 slurm/gpu_check.sh
# 1. prepares the study-sized phantom (11,460 + 660 + 540 slices in data/study, cached after the first time);
# 2. prints bench.py's table at train.py's defaults and at batch 8, each with torch.compile off and on;
# 3. trains the study-sized run at the defaults for GPU_CHECK_MINUTES (default 3) and projects all n_epochs.
# Everything it prints is also in runs/gpu_check-<time>-<pid>/log.txt, beside that training run's folder.
#SBATCH --job-name=vqvae-check
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=00:15:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
MINUTES=${GPU_CHECK_MINUTES:-3}
STEPS=${GPU_CHECK_BENCH_STEPS:-20}   # timed steps per bench table
OUT=runs/gpu_check-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
python -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|',
           torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU: timings are the CPU')"
python -c "import phantom; phantom.ensure_demo(phantom.STUDY_ROOT, phantom.STUDY_SIZES)"
for args in "" "--compile=True" "--batch_size=8" "--batch_size=8 --compile=True"; do
    echo; echo "== python bench.py $args"
    python bench.py $args --steps="$STEPS" --sample_n=0
done
echo; echo "== python train.py --data_dir=data/study --time_limit_minutes=$MINUTES"
python train.py --data_dir=data/study --time_limit_minutes="$MINUTES" --out_dir="$OUT/train"
python - "$OUT/train" <<'EOF'
import csv, json, math, sys
import checkpoints
run = sys.argv[1]
rows = list(csv.DictReader(open(f"{run}/metrics.csv")))
cfg = checkpoints.load(f"{run}/best_model.pt", "vqvae")["config"]
n_train = len(json.load(open(f"{run}/splits.json"))["train"])
per_epoch = math.ceil(n_train / cfg["batch_size"])
steps, secs = int(rows[-1]["steps"]), sum(float(r["seconds"]) for r in rows)
full = [float(r["seconds"]) for i, r in enumerate(rows) if int(r["steps"]) == (i + 1) * per_epoch]
# the first epoch carries warm-up (and compilation): the projection uses the later full epochs where there are
# any, else the time limit over the steps it allowed (validation not included)
epoch_s = sum(full[1:]) / len(full[1:]) if len(full) > 1 else cfg["time_limit_minutes"] * 60 / steps * per_epoch
print(f"{steps} steps ({steps / per_epoch:.2f} epochs of {per_epoch} steps) in {secs:.0f} s; "
      f"validation SSIM {float(rows[-1]['val_ssim']):.4f}")
print(f"projected: {cfg['n_epochs']} epochs in {cfg['n_epochs'] * epoch_s / 60:.1f} min "
      f"({epoch_s:.1f} s per epoch, from {'the full epochs after the first' if len(full) > 1 else 'the time limit'})")
EOF
echo "log: $OUT/log.txt"
