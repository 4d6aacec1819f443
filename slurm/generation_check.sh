#!/usr/bin/env bash
# Check generation on a GPU node in about 10 minutes, from the repo alone, with no arguments:
#   bash slurm/generation_check.sh          # or: sbatch --gres=gpu:1 --time=00:15:00 slurm/generation_check.sh
# 1. writes the study-sized phantom (11,460 + 660 + 540 slices in data/study, once);
# 2. trains the VQ-VAE at train.py's defaults for GEN_CHECK_VQ_MINUTES (default 3);
# 3. trains the prior at the defaults on its codes for GEN_CHECK_PRIOR_MINUTES (default 4);
# 4. draws 256 samples and prints sample.py's measures, with the card's name.
# Everything it prints is also in runs/generation_check-<time>-<pid>/log.txt, beside the two runs' folders.
# GEN_CHECK_DATA, GEN_CHECK_ARGS (options of both stages) and GEN_CHECK_SAMPLE_ARGS let a test run it small on a CPU.
#SBATCH --job-name=vqvae-gen-check
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=00:15:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
OUT=runs/generation_check-$(date +%Y%m%d-%H%M%S)-$$
DATA=${GEN_CHECK_DATA:-data/study}
ARGS=${GEN_CHECK_ARGS:-}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
python -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available()
           else 'no GPU: these are CPU numbers')"
[ -n "${GEN_CHECK_DATA:-}" ] || python -c "import phantom; phantom.ensure_demo(phantom.STUDY_ROOT, phantom.STUDY_SIZES)"
SECONDS=0
python train.py --data_dir="$DATA" --time_limit_minutes="${GEN_CHECK_VQ_MINUTES:-3}" --out_dir="$OUT/vqvae" $ARGS
python train.py --stage=prior --vqvae_checkpoint="$OUT/vqvae/best_model.pt" --out_dir="$OUT/prior" \
    --time_limit_minutes="${GEN_CHECK_PRIOR_MINUTES:-4}" $ARGS
python sample.py --prior_checkpoint="$OUT/prior/best_prior.pt" ${GEN_CHECK_SAMPLE_ARGS:-}
echo "generation check: $SECONDS s in all; log: $OUT/log.txt"
