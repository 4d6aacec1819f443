"""Simulated MRI artefacts and corruptions of one 2D slice, for a slice-quality (QC) benchmark.

A slice is a float array in scanner intensity units (non-negative, background near 0 with Rician noise), stored
transposed as everywhere in the project: axis 0 (256) runs left-right, axis 1 anterior (index 0) to posterior.
Every corruption is `kind(img, rng, severity)`: rng a numpy Generator (all its randomness, so a seed gives the same
result), severity "mild" or "moderate" (ignored by the kinds that have no degree); it returns a new float32 array
and never changes img. `corrupt(kind, img, rng, severity)` returns (image, mask) for every kind in `KINDS`, the
mask (where the image changed) for "blob" only, None for the others.

What each simulates, and how:
- ghosting: periodic motion (breathing, peristalsis) during the scan. Every n-th phase-encoding line (axis 0, n
  drawn from 2 to 4, which interleave drawn too) of the k-space is scaled by 1 - strength (mild 0.35, moderate
  0.7). In the image that takes strength/n of the slice away and adds n - 1 copies of it, each strength/n bright,
  shifted by multiples of FOV/n: ghosts of the body over it and in the background beside it.
- spike: a spike of noise in one k-space sample (herringbone): a sample drawn 5-25% of the way out along each
  axis gains strength * |k|.max() (the k-space centre, the image's sum) at a random phase, mild 0.1, moderate
  0.25. That is a plane wave of amplitude strength times the image's mean (~25 and ~60 on the phantom's pelvis,
  whose noise sigma is ~20): faint stripes across the slice when mild, clear ones when moderate; 0.04 is all but
  invisible under the noise.
- bias_field: receive-coil inhomogeneity. The slice times exp(a polynomial of degree 3 in the coordinates, each
  axis normalised to [-1, 1], without a constant term so the field is 1 at the centre, coefficients uniform in
  [-c, c]), c mild 0.3, moderate 0.6: brightness drifting smoothly across the slice, typically up to 1.5x (mild)
  or 2.5x (moderate) brighter or darker somewhere in the body, more at the corners.
- wrap_around: a phase field of view smaller than the body (axis 0). The central (1 - f) of the axis is kept, f
  mild 0.1, moderate 0.2, and what lay past either end folds in at the opposite end (aliasing adds it there); the
  result is resized back to the input's shape.
- blur: loss of resolution (through-plane partial volume, a too-small matrix): a Gaussian blur of sigma mild 1,
  moderate 2 pixels.
- noise: low SNR (a failing coil element, a short scan): more Rician noise, sqrt((img + n1)^2 + n2^2), n1 and n2
  normal with sigma mild 0.03, moderate 0.07 of the image's 99th percentile.
- clipping: receiver saturation: every value above the q-th percentile of the foreground (the pixels above the
  mean) set to it, q mild 98, moderate 90.
- flip_lr, flip_ud, rotate_90: a slice stored the wrong way round (left-right, anterior-posterior, or turned a
  quarter; a (256, 128) slice becomes (128, 256)).
- noise_only: a slice past the body, as at the ends of a scan: Rician noise at the input's own background noise
  level (see background_sigma).
- other_anatomy: a slice of another body part (head, thorax or knee, phantom.other_anatomy), at the input's
  shape and scaled to its 99th percentile: data that is not a pelvis.
- blob: a local lesion-like focus, the kind of change a QC check should localise: a soft-edged ellipse (radii drawn,
  mild 3-5, moderate 6-10 pixels; edge BLOB_EDGE pixels wide; angle drawn) added to the tissue, keeping its
  texture, with a contrast of mild 0.25, moderate 0.5 of the 99th percentile, bright or dark (never below 0),
  centred on a random pixel where it fits whole inside the body (body_mask). Its mask: the pixels it changes by
  more than 10% of the contrast; nothing changes more than a pixel or two beyond it.

Why not TorchIO's transforms: RandomGhosting, RandomSpike, RandomBiasField, RandomBlur, RandomNoise and RandomFlip
would cover 6 of these 13 kinds, and none of wrap-around, clipping, a slice past the body, other anatomy or a blob;
they take 3D volumes (a slice as depth 1) and would bring SimpleITK, typer, rich and more into the install for one
benchmark. The same physics (k-space lines scaled, one k-space sample raised, a polynomial field) fits in a few
lines each here, and each kind is tested against what it should do (tests/test_artefacts.py).

`plot_kinds(img, path)` draws every kind at both severities, to look at.

    python artefacts.py --input=data/unseen/keras_slices_test --out_dir=data/corrupted

writes a copy of a folder of slices in which every other slice (`share`) is corrupted, the kinds taken in turn, and
`corrupted.csv` saying which kind each file holds ("clean" for none): a folder to try qc.py on.
"""
import math
import os

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image
from skimage.transform import resize

