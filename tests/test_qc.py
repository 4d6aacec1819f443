"""Quality control: the detection measures against brute force, the image statistics, the calibration's false-positive
rate, the scores' order on planted faults with a tiny model, and qc.py end to end with its one-line refusals."""
import csv
import json
import os
import shutil
import sys

import nibabel as nib
import numpy as np
import pytest

import artefacts
import metrics
import qc
from conftest import run, write_slice
from test_misuse import one_error_line
from utils import call_main


# ---- measures --------------------------------------------------------------------------------------------------

def brute_auroc(y, s):
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def brute_ap(y, s):
    total = 0.0
    for t in np.unique(s):  # every distinct score is a threshold; recall rises only where positives enter
        above = s >= t
        precision, recall = (y[above] == 1).mean(), (y[above] == 1).sum() / (y == 1).sum()
        below = s > t
        recall_before = (y[below] == 1).sum() / (y == 1).sum()
        total += (recall - recall_before) * precision
    return total


def test_auroc_and_average_precision_against_brute_force_and_known_values():
    assert metrics.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # scikit-learn's examples
    assert metrics.average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8333333)
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 60)
        y[:2] = [0, 1]
        s = np.round(rng.normal(size=60) + y * rng.uniform(0, 2), 1)  # rounding makes ties
        assert metrics.auroc(y, s) == pytest.approx(brute_auroc(y, s))
        assert metrics.average_precision(y, s) == pytest.approx(brute_ap(y, s))
    assert metrics.auroc([0, 1], [1.0, 1.0]) == 0.5 and metrics.auroc([0, 1], [0.0, 1.0]) == 1.0


def test_image_statistics_see_noise_and_an_empty_slice():
    from phantom import phantom_slice
    img = phantom_slice(17, 0, 4, 8)
    clean = metrics.image_statistics((img - img.min()) / np.ptp(img))
    noisy_img = artefacts.noise(img, np.random.default_rng(0), "moderate")
    noisy = metrics.image_statistics((noisy_img - noisy_img.min()) / np.ptp(noisy_img))
    assert 0.4 < clean["foreground"] < 0.9 and noisy["snr"] < clean["snr"] and noisy["background"] > clean["background"]
    empty = artefacts.noise_only(img, np.random.default_rng(0), "moderate")
    e = metrics.image_statistics((empty - empty.min()) / np.ptp(empty))
    assert e["snr"] < clean["snr"] and e["foreground"] < 0.2 * clean["foreground"] and e["efc"] > clean["efc"]
    assert 0 <= e["efc"] <= 1 and 0 <= clean["efc"] <= 1


# ---- calibration ---------------------------------------------------------------------------------------------

def test_flagged_rate_on_new_clean_slices_is_within_its_nominal_rate():
    rng = np.random.default_rng(1)

    def clean(n):  # three scores of normal slices, each with its own scale and skew
        return dict(recon_mse=rng.lognormal(-5, 0.4, n), prior_bits=rng.normal(4, 0.2, n), snr=rng.gamma(5, 2, n))
    validation = clean(2000)
    for fpr in (0.01, 0.05):
        fresh = clean(20000)
        _, flagged = qc.percentile_and_flag(qc.combined(fresh, validation), validation, fpr, list(fresh))
        # the threshold is set on 2000 slices: its own error is about sqrt(fpr / 2000)
        assert abs(flagged.mean() - fpr) < 3 * np.sqrt(fpr / 2000) + 3 * np.sqrt(fpr / 20000), (fpr, flagged.mean())
    score, _ = qc.percentile_and_flag(np.array([-1e9, 1e9]), validation, 0.01, ["snr"])
    assert score.tolist() == [0.0, 100.0]
    # a validation split holding 5% gross outliers (ends of scans): the threshold is still that of its clean slices
    dirty = {k: np.r_[v, np.full(100, 50 * v.max())] for k, v in validation.items()}
    fresh = clean(20000)
    _, flagged = qc.percentile_and_flag(qc.combined(fresh, dirty), dirty, 0.01, list(fresh))
    assert abs(flagged.mean() - 0.01) < 3 * np.sqrt(0.01 / 2000) + 3 * np.sqrt(0.01 / 20000), flagged.mean()
    _, flagged = qc.percentile_and_flag(qc.combined(dirty, dirty), dirty, 0.01, list(fresh))
    assert flagged[-100:].all()


