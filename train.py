"""Train the VQ-VAE on 2D pelvic MRI slices (stage 1), or the prior over its code grids (stage 2).

    python train.py config/cpu.py --time_limit_minutes=3   # the CPU quickstart, on the synthetic phantom
    python train.py --data_dir=/path/keras_slices_data     # the block's defaults: 150 epochs on one GPU
    python train.py --stage=prior                          # the prior, on the newest VQ-VAE run's codes
    torchrun --nproc_per_node=4 train.py --data_dir=...    # several GPUs (or CPU processes with gloo)

Every epoch is validated (SSIM/PSNR for the VQ-VAE, bits per code for the prior) and the best model is kept. The
block below holds every option: edit it, or override it with config files (config/*.py) and --name=value.
"""
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import dataset
import figures
import options
import phantom
from job import Job, StopRule
from metrics import entropy, evaluate_split, psnr_torch, ssim_torch, write_per_slice
from modules import VQVAE, CodePrior, code_counts, reconstruct
from options import Option
from utils import DataError, Terminated, WriteError, doing, run_script, write_csv, write_text

AUTO = ("auto", True, False)

# ---- the block: defaults for the 150-epoch run on one cluster GPU; config/*.py holds the CPU runs -------------
BLOCK = dict(
    stage=Option("vqvae", choices=("vqvae", "prior")),  # "vqvae": the autoencoder; "prior": a model of its codes
    # data
    data_dir=Option(None, kind=str),       # course-layout root (keras_slices_{train,validate,test}); None = phantom
    train_dir=Option(None, kind=str),      # per-split folders, each overriding data_dir's
    validate_dir=Option(None, kind=str),   # absent: whole patients are held out of the training folder
    test_dir=Option(None, kind=str),
    val_fraction=Option(0.1, above=0, below=1),  # share of training patients held out without a validation folder
    skip_bad=Option(False),                # True: drop unreadable or invalid slices and list them in skipped.txt
    cache_dir=Option("data/cache", nullable=True, resumable=True),  # prepared arrays, keyed by files; None: none
    # VQ-VAE: a 256x128 slice -> a 64x32 grid of codes; defaults chosen at equal epochs (EXPERIMENTS.md)
    n_hiddens=Option(128, at_least=2),     # encoder/decoder width: 128 beat 64 at equal epochs
    n_residual_hiddens=Option(32, at_least=1),
    n_residual_layers=Option(2, at_least=0),  # 4 did not beat 2 at equal epochs
    embedding_dim=Option(64, at_least=1),
    n_embeddings=Option(512, at_least=1),
    n_down=Option(2, choices=(2, 3)),      # stride-2 convolutions: 2 gives a 64x32 grid of codes, 3 a 32x16 grid
    beta=Option(0.25, at_least=0),         # commitment weight
    ema_decay=Option(0.99, at_least=0, below=1),  # codebook moving-average decay
    learning_rate=Option(4e-3, above=0),   # 2e-3 * sqrt(batch_size / 8): rescale it with the batch size
    batch_size=Option(32, at_least=1),     # 8 takes 4x the steps per epoch: better on the small demo, slow on a GPU
    n_epochs=Option(150, at_least=1, resumable=True),
    warmup_steps=Option(25, at_least=1),   # 800 images at batch 32
    ssim_weight=Option(0.1, at_least=0),   # loss = MSE + ssim_weight * (1 - SSIM) + commitment; 0.1 beat 0
    organ_weight=Option(0.0, at_least=0),  # where the training data has labels, MSE weighs 1 + this on the organs
    # prior (stage 2)
    vqvae_checkpoint=Option(None, kind=str),  # the frozen VQ-VAE; None = the newest runs/*/best_model.pt
    prior_patch=Option(2, choices=(1, 2, 4)),  # codes per token side: a 64x32 grid in 2x2 patches is 512 tokens
    prior_d_model=Option(256, at_least=1),  # the GPU run's size; config/demo_generation.py sizes it for a CPU
    prior_n_layers=Option(8, at_least=1),
    prior_n_heads=Option(8, at_least=1),
    prior_dropout=Option(0.1, at_least=0, below=1),
    prior_weight_decay=Option(0.0, at_least=0),  # AdamW's, on the prior's weight matrices and embeddings
    prior_augment=Option(0, at_least=0),  # training slices flipped, zoomed and shifted, this many copies of each,
                                          # encoded by the frozen VQ-VAE as more training grids
    prior_learning_rate=Option(1e-3, above=0),
    prior_batch_size=Option(32, at_least=1),
    prior_n_epochs=Option(100, at_least=1, resumable=True),
    prior_warmup_steps=Option(200, at_least=1),
    # both stages
    grad_clip=Option(1.0, at_least=0),
    out_dir=Option(None, kind=str, resumable=True),  # None = a new runs/YYYYmmdd-HHMMSS; a run is never overwritten
    seed=Option(1337),
    device=Option("auto", resumable=True),  # auto = cuda if available, else cpu
    # the GPU path, each "auto" (on where the device is CUDA) or True/False, so that a CPU can run it too
    amp=Option("auto", kind=(str, bool), choices=AUTO, resumable=True),  # bf16 autocast; the quantiser stays fp32
    fused_adamw=Option("auto", kind=(str, bool), choices=AUTO, resumable=True),  # AdamW's fused kernel
    channels_last=Option("auto", kind=(str, bool), choices=AUTO, resumable=True),  # the convolutions' layout
    compile=Option(False, resumable=True),  # torch.compile the model
    time_limit_minutes=Option(None, kind=float, above=0, resumable=True),  # stop after the step that crosses it
    max_steps=Option(None, kind=int, at_least=1, resumable=True),  # stop after this many steps: a budget that is the
                                                                   # same on any machine
    resume=Option(False, kind=(bool, str), resumable=True),  # True: out_dir, or the newest matching run; or a path
    eval_batch_size=Option(64, at_least=1, resumable=True),
    plot_every=Option(10, at_least=1, resumable=True),  # epochs between redraws of the curves (and at the end)
    tensorboard=Option(False, resumable=True),  # also log to <run>/tensorboard (needs the tensorboard package)
)


