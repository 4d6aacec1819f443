"""Generate new slices: sample code grids from a trained prior, decode them with its VQ-VAE, and judge them against
real slices that have passed through the same VQ-VAE.

    python sample.py                                    # the newest runs/*/best_prior.pt
    python sample.py --prior_checkpoint=runs/gen-prior/best_prior.pt --n_samples=256 --temperature=0.9

Every name in the block below can be overridden as --name=value. Writes to <prior run>/samples/: samples.png,
samples_64.png, samples_nearest.png, nifti/sample_XXX.nii.gz and measures.json (README, Generation).
"""
import json
import os
import time

import numpy as np
import torch

import checkpoints
import dataset
import figures
import options
from job import on_cuda, pick_device
from metrics import judge, real_slices
from options import Option
from utils import doing, make_folder, read_image, run_script, write_nifti, write_text

BLOCK = dict(
    prior_checkpoint=Option(None, kind=str),  # None = the newest runs/*/best_prior.pt
    n_samples=Option(256, at_least=1),    # the two-sample test needs 256 a side for an interval of +-0.06
    n_real=Option(256, at_least=2),       # training slices, reconstructed, that samples are compared with
    c2st_steps=Option(100, at_least=1),   # the two-sample test's classifier steps per fold (8 epochs at 256 a side)
    temperature=Option(0.9, above=0),     # < 1 sharpens each code's distribution
    top_k=Option(0, at_least=0),          # > 0: sample only from the k most likely codes; 0 = from all
    seed=Option(0),
    out_dir=Option(None, kind=str),       # None = <prior run>/samples
    device=Option("auto"),
    amp=Option("auto", kind=(str, bool), choices=("auto", True, False)),  # bf16 autocast; auto = on CUDA
    batch_size=Option(64, at_least=1),
)


@torch.no_grad()
def draw(prior, vqvae, dev, cfg):
    """cfg.n_samples decoded samples (N, 1, H, W) in [0, 1], from a seeded generator."""
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on_cuda(cfg.amp, dev)):
        codes = torch.cat([prior.sample(len(c), temperature=cfg.temperature, top_k=cfg.top_k, generator=gen)
                           for c in torch.arange(cfg.n_samples).split(cfg.batch_size)])
        return torch.cat([vqvae.decode(c).float().clamp(0, 1) for c in codes.split(cfg.batch_size)])


def report(m):
    """The measures, one line each."""
    c, dc, sy, nt = m["c2st"], m["density_coverage"], m["symmetry"], m["nearest_train_ssim"]
    print(f"two-sample test accuracy {c['accuracy']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] over "
          f"{c['n_fake']} samples and {c['n_real']} training reconstructions (0.5: indistinguishable)")
    print(f"coverage {dc['samples']['coverage']:.3f}, density {dc['samples']['density']:.3f} of {dc['n_reference']} "
          f"reconstructions of half the training patients by {dc['n']} samples; by as many of the other half's: "
          f"{dc['real']['coverage']:.3f}, {dc['real']['density']:.3f}")
    print(f"diversity (median pairwise SSIM): samples {m['diversity']['samples']:.3f}, real "
          f"{m['diversity']['real']:.3f}; symmetry (median SSIM to the mirror image): samples "
          f"{sy['samples']['median']:.3f}, real {sy['real']['median']:.3f}")
    print(f"SSIM to the nearest training slice, median [max]: samples {nt['samples']['median']:.3f} "
          f"[{nt['samples']['max']:.3f}], validation reconstructions {nt['validation']['median']:.3f} "
          f"[{nt['validation']['max']:.3f}]")


def main(argv):
    cfg = options.parse(BLOCK, argv)
    dev = pick_device(cfg.device)
    path = checkpoints.find(cfg.prior_checkpoint, "runs/*/best_prior.pt")
    prior, ckpt = checkpoints.load_model(path, dev, "prior")
    vqvae, _ = checkpoints.load_model(ckpt["vqvae_checkpoint"], dev, "vqvae")
    out = cfg.out_dir or os.path.join(os.path.dirname(path), "samples")
    make_folder(out)
    splits = dataset.read_splits(os.path.dirname(ckpt["vqvae_checkpoint"]))

    t0 = time.time()
    doing(f"drawing {cfg.n_samples} samples from {path}")
    samples = draw(prior, vqvae, dev, cfg).cpu()
    seconds = time.time() - t0
    real = real_slices(vqvae, splits, ckpt["config"]["cache_dir"], dev, cfg.batch_size, on_cuda(cfg.amp, dev))
    doing("judging the samples against real slices")
    measures, to_train, nearest = judge(samples, real, cfg.n_real, cfg.c2st_steps, cfg.seed)
    result = dict(n_samples=cfg.n_samples, temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed,
                  sampling_seconds=seconds, prior_checkpoint=os.path.abspath(path), **measures)
    write_text(os.path.join(out, "measures.json"), json.dumps(result, indent=1))
    imgs = samples[:, 0].numpy()
    figures.plot_samples(out, imgs, to_train, nearest, real["train_x"][:, 0].numpy())
    make_folder(os.path.join(out, "nifti"))
    affine = read_image(splits["train"][0])[0].affine
    for i, img in enumerate(imgs):  # intensities in the normalised [0, 1] units: a sample has no scanner scale
        write_nifti(os.path.join(out, "nifti", f"sample_{i:03d}.nii.gz"), img.astype(np.float32), affine)
    print(f"{cfg.n_samples} samples in {seconds:.0f} s -> {out}")
    report(result)


if __name__ == "__main__":
    run_script(main)
