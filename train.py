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
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import dataset
from modules import VQVAE, CodePrior, code_counts, load_model, read_checkpoint
from utils import (DataError, atomic_torch_save, block_names, check_ranges, configure, entropy, evaluate_split,
                   figure_slices, make_folder, newest, newest_first, pick_device, plot_curves, plot_grid,
                   plot_reconstructions, psnr_torch, reconstruct, shown_masks, ssim_torch, write_per_slice)

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
# VQ-VAE (a 256x128 slice -> a 64x32 grid of codes); defaults for 150 epochs on one GPU, chosen at equal epochs
# (README, Configuration); the CPU quickstart passes --n_hiddens=64 --batch_size=8 --learning_rate=2e-3
# --warmup_steps=100
n_hiddens = 128            # encoder/decoder width: 128 beat 64 at equal epochs
n_residual_hiddens = 32
n_residual_layers = 2      # 4 did not beat 2 at equal epochs
embedding_dim = 64
n_embeddings = 512
beta = 0.25                # commitment weight
ema_decay = 0.99           # codebook moving-average decay
learning_rate = 4e-3       # 2e-3 * sqrt(batch_size / 8): rescale it with the batch size
batch_size = 32            # 8 takes 4x the steps per epoch: better on the small demo, slow on a GPU (README)
n_epochs = 150
ssim_weight = 0.1          # loss = MSE + ssim_weight * (1 - SSIM) + commitment; 0.1 beat 0 on every organ (README)
organ_weight = 0.0         # where the training data has labels, MSE weighs bladder, rectum and prostate 1 + this
# prior (stage 2)
vqvae_checkpoint = None    # the frozen VQ-VAE; None = the newest runs/*/best_model.pt
prior_d_model = 64         # sized for the CPU demo (README, Generation); a GPU affords a larger prior
prior_n_layers = 4
prior_n_heads = 4
prior_dropout = 0.0
prior_window = 64          # codes each position attends to (two rows of the 64x32 grid); 0 = the whole prefix
prior_global_layers = 0    # the last this many of the prior_n_layers blocks attend to the whole prefix, not the window
prior_scan = "centre_out"  # order the grid rows are read: "centre_out" (31, 32, 30, 33, ..: mirrored anatomy side by
                           # side; samples as left-right symmetric as real slices, README Generation) or "raster"
prior_learning_rate = 5e-3
prior_batch_size = 8
prior_n_epochs = 50
prior_warmup_steps = 10    # a short prior run has only a few hundred steps
# optimisation, both stages
warmup_steps = 25          # VQ-VAE stage: 800 images at batch 32
grad_clip = 1.0
# run
out_dir = None             # None = a new runs/YYYYmmdd-HHMMSS; an existing run is never overwritten
seed = 1337
device = "auto"            # auto = cuda if available, else cpu
amp = True                 # bf16 autocast on CUDA (the quantiser stays fp32); ignored on CPU
compile = False            # torch.compile the model
time_limit_minutes = None  # stop cleanly after the step that crosses it, then validate and test
resume = False             # True: continue out_dir, or the newest run if its settings match; or a run folder's path
eval_batch_size = 64
plot_every = 10            # epochs between redraws of the curves (also drawn at the last epoch); figures cost seconds
tensorboard = False        # also log to <run>/tensorboard: scalars per epoch, reconstructions at each best epoch
# --resume continues a run only with the same settings, except those that cannot change what is learnt:
# n_epochs, prior_n_epochs, time_limit_minutes, device, amp, compile, eval_batch_size, cache_dir, plot_every,
# tensorboard
# ----------------------------------------------------------------------------------------------------------------
config_keys = block_names(globals())
# the values a run saved before these names existed was trained with, so that --resume can compare them
IMPLIED = dict(organ_weight=0.0, tensorboard=False, prior_global_layers=0, prior_scan="raster")
TYPES = {k: (str,) for k in ("data_dir", "train_dir", "validate_dir", "test_dir", "cache_dir", "out_dir", "vqvae_checkpoint")}
TYPES.update(time_limit_minutes=(float,), resume=(bool, str))
SYNC_EVERY = 16  # steps between stop-flag exchanges under DDP
MODEL_KEYS = ("n_hiddens", "n_residual_hiddens", "n_residual_layers", "embedding_dim", "n_embeddings", "beta",
              "ema_decay")