def check(cfg):
    """What no single option's range can say."""
    if cfg.prior_d_model % cfg.prior_n_heads:
        raise DataError(f"--prior_d_model={cfg.prior_d_model} must be a multiple of "
                        f"--prior_n_heads={cfg.prior_n_heads}")


# ---- stage 1: the VQ-VAE -------------------------------------------------------------------------------------

ORGANS = (3, 4, 5)  # bladder, rectum, prostate: the labels organ_weight weighs


def vqvae_args(cfg):
    return dict(n_hiddens=cfg.n_hiddens, n_residual_hiddens=cfg.n_residual_hiddens,
                n_residual_layers=cfg.n_residual_layers, embedding_dim=cfg.embedding_dim,
                n_embeddings=cfg.n_embeddings, beta=cfg.beta, ema_decay=cfg.ema_decay, n_down=cfg.n_down)


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
def validate_vqvae(job, model, x_val, n_codes, batch_size):
    """SSIM/PSNR on the device over the whole validation split (sharded over ranks), and code usage."""
    sums = torch.zeros(3, device=job.dev)  # ssim, psnr, count
    counts = torch.zeros(n_codes, device=job.dev, dtype=torch.long)
    for idx in dataset.batches(len(x_val), batch_size, 0, 0, job.rank, job.world, shuffle=False):
        xb = x_val[torch.as_tensor(idx, device=job.dev)]
        with job.autocast:
            xh, _, codes = model(xb)
        xh = xh.float().clamp(0, 1)
        n = torch.tensor(len(idx), device=job.dev)
        sums += torch.stack([ssim_torch(xh, xb).sum(), psnr_torch(xh, xb).sum(), n])
        counts += code_counts(codes, n_codes, torch.long)
    sums, counts = job.all_sum(sums), job.all_sum(counts)
    ssim = float(sums[0] / sums[2])
    return dict(val_ssim=ssim, val_psnr=float(sums[1] / sums[2]), codebook_usage=float((counts > 0).double().mean()),
                perplexity=math.exp(entropy(counts)), score=ssim)


