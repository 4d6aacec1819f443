"""The evidence for generated slices: the cross-fitted two-sample test in both directions, density and coverage,
diversity and symmetry."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metrics
from phantom import phantom_slice


@pytest.fixture(scope="module")
def halves():
    """Two random halves of one set of phantom slices (64 each), at 64x32 to keep the tests quick."""
    x = torch.tensor(np.stack([phantom_slice(c, 0, k, 8) for c in range(4, 20) for k in range(8)]), dtype=torch.float32)
    x = F.avg_pool2d(x[:, None], 4)
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    p = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    return x[p[:64]], x[p[64:]]


def test_c2st_cannot_tell_a_set_from_more_of_itself(halves):
    real, more = halves
    c = metrics.c2st(real, more, seed=0)
    assert c["n_real"] == c["n_fake"] == 64 and c["ci95"][0] < 0.5 < c["ci95"][1] and c["accuracy"] < 0.65, c


@pytest.mark.parametrize("corrupt", ["blur", "noise"])
def test_c2st_tells_blurred_or_noisy_slices_apart(halves, corrupt):
    real, more = halves
    if corrupt == "blur":
        fake = F.avg_pool2d(more, 3, stride=1, padding=1, count_include_pad=False)
    else:
        fake = (more + 0.1 * torch.randn(more.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    c = metrics.c2st(real, fake, seed=0)
    assert c["accuracy"] >= 0.9 and c["ci95"][0] > 0.8, c


def test_every_slice_is_labelled_once_by_a_classifier_that_never_saw_it(halves, monkeypatch):
    real, more = halves
    fitted, labelled = [], []
    fit = metrics.fit_classifier
    monkeypatch.setattr(metrics, "fit_classifier", lambda net, x, y, *a: fitted.append(x) or fit(net, x, y, *a))

    class Recording(torch.nn.Sequential):
        def forward(self, x):
            labelled.append(x)
            return super().forward(x)
    monkeypatch.setattr(metrics, "classifier",
                        lambda: Recording(torch.nn.Flatten(), torch.nn.Linear(real[0].numel(), 1)))
    c = metrics.c2st(real[:20], more[:20], folds=4, steps=1, batch_size=30)
    held = [x for x in labelled if len(x) == 10]  # each fold labels its 5 + 5 held-out slices once, in eval mode
    assert c["folds"] == 4 and len(fitted) == 4 and all(len(x) == 30 for x in fitted)
    everything = torch.cat([real[:20], more[:20]]).flatten(1)
    seen = torch.cat(held).flatten(1)
    assert len(seen) == 40 and torch.equal(seen.unique(dim=0), everything.unique(dim=0))
    for x_fit, x_held in zip(fitted, held):  # no held-out slice was among its classifier's training slices
        assert not (torch.cdist(x_held.flatten(1), x_fit.flatten(1)) == 0).any()


def test_wilson_interval():
    lo, hi = metrics.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert metrics.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    lo, hi = metrics.wilson(0.6 * 512, 512)  # 256 slices a side: a half-width within 0.06
    assert (hi - lo) / 2 < 0.045


def test_density_and_coverage(halves):
    real, more = halves
    same = metrics.density_coverage(real, more)
    assert same["coverage"] > 0.8 and 0.5 < same["density"] < 1.5  # more of the same: covered, as dense
    copies = real[:1].repeat(len(more), 1, 1, 1)
    collapsed = metrics.density_coverage(real, copies)  # one slice over and over covers almost nothing
    assert collapsed["coverage"] <= 5 / len(real) + 1e-9 < same["coverage"]
    empty = metrics.density_coverage(real, torch.zeros_like(more))
    assert empty["coverage"] == 0 and empty["density"] == 0


def test_diversity(halves):
    real, _ = halves
    assert metrics.median_pairwise_ssim(real[:1].repeat(6, 1, 1, 1)) == pytest.approx(1.0, abs=1e-5)
    assert metrics.median_pairwise_ssim(real) < 0.95


def test_mirror_ssim_sees_a_missing_half(halves):
    real, _ = halves
    symmetric = torch.cat([real[..., :32, :], torch.flip(real[..., :32, :], dims=[2])], 2)
    assert np.allclose(metrics.mirror_ssim(symmetric), 1.0, atol=1e-5)
    half = real.clone()
    half[..., 32:, :] = 0  # one side of the body gone
    assert np.median(metrics.mirror_ssim(half)) < np.median(metrics.mirror_ssim(real)) - 0.1


def test_generation_compare_draws_eight_samples_of_each_folder_a_row_each(tmp_path):
    import importlib.util
    import os
    from conftest import ROOT, write_slice
    spec = importlib.util.spec_from_file_location("generation", os.path.join(ROOT, "experiments", "generation.py"))
    generation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generation)
    folders = []
    for name in ("samples-a", "samples-b"):
        folder = tmp_path / "prior" / name
        (folder / "nifti").mkdir(parents=True)
        for i in range(8):
            write_slice(folder / "nifti" / f"sample_{i:03d}.nii.gz", np.full((256, 128), i / 8, np.float32))
        folders.append(str(folder))
    generation.main([f"--compare={','.join(folders)}", f"--figure={tmp_path / 'c.png'}"])
    from skimage.io import imread
    assert imread(tmp_path / "c.png").shape[0] > 200  # two rows of slices, titled
    with pytest.raises(Exception, match="sample_000"):
        generation.main([f"--compare={tmp_path}", f"--figure={tmp_path / 'd.png'}"])