def test_a_score_counts_in_its_direction_and_each_family_once():
    normal = np.random.default_rng(0).normal(size=(3, 4001))
    validation = dict(prior_bits=normal[0], recon_mse=normal[1], snr=normal[2])
    z = qc.combined(dict(prior_bits=np.array([-6.0, 0.0, 0.0, 6.0]), recon_mse=np.array([0.0, -6.0, 0.0, 0.0]),
                         snr=np.array([0.0, 0.0, -6.0, 0.0])), validation)
    assert z[0] < 2 and min(z[1:]) > 4  # few bits are not unusual; an error or SNR far below normal is
    assert qc.robust_z(np.array([3.0]), normal[0]) == pytest.approx(3.0, abs=0.15)  # standard deviations, here
    # a share that is 0 on most slices: the spread falls back on the mean absolute deviation, not on a near-0 floor
    mostly_zero = np.r_[np.zeros(60), np.abs(np.random.default_rng(2).normal(size=20))]
    assert qc.robust_z(np.array([0.0, 4 * np.mean(mostly_zero)]), mostly_zero) == pytest.approx([0.0, 3.19], abs=0.01)
    # a family's largest z is read against the same over the validation slices: seven statistics are not seven chances
    many = {k: np.random.default_rng(1 + i).normal(size=4001) for i, k in enumerate(qc.STATISTICS)}
    one = qc.combined({k: v[:1000] for k, v in many.items()}, many)
    assert abs(np.median(one)) < 0.2


def test_the_figure_shows_each_causes_most_unusual_slices_in_turn():
    z = np.array([5.0, 9.0, 1.0, 8.0, 7.0, 2.0, 6.0])
    cause = np.array(["saturation", "saturation", "recon_ssim", "saturation", "prior_bits", "recon_ssim", "saturation"])
    # the top four by z are three clipped slices and one prior's: the reconstruction's most unusual is shown too
    assert qc.shown(z, cause, 4) == [1, 4, 5, 3]
    assert sorted(qc.shown(z, cause, 10)) == list(range(7)) and qc.shown(z, cause, 0) == []
    validation = dict(snr=np.random.default_rng(0).normal(size=500), saturation=np.random.default_rng(1).random(500))
    slices = dict(snr=np.array([-8.0, 0.0]), saturation=np.array([0.5, 30.0]))
    assert qc.causes(slices, validation, np.array(["statistics"] * 2)).tolist() == ["snr", "saturation"]


# ---- the scores on planted faults, with a tiny model --------------------------------------------------------

