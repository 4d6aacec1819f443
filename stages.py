"""What each model trains on: its data, its loss, its validation, what its best epoch keeps and what is done at the
end. Stage is the contract that train.py's loop asks of every stage; the block's options (train.py) configure them.

    VQVAEStage   the VQ-VAE on the study's slices; the test split scored at the end (stage 1)
    PriorStage   a prior over a frozen VQ-VAE's code grids of that run's own splits (stage 2)
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import dataset
import figures
import phantom
from metrics import entropy, evaluate_split, psnr_torch, reconstruct, ssim_torch, write_per_slice
from prior import CodePrior
from utils import doing, write_text
from vqvae import VQVAE, code_counts


# ---- what the loop asks of a stage ---------------------------------------------------------------------------

class Stage:
    """A stage of training: what train() needs to train one model, and nothing of how the loop runs.

    name, best_file   the stage's name in last.pt and logs; the checkpoint its best epoch writes
    model             the module trained (train() wraps it for torch.compile and DDP)
    data              what --resume checks is unchanged (the data root and each split's files)
    n_train           the number of training items; an epoch is a seeded permutation of them in batches
    lr, warmup, batch_size, n_epochs    the peak learning rate, its warm-up steps, the batch and the epochs
    batch(idx)        a tensor of item indices on the device -> what loss() takes
    loss(net, batch)  -> (the loss to backpropagate, the value to log), under autocast
    param_groups()    the optimiser's parameter groups (weight decay per group)
    validate()        the model in eval mode -> {metric: value}, with `score` (higher is better) for keep_best
    keep_best(epoch, metrics)           write best_file: called on rank 0 when the score improves
    finish(rows)      after the last epoch, on rank 0, with every epoch's metrics (the test, for instance)
    """
    name = best_file = None

    def finish(self, rows):
        pass


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


class VQVAEStage(Stage):
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
        self.prepared = job.prepare(splits, list(splits), cfg.cache_dir, cfg.skip_bad)
        if job.master:
            self.write_split_files()
        # the whole split lives on the device; batches are drawn by index (no DataLoader, no per-batch host work)
        train = self.prepared["train"]
        self.x_train = torch.from_numpy(train["x"]).to(job.dev)[:, None]
        if cfg.organ_weight and train["masks"] is not None:  # each pixel's loss weight rides as a channel
            organs = torch.from_numpy(np.isin(train["masks"], ORGANS)).to(job.dev)[:, None]
            self.x_train = torch.cat([self.x_train, 1 + cfg.organ_weight * organs.float()], 1)
        self.x_val = torch.from_numpy(self.prepared["validate"]["x"]).to(job.dev)[:, None]
        self.n_train = len(self.x_train)
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

    def batch(self, idx):
        return self.x_train[idx]

    def param_groups(self):
        return [dict(params=list(self.model.parameters()), weight_decay=0.0)]

    def loss(self, net, batch):
        return vqvae_loss(net, batch, self.cfg.ssim_weight)

    def validate(self):
        return validate_vqvae(self.job, self.model, self.x_val, self.cfg.n_embeddings, self.cfg.eval_batch_size)

    def keep_best(self, epoch, m):
        checkpoints.save_model(self.job.path(self.best_file), "vqvae", self.model, vqvae_args(self.cfg),
                               config=vars(self.cfg), epoch=epoch, val_ssim=m["val_ssim"], score=m["score"],
                               data_root=os.path.abspath(self.root), image_size=[dataset.H, dataset.W],
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


class PriorStage(Stage):
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
        prepared = job.prepare(splits, ["train", "validate"], cfg.cache_dir, cfg.skip_bad)
        self.x_train, self.codes_val = self.encode(vqvae, prepared)
        self.n_train = len(self.x_train)
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

    def batch(self, idx):
        return self.x_train[idx]

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
        checkpoints.save_model(self.job.path(self.best_file), "prior", self.model, self.model_args,
                               config=vars(self.cfg), epoch=epoch, val_bits_per_code=m["val_bits_per_code"],
                               score=m["score"], unigram_bits_per_code=self.unigram, vqvae_checkpoint=self.vq_path)


STAGES = {stage.name: stage for stage in (VQVAEStage, PriorStage)}  # --stage=NAME
