"""Reconstruct a split with a trained VQ-VAE: scores per slice and per split, a figure, and optionally NIfTI files.

    python predict.py                                   # newest run's best model, its data, the test split
    python predict.py --checkpoint=runs/X/best_model.pt --data_dir=/path/keras_slices_data --split=validate
    python predict.py --save_nifti                      # also write each reconstruction as NIfTI under nifti/

Every name in the block below can be overridden as --name=value. To generate new slices, see sample.py.
"""
import csv
import json
import os
import sys

import nibabel as nib
import numpy as np
from skimage.transform import resize

import dataset
from modules import load_model
from utils import (DataError, block_names, check_ranges, configure, evaluate_split, find_checkpoint, make_folder,
                   pick_device, plot_reconstructions)

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
# ----------------------------------------------------------------------------------------------------------------
config_keys = block_names(globals())
TYPES = {"checkpoint": (str,), "data_dir": (str,), "out_dir": (str,)}
RANGES = [(("n_show", ), lambda v: v >= 0, "0 or more"), (("batch_size",), lambda v: v >= 1, "at least 1"),
          (("split",), lambda v: v in dataset.SPLITS, " or ".join(dataset.SPLITS))]


def split_files(ckpt_path, ckpt, data_dir, split):
    """The split's files: from data_dir, else the run's splits.json, else the checkpoint's data root."""
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


def write_per_slice(path, files, scores):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "ssim", "psnr"])
        w.writerows([os.path.basename(fn), f"{s:.6f}", f"{q:.4f}"] for fn, (s, q) in zip(files, scores))


def main():
    check_ranges(configure(globals(), config_keys, sys.argv[1:], bare_true=("save_nifti",), types=TYPES), RANGES)
    dev = pick_device(device)
    ckpt_path = find_checkpoint(checkpoint, "runs/*/best_model.pt")
    model, ckpt = load_model(ckpt_path, dev, kind="vqvae")
    p = dataset.prepare(split_files(ckpt_path, ckpt, data_dir, split), None, skip_bad, desc=split)
    out = out_dir or os.path.join(os.path.dirname(ckpt_path), f"predict_{split}")
    make_folder(out)

    rec, scores, means = evaluate_split(model, p, dev, batch_size)
    write_per_slice(os.path.join(out, "per_slice.csv"), p["files"], scores)
    metrics = dict(**means, split=split, checkpoint=os.path.abspath(ckpt_path), skipped=p["skipped"])
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    n = min(n_show, len(rec))
    plot_reconstructions(p["x"][:n], rec[:n], os.path.join(out, "reconstructions.png"),
                         f"{split} split, mean SSIM {metrics['ssim']:.4f} over {len(rec)} slices")
    if save_nifti:
        os.makedirs(os.path.join(out, "nifti"), exist_ok=True)
        units = dataset.denormalise(rec.astype(np.float64), p["lo"][:, None, None], p["hi"][:, None, None])
        for src, r in zip(p["files"], units):
            write_nifti(src, r, os.path.join(out, "nifti", os.path.basename(src)))
    print(f"{split}: ssim={metrics['ssim']:.4f} psnr={metrics['psnr']:.2f} on {len(rec)} slices -> {out}")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
