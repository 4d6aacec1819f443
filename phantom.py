"""Synthetic 2D T2-weighted axial pelvic MRI phantom (embedded demo data for the VQ-VAE project).

Slices are stored transposed: axis 0 (256) runs left-right, axis 1 (128, or 144 for a wider
field of view) runs anterior (index 0) to posterior, so ``plt.imshow(img.T)`` shows a wide
axial slice with the bladder at the top.  Everything is a deterministic function of the ints
(seed, case, week, slice): anatomy from (seed, case), set-up shift / bladder filling / bias
field from (seed, case, week), and noise from all four.
"""
import functools
import math
import multiprocessing
import os

import nibabel as nib
import numpy as np

SPLIT_CASES = {"train": range(4, 36), "validate": range(36, 40), "test": range(40, 43)}
N_LR = 256
PIX = 2.0 / N_LR                      # pixel size in normalised units; x spans [-1, 1)
VOXEL_MM = (1.6, 1.6, 3.0)            # matches a ~38 cm wide pelvis filling ~80% of x
EDGE = 1.2                            # edge ramp width in pixels (anti-aliasing)
# T2 intensities in arbitrary scanner units (fat and fluid bright, muscle dark-ish)
FAT, MUSCLE, FLUID, AIR, CORTEX, MARROW, WALL = 780.0, 250.0, 950.0, 5.0, 30.0, 340.0, 190.0


@functools.lru_cache(maxsize=None)
def _grid(width):
    """Coordinate vectors plus separable bases for texture and bias, computed once per width."""
    xd = (np.arange(N_LR) - (N_LR - 1) / 2) * PIX
    yd = (np.arange(width) - (width - 1) / 2) * PIX

    def rbf(t, n):  # smooth gaussian bumps: a random mix of them is a low-pass random field
        c = np.linspace(t[0], t[-1], n)
        return np.exp(-0.5 * ((t[:, None] - c) / (0.8 * (c[1] - c[0]))) ** 2)

    # coarse (7x4) and fine (20x10) bumps side by side, so one matmul gives the whole texture
    tex = (np.hstack([rbf(xd, 7), rbf(xd, 20)]), np.hstack([rbf(yd, 4), rbf(yd, 10)]))
    poly = (np.stack([xd ** 0, xd, xd ** 2], 1), np.stack([yd ** 0, yd, yd ** 2], 1))
    # float32 coordinates: painting in float32 halves the memory traffic, ample precision here
    return xd.astype(np.float32), yd.astype(np.float32), tex, poly


@functools.lru_cache(maxsize=4096)
def _patient(seed, case):
    """Per-patient anatomy: sizes/positions that stay fixed across that patient's slices."""
    r = np.random.default_rng(np.random.SeedSequence([seed, case]))
    u = r.uniform
    p = dict(body_a=u(0.74, 0.86), body_b=u(0.29, 0.34), body_cy=u(-0.06, -0.03),
             butt_cx=u(0.21, 0.26), butt_cy=u(0.11, 0.14), butt_a=u(0.29, 0.35), butt_b=u(0.24, 0.28),
             fat_ant=u(0.05, 0.11), fat_lat=u(0.04, 0.09), fat_post=u(0.035, 0.07),
             fem_cx=u(0.45, 0.52), fem_cy=u(-0.03, 0.03), fem_r=u(0.10, 0.125),
             bl_cy=u(-0.16, -0.11), bl_a=u(0.15, 0.21), bl_b=u(0.09, 0.12), fill=u(0.75, 1.0),
             pr_cy=u(0.02, 0.05), pr_a=u(0.09, 0.12), pr_b=u(0.065, 0.085),
             re_cy=u(0.16, 0.19), re_a=u(0.07, 0.09), re_b=u(0.05, 0.065),
             zshift=u(-0.1, 0.1), gain=u(0.85, 1.15), tex_f=u(0.5, 1.2),
             n_weeks=int(r.integers(3, 7)))
    p["tex"] = np.zeros((2, 27, 14))  # block-diagonal: coarse bumps weight 1, fine bumps 0.6
    p["tex"][:, :7, :4] = r.standard_normal((2, 7, 4))
    p["tex"][:, 7:, 4:] = 0.6 * r.standard_normal((2, 20, 10))
    return p


