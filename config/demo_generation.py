# The generation demo on a CPU, after config/cpu.py (EXPERIMENTS.md, The prior):
#   python train.py config/cpu.py config/demo_generation.py --time_limit_minutes=3 --out_dir=runs/gen-vqvae
#   python train.py config/cpu.py config/demo_generation.py --stage=prior --vqvae_checkpoint=runs/gen-vqvae/best_model.pt --time_limit_minutes=8 --out_dir=runs/gen-prior
#   python sample.py --prior_checkpoint=runs/gen-prior/best_prior.pt
n_embeddings = 128         # a VQ-VAE of 128 codes, whose grids a prior models more easily than 512 codes'
prior_d_model = 128        # a prior a CPU trains in minutes
prior_n_layers = 4
prior_n_heads = 4
prior_dropout = 0.0
prior_batch_size = 16
prior_learning_rate = 2e-3
prior_warmup_steps = 50
