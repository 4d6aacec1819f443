"""The simulated artefacts of artefacts.py: the contract every kind keeps (float32, finite, non-negative, shape,
input untouched, deterministic) and the physics that makes each look like what it is called."""
import math
import os
import sys

import numpy as np
import pytest
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.metrics import structural_similarity

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import phantom  # noqa: E402
from artefacts import KINDS, SEVERITIES, background_sigma, body_mask, corrupt  # noqa: E402

SLICES = {(case, k): phantom.phantom_slice(case, 0, k, 8) for case in (4, 17) for k in (3, 4)}
TWO = [SLICES[4, 3], SLICES[17, 4]]
RANDOM = {"ghosting", "spike", "bias_field", "noise", "noise_only", "other_anatomy", "blob"}
WITH_DEGREE = ("ghosting", "spike", "bias_field", "wrap_around", "blur", "noise", "clipping", "blob")


def run(kind, img, seed=0, severity="mild"):
    return corrupt(kind, img, np.random.default_rng(seed), severity)


def unit(x):
    return (x - x.min()) / max(x.max() - x.min(), 1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_keeps_the_contract(kind):
    for img in TWO + [phantom.phantom_slice(9, 1, 2, 8, width=144)]:
        before = img.copy()
        for severity in SEVERITIES:
            out, mask = run(kind, img, 0, severity)
            assert out.dtype == np.float32 and np.isfinite(out).all() and out.min() >= 0
            assert out.shape == (img.shape[::-1] if kind == "rotate_90" else img.shape)
            assert (mask is not None) == (kind == "blob")
            assert np.array_equal(img, before)                          # the input is never changed
            again, _ = run(kind, img, 0, severity)
            assert np.array_equal(out, again)                           # deterministic in the seed
        first = run(kind, img, 0)[0]
        differs = any(not np.array_equal(run(kind, img, seed)[0], first) for seed in range(1, 5))
        assert differs == (kind in RANDOM)
    with pytest.raises(ValueError, match="severity"):
        run(kind, TWO[0], 0, "severe")


def test_moderate_departs_further_than_mild():
    for kind in WITH_DEGREE:
        distance = {s: np.mean([np.abs(run(kind, img, seed, s)[0] - img).mean() / np.percentile(img, 99)
                                for img in TWO for seed in range(3)]) for s in SEVERITIES}
        assert distance["moderate"] > 1.2 * distance["mild"] > 0, (kind, distance)


def test_ghosting_puts_copies_at_fov_over_n():
    # a bright block in an empty field 240 rows long (divisible by 2, 3 and 4, so that every ghost shift is whole
    # rows): ghosts land on rows shifted by multiples of 240 / n, for one n in 2..4
    block = np.zeros((240, 128))
    block[112:128, 32:96] = 800.0
    for seed in range(6):
        for severity in SEVERITIES:
            out = run("ghosting", block, seed, severity)[0][:, 32:96].mean(1)
            found, rows = [], np.arange(112, 128)
            for n in (2, 3, 4):
                ghosts = [out[(rows + m * 240 // n) % 240].mean() for m in range(1, n)]
                between = [out[(rows + (2 * m + 1) * 120 // n) % 240].mean() for m in range(n)]
                found.append(min(ghosts) > max(3 * max(between), 30))
            assert sum(found) == 1, (seed, severity, found)
    for img in TWO:                                   # on the pelvis, the background brightens
        outside = ~body_mask(img)
        for seed in range(4):
            assert run("ghosting", img, seed)[0][outside].mean() > 1.15 * img[outside].mean()


def test_spike_adds_one_stripe_frequency():
    for img in TWO:
        for severity in SEVERITIES:
            change = np.abs(np.fft.fft2(run("spike", img, 3, severity)[0] - img))
            change[0, 0] = 0
            peak = np.unravel_index(change.argmax(), change.shape)
            assert all(0.04 * n <= min(p, n - p) <= 0.26 * n for p, n in zip(peak, img.shape)), peak


def test_blur_removes_high_frequencies():
    fy, fx = np.meshgrid(np.fft.fftfreq(128), np.fft.fftfreq(256))
    high = np.hypot(fx, fy) > 0.2
    for img in TWO:
        energy = [(np.abs(np.fft.fft2(x)) ** 2)[high].sum()
                  for x in (img, run("blur", img, 0, "mild")[0], run("blur", img, 0, "moderate")[0])]
        assert energy[0] > 5 * energy[1] > 5 * energy[2]


def test_noise_raises_the_background_spread():
    for img in TWO:
        outside = ~body_mask(img)
        spread = [x[outside].std() for x in (img, run("noise", img, 1, "mild")[0], run("noise", img, 1, "moderate")[0])]
        assert spread[0] < spread[1] < spread[2] and spread[1] > 1.3 * spread[0]


def test_clipping_caps_at_the_foreground_percentile():
    for img in TWO:
        for severity, q in zip(SEVERITIES, (98, 90)):
            out = run("clipping", img, 0, severity)[0]
            cap = np.percentile(img[img > img.mean()], q)
            assert out.max() == pytest.approx(cap, rel=1e-6)
            below = img < cap
            assert np.allclose(out[below], img[below], rtol=1e-6)
            assert np.mean(out[img > img.mean()] >= np.float32(cap) * (1 - 1e-6)) == pytest.approx(1 - q / 100,
                                                                                                  abs=0.01)


def test_bias_field_is_smooth_multiplicative_and_one_at_the_centre():
    x, y = np.meshgrid(np.linspace(-1, 1, 256), np.linspace(-1, 1, 128), indexing="ij")
    terms = np.stack([x ** i * y ** j for i in range(4) for j in range(4 - i) if i + j], -1)
    for img in TWO:
        for severity in SEVERITIES:
            out = run("bias_field", img, 2, severity)[0]
            seen = img > 5
            log_field = np.log(out[seen] / img[seen])
            coef = np.linalg.lstsq(terms[seen], log_field, rcond=None)[0]   # degree 3, no constant term
            assert np.abs(terms[seen] @ coef - log_field).max() < 1e-4
            assert 0.1 < np.abs(log_field).max() < 6 * (0.3 if severity == "mild" else 0.6)
            log_ratio = np.where(seen, np.log(np.maximum(out, 1e-30) / np.maximum(img, 1e-30)), np.nan)
            for axis in (0, 1):
                assert np.nanmax(np.abs(np.diff(log_ratio, 2, axis=axis))) < 1e-3
            centre = (slice(127, 129), slice(63, 65))                   # where the field is 1
            assert np.allclose(out[centre], img[centre], rtol=0.01)


def test_wrap_around_folds_the_body_onto_the_ends():
    for img in TWO:
        ends = np.r_[0:8, 248:256]
        before = img[ends].mean()
        after = [run("wrap_around", img, 0, s)[0][ends].mean() for s in SEVERITIES]
        assert before < 0.1 * np.percentile(img, 99)                    # background at the ends before
        assert 2 * before < after[0] < after[1]


def test_flips_and_rotation_are_exact():
    for img in TWO:
        f32 = img.astype(np.float32)
        for kind in ("flip_lr", "flip_ud"):
            once = run(kind, img)[0]
            assert not np.array_equal(once, f32) and np.array_equal(run(kind, once)[0], f32)
        assert np.array_equal(run("flip_lr", img)[0][0], f32[-1])       # axis 0, left-right
        assert np.array_equal(run("flip_ud", img)[0][:, 0], f32[:, -1])  # axis 1, anterior-posterior
        turned = run("rotate_90", img)[0]
        assert turned.shape == (128, 256) and np.array_equal(turned, np.rot90(f32))
        for _ in range(3):
            turned = run("rotate_90", turned)[0]
        assert np.array_equal(turned, f32)


def test_noise_only_is_background_at_the_input_level():
    for img in SLICES.values():
        out = run("noise_only", img, 4)[0]
        corners = np.mean([img[i, j].mean() for i in (slice(0, 12), slice(-12, None))
                           for j in (slice(0, 12), slice(-12, None))])
        assert out.mean() < 0.05 * np.percentile(img, 99)
        assert out.mean() == pytest.approx(corners, rel=0.15)           # the same Rician level as the background
        assert out[img > threshold_otsu(img)].mean() < 2 * corners      # no trace of the body
    assert np.array_equal(run("noise_only", np.zeros((256, 128)))[0], np.zeros((256, 128)))
    pure_noise = np.hypot(*np.random.default_rng(0).normal(0, 20, (2, 256, 128)))   # no background to set apart
    assert background_sigma(pure_noise) == pytest.approx(20, rel=0.1)


def test_other_anatomy_is_a_body_but_not_a_pelvis():
    # SSIM of raw slices is mostly noise (two pelvises score ~0.25 too): with the noise smoothed away, two
    # different pelvises are more alike than any pelvis and another body part
    def smooth(x):
        return unit(ndimage.gaussian_filter(np.asarray(x, np.float64), 2))
    pelvises = [smooth(img) for img in SLICES.values()]
    least_alike = min(structural_similarity(a, b, data_range=1) for i, a in enumerate(pelvises) for b in pelvises[:i])
    for kind in phantom.OTHER_ANATOMIES:
        other = phantom.other_anatomy(kind, seed=1)
        assert other.dtype == np.float32 and other.shape == (256, 128)
        assert np.array_equal(other, phantom.other_anatomy(kind, seed=1))
        assert phantom.other_anatomy(kind, width=144).shape == (256, 144)
        for img, pelvis in zip(SLICES.values(), pelvises):
            assert structural_similarity(unit(other), unit(img), data_range=1) < 0.5
            assert structural_similarity(smooth(other), pelvis, data_range=1) < min(0.5, least_alike - 0.05)
        body = body_mask(other)
        bright = other > 0.2 * np.percentile(other, 99)
        assert 0.03 < body.mean() < 0.8 and bright[body].sum() > 0.95 * bright.sum()
        assert other[body].mean() > 5 * other[~body].mean()
    for img in TWO:
        outs = [run("other_anatomy", img, seed)[0] for seed in range(4)]
        for out in outs:
            assert np.percentile(out, 99) == pytest.approx(np.percentile(img, 99), rel=1e-3)


def test_blob_changes_only_its_mask_inside_the_body():
    for img in TWO:
        body = body_mask(img)
        for severity, (r_lo, r_hi) in zip(SEVERITIES, ((3, 5), (6, 10))):
            for seed in range(4):
                out, mask = run("blob", img, seed, severity)
                assert mask.dtype == bool and mask.any() and not (mask & ~body).any()
                assert 0.5 * math.pi * r_lo ** 2 < mask.sum() < 1.5 * math.pi * r_hi ** 2
                near = ndimage.binary_dilation(mask, iterations=3)
                assert np.array_equal(out[~near], img.astype(np.float32)[~near])
                change = (out - img)[mask]
                assert (change > 0).all() or (change < 0).all()          # one blob, bright or dark


def test_the_cli_writes_a_corrupted_copy_and_says_which_kind_each_file_holds(study, tmp_path):
    import csv
    from conftest import run as run_script
    from utils import read_nifti
    src = os.path.join(study, "keras_slices_train")  # 12 slices of every stored kind: f32, int16, 144 wide, (H, W, 1)
    out = tmp_path / "corrupted"
    r = run_script("artefacts.py", f"--input={src}", f"--out_dir={out}", "--share=0.5", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out / "corrupted.csv")))
    assert sorted(row["file"] for row in rows) == sorted(os.listdir(src))
    assert [row["kind"] for row in rows if row["kind"] != "clean"] == list(KINDS)[:6]  # every other, in turn
    for row in rows:
        before, after = read_nifti(os.path.join(src, row["file"])), read_nifti(out / row["file"])
        assert np.array_equal(before.astype(np.float32), after) == (row["kind"] == "clean")
    again = run_script("artefacts.py", f"--input={src}", f"--out_dir={out}", cwd=str(tmp_path))
    assert again.returncode == 1 and again.stderr.startswith("error:") and "not empty" in again.stderr
    missing = run_script("artefacts.py", f"--input={tmp_path / 'nowhere'}", cwd=str(tmp_path))
    assert missing.returncode == 1 and "--input must be a folder" in missing.stderr
