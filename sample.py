"""Generate new slices: sample code grids from a trained prior, decode them with its VQ-VAE, and measure how close
each sits to the training set.

    python sample.py                                    # the newest runs/*/best_prior.pt
    python sample.py --prior_checkpoint=runs/gen-prior/best_prior.pt --n_samples=64 --temperature=0.8 --top_k=4

Every name in the block below can be overridden as --name=value. Writes to <prior run>/samples/: samples.png,
samples_nearest.png, nifti/sample_XXX.nii.gz and novelty.json.
"""
import json
import os

import numpy as np
import torch

import checkpoints
import dataset
import figures
import options
from job import pick_device
from metrics import (c2st, coverage_against_real, median_pairwise_ssim, mirror_ssim, nearest_ssim, quartiles)
from modules import reconstruct
from options import Option
from utils import make_folder, read_image, run_script, write_nifti, write_text

BLOCK = dict(
    prior_checkpoint=Option(None, kind=str),  # None = the newest runs/*/best_prior.pt
    n_samples=Option(64, at_least=1),
    temperature=Option(1.0, above=0),     # < 1 sharpens each code's distribution
    top_k=Option(0, at_least=0),          # > 0: sample only from the k most likely codes; 0 = from all
    seed=Option(0),
    n_reference=Option(128, at_least=1),  # validation slices measured against the training set: the yardstick
    out_dir=Option(None, kind=str),       # None = <prior run>/samples
    device=Option("auto"),
    batch_size=Option(64, at_least=1),
)


@torch.no_grad()
def draw(prior, vqvae, dev, cfg):
    """cfg.n_samples decoded samples (N, 1, H, W) in [0, 1], from a seeded generator."""
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    codes = torch.cat([prior.sample(len(c), cfg.temperature, cfg.top_k, generator=gen)
                       for c in torch.arange(cfg.n_samples).split(cfg.batch_size)])
    return torch.cat([vqvae.decode(c).float().clamp(0, 1) for c in codes.split(cfg.batch_size)])


def novelty(x, vqvae, splits, cache_dir, dev, cfg):
    """Each sample's SSIM to its nearest training slice, beside the same for validation slices (as stored, and as
    the VQ-VAE reconstructs them), then the two-sample test, diversity, symmetry and coverage against those
    reconstructions -> (result dict, nearest training index per sample, the training slices)."""
    train = dataset.prepare(splits["train"], cache_dir, True, desc="train")
    val = dataset.prepare(splits["validate"], cache_dir, True, desc="validate")
    pool = torch.from_numpy(train["x"]).to(dev)[:, None]
    pick = np.linspace(0, len(val["x"]) - 1, min(cfg.n_reference, len(val["x"]))).astype(int)
    ref = torch.from_numpy(val["x"][pick])
    s_samples, nearest = nearest_ssim(x, pool)
    s_val, _ = nearest_ssim(ref.to(dev)[:, None], pool)
    # samples are decoder outputs, free of scanner noise: the like-for-like yardstick is the VQ-VAE's own
    # reconstruction of each validation slice
    ref_rec = torch.from_numpy(reconstruct(vqvae, ref.numpy(), dev, cfg.batch_size)[0]).clamp(0, 1).to(dev)[:, None]
    s_val_rec, _ = nearest_ssim(ref_rec, pool)
    result = dict(samples_to_nearest_train_ssim=quartiles(s_samples),
                  validation_recon_to_nearest_train_ssim=quartiles(s_val_rec),
                  validation_to_nearest_train_ssim=quartiles(s_val),
                  c2st=c2st(ref_rec.cpu(), x.cpu(), cfg.seed),
                  diversity=dict(samples_median_pairwise_ssim=median_pairwise_ssim(x),
                                 validation_recon_median_pairwise_ssim=median_pairwise_ssim(ref_rec)),
                  symmetry=dict(samples=quartiles(mirror_ssim(x)), validation_recon=quartiles(mirror_ssim(ref_rec))),
                  coverage=coverage_against_real(ref_rec, x, s_val_rec, [dataset.case_id(val["files"][i])
                                                                         for i in pick]))
    return result, s_samples, nearest, train["x"]


def report(result):
    """The measures, one line each."""
    print(f"{result['n_samples']} samples; SSIM to the nearest training slice, median [quartiles], max:")
    for k in [k for k in result if k.endswith("_to_nearest_train_ssim")]:
        q = result[k]
        print(f"  {k.replace('_to_nearest_train_ssim', ''):<17} {q['median']:.3f} [{q['q1']:.3f}, {q['q3']:.3f}], "
              f"max {q['max']:.3f}")
    c, d = result["c2st"], result["diversity"]
    print(f"two-sample test accuracy {c['accuracy']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] (0.5: "
          f"indistinguishable from validation reconstructions; {c['n_test']} held out)")
    print(f"median pairwise SSIM: samples {d['samples_median_pairwise_ssim']:.3f}, validation reconstructions "
          f"{d['validation_recon_median_pairwise_ssim']:.3f}")
    sy = result["symmetry"]
    print(f"left-right symmetry (SSIM to the mirror image), median: samples {sy['samples']['median']:.3f}, "
          f"validation reconstructions {sy['validation_recon']['median']:.3f}")
    cv = result["coverage"]
    yardstick = "-" if cv["validation_recon"] is None else f"{cv['validation_recon']:.3f}"
    print(f"coverage of {cv['n_real']} validation reconstructions: by {cv['n_cover']} samples {cv['samples']:.3f}, "
          f"by as many reconstructions of other validation patients {yardstick}")


def main(argv):
    cfg = options.parse(BLOCK, argv)
    dev = pick_device(cfg.device)
    path = checkpoints.find(cfg.prior_checkpoint, "runs/*/best_prior.pt")
    prior, ckpt = checkpoints.load_model(path, dev, "prior")
    vqvae, _ = checkpoints.load_model(ckpt["vqvae_checkpoint"], dev, "vqvae")
    out = cfg.out_dir or os.path.join(os.path.dirname(path), "samples")
    make_folder(out)
    splits = dataset.read_splits(os.path.dirname(ckpt["vqvae_checkpoint"]))

    x = draw(prior, vqvae, dev, cfg)
    measures, s_samples, nearest, train_x = novelty(x, vqvae, splits, ckpt["config"]["cache_dir"], dev, cfg)
    result = dict(n_samples=cfg.n_samples, temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed,
                  prior_checkpoint=os.path.abspath(path), **measures)
    write_text(os.path.join(out, "novelty.json"), json.dumps(result, indent=1))
    imgs = x[:, 0].cpu().numpy()
    figures.plot_samples(out, imgs, s_samples, nearest, train_x)
    make_folder(os.path.join(out, "nifti"))
    affine = read_image(splits["train"][0])[0].affine
    for i, img in enumerate(imgs):  # intensities in the normalised [0, 1] units: a sample has no scanner scale
        write_nifti(os.path.join(out, "nifti", f"sample_{i:03d}.nii.gz"), img.astype(np.float32), affine)
    print(f"samples -> {out}")
    report(result)


if __name__ == "__main__":
    run_script(main)
