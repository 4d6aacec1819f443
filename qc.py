"""Find the slices that do not belong: a score for every slice of a study and a map of where it is unusual, from the
VQ-VAE (which reconstructs what it has seen) and, where given, its prior (which knows how likely each code is).

    python qc.py                                        # the newest VQ-VAE run's test split
    python qc.py --input=scans/                         # any NIfTI files or folder; 3D volumes slice by slice
    python qc.py --data_dir=/path/keras_slices_data --split=train --prior_checkpoint=runs/X/best_prior.pt

Each slice gets the scores below, each read as a robust z-score against the VQ-VAE run's own validation slices (its
median and spread there); each family of scores gets a z (family_z(), in columns z_<family>), `z` is the largest,
`family` the one that gives it and `cause` its score that is the most unusual, `score` is the percentage of
validation slices whose `z` is lower, and `flagged` marks a z above that of all but `fpr` of the ordinary validation
slices (percentile_and_flag()). Writes to <run>/qc_<split> (or qc_input): qc.csv (a row per slice, the input's
order), qc.png (the most unusual slices of each cause in turn beside their reconstructions and maps),
calibration.json and, with --save_nifti, nifti/<name>: the map in the input's shape and affine. Scores and how they
were chosen: README, QC, and EXPERIMENTS.md, Quality control.
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

import checkpoints
import dataset
import figures
import options
from job import on_cuda, pick_device
from metrics import MIN_REGION_PIXELS, box_mean, image_statistics, reconstruct, ssim_torch
from options import Option
from utils import DataError, doing, make_folder, run_script, write_csv, write_text

BLOCK = dict(
    checkpoint=Option(None, kind=str),        # the VQ-VAE; None = the newest runs/*/best_model.pt
    prior_checkpoint=Option(None, kind=str),  # its prior, for the bits-per-code scores; None = without them
    data_dir=Option(None, kind=str),          # course-layout root; None = the data the VQ-VAE was trained on
    split=Option("test", choices=dataset.SPLITS),
    input=Option(None, kind=str),             # a NIfTI file or a folder of them, in any layout
    out_dir=Option(None, kind=str),           # None = <checkpoint folder>/qc_<split>, or qc_input with --input
    fpr=Option(0.01, above=0, below=1),       # share of the validation slices that `flagged` may mark
    n_show=Option(8, at_least=0),             # the most unusual slices in qc.png
    heal_bits=Option(None, kind=float, above=0),  # with a prior: the map against the slice healed of codes above
                                                  # these bits (slow on a CPU: about 1 s a slice); None = bits map
    save_nifti=Option(False),                 # write each slice's anomaly map as NIfTI (input's shape and affine)
    skip_bad=Option(False),                   # True: leave bad files out and list them instead of stopping
    device=Option("auto"),
    amp=Option("auto", kind=(str, bool), choices=("auto", True, False)),  # bf16 autocast; auto = on CUDA
    batch_size=Option(64, at_least=1),
)

# each score and the way it departs from normal slices: "up" (only high values are unusual) or "both". A
# reconstruction error far below normal is unusual too: a blurred or empty slice is easy to reconstruct.
DIRECTIONS = dict(recon_ssim="both", recon_mse="both", recon_local="both", prior_bits="up", prior_local="up",
                  snr="both", cnr="both", cv="both", background="both", efc="both", foreground="both",
                  saturation="up", label_fit="up")
STATISTICS = ("snr", "cnr", "cv", "background", "efc", "foreground", "saturation")  # the baseline (MRQy-style)
GROUPS = dict(reconstruction=("recon_ssim", "recon_mse", "recon_local"), prior=("prior_bits", "prior_local"),
              statistics=STATISTICS, labels=("label_fit",))
LOCAL = 15  # pixels: the window over which a local reconstruction error is averaged (a lesion-sized patch)


# ---- scores ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def slice_scores(x, vqvae, prior, dev, batch_size=64, amp=False, masks=None, label_model=None, heal_bits=None):
    """Slices x (N, H, W) in [0, 1] -> ({score: (N,)}, anomaly maps (N, H, W), reconstructions (N, H, W)).

    recon_ssim, 1 - SSIM of the reconstruction; recon_mse, its mean squared error; recon_local, the largest mean
    absolute error over a LOCAL x LOCAL window, where the error concentrates; with a prior, prior_bits, the mean
    bits per code, and prior_local, their largest mean over 3 x 3 codes; the MRQy-style STATISTICS; with labels and
    a label model, label_fit. The map: with a prior, each code's bits spread over its pixels (or with heal_bits the
    error against the healed reconstruction); without one, the reconstruction error (EXPERIMENTS.md: the prior's
    maps find a lesion two to seven times better)."""
    rec, codes = reconstruct(vqvae, x, dev, batch_size, amp)
    xt, rt = torch.from_numpy(x)[:, None], torch.from_numpy(rec).clamp(0, 1)[:, None]
    err = (xt - rt).abs()
    out = dict(recon_ssim=(1 - ssim_torch(rt, xt)).numpy(), recon_mse=(err ** 2).mean((1, 2, 3)).numpy(),
               recon_local=largest_mean(err[:, 0], LOCAL))
    maps = smoothed(err)
    if prior is not None:
        codes = torch.from_numpy(codes).to(dev)
        bits = code_bits(prior, codes, batch_size)
        out.update(prior_bits=bits.mean((1, 2)).numpy(), prior_local=largest_mean(bits, 3))
        scale = x.shape[1] // bits.shape[1]
        maps = bits.repeat_interleave(scale, 1).repeat_interleave(scale, 2).numpy()
        if heal_bits:
            maps = smoothed((xt - healed(vqvae, prior, codes, heal_bits, batch_size)[:, None]).abs())
    stats = [image_statistics(s) for s in x]
    out.update({k: np.array([s[k] for s in stats]) for k in STATISTICS})
    if masks is not None and label_model is not None:
        out["label_fit"] = label_fit(x, masks, label_model)
    return out, maps, rec


def largest_mean(maps, win):
    """Maps (N, H, W) tensor -> the largest mean over a win x win window of each, (N,) numpy."""
    return box_mean(maps[:, None], win).amax((1, 2, 3)).numpy()


def code_bits(prior, codes, batch_size):
    """The bits each code costs under the prior, (N, h, w) float on the CPU, for grids (N, h, w) on its device."""
    return torch.cat([prior.code_bits(c).float().cpu() for c in codes.split(batch_size)])


def smoothed(err):
    """An error map (N, 1, H, W) averaged over 5 x 5 pixels -> (N, H, W) numpy."""
    return F.pad(box_mean(err, 5), (2, 2, 2, 2), mode="replicate")[:, 0].numpy()


def healed(vqvae, prior, codes, heal_bits, batch_size, seed=0):
    """The slices as the VQ-VAE decodes their codes once the prior has redrawn each code that costs more than
    heal_bits given the ones before it (Pinaya et al. 2022) -> (N, H, W) tensor in [0, 1]."""
    gen = torch.Generator(device=codes.device).manual_seed(seed)
    return torch.cat([vqvae.decode(prior.sample(len(c), generator=gen, given=c, heal_bits=heal_bits)).float()
                      for c in codes.split(batch_size)]).clamp(0, 1)[:, 0].cpu()


BINS = 32  # intensity bins of the label model


def fit_label_model(x, masks):
    """For each label 0-5, the distribution of its pixels' intensities (BINS bins of [0, 1], add-one smoothed) over
    slices x (N, H, W) and their labels: how the organs look in the data the VQ-VAE was validated on."""
    bins = np.minimum((x * BINS).astype(int), BINS - 1)
    counts = np.ones((len(dataset.LABELS), BINS))
    np.add.at(counts, (masks.ravel(), bins.ravel()), 1)
    return counts / counts.sum(1, keepdims=True)


def label_fit(x, masks, model):
    """-log p(intensity bin | its label) under the label model, averaged over each label's pixels, then over the
    labels a slice holds (MIN_REGION_PIXELS or more), so that a small organ counts as much as the body: labels that
    do not fit their image (another slice's, flipped, an organ where the image shows none) put pixels in unlikely
    bins."""
    bins = np.minimum((x * BINS).astype(int), BINS - 1)
    nll = -np.log(model[masks, bins])
    return np.array([np.mean([n[m == v].mean() for v in np.unique(m) if (m == v).sum() >= MIN_REGION_PIXELS])
                     for n, m in zip(nll, masks)])


# ---- calibration: against the VQ-VAE run's own validation slices ------------------------------------------------

def robust_z(v, ref):
    """How many spreads of the reference values (1.4826 x their median absolute deviation, as a standard deviation
    for normal data, robust to the few odd slices any split holds) v lies above their median. Where more than half
    the values are equal (a saturated share that is mostly 0), the median absolute deviation is 0 and the spread is
    1.2533 x the mean absolute deviation instead, its counterpart for normal data."""
    median = np.median(ref)
    deviation = np.abs(ref - median)
    spread = 1.4826 * np.median(deviation) or 1.2533 * np.mean(deviation)
    return (v - median) / max(spread, 1e-6 * max(abs(median), 1e-6))


def family_z(scores, validation):
    """{family: z} of slices' scores against the validation slices' (each {score: (N,)}): within each family of
    scores (GROUPS), the largest robust z, each score counted in the direction in which it is unusual; then that
    largest, itself a robust z against the same over the validation slices, so that seven statistics count no more
    than two prior scores."""
    def largest(s, names):
        return np.max([directed_z(s, validation, k) for k in names], axis=0)
    out = {}
    for family, names in GROUPS.items():
        names = [k for k in names if k in scores]
        if names:
            out[family] = robust_z(largest(scores, names), largest(validation, names))
    return out


def directed_z(scores, validation, name):
    """The robust z of one score, counted in the direction in which it is unusual (DIRECTIONS)."""
    z = robust_z(scores[name], validation[name])
    return np.abs(z) if DIRECTIONS[name] == "both" else z


def causes(scores, validation, family):
    """For each slice, the score of its family (the one that gives its z) whose own z is the largest: what is
    unusual about it (saturation for a clipped slice, recon_ssim for one the VQ-VAE cannot reconstruct)."""
    zs = {k: directed_z(scores, validation, k) for k in scores}
    return np.array([max((k for k in GROUPS[f] if k in zs), key=lambda k: zs[k][i]) for i, f in enumerate(family)])


def combined(scores, validation):
    """The combined z: the largest family z (family_z)."""
    return np.max(list(family_z(scores, validation).values()), axis=0)


def shown(z, cause, n):
    """The n slices qc.png shows: the most unusual of each cause in turn, then the second of each, and so on, so
    that one fault filling the top of the list does not hide the others."""
    order = np.argsort(-z)
    ranked = [[i for i in order if cause[i] == c] for c in dict.fromkeys(cause[order])]
    return [r[k] for k in range(max(map(len, ranked), default=0)) for r in ranked if k < len(r)][:n]


# gross outliers lie this many interquartile ranges above the upper quartile: twice Tukey's far-out fence, 8.8
# standard deviations for normal data, past 0.15% of the skewed clean scores in the tests; the demo validation's ends
# of scans lie 17-28 out, its other slices at most 3
GROSS = 6


def percentile_and_flag(z, validation, fpr, names):
    """(the percentage of validation slices whose combined z, over the same scores `names`, is lower; flagged: z
    above all but fpr of the ordinary validation slices). A validation split holds unusual slices of its own (the
    demo's 80 hold 4 ends of scans); where they are more than fpr of it, the threshold would fall among them and
    mark only what is stranger still. So the gross outliers, more than GROSS interquartile ranges above the upper
    quartile, are set aside before the threshold is taken."""
    ref = np.sort(combined({k: validation[k] for k in names}, validation))
    q1, q3 = np.quantile(ref, [0.25, 0.75])
    threshold = np.quantile(ref[ref <= q3 + GROSS * (q3 - q1)], 1 - fpr, method="higher")
    return 100 * np.searchsorted(ref, z, side="left") / len(ref), z > threshold


# ---- the run -----------------------------------------------------------------------------------------------------

def load_models(checkpoint, prior_checkpoint, dev):
    """The VQ-VAE (the newest runs/*/best_model.pt for None) and, if given, its prior -> (path, ckpt, vqvae, prior)."""
    path = checkpoints.find(checkpoint, "runs/*/best_model.pt")
    vqvae, ckpt = checkpoints.load_model(path, dev, "vqvae")
    prior = None
    if prior_checkpoint:
        prior, pckpt = checkpoints.load_model(prior_checkpoint, dev, "prior")
        if os.path.abspath(pckpt["vqvae_checkpoint"]) != os.path.abspath(path):
            raise DataError(f"{prior_checkpoint}: a prior of {pckpt['vqvae_checkpoint']}'s codes, not of {path}'s")
    return path, ckpt, vqvae, prior


def inputs(cfg, path, ckpt):
    """The slices to check: {x, files (a name per slice), index (its place in a volume, or None), masks, skipped,
    sources (the file of each slice)}: a split of the run's data, or --input's files."""
    if cfg.input:
        return dataset.read_inputs(cfg.input, cfg.skip_bad)
    files = dataset.split_files(os.path.dirname(path), cfg.split, cfg.data_dir, ckpt["data_root"],
                                ckpt["config"]["val_fraction"], ckpt["config"]["seed"])
    p = dataset.prepare(files, None, cfg.skip_bad, desc=cfg.split)
    return dict(p, index=[None] * len(p["x"]), sources=p["files"])


def calibration_of(run_folder, vqvae, prior, dev, batch_size, amp, cache_dir):
    """The scores of the run's validation slices, against which every slice is read, and the label model where
    that split has labels."""
    val = dataset.prepare(dataset.read_splits(run_folder)["validate"], cache_dir, True, desc="validate")
    doing("scoring the validation slices for calibration")
    label_model = None if val["masks"] is None else fit_label_model(val["x"], val["masks"])
    scores, _, _ = slice_scores(val["x"], vqvae, prior, dev, batch_size, amp, val["masks"], label_model)
    return scores, label_model


def write_maps(out, p, maps):
    """Each source file's maps as NIfTI under out/nifti, in its shape and affine (volumes slice by slice)."""
    make_folder(os.path.join(out, "nifti"))
    for src in dict.fromkeys(p["sources"]):
        mine = [i for i, s in enumerate(p["sources"]) if s == src]
        dataset.write_like(src, maps[mine], [p["index"][i] for i in mine],
                           os.path.join(out, "nifti", os.path.basename(src)), keep_source=False)


def main(argv):
    cfg = options.parse(BLOCK, argv)
    dev = pick_device(cfg.device)
    path, ckpt, vqvae, prior = load_models(cfg.checkpoint, cfg.prior_checkpoint, dev)
    out = cfg.out_dir or os.path.join(os.path.dirname(path), f"qc_{'input' if cfg.input else cfg.split}")
    make_folder(out)
    validation, label_model = calibration_of(os.path.dirname(path), vqvae, prior, dev, cfg.batch_size,
                                             on_cuda(cfg.amp, dev), ckpt["config"]["cache_dir"])
    p = inputs(cfg, path, ckpt)
    doing(f"scoring {len(p['x'])} slices")
    scores, maps, rec = slice_scores(p["x"], vqvae, prior, dev, cfg.batch_size, on_cuda(cfg.amp, dev),
                                     p.get("masks"), label_model, cfg.heal_bits)
    fz = family_z(scores, validation)
    stacked = np.array(list(fz.values()))
    z, family = stacked.max(0), np.array(list(fz))[stacked.argmax(0)]
    cause = causes(scores, validation, family)
    score, flagged = percentile_and_flag(z, validation, cfg.fpr, list(scores))
    write_text(os.path.join(out, "calibration.json"), json.dumps(dict(
        validation={k: v.tolist() for k, v in validation.items()}, checkpoint=os.path.abspath(path),
        prior_checkpoint=cfg.prior_checkpoint), indent=1))
    write_csv(os.path.join(out, "qc.csv"), ["file", "slice", *scores, *(f"z_{f}" for f in fz), "z", "family", "cause",
                                            "score", "flagged"],
              [[os.path.basename(p["sources"][i]), "" if p["index"][i] is None else p["index"][i],
                *(f"{v[i]:.6g}" for v in scores.values()), *(f"{v[i]:.4g}" for v in fz.values()), f"{z[i]:.4g}",
                family[i], cause[i], f"{score[i]:.2f}", int(flagged[i])] for i in range(len(z))])
    top = shown(z, cause, cfg.n_show)
    figures.plot_qc(os.path.join(out, "qc.png"), p["x"][top], rec[top], maps[top],
                    [f"{p['files'][i]}\n{cause[i]}: z {z[i]:.3g}, score {score[i]:.0f}" for i in top])
    if cfg.save_nifti:
        write_maps(out, p, maps)
    print(f"{len(z)} slices, {int(flagged.sum())} flagged at a validation false-positive rate of {cfg.fpr:g} "
          f"({len(p['skipped'])} skipped) -> {out}")
    if flagged.any():
        names, counts = np.unique(cause[flagged], return_counts=True)
        print("flagged, by cause: " + ", ".join(f"{c} {n}" for n, c in sorted(zip(counts, names), reverse=True)))


if __name__ == "__main__":
    run_script(main)
