"""Measure the hot paths with train.py's hyperparameters (override them as --name=value) and print one table.

    python bench.py                                   # train.py's defaults, on cuda if present, else cpu
    python bench.py --n_hiddens=128 --batch_size=8 --device=cpu
    python bench.py --prep=True                       # also time data preparation on a study-sized phantom
    python bench.py --sample_n=0                      # skip timing the prior (training and sampling)

Training, inference and validation-metric throughput use random 256x128 slices on the device; preparation
timing writes the phantom once to data/study (11,460 + 660 + 540 slices) and times a cold and a cached load.
"""
import os
import shutil
import sys
import time

import torch

import dataset
import train
from modules import VQVAE, CodePrior
from utils import apply_overrides, pick_device, psnr_torch, ssim_torch

config = {k: getattr(train, k) for k in train.config_keys}
config.update(steps=20, warmup=3, prep=False, eval_batch_size=64, sample_n=8)
apply_overrides(config, sys.argv[1:], types=train.TYPES)
dev = pick_device(config["device"])
cuda = dev.type == "cuda"
if cuda:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
STUDY_SIZES = {"train": 11460, "validate": 660, "test": 540}


def timed(fn, n_items):
    """Items per second of fn over config['steps'] calls, after warm-up, with the device synchronised."""
    for _ in range(config["warmup"]):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(config["steps"]):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return config["steps"] * n_items / (time.perf_counter() - t0)


def main():
    torch.manual_seed(0)
    model = VQVAE(**{k: config[k] for k in train.MODEL_KEYS}).to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if config["compile"] else model
    opt = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], fused=cuda)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config["amp"] and cuda)
    bs, ebs = config["batch_size"], config["eval_batch_size"]
    x = torch.rand(bs, 1, dataset.H, dataset.W, device=dev)
    xe = torch.rand(ebs, 1, dataset.H, dataset.W, device=dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def train_step():
        with autocast:
            loss, _ = train.vqvae_loss(step_model, x, config["ssim_weight"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def infer():
        with autocast:
            return model.eval()(xe)[0]

    rows = [("device", str(torch.cuda.get_device_name(dev) if cuda else f"cpu ({torch.get_num_threads()} threads)")),
            ("model", f"n_hiddens={config['n_hiddens']} n_residual_layers={config['n_residual_layers']} "
                      f"batch_size={bs} amp={config['amp'] and cuda} compile={config['compile']}")]
    train_ips = timed(train_step, bs)
    rows.append(("train images/s", f"{train_ips:.1f}"))
    rows.append(("inference images/s", f"{timed(infer, ebs):.1f}"))
    y = torch.rand_like(xe)
    rows.append(("validation SSIM+PSNR images/s", f"{timed(lambda: (ssim_torch(xe, y), psnr_torch(xe, y)), ebs):.0f}"))
    if cuda:
        rows.append(("peak GPU memory (train+infer)", f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB"))
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as fc:
            train_step()
        flops = fc.get_total_flops() / bs
        rows.append(("train FLOPs per image", f"{flops / 1e9:.2f} GFLOP"))
        peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
        name = torch.cuda.get_device_name(dev)
        p = next((v for k, v in peak.items() if k in name), None)
        if p:
            rows.append(("fraction of dense bf16 peak", f"{train_ips * flops / p:.1%}"))
    else:
        import resource
        rows.append(("peak host memory (RSS, model steps)", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"))
    if config["sample_n"]:  # the prior with train.py's prior_* settings: training steps, then sampling + decoding
        prior = CodePrior(config["n_embeddings"], (dataset.H // 4, dataset.W // 4), config["prior_d_model"],
                          config["prior_n_layers"], config["prior_n_heads"], window=config["prior_window"]).to(dev)
        what = f"(d_model {config['prior_d_model']}, {config['prior_n_layers']} layers, window {config['prior_window']})"
        prior_opt = torch.optim.AdamW(prior.parameters(), lr=config["prior_learning_rate"], fused=cuda)
        grids = torch.randint(config["n_embeddings"], (config["prior_batch_size"], *prior.grid), device=dev)

        def prior_step():
            with autocast:
                loss = prior(grids)
            prior_opt.zero_grad(set_to_none=True)
            loss.backward()
            prior_opt.step()
        rows.append((f"prior training code grids/s {what}", f"{timed(prior_step, config['prior_batch_size']):.1f}"))
        prior.eval()
        t0 = time.perf_counter()
        with autocast:
            model.decode(prior.sample(config["sample_n"], generator=torch.Generator(device=dev).manual_seed(0)))
        if cuda:
            torch.cuda.synchronize()
        rows.append((f"prior sampling, batch of {config['sample_n']}, with decoding {what}",
                     f"{(time.perf_counter() - t0) / config['sample_n']:.2f} s/slice"))
    if config["prep"]:
        root = os.path.join(dataset.REPO, "data", "study")
        dataset.ensure_demo(root, STUDY_SIZES)
        cache = os.path.join(dataset.REPO, "data", "bench_cache")
        shutil.rmtree(cache, ignore_errors=True)
        splits = dataset.find_splits(root)
        n = sum(len(f) for f in splits.values())
        for label in ("data preparation, cold", "data preparation, cached"):
            t0 = time.perf_counter()
            for s, files in splits.items():  # as train.py does: prepare, then the split as a tensor on the device
                x = torch.from_numpy(dataset.prepare(files, cache, desc=s)["x"]).to(dev)
                float(x.sum())  # touch every page of a mapped cache, so its reading is counted
            rows.append((f"{label} ({n} slices)", f"{time.perf_counter() - t0:.1f} s"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()
