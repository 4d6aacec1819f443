"""Reconstruct a split with a trained VQ-VAE, or generate new slices with a trained prior.

    python predict.py                                   # newest run's best model, its data, the test split
    python predict.py --checkpoint=runs/X/best_model.pt --data_dir=/path/keras_slices_data --split=validate
    python predict.py --save_nifti                      # also write each reconstruction as NIfTI under nifti/
    python predict.py --sample=64 --temperature=1.0 --top_k=0 --seed=0   # newest prior: new slices

Every name in the block below can be overridden as --name=value.
"""
import csv
import json
import os
import sys

import nibabel as nib
import numpy as np
import torch
from skimage.transform import resize

import dataset
from modules import load_model
from utils import (DataError, apply_overrides, newest, plot_reconstructions, reconstruct, score_split,
                   ssim_from_stats, ssim_stats)

# ----------------------------------------------------------------------------------------------------------------
checkpoint = None      # None = the newest runs/*/best_model.pt
data_dir = None        # course-layout root; None = the data the checkpoint was trained on
split = "test"         # train, validate or test
out_dir = None         # None = <checkpoint folder>/predict_<split>
save_nifti = False     # write reconstructions as NIfTI (input's name, affine, shape, intensity units)
n_show = 6             # slices in the figure
skip_bad = False       # True: drop bad slices and list them instead of stopping
device = "auto"
batch_size = 64
# generation
sample = 0             # > 0: draw this many slices from the prior instead of reconstructing
prior_checkpoint = None  # None = the newest runs/*/best_prior.pt
temperature = 1.0
top_k = 0              # 0 = sample from all codes
seed = 0
n_reference = 128      # validation slices measured against the training set, the yardstick for samples
# ----------------------------------------------------------------------------------------------------------------
TYPES = {"checkpoint": (str,), "data_dir": (str,), "out_dir": (str,), "prior_checkpoint": (str,)}


def find_checkpoint(path, pattern):
    path = path or newest(pattern)
    if path is None:
        sys.exit(f"error: no checkpoint given and none found as {pattern}; train first")
    if not os.path.exists(path):
        sys.exit(f"error: {path}: checkpoint not found")
    return path


def split_files(ckpt_path, ckpt):
    """The split's files: from --data_dir, else the run's splits.json, else the checkpoint's data root."""
    cfg = ckpt["config"]
    if data_dir is None:
        listed = os.path.join(os.path.dirname(ckpt_path), "splits.json")
        if os.path.exists(listed):
            with open(listed) as f:
                splits = json.load(f)
            if split in splits:
                return splits[split]
    root = data_dir or ckpt["data_root"]
    splits = dataset.find_splits(root, val_fraction=cfg["val_fraction"], seed=cfg["seed"])
    if split not in splits:
        raise DataError(f"{root}: no {split} split")
    return splits[split]


def write_nifti(src, rec, path):
    """rec (H, W) in intensity units -> NIfTI at path with src's affine and stored shape."""
    img = nib.load(src)
    shape2d = img.shape[:2]
    if rec.shape != shape2d:
        rec = resize(rec, shape2d, order=1, preserve_range=True, anti_aliasing=False)
    out = nib.Nifti1Image(rec.reshape(img.shape).astype(np.float32), img.affine)
    out.set_data_dtype(np.float32)
    nib.save(out, path)


def main():
    apply_overrides(globals(), sys.argv[1:], bare_true=("save_nifti",), types=TYPES)
    if split not in dataset.SPLITS:
        sys.exit(f"error: --split={split}: expected one of {', '.join(dataset.SPLITS)}")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    if sample > 0:
        generate(dev)
    else:
        reconstruct_split(dev)


