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

import checkpoints
import dataset
import figures
import options
from job import on_cuda, pick_device
from metrics import evaluate_split, split_means, write_per_slice
from options import Option
from utils import doing, make_folder, run_script, write_text

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


def predict_inputs(model, dev, out, cfg):
    """--input: reconstruct every slice of the files and write each file back under out/nifti, in its shape, affine,
    header and units -> (x, rec, a name per slice, scores, skipped)."""
    p = dataset.read_inputs(cfg.input)
    doing(f"reconstructing and scoring {len(p['x'])} slices of {cfg.input}")
    rec, scores, _ = evaluate_split(model, p, dev, cfg.batch_size, on_cuda(cfg.amp, dev))
    write_units(out, p, rec)
    return p["x"], rec, p["files"], scores, p["skipped"]


def write_units(out, p, rec):
    """Reconstructions (N, 256, 128) in [0, 1] of prepared slices p -> out/nifti/<source name>, in each source's
    shape, affine, header and intensity units; the slices left out (constant) are copied through unchanged."""
    make_folder(os.path.join(out, "nifti"))
    units = dataset.denormalise(rec.astype(np.float64), p["lo"][:, None, None], p["hi"][:, None, None])
    for src in p.get("read", p["sources"]):
        mine = [i for i, s in enumerate(p["sources"]) if s == src]
        dataset.write_like(src, units[mine], [p["index"][i] for i in mine],
                           os.path.join(out, "nifti", os.path.basename(src)))


def write_results(out, x, rec, names, scores, metrics, n_show, masks=None):
    """per_slice.csv, metrics.json and reconstructions.png of one prediction."""
    write_per_slice(os.path.join(out, "per_slice.csv"), names, scores)
    write_text(os.path.join(out, "metrics.json"), json.dumps(metrics, indent=1))
    figures.plot_split(dict(x=x, masks=masks), lambda show: rec[show], os.path.join(out, "reconstructions.png"),
                       f"{metrics['split']}, mean SSIM {metrics['ssim']:.4f} over {len(rec)} slices", n_show)


def predict_split(model, dev, out, cfg, ckpt_path, ckpt):
    """A split of the data: reconstructed, scored, and with --save_nifti written back beside the inputs' names."""
    files = dataset.split_files(os.path.dirname(ckpt_path), cfg.split, cfg.data_dir, ckpt["data_root"],
                                ckpt["config"]["val_fraction"], ckpt["config"]["seed"])
    p = dataset.prepare(files, None, cfg.skip_bad, desc=cfg.split)
    doing(f"reconstructing and scoring the {cfg.split} split")
    rec, scores, _ = evaluate_split(model, p, dev, cfg.batch_size, on_cuda(cfg.amp, dev))
    if cfg.save_nifti:
        write_units(out, dict(p, sources=p["files"], index=[None] * len(p["files"])), rec)
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