import dataset
import options
import phantom
from options import Option
from utils import DataError, make_folder, read_nifti, read_slice, run_script, write_csv, write_nifti

SEVERITIES = ("mild", "moderate")
END_SHARE = 0.1      # a slice whose labels cover less of it is an end of a scan, past the body: not a clean slice
PHASE_AXIS = 0       # left-right, the phase-encoding direction of the study's axial slices
BLOB_EDGE = 3.0      # width in pixels of the blob's soft edge (partial volume)


def _checked(severity):
    if severity not in SEVERITIES:
        raise ValueError(f"severity {severity!r}: give one of {', '.join(SEVERITIES)}")
    return severity


def _degree(severity, mild, moderate):
    return mild if _checked(severity) == "mild" else moderate


def _float32(x):
    return np.array(x, dtype=np.float32)  # always a copy: flips and rotations are views of the input otherwise


def _kspace_magnitude(k):
    """The magnitude image of a k-space, as a scanner reconstructs it."""
    return _float32(np.abs(np.fft.ifft2(k)))


def body_mask(img):
    """The body: the convex hull of the pixels above the image's Otsu threshold. Those are mostly fat, whose
    subcutaneous layer outlines the body, but seldom as a closed ring; the dark muscle inside is below it."""
    if img.max() <= img.min():
        return np.zeros(img.shape, bool)
    return convex_hull_image(img > threshold_otsu(img))


def ghosting(img, rng, severity, axis=PHASE_AXIS):
    strength = _degree(severity, 0.35, 0.7)
    n = int(rng.integers(2, 5))
    k = np.fft.fft2(img)
    lines = [slice(None)] * 2
    lines[axis] = slice(int(rng.integers(n)), None, n)   # which of the n interleaves was hit by the motion
    k[tuple(lines)] *= 1 - strength
    return _kspace_magnitude(k)


def spike(img, rng, severity):
    strength = _degree(severity, 0.1, 0.25)
    k = np.fft.fft2(img)
    where = tuple(int(rng.choice((-1, 1)) * round(rng.uniform(0.05, 0.25) * n)) for n in img.shape)
    k[where] += strength * np.abs(k).max() * np.exp(2j * math.pi * rng.uniform())
    return _kspace_magnitude(k)


def log_bias(shape, rng, c):
    """log of a bias field: a polynomial of degree 3 (no constant term) in coordinates normalised to [-1, 1]."""
    x, y = np.linspace(-1, 1, shape[0])[:, None], np.linspace(-1, 1, shape[1])[None, :]
    return sum(rng.uniform(-c, c) * x ** i * y ** j for i in range(4) for j in range(4 - i) if i + j)


def bias_field(img, rng, severity):
    return _float32(img * np.exp(log_bias(img.shape, rng, _degree(severity, 0.3, 0.6))))


def wrap_around(img, rng, severity, axis=PHASE_AXIS):
    fraction = _degree(severity, 0.1, 0.2)
    x = np.moveaxis(np.asarray(img, np.float64), axis, 0)
    cut = max(1, round(fraction * len(x) / 2))              # lost at each end
    folded = x[cut:-cut].copy()
    folded[-cut:] += x[:cut]   # what lay before the smaller field of view aliases to its far end, and vice versa
    folded[:cut] += x[-cut:]
    out = resize(folded, x.shape, order=1, preserve_range=True)
    return _float32(np.moveaxis(out, 0, axis))


def blur(img, rng, severity):
    return _float32(ndimage.gaussian_filter(np.asarray(img, np.float64), _degree(severity, 1.0, 2.0)))


def _rician(signal, sigma, rng):
    n = rng.standard_normal((2,) + np.shape(signal)) * sigma
    return np.hypot(signal + n[0], n[1])


