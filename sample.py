"""Generate new slices: sample code grids from a trained prior, decode them with its VQ-VAE, and measure how close
each sits to the training set.

    python sample.py                                    # the newest runs/*/best_prior.pt
    python sample.py --prior_checkpoint=runs/gen-prior/best_prior.pt --n_samples=64 --temperature=0.8 --top_k=4

Every name in the block below can be overridden as --name=value. Writes to <prior run>/samples/: samples.png,
samples_nearest.png, nifti/sample_XXX.nii.gz and novelty.json.
"""
import json
import math
import os
import sys

import nibabel as nib
import numpy as np
import torch
import torch.nn as nn

import dataset
from modules import load_model
from utils import (DataError, block_names, check_ranges, configure, find_checkpoint, make_folder, nearest_ssim,
                   pick_device, plot_grid, reconstruct, ssim_matrix, ssim_torch)

# ----------------------------------------------------------------------------------------------------------------
prior_checkpoint = None  # None = the newest runs/*/best_prior.pt
n_samples = 64
temperature = 1.0        # < 1 sharpens each code's distribution
top_k = 0                # > 0: sample only from the k most likely codes; 0 = from all
seed = 0
n_reference = 128        # validation slices measured against the training set, the yardstick for samples
out_dir = None           # None = <prior run>/samples
device = "auto"
batch_size = 64
# ----------------------------------------------------------------------------------------------------------------
config_keys = block_names(globals())
TYPES = {"prior_checkpoint": (str,), "out_dir": (str,)}
RANGES = [(("n_samples", "n_reference", "batch_size"), lambda v: v >= 1, "at least 1"),
          (("temperature",), lambda v: v > 0, "positive"), (("top_k",), lambda v: v >= 0, "0 or more")]


def quartiles(a):
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return dict(median=float(med), q1=float(q1), q3=float(q3), max=float(np.max(a)), n=len(a))  # max: nearest to a copy


@torch.no_grad()
def draw(prior, vqvae, dev):
    """n_samples decoded samples (N, 1, H, W) in [0, 1], from a seeded generator."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    codes = torch.cat([prior.sample(len(c), temperature, top_k, generator=gen)
                       for c in torch.arange(n_samples).split(batch_size)])
    return torch.cat([vqvae.decode(c).float().clamp(0, 1) for c in codes.split(batch_size)])


def novelty(x, vqvae, splits, cache_dir, dev):
    """Each sample's SSIM to its nearest training slice, beside the same for validation slices (as stored, and as
    the VQ-VAE reconstructs them), then the two-sample test, diversity, symmetry and coverage against those
    reconstructions -> (result dict, nearest training index per sample, the training slices)."""
    train = dataset.prepare(splits["train"], cache_dir, True, desc="train")
    val = dataset.prepare(splits["validate"], cache_dir, True, desc="validate")
    pool = torch.from_numpy(train["x"]).to(dev)[:, None]
    pick = np.linspace(0, len(val["x"]) - 1, min(n_reference, len(val["x"]))).astype(int)
    ref = torch.from_numpy(val["x"][pick])
    s_samples, nearest = nearest_ssim(x, pool)
    s_val, _ = nearest_ssim(ref.to(dev)[:, None], pool)
    # samples are decoder outputs, free of scanner noise: the like-for-like yardstick is the VQ-VAE's own
    # reconstruction of each validation slice
    ref_rec = torch.from_numpy(reconstruct(vqvae, ref.numpy(), dev, batch_size)[0]).clamp(0, 1).to(dev)[:, None]
    s_val_rec, _ = nearest_ssim(ref_rec, pool)
    result = dict(samples_to_nearest_train_ssim=quartiles(s_samples),
                  validation_recon_to_nearest_train_ssim=quartiles(s_val_rec),
                  validation_to_nearest_train_ssim=quartiles(s_val),
                  c2st=c2st(ref_rec.cpu(), x.cpu(), seed),
                  diversity=dict(samples_median_pairwise_ssim=median_pairwise_ssim(x),
                                 validation_recon_median_pairwise_ssim=median_pairwise_ssim(ref_rec)),
                  symmetry=dict(samples=quartiles(mirror_ssim(x)), validation_recon=quartiles(mirror_ssim(ref_rec))),
                  coverage=coverage_against_real(ref_rec, x, s_val_rec, [dataset.case_id(val["files"][i])
                                                                         for i in pick]))
    return result, s_samples, nearest, train["x"]


def mirror_ssim(x):
    """Each slice's SSIM to its own left-right mirror image (N,) numpy: how much its two halves agree. A prior that
    draws one femoral head and not the other scores lower than real slices."""
    return ssim_torch(x, torch.flip(x, dims=[2])).double().cpu().numpy()


def median_pairwise_ssim(x):
    """Median SSIM over all pairs of distinct slices in x (N, 1, H, W): higher means less diverse."""
    s = ssim_matrix(x, x)
    return float(s[torch.triu_indices(len(x), len(x), 1).unbind()].median())


def coverage_against_real(ref_rec, x, ref_to_train, patients):
    """Coverage of half the validation patients' reconstructions by the samples, beside the same by the other half
    of the patients' reconstructions (as many slices as that half has, from patients the first half does not
    share, as samples are): the real yardstick that samples should match."""
    held = np.isin(patients, sorted(set(patients))[::2])
    if held.all():  # one validation patient: no second half to compare with
        return dict(samples=coverage(ref_rec, x, ref_to_train), validation_recon=None, n_real=len(held),
                    n_cover=len(x))
    a, b = torch.from_numpy(held).to(ref_rec.device), torch.from_numpy(~held).to(ref_rec.device)
    n = min(int(b.sum()), len(x))
    return dict(samples=coverage(ref_rec[a], x[:n], ref_to_train[held]),
                validation_recon=coverage(ref_rec[a], ref_rec[b][:n], ref_to_train[held]),
                n_real=int(held.sum()), n_cover=n)


def coverage(real, samples, real_to_train):
    """The fraction of real slices whose nearest sample is at least as close (SSIM) as their nearest training slice
    (real_to_train): a recall in the spirit of Kynkaanniemi et al. 2019. A prior that covers only common anatomy
    leaves the rarer real slices nearer to training slices than to any sample."""
    return float((nearest_ssim(real, samples)[0] >= real_to_train).mean())


def classifier():
    """The two-sample test's CNN: 256x128 -> four stride-2 convolutions -> mean over the grid -> one logit. It sees
    the slice at full resolution, where noise and texture differ."""
    layers, width = [], 1
    for w in (8, 16, 32, 32):
        layers += [nn.Conv2d(width, w, 3, stride=2, padding=1), nn.ReLU()]
        width = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1))


def c2st(real, fake, seed=0, steps=150):
    """Classifier two-sample test: a small CNN learns to tell `fake` from `real` (N, 1, H, W) slices on half of
    each (equal numbers), and is scored on the other half. 0.5 means indistinguishable. Returns the held-out
    accuracy with its 95% Wilson interval, and the sizes."""
    n = min(len(real), len(fake))
    gen = torch.Generator().manual_seed(seed)
    real, fake = real[torch.randperm(len(real), generator=gen)[:n]], fake[torch.randperm(len(fake), generator=gen)[:n]]
    h = n // 2
    x_fit, x_test = torch.cat([real[:h], fake[:h]]), torch.cat([real[h:], fake[h:]])
    y_fit = torch.cat([torch.zeros(h), torch.ones(h)])
    y_test = torch.cat([torch.zeros(n - h), torch.ones(n - h)])
    with torch.random.fork_rng():  # the classifier's own seeded initialisation, not the caller's random stream
        torch.manual_seed(seed)
        net = classifier()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):  # full batch: a few dozen slices
        loss = nn.functional.binary_cross_entropy_with_logits(net(x_fit)[:, 0], y_fit)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        correct = float(((net(x_test)[:, 0] > 0).float() == y_test).sum())
    return dict(accuracy=correct / len(y_test), ci95=wilson(correct, len(y_test)), n_fit=len(y_fit),
                n_test=len(y_test))


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n."""
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [centre - half, centre + half]