SAFE_ON_RESUME = ("n_epochs", "prior_n_epochs", "time_limit_minutes", "device", "amp", "compile", "eval_batch_size",
                  "cache_dir", "plot_every", "tensorboard", "resume", "out_dir")
RANGES = [  # checked before any data is read
    (("n_hiddens",), lambda v: v >= 2, "at least 2"),
    (("n_residual_hiddens", "embedding_dim", "n_embeddings", "batch_size", "n_epochs", "warmup_steps", "prior_d_model",
      "prior_n_layers", "prior_n_heads", "prior_batch_size", "prior_n_epochs", "prior_warmup_steps", "eval_batch_size",
      "plot_every"),
     lambda v: v >= 1, "at least 1"),
    (("n_residual_layers", "beta", "ssim_weight", "organ_weight", "grad_clip", "prior_window"), lambda v: v >= 0,
     "0 or more"),
    (("learning_rate", "prior_learning_rate", "time_limit_minutes"), lambda v: v > 0, "positive"),
    (("val_fraction",), lambda v: 0 < v < 1, "between 0 and 1"),
    (("ema_decay", "prior_dropout"), lambda v: 0 <= v < 1, "at least 0 and below 1"),
    (("stage",), lambda v: v in ("vqvae", "prior"), "vqvae or prior"),
    # prior_n_layers: the module global, which configure() has already set from the command line
    (("prior_global_layers",), lambda v: 0 <= v <= prior_n_layers, "0 to --prior_n_layers"),
    (("prior_scan",), lambda v: v in ("raster", "centre_out"), "raster or centre_out"),
]


# ---- where this process runs and writes ---------------------------------------------------------------------------

class Run:
    """This process's place in the job: rank, device, autocast and output folder, with the few collectives the
    stages need (each a no-op without torch.distributed)."""

    def __init__(self, ddp, rank, world, dev, autocast):
        self.ddp, self.rank, self.world, self.dev, self.autocast = ddp, rank, world, dev, autocast
        self.master = rank == 0
        self.out = None
        self.tb = None  # a TensorBoard SummaryWriter on rank 0 when switched on

    def log_scalars(self, row, stage):
        if self.tb:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{stage}/{k}", v, row["epoch"])
            self.tb.flush()

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


def setup_run(config):
    """Process group, device, autocast and output folder: one decision a line, as in nanoGPT."""
    ddp = "RANK" in os.environ  # started by torchrun
    dev = pick_device(config["device"])
    if ddp:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config["amp"] and dev.type == "cuda")
    run = Run(ddp, rank, world, dev, autocast)
    run.out = output_folder(run, config)
    run.tb = tensorboard_writer(run, config)
    return run


