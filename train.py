"""Train the VQ-VAE on 2D pelvic MRI slices (stage 1), or the prior over its code grids (stage 2): the option block,
and the loop that trains any stage (stages.py says what each stage trains on, and stages.Stage what the loop asks).

    python train.py config/cpu.py --time_limit_minutes=3   # the CPU quickstart, on the synthetic phantom
    python train.py --data_dir=/path/keras_slices_data     # the block's defaults: 150 epochs on one GPU
    python train.py --stage=prior                          # the prior, on the newest VQ-VAE run's codes
    torchrun --nproc_per_node=4 train.py --data_dir=...    # several GPUs (or CPU processes with gloo)

Every epoch is validated (SSIM/PSNR for the VQ-VAE, bits per code for the prior) and the best model is kept. The
block below holds every option: edit it, or override it with config files (config/*.py) and --name=value.
"""
import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

import checkpoints
import dataset
import figures
import options
from job import Job, StopRule, lr_at
from options import Option
from stages import STAGES
from utils import DataError, Terminated, WriteError, run_script, write_csv

AUTO = ("auto", True, False)

# ---- the block: defaults for the 150-epoch run on one cluster GPU; config/*.py holds the CPU runs -------------
BLOCK = dict(
    stage=Option("vqvae", choices=tuple(STAGES)),  # "vqvae": the autoencoder; "prior": a model of its codes
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


# ---- the loop any stage runs -----------------------------------------------------------------------------------

@dataclass
class Position:
    """Where training stands: last.pt keeps it, so that --resume continues at the very step."""
    epoch: int = 0            # the epoch in progress (or next)
    step_in_epoch: int = 0    # its next step
    global_step: int = 0
    rows: list = field(default_factory=list)  # every finished epoch's metrics
    best: float = -math.inf   # the best validation score so far
    elapsed: float = 0.0      # training seconds before this process
    accum: torch.Tensor = field(default_factory=lambda: torch.zeros(2))  # the epoch's loss sum and steps so far


def train(job, cfg, stage, state):
    """Train stage.model (a stages.Stage) from the start or from last.pt's position -> the rows of metrics.csv, or None
    if SIGTERM stopped it (last.pt then holds the position inside the epoch, and --resume continues from it)."""
    model, dev = stage.model, job.dev
    optimizer = torch.optim.AdamW(stage.param_groups(), lr=stage.lr, betas=(0.9, 0.99), fused=job.fused_adamw)
    pos = restore(job, state, model, optimizer)
    net = job.wrap(model, cfg.compile)
    stop = StopRule(job, cfg.time_limit_minutes, pos.elapsed, cfg.max_steps)  # till close(): SIGTERM stops cleanly
    total_steps = min(stage.n_epochs * len(epoch_plan(job, stage, cfg.seed, 0)), cfg.max_steps or math.inf)
    model.train()
    reason = None
    while pos.epoch < stage.n_epochs and not reason:
        t_epoch, accum = time.time(), pos.accum.to(dev)  # loss sum, steps: read back once per epoch
        plan = epoch_plan(job, stage, cfg.seed, pos.epoch)
        order = torch.as_tensor(np.concatenate(plan), device=dev)  # one host-to-device copy per epoch
        bounds = np.cumsum([0] + [len(b) for b in plan]).tolist()
        for i in job.progress(range(pos.step_in_epoch, len(plan)), f"epoch {pos.epoch}"):
            # learning rate: warm-up, then cosine over steps or wall time, whichever is further along
            for g in optimizer.param_groups:
                g["lr"] = lr_at(pos.global_step, max(pos.global_step / total_steps, stop.progress()), stage.lr,
                                stage.warmup)
            # batch, forward and loss, backward, clip, step
            with job.autocast:
                loss, logged = stage.loss(net, stage.batch(order[bounds[i]:bounds[i + 1]]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            accum += torch.stack([logged.detach().float(), torch.ones((), device=dev)])
            pos.global_step, pos.step_in_epoch = pos.global_step + 1, i + 1
            # the time limit or SIGTERM, decided on rank 0
            reason = stop.check(pos.global_step)
            if reason:
                break
        if reason == "signal":  # save the position inside the epoch and leave
            save_last(job, stage, optimizer, replace(pos, elapsed=stop.elapsed(), accum=accum.cpu()))
            job.log(f"SIGTERM: saved {job.path('last.pt')} at epoch {pos.epoch} step {pos.step_in_epoch}; continue "
                    f"with --resume={job.out}")
            break
        # validate, log, then last.pt, the best model and the epoch's files
        last = bool(reason) or pos.epoch + 1 == stage.n_epochs
        end_epoch(job, stage, optimizer, pos, accum, time.time() - t_epoch, stop.elapsed(),
                  plot=last or (pos.epoch + 1) % cfg.plot_every == 0)
        if reason:
            job.log(f"{stop.limit_text(reason)} reached in epoch {pos.epoch - 1}")
    stop.close(reason)
    job.check_ranks_agree(model)
    return None if reason == "signal" else pos.rows


def epoch_plan(job, stage, seed, epoch):
    """This rank's index batches of an epoch."""
    return dataset.batches(stage.n_train, stage.batch_size, seed, epoch, job.rank, job.world)


def end_epoch(job, stage, optimizer, pos, accum, seconds, elapsed, plot):
    """The epoch's row: the mean training loss over all ranks (a non-finite one stops the run, leaving the last good
    checkpoints as they are), the validation metrics, the learning rate and its seconds. Then, on rank 0, last.pt
    first (it holds the rows, so every file after it can be redone), the best model and the epoch's files; pos moves
    to the next epoch."""
    loss_sum, n_steps = (job.all_sum(accum) / job.world).tolist()
    if not math.isfinite(loss_sum):
        raise DataError(f"training loss became {loss_sum} in epoch {pos.epoch}; stopped, the last good checkpoints in "
                        f"{job.out} are kept")
    stage.model.eval()
    metrics = stage.validate()
    stage.model.train()
    score = metrics.pop("score")
    row = dict(epoch=pos.epoch, steps=pos.global_step, train_loss=loss_sum / max(n_steps, 1), **metrics,
               lr=optimizer.param_groups[0]["lr"], seconds=seconds)
    job.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    pos.rows.append(row)
    job.log_scalars(row, stage.name)
    improved = score > pos.best
    pos.epoch, pos.step_in_epoch, pos.best, pos.elapsed, pos.accum = (pos.epoch + 1, 0, max(pos.best, score), elapsed,
                                                                      torch.zeros(2))
    if not job.master:
        return
    save_last(job, stage, optimizer, pos)
    if improved:
        stage.keep_best(row["epoch"], dict(row, score=score))
    write_csv(job.path("metrics.csv"), list(row), [list(r.values()) for r in pos.rows])
    if plot:
        figures.plot_curves(pos.rows, job.out)


def restore(job, state, model, optimizer):
    """The loop's position: from last.pt when resuming (weights, optimiser and RNG restored too), else the start."""
    if state is None:
        return Position()
    pos = Position(**checkpoints.restore_state(state, model, optimizer, job.dev))
    job.log(f"resuming {job.out} at epoch {pos.epoch} step {pos.step_in_epoch}")
    return pos


def save_last(job, stage, optimizer, pos):
    """On rank 0, last.pt: everything needed to continue exactly at pos, with the settings and data --resume checks."""
    if job.master:
        checkpoints.save_state(job.path("last.pt"), stage.model, optimizer, stage=stage.name, config=vars(stage.cfg),
                               data=stage.data, position=vars(pos))


# ---- the run ---------------------------------------------------------------------------------------------------

def main(argv):
    cfg = options.parse(BLOCK, argv)
    check(cfg)
    job = Job(cfg)
    cfg.out_dir = job.out
    try:
        state = job.resume_state(cfg, BLOCK, STAGES[cfg.stage].best_file)
        stage = STAGES[cfg.stage](job, cfg, state)
        rows = train(job, cfg, stage, state)
        if rows is not None and job.master:
            stage.finish(rows)
    except (WriteError, Terminated) as e:  # disk full, quota, read-only, or SIGTERM: say what the run keeps
        raise type(e)(f"{e}; {checkpoints.kept(job.out)}") from None
    finally:
        job.close()


if __name__ == "__main__":
    run_script(main)
