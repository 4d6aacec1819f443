"""Measure the hot paths with train.py's hyperparameters (override them as --name=value) and print one table.

    python bench.py                                   # train.py's defaults, on cuda if present, else cpu
    python bench.py --n_hiddens=128 --batch_size=8 --device=cpu
    python bench.py --compile=True                    # the training step through torch.compile (inductor)
    python bench.py --prep=True                       # also time data preparation on a study-sized phantom
    python bench.py --sample_n=0                      # skip timing the prior (training and sampling)

Training, inference and validation-metric throughput use random 256x128 slices on the device. The per-epoch
overhead runs train.py's own validation, last.pt writing and epoch files on a study-sized validation split (660
slices), beside the time of one study-sized epoch of training steps (11,460 slices). Preparation timing writes
the phantom once to data/study (11,460 + 660 + 540 slices) and times a cold and a cached load.
"""
import math
import os
import shutil
import tempfile
import time
from types import SimpleNamespace

import torch

import dataset
import figures
import options
import phantom
import train
from job import Job, pick_device
from metrics import psnr_torch, ssim_torch
from modules import VQVAE, CodePrior
from options import Option
from utils import run_script, write_csv

BLOCK = dict(train.BLOCK, steps=Option(20, at_least=1), warmup=Option(3, at_least=0), prep=Option(False),
             sample_n=Option(8, at_least=0))  # timed steps, untimed warm-up steps, data preparation, prior samples
config, dev, cuda, autocast = None, None, False, None  # set by main()


def sync():
    if cuda:
        torch.cuda.synchronize()


