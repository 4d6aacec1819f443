"""Train the VQ-VAE on 2D pelvic MRI slices (stage 1), or the prior over its code grids (stage 2).

    python train.py                                      # VQ-VAE on the synthetic phantom (data/demo)
    python train.py --data_dir=/path/keras_slices_data --time_limit_minutes=55
    python train.py --stage=prior                        # prior on the newest VQ-VAE run's codes
    torchrun --nproc_per_node=4 train.py --data_dir=...  # several GPUs (or CPU processes with gloo)

Every epoch is validated (SSIM/PSNR for the VQ-VAE, bits per code for the prior); the best model is kept.
Every name in the block below can be overridden as --name=value.
"""
import csv
import hashlib
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import dataset
from modules import VQVAE, CodePrior, load_model, unigram_bits
from utils import (DataError, apply_overrides, atomic_torch_save, newest, plot_curves, plot_reconstructions,
                   psnr_torch, reconstruct, score_split, ssim_torch)

# ----------------------------------------------------------------------------------------------------------------
stage = "vqvae"            # "vqvae": the autoencoder; "prior": a transformer over a trained VQ-VAE's code grids
# data
data_dir = None            # course-layout root (keras_slices_{train,validate,test}); None = the synthetic phantom
train_dir = None           # per-split folders, each overriding data_dir's
validate_dir = None        # absent: whole patients are held out of the training folder
test_dir = None
val_fraction = 0.1         # share of training patients held out when there is no validation folder
skip_bad = False           # True: drop unreadable or invalid slices and list them in skipped.txt
cache_dir = "data/cache"   # prepared arrays, keyed by files, sizes, mtimes and settings; None = no cache
# VQ-VAE (a 256x128 slice -> a 64x32 grid of codes)
n_hiddens = 64             # the write-up used 128: 64 is 3x faster and scores higher at equal wall-clock
n_residual_hiddens = 32
n_residual_layers = 2
embedding_dim = 64
n_embeddings = 512
beta = 0.25                # commitment weight
ema_decay = 0.99           # codebook moving-average decay
learning_rate = 2e-3
batch_size = 8
n_epochs = 150
ssim_weight = 0.0          # loss = MSE + ssim_weight * (1 - SSIM) + commitment
# prior (stage 2)
vqvae_checkpoint = None    # the frozen VQ-VAE; None = the newest runs/*/best_model.pt
prior_d_model = 64          # measured on the CPU demo (README, Generation); a GPU affords a larger prior
prior_n_layers = 4
prior_n_heads = 4
prior_dropout = 0.0
prior_window = 64           # codes each position attends to (two rows of the 64x32 grid); 0 = the whole prefix
prior_learning_rate = 5e-3
prior_batch_size = 8
prior_n_epochs = 50
prior_warmup_steps = 10     # a short prior run has only a few hundred steps
# optimisation, both stages
warmup_steps = 100          # VQ-VAE stage
grad_clip = 1.0
# run
out_dir = None             # None = runs/YYYYmmdd-HHMMSS
seed = 1337
device = "auto"            # auto = cuda if available, else cpu
amp = True                 # bf16 autocast on CUDA (the quantiser stays fp32); ignored on CPU
compile = False            # torch.compile the model
time_limit_minutes = None  # stop cleanly after the step that crosses it, then validate and test as usual
resume = False             # True: continue out_dir (default: the newest run); or the path of a run folder
eval_batch_size = 64
# ----------------------------------------------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]
TYPES = {k: (str,) for k in ("data_dir", "train_dir", "validate_dir", "test_dir", "cache_dir", "out_dir", "vqvae_checkpoint")}
TYPES.update(time_limit_minutes=(float,), resume=(bool, str))
SYNC_EVERY = 16  # steps between stop-flag exchanges under DDP
MODEL_KEYS = ("n_hiddens", "n_residual_hiddens", "n_residual_layers", "embedding_dim", "n_embeddings", "beta",
              "ema_decay")


