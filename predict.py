"""Reconstruct a split with a trained VQ-VAE: scores per slice and per split, a figure, and optionally NIfTI files.

    python predict.py                                   # newest run's best model, its data, the test split
    python predict.py --checkpoint=runs/X/best_model.pt --data_dir=/path/keras_slices_data --split=validate
    python predict.py --save_nifti                      # also write each reconstruction as NIfTI under nifti/
    python predict.py --input=scan.nii.gz               # any NIfTI file or folder of them; 3D volumes slice by slice

Where the split has labels (keras_slices_seg_<split>), the scores include each organ's (README, The metric).

Every name in the block below can be overridden as --name=value. To generate new slices, see sample.py.
"""
import json
import os

import numpy as np
from skimage.transform import resize

import checkpoints
import dataset
import figures
import options
from job import on_cuda, pick_device
from metrics import evaluate_split, split_means, write_per_slice
from options import Option
from utils import DataError, doing, make_folder, read_image, run_script, write_nifti, write_text

BLOCK = dict(
    checkpoint=Option(None, kind=str),   # None = the newest runs/*/best_model.pt
    data_dir=Option(None, kind=str),     # course-layout root; None = the data the checkpoint was trained on
    split=Option("test", choices=dataset.SPLITS),
    input=Option(None, kind=str),        # a NIfTI file or a folder of them, in any layout: each written back
    out_dir=Option(None, kind=str),      # None = <checkpoint folder>/predict_<split>, or predict_input with --input
    save_nifti=Option(False),            # write reconstructions as NIfTI (input's name, affine, shape, units)
    n_show=Option(6, at_least=0),        # slices in the figure
    skip_bad=Option(False),              # True: drop bad slices and list them instead of stopping
    device=Option("auto"),
    amp=Option("auto", kind=(str, bool), choices=("auto", True, False)),  # bf16 autocast; auto = on CUDA
    batch_size=Option(64, at_least=1),
)


def split_files(ckpt_path, ckpt, data_dir, split):
    """The split's files: from data_dir, else the run's splits.json, else the checkpoint's data root."""
    if data_dir is None and os.path.exists(os.path.join(os.path.dirname(ckpt_path), "splits.json")):
        splits = dataset.read_splits(os.path.dirname(ckpt_path))
        if split in splits:
            return splits[split]
    root = data_dir or ckpt["data_root"]
    splits = dataset.find_splits(root, val_fraction=ckpt["config"]["val_fraction"], seed=ckpt["config"]["seed"])
    if split not in splits:
        raise DataError(f"{root}: no {split} split")
    return splits[split]


def to_file_shape(rec, shape2d):
    """A reconstruction (H, W) in intensity units -> the file's in-plane shape, by linear interpolation."""
    if rec.shape == shape2d:
        return rec
    return resize(rec, shape2d, order=1, preserve_range=True, anti_aliasing=False)


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
    write_nifti(path, vol.reshape(a.shape).astype(np.float32), img.affine, img.header)


def predict_inputs(model, dev, out, cfg):
    """--input: reconstruct every file and write it back under out/nifti -> (x, rec, a name per slice, scores,
    skipped) over all the files."""
    make_folder(os.path.join(out, "nifti"))
    xs, recs, names, scores, skipped = [], [], [], [], []
    for path in dataset.list_slices(cfg.input, single_file=True):
        doing(f"reconstructing {path}")
        img, a, p = read_input(path)
        rec, s, _ = evaluate_split(model, p, dev, cfg.batch_size, on_cuda(cfg.amp, dev)) if len(p["x"]) else (
            p["x"], None, None)
        write_back(img, a, p, rec, os.path.join(out, "nifti", os.path.basename(path)))
        xs.append(p["x"]), recs.append(rec), names.extend(p["files"]), skipped.extend(p["skipped"])
        scores += [s] if s else []
    if not names:
        raise DataError(f"{cfg.input}: every slice is constant, nothing to reconstruct")
    return (np.concatenate(xs), np.concatenate(recs), names,
            {c: np.concatenate([s[c] for s in scores]) for c in scores[0]}, skipped)


def write_results(out, x, rec, names, scores, metrics, n_show, masks=None):
    """per_slice.csv, metrics.json and reconstructions.png of one prediction."""
    write_per_slice(os.path.join(out, "per_slice.csv"), names, scores)
    write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
    figures.plot_split(dict(x=x, masks=masks), lambda show: rec[show], os.path.join(out, "reconstructions.png"),
                       f"{metrics['split']}, mean SSIM {metrics['ssim']:.4f} over {len(rec)} slices", n_show)


def predict_split(model, dev, out, cfg, ckpt_path, ckpt):
    """A split of the data: reconstructed, scored, and with --save_nifti written back beside the inputs' names."""
    p = dataset.prepare(split_files(ckpt_path, ckpt, cfg.data_dir, cfg.split), None, cfg.skip_bad, desc=cfg.split)
    doing(f"reconstructing and scoring the {cfg.split} split")
    rec, scores, _ = evaluate_split(model, p, dev, cfg.batch_size, on_cuda(cfg.amp, dev))
    if cfg.save_nifti:
        make_folder(os.path.join(out, "nifti"))
        for i, src in enumerate(p["files"]):
            img, a = read_image(src)
            write_back(img, a, dict(index=[0], lo=p["lo"][i:i + 1], hi=p["hi"][i:i + 1]), rec[i:i + 1],
                       os.path.join(out, "nifti", os.path.basename(src)))
    return p["x"], rec, [os.path.basename(f) for f in p["files"]], scores, p["skipped"], p["masks"]


def main(argv):
    cfg = options.parse(BLOCK, argv)
    dev = pick_device(cfg.device)
    ckpt_path = checkpoints.find(cfg.checkpoint, "runs/*/best_model.pt")
    model, ckpt = checkpoints.load_model(ckpt_path, dev, "vqvae")
    where = "input" if cfg.input else cfg.split
    out = cfg.out_dir or os.path.join(os.path.dirname(ckpt_path), f"predict_{where}")
    make_folder(out)
    if cfg.input:
        (x, rec, names, scores, skipped), masks = predict_inputs(model, dev, out, cfg), None
    else:
        x, rec, names, scores, skipped, masks = predict_split(model, dev, out, cfg, ckpt_path, ckpt)
    metrics = dict(**split_means(scores), split=cfg.input or cfg.split, checkpoint=os.path.abspath(ckpt_path),
                   skipped=skipped)
    write_results(out, x, rec, names, scores, metrics, cfg.n_show, masks)
    print(f"{where}: ssim={metrics['ssim']:.4f} psnr={metrics['psnr']:.2f} on {len(rec)} slices -> {out}")


if __name__ == "__main__":
    run_script(main)
