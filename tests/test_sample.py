"""The evidence for generated slices: the classifier two-sample test in both directions, diversity, coverage."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metrics
from phantom import phantom_slice


@pytest.fixture(scope="module")
def halves():
    """Two random halves of one set of phantom slices (48 each), at 64x32 to keep the tests quick."""
    x = torch.tensor(np.stack([phantom_slice(c, 0, k, 8) for c in range(4, 16) for k in range(8)]), dtype=torch.float32)
    x = F.avg_pool2d(x[:, None], 4)
    x = (x - x.amin((2, 3), keepdim=True)) / (x.amax((2, 3), keepdim=True) - x.amin((2, 3), keepdim=True))
    p = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    return x[p[:48]], x[p[48:]]


def test_c2st_cannot_tell_a_set_from_more_of_itself(halves):
    real, more = halves
    c = metrics.c2st(real, more, seed=0)
    assert c["n_fit"] == c["n_test"] == 48 and c["ci95"][0] < 0.5 < c["ci95"][1] and c["accuracy"] < 0.7, c


@pytest.mark.parametrize("corrupt", ["blur", "noise"])
def test_c2st_tells_blurred_or_noisy_slices_apart(halves, corrupt):
    real, more = halves
    if corrupt == "blur":
        fake = F.avg_pool2d(more, 3, stride=1, padding=1, count_include_pad=False)
    else:
        fake = (more + 0.15 * torch.randn(more.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    c = metrics.c2st(real, fake, seed=0)
    assert c["accuracy"] >= 0.9 and c["ci95"][0] > 0.75, c


def test_wilson_interval():
    lo, hi = metrics.wilson(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert metrics.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)


def test_diversity_and_coverage(halves):
    real, _ = halves
    copies = real[:1].repeat(6, 1, 1, 1)
    assert metrics.median_pairwise_ssim(copies) == pytest.approx(1.0, abs=1e-5)  # a collapsed set: all alike
    assert metrics.median_pairwise_ssim(real) < 0.95
    near_train = np.full(len(real), 0.99)  # each real slice very close to some training slice
    assert metrics.coverage(real, real, near_train) == 1.0  # samples equal to the real slices cover them all
    assert metrics.coverage(real, copies, near_train) < 0.1  # one repeated sample covers almost none


def test_mirror_ssim_sees_a_missing_half(halves):
    real, _ = halves
    symmetric = torch.cat([real[..., :32, :], torch.flip(real[..., :32, :], dims=[2])], 2)
    assert np.allclose(metrics.mirror_ssim(symmetric), 1.0, atol=1e-5)
    half = real.clone()
    half[..., 32:, :] = 0  # one side of the body gone
    assert np.median(metrics.mirror_ssim(half)) < np.median(metrics.mirror_ssim(real)) - 0.1
