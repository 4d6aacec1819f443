"""The synthetic pelvis phantom: deterministic, smooth along a scan, labels aligned with the image, seg files written
beside the images, and realistic shares of near-empty and constant slices at the ends of scans."""
import glob
import os
import sys
from collections import defaultdict

import nibabel as nib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dataset import LABELS  # noqa: E402
from phantom import _plan, phantom_slice, scan_end_kind, write_phantom  # noqa: E402

BODY, BONE, BLADDER, RECTUM, PROSTATE = 1, 2, 3, 4, 5


def test_deterministic_with_labels():
    a, la = phantom_slice(7, 1, 5, 12, labels=True)
    b, lb = phantom_slice(7, 1, 5, 12, labels=True)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert a.shape == la.shape == (256, 128) and a.dtype == np.float64 and la.dtype == np.uint8
    assert np.array_equal(phantom_slice(7, 1, 5, 12), a)          # labels=False: the same image alone
    w, lw = phantom_slice(7, 1, 5, 12, width=144, labels=True)
    assert w.shape == lw.shape == (256, 144)
    assert np.array_equal(lw[:, 8:136], la)                       # a wider field of view, same anatomy
    assert not np.array_equal(phantom_slice(7, 1, 5, 12, seed=1), a)


def test_smooth_along_the_scan():
    # neighbours 3 mm apart in a 60-slice scan vs the same position in another patient
    (a, la), (b, lb) = (phantom_slice(6, 0, k, 60, labels=True) for k in (22, 23))
    o, lo = phantom_slice(20, 0, 22, 60, labels=True)
    assert np.abs(a - b).mean() < 0.5 * np.abs(a - o).mean()
    assert np.mean(la != lb) < 0.04 and np.mean(la != lb) < 0.5 * np.mean(la != lo)


def test_labels_in_range_and_aligned():
    imgs, labs = zip(*(phantom_slice(c, 0, k, 10, labels=True) for c in (5, 17) for k in range(1, 10, 2)))
    img, lab = np.stack(imgs), np.stack(labs)
    assert set(np.unique(lab)) <= set(range(len(LABELS)))
    mean = {i: img[lab == i].mean() for i in range(6)}
    assert mean[0] < 0.15 * mean[BODY]                             # background is noise only
    assert mean[BLADDER] > 1.3 * mean[BODY]                        # urine is the brightest tissue
    assert mean[PROSTATE] > 0.6 * mean[BODY] and mean[RECTUM] < mean[BLADDER]
    # bone: the label's outer ring (the cortex) is much darker than the marrow inside it
    bone = lab == BONE
    inner = bone.copy()
    for ax in (1, 2):
        for s in (1, -1):
            inner &= np.roll(bone, s, axis=ax)
    ring = bone & ~inner
    assert img[ring].mean() < 0.6 * img[inner].mean()
    assert np.median(img[ring]) < 0.5 * np.median(img[lab == BODY])


def test_organs_where_they_belong():
    n = 20
    seen = defaultdict(list)
    for c in (4, 9, 15, 22, 31, 38):
        for k in range(n):
            counts = np.bincount(phantom_slice(c, 0, k, n, labels=True)[1].ravel(), minlength=6)
            for organ in (BLADDER, RECTUM, PROSTATE):
                assert counts[organ] == 0 or counts[organ] >= 20, (c, k, organ, counts)
                if counts[organ]:
                    seen[organ].append(k / n)
    total = 6 * n
    assert 0.15 < len(seen[PROSTATE]) / total < 0.5 and max(seen[PROSTATE]) < 0.65   # caudal / middle
    assert 0.3 < len(seen[BLADDER]) / total < 0.8 and np.mean(seen[BLADDER]) > 0.55  # mostly cranial
    assert len(seen[RECTUM]) / total > 0.8


def test_write_phantom_writes_a_seg_for_every_image(tmp_path):
    write_phantom(str(tmp_path), {"train": 12, "validate": 4, "test": 4})
    for split, n in (("train", 12), ("validate", 4), ("test", 4)):
        images = sorted(glob.glob(str(tmp_path / f"keras_slices_{split}" / "*.nii.gz")))
        segs = sorted(glob.glob(str(tmp_path / f"keras_slices_seg_{split}" / "*.nii.gz")))
        assert len(images) == len(segs) == n
        for path in images:
            name = os.path.basename(path).replace("case_", "seg_", 1)
            seg = nib.load(str(tmp_path / f"keras_slices_seg_{split}" / name))
            img = nib.load(path)
            assert seg.shape == img.shape and seg.get_data_dtype() == np.uint8
            assert np.allclose(seg.affine, img.affine)
            assert np.asanyarray(seg.dataobj).max() <= 5