class VQVAEStage:
    """The slices, the autoencoder, its loss and validation, what its best epoch keeps, and the test at the end."""
    name, best_file = "vqvae", "best_model.pt"

    def __init__(self, job, cfg, state):
        self.job, self.cfg = job, cfg
        demo = not (cfg.data_dir or cfg.train_dir)
        self.root = ((phantom.ensure_demo() if job.master else phantom.DEMO_ROOT) if demo else
                     cfg.data_dir or os.path.dirname(os.path.abspath(cfg.train_dir)))  # per-split folders: their parent
        job.barrier()
        splits = dataset.find_splits(self.root, cfg.train_dir, cfg.validate_dir, cfg.test_dir, cfg.val_fraction,
                                     cfg.seed)
        self.data = dict(root=os.path.abspath(self.root), **splits)  # what --resume checks
        job.check_same_data(state, self.data)
        self.prepared = prepare_splits(job, splits, list(splits), cfg)
        if job.master:
            self.write_split_files()
        # the whole split lives on the device; batches are drawn by index (no DataLoader, no per-batch host work)
        train = self.prepared["train"]
        self.x_train = torch.from_numpy(train["x"]).to(job.dev)[:, None]
        if cfg.organ_weight and train["masks"] is not None:  # each pixel's loss weight rides as a channel
            organs = torch.from_numpy(np.isin(train["masks"], ORGANS)).to(job.dev)[:, None]
            self.x_train = torch.cat([self.x_train, 1 + cfg.organ_weight * organs.float()], 1)
        self.x_val = torch.from_numpy(self.prepared["validate"]["x"]).to(job.dev)[:, None]
        torch.manual_seed(cfg.seed)
        self.model = VQVAE(**vqvae_args(cfg)).to(job.dev)
        if job.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.lr, self.warmup, self.batch_size, self.n_epochs = (cfg.learning_rate, cfg.warmup_steps, cfg.batch_size,
                                                                cfg.n_epochs)

    def write_split_files(self):
        """splits.json and data_samples.png (training slices as the model sees them)."""
        dataset.write_splits(self.job.path("splits.json"), self.root, self.prepared)
        x, files = self.prepared["train"]["x"], self.prepared["train"]["files"]
        pick = np.linspace(0, len(x) - 1, min(8, len(x))).astype(int)
        figures.plot_grid(x[pick], self.job.path("data_samples.png"),
                          [os.path.basename(files[i]).split(".")[0] for i in pick])
        self.job.log(" ".join(f"{s}: {len(p['files'])} slices" for s, p in self.prepared.items()))

    def param_groups(self):
        return [dict(params=list(self.model.parameters()), weight_decay=0.0)]

    def loss(self, net, batch):
        return vqvae_loss(net, batch, self.cfg.ssim_weight)

    def validate(self):
        return validate_vqvae(self.job, self.model, self.x_val, self.cfg.n_embeddings, self.cfg.eval_batch_size)

    def keep_best(self, epoch, m):
        checkpoints.save(self.job.path(self.best_file), "vqvae", model=self.model.state_dict(),
                         model_args=vqvae_args(self.cfg), config=vars(self.cfg), epoch=epoch, val_ssim=m["val_ssim"],
                         score=m["score"], data_root=os.path.abspath(self.root), image_size=[dataset.H, dataset.W],
                         normalisation="per-slice min-max to [0, 1]; x * (hi - lo) + lo restores units")
        if epoch == 0:
            self.plot_validation(self.model, "recon_epoch0.png", f"validation, epoch 0, SSIM {m['val_ssim']:.4f}")
        if self.job.tb:
            p = self.prepared["validate"]
            show = figures.figure_slices(p)
            self.job.tb.add_image("vqvae/validation originals over reconstructions",
                                  figures.strip(p["x"][show], self.reconstruct(self.model, p["x"][show])), epoch,
                                  dataformats="HW")

    def reconstruct(self, model, x):
        """Reconstructions of x (N, H, W), the model's train/eval mode kept."""
        was_training = model.training
        rec, _ = reconstruct(model.eval(), x, self.job.dev, amp=self.job.amp)
        model.train(was_training)
        return rec

    def plot_validation(self, model, name, title):
        figures.plot_split(self.prepared["validate"], lambda show: self.reconstruct(
            model, self.prepared["validate"]["x"][show]), self.job.path(name), title)

    def finish(self, rows):
        """The best model: its validation figure, then the test split, scored with the reference metric
        (scikit-image). The test split never chooses a model."""
        doing("scoring the best model on the test split")
        best, ckpt = checkpoints.load_model(self.job.path(self.best_file), self.job.dev, "vqvae")
        self.plot_validation(best, "recon_best.png",
                             f"validation, best epoch {ckpt['epoch']}, SSIM {ckpt['val_ssim']:.4f}")
        if "test" not in self.prepared:
            self.job.log(f"no test split (no keras_slices_test folder under {self.root}, no --test_dir): the test "
                         "is skipped")
            return
        p = self.prepared["test"]
        rec, scores, means = evaluate_split(best, p, self.job.dev, self.cfg.eval_batch_size, self.job.amp)
        result = dict(**means, best_epoch=ckpt["epoch"], val_ssim=ckpt["val_ssim"], epochs=len(rows),
                      train_seconds=sum(float(r["seconds"]) for r in rows))
        write_text(self.job.path("test_metrics.json"), json.dumps(result, indent=1))
        write_per_slice(self.job.path("test_per_slice.csv"), [os.path.basename(f) for f in p["files"]], scores)
        figures.plot_split(p, lambda show: rec[show], self.job.path("recon_test.png"),
                           f"test split, best model (epoch {ckpt['epoch']}), mean SSIM {result['ssim']:.4f}")
        self.job.log(f"test: ssim={result['ssim']:.4f} psnr={result['psnr']:.2f} on {result['n_slices']} slices"
                     + "".join(f", {k} {r['ssim']:.4f} ({r['n_slices']})" for k, r in result.get("regions", {}).items()
                               if r["n_slices"]) + f" -> {self.job.out}")


