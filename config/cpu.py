# A CPU run on the embedded phantom: a narrower network and a small batch, which take more steps in a few minutes
# than the block's GPU defaults (EXPERIMENTS.md). python train.py config/cpu.py --time_limit_minutes=3
n_hiddens = 64
batch_size = 8
learning_rate = 2e-3
warmup_steps = 100
