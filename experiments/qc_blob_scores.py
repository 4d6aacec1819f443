"""Which whole-slice score finds a small local fault (EXPERIMENTS.md, Quality control): the prior's bits per code
summed up several ways, and the largest local mean of the error against the slice healed of its unlikely codes
(Pinaya et al. 2022), each a robust z against the VQ-VAE run's validation slices; the AUROC and AP of the QC
benchmark's clean half against its other half with a blob (artefacts.blob).

    python experiments/qc_blob_scores.py --checkpoint=runs/qs/best_model.pt \\
        --prior_checkpoint=runs/qs-prior/best_prior.pt --data_dir=data/qc-bench
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import artefacts  # noqa: E402
import dataset  # noqa: E402
import options  # noqa: E402
import qc  # noqa: E402
from artefacts import halves, normalised  # noqa: E402
from job import pick_device  # noqa: E402
from metrics import auroc, average_precision, reconstruct  # noqa: E402
from options import Option  # noqa: E402
from utils import run_script  # noqa: E402

BLOCK = dict(
    checkpoint=Option(None, kind=str),
    prior_checkpoint=Option(None, kind=str),
    data_dir=Option("data/qc-bench"),
    split=Option("test", choices=dataset.SPLITS),
    seed=Option(0),
    severity=Option("moderate", choices=artefacts.SEVERITIES),
    heal_bits=Option(10.0, above=0),  # the healed error: codes above these bits redrawn
    device=Option("auto"),
    batch_size=Option(64, at_least=1),
)
WINDOWS = (5, 9, 15)  # pixels: the healed error's local means


@torch.no_grad()
def candidates(x, vqvae, prior, dev, cfg, median=None):
    """{candidate: (N,)} for slices x (N, H, W): the bits' mean, largest code, mean of the 8 largest, largest 2 x 2
    and 3 x 3 means (qc.py's prior_local), the largest 3 x 3 mean of the bits less each position's validation median
    (given `median`), and the healed error's largest mean over each of WINDOWS."""
    _, codes = reconstruct(vqvae, x, dev, cfg.batch_size, decode=False)
    codes = torch.from_numpy(codes).to(dev)
    bits = qc.code_bits(prior, codes, cfg.batch_size)
    out = dict(bits_mean=bits.mean((1, 2)).numpy(), bits_largest=bits.amax((1, 2)).numpy(),
               bits_top8=bits.flatten(1).topk(8).values.mean(1).numpy(), bits_2x2=qc.largest_mean(bits, 2),
               bits_3x3=qc.largest_mean(bits, 3))
    if median is not None:
        out["bits_less_median_3x3"] = qc.largest_mean(bits - median, 3)
    error = (torch.from_numpy(x) - qc.healed(vqvae, prior, codes, cfg.heal_bits, cfg.batch_size)).abs()
    out.update({f"healed_{w}px": qc.largest_mean(error, w) for w in WINDOWS})
    return out, bits


def main(argv):
    cfg = options.parse(BLOCK, argv)
    dev = pick_device(cfg.device)
    path, ckpt, vqvae, prior = qc.load_models(cfg.checkpoint, cfg.prior_checkpoint, dev)
    val = dataset.prepare(dataset.read_splits(os.path.dirname(path))["validate"], ckpt["config"]["cache_dir"], True,
                          desc="validate")
    ref, bits = candidates(val["x"], vqvae, prior, dev, cfg)
    median = bits.median(0).values
    ref["bits_less_median_3x3"] = qc.largest_mean(bits - median, 3)
    raw, _, clean_idx, bad_idx, _, _ = halves(cfg.data_dir, cfg.split, cfg.seed)
    clean, _ = candidates(normalised([raw[i] for i in clean_idx]), vqvae, prior, dev, cfg, median)
    blobs = [artefacts.corrupt("blob", raw[i], np.random.default_rng([cfg.seed, int(i)]), cfg.severity)[0]
             for i in bad_idx]  # the benchmark's blobs: the same generator per slice
    bad, _ = candidates(normalised(blobs), vqvae, prior, dev, cfg, median)
    y = np.r_[np.zeros(len(clean_idx)), np.ones(len(bad_idx))]
    print(f"{cfg.data_dir}, blob {cfg.severity}: {len(clean_idx)} clean and {len(bad_idx)} blob slices; AUROC / AP")
    for name in ref:
        z = np.r_[qc.robust_z(clean[name], ref[name]), qc.robust_z(bad[name], ref[name])]
        print(f"| {name} | {auroc(y, z):.3f} / {average_precision(y, z):.3f} |")


if __name__ == "__main__":
    run_script(main)