# ---- stage 2: the prior over code grids ----------------------------------------------------------------------

def prior_args(cfg, n_codes, grid):
    """CodePrior's arguments from the block's prior_* settings."""
    return dict(n_codes=n_codes, grid=grid, patch=cfg.prior_patch, d_model=cfg.prior_d_model,
                n_layers=cfg.prior_n_layers, n_heads=cfg.prior_n_heads, dropout=cfg.prior_dropout)


class PriorStage:
    """The frozen VQ-VAE's code grids of its own train and validation splits, the prior, its loss (nats per code)
    and validation (bits per code beside the unigram baseline), and what its best epoch keeps."""
    name, best_file = "prior", "best_prior.pt"

    def __init__(self, job, cfg, state):
        self.job, self.cfg = job, cfg
        self.vq_path = os.path.abspath(checkpoints.find(cfg.vqvae_checkpoint, "runs/*/best_model.pt"))
        vqvae, vq_ckpt = checkpoints.load_model(self.vq_path, job.dev, "vqvae")
        splits = dataset.read_splits(os.path.dirname(self.vq_path))  # the VQ-VAE's own patient split
        self.data = dict(vqvae_checkpoint=self.vq_path, train=splits["train"], validate=splits["validate"])
        job.check_same_data(state, self.data)
        prepared = prepare_splits(job, splits, ["train", "validate"], cfg)
        self.x_train, self.codes_val = self.encode(vqvae, prepared)
        n_codes = vq_ckpt["model_args"]["n_embeddings"]
        # the baseline: validation codes under the training split's unigram distribution (add-one smoothed)
        train_counts, val_counts = (code_counts(c, n_codes, torch.long) for c in (self.x_train, self.codes_val))
        self.unigram = entropy(val_counts, train_counts + 1) / math.log(2)
        train_bits = entropy(train_counts) / math.log(2)
        job.log(f"codes {tuple(self.x_train.shape)}; unigram entropy of train codes {train_bits:.3f} bits, validation "
                f"under train unigram {self.unigram:.3f} bits")
        torch.manual_seed(cfg.seed)
        self.model_args = prior_args(cfg, n_codes, tuple(self.x_train.shape[1:]))
        self.model = CodePrior(**self.model_args).to(job.dev)
        self.lr, self.warmup, self.batch_size, self.n_epochs = (cfg.prior_learning_rate, cfg.prior_warmup_steps,
                                                                cfg.prior_batch_size, cfg.prior_n_epochs)

    def encode(self, vqvae, prepared):
        """The code grids, on the device, of the training slices and of prior_augment augmented copies of them (one
        copy in memory at a time), and of the validation slices, each encoded once by the frozen VQ-VAE."""
        cfg, job, rng = self.cfg, self.job, np.random.default_rng(self.cfg.seed)
        doing(f"encoding the training and validation slices with {self.vq_path}")

        def grids(x):
            _, codes = reconstruct(vqvae, x, job.dev, cfg.eval_batch_size, job.amp, decode=False)
            return torch.from_numpy(codes).to(job.dev)
        x = prepared["train"]["x"]
        train = torch.cat([grids(x)] + [grids(dataset.augment(x, rng)) for _ in range(cfg.prior_augment)])
        return train, grids(prepared["validate"]["x"])

    def param_groups(self):
        """Weight decay on the weight matrices and embeddings, none on biases and norms (as nanoGPT)."""
        params = list(self.model.parameters())
        return [dict(params=[p for p in params if p.dim() >= 2], weight_decay=self.cfg.prior_weight_decay),
                dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]

    def loss(self, net, codes):
        loss = net(codes)
        return loss, loss / math.log(2)

    @torch.no_grad()
    def validate(self):
        """Bits per code of the validation grids, beside the unigram baseline."""
        job, sums = self.job, torch.zeros(2, device=self.job.dev)
        for idx in dataset.batches(len(self.codes_val), self.cfg.eval_batch_size, 0, 0, job.rank, job.world,
                                   shuffle=False):
            with job.autocast:
                loss = self.model(self.codes_val[torch.as_tensor(idx, device=job.dev)])
            sums += torch.stack([loss.float() * len(idx), torch.tensor(float(len(idx)), device=job.dev)])
        bits = float(job.all_sum(sums)[0] / sums[1]) / math.log(2)
        return dict(val_bits_per_code=bits, unigram_bits_per_code=self.unigram, score=-bits)

    def keep_best(self, epoch, m):
        checkpoints.save(self.job.path(self.best_file), "prior", model=self.model.state_dict(),
                         model_args=self.model_args, config=vars(self.cfg), epoch=epoch,
                         val_bits_per_code=m["val_bits_per_code"], score=m["score"],
                         unigram_bits_per_code=self.unigram, vqvae_checkpoint=self.vq_path)

    def finish(self, rows):
        pass