def tensorboard_writer(run, config):
    """A SummaryWriter into <run>/tensorboard on rank 0 when switched on; tensorboard is imported only then."""
    if not (config["tensorboard"] and run.master):
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise DataError("--tensorboard=True needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(run.path("tensorboard"))


def output_folder(run, config):
    """The run's folder, decided on rank 0 and shared: the run to resume, the given out_dir, or a new one."""
    try:
        out = (resume_folder(config) if config["resume"] else claim_folder(config["out_dir"])) if run.master else None
    except DataError as e:
        out = e
    out = run.broadcast(out)
    if isinstance(out, DataError):
        raise out
    return out


def resume_folder(config):
    """--resume=RUN, or --resume=True: out_dir when given, else the newest run of this stage (whose settings
    load_resume_state then checks against this command's)."""
    out = config["resume"] if isinstance(config["resume"], str) else config["out_dir"]
    if not out:
        out = next((os.path.dirname(p) for p in newest_first("runs/*/last.pt")
                    if read_checkpoint(p, mmap=True).get("stage") == config["stage"]), None)
    if not out:
        raise DataError(f"--resume=True: no {config['stage']} run under runs/ to resume; give --out_dir or "
                        "--resume=RUN_FOLDER")
    if not os.path.exists(os.path.join(out, "last.pt")):
        raise DataError(f"--resume: {os.path.join(out, 'last.pt')} not found")
    return out


def claim_folder(out_dir):
    """Create the output folder of a new run. A given out_dir must not hold a run (a last.pt); without one, a new
    runs/<timestamp>, with -2, -3, ... when runs started in the same second: creating it is the atomic claim."""
    if out_dir:
        if os.path.exists(os.path.join(out_dir, "last.pt")):
            raise DataError(f"--out_dir={out_dir}: already holds a run; continue it with --resume=True, or choose "
                            "another --out_dir")
        make_folder(out_dir)
        return out_dir
    stamp = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    for n in range(1, 1000):
        out = stamp if n == 1 else f"{stamp}-{n}"
        try:
            os.makedirs(out)
            return out
        except FileExistsError:
            continue
    raise DataError(f"{stamp}: no free run folder name")


def load_resume_state(run, config):
    """last.pt of the run being resumed (None for a new run), refused unless its settings match this command's.
    The best score comes from the best checkpoint itself, so a run killed between the two files stays consistent."""
    if not config["resume"]:
        return None
    path = run.path("last.pt")
    state = read_checkpoint(path)
    if "config" not in state:
        raise DataError(f"--resume: {path} keeps no record of its settings, so what it continues cannot be checked")
    if state["stage"] != config["stage"]:
        raise DataError(f"--resume: {path} is a {state['stage']} run; add --stage={state['stage']}")
    saved = dict(IMPLIED, **state["config"])
    differences = [f"{k}={saved.get(k)!r} there, {v!r} here" for k, v in config.items()
                   if k not in SAFE_ON_RESUME and saved.get(k) != v]
    if differences:
        raise DataError(f"--resume: will not continue {run.out}, its settings differ: {'; '.join(differences)}")
    best = run.path("best_model.pt" if config["stage"] == "vqvae" else "best_prior.pt")
    state["best"] = read_checkpoint(best)["score"] if os.path.exists(best) else -math.inf
    return state


def check_same_data(run, state, data):
    """On resume, the data must be what the run was trained on: the same root and the same files in each split."""
    if state is None:
        return
    differences = [f"the {k} files differ" if isinstance(v, list) else f"{k} {state['data'].get(k)} there, {v} here"
                   for k, v in data.items() if state["data"].get(k) != v]
    if differences:
        raise DataError(f"--resume: will not continue {run.out} on other data: {'; '.join(differences)}")


def prepare_splits(run, splits, names, config):
    """Read, check and normalise the named splits (rank 0 fills the cache first); one-line errors, exit 1."""
    prepared = {}
    for s in names:
        if not run.master:
            run.barrier()
        prepared[s] = dataset.prepare(splits[s], config["cache_dir"], config["skip_bad"], desc=s)
        if run.master:
            run.barrier()
    skipped = [m for p in prepared.values() for m in p["skipped"]]
    if run.master and skipped:
        with open(run.path("skipped.txt"), "w") as f:
            f.write("\n".join(skipped) + "\n")
        run.log(f"skipped {len(skipped)} slices, constant or bad (listed in {run.path('skipped.txt')}):\n  "
                + "\n  ".join(skipped[:5]) + ("\n  ..." if len(skipped) > 5 else ""))
    return prepared


# ---- the training loop both stages share --------------------------------------------------------------------------

def lr_at(step, progress, peak, warmup):
    """Linear warm-up, then cosine decay to 10% over the run's progress (by steps or by wall time)."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def fit_settings(config):
    """The settings fit() uses, for the configured stage (the prior's carry a prior_ prefix in the block)."""
    p = "prior_" if config["stage"] == "prior" else ""
    return SimpleNamespace(lr=config[p + "learning_rate"], warmup=config[p + "warmup_steps"],
                           batch_size=config[p + "batch_size"], n_epochs=config[p + "n_epochs"],
                           grad_clip=config["grad_clip"], compile=config["compile"], seed=config["seed"],
                           time_limit_minutes=config["time_limit_minutes"], plot_every=config["plot_every"])


class StopRule:
    """When to leave the step loop: after the step that crosses the time limit, or on SIGTERM. Under DDP both come
    from rank 0, shared every SYNC_EVERY steps (reading them back is a host sync), so every rank leaves after the
    same step and follows the same wall-time learning-rate schedule."""

    def __init__(self, run, time_limit_minutes, elapsed):
        self.run = run
        self.limit = time_limit_minutes * 60 if time_limit_minutes else None
        self.t_start = time.time() - elapsed
        self.signalled = False
        self.shared = elapsed / self.limit if self.limit else 0.0  # rank 0's progress, as last shared
        signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signalled", True))

    def elapsed(self):
        return time.time() - self.t_start

    def used(self):
        return self.elapsed() / self.limit if self.limit else 0.0

    def progress(self):
        """Fraction of the time limit used: this process's clock, or rank 0's under DDP."""
        return self.shared if self.run.ddp else self.used()

    def check(self, global_step):
        """After a step: 'signal', 'time' or None."""
        used, signalled = self.used(), self.signalled
        if self.run.ddp:
            if global_step % SYNC_EVERY:
                return None
            t = torch.tensor([used, signalled], dtype=torch.float64, device=self.run.dev)
            dist.broadcast(t, 0)
            self.shared, signalled = t.tolist()
            used = self.shared
        return "signal" if signalled else "time" if used >= 1 else None


def restore(state, model, optimizer, run):
    """The loop's position: from last.pt when resuming (weights, optimiser and RNG restored too), else the start."""
    if state is None:
        return dict(epoch=0, step_in_epoch=0, global_step=0, rows=[], best=-math.inf, elapsed=0.0,
                    accum=torch.zeros(2))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_cpu"])
    if run.dev.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"])
    run.log(f"resuming {run.out} at epoch {state['epoch']} step {state['step_in_epoch']}")
    return {k: state[k] for k in ("epoch", "step_in_epoch", "global_step", "rows", "best", "elapsed", "accum")}


def save_last(run, model, optimizer, position, record):
    """Everything needed to continue exactly at `position`, with the record (stage, config, data) that --resume
    checks; written atomically."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), rng_cpu=torch.get_rng_state(),
                 **record, **position)
    if run.dev.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state()
    atomic_torch_save(state, run.path("last.pt"))


def write_epoch_files(run, rows, curves):
    """metrics.csv, and with `curves` the curve figures, redone from all rows (which last.pt keeps)."""
    with open(run.path("metrics.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[-1]))
        w.writeheader()
        w.writerows(rows)
    if curves:
        plot_curves(rows, run.out)


def check_ranks_agree(run, model):
    """Under DDP, the codebook EMA and restarts must leave every rank with the same state: compare fingerprints."""
    if not run.ddp:
        return
    digest = hashlib.sha1(b"".join(t.detach().cpu().numpy().tobytes() for t in model.state_dict().values()))
    digests = [None] * run.world
    dist.all_gather_object(digests, digest.hexdigest()[:12])
    run.log(f"state fingerprints {'identical on all' if len(set(digests)) == 1 else 'DIFFER across'} "
            f"{run.world} ranks: {' '.join(digests)}")


def wrap_model(run, model, compile_model):
    """What the training steps call: the model, through torch.compile if asked, and DDP under torchrun."""
    net = torch.compile(model) if compile_model else model
    if run.ddp:  # the quantiser keeps its buffers in step itself (all-reduced EMA), so no buffer broadcast
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[run.dev.index] if run.dev.type == "cuda"
                                                        else None, broadcast_buffers=False)
    return net


def epoch_batches(run, n, hp, epoch):
    """This rank's batches of an epoch as one index tensor on the device (one host-to-device copy per epoch) and
    the bounds of each batch in it."""
    plan = dataset.batches(n, hp.batch_size, hp.seed, epoch, run.rank, run.world)
    return torch.as_tensor(np.concatenate(plan), device=run.dev), np.cumsum([0] + [len(b) for b in plan]).tolist()


def mean_loss(run, accum, epoch):
    """The epoch's mean training loss over all ranks, from the on-device (loss sum, steps); a non-finite loss stops
    the run, leaving the last good checkpoints as they are."""
    loss_sum, n_steps = (run.all_sum(accum) / run.world).tolist()
    if not math.isfinite(loss_sum):
        sys.exit(f"error: training loss became {loss_sum} in epoch {epoch}; stopped, the last good "
                 f"checkpoints in {run.out} are kept")
    return loss_sum / max(n_steps, 1)


def fit(run, model, x_train, train_loss, validate, on_best, hp, record, state=None):
    """Train `model` on x_train (device tensor) with the settings hp (fit_settings), from `state` (last.pt) if given.

    train_loss(net, batch) -> (loss, logged scalar); validate(model) -> dict of floats with 'score' (higher is
    better); on_best(epoch, metrics) writes the best checkpoint and figures; record (stage, config, data) goes into
    every last.pt. Returns True if stopped by SIGTERM."""
    dev = run.dev
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp.lr, betas=(0.9, 0.99), weight_decay=0.0,
                                  fused=dev.type == "cuda")
    pos = restore(state, model, optimizer, run)
    net = wrap_model(run, model, hp.compile)
    stop = StopRule(run, hp.time_limit_minutes, pos["elapsed"])
    total_steps = hp.n_epochs * len(dataset.batches(len(x_train), hp.batch_size, hp.seed, 0, run.rank, run.world))
    model.train()
    reason, start_epoch = None, pos["epoch"]
    for epoch in range(start_epoch, hp.n_epochs):
        t_epoch = time.time()
        first = pos["step_in_epoch"] if epoch == start_epoch else 0
        accum = (pos["accum"] if first else torch.zeros(2)).to(dev)  # loss sum, steps: read once per epoch
        order, bounds = epoch_batches(run, len(x_train), hp, epoch)
        i = first - 1
        for i in tqdm(range(first, len(bounds) - 1), desc=f"epoch {epoch}", leave=False, disable=not run.master):
            # learning rate: warm-up, then cosine over steps or wall time, whichever is further along
            lr = lr_at(pos["global_step"], max(pos["global_step"] / total_steps, stop.progress()), hp.lr, hp.warmup)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # forward, backward, clip, step
            with run.autocast:
                loss, logged = train_loss(net, x_train[order[bounds[i]:bounds[i + 1]]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if hp.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), hp.grad_clip)
            optimizer.step()
            accum += torch.stack([logged.detach().float(), torch.ones((), device=dev)])
            pos["global_step"] += 1
            # the time limit or SIGTERM, decided on rank 0
            reason = stop.check(pos["global_step"])
            if reason:
                break
        if reason == "signal":  # save the position inside the epoch and leave; --resume continues from it
            if run.master:
                save_last(run, model, optimizer, dict(pos, epoch=epoch, step_in_epoch=i + 1, elapsed=stop.elapsed(),
                                                      accum=accum.cpu()), record)
            run.log(f"SIGTERM: saved {run.path('last.pt')} at epoch {epoch} step {i + 1}; "
                    f"continue with --resume={run.out}")
            return True
        # validate, then log the epoch
        train_loss_mean = mean_loss(run, accum, epoch)
        model.eval()
        metrics = validate(model)
        model.train()
        row = dict(epoch=epoch, steps=pos["global_step"], train_loss=train_loss_mean, **metrics,
                   lr=optimizer.param_groups[0]["lr"], seconds=time.time() - t_epoch)
        del row["score"]
        pos["rows"].append(row)
        run.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        run.log_scalars(row, record["stage"])
        # last.pt first (it holds the rows, so every file after it can be redone), then the best model and the files
        if run.master:
            improved = metrics["score"] > pos["best"]
            pos["best"] = max(pos["best"], metrics["score"])
            save_last(run, model, optimizer, dict(pos, epoch=epoch + 1, step_in_epoch=0, elapsed=stop.elapsed(),
                                                  accum=torch.zeros(2)), record)
            if improved:
                on_best(epoch, metrics)
            last = bool(reason) or epoch + 1 == hp.n_epochs
            write_epoch_files(run, pos["rows"], curves=last or (epoch + 1) % hp.plot_every == 0)
        if reason == "time":
            run.log(f"time limit of {hp.time_limit_minutes} min reached in epoch {epoch}")
            break
    check_ranks_agree(run, model)
    return False


# ---- stage 1: the VQ-VAE ------------------------------------------------------------------------------------------

ORGANS = (3, 4, 5)  # bladder, rectum, prostate: the labels organ_weight weighs


def vqvae_loss(net, batch, ssim_weight=0.0):
    """MSE + ssim_weight * (1 - SSIM) + the commitment term -> (loss, loss): the training step's loss (and bench's).
    A batch of images (B, 1, H, W), or (B, 2, H, W) with each pixel's MSE weight as the second channel."""
    xb, weight = batch[:, :1], batch[:, 1:]
    xh, commit, _ = net(xb)
    xh = xh.float()
    loss = (((xh - xb) ** 2 * weight).sum() / weight.sum() if weight.numel() else F.mse_loss(xh, xb)) + commit
    if ssim_weight:
        loss = loss + ssim_weight * (1 - ssim_torch(xh, xb).mean())
    return loss, loss


@torch.no_grad()
def validate_vqvae(run, model, x_val, n_codes, batch_size):
    """SSIM/PSNR on the device over the whole validation split (sharded over ranks), and code usage."""
    sums = torch.zeros(3, device=run.dev)  # ssim, psnr, count
    counts = torch.zeros(n_codes, device=run.dev, dtype=torch.long)
    for idx in dataset.batches(len(x_val), batch_size, 0, 0, run.rank, run.world, shuffle=False):
        xb = x_val[torch.as_tensor(idx, device=run.dev)]
        with run.autocast:
            xh, _, codes = model(xb)
        xh = xh.float().clamp(0, 1)
        sums += torch.stack([ssim_torch(xh, xb).sum(), psnr_torch(xh, xb).sum(), torch.tensor(len(idx), device=run.dev)])
        counts += code_counts(codes, n_codes, torch.long)
    sums, counts = run.all_sum(sums), run.all_sum(counts)
    ssim = float(sums[0] / sums[2])
    return dict(val_ssim=ssim, val_psnr=float(sums[1] / sums[2]), codebook_usage=float((counts > 0).double().mean()),
                perplexity=math.exp(entropy(counts)), score=ssim)


def write_split_files(run, root, prepared):
    """splits.json (the data root and each split's files) and data_samples.png (training slices as the model
    sees them)."""
    with open(run.path("splits.json"), "w") as f:
        json.dump({"data_root": os.path.abspath(root), **{s: p["files"] for s, p in prepared.items()}}, f, indent=1)
    x, files = prepared["train"]["x"], prepared["train"]["files"]
    pick = np.linspace(0, len(x) - 1, min(8, len(x))).astype(int)
    plot_grid(x[pick], run.path("data_samples.png"), [os.path.basename(files[i]).split(".")[0] for i in pick])


def train_vqvae(run, config, state):
    c = SimpleNamespace(**config)
    root = c.data_dir if (c.data_dir or c.train_dir) else dataset.ensure_demo() if run.master else dataset.DEMO_ROOT
    run.barrier()
    splits = dataset.find_splits(root, c.train_dir, c.validate_dir, c.test_dir, c.val_fraction, c.seed)
    data = dict(root=os.path.abspath(root), **splits)
    check_same_data(run, state, data)
    prepared = prepare_splits(run, splits, list(splits), config)
    if run.master:
        write_split_files(run, root, prepared)
        run.log(" ".join(f"{s}: {len(p['files'])} slices" for s, p in prepared.items()))
    # the whole split lives on the device; batches are drawn by index (no DataLoader, no per-batch host work)
    x_train = torch.from_numpy(prepared["train"]["x"]).to(run.dev)[:, None]
    if c.organ_weight and prepared["train"]["masks"] is not None:  # each pixel's loss weight rides as a channel
        organs = torch.from_numpy(np.isin(prepared["train"]["masks"], ORGANS)).to(run.dev)[:, None]
        x_train = torch.cat([x_train, 1 + c.organ_weight * organs.float()], 1)
    x_val = torch.from_numpy(prepared["validate"]["x"]).to(run.dev)[:, None]
    torch.manual_seed(c.seed)
    model_args = {k: config[k] for k in MODEL_KEYS}
    model = VQVAE(**model_args).to(run.dev)
    if run.dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)

    def on_best(epoch, m):
        atomic_torch_save(dict(kind="vqvae", model=model.state_dict(), model_args=model_args, config=config, epoch=epoch,
                               val_ssim=m["val_ssim"], score=m["score"], data_root=os.path.abspath(root),
                               image_size=[dataset.H, dataset.W],
                               normalisation="per-slice min-max to [0, 1]; x * (hi - lo) + lo restores units"),
                          run.path("best_model.pt"))
        if epoch == 0:
            plot_validation(run, model, prepared["validate"], "recon_epoch0.png",
                            f"validation, epoch 0, SSIM {m['val_ssim']:.4f}")
        if run.tb:
            run.tb.add_image("vqvae/validation originals over reconstructions",
                             validation_strip(run, model, prepared["validate"]), epoch, dataformats="HW")

    interrupted = fit(run, model, x_train, lambda net, xb: vqvae_loss(net, xb, c.ssim_weight),
                      lambda net: validate_vqvae(run, net, x_val, c.n_embeddings, c.eval_batch_size), on_best,
                      fit_settings(config), dict(stage="vqvae", config=config, data=data), state)
    if interrupted or not run.master:
        return
    best, ckpt = load_model(run.path("best_model.pt"), run.dev, kind="vqvae")
    plot_validation(run, best, prepared["validate"], "recon_best.png",
                    f"validation, best epoch {ckpt['epoch']}, SSIM {ckpt['val_ssim']:.4f}")
    if "test" not in prepared:
        run.log(f"no test split (no keras_slices_test folder under {root}, no --test_dir): the test is skipped")
        return
    test_best_model(run, best, ckpt, prepared["test"], c.eval_batch_size)