@functools.lru_cache(maxsize=4096)
def _week(seed, case, week):
    """Per-fraction changes: bladder filling, small set-up shift/rotation, coil bias field."""
    r = np.random.default_rng(np.random.SeedSequence([seed, case, week]))
    return dict(fill=r.uniform(0.55, 1.15), dx=float(np.clip(r.normal(0, 0.012), -0.03, 0.03)),
                dy=float(np.clip(r.normal(0, 0.008), -0.02, 0.02)), theta=r.normal(0, 0.02),
                bias=r.standard_normal((3, 3)), bias_amp=r.uniform(0.12, 0.2),
                air_amp=r.uniform(0.3, 1.0), air_phase=r.uniform(0, 1))


def _bump(z, mu, sig):
    """Smooth z-profile (gaussian) so structure sizes change gradually from slice to slice."""
    return math.exp(-0.5 * ((z - mu) / sig) ** 2)


def phantom_slice(case: int, week: int, slice_idx: int, n_slices: int, width: int = 128,
                  seed: int = 0) -> np.ndarray:
    """float64 array of shape (256, width), raw 'scanner' intensities (roughly 0..~1000, noise background near 0+)."""
    x, y, bases, poly = _grid(width)
    P, W = _patient(seed, case), _week(seed, case, week)
    z = slice_idx / max(n_slices, 1)           # 0 = caudal (prostate apex), 1 = cranial
    zs = z + P["zshift"]
    img = np.zeros((N_LR, width), np.float32)
    ct, st = math.cos(W["theta"]), math.sin(W["theta"])  # python floats keep arrays float32
    x0, y0 = (N_LR - 1) / 2, (width - 1) / 2              # pixel index of the origin

    def paint(cx, cy, a, b, value, angle=0.0, rim=None, thick=0.0):
        """Blend a soft-edged ellipse (optionally with a rim `thick` px wide, e.g. bone cortex,
        bowel wall, fat plane around a muscle) into img, computing only its bounding box."""
        if min(a, b) < 0.3 * PIX:
            return
        # patient pose moves the structure centres rather than the grid, so boxes stay axis-aligned
        cx, cy, angle = ct * cx - st * cy + W["dx"], st * cx + ct * cy + W["dy"], angle + W["theta"]
        c, s = math.cos(angle), math.sin(angle)
        pad = (thick + 2.5) * PIX
        ex, ey = math.hypot(a * c, b * s) + pad, math.hypot(a * s, b * c) + pad  # exact extents
        i0, i1 = max(0, math.ceil((cx - ex) / PIX + x0)), min(N_LR, math.ceil((cx + ex) / PIX + x0))
        j0, j1 = max(0, math.ceil((cy - ey) / PIX + y0)), min(width, math.ceil((cy + ey) / PIX + y0))
        if i0 >= i1 or j0 >= j1:
            return
        dx, dy = x[i0:i1, None] - cx, y[None, j0:j1] - cy
        u, v = (c / a) * dx + (s / a) * dy, (c / b) * dy - (s / b) * dx
        uu, vv = u * u, v * v
        # signed distance ~ (q - 1) / |grad q| with q = u^2 + v^2, in units of the edge ramp width
        k = 2 * PIX * EDGE
        dist = (uu + vv - 1) / np.sqrt(uu * (k / a) ** 2 + vv * (k / b) ** 2 + 1e-12)
        sub = img[i0:i1, j0:j1]
        for val, off in ((rim, thick / EDGE), (value, 0.0)) if rim is not None else ((value, 0.0),):
            t = np.clip((0.5 + off) - dist, 0, 1)
            sub += t * t * (3 - 2 * t) * (val - sub)   # smoothstep: a cheap polynomial sigmoid

    def ringed(cx, cy, a, b, rim, inner, thick, angle=0.0):  # inner value with a `thick` px rim
        paint(cx, cy, a, b, inner, angle, rim, thick)

    # body outline: central oval plus two buttocks, all subcutaneous fat
    paint(0, P["body_cy"], P["body_a"], P["body_b"], FAT)
    bx, by, ba, bb = P["butt_cx"], P["butt_cy"], P["butt_a"], P["butt_b"]
    for sd in (-1, 1):
        paint(sd * bx, by, ba, bb, FAT, sd * 0.3)
    # muscle compartment inside the fat layer (anterior fat thicker than posterior)
    fa, fl, fp = P["fat_ant"], P["fat_lat"], P["fat_post"]
    paint(0, P["body_cy"] + (fa - fp) / 2, P["body_a"] - fl, P["body_b"] - (fa + fp) / 2, MUSCLE)
    for sd in (-1, 1):
        paint(sd * bx, by, ba - fp, bb - fp, MUSCLE, sd * 0.3)
        ringed(sd * (bx + 0.03), by + 0.04, ba - fp - 0.06, bb - fp - 0.05, FAT * 0.8, MUSCLE * 0.95, 1.5, sd * 0.3)
    # central pelvic (perivesical / ischiorectal) fat
    paint(0, 0.03, 0.30, 0.27, FAT * 0.9)
    fr = P["fem_r"] * (0.6 + 0.4 * _bump(zs, 0.55, 0.45))
    fx, fy = P["fem_cx"], P["fem_cy"]
    for sd in (-1, 1):
        ax = sd * (fx - 0.12)        # acetabulum / ischium: dark cortex, fatty marrow
        ringed(ax, fy + 0.06, 0.045, 0.16, CORTEX, MARROW * 1.1, 1.5, -sd * 0.25)
        ringed(ax - sd * 0.08, fy + 0.05, 0.035, 0.13, FAT * 0.8, MUSCLE * 1.1, 1.5, -sd * 0.25)  # obturator int.
        ringed(sd * (fx - 0.05), fy - 0.2, 0.09, 0.055, FAT * 0.8, MUSCLE, 1.5)                   # iliopsoas
        ringed(sd * (fx + 0.12), fy - 0.17, 0.05, 0.04, FAT * 0.8, MUSCLE * 1.05, 1.5)           # sartorius
        paint(sd * (fx - 0.13), fy - 0.25, 0.018, 0.018, 60.0)                                # femoral vessels
        ringed(sd * fx, fy, fr, fr, CORTEX, MARROW, 2.0)                                       # femoral head
        pub = _bump(zs, 0.2, 0.25)   # pubic rami caudally, joining at the symphysis
        ringed(sd * 0.12, -0.22, 0.13 * pub, 0.028 * pub, CORTEX, MARROW * 1.1, 1.5, -sd * 0.45)
        sv = _bump(zs, 0.65, 0.15)   # seminal vesicles, between bladder and rectum
        paint(sd * 0.07, P["pr_cy"] + 0.04, 0.06 * sv, 0.022 * sv, FLUID * 0.7, -sd * 0.3)
    # sacrum / coccyx posteriorly, larger cranially
    sac = _bump(zs, 1.05, 0.45)
    ringed(0, 0.30, 0.05 + 0.08 * sac, 0.035 * (0.5 + sac), CORTEX, MARROW, 1.5)
    # bladder: fluid, dark wall; grows cranially and with the week's filling
    sb = P["fill"] * W["fill"] * _bump(zs, 0.95, 0.4)
    ringed(0, P["bl_cy"], P["bl_a"] * sb, P["bl_b"] * sb, WALL, FLUID, 2.0)
    # prostate: bright peripheral zone posteriorly, intermediate transition zone, dark capsule
    sp = _bump(zs, 0.3, 0.3)
    pa, pb, pc = P["pr_a"] * sp, P["pr_b"] * sp, P["pr_cy"]
    ringed(0, pc, pa, pb, WALL, 560.0, 1.0)
    paint(0, pc - 0.3 * pb, 0.75 * pa, 0.6 * pb, 380.0)
    # rectum: muscular wall, mucosa/content, anterior air pocket (patient supine)
    ra, rb, rc = P["re_a"], P["re_b"], P["re_cy"]
    ringed(0, rc, ra - 3 * PIX, rb - 3 * PIX, WALL, 430.0, 3.0)
    air = W["air_amp"] * (0.5 + 0.5 * np.sin(2 * np.pi * (1.3 * z + W["air_phase"]))) ** 2
    paint(0, rc - 0.3 * rb, 0.65 * ra * air, 0.45 * rb * air, AIR)

    # smooth tissue texture (+-5%) slowly evolving with z, and a low-order coil bias field
    phase = 2 * np.pi * P["tex_f"] * z
    tex = bases[0] @ (P["tex"][0] * math.cos(phase) + P["tex"][1] * math.sin(phase)) @ bases[1].T
    bias = poly[0] @ W["bias"] @ poly[1].T
    field = P["gain"] * (1 + 0.05 * tex / np.abs(tex).max()) * (1 + W["bias_amp"] * bias / np.abs(bias).max())
    img *= field.astype(np.float32)
    # Rician noise: magnitude of complex signal with gaussian noise in both channels
    rng = np.random.default_rng(np.random.SeedSequence([seed, case, week, slice_idx]))
    sigma = rng.uniform(0.006, 0.008) * float(img.max())
    noise = rng.standard_normal((2,) + img.shape, dtype=np.float32) * sigma
    return np.hypot(img + noise[0], noise[1]).astype(np.float64)