def prepare_splits(job, splits, names, cfg):
    """Read, check and normalise the named splits (rank 0 fills the cache first); skipped slices are listed."""
    prepared = {}
    for s in names:
        if not job.master:
            job.barrier()
        prepared[s] = dataset.prepare(splits[s], cfg.cache_dir, cfg.skip_bad, desc=s)
        if job.master:
            job.barrier()
    skipped = [m for p in prepared.values() for m in p["skipped"]]
    if job.master and skipped:
        write_text(job.path("skipped.txt"), "\n".join(skipped) + "\n")
        job.log(f"skipped {len(skipped)} slices, constant or bad (listed in {job.path('skipped.txt')}):\n  "
                + "\n  ".join(skipped[:5]) + ("\n  ..." if len(skipped) > 5 else ""))
    return prepared


# ---- the loop both stages share ------------------------------------------------------------------------------

def lr_at(step, progress, peak, warmup):
    """Linear warm-up, then cosine decay to 10% over the run's progress (by steps or by wall time)."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(job, cfg, stage, state):
    """Train stage.model from the start or from last.pt's position -> the rows of metrics.csv, or None if SIGTERM
    stopped it (last.pt then holds the position inside the epoch, and --resume continues from it)."""
    model, dev = stage.model, job.dev
    optimizer = torch.optim.AdamW(stage.param_groups(), lr=stage.lr, betas=(0.9, 0.99), fused=job.fused_adamw)
    pos = restore(job, state, model, optimizer)
    net = job.wrap(model, cfg.compile)
    stop = StopRule(job, cfg.time_limit_minutes, pos["elapsed"], cfg.max_steps)  # till close(): SIGTERM stops cleanly
    total_steps = min(stage.n_epochs * len(epoch_plan(job, stage, cfg.seed, 0)), cfg.max_steps or math.inf)
    model.train()
    reason = None
    for epoch in range(pos["epoch"], stage.n_epochs):
        t_epoch = time.time()
        first, pos["step_in_epoch"] = pos["step_in_epoch"], 0
        accum = (pos["accum"] if first else torch.zeros(2)).to(dev)  # loss sum, steps: read once per epoch
        plan = epoch_plan(job, stage, cfg.seed, epoch)
        order = torch.as_tensor(np.concatenate(plan), device=dev)  # one host-to-device copy per epoch
        bounds = np.cumsum([0] + [len(b) for b in plan]).tolist()
        i = first - 1
        for i in job.progress(range(first, len(plan)), f"epoch {epoch}"):
            # learning rate: warm-up, then cosine over steps or wall time, whichever is further along
            lr = lr_at(pos["global_step"], max(pos["global_step"] / total_steps, stop.progress()), stage.lr,
                       stage.warmup)
            for g in optimizer.param_groups:
                g["lr"] = lr
            # batch, forward and loss, backward, clip, step
            with job.autocast:
                loss, logged = stage.loss(net, stage.x_train[order[bounds[i]:bounds[i + 1]]])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            accum += torch.stack([logged.detach().float(), torch.ones((), device=dev)])
            pos["global_step"] += 1
            # the time limit or SIGTERM, decided on rank 0
            reason = stop.check(pos["global_step"])
            if reason:
                break
        if reason == "signal":  # save the position inside the epoch and leave
            if job.master:
                save_last(job, stage, optimizer, dict(pos, epoch=epoch, step_in_epoch=i + 1, elapsed=stop.elapsed(),
                                                      accum=accum.cpu()))
            job.log(f"SIGTERM: saved {job.path('last.pt')} at epoch {epoch} step {i + 1}; continue with "
                    f"--resume={job.out}")
            break
        # validate, log, then last.pt, the best model and the epoch's files
        row = end_epoch(job, cfg, stage, optimizer, pos, epoch, accum, t_epoch)
        save_epoch(job, stage, optimizer, pos, row, last=bool(reason) or epoch + 1 == stage.n_epochs, plot=(
            epoch + 1) % cfg.plot_every == 0, elapsed=stop.elapsed())
        if reason:
            job.log(f"{stop.limit_text(reason)} reached in epoch {epoch}")
            break
    stop.close(reason)
    job.check_ranks_agree(model)
    return None if reason == "signal" else pos["rows"]


def epoch_plan(job, stage, seed, epoch):
    """This rank's index batches of an epoch."""
    return dataset.batches(len(stage.x_train), stage.batch_size, seed, epoch, job.rank, job.world)