def reconstruct_shown(run, model, p):
    """The slices of a split that figures show (figure_slices) and their reconstructions; the model's train/eval
    mode is kept."""
    show = figure_slices(p)
    was_training = model.training
    rec, _ = reconstruct(model.eval(), p["x"][show], run.dev)
    model.train(was_training)
    return show, rec


def plot_validation(run, model, p, name, title):
    """Originals, reconstructions and errors of six validation slices."""
    show, rec = reconstruct_shown(run, model, p)
    plot_reconstructions(p["x"][show], rec, run.path(name), title, shown_masks(p, show))


def validation_strip(run, model, p):
    """The figure's validation slices above their reconstructions, as one (2 * 128, n * 256) image in [0, 1]."""
    show, rec = reconstruct_shown(run, model, p)
    return np.concatenate([np.concatenate(list(a.transpose(0, 2, 1)), 1) for a in (p["x"][show], rec.clip(0, 1))])


def test_best_model(run, best, ckpt, p, batch_size):
    """The best model on the test split, scored with the reference metric (scikit-image); it never chooses a model."""
    rows = list(csv.DictReader(open(run.path("metrics.csv"))))
    rec, scores, means = evaluate_split(best, p, run.dev, batch_size)
    result = dict(**means, best_epoch=ckpt["epoch"], val_ssim=ckpt["val_ssim"], epochs=len(rows),
                  train_seconds=sum(float(r["seconds"]) for r in rows))
    with open(run.path("test_metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_per_slice(run.path("test_per_slice.csv"), [os.path.basename(f) for f in p["files"]], scores)
    show = figure_slices(p)
    plot_reconstructions(p["x"][show], rec[show], run.path("recon_test.png"),
                         f"test split, best model (epoch {ckpt['epoch']}), mean SSIM {result['ssim']:.4f}",
                         shown_masks(p, show))
    run.log(f"test: ssim={result['ssim']:.4f} psnr={result['psnr']:.2f} on {result['n_slices']} slices"
            + "".join(f", {k} {r['ssim']:.4f} ({r['n_slices']})" for k, r in result.get("regions", {}).items()
                      if r["n_slices"]) + f" -> {run.out}")


# ---- stage 2: the prior over code grids ---------------------------------------------------------------------------

@torch.no_grad()
def validate_prior(run, model, codes_val, unigram_val, batch_size):
    """Bits per code of the validation grids, beside the unigram baseline."""
    sums = torch.zeros(2, device=run.dev)
    for idx in dataset.batches(len(codes_val), batch_size, 0, 0, run.rank, run.world, shuffle=False):
        with run.autocast:
            loss = model(codes_val[torch.as_tensor(idx, device=run.dev)])
        sums += torch.stack([loss.float() * len(idx), torch.tensor(float(len(idx)), device=run.dev)])
    sums = run.all_sum(sums)
    bits = float(sums[0] / sums[1]) / math.log(2)
    return dict(val_bits_per_code=bits, unigram_bits_per_code=unigram_val, score=-bits)


def prior_args(config, n_codes, grid):
    """CodePrior's arguments from the block's prior_* settings."""
    return dict(n_codes=n_codes, grid=grid, d_model=config["prior_d_model"], n_layers=config["prior_n_layers"],
                n_heads=config["prior_n_heads"], dropout=config["prior_dropout"], window=config["prior_window"],
                n_global_layers=config["prior_global_layers"], scan=config["prior_scan"])


def train_prior(run, config, state):
    c = SimpleNamespace(**config)
    vq_path = c.vqvae_checkpoint or newest("runs/*/best_model.pt")
    if vq_path is None:
        raise DataError("--stage=prior needs a trained VQ-VAE: no runs/*/best_model.pt; give --vqvae_checkpoint")
    vq_path = os.path.abspath(vq_path)
    vqvae, vq_ckpt = load_model(vq_path, run.dev, kind="vqvae")
    with open(os.path.join(os.path.dirname(vq_path), "splits.json")) as f:
        splits = json.load(f)  # the VQ-VAE's own patient split
    data = dict(vqvae_checkpoint=vq_path, train=splits["train"], validate=splits["validate"])
    check_same_data(run, state, data)
    prepared = prepare_splits(run, splits, ["train", "validate"], config)
    # encode once with the frozen VQ-VAE; the code grids live on the device
    codes = {s: torch.from_numpy(reconstruct(vqvae, prepared[s]["x"], run.dev, c.eval_batch_size)[1]).to(run.dev)
             for s in ("train", "validate")}
    n_codes, grid = vq_ckpt["model_args"]["n_embeddings"], tuple(codes["train"].shape[1:])
    # the baseline: validation codes under the training split's unigram distribution (add-one smoothed)
    train_counts, val_counts = (code_counts(codes[s], n_codes, torch.long) for s in ("train", "validate"))
    unigram_val = entropy(val_counts, train_counts + 1) / math.log(2)
    run.log(f"codes {tuple(codes['train'].shape)}; unigram entropy of train codes "
            f"{entropy(train_counts) / math.log(2):.3f} bits, validation under train unigram {unigram_val:.3f} bits")
    torch.manual_seed(c.seed)
    model_args = prior_args(config, n_codes, grid)
    model = CodePrior(**model_args).to(run.dev)

    def prior_loss(net, cb):
        loss = net(cb)
        return loss, loss / math.log(2)

    def on_best(epoch, m):
        atomic_torch_save(dict(kind="prior", model=model.state_dict(), model_args=model_args, config=config,
                               epoch=epoch, val_bits_per_code=m["val_bits_per_code"], score=m["score"],
                               unigram_bits_per_code=unigram_val, vqvae_checkpoint=vq_path), run.path("best_prior.pt"))

    fit(run, model, codes["train"], prior_loss,
        lambda net: validate_prior(run, net, codes["validate"], unigram_val, c.eval_batch_size), on_best,
        fit_settings(config), dict(stage="prior", config=config, data=data), state)


def main():
    config = configure(globals(), config_keys, sys.argv[1:], types=TYPES)
    check_ranges(config, RANGES)
    if config["prior_d_model"] % config["prior_n_heads"]:
        raise DataError(f"--prior_d_model={prior_d_model} must be a multiple of --prior_n_heads={prior_n_heads}")
    run = setup_run(config)
    config["out_dir"] = run.out
    state = load_resume_state(run, config)
    (train_vqvae if config["stage"] == "vqvae" else train_prior)(run, config, state)
    if run.ddp:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