def reconstruct_split(dev):
    global out_dir
    ckpt_path = find_checkpoint(checkpoint, "runs/*/best_model.pt")
    model, ckpt = load_model(ckpt_path, dev)
    try:
        files = split_files(ckpt_path, ckpt)
        p = dataset.prepare(files, None, skip_bad, desc=split)
    except DataError as e:
        sys.exit(f"error: {e}")
    out_dir = out_dir or os.path.join(os.path.dirname(ckpt_path), f"predict_{split}")
    os.makedirs(out_dir, exist_ok=True)

    rec, _ = reconstruct(model, p["x"], dev, batch_size)
    scores = score_split(p["x"], rec, p["lo"], p["hi"])
    with open(os.path.join(out_dir, "per_slice.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "ssim", "psnr"])
        w.writerows([os.path.basename(fn), f"{s:.6f}", f"{q:.4f}"] for fn, (s, q) in zip(p["files"], scores))
    metrics = dict(ssim=float(scores[:, 0].mean()), psnr=float(scores[:, 1].mean()), n_slices=len(scores),
                   split=split, checkpoint=os.path.abspath(ckpt_path), skipped=p["skipped"])
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    n = min(n_show, len(rec))
    plot_reconstructions(p["x"][:n], rec[:n], os.path.join(out_dir, "reconstructions.png"),
                         f"{split} split, mean SSIM {metrics['ssim']:.4f} over {len(rec)} slices")
    if save_nifti:
        os.makedirs(os.path.join(out_dir, "nifti"), exist_ok=True)
        units = dataset.denormalise(rec.astype(np.float64), p["lo"][:, None, None], p["hi"][:, None, None])
        for src, r in zip(p["files"], units):
            write_nifti(src, r, os.path.join(out_dir, "nifti", os.path.basename(src)))
    print(f"{split}: ssim={metrics['ssim']:.4f} psnr={metrics['psnr']:.2f} on {len(rec)} slices -> {out_dir}")


@torch.no_grad()
def nearest_ssim(queries, pool, chunk=32):
    """For each query (N, 1, H, W) in [0, 1]: the SSIM to, and index of, its most similar slice in pool (M, 1, H, W).
    The pool's local statistics are computed once; each pair then costs one pooled product."""
    pool_stats = [ssim_stats(c) for c in pool.split(chunk)]
    best, where = [], []
    for q in queries:
        qs = ssim_stats(q[None])
        s = torch.cat([ssim_from_stats(qs, ps) for ps in pool_stats])
        best.append(float(s.max()))
        where.append(int(s.argmax()))
    return np.array(best), np.array(where)


def quartiles(a):
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return dict(median=float(med), q1=float(q1), q3=float(q3), max=float(np.max(a)), n=len(a))  # max: the nearest to a copy


def generate(dev):
    """Sample code grids from the prior, decode them, and measure how close they sit to the training set."""
    global out_dir
    path = find_checkpoint(prior_checkpoint, "runs/*/best_prior.pt")
    prior, ckpt = load_model(path, dev)
    vqvae, vq_ckpt = load_model(ckpt["vqvae_checkpoint"], dev)
    out_dir = out_dir or os.path.join(os.path.dirname(path), "samples")
    os.makedirs(out_dir, exist_ok=True)
    gen = torch.Generator(device=dev).manual_seed(seed)
    codes = torch.cat([prior.sample(len(c), temperature, top_k, generator=gen) for c in torch.arange(sample).split(batch_size)])
    x = torch.cat([vqvae.decode(c).float().clamp(0, 1) for c in codes.split(batch_size)])
    with open(os.path.join(os.path.dirname(ckpt["vqvae_checkpoint"]), "splits.json")) as f:
        splits = json.load(f)
    try:
        train = dataset.prepare(splits["train"], ckpt["config"]["cache_dir"], True, desc="train")
        val = dataset.prepare(splits["validate"], ckpt["config"]["cache_dir"], True, desc="validate")
    except DataError as e:
        sys.exit(f"error: {e}")
    pool = torch.from_numpy(train["x"]).to(dev)[:, None]
    ref = torch.from_numpy(val["x"][np.linspace(0, len(val["x"]) - 1, min(n_reference, len(val["x"]))).astype(int)])
    s_samples, nearest = nearest_ssim(x, pool)
    s_val, _ = nearest_ssim(ref.to(dev)[:, None], pool)
    # samples are decoder outputs, free of scanner noise: the like-for-like yardstick is the VQ-VAE's own
    # reconstruction of each validation slice
    ref_rec = torch.from_numpy(reconstruct(vqvae, ref.numpy(), dev, batch_size)[0]).clamp(0, 1).to(dev)[:, None]
    s_val_rec, _ = nearest_ssim(ref_rec, pool)
    result = dict(n_samples=sample, temperature=temperature, top_k=top_k, seed=seed, prior_checkpoint=os.path.abspath(path),
                  samples_to_nearest_train_ssim=quartiles(s_samples),
                  validation_recon_to_nearest_train_ssim=quartiles(s_val_rec),
                  validation_to_nearest_train_ssim=quartiles(s_val))
    with open(os.path.join(out_dir, "novelty.json"), "w") as f:
        json.dump(result, f, indent=1)
    imgs = x[:, 0].cpu().numpy()
    dataset.plot_samples(imgs[:16], os.path.join(out_dir, "samples.png"),
                         [f"sample {i}, nearest train SSIM {s:.2f}" for i, s in enumerate(s_samples[:16])])
    n = min(8, sample)
    pairs = np.stack([a for i in range(n) for a in (imgs[i], train["x"][nearest[i]])])
    dataset.plot_samples(pairs, os.path.join(out_dir, "samples_nearest.png"),
                         [t for i in range(n) for t in (f"sample {i}", f"nearest train, SSIM {s_samples[i]:.3f}")], ncols=4)
    os.makedirs(os.path.join(out_dir, "nifti"), exist_ok=True)
    affine = nib.load(splits["train"][0]).affine
    for i, img in enumerate(imgs):  # intensities in the normalised [0, 1] units: a sample has no scanner scale
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), os.path.join(out_dir, "nifti", f"sample_{i:03d}.nii.gz"))
    print(f"{sample} samples -> {out_dir}; SSIM to the nearest training slice, median [quartiles], max:")
    for k in ("samples_to_nearest_train_ssim", "validation_recon_to_nearest_train_ssim", "validation_to_nearest_train_ssim"):
        q = result[k]
        print(f"  {k.replace('_to_nearest_train_ssim', ''):<17} {q['median']:.3f} [{q['q1']:.3f}, {q['q3']:.3f}], max {q['max']:.3f}")


if __name__ == "__main__":
    main()