def noise(img, rng, severity):
    return _float32(_rician(img, _degree(severity, 0.03, 0.07) * np.percentile(img, 99), rng))


def clipping(img, rng, severity):
    foreground = img[img > img.mean()]
    cap = np.percentile(foreground if foreground.size else img, _degree(severity, 98, 90))
    return _float32(np.minimum(img, cap))


def flip_lr(img, rng, severity):
    return _float32(img[::-1])


def flip_ud(img, rng, severity):
    return _float32(img[:, ::-1])


def rotate_90(img, rng, severity):
    return _float32(np.rot90(img))


def background_sigma(img):
    """Rician noise sigma of the background: the median of the pixels well outside the body over the Rayleigh
    median's sqrt(2 ln 2) sigma (the median ignores a few brighter partial-volume or ghost pixels). A slice with
    almost no background (a body filling it, or noise only) takes its darkest 10% as the lower tail of pure
    noise. At least 1% of the 99th percentile."""
    outside = ~ndimage.binary_dilation(body_mask(img), iterations=3)
    if outside.mean() >= 0.05:
        sigma = np.median(img[outside]) / math.sqrt(2 * math.log(2))
    else:
        sigma = np.percentile(img, 10) / math.sqrt(-2 * math.log(0.9))
    return max(float(sigma), 0.01 * np.percentile(img, 99))


def noise_only(img, rng, severity):
    return _float32(_rician(np.zeros(img.shape), background_sigma(img), rng))


def other_anatomy(img, rng, severity):
    kind = phantom.OTHER_ANATOMIES[int(rng.integers(len(phantom.OTHER_ANATOMIES)))]
    other = phantom.other_anatomy(kind, seed=int(rng.integers(2 ** 31)), width=min(img.shape[1], phantom.W_MAX))
    if other.shape != img.shape:
        other = resize(other, img.shape, order=1, preserve_range=True)
    return _float32(other * (np.percentile(img, 99) / max(np.percentile(other, 99), 1e-12)))


def blob(img, rng, severity):
    """-> (image, mask): the mask holds the pixels that changed by more than 10% of the contrast."""
    contrast = _degree(severity, 0.25, 0.5) * np.percentile(img, 99) * rng.choice((-1, 1))
    a, b = rng.uniform(*_degree(severity, (3, 5), (6, 10)), size=2)
    angle = rng.uniform(0, math.pi)
    body = body_mask(img)
    room = ndimage.distance_transform_edt(body) > max(a, b) + BLOB_EDGE   # the whole blob fits in the body
    where = room if room.any() else body if body.any() else np.ones(img.shape, bool)
    centres = np.argwhere(where)
    ci, cj = centres[rng.integers(len(centres))]
    di, dj = np.ogrid[:img.shape[0], :img.shape[1]]
    di, dj = di - ci, dj - cj
    u, v = (di * math.cos(angle) + dj * math.sin(angle)) / a, (dj * math.cos(angle) - di * math.sin(angle)) / b
    depth = (1 - np.hypot(u, v)) * min(a, b)                   # ~ pixels inside the outline
    t = np.clip(0.5 + depth / BLOB_EDGE, 0, 1)
    weight = t * t * (3 - 2 * t)                               # smoothstep: 1 inside, 0 past the soft edge
    out = np.maximum(img + contrast * weight, 0)               # a dark blob cannot go below no signal
    return _float32(out), np.abs(out - img) > 0.1 * abs(contrast)


KINDS = dict(ghosting=ghosting, spike=spike, bias_field=bias_field, wrap_around=wrap_around, blur=blur, noise=noise,
             clipping=clipping, flip_lr=flip_lr, flip_ud=flip_ud, rotate_90=rotate_90, noise_only=noise_only,
             other_anatomy=other_anatomy, blob=blob)

BLOCK = dict(
    input=Option(None, kind=str),  # a folder of 2D NIfTI slices
    out_dir=Option("data/corrupted"),
    kind=Option("all", choices=("all", *KINDS)),  # all: every kind in turn
    severity=Option("moderate", choices=SEVERITIES),
    share=Option(0.5, above=0, at_most=1),  # of the slices corrupted, spread evenly over the folder
    seed=Option(0),
)