def test_scan_ends_at_study_size():
    for split, n in (("train", 11460), ("validate", 660)):
        by_scan = defaultdict(dict)
        for case, week, k, n_week in _plan(split, n, 0):
            by_scan[case, week][k] = scan_end_kind(0, case, week, k, n_week)
        kinds = np.array([kind for scan in by_scan.values() for kind in scan.values()])
        assert 0.004 < np.mean(kinds == 2) < 0.02 and 0.015 < np.mean(kinds == 1) < 0.045, split
        for scan in by_scan.values():   # only the outermost slices of a scan, all-zero ones outermost
            seq = [scan[k] for k in sorted(scan)]
            middle = [i for i, kind in enumerate(seq) if kind == 0]
            assert middle and all(kind == 0 for kind in seq[middle[0]:middle[-1] + 1])
            for part in (seq[:middle[0]], seq[middle[-1] + 1:][::-1]):
                assert part == sorted(part, reverse=True)
    # demo sizes have a few of both too
    demo = [scan_end_kind(0, *v) for split, n in (("train", 640), ("validate", 80), ("test", 60))
            for v in _plan(split, n, 0)]
    assert demo.count(2) >= 2 and demo.count(1) >= 8


def test_end_slices_render():
    plan = list(_plan("validate", 660, 0))
    blank = next(v for v in plan if scan_end_kind(0, *v) == 2)
    img, lab = phantom_slice(*blank, labels=True, scan_ends=True)
    assert not img.any() and not lab.any() and img.shape == (256, 128)
    assert phantom_slice(*blank).std() > 0                   # without scan_ends, an ordinary slice
    for v in [v for v in plan if scan_end_kind(0, *v) == 1][:4]:
        img, lab = phantom_slice(*v, labels=True, scan_ends=True)
        assert img.std() > 0 and np.mean(lab > 0) < 0.15    # noise, or a sliver of body


# (case, week, slice, n_slices, width, seed): prostate, bladder, rectum, seminal vesicles and bowel loops from caudal to
# cranial, both widths, seeds 0 and 1, then the ends of one 60-slice scan: a sliver of body, noise only, all zero
PINNED_SLICES = ((5, 0, 3, 20, 128, 0), (9, 1, 6, 20, 144, 0), (17, 2, 10, 20, 128, 1), (23, 0, 14, 20, 144, 1),
                 (30, 3, 18, 20, 128, 0), (38, 1, 30, 60, 144, 1), (41, 0, 5, 10, 128, 1),
                 (4, 0, 58, 60, 144, 0), (4, 0, 0, 60, 128, 0), (4, 0, 59, 60, 128, 0))
# each slice's image sum, sum of squares and sum weighted by a fixed ramp, and its pixel count per label, recorded
# from phantom.py before its drawing code was split into functions (where every image and label array was checked
# bit for bit); the sums allow for a CPU whose float32 exp or sin rounds the last bit differently
PINNED = [
    (5689964.861460477, 2236859424.6375365, 45472491.753523946, [13021, 16505, 2646, 0, 318, 278]),
    (6824520.88605696, 3567697970.4906015, 54634031.11907102, [20204, 12523, 3131, 0, 188, 818]),
    (11213818.24911356, 8333679579.103497, 89810143.812101, [10501, 18139, 2154, 1547, 427, 0]),
    (9812721.848802745, 6017329193.680269, 78509574.97339472, [14664, 17869, 2089, 1690, 552, 0]),
    (8913865.954387456, 6047514386.26195, 71398149.4415158, [14091, 14531, 2075, 1714, 357, 0]),
    (9941161.159937859, 6758573364.368828, 79582195.43374926, [17902, 15818, 2236, 682, 226, 0]),
    (8118127.288575612, 4214434227.028763, 64936693.52866199, [10858, 17835, 2526, 959, 590, 0]),
    (1381327.9431740344, 209035679.5489453, 11093890.088613898, [36259, 605, 0, 0, 0, 0]),
    (914556.7921788692, 32445292.507836707, 7311875.803941205, [32768, 0, 0, 0, 0, 0]),
    (0.0, 0.0, 0.0, [32768, 0, 0, 0, 0, 0]),
]


def test_output_stays_the_same_for_a_seed():
    organs = set()
    for (case, week, k, n, width, seed), (total, squares, ramped, counts) in zip(PINNED_SLICES, PINNED):
        img, lab = phantom_slice(case, week, k, n, width=width, seed=seed, labels=True, scan_ends=True)
        assert img.shape == lab.shape == (256, width) and img.dtype == np.float64 and lab.dtype == np.uint8
        ramp = np.add.outer(np.arange(256), 3 * np.arange(width)) % 17
        assert np.allclose([img.sum(), (img * img).sum(), (img * ramp).sum()], [total, squares, ramped], rtol=1e-6,
                           atol=0), (case, week, k)
        assert np.abs(np.bincount(lab.ravel(), minlength=6) - counts).max() <= 3, (case, week, k)
        organs |= set(np.unique(lab).tolist())
    assert organs == set(range(len(LABELS)))
    assert [scan_end_kind(seed, c, w, k, n) for c, w, k, n, _, seed in PINNED_SLICES[-3:]] == [1, 1, 2]
