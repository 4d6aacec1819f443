"""Reconstruct a split with a trained VQ-VAE: scores per slice and per split, a figure, and optionally NIfTI files.

    python predict.py                                   # newest run's best model, its data, the test split
    python predict.py --checkpoint=runs/X/best_model.pt --data_dir=/path/keras_slices_data --split=validate
    python predict.py --save_nifti                      # also write each reconstruction as NIfTI under nifti/
    python predict.py --input=scan.nii.gz               # any NIfTI file or folder of them; 3D volumes slice by slice

Where the split has labels (keras_slices_seg_<split>), the scores include each organ's (README, The metric).

Every name in the block below can be overridden as --name=value. To generate new slices, see sample.py.
"""
import glob
import json
import os
import sys

import nibabel as nib
import numpy as np
from skimage.transform import resize

import dataset
from modules import load_model
from utils import (DataError, block_names, check_ranges, configure, evaluate_split, figure_slices, find_checkpoint,
                   make_folder, pick_device, plot_reconstructions, read_image, shown_masks, split_means,
                   write_per_slice)

# ----------------------------------------------------------------------------------------------------------------
checkpoint = None      # None = the newest runs/*/best_model.pt
data_dir = None        # course-layout root; None = the data the checkpoint was trained on
split = "test"         # train, validate or test
input = None           # a NIfTI file or a folder of them, in any layout: each written back reconstructed (not split)
out_dir = None         # None = <checkpoint folder>/predict_<split>, or predict_input with --input
save_nifti = False     # write reconstructions as NIfTI (input's name, affine, shape, intensity units)
n_show = 6             # slices in the figure
skip_bad = False       # True: drop bad slices and list them instead of stopping
device = "auto"
batch_size = 64
# ----------------------------------------------------------------------------------------------------------------
config_keys = block_names(globals())
TYPES = {"checkpoint": (str,), "data_dir": (str,), "out_dir": (str,), "input": (str,)}
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


def to_file_shape(rec, shape2d):
    """A reconstruction (H, W) in intensity units -> the file's in-plane shape, by linear interpolation."""
    if rec.shape == shape2d:
        return rec
    return resize(rec, shape2d, order=1, preserve_range=True, anti_aliasing=False)


def write_like(src, data, path):
    """data in src's shape and intensity units -> NIfTI at path with src's affine and header, stored as float32."""
    out = nib.Nifti1Image(data.astype(np.float32), src.affine, src.header)
    out.set_data_dtype(np.float32)
    nib.save(out, path)