def seconds(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def timed(fn, n_items):
    """Items per second of fn over config['steps'] calls, after config['warmup'] calls (compilation among them)."""
    for _ in range(config["warmup"]):
        fn()
    return config["steps"] * n_items / seconds(lambda: [fn() for _ in range(config["steps"])])


def bench_vqvae(rows):
    """The training step (train.py's loss, optimiser and settings), inference and the validation metric."""
    torch.manual_seed(0)
    model = VQVAE(**train.vqvae_args(SimpleNamespace(**config))).to(dev)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if config["compile"] else model
    opt = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"], fused=cuda)
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
        if config["grad_clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        opt.step()

    @torch.no_grad()
    def infer():
        with autocast:
            return model.eval()(xe)[0]

    rows.append(("first training step (compiles with --compile=True)", f"{seconds(train_step):.1f} s"))
    train_ips = timed(train_step, bs)
    rows.append(("train images/s", f"{train_ips:.1f}"))
    rows.append(("inference images/s", f"{timed(infer, ebs):.1f}"))
    y = torch.rand_like(xe)
    rows.append(("validation SSIM+PSNR images/s", f"{timed(lambda: (ssim_torch(xe, y), psnr_torch(xe, y)), ebs):.0f}"))
    if cuda:
        rows.append(("peak GPU memory (train+infer)", f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB"))
        rows.extend(flop_rows(train_step, train_ips, bs))
    else:
        import resource
        rows.append(("peak host memory (RSS, model steps)",
                     f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"))
    return model, opt, train_ips


def flop_rows(train_step, train_ips, bs):
    """FLOPs per image of the training step, and the fraction of the GPU's dense bf16 peak that is reached."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        train_step()
    flops = fc.get_total_flops() / bs
    rows = [("train FLOPs per image", f"{flops / 1e9:.2f} GFLOP")]
    name = torch.cuda.get_device_name(dev)
    peak = next((v for k, v in {"H100": 989e12, "H200": 989e12, "A100": 312e12}.items() if k in name), None)
    if peak:
        rows.append(("fraction of dense bf16 peak", f"{train_ips * flops / peak:.1%}"))
    return rows


def bench_epoch_overhead(rows, model, opt, train_ips):
    """What a study-sized epoch spends outside its training steps, through train.py's own functions."""
    cfg = SimpleNamespace(**dict(config, out_dir=tempfile.mkdtemp(), resume=False, tensorboard=False))
    job = Job(cfg)
    x_val = torch.rand(phantom.STUDY_SIZES["validate"], 1, dataset.H, dataset.W, device=dev)
    epoch_rows = [dict(epoch=e, steps=e, train_loss=0.01, val_ssim=0.9, val_psnr=30.0, codebook_usage=1.0,
                       perplexity=300.0, lr=1e-3, seconds=2.0) for e in range(config["n_epochs"])]
    position = dict(epoch=1, step_in_epoch=0, global_step=1, rows=epoch_rows, best=0.9, elapsed=1.0,
                    accum=torch.zeros(2))
    stage = SimpleNamespace(name="vqvae", model=model, cfg=cfg,
                            data=dict(root="", train=["f"] * phantom.STUDY_SIZES["train"]))
    took = dict(validation=seconds(lambda: train.validate_vqvae(job, model.eval(), x_val, config["n_embeddings"],
                                                                 config["eval_batch_size"])),
                last_pt=seconds(lambda: train.save_last(job, stage, opt, position)),
                metrics_csv=seconds(lambda: write_csv(job.path("metrics.csv"), list(epoch_rows[0]),
                                                      [list(r.values()) for r in epoch_rows])))
    curves = seconds(lambda: figures.plot_curves(epoch_rows, job.out))
    shutil.rmtree(job.out)
    per_epoch = sum(took.values()) + curves / config["plot_every"]
    steps = math.ceil(phantom.STUDY_SIZES["train"] / config["batch_size"]) * config["batch_size"] / train_ips
    rows.extend([("epoch overhead: validation (660 slices)", f"{took['validation']:.2f} s"),
                 ("epoch overhead: last.pt, metrics.csv", f"{took['last_pt']:.2f} s, {took['metrics_csv']:.3f} s"),
                 (f"epoch overhead: curves (every {config['plot_every']} epochs)", f"{curves:.2f} s"),
                 ("epoch overhead in all, against the training steps of a study epoch",
                  f"{per_epoch:.2f} s against {steps:.1f} s ({per_epoch / steps:.1%})")])


def bench_prior(rows, vqvae):
    """The prior with train.py's prior_* settings: training steps, then sampling with decoding."""
    prior = CodePrior(**train.prior_args(SimpleNamespace(**config), config["n_embeddings"],
                                         (dataset.H // 4, dataset.W // 4))).to(dev)
    what = (f"(d_model {config['prior_d_model']}, {config['prior_n_layers']} layers, window {config['prior_window']}, "
            f"{config['prior_scan']})")
    opt = torch.optim.AdamW(prior.parameters(), lr=config["prior_learning_rate"], fused=cuda)
    grids = torch.randint(config["n_embeddings"], (config["prior_batch_size"], *prior.grid), device=dev)

    def prior_step():
        with autocast:
            loss = prior(grids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rows.append((f"prior training code grids/s {what}", f"{timed(prior_step, config['prior_batch_size']):.1f}"))
    prior.eval()
    gen = torch.Generator(device=dev).manual_seed(0)
    with autocast:
        took = seconds(lambda: vqvae.decode(prior.sample(config["sample_n"], generator=gen)))
    rows.append((f"prior sampling, batch of {config['sample_n']}, with decoding {what}",
                 f"{took / config['sample_n']:.2f} s/slice"))


def bench_prep(rows):
    """Cold and cached preparation of the study-sized phantom, as train.py does it."""
    root = phantom.ensure_demo(phantom.STUDY_ROOT, phantom.STUDY_SIZES)
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


def main(argv):
    global config, dev, cuda, autocast
    config = vars(options.parse(BLOCK, argv))
    dev = pick_device(config["device"])
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config["amp"] and cuda)
    rows = [("device", str(torch.cuda.get_device_name(dev) if cuda else f"cpu ({torch.get_num_threads()} threads)")),
            ("model", f"n_hiddens={config['n_hiddens']} n_residual_layers={config['n_residual_layers']} "
                      f"batch_size={config['batch_size']} amp={config['amp'] and cuda} compile={config['compile']}")]
    model, opt, train_ips = bench_vqvae(rows)
    bench_epoch_overhead(rows, model, opt, train_ips)
    if config["sample_n"]:
        bench_prior(rows, model)
    if config["prep"]:
        bench_prep(rows)
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    run_script(main)