def lr_at(step, progress, peak, warmup):
    """Linear warm-up, then cosine decay to 10% over the run's progress (by steps or by wall time)."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def code_stats(counts):
    """Codebook usage (fraction of codes used) and perplexity from per-code counts over a pass."""
    p = counts.double() / counts.sum().clamp_min(1)
    return float((counts > 0).double().mean()), float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum()))


class Run:
    """Process group, device, output folder and the state to resume from."""

    def __init__(self):
        self.ddp = "RANK" in os.environ
        cuda = torch.cuda.is_available() and device != "cpu"
        if self.ddp:
            dist.init_process_group("nccl" if cuda else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.ddp else (0, 1)
        self.master = self.rank == 0
        self.dev = torch.device(("cuda" if cuda else "cpu") if device == "auto" else device)
        if self.dev.type == "cuda":
            self.dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.dev)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.autocast = torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=amp and self.dev.type == "cuda")
        if resume:
            self.out = resume if isinstance(resume, str) else out_dir or os.path.dirname(newest("runs/*/last.pt") or "")
            if not self.out:
                sys.exit("error: --resume=True: no runs/*/last.pt to resume; give --out_dir or --resume=RUN_FOLDER")
        else:
            self.out = out_dir or os.path.join("runs", self.broadcast(time.strftime("%Y%m%d-%H%M%S")))
        self.state = None
        if resume:
            path = os.path.join(self.out, "last.pt")
            if not os.path.exists(path):
                sys.exit(f"error: --resume: {path} not found")
            self.state = torch.load(path, map_location="cpu", weights_only=True)
            if self.state["stage"] != stage:
                sys.exit(f"error: --resume: {path} is a {self.state['stage']} run; add --stage={self.state['stage']}")

    def log(self, *a):
        if self.master:
            print(*a, flush=True)

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.ddp:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def all_sum(self, t):
        if self.ddp:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def path(self, name):
        return os.path.join(self.out, name)


def prepare_splits(run, splits, names):
    """Read, check and normalise the named splits (rank 0 fills the cache first); one-line errors, exit 1."""
    try:
        prepared = {}
        for s in names:
            if not run.master:
                run.barrier()
            prepared[s] = dataset.prepare(splits[s], cache_dir, skip_bad, desc=s)
            if run.master:
                run.barrier()
    except DataError as e:
        sys.exit(f"error: {e}")
    skipped = [m for p in prepared.values() for m in p["skipped"]]
    if run.master and skipped:
        with open(run.path("skipped.txt"), "w") as f:
            f.write("\n".join(skipped) + "\n")
        run.log(f"skipped {len(skipped)} bad slices (listed in {run.path('skipped.txt')})")
    return prepared


def fit(run, model, x_train, x_val, train_loss, validate, lr, warmup, bs, epochs, on_best):
    """The training loop both stages share: batches by index from device tensors, lr schedule, time limit,
    SIGTERM, DDP, resume from last.pt, NaN stop, metrics.csv, curves, best checkpoint by validate()['score'].

    train_loss(model, xb) -> (loss, logged scalar); validate(model) -> dict of floats with 'score' (higher is
    better); on_best(epoch, metrics) writes the best checkpoint and figures. Returns the metric rows and
    whether the run stopped on a signal."""
    dev, state = run.dev, run.state
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0,
                                  fused=dev.type == "cuda")
    rows, best, start_epoch, start_step, global_step, elapsed = [], -math.inf, 0, 0, 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if dev.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"])
        rows, best, elapsed = state["rows"], state["best"], state["elapsed"]
        start_epoch, start_step, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        run.log(f"resuming {run.out} at epoch {start_epoch} step {start_step}")
    net = torch.compile(model) if compile else model
    if run.ddp:  # the quantiser keeps its buffers in step itself (all-reduced EMA), so no buffer broadcast
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[dev.index] if dev.type == "cuda" else None,
                                                        broadcast_buffers=False)
    total_steps = epochs * len(dataset.batches(len(x_train), bs, seed, 0, run.rank, run.world))
    time_limit = time_limit_minutes * 60 if time_limit_minutes else None
    stop = {"signal": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True))
    t_start = time.time() - elapsed
    time_progress = elapsed / time_limit if time_limit else 0.0  # under DDP rank 0's, shared every SYNC_EVERY steps

    def save_last(epoch, step_in_epoch, accum):
        """Everything needed to continue exactly here; written atomically."""
        s = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), rng_cpu=torch.get_rng_state(), rows=rows,
                 best=best, epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step,
                 elapsed=time.time() - t_start, accum=accum, stage=stage)
        if dev.type == "cuda":
            s["rng_cuda"] = torch.cuda.get_rng_state()
        atomic_torch_save(s, run.path("last.pt"))

    model.train()
    reason = None
    for epoch in range(start_epoch, epochs):
        t_epoch = time.time()
        accum = torch.zeros(2, device=dev)  # loss sum, steps: kept on the device, read once per epoch
        first = start_step if epoch == start_epoch else 0
        if first:
            accum += state["accum"].to(dev)
        plan = dataset.batches(len(x_train), bs, seed, epoch, run.rank, run.world)
        order = torch.as_tensor(np.concatenate(plan), device=dev)  # one host-to-device copy per epoch
        bounds = np.cumsum([0] + [len(b) for b in plan]).tolist()
        for i in tqdm(range(first, len(plan)), desc=f"epoch {epoch}", leave=False, disable=not run.master):
            if time_limit and not run.ddp:
                time_progress = (time.time() - t_start) / time_limit
            step_lr = lr_at(global_step, max(global_step / total_steps, time_progress), lr, warmup)
            for g in optimizer.param_groups:
                g["lr"] = step_lr
            with run.autocast:
                loss, logged = train_loss(net, x_train[order[bounds[i]:bounds[i + 1]]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            accum += torch.stack([logged.detach().float(), torch.ones((), device=dev)])
            global_step += 1
            # stop decisions and wall-time progress come from rank 0, so every rank uses the same learning rate
            # and leaves the loop after the same step; under DDP they are shared every SYNC_EVERY steps, as
            # reading them back is a host synchronisation
            used = (time.time() - t_start) / time_limit if time_limit else 0.0
            crossed, signalled = used >= 1, stop["signal"]
            if run.ddp:
                crossed = signalled = False
                if global_step % SYNC_EVERY == 0:
                    t = torch.tensor([used, stop["signal"]], dtype=torch.float64, device=dev)
                    dist.broadcast(t, 0)
                    time_progress, signalled = t.tolist()
                    crossed = time_progress >= 1
            if signalled:
                reason = "signal"
                break
            if crossed:
                reason = "time"
                break
        if reason == "signal":
            if run.master:
                save_last(epoch, i + 1, accum.cpu())
            run.log(f"SIGTERM: saved {run.path('last.pt')} at epoch {epoch} step {i + 1}; "
                    f"continue with --resume={run.out}")
            return rows, True
        loss_sum, n_steps = (run.all_sum(accum) / run.world).tolist()
        if not math.isfinite(loss_sum):
            sys.exit(f"error: training loss became {loss_sum} in epoch {epoch}; stopped, the last good "
                     f"checkpoints in {run.out} are kept")
        model.eval()
        metrics = validate(model)
        model.train()
        row = dict(epoch=epoch, steps=global_step, train_loss=loss_sum / max(n_steps, 1), **metrics, lr=step_lr,
                   seconds=time.time() - t_epoch)
        del row["score"]
        rows.append(row)
        run.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if run.master:
            if metrics["score"] > best:
                best = metrics["score"]
                on_best(epoch, metrics)
            save_last(epoch + 1, 0, torch.zeros(2))  # first: it holds the rows, so the files below can be redone
            with open(run.path("metrics.csv"), "w", newline="") as f:
                w = csv.DictWriter(f, list(row))
                w.writeheader()
                w.writerows(rows)
            plot_curves(rows, run.out)
        if reason == "time":
            run.log(f"time limit of {time_limit_minutes} min reached in epoch {epoch}")
            break
    if run.ddp:  # the codebook EMA and restarts must leave every rank with the same state: check it, cheaply
        digest = hashlib.sha1(b"".join(t.detach().cpu().numpy().tobytes() for t in model.state_dict().values()))
        digests = [None] * run.world
        dist.all_gather_object(digests, digest.hexdigest()[:12])
        run.log(f"state fingerprints {'identical on all' if len(set(digests)) == 1 else 'DIFFER across'} "
                f"{run.world} ranks: {' '.join(digests)}")
    return rows, False


def train_vqvae(run, config):
    root = data_dir if (data_dir or train_dir) else dataset.ensure_demo() if run.master else dataset.DEMO_ROOT
    run.barrier()
    try:
        splits = dataset.find_splits(root, train_dir, validate_dir, test_dir, val_fraction, seed)
    except DataError as e:
        sys.exit(f"error: {e}")
    if run.master:
        os.makedirs(run.out, exist_ok=True)
    prepared = prepare_splits(run, splits, list(splits))
    if run.master:
        with open(run.path("splits.json"), "w") as f:
            json.dump({"data_root": os.path.abspath(root), **{s: p["files"] for s, p in prepared.items()}}, f, indent=1)
        run.log(" ".join(f"{s}: {len(p['files'])} slices" for s, p in prepared.items()))
        pick = np.linspace(0, len(prepared["train"]["x"]) - 1, min(8, len(prepared["train"]["x"]))).astype(int)
        dataset.plot_samples(prepared["train"]["x"][pick], run.path("data_samples.png"),
                             [os.path.basename(prepared["train"]["files"][i]).split(".")[0] for i in pick])
    # the whole split lives on the device; batches are drawn by index (no DataLoader, no per-batch host work)
    x_train = torch.from_numpy(prepared["train"]["x"]).to(run.dev)[:, None]
    x_val = torch.from_numpy(prepared["validate"]["x"]).to(run.dev)[:, None]
    torch.manual_seed(seed)
    model_args = {k: config[k] for k in MODEL_KEYS}
    model = VQVAE(**model_args).to(run.dev)
    if run.dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    def train_loss(net, xb):
        xh, commit, _ = net(xb)
        xh = xh.float()
        mse = F.mse_loss(xh, xb)
        loss = mse + commit + (ssim_weight * (1 - ssim_torch(xh, xb).mean()) if ssim_weight else 0)
        return loss, loss

    @torch.no_grad()
    def validate(net):
        """SSIM/PSNR on the device over the whole validation split (sharded over ranks), and code usage."""
        sums = torch.zeros(3, device=run.dev)  # ssim, psnr, count
        counts = torch.zeros(n_embeddings, device=run.dev, dtype=torch.long)
        for idx in dataset.batches(len(x_val), eval_batch_size, seed, 0, run.rank, run.world, shuffle=False):
            xb = x_val[torch.as_tensor(idx, device=run.dev)]
            with run.autocast:
                xh, _, codes = net(xb)
            xh = xh.float().clamp(0, 1)
            sums += torch.stack([ssim_torch(xh, xb).sum(), psnr_torch(xh, xb).sum(), torch.tensor(len(idx), device=run.dev)])
            counts += torch.bincount(codes.flatten(), minlength=n_embeddings)
        sums, counts = run.all_sum(sums), run.all_sum(counts)
        usage, perplexity = code_stats(counts)
        ssim = float(sums[0] / sums[2])
        return dict(val_ssim=ssim, val_psnr=float(sums[1] / sums[2]), codebook_usage=usage, perplexity=perplexity,
                    score=ssim)

    def figure(name, title):
        n = min(6, len(x_val))
        model.eval()
        rec, _ = reconstruct(model, prepared["validate"]["x"][:n], run.dev)
        model.train()
        plot_reconstructions(prepared["validate"]["x"][:n], rec, run.path(name), title)

    def on_best(epoch, m):
        atomic_torch_save(dict(kind="vqvae", model=model.state_dict(), model_args=model_args, config=config, epoch=epoch,
                               val_ssim=m["val_ssim"], data_root=os.path.abspath(root), image_size=[dataset.H, dataset.W],
                               normalisation="per-slice min-max to [0, 1]; x * (hi - lo) + lo restores units"),
                          run.path("best_model.pt"))
        figure("recon_best.png", f"validation, best epoch {epoch}, SSIM {m['val_ssim']:.4f}")
        if epoch == 0:
            figure("recon_epoch0.png", f"validation, epoch 0, SSIM {m['val_ssim']:.4f}")

    rows, interrupted = fit(run, model, x_train, x_val, train_loss, validate, learning_rate, warmup_steps, batch_size,
                            n_epochs, on_best)
    if interrupted or not run.master or "test" not in prepared:
        return
    # test: the best model, scored with the reference metric (scikit-image); it never chooses a model
    best, ckpt = load_model(run.path("best_model.pt"), run.dev)
    p = prepared["test"]
    rec, _ = reconstruct(best, p["x"], run.dev, eval_batch_size)
    scores = score_split(p["x"], rec, p["lo"], p["hi"])
    result = dict(ssim=float(scores[:, 0].mean()), psnr=float(scores[:, 1].mean()), n_slices=len(scores),
                  best_epoch=ckpt["epoch"], val_ssim=ckpt["val_ssim"], epochs=len(rows),
                  train_seconds=sum(r["seconds"] for r in rows))
    with open(run.path("test_metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    n = min(6, len(p["x"]))
    plot_reconstructions(p["x"][:n], rec[:n], run.path("recon_test.png"),
                         f"test split, best model (epoch {ckpt['epoch']}), mean SSIM {result['ssim']:.4f}")
    run.log(f"test: ssim={result['ssim']:.4f} psnr={result['psnr']:.2f} on {len(scores)} slices -> {run.out}")


def train_prior(run, config):
    vq_path = vqvae_checkpoint or newest("runs/*/best_model.pt")
    if vq_path is None or not os.path.exists(str(vq_path)):
        sys.exit(f"error: --stage=prior needs a trained VQ-VAE: {vq_path or 'no runs/*/best_model.pt'} not found")
    vq_path = os.path.abspath(vq_path)
    vqvae, vq_ckpt = load_model(vq_path, run.dev)
    with open(os.path.join(os.path.dirname(vq_path), "splits.json")) as f:
        splits = json.load(f)  # the VQ-VAE's own patient split
    if run.master:
        os.makedirs(run.out, exist_ok=True)
    prepared = prepare_splits(run, splits, ["train", "validate"])
    # encode once with the frozen VQ-VAE; the code grids live on the device
    codes = {s: torch.from_numpy(reconstruct(vqvae, prepared[s]["x"], run.dev, eval_batch_size)[1]).to(run.dev)
             for s in ("train", "validate")}
    n_codes, grid = vq_ckpt["model_args"]["n_embeddings"], tuple(codes["train"].shape[1:])
    # the baseline: validation codes under the training split's unigram distribution (add-one smoothed)
    freq = torch.bincount(codes["train"].flatten(), minlength=n_codes).double() + 1
    unigram_val = float(-(torch.log2(freq / freq.sum())[codes["validate"].flatten()]).mean())
    run.log(f"codes {tuple(codes['train'].shape)}; unigram entropy of train codes "
            f"{unigram_bits(codes['train'], n_codes):.3f} bits, validation under train unigram {unigram_val:.3f} bits")
    torch.manual_seed(seed)
    model_args = dict(n_codes=n_codes, grid=grid, d_model=prior_d_model, n_layers=prior_n_layers,
                      n_heads=prior_n_heads, dropout=prior_dropout, window=prior_window)
    model = CodePrior(**model_args).to(run.dev)

    def train_loss(net, cb):
        loss = net(cb)
        return loss, loss / math.log(2)

    @torch.no_grad()
    def validate(net):
        sums = torch.zeros(2, device=run.dev)
        for idx in dataset.batches(len(codes["validate"]), eval_batch_size, seed, 0, run.rank, run.world, shuffle=False):
            with run.autocast:
                loss = net(codes["validate"][torch.as_tensor(idx, device=run.dev)])
            sums += torch.stack([loss.float() * len(idx), torch.tensor(float(len(idx)), device=run.dev)])
        sums = run.all_sum(sums)
        bits = float(sums[0] / sums[1]) / math.log(2)
        return dict(val_bits_per_code=bits, unigram_bits_per_code=unigram_val, score=-bits)

    def on_best(epoch, m):
        atomic_torch_save(dict(kind="prior", model=model.state_dict(), model_args=model_args, config=config,
                               epoch=epoch, val_bits_per_code=m["val_bits_per_code"], unigram_bits_per_code=unigram_val,
                               vqvae_checkpoint=vq_path), run.path("best_prior.pt"))

    fit(run, model, codes["train"], codes["validate"], train_loss, validate, prior_learning_rate, prior_warmup_steps,
        prior_batch_size, prior_n_epochs, on_best)


def main():
    apply_overrides(globals(), sys.argv[1:], types=TYPES)
    if stage not in ("vqvae", "prior"):
        sys.exit(f"error: --stage={stage}: expected vqvae or prior")
    config = {k: globals()[k] for k in config_keys}
    run = Run()
    config["out_dir"] = run.out
    (train_vqvae if stage == "vqvae" else train_prior)(run, config)
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