def end_epoch(job, cfg, stage, optimizer, pos, epoch, accum, t_epoch):
    """The epoch's row: the mean training loss over all ranks (a non-finite one stops the run, leaving the last
    good checkpoints as they are), the validation metrics, the learning rate and the seconds it took."""
    loss_sum, n_steps = (job.all_sum(accum) / job.world).tolist()
    if not math.isfinite(loss_sum):
        raise DataError(f"training loss became {loss_sum} in epoch {epoch}; stopped, the last good checkpoints in "
                        f"{job.out} are kept")
    stage.model.eval()
    metrics = stage.validate()
    stage.model.train()
    row = dict(epoch=epoch, steps=pos["global_step"], train_loss=loss_sum / max(n_steps, 1), **metrics,
               lr=optimizer.param_groups[0]["lr"], seconds=time.time() - t_epoch)
    job.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "score"))
    return row


def save_epoch(job, stage, optimizer, pos, row, last, plot, elapsed):
    """last.pt first (it holds the rows, so every file after it can be redone), then the best model and the
    epoch's files, on rank 0."""
    score = row.pop("score")
    pos["rows"].append(row)
    job.log_scalars(row, stage.name)
    if not job.master:
        return
    improved = score > pos["best"]
    pos["best"] = max(pos["best"], score)
    save_last(job, stage, optimizer, dict(pos, epoch=row["epoch"] + 1, step_in_epoch=0, elapsed=elapsed,
                                          accum=torch.zeros(2)))
    if improved:
        stage.keep_best(row["epoch"], dict(row, score=score))
    write_csv(job.path("metrics.csv"), list(row), [list(r.values()) for r in pos["rows"]])
    if last or plot:
        figures.plot_curves(pos["rows"], job.out)


def restore(job, state, model, optimizer):
    """The loop's position: from last.pt when resuming (weights, optimiser and RNG restored too), else the start."""
    if state is None:
        return dict(epoch=0, step_in_epoch=0, global_step=0, rows=[], best=-math.inf, elapsed=0.0,
                    accum=torch.zeros(2))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    if job.dev.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    pos = state["position"]
    job.log(f"resuming {job.out} at epoch {pos['epoch']} step {pos['step_in_epoch']}")
    return pos


def save_last(job, stage, optimizer, position):
    """Everything needed to continue exactly at `position`, with the settings and data that --resume checks."""
    rng = dict(cpu=torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if job.dev.type == "cuda" else {}))
    checkpoints.save(job.path("last.pt"), "state", model=stage.model.state_dict(), optimizer=optimizer.state_dict(),
                     rng=rng, stage=stage.name, config=vars(stage.cfg), data=stage.data, position=position)


# ---- the run ---------------------------------------------------------------------------------------------------

def main(argv):
    cfg = options.parse(BLOCK, argv)
    check(cfg)
    job = Job(cfg)
    cfg.out_dir = job.out
    try:
        state = job.resume_state(cfg, BLOCK)
        stage = (VQVAEStage if cfg.stage == "vqvae" else PriorStage)(job, cfg, state)
        rows = train(job, cfg, stage, state)
        if rows is not None and job.master:
            stage.finish(rows)
    except (WriteError, Terminated) as e:  # disk full, quota, read-only, or SIGTERM: say what the run keeps
        raise type(e)(f"{e}; {checkpoints.kept(job.out)}") from None
    finally:
        job.close()


if __name__ == "__main__":
    run_script(main)
