"""The QC benchmark (EXPERIMENTS.md, Quality control): slices of a phantom the models never saw, half left clean and
half corrupted one kind at a time (artefacts.py) at a mild and a moderate severity; each score's sample-level AUROC
and average precision per kind, the anomaly maps' pixel-level average precision on the local blob, and the label
check's AUROC on label files that do not fit their images.

    python phantom.py --out_dir=data/qc-bench --seed=7 --mix=0.5 --n_test=400
    python experiments/qc_benchmark.py --checkpoint=runs/qs/best_model.pt --prior_checkpoint=runs/qs-prior/best_prior.pt

Each score is a combination as qc.py makes it (the largest robust z of its members against the VQ-VAE run's
validation slices); the rows compare every member set, the simple statistics alone being the baseline. Writes
<out_dir>/benchmark.json and prints the tables.
"""
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import artefacts  # noqa: E402
import dataset  # noqa: E402
import options  # noqa: E402
import qc  # noqa: E402
from job import pick_device  # noqa: E402
from metrics import auroc, average_precision  # noqa: E402
from options import Option  # noqa: E402
from utils import make_folder, run_script, write_file, write_text  # noqa: E402

BLOCK = dict(
    checkpoint=Option(None, kind=str),
    prior_checkpoint=Option(None, kind=str),
    data_dir=Option("data/qc-bench"),
    split=Option("test", choices=dataset.SPLITS),
    seed=Option(0),
    heal_bits=Option(None, kind=float, above=0),  # also the healed map (Pinaya et al.): codes above these bits redrawn
    out_dir=Option(None, kind=str),               # None = <checkpoint folder>/qc_benchmark
    device=Option("auto"),
    batch_size=Option(64, at_least=1),
    rescore=Option(False),  # True: the tables again from <out_dir>/scores.npz, after a change to the combination
)
SETS = dict(combined=None,  # every score qc.py computes (but label_fit, which has its own rows)
            learned=("recon_ssim", "recon_mse", "recon_local", "prior_bits", "prior_local"),
            reconstruction=("recon_ssim", "recon_mse", "recon_local"),
            prior=("prior_bits", "prior_local"),
            statistics=qc.STATISTICS)
LABEL_FAULTS = ("another slice's", "flipped left-right", "an organ where the image shows none")


def set_z(scores, validation, names):
    """The combined z of one member set (all of the scores for None)."""
    return qc.combined({k: v for k, v in scores.items() if names is None or k in names}, validation)


def organ_where_none(labels, rng):
    """Labels with a bladder-sized ellipse of a drawn organ label (3-5) placed inside the body where the labels hold
    only body: an organ the image does not show."""
    lab = labels.copy()
    inside = np.argwhere(lab == 1) if (lab == 1).any() else np.argwhere(lab >= 0)  # a slice past the body: anywhere
    cy, cx = inside[rng.integers(len(inside))]
    yy, xx = np.mgrid[:lab.shape[0], :lab.shape[1]]
    ry, rx = rng.uniform(10, 20), rng.uniform(6, 12)
    lab[(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1) & (lab == 1)] = rng.integers(3, 6)
    return lab


def main(argv):
    cfg = options.parse(BLOCK, argv)
    if cfg.rescore:
        return report(rescored(cfg.out_dir))
    dev = pick_device(cfg.device)
    path, ckpt, vqvae, prior = qc.load_models(cfg.checkpoint, cfg.prior_checkpoint, dev)
    out = cfg.out_dir or os.path.join(os.path.dirname(path), "qc_benchmark")
    make_folder(out)
    t0 = time.time()
    ref, label_model = qc.calibration_of(os.path.dirname(path), vqvae, prior, dev, cfg.batch_size, False,
                                         ckpt["config"]["cache_dir"])
    raw, labels, clean_idx, bad_idx, ends, rng = artefacts.halves(cfg.data_dir, cfg.split, cfg.seed)

    def scores_of(images, lab=None, maps_too=False):
        """The scores of raw slices (with label_fit where labels are given), and their maps and normalised slices."""
        x = artefacts.normalised(images)
        s, maps, _ = qc.slice_scores(x, vqvae, prior, dev, cfg.batch_size, False,
                                     None if lab is None else artefacts.resized(lab), label_model)
        return (s, maps, x) if maps_too else s

    clean = scores_of([raw[i] for i in clean_idx])
    results = dict(n_clean=len(clean_idx), n_corrupted=len(bad_idx), n_ends=len(ends), kinds={}, labels={}, maps={})
    every = {f"clean {k}": v for k, v in clean.items()}  # each slice's scores, to compare combinations afterwards
    if ends:  # the scan's own ends against the clean slices, as a kind of their own
        written = scores_of([raw[i] for i in ends])
        every.update({f"end_of_scan written {k}": v for k, v in written.items()})
        results["kinds"]["end_of_scan written"] = kind_row(clean, written, ref)
    for kind in artefacts.KINDS:
        for severity in artefacts.SEVERITIES:
            made = [artefacts.corrupt(kind, raw[i], np.random.default_rng([cfg.seed, int(i)]), severity)
                    for i in bad_idx]
            bad, maps, x = scores_of([a for a, _ in made], maps_too=True)
            every.update({f"{kind} {severity} {k}": v for k, v in bad.items()})
            results["kinds"][f"{kind} {severity}"] = kind_row(clean, bad, ref)
            if kind == "blob":
                results["maps"][severity] = blob_maps(artefacts.resized([b for _, b in made]), maps, x, vqvae, prior,
                                                      dev, cfg)
            print(kind, severity, {k: round(v["auroc"], 3) for k, v in results["kinds"][f"{kind} {severity}"].items()},
                  flush=True)
    results["labels"] = label_results(raw, labels, clean_idx, scores_of, ref, rng)
    calibration_rows(results, clean, written if ends else None, ref)
    results["seconds"] = time.time() - t0
    write_text(os.path.join(out, "benchmark.json"), json.dumps(results, indent=1))
    every.update({f"validation {k}": v for k, v in ref.items()})
    write_file(os.path.join(out, "scores.npz"), lambda f: np.savez_compressed(f, **every))
    report(results)