def corrupt(kind, img, rng, severity):
    """-> (corrupted image, mask): the mask is blob's (the pixels it changed), None for every other kind. The
    severity is checked for every kind, those that ignore it too."""
    out = KINDS[kind](img, rng, _checked(severity))
    return out if kind == "blob" else (out, None)


# ---- the benchmark's halves: clean slices, and slices to corrupt -----------------------------------------------

def normalised(images):
    """Raw slices in intensity units (each its own shape) -> float32 (N, H, W) in [0, 1] at the study's size, as
    dataset.prepare gives them."""
    return np.stack([dataset.normalise(a)[0] for a in images])


def resized(masks):
    """Label or blob masks (each its own shape) -> (N, H, W) at the study's size, nearest-neighbour."""
    return np.stack([m if m.shape == (dataset.H, dataset.W) else
                     resize(m, (dataset.H, dataset.W), order=0, anti_aliasing=False, preserve_range=True)
                     for m in masks]).astype(masks[0].dtype)


def halves(data_dir, split, seed):
    """The split's raw slices and labels; the indices of the clean half and of the half to corrupt, drawn from the
    slices that are neither constant (skipped, as everywhere) nor ends of scans; the ends' indices; and the random
    generator, to draw on from."""
    files = dataset.find_splits(data_dir)[split]
    raw = [read_nifti(f) for f in files]
    labels = [read_nifti(m).astype(np.uint8) for m in dataset.find_masks(files)]
    keep = [i for i, a in enumerate(raw) if a.max() > a.min()]
    ends = [i for i in keep if (labels[i] > 0).mean() < END_SHARE]
    rng = np.random.default_rng(seed)
    order = rng.permutation([i for i in keep if i not in ends])
    return raw, labels, order[:len(order) // 2], order[len(order) // 2:], ends, rng


def plot_kinds(img, path, seed=0):
    """A PNG of img and every kind at both severities (mild left, moderate right), all on img's grey scale, with
    blob's mask outlined: to see that each looks like what it is called."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("original", img, None)]
    for kind in KINDS:
        for severity in SEVERITIES:
            out, mask = corrupt(kind, img, np.random.default_rng(seed), severity)
            panels.append((f"{kind} {severity}", out, mask))
    ncols = 4
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 1.9 * nrows), squeeze=False)
    vmax = np.percentile(img, 99.5)
    for ax, (title, x, mask) in zip(axes.flat, panels):
        ax.imshow(x.T, cmap="gray", vmin=0, vmax=vmax)
        if mask is not None:
            ax.contour(mask.T, levels=[0.5], colors="red", linewidths=0.6)
        ax.set_title(title, fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv):
    cfg = options.parse(BLOCK, argv)
    if not cfg.input or not os.path.isdir(cfg.input):
        raise DataError(f"{cfg.input}: --input must be a folder of NIfTI slices")
    names = sorted(n for n in os.listdir(cfg.input) if n.endswith((".nii", ".nii.gz")))
    if not names:
        raise DataError(f"{cfg.input}: holds no .nii or .nii.gz files")
    if os.path.isdir(cfg.out_dir) and os.listdir(cfg.out_dir):
        raise DataError(f"{cfg.out_dir}: is not empty; give an --out_dir of its own")
    make_folder(cfg.out_dir)
    kinds = list(KINDS) if cfg.kind == "all" else [cfg.kind]
    rows, n_bad = [], 0
    for i, name in enumerate(names):
        img, a = read_slice(os.path.join(cfg.input, name))
        kind = "clean"
        if int((i + 1) * cfg.share) > int(i * cfg.share):   # evenly spread: share 0.5 is every other slice
            kind = kinds[n_bad % len(kinds)]
            a, _ = corrupt(kind, a, np.random.default_rng([cfg.seed, i]), cfg.severity)
            n_bad += 1
        write_nifti(os.path.join(cfg.out_dir, name), a.astype(np.float32), img.affine)
        rows.append((name, kind, cfg.severity if kind != "clean" else ""))
    write_csv(os.path.join(cfg.out_dir, "corrupted.csv"), ("file", "kind", "severity"), rows)
    print(f"{n_bad} of {len(names)} slices corrupted ({', '.join(kinds) if len(kinds) < 4 else 'every kind in turn'},"
          f" {cfg.severity}) -> {cfg.out_dir}")


if __name__ == "__main__":
    run_script(main)
