# The generation demo on a CPU, after config/cpu.py: a VQ-VAE with 128 codes, whose grids a prior models more
# easily than 512 codes' (README, Generation), then the prior at the sizes a CPU trains in minutes.
#   python train.py config/cpu.py config/demo_generation.py --time_limit_minutes=3 --out_dir=runs/gen-vqvae
#   python train.py config/cpu.py config/demo_generation.py --stage=prior --vqvae_checkpoint=runs/gen-vqvae/best_model.pt --time_limit_minutes=8.5 --out_dir=runs/gen-prior
n_embeddings = 128
