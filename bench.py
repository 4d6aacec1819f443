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
import stages
import train
from job import Job
from metrics import psnr_torch, ssim_torch
from options import Option
from prior import CodePrior
from vqvae import VQVAE
from utils import run_script, write_csv

BLOCK = dict(train.BLOCK, steps=Option(20, at_least=1), warmup=Option(3, at_least=0), prep=Option(False),
             sample_n=Option(8, at_least=0))  # timed steps, untimed warm-up steps, data preparation, prior samples
cfg, job = None, None  # the options and the Job (device, GPU path) that main() sets up


def sync():
    if job.dev.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def timed(fn, n_items):
    """Items per second of fn over cfg.steps calls, after cfg.warmup calls (compilation among them)."""
    for _ in range(cfg.warmup):
        fn()
    return cfg.steps * n_items / seconds(lambda: [fn() for _ in range(cfg.steps)])


def bench_vqvae(rows):
    """The training step (train.py's loss, optimiser and settings), inference and the validation metric."""
    torch.manual_seed(0)
    model = VQVAE(**stages.vqvae_args(cfg)).to(job.dev)
    if job.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step_model = torch.compile(model) if cfg.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, fused=job.fused_adamw)
    bs, ebs = cfg.batch_size, cfg.eval_batch_size
    x = torch.rand(bs, 1, dataset.H, dataset.W, device=job.dev)
    xe = torch.rand(ebs, 1, dataset.H, dataset.W, device=job.dev)
    if job.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step():
        with job.autocast:
            loss, _ = stages.vqvae_loss(step_model, x, cfg.ssim_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    @torch.no_grad()
    def infer():
        with job.autocast:
            return model.eval()(xe)[0]

    rows.append(("first training step (compiles with --compile=True)", f"{seconds(train_step):.1f} s"))
    train_ips = timed(train_step, bs)
    rows.append(("train images/s", f"{train_ips:.1f}"))
    rows.append(("inference images/s", f"{timed(infer, ebs):.1f}"))
    y = torch.rand_like(xe)
    rows.append(("validation SSIM+PSNR images/s", f"{timed(lambda: (ssim_torch(xe, y), psnr_torch(xe, y)), ebs):.0f}"))
    rows.extend(flop_rows(train_step, train_ips, bs))
    return model, opt, train_ips


def flop_rows(train_step, train_ips, bs):
    """FLOPs per image of the training step; on CUDA the fraction of the card's dense bf16 peak that is reached and
    the peak memory, on a CPU the peak host memory."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        train_step()
    flops = fc.get_total_flops() / bs
    rows = [("train FLOPs per image", f"{flops / 1e9:.2f} GFLOP")]
    if job.dev.type != "cuda":
        import resource
        return rows + [("peak host memory (RSS, model steps)",
                        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")]
    rows.append(("peak GPU memory (train+infer)", f"{torch.cuda.max_memory_allocated(job.dev) / 2**30:.2f} GiB"))
    name = torch.cuda.get_device_name(job.dev)
    peak = next((v for k, v in {"H100": 989e12, "H200": 989e12, "A100": 312e12}.items() if k in name), None)
    if peak:
        rows.append(("fraction of dense bf16 peak", f"{train_ips * flops / peak:.1%}"))
    return rows


def bench_epoch_overhead(rows, model, opt, train_ips):
    """What a study-sized epoch spends outside its training steps, through train.py's own functions."""
    x_val = torch.rand(phantom.STUDY_SIZES["validate"], 1, dataset.H, dataset.W, device=job.dev)
    epoch_rows = [dict(epoch=e, steps=e, train_loss=0.01, val_ssim=0.9, val_psnr=30.0, codebook_usage=1.0,
                       perplexity=300.0, lr=1e-3, seconds=2.0) for e in range(cfg.n_epochs)]
    position = train.Position(epoch=1, global_step=1, rows=epoch_rows, best=0.9, elapsed=1.0)
    stage = SimpleNamespace(name="vqvae", model=model, cfg=cfg,
                            data=dict(root="", train=["f"] * phantom.STUDY_SIZES["train"]))
    took = dict(validation=seconds(lambda: stages.validate_vqvae(job, model.eval(), x_val, cfg.n_embeddings,
                                                                 cfg.eval_batch_size)),
                last_pt=seconds(lambda: train.save_last(job, stage, opt, position)),
                metrics_csv=seconds(lambda: write_csv(job.path("metrics.csv"), list(epoch_rows[0]),
                                                      [list(r.values()) for r in epoch_rows])))
    curves = seconds(lambda: figures.plot_curves(epoch_rows, job.out))
    per_epoch = sum(took.values()) + curves / cfg.plot_every
    steps = math.ceil(phantom.STUDY_SIZES["train"] / cfg.batch_size) * cfg.batch_size / train_ips
    rows.extend([("epoch overhead: validation (660 slices)", f"{took['validation']:.2f} s"),
                 ("epoch overhead: last.pt, metrics.csv", f"{took['last_pt']:.2f} s, {took['metrics_csv']:.3f} s"),
                 (f"epoch overhead: curves (every {cfg.plot_every} epochs)", f"{curves:.2f} s"),
                 ("epoch overhead in all, against the training steps of a study epoch",
                  f"{per_epoch:.2f} s against {steps:.1f} s ({per_epoch / steps:.1%})")])


def bench_prior(rows, vqvae):
    """The prior with train.py's prior_* settings: training steps, then sampling with decoding."""
    prior = CodePrior(**stages.prior_args(cfg, cfg.n_embeddings, (dataset.H // 4, dataset.W // 4))).to(job.dev)
    what = f"(d_model {cfg.prior_d_model}, {cfg.prior_n_layers} layers, {cfg.prior_patch}x{cfg.prior_patch} patches)"
    opt = torch.optim.AdamW(prior.parameters(), lr=cfg.prior_learning_rate, fused=job.fused_adamw)
    grids = torch.randint(cfg.n_embeddings, (cfg.prior_batch_size, *prior.grid), device=job.dev)

    def prior_step():
        with job.autocast:
            loss = prior(grids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rows.append((f"prior training code grids/s {what}", f"{timed(prior_step, cfg.prior_batch_size):.1f}"))
    prior.eval()
    gen = torch.Generator(device=job.dev).manual_seed(0)
    with job.autocast:
        took = seconds(lambda: vqvae.decode(prior.sample(cfg.sample_n, generator=gen)))
    rows.append((f"prior sampling, batch of {cfg.sample_n}, with decoding {what}",
                 f"{took / cfg.sample_n:.2f} s/slice"))


def bench_prep(rows):
    """Cold and cached preparation of the study-sized phantom, as train.py does it."""
    root = phantom.ensure_demo(phantom.STUDY_ROOT, phantom.STUDY_SIZES)
    cache = os.path.join(os.path.dirname(phantom.STUDY_ROOT), "bench_cache")
    shutil.rmtree(cache, ignore_errors=True)
    splits = dataset.find_splits(root)
    n = sum(len(f) for f in splits.values())
    for label in ("data preparation, cold", "data preparation, cached"):
        t0 = time.perf_counter()
        for s, files in splits.items():  # as train.py does: prepare, then the split as a tensor on the device
            x = torch.from_numpy(dataset.prepare(files, cache, desc=s)["x"]).to(job.dev)
            float(x.sum())  # touch every page of a mapped cache, so its reading is counted
        rows.append((f"{label} ({n} slices)", f"{time.perf_counter() - t0:.1f} s"))


def main(argv):
    global cfg, job
    cfg = options.parse(BLOCK, argv)
    cfg.out_dir, cfg.resume, cfg.tensorboard = tempfile.mkdtemp(), False, False  # bench's own scratch run folder
    job = Job(cfg)  # the device and the GPU path, as train.py sets them up
    try:
        rows = [("device", torch.cuda.get_device_name(job.dev) if job.dev.type == "cuda" else
                 f"cpu ({torch.get_num_threads()} threads)"),
                ("model", f"n_hiddens={cfg.n_hiddens} n_residual_layers={cfg.n_residual_layers} batch_size="
                          f"{cfg.batch_size} amp={job.amp} fused_adamw={job.fused_adamw} channels_last="
                          f"{job.channels_last} compile={cfg.compile}")]
        model, opt, train_ips = bench_vqvae(rows)
        bench_epoch_overhead(rows, model, opt, train_ips)
        if cfg.sample_n:
            bench_prior(rows, model)
        if cfg.prep:
            bench_prep(rows)
    finally:
        job.close()
        shutil.rmtree(job.out, ignore_errors=True)
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    run_script(main)