def input_files(path):
    """--input: one NIfTI file, or every .nii / .nii.gz in a folder."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.nii")) + glob.glob(os.path.join(path, "*.nii.gz")))
        if not files:
            raise DataError(f"{path}: no .nii or .nii.gz files")
        return files
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    return [path]


def read_input(path):
    """One NIfTI file, a 2D slice or a 3D volume (H, W, D) taken slice by slice along its last axis -> (its image,
    its array, and its slices as dataset.prepare gives them: x, lo, hi, files (a name per slice), masks=None,
    skipped, and index (each slice's place on the last axis)). Constant slices are skipped."""
    img, a = read_image(path)
    if a.ndim not in (2, 3):
        raise DataError(f"{path}: expected a 2D slice or a 3D volume (H, W, D), got shape {a.shape}")
    vol = a.reshape(a.shape[0], a.shape[1], -1)
    name = os.path.basename(path)
    p = dict(x=[], lo=[], hi=[], files=[], index=[], masks=None, skipped=[])
    for k in range(vol.shape[2]):
        label = name if vol.shape[2] == 1 else f"{name}:{k}"
        try:
            x, lo, hi = dataset.normalise(vol[:, :, k], label)
        except dataset.ConstantSlice as e:
            p["skipped"].append(str(e))
            continue
        for key, v in zip(("x", "lo", "hi", "files", "index"), (x, lo, hi, label, k)):
            p[key].append(v)
    return img, a, dict(p, x=np.array(p["x"], np.float32).reshape(-1, dataset.H, dataset.W),
                        lo=np.array(p["lo"]), hi=np.array(p["hi"]))


def write_back(img, a, p, rec, path):
    """Reconstructions (N, 256, 128) in [0, 1] -> a NIfTI file with the input's shape, affine, header and
    intensity units; skipped (constant) slices are copied through unchanged."""
    vol = a.reshape(a.shape[0], a.shape[1], -1).copy()
    units = dataset.denormalise(rec.astype(np.float64), p["lo"][:, None, None], p["hi"][:, None, None])
    for k, r in zip(p["index"], units):
        vol[:, :, k] = to_file_shape(r, vol.shape[:2])
    write_like(img, vol.reshape(a.shape), path)


def predict_inputs(model, dev, out):
    """--input: reconstruct every file and write it back under out/nifti -> (x, rec, a name per slice, scores,
    skipped) over all the files."""
    os.makedirs(os.path.join(out, "nifti"), exist_ok=True)
    xs, recs, names, scores, skipped = [], [], [], [], []
    for path in input_files(input):
        img, a, p = read_input(path)
        rec, s, _ = evaluate_split(model, p, dev, batch_size) if len(p["x"]) else (p["x"], None, None)
        write_back(img, a, p, rec, os.path.join(out, "nifti", os.path.basename(path)))
        xs.append(p["x"]), recs.append(rec), names.extend(p["files"]), skipped.extend(p["skipped"])
        scores += [s] if s else []
    if not names:
        raise DataError(f"{input}: every slice is constant, nothing to reconstruct")
    return (np.concatenate(xs), np.concatenate(recs), names,
            {c: np.concatenate([s[c] for s in scores]) for c in scores[0]}, skipped)


def write_results(out, x, rec, names, scores, metrics, masks=None):
    """per_slice.csv, metrics.json and reconstructions.png of one prediction."""
    write_per_slice(os.path.join(out, "per_slice.csv"), names, scores)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    shown = dict(x=x, masks=masks)
    show = figure_slices(shown, n_show)
    plot_reconstructions(x[show], rec[show], os.path.join(out, "reconstructions.png"),
                         f"{metrics['split']}, mean SSIM {metrics['ssim']:.4f} over {len(rec)} slices",
                         shown_masks(shown, show))


def main():
    check_ranges(configure(globals(), config_keys, sys.argv[1:], bare_true=("save_nifti",), types=TYPES), RANGES)
    dev = pick_device(device)
    ckpt_path = find_checkpoint(checkpoint, "runs/*/best_model.pt")
    model, ckpt = load_model(ckpt_path, dev, kind="vqvae")
    where = "input" if input else split
    out = out_dir or os.path.join(os.path.dirname(ckpt_path), f"predict_{where}")
    make_folder(out)
    if input:
        (x, rec, names, scores, skipped), masks = predict_inputs(model, dev, out), None
    else:
        p = dataset.prepare(split_files(ckpt_path, ckpt, data_dir, split), None, skip_bad, desc=split)
        rec, scores, _ = evaluate_split(model, p, dev, batch_size)
        x, names, skipped, masks = p["x"], [os.path.basename(f) for f in p["files"]], p["skipped"], p["masks"]
        if save_nifti:
            os.makedirs(os.path.join(out, "nifti"), exist_ok=True)
            for i, src in enumerate(p["files"]):
                img, a = read_image(src)
                write_back(img, a, dict(index=[0], lo=p["lo"][i:i + 1], hi=p["hi"][i:i + 1]), rec[i:i + 1],
                           os.path.join(out, "nifti", os.path.basename(src)))
    metrics = dict(**split_means(scores), split=input or split, checkpoint=os.path.abspath(ckpt_path),
                   skipped=skipped)
    write_results(out, x, rec, names, scores, metrics, masks)
    print(f"{where}: ssim={metrics['ssim']:.4f} psnr={metrics['psnr']:.2f} on {len(rec)} slices -> {out}")


if __name__ == "__main__":
    try:
        main()
    except DataError as e:
        sys.exit(f"error: {e}")