def _plan(split, n, seed):
    """(case, week, slice, n_slices_in_week) for n slices spread evenly over the split's cases."""
    cases = list(SPLIT_CASES[split])
    for i, case in enumerate(cases):
        n_case = n // len(cases) + (i < n % len(cases))
        n_weeks = max(1, min(n_case, _patient(seed, case)["n_weeks"]))
        for week in range(n_weeks):
            n_week = n_case // n_weeks + (week < n_case % n_weeks)
            for k in range(n_week):
                yield case, week, k, n_week


def _write_one(item):
    path, case, week, k, n_week, seed = item
    # deterministic file-format mix so loaders get exercised: 10% wide, 10% 3D, 20% int16
    kind = int(np.random.SeedSequence([seed, case, week, k, 1]).generate_state(1)[0] % 10)
    data = phantom_slice(case, week, k, n_week, width=144 if kind == 0 else 128, seed=seed)
    if kind in (2, 3):
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    else:
        data = data.astype(np.float32)
        if kind == 1:
            data = data[..., None]
    img = nib.Nifti1Image(data, np.diag(list(VOXEL_MM) + [1.0]))
    img.set_data_dtype(data.dtype)
    nib.save(img, path)


def write_phantom(root, n_per_split={"train": 640, "validate": 80, "test": 60}, seed=0, progress=False) -> None:
    """Writes root/keras_slices_{train,validate,test}/case_XXX_week_N_slice_K.nii.gz (XXX zero-padded to 3 digits),
    in parallel over the machine's cores."""
    items = []
    for split, n in n_per_split.items():
        out = os.path.join(root, f"keras_slices_{split}")
        os.makedirs(out, exist_ok=True)
        items += [(os.path.join(out, f"case_{case:03d}_week_{week}_slice_{k}.nii.gz"), case, week, k, n_week, seed)
                  for case, week, k, n_week in _plan(split, n, seed)]
    from tqdm import tqdm
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        for _ in tqdm(pool.imap_unordered(_write_one, items, chunksize=32), total=len(items), disable=not progress,
                      desc="phantom"):
            pass
