"""Per-organ scores from segmentation labels: the definition against scikit-image, and the pairing of labels."""
import os

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.transform import resize

import dataset
from conftest import make_study, write_slice
from figures import figure_slices
from metrics import MIN_REGION_PIXELS, score, score_split, split_means
from utils import DataError, read_nifti


def slice_pair(seed=0):
    """A ground truth in scanner units, a degraded reconstruction, and labels with a prostate, a bladder and a
    rectum too small to count."""
    rng = np.random.default_rng(seed)
    gt = 100 + 400 * rng.random((64, 48))
    rec = gt + rng.normal(0, 40, gt.shape)
    rec[20:40, 10:30] = gt[20:40, 10:30] + rng.normal(0, 5, (20, 20))  # the prostate is reconstructed well
    labels = np.zeros(gt.shape, np.uint8)
    labels[2:60, 2:46] = 1
    labels[20:40, 10:30] = 5
    labels[45:58, 5:40] = 3
    labels[50:54, 42:46] = 4  # 16 pixels
    return gt, rec, labels


def test_region_ssim_and_psnr_match_scikit_image():
    gt, rec, labels = slice_pair()
    s = score(gt, rec, labels)
    g = (gt - gt.min()) / (gt.max() - gt.min())
    r = np.clip((rec - gt.min()) / (gt.max() - gt.min()), 0, 1)
    whole, ssim_map = structural_similarity(g, r, data_range=1.0, full=True)
    assert s["ssim"] == pytest.approx(whole, abs=1e-12)
    inner = (slice(3, -3), slice(3, -3))  # the 7x7 window's half-width, left out as the whole-image SSIM does
    for value, name in ((5, "prostate"), (3, "bladder"), (1, "body")):
        m = labels[inner] == value
        assert s[f"{name}_ssim"] == pytest.approx(ssim_map[inner][m].mean(), abs=1e-12)
        assert s[f"{name}_psnr"] == pytest.approx(peak_signal_noise_ratio(g[inner][m], r[inner][m], data_range=1.0))
    assert "rectum_ssim" not in s and "bone_ssim" not in s  # fewer than MIN_REGION_PIXELS pixels, or none
    assert s["prostate_ssim"] > s["bladder_ssim"] + 0.03  # the well reconstructed region scores higher


def test_split_means_count_only_slices_holding_the_region():
    pairs = [slice_pair(i) for i in range(3)]
    pairs[1][2][pairs[1][2] == 5] = 1  # no prostate in the second slice
    x = np.stack([(g - g.min()) / (g.max() - g.min()) for g, _, _ in pairs])
    rec = np.stack([(r - g.min()) / (g.max() - g.min()) for g, r, _ in pairs])
    lo, hi = np.array([g.min() for g, _, _ in pairs]), np.array([g.max() for g, _, _ in pairs])
    scores = score_split(x, rec, lo, hi, np.stack([m for _, _, m in pairs]))
    assert np.isnan(scores["prostate_ssim"][1]) and not np.isnan(scores["prostate_ssim"][[0, 2]]).any()
    means = split_means(scores)
    assert means["regions"]["prostate"]["n_slices"] == 2 and means["regions"]["rectum"]["n_slices"] == 0
    assert means["regions"]["prostate"]["ssim"] == pytest.approx(np.mean(scores["prostate_ssim"][[0, 2]]))
    assert "regions" not in split_means(score_split(x, rec, lo, hi))


def test_labels_are_paired_by_name_and_resized_nearest(tmp_path):
    root = make_study(tmp_path / "d", seg=True)
    files = dataset.find_splits(root)["train"]
    p = dataset.prepare(files)
    assert p["masks"].shape == (12, 256, 128) and p["masks"].dtype == np.uint8
    for f, m in zip(files, p["masks"]):
        name = os.path.basename(f).replace("case_", "seg_")
        raw = read_nifti(os.path.join(root, "keras_slices_seg_train", name))
        assert np.array_equal(m, resize(raw, (256, 128), order=0, anti_aliasing=False, preserve_range=True))
    assert {5, 3} <= set(np.unique(p["masks"])) <= {0, 1, 2, 3, 4, 5}
    holding = [i for i, m in enumerate(p["masks"]) if (m == 5).sum() >= MIN_REGION_PIXELS]
    assert len(holding) >= 2 and set(figure_slices(p, n=2)) <= set(holding)  # figures show the prostate
    assert dataset.prepare(dataset.find_splits(make_study(tmp_path / "plain"))["train"])["masks"] is None


def test_missing_mismatched_or_invalid_labels_are_one_line_errors(tmp_path):
    root = make_study(tmp_path / "d", seg=True)
    seg = os.path.join(root, "keras_slices_seg_test")
    image = os.path.join(root, "keras_slices_test", "case_040_week_0_slice_0.nii.gz")
    os.remove(os.path.join(seg, "seg_040_week_0_slice_0.nii.gz"))
    with pytest.raises(DataError) as e:
        dataset.prepare(dataset.find_splits(root)["test"])
    assert str(e.value) == f"{image}: no label file seg_040_week_0_slice_0.nii[.gz] in {seg}"
    label = os.path.join(seg, "seg_040_week_0_slice_0.nii.gz")
    for data, says in ((np.zeros((256, 120), np.uint8), "do not match"), (np.full((256, 128), 9, np.uint8),
                                                                          "are not labels 0-5")):
        write_slice(label, data)
        with pytest.raises(DataError) as e:
            dataset.prepare(dataset.find_splits(root)["test"])
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(label) and says in msg
        assert image in msg or says != "do not match"  # a shape mismatch names both files