def kind_row(clean, bad, ref):
    """{member set: AUROC and AP} of clean against corrupted slices' scores."""
    y = np.r_[np.zeros(len(next(iter(clean.values())))), np.ones(len(next(iter(bad.values()))))]
    z = {name: np.r_[set_z(clean, ref, names), set_z(bad, ref, names)]
         for name, names in SETS.items() if all(k in clean for k in (names or ()))}
    return {name: dict(auroc=auroc(y, v), ap=average_precision(y, v)) for name, v in z.items()}


def calibration_rows(results, clean, ends, ref):
    """Into results: "flagged", {group: {fpr: the share of its slices that qc.py flags at that rate}} for the clean
    slices and the ends of scans (None: none), and "clean_median_z", {family: the median of its z over the clean
    slices}: near 0 where they are like the validation slices, higher where the phantom's population differs from
    the one the models were trained on."""
    groups = dict(clean=clean, **({} if ends is None else {"end of scan": ends}))
    results["flagged"] = {name: {fpr: float(np.mean(qc.percentile_and_flag(set_z(s, ref, None), ref, fpr, list(s))[1]))
                                 for fpr in (0.01, 0.05)} for name, s in groups.items()}
    results["clean_median_z"] = {family: float(np.median(z)) for family, z in qc.family_z(clean, ref).items()}


def rescored(out):
    """The tables again from <out>/scores.npz, as qc.py's combination now makes them (no model is run; the maps'
    and labels' rows are kept)."""
    saved = np.load(os.path.join(out, "scores.npz"))
    group = {}
    for key in saved.files:
        head, score = key.rsplit(" ", 1)
        group.setdefault(head, {})[score] = saved[key]
    results = json.load(open(os.path.join(out, "benchmark.json")))
    clean, ref = group.pop("clean"), group.pop("validation")
    results["kinds"] = {head: kind_row(clean, bad, ref) for head, bad in group.items()}
    calibration_rows(results, clean, group.get("end_of_scan written"), ref)
    write_text(os.path.join(out, "benchmark.json"), json.dumps(results, indent=1))
    return results


def blob_maps(truth, maps, x, vqvae, prior, dev, cfg):
    """Pixel-level average precision on the blob slices of each map: the reconstruction error, and with a prior each
    code's bits spread over its pixels (qc.py's map, `maps`) and, with heal_bits, the error against the healed
    slice."""
    if prior is None:
        return dict(reconstruction=average_precision(truth, maps))
    _, error_map, _ = qc.slice_scores(x, vqvae, None, dev, cfg.batch_size)
    out = {"reconstruction": average_precision(truth, error_map), "prior bits": average_precision(truth, maps)}
    if cfg.heal_bits:
        _, healed_map, _ = qc.slice_scores(x, vqvae, prior, dev, cfg.batch_size, heal_bits=cfg.heal_bits)
        out[f"healed ({cfg.heal_bits:g} bits)"] = average_precision(truth, healed_map)
    return out


def label_results(raw, labels, clean_idx, scores_of, ref, rng):
    """AUROC and AP of label_fit: the clean slices with their own labels against the same slices with labels that do
    not fit, one fault at a time."""
    if "label_fit" not in ref:
        return {}
    images = [raw[i] for i in clean_idx]
    own = [labels[i] for i in clean_idx]
    clean = scores_of(images, own)
    faults = {LABEL_FAULTS[0]: [own[(k + len(own) // 2) % len(own)] for k in range(len(own))],
              LABEL_FAULTS[1]: [m[::-1] for m in own],
              LABEL_FAULTS[2]: [organ_where_none(m, rng) for m in own]}
    y = np.r_[np.zeros(len(own)), np.ones(len(own))]
    out = {}
    for name, wrong in faults.items():
        s = scores_of(images, wrong)
        z = np.r_[clean["label_fit"], s["label_fit"]]
        out[name] = dict(auroc=auroc(y, z), ap=average_precision(y, z))
    return out


def report(r):
    sets = list(next(iter(r["kinds"].values())))
    flagged = ", ".join(f"{name} {share:.3f} at fpr {fpr}" for name, shares in r["flagged"].items()
                        for fpr, share in shares.items())
    print(f"\n{r['n_clean']} clean and {r['n_corrupted']} corrupted slices per row, {r['n_ends']} ends of scans; "
          f"AUROC / AP; {r['seconds']:.0f} s; flagged: {flagged}; the clean slices' median z: "
          + ", ".join(f"{family} {z:.2f}" for family, z in r["clean_median_z"].items()) + "\n")
    print("| kind | severity | " + " | ".join(sets) + " |\n|" + " --- |" * (2 + len(sets)))
    for key, row in r["kinds"].items():
        kind, severity = key.rsplit(" ", 1)
        print(f"| {kind} | {severity} | " + " | ".join(f"{row[s]['auroc']:.3f} / {row[s]['ap']:.3f}" for s in sets)
              + " |")
    for severity, maps in r["maps"].items():
        print(f"\nblob {severity}, pixel-level AP: " + ", ".join(f"{k} {v:.3f}" for k, v in maps.items()))
    for name, v in r["labels"].items():
        print(f"labels: {name}: AUROC {v['auroc']:.3f}, AP {v['ap']:.3f}")


if __name__ == "__main__":
    run_script(main)