def write_samples(out, imgs, s_samples, nearest, train_x, affine):
    """samples.png, samples_nearest.png, and one NIfTI per sample."""
    plot_grid(imgs[:16], os.path.join(out, "samples.png"),
              [f"sample {i}, nearest train SSIM {s:.2f}" for i, s in enumerate(s_samples[:16])])
    n = min(8, len(imgs))
    pairs = np.stack([a for i in range(n) for a in (imgs[i], train_x[nearest[i]])])
    plot_grid(pairs, os.path.join(out, "samples_nearest.png"),
              [t for i in range(n) for t in (f"sample {i}", f"nearest train, SSIM {s_samples[i]:.3f}")], ncols=4)
    os.makedirs(os.path.join(out, "nifti"), exist_ok=True)
    for i, img in enumerate(imgs):  # intensities in the normalised [0, 1] units: a sample has no scanner scale
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), os.path.join(out, "nifti", f"sample_{i:03d}.nii.gz"))


def main():
    check_ranges(configure(globals(), config_keys, sys.argv[1:], types=TYPES), RANGES)
    dev = pick_device(device)
    path = find_checkpoint(prior_checkpoint, "runs/*/best_prior.pt")
    prior, ckpt = load_model(path, dev, kind="prior")
    vqvae, _ = load_model(ckpt["vqvae_checkpoint"], dev, kind="vqvae")
    out = out_dir or os.path.join(os.path.dirname(path), "samples")
    make_folder(out)
    with open(os.path.join(os.path.dirname(ckpt["vqvae_checkpoint"]), "splits.json")) as f:
        splits = json.load(f)

    x = draw(prior, vqvae, dev)
    measures, s_samples, nearest, train_x = novelty(x, vqvae, splits, ckpt["config"]["cache_dir"], dev)
    result = dict(n_samples=n_samples, temperature=temperature, top_k=top_k, seed=seed,
                  prior_checkpoint=os.path.abspath(path), **measures)
    with open(os.path.join(out, "novelty.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_samples(out, x[:, 0].cpu().numpy(), s_samples, nearest, train_x, nib.load(splits["train"][0]).affine)
    print(f"{n_samples} samples -> {out}; SSIM to the nearest training slice, median [quartiles], max:")
    for k in [k for k in measures if k.endswith("_to_nearest_train_ssim")]:
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


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