def mini_slices(n, rng):
    """Small slices (n, 64, 32) that a tiny model learns in seconds: a body ellipse holding two brighter organs,
    with a little noise."""
    yy, xx = np.mgrid[:64, :32]
    out = []
    for _ in range(n):
        a, b = rng.uniform(22, 28), rng.uniform(10, 13)
        img = 0.5 * (((yy - 32) / a) ** 2 + ((xx - 16) / b) ** 2 < 1)
        for cy in (24, 40):
            r = rng.uniform(4, 6)
            img = np.where((yy - cy + rng.uniform(-2, 2)) ** 2 + (xx - 16) ** 2 < r * r, 0.9, img)
        out.append(np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1))
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    """A tiny VQ-VAE and prior trained on mini_slices: 150 steps each."""
    import torch

    import stages
    from metrics import reconstruct
    from prior import CodePrior
    from vqvae import VQVAE
    x = torch.from_numpy(mini_slices(64, np.random.default_rng(0)))[:, None]
    torch.manual_seed(0)
    vqvae = VQVAE(n_hiddens=16, n_residual_hiddens=8, n_residual_layers=1, embedding_dim=8, n_embeddings=32)
    prior = CodePrior(32, (16, 8), 2, 32, 2, 2)
    opt = torch.optim.Adam(vqvae.parameters(), lr=3e-3)
    for _ in range(150):
        loss, _ = stages.vqvae_loss(vqvae, x[torch.randint(0, len(x), (16,))], 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    codes = torch.from_numpy(reconstruct(vqvae.eval(), x[:, 0].numpy(), "cpu")[1])
    opt = torch.optim.Adam(prior.parameters(), lr=3e-3)
    for _ in range(150):
        loss = prior(codes[torch.randint(0, len(codes), (16,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vqvae, prior.eval()


def test_scores_are_ordered_as_they_should_be_on_planted_faults(tiny):
    vqvae, prior = tiny
    clean = mini_slices(16, np.random.default_rng(1))
    blob = clean.copy()
    blob[:, 30:36, 13:19] = 0  # a dark lesion between the organs
    white = np.random.default_rng(2).random(clean.shape).astype(np.float32)
    empty = np.clip(np.random.default_rng(3).normal(0.05, 0.02, clean.shape), 0, 1).astype(np.float32)
    s_clean, maps, _ = qc.slice_scores(clean, vqvae, prior, "cpu")
    for fault, raised in ((blob, ("recon_local", "prior_local")),  # local: the whole-slice SSIM barely moves
                          (white, ("recon_mse", "recon_ssim", "prior_bits")),
                          (empty, ("background", "efc", "prior_bits"))):  # no body: only background
        s, _, _ = qc.slice_scores(fault, vqvae, prior, "cpu")
        for name in raised:  # each faulty slice above its clean twin
            assert (s[name] > s_clean[name]).all(), name
    assert set(s_clean) == {*qc.STATISTICS, "recon_ssim", "recon_mse", "recon_local", "prior_bits", "prior_local"}
    assert maps.shape == clean.shape and (maps >= 0).all()
    mask = np.zeros(blob.shape, bool)
    mask[:, 30:36, 13:19] = True
    for with_prior, heal_bits in ((None, None), (prior, None), (prior, 3.0)):  # error, bits and healed maps
        _, blob_maps, _ = qc.slice_scores(blob, vqvae, with_prior, "cpu", heal_bits=heal_bits)
        assert metrics.average_precision(mask, blob_maps) > 3 * mask.mean(), heal_bits  # far above chance


def test_the_label_model_sees_labels_that_do_not_fit(trained):
    import dataset
    p = dataset.prepare(dataset.find_splits(trained.root)["train"])
    model = qc.fit_label_model(p["x"], p["masks"])
    fits = qc.label_fit(p["x"], p["masks"], model)
    shuffled = qc.label_fit(p["x"], np.roll(p["masks"], 5, axis=0), model)  # another slice's labels
    flipped = qc.label_fit(p["x"], p["masks"][:, :, ::-1], model)          # anterior and posterior swapped
    assert np.median(shuffled) > np.median(fits) and (flipped > fits).mean() > 0.8


# ---- qc.py end to end --------------------------------------------------------------------------------------------

def test_qc_on_a_split_and_on_a_volume(trained, tmp_path):
    out = tmp_path / "qc"
    r = run("qc.py", f"--checkpoint={trained.out / 'best_model.pt'}",
            f"--prior_checkpoint={trained.prior / 'best_prior.pt'}", "--split=validate", f"--out_dir={out}",
            "--n_show=3", cwd=trained.tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "qc.csv")))
    assert len(rows) == 8 and {"recon_mse", "prior_bits", "snr", "label_fit", "z", "score", "flagged"} <= set(rows[0])
    # the calibration's own slices: only its gross outliers are above the threshold
    z = np.array([float(r["z"]) for r in rows])
    q1, q3 = np.quantile(z, [0.25, 0.75])
    assert [int(r["flagged"]) for r in rows] == (z > q3 + qc.GROSS * (q3 - q1)).astype(int).tolist()
    for r in rows:  # z is the largest family z, family names it, and cause is one of its scores
        assert float(r["z"]) == max(float(r[f"z_{f}"]) for f in qc.GROUPS) == float(r[f"z_{r['family']}"])
        assert r["cause"] in qc.GROUPS[r["family"]]
    assert (out / "qc.png").exists() and (out / "calibration.json").exists()
    from phantom import phantom_slice
    vol = np.stack([phantom_slice(40, 0, k, 8) for k in (3, 4, 5)], -1)  # a 3D volume, slice by slice
    affine = np.diag([0.5, 0.5, 2.0, 1.0])
    write_slice(tmp_path / "vol.nii.gz", vol.astype(np.float32), affine)
    r = run("qc.py", f"--checkpoint={trained.out / 'best_model.pt'}", f"--input={tmp_path / 'vol.nii.gz'}",
            f"--out_dir={tmp_path / 'v'}", "--save_nifti", cwd=trained.tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "v" / "qc.csv")))
    assert [r["slice"] for r in rows] == [str(k) for k in range(vol.shape[2])] and "prior_bits" not in rows[0]
    saved = nib.load(tmp_path / "v" / "nifti" / "vol.nii.gz")
    assert saved.shape == vol.shape and np.allclose(saved.affine, affine) and saved.get_fdata().max() > 0


def test_qc_refuses_bad_input_in_one_line(trained, tmp_path):
    ckpt = f"--checkpoint={trained.out / 'best_model.pt'}"
    one_error_line(run("qc.py", ckpt, f"--input={tmp_path / 'missing'}", cwd=trained.tmp),
                   "missing: file or folder not found")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.nii.gz").write_bytes(b"not a nifti file")
    one_error_line(run("qc.py", ckpt, f"--input={tmp_path / 'bad'}", cwd=trained.tmp), "x.nii.gz",
                   "not a readable NIfTI")
    one_error_line(run("qc.py", ckpt, "--fpr=1.5", cwd=trained.tmp), "--fpr=1.5 must be")
    other = tmp_path / "other"
    shutil.copytree(trained.out, other)
    one_error_line(run("qc.py", f"--checkpoint={other / 'best_model.pt'}",
                       f"--prior_checkpoint={trained.prior / 'best_prior.pt'}", cwd=trained.tmp), "a prior of")
    good = tmp_path / "bad" / "y.nii.gz"
    write_slice(good, np.random.default_rng(0).random((256, 128)).astype(np.float32))
    r = run("qc.py", ckpt, f"--input={tmp_path / 'bad'}", "--skip_bad=True", f"--out_dir={tmp_path / 'o'}",
            cwd=trained.tmp)
    assert r.returncode == 0 and "1 skipped" in r.stdout, r.stderr[-2000:]
    assert [row["file"] for row in csv.DictReader(open(tmp_path / "o" / "qc.csv"))] == ["y.nii.gz"]


def test_the_benchmark_runs_and_rescores_to_the_same_tables(trained, tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(qc.__file__), "experiments"))
    import qc_benchmark
    out = tmp_path / "bench"
    args = [f"--checkpoint={trained.out / 'best_model.pt'}", f"--prior_checkpoint={trained.prior / 'best_prior.pt'}",
            f"--data_dir={trained.root}", f"--out_dir={out}"]
    assert call_main(qc_benchmark.main, args) == 0
    first = json.load(open(out / "benchmark.json"))
    assert len(first["kinds"]) == 2 * len(artefacts.KINDS) and set(first["labels"]) == set(qc_benchmark.LABEL_FAULTS)
    assert call_main(qc_benchmark.main, args + ["--rescore=True"]) == 0
    assert json.load(open(out / "benchmark.json"))["kinds"] == first["kinds"]


def test_the_blob_score_comparison_runs(trained, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(qc.__file__), "experiments"))
    import qc_blob_scores
    args = [f"--checkpoint={trained.out / 'best_model.pt'}", f"--prior_checkpoint={trained.prior / 'best_prior.pt'}",
            f"--data_dir={trained.root}"]
    assert call_main(qc_blob_scores.main, args) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["bits_mean", "bits_largest", "bits_top8", "bits_2x2", "bits_3x3",
                                                     "healed_5px", "healed_9px", "healed_15px", "bits_less_median_3x3"]
