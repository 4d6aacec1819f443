"""Synthetic 2D T2-weighted axial pelvic MRI phantom (embedded demo data for the VQ-VAE project), with organ labels.

Slices are stored transposed: axis 0 (256) runs left-right, axis 1 (128, or 144 for a wider field of view) runs
anterior (index 0) to posterior, so ``plt.imshow(img.T)`` shows a wide axial slice with the pubis at the top.
Everything is a deterministic function of the ints (seed, case, week, slice): anatomy and tissue texture from
(seed, case), patient set-up (zoom, shift, rotation, scan range), bladder filling, rectal content and coil shading
from (seed, case, week), and noise from all four.  The slice index runs caudal (0: below the prostate apex) to
cranial (n_slices - 1: bladder dome, acetabular roof).

What makes it look like a T2-weighted turbo spin echo without fat suppression: bright lobular fat with thin dark
septa, dark striated muscle with a fibre direction per muscle, very bright urine in a thin-walled bladder, a
prostate with a bright peripheral zone around a darker nodular central gland, a layered rectal wall that may hold
gas, bone as a dark cortex around textured fatty marrow, partial-volume edges, phased-array shading (brighter near
the anterior and posterior coils) and Rician noise at a clinical SNR.  Textures are per-patient random fields that
evolve smoothly with the slice position; only the noise is drawn per slice.

Labels (the study's convention): 0 background, 1 body, 2 bone, 3 bladder, 4 rectum, 5 prostate.  A pixel takes a
structure's label where that structure's soft edge is past half-way (the blend weight that paints it > 0.5), later
structures overwriting earlier ones, so labels line up with what the image shows.

Run ``python phantom.py --figure=assets/phantom.png`` for a figure of demo slices beside their label maps.
"""
import argparse
import functools
import math
import multiprocessing
import os

import nibabel as nib
import numpy as np

SPLIT_CASES = {"train": range(4, 36), "validate": range(36, 40), "test": range(40, 43)}
N_LR = 256
W_MAX = 144                           # widest field of view; narrower slices are its centre rows
PIX = 2.0 / N_LR                      # pixel size in normalised units; x spans [-1, 1)
VOXEL_MM = (1.6, 1.6, 3.0)            # matches a ~38 cm wide pelvis filling ~80% of x
EDGE = 1.2                            # edge ramp width in pixels (partial volume / anti-aliasing)
LABELS = ("background", "body", "bone", "bladder", "rectum", "prostate")
BODY, BONE, BLADDER, RECTUM, PROSTATE = 1, 2, 3, 4, 5
# T2 intensities in arbitrary scanner units before coil shading (fat and fluid bright, muscle dark)
FAT, MUSCLE, URINE, CORTEX, MARROW = 800.0, 200.0, 1250.0, 25.0, 680.0
END_FRACTION, CONSTANT_FRACTION = 0.03, 0.01  # share of near-empty and of all-zero slices at the ends of a scan


def _rng(*key):
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in key]))


@functools.lru_cache(maxsize=None)
def _grid(width):
    """Coordinate vectors (float32) and the row offset of this width inside the W_MAX-wide texture fields."""
    xd = (np.arange(N_LR) - (N_LR - 1) / 2) * PIX
    yd = (np.arange(width) - (width - 1) / 2) * PIX
    return xd.astype(np.float32), yd.astype(np.float32), (W_MAX - width) // 2


# texture field kinds: 0 fat lobules, 1 organ parenchyma / nodules, 2 marrow trabeculae (isotropic band-pass),
# 3-6 muscle fibres striated along 0, 45, 90, 135 degrees (anisotropic), 7 a smooth warp of all outlines
_N_TEX, _K = 8, 2  # field kinds; complex fields per kind (their real and imaginary parts evolve along z)
_Z_RATE = np.array([1, 1, 1, 1, 1, 1, 1, 0.35])  # the outline warp changes more slowly along z than textures


@functools.lru_cache(maxsize=1)
def _filters():
    fx, fy = np.fft.fftfreq(N_LR)[:, None], np.fft.fftfreq(W_MAX)[None, :]
    k = np.hypot(fx, fy)
    out = [np.exp(-0.5 * ((k - 1 / 22) / 0.015) ** 2),     # fat lobules ~ 10 px (1.6 cm) across
           np.exp(-0.5 * ((k - 1 / 11) / 0.035) ** 2),     # parenchyma / nodules
           np.exp(-0.5 * ((k - 1 / 6) / 0.06) ** 2)]       # marrow
    for o in range(4):
        th = o * math.pi / 4
        along, across = fx * math.cos(th) + fy * math.sin(th), fy * math.cos(th) - fx * math.sin(th)
        out.append(np.exp(-0.5 * (along / 0.012) ** 2 - 0.5 * ((np.abs(across) - 0.16) / 0.08) ** 2))
    out.append(np.exp(-0.5 * (k / 0.025) ** 2) * (k > 0))  # smooth warp that makes outlines irregular
    return np.stack(out)


@functools.lru_cache(maxsize=8)
def _textures(seed, case):
    """Per-patient texture fields, unit variance: (re, im) float32 (K, 8, 256, W_MAX) plus z-frequencies and phases.
    A kind's field at position z is sum_k re_k cos(w_k z + p_k) + im_k sin(w_k z + p_k), over sqrt(K): a stationary
    random field in z too, so textures morph smoothly from slice to slice."""
    r = _rng(seed, case, 7)
    filt = _filters()
    shape = (_K,) + filt.shape
    spec = (r.standard_normal(shape, dtype=np.float32) + 1j * r.standard_normal(shape, dtype=np.float32)) * filt
    f = np.fft.ifft2(spec)
    f /= np.sqrt(np.mean(np.abs(f) ** 2, axis=(-2, -1), keepdims=True) / 2)
    return (f.real.astype(np.float32), f.imag.astype(np.float32),
            r.uniform(9, 20, (_K, _N_TEX)) * _Z_RATE, r.uniform(0, 2 * math.pi, (_K, _N_TEX)))


@functools.lru_cache(maxsize=4096)
def _patient(seed, case):
    """Per-patient anatomy: sizes/positions that stay fixed across that patient's scans."""
    r = _rng(seed, case)
    u = r.uniform
    obese = float(r.beta(2.0, 2.5))
    pr_a = u(0.10, 0.16)                             # prostate half-width: small gland to marked BPH
    p = dict(zoom=u(0.87, 1.15), aspect=u(0.94, 1.06), obese=obese,
             body_a=u(0.80, 0.88), body_b=u(0.37, 0.42), body_cy=u(-0.02, 0.01),
             fat=0.035 + 0.09 * obese, fat_ant=u(1.0, 1.6), fat_post=u(0.8, 1.2),
             glut=u(0.9, 1.1), mus=u(0.85, 1.15),
             fem_cx=u(0.44, 0.50), fem_cy=u(-0.09, -0.04), fem_r=u(0.105, 0.125), fem_z=u(0.38, 0.46),
             fem_asym=u(-0.015, 0.015),
             pr_a=pr_a, pr_b=pr_a * u(0.68, 0.82), pr_gap=u(0.065, 0.095), pr_z0=u(0.10, 0.15),
             pr_h=u(0.28, 0.36) * (pr_a / 0.11) ** 0.4, tz=u(0.55, 0.75) + 1.5 * (pr_a - 0.10),
             bl_a=u(0.18, 0.26), bl_b=u(0.11, 0.15), bl_h=u(0.45, 0.65),
             re_a=u(0.065, 0.09), re_b=u(0.045, 0.06), sac_y=u(0.25, 0.30),
             sym_y=u(-0.33, -0.29), n_weeks=int(r.integers(3, 7)))
    p["tz"] = min(p["tz"], 0.8)
    # a few bowel loops (sigmoid / small bowel) in the upper pelvis: (x, y, z, radius)
    p["loops"] = tuple((float(r.choice([-1, 1]) * u(0.08, 0.22)), u(-0.22, 0.0), u(0.8, 1.2), u(0.04, 0.07))
                       for _ in range(int(r.integers(1, 4))))
    p["pr_z1"] = p["pr_z0"] + p["pr_h"]
    p["pr_cy"] = p["sym_y"] + p["pr_gap"] + p["pr_b"]   # just behind the symphysis
    return p


@functools.lru_cache(maxsize=4096)
def _week(seed, case, week):
    """Per-fraction changes: set-up (zoom/field of view, shift, rotation, scan range), bladder filling, rectal
    distension and gas, coil shading, receiver gain and noise level."""
    r = _rng(seed, case, week)
    u = r.uniform
    return dict(zoom=u(0.96, 1.04), dx=float(np.clip(r.normal(0, 0.02), -0.05, 0.05)),
                dy=float(np.clip(r.normal(0, 0.015), -0.035, 0.035)),
                theta=float(np.clip(r.normal(0, 0.025), -0.06, 0.06)),
                zshift=float(np.clip(r.normal(0, 0.035), -0.08, 0.08)), fill=u(0.45, 1.15),
                dist=u(0.8, 1.35), gas=float(u(-0.6, 1.0)), gas_phase=u(0, 1), content=u(0.35, 0.9),
                bias=r.standard_normal((3, 3)), bias_amp=u(0.06, 0.14), coil=u(0.35, 0.75), coil_y=u(-0.05, 0.05),
                gain=u(0.8, 1.2), sigma=u(0.02, 0.035))


def _prof(z, z0, z1, cut=0.0):
    """Ellipsoid-like size profile: 0 outside (z0, z1), 1 in the middle, sqrt falloff to the ends; 0 below `cut`
    so that structures appear at a realistic size rather than as a speck."""
    if z1 <= z0:
        return 0.0
    t = (2 * z - z0 - z1) / (z1 - z0)
    s = math.sqrt(max(0.0, 1 - t * t))
    return s if s > cut else 0.0


def _step(z, z0, z1):
    """Smooth 0 -> 1 as z goes from z0 to z1."""
    t = min(1.0, max(0.0, (z - z0) / (z1 - z0)))
    return t * t * (3 - 2 * t)


def scan_end_kind(seed, case, week, slice_idx, n_slices):
    """0 an ordinary slice, 1 a near-empty slice at an end of the scan (a sliver of body, or noise only), 2 an
    all-zero slice (scanner padding).  About END_FRACTION and CONSTANT_FRACTION of a long scan's slices, always the
    outermost ones, deterministic in (seed, case, week, n_slices)."""
    r = _rng(seed, case, week, n_slices, 11)
    u = r.uniform(size=4)
    rate = (END_FRACTION + CONSTANT_FRACTION) / 2                # per end of the scan
    ends = []
    for e in range(2):
        m = int(rate * n_slices + u[e])                           # slices past the body's coverage at this end
        ends.append((m, int(CONSTANT_FRACTION / (END_FRACTION + CONSTANT_FRACTION) * m + u[2 + e])))
    if ends[0][0] + ends[1][0] > n_slices // 2:                  # a short scan keeps most of its slices
        return 0
    for depth, (m, blank) in zip((slice_idx, n_slices - 1 - slice_idx), ends):
        if depth < m:
            return 2 if depth < blank else 1
    return 0


def phantom_slice(case: int, week: int, slice_idx: int, n_slices: int, width: int = 128, seed: int = 0,
                  labels: bool = False, scan_ends: bool = False):
    """float64 array of shape (256, width), raw 'scanner' intensities (roughly 0..~1500, Rician noise background).
    labels=True returns (image, uint8 labels of the same shape).  scan_ends=True makes the outermost slices of a
    scan near-empty or all zero as scan_end_kind says (write_phantom does this); by default every slice is an
    ordinary one."""
    end = scan_end_kind(seed, case, week, slice_idx, n_slices) if scan_ends else 0
    if end == 2:
        img = np.zeros((N_LR, width))
        return (img, np.zeros((N_LR, width), np.uint8)) if labels else img
    x, y, row0 = _grid(width)
    P, W = _patient(seed, case), _week(seed, case, week)
    z = (slice_idx + 0.5) / max(n_slices, 1)  # 0 = caudal (below the prostate apex), 1 = cranial
    zs = z + W["zshift"]
    img = np.zeros((N_LR, width), np.float32)
    lab = np.zeros((N_LR, width), np.uint8)
    zoom = P["zoom"] * W["zoom"]
    sx, sy = zoom, zoom * P["aspect"]
    ct, st = math.cos(W["theta"]), math.sin(W["theta"])
    x0, y0 = (N_LR - 1) / 2, (width - 1) / 2              # pixel index of the origin

    # ---- textures: per-patient fields combined at this z, each computed at most once per slice
    re, im, om, ph = _textures(seed, case)
    cache = {}

    def field(kind):
        if kind not in cache:
            f = np.zeros((N_LR, width), np.float32)
            for k in range(_K):
                a = om[k, kind] * zs + ph[k, kind]
                f += re[k, kind, :, row0:row0 + width] * float(math.cos(a) / math.sqrt(_K))
                f += im[k, kind, :, row0:row0 + width] * float(math.sin(a) / math.sqrt(_K))
            cache[kind] = f
        return cache[kind]

    def tissue(name):
        if name not in cache:
            if name == "fat":     # bright lobules separated by thin dark septa (zero lines of a band-pass field)
                f = field(0)
                t = FAT * (1 + 0.05 * field(1) - 0.3 * np.exp(-(f * f) * 60.0))
            elif name == "marrow":  # fatty marrow, mottled by trabeculae
                t = MARROW * (1 + 0.13 * field(2) + 0.06 * field(1))
            elif name == "tz":      # nodular central gland (BPH)
                g = field(1)
                t = 300.0 * (1 + 0.22 * g + 0.25 * np.maximum(g - 0.8, 0))
            elif name == "plane":   # thin, partial-volumed fat planes between muscles: irregular brightness
                t = FAT * (0.45 + 0.35 * np.clip(field(1), -1, 1))
            elif name == "pz":
                t = 660.0 * (1 + 0.06 * field(1) - 0.1 * np.exp(-field(2) ** 2 * 8))
            elif name == "sv":      # convoluted fluid-filled tubules
                t = 880.0 * (1 - 0.55 * np.exp(-field(2) ** 2 * 6))
            elif name == "content":  # rectal content: mixed faeces and fluid
                t = 700.0 * W["content"] * (1 + 0.3 * field(1))
            else:                   # muscle with fibre orientation index name[1]
                f = field(3 + int(name[1]))
                t = MUSCLE * (1 + 0.06 * f + 0.6 * np.maximum(f - 1.9, 0)) * (1 + 0.05 * field(1))
            cache[name] = t.astype(np.float32)
        return cache[name]

    def muscle(angle):
        """Muscle texture with fibres along `angle` (body frame, radians, 0 = left-right)."""
        return tissue("m%d" % (round((angle + W["theta"]) / (math.pi / 4)) % 4))

    def paint(cx, cy, a, b, value, label=None, angle=0.0, rim=None, thick=0.0, p=2, warp=0.6):
        """Blend a soft-edged ellipse (p=2) or superellipse (p=3) into img, optionally with a rim `thick` px
        wide (bone cortex, bowel wall, capsule, fat plane), computing only its bounding box.  value/rim are
        numbers or full-slice texture arrays.  label (if given) goes where the outer blend weight is > 0.5.
        warp: amplitude (in edge widths) of a smooth random displacement of the outline, shared by all structures
        so that neighbours deform together."""
        a, b = a * sx, b * sy
        if min(a, b) < 0.5 * PIX:
            return
        # patient pose moves and scales the structure centres rather than the grid, so boxes stay axis-aligned
        cx, cy = sx * cx, sy * cy
        cx, cy, angle = ct * cx - st * cy + W["dx"], st * cx + ct * cy + W["dy"], angle + W["theta"]
        c, s = math.cos(angle), math.sin(angle)
        pad = (thick + 2.5 + 3.5 * EDGE * warp) * PIX   # the warp field rarely exceeds 3.5 (unit variance)
        if p == 2:
            ex, ey = math.hypot(a * c, b * s) + pad, math.hypot(a * s, b * c) + pad  # exact extents
        else:
            ex = ey = max(a, b) + pad
        i0, i1 = max(0, math.ceil((cx - ex) / PIX + x0)), min(N_LR, math.ceil((cx + ex) / PIX + x0))
        j0, j1 = max(0, math.ceil((cy - ey) / PIX + y0)), min(width, math.ceil((cy + ey) / PIX + y0))
        if i0 >= i1 or j0 >= j1:
            return
        dx, dy = x[i0:i1, None] - cx, y[None, j0:j1] - cy
        u, v = (c / a) * dx + (s / a) * dy, (c / b) * dy - (s / b) * dx
        uu, vv = u * u, v * v
        k = PIX * EDGE
        if p == 2:   # signed distance ~ (q - 1) / |grad q|, q = u^2 + v^2, in units of the edge ramp width
            dist = (uu + vv - 1) / np.sqrt(uu * (2 * k / a) ** 2 + vv * (2 * k / b) ** 2 + 1e-12)
        else:        # the same with q = |u|^3 + |v|^3: a rounded rectangle
            au, av = np.abs(u), np.abs(v)
            dist = (uu * au + vv * av - 1) / np.sqrt(uu * uu * (3 * k / a) ** 2 + vv * vv * (3 * k / b) ** 2 + 1e-12)
        if warp:
            dist += warp_field[i0:i1, j0:j1] * np.float32(warp)
        sub = img[i0:i1, j0:j1]
        passes = ((rim, thick / EDGE), (value, 0.0)) if rim is not None else ((value, 0.0),)
        for val, off in passes:
            t = np.clip((0.5 + off) - dist, 0, 1)
            if isinstance(val, np.ndarray):
                val = val[i0:i1, j0:j1]
            sub += t * t * (3 - 2 * t) * (val - sub)   # smoothstep: a cheap polynomial sigmoid
        if label is not None:
            lab[i0:i1, j0:j1][dist < passes[0][1]] = label

    def ring(cx, cy, a, b, rim, inner, thick, label=None, angle=0.0, p=2, warp=0.6):
        paint(cx, cy, a, b, inner, label, angle, rim, thick, p, warp)

    warp_field = field(7)

    fat, plane = tissue("fat"), tissue("plane")
    A, B, bcy = P["body_a"], P["body_b"], P["body_cy"]
    F = P["fat"]
    fa, fp = F * P["fat_ant"], F * P["fat_post"]
    fx_, fy_, fr, zh, m = P["fem_cx"], P["fem_cy"], P["fem_r"], P["fem_z"], P["mus"]
    pr_cy, pr_b, pr_z0, pr_z1 = P["pr_cy"], P["pr_b"], P["pr_z0"], P["pr_z1"]
    re_y = pr_cy + pr_b + P["re_b"] + 0.015 + 0.10 * _step(zs, 0.45, 1.1)   # follows the sacral curve cranially
    # ---- body outline (a rounded-rectangle trunk plus the buttocks), all subcutaneous fat
    paint(0, bcy, A, B, fat, BODY, p=3, warp=1.0)
    for sd in (-1, 1):
        paint(sd * 0.36 * A, bcy + 0.45 * B, 0.52 * A, 0.62 * B, fat, BODY, sd * 0.12, warp=1.0)
    paint(0, bcy + B + 0.03, 0.02, 0.08, 0.0, 0)                       # natal cleft
    # ---- deep compartment: muscle under the subcutaneous fat, split into groups by thin fat planes
    paint(0, bcy + (fa - fp) / 2, A - F, B - (fa + fp) / 2, muscle(0.0), BODY, p=3, warp=1.5)
    for sd in (-1, 1):
        paint(sd * 0.36 * A, bcy + 0.45 * B, 0.52 * A - fp, 0.62 * B - fp, muscle(sd * 0.6), BODY, sd * 0.12, warp=1.5)
    for sd in (-1, 1):
        fxs = fx_ + sd * P["fem_asym"]
        # gluteus maximus: big, posterolateral, fibres running obliquely
        ring(sd * 0.43 * A, bcy + 0.5 * B + 0.02, 0.33 * A * P["glut"], 0.55 * B * P["glut"], plane, muscle(sd * 0.6),
             1.3, BODY, sd * 0.5)
        # lateral group: gluteus medius/minimus cranially, vastus lateralis caudally
        ring(sd * (fxs + 0.17), fy_ + 0.03, 0.085 * m, 0.15 * m, plane, muscle(sd * 1.5), 1.2, BODY, sd * 0.25)
        # hip flexors: iliopsoas in front of the femoral head, sartorius / rectus femoris, tensor fasciae latae
        ring(sd * (fxs - 0.03), fy_ - 0.185, 0.10 * m, 0.065 * m, plane, muscle(sd * 0.3), 1.3, BODY, sd * 0.2)
        ring(sd * (fxs + 0.12), fy_ - 0.23, 0.07 * m, 0.05 * m, plane, muscle(0.0), 1.2, BODY, sd * 0.3)
        ring(sd * (fxs + 0.25), fy_ - 0.13, 0.055 * m, 0.05 * m, plane, muscle(sd * 0.9), 1.2, BODY, sd * 0.7)
        # pectineus / adductors and obturator externus caudally, quadratus femoris behind the femoral neck
        cd = _prof(zs, -0.4, zh + 0.05, 0.3)
        ring(sd * (fxs - 0.21), fy_ - 0.13, 0.09 * cd, 0.06 * cd, plane, muscle(sd * 0.8), 1.2, BODY, sd * 0.5)
        ring(sd * (fxs - 0.11), fy_ - 0.03, 0.075 * cd, 0.045 * cd, plane, muscle(sd * 0.2), 1.2, BODY, -sd * 0.3)
        qf = _prof(zs, -0.2, zh - 0.05, 0.3)
        ring(sd * (fxs - 0.01), fy_ + 0.15, 0.09 * qf, 0.035 * qf, plane, muscle(0.0), 1.2, BODY, -sd * 0.2)
        # femoral vessels in their fat pad, anteromedial to the hip
        paint(sd * (fxs - 0.155), fy_ - 0.215, 0.055, 0.035, fat, BODY)
        paint(sd * (fxs - 0.13), fy_ - 0.215, 0.02, 0.02, 60.0, BODY, warp=0)   # artery: flow void
        paint(sd * (fxs - 0.18), fy_ - 0.21, 0.025, 0.022, 430.0, BODY, warp=0)  # vein: slow flow
    # prevesical / suprapubic fat in the midline, rectus abdominis above the symphysis
    paint(0, bcy - B + fa + 0.06, 0.17, 0.11, fat, BODY)
    ra = _step(zs, 0.35, 0.55)
    for sd in (-1, 1):
        ring(sd * 0.065, bcy - B + fa + 0.012, 0.06 * ra, 0.02 * ra, plane, muscle(0), 1.0, BODY)
    # ---- pelvic cavity: fat around the organs (narrow between the ischial tuberosities caudally)
    cw = 0.19 + 0.09 * _step(zs, 0.1, 0.7)
    cfy = (pr_cy + re_y) / 2 + 0.03
    paint(0, cfy, cw, 0.26, fat, BODY)
    oi = _prof(zs, -0.05, zh + 0.25, 0.3)           # obturator internus lining the side walls
    for sd in (-1, 1):
        ring(sd * (cw - 0.01), cfy + 0.02, 0.035 * oi, 0.16 * oi, plane, muscle(sd * 1.57), 1.2, BODY, sd * 0.12)
    # pelvic floor: levator ani sling around prostate and rectum (open anteriorly), ischioanal fat outside it
    la = _prof(zs, -0.15, pr_z1 + 0.06, 0.3)
    if la:
        lb = (re_y - pr_cy) / 2 + P["re_b"] + 0.035
        ring(0, (pr_cy + re_y) / 2 + 0.01, max(P["pr_a"], P["re_a"]) * la + 0.045, lb, muscle(1.57), fat, 1.4, BODY,
             warp=1.0)
        paint(0, pr_cy - lb * 0.5, max(P["pr_a"], P["re_a"]) * la + 0.07, lb * 0.55, fat, BODY)
    # ---- bones: dark cortex around fatty marrow
    marrow = tissue("marrow")
    for sd in (-1, 1):
        fxs = fx_ + sd * P["fem_asym"]
        # acetabulum cupping the femoral head; ilium above it
        il = _step(zs, zh + 0.05, zh + 0.3)
        ac = _step(zs, zh - 0.14, zh - 0.02) * (1 - 0.5 * il)   # grows from below, merges into the ilium
        if ac > 0.2:
            ring(sd * (fxs - 0.06 - 0.03 * il), fy_, (fr * 0.7 + 0.05) * ac, (fr * 0.85 + 0.04) * ac, CORTEX, marrow,
                 1.6, BONE)
        if il:
            ring(sd * (fxs - 0.12 + 0.03 * il), fy_ + 0.10 - 0.02 * il, 0.06 + 0.10 * il, 0.045 + 0.01 * il,
                 CORTEX, marrow, 1.6, BONE, sd * (-1.0 + 0.3 * il))
        # ischium (posterior column) down to the ischial tuberosity
        isc = _prof(zs, -0.15, zh + 0.08, 0.3)
        if isc:
            ty = 0.12 + 0.05 * (1 - _step(zs, 0.0, zh))
            ring(sd * (fxs - 0.12), fy_ + ty, 0.045 * isc + 0.01, 0.085 * isc, CORTEX, marrow, 1.6, BONE, -sd * 0.35)
        # pubis: superior ramus towards the acetabulum, body at the symphysis, inferior ramus caudally
        sr = _prof(zs, zh - 0.16, zh + 0.05, 0.25)
        if sr:
            ring(sd * (0.24 + 0.04 * (1 - sr)), (P["sym_y"] + fy_) / 2 - 0.04, 0.16 * (0.4 + 0.6 * sr), 0.035 * sr,
                 CORTEX, marrow, 1.5, BONE, -sd * 0.4)
        sym = _prof(zs, 0.0, zh, 0.3)
        if sym:
            ring(sd * 0.05, P["sym_y"], 0.04 * sym, 0.06 * sym, CORTEX, marrow, 1.5, BONE, -sd * 0.25)
        ir = _prof(zs, -0.2, 0.2, 0.3)
        if ir:
            ring(sd * 0.15, P["sym_y"] + 0.09, 0.10, 0.03 * ir + 0.005, CORTEX, marrow, 1.5, BONE, sd * 0.9)
        # femur: head (a sphere), neck and greater trochanter below its centre, shaft further down
        rh = fr * _prof(zs, zh - 0.15, zh + 0.15)
        # proximal femur: round shaft with a thick cortex, widening into the greater trochanter, which gives way to
        # the neck and head above
        t = _step(zs, zh - 0.34, zh - 0.12)
        fade = 1 - _step(zs, zh - 0.12, zh + 0.02)
        if fade > 0.3:
            s = 0.3 + 0.7 * fade
            ring(sd * (fxs + 0.09 + 0.05 * t), fy_ + 0.03 + 0.02 * t, (0.06 + 0.05 * t) * s, (0.06 + 0.02 * t) * s,
                 CORTEX, marrow, 4.0 - 2.2 * t, BONE, sd * 0.35 * t)
        nk = _step(zs, zh - 0.22, zh - 0.1) * (1 - _step(zs, zh - 0.06, zh + 0.02))
        if nk > 0.2:
            ring(sd * (fxs + 0.06), fy_ + 0.015, 0.1 * nk + 0.02, 0.045 * (0.5 + 0.5 * nk), CORTEX, marrow, 1.8,
                 BONE, sd * 0.3)
        if rh > 0.3 * fr:
            paint(sd * fxs, fy_, rh + 2.5 * PIX, rh + 2.5 * PIX, 330.0, BODY)       # joint cartilage / fluid
            ring(sd * fxs, fy_, rh, rh, CORTEX, marrow, 1.6, BONE)
    if _prof(zs, 0.0, zh, 0.3):
        paint(0, P["sym_y"], 0.01, 0.04, 260.0, BODY)                            # symphyseal disc
    sac = _step(zs, 0.45, 1.1)                                                   # coccyx, then sacrum cranially
    if zs > 0.3:
        ring(0, P["sac_y"] + 0.05 * sac, 0.03 + 0.16 * sac, 0.03 + 0.035 * sac, CORTEX, marrow, 1.6, BONE)
    # ---- bowel loops cranially (sigmoid / small bowel): dark wall, intermediate content
    for lx, ly, lz, lr in P["loops"]:
        s = _prof(zs, lz - 0.15, lz + 0.15, 0.4)
        if s:
            ring(lx, ly, lr * s, lr * s * 0.8, 160.0, tissue("content") * 0.8, 1.5, BODY)
    # ---- bladder: very bright urine, thin dark wall; its height grows with the week's filling
    fill = W["fill"]
    bz0 = pr_z1 - 0.015                              # the bladder neck sits on the prostate base
    sb = _prof(zs, bz0 - 0.03, bz0 + P["bl_h"] * (0.6 + 0.6 * fill), 0.35)
    bl_y = pr_cy - 0.03 - 0.05 * fill * _step(zs, bz0, bz0 + 0.3)
    sv = _prof(zs, pr_z1 - 0.05, pr_z1 + 0.13, 0.4)   # seminal vesicles between bladder base and rectum
    if sv:
        for sd in (-1, 1):
            ring(sd * 0.075, re_y - P["re_b"] - 0.025, 0.075 * sv, 0.022 * sv, 200.0, tissue("sv"), 1.0, BODY,
                 -sd * 0.35)
    if sb:
        ba, bb = P["bl_a"] * (0.7 + 0.35 * fill) * sb, P["bl_b"] * (0.7 + 0.35 * fill) * sb
        ring(0, bl_y - 0.3 * (1 - sb) * bb, ba, bb, 170.0, URINE, 1.4, BLADDER, 0.0, p=3 if fill > 0.9 else 2)
    # ---- rectum: mesorectal fat, layered wall (dark muscularis, bright submucosa, dark mucosa), content and gas
    if _prof(zs, -0.15, 1.25):
        dist = W["dist"] * (0.75 + 0.25 * _step(zs, 0.1, pr_z0 + 0.1))
        ra_, rb_ = P["re_a"] * dist, P["re_b"] * dist
        ring(0, re_y, ra_ + 0.04, rb_ + 0.035, plane, fat, 0.8, BODY, warp=1.5)   # mesorectal fascia
        ring(0, re_y, ra_, rb_, 150.0, 400.0 * (1 + 0.1 * field(1)), 2.0, RECTUM, warp=1.0)
        w = 3.2 * PIX
        # lumen: a slit when collapsed, round when distended, lined by darker mucosa
        la_, lb_ = ra_ - w, (rb_ - w) * min(1.0, 0.35 + 0.6 * (W["dist"] - 0.8) / 0.55)
        ring(0, re_y, la_, lb_, 230.0, tissue("content"), 1.2, warp=1.0)
        gas = W["gas"] + 0.5 * math.sin(2 * math.pi * (2.1 * zs + W["gas_phase"]))
        if gas > 0.2:
            gs = min(1.0, gas - 0.2) ** 0.5
            paint(0, re_y - 0.3 * lb_, (la_ - 1.5 * PIX) * 0.85 * gs, (lb_ - 1.5 * PIX) * 0.65 * gs, 0.0)
    # ---- prostate: dark capsule, bright peripheral zone, darker nodular central gland anteriorly
    sp = _prof(zs, pr_z0, pr_z1, 0.45)
    if sp:
        pa, pb = P["pr_a"] * sp, P["pr_b"] * sp
        for sd in (-1, 1):   # periprostatic venous plexus (bright) and neurovascular bundles
            paint(sd * (pa * 0.8), pr_cy - pb * 0.6, 0.018, 0.012, 620.0, BODY)
            paint(sd * (pa * 0.7), pr_cy + pb * 0.85, 0.012, 0.012, 150.0, BODY)
        ring(0, pr_cy, pa, pb, 150.0, tissue("pz"), 1.2, PROSTATE)
        tzs = P["tz"] * (0.8 + 0.2 * _step(zs, pr_z0, pr_z1))
        paint(0, pr_cy - 0.15 * pb, pa * tzs, pb * tzs * 0.95, tissue("tz"))     # inside the capsule
        paint(0, pr_cy - 0.72 * pb, 0.45 * pa, 0.2 * pb, 190.0)                  # anterior fibromuscular stroma

    # ---- coil shading: brighter near the anterior and posterior coils, plus a smooth random bias field
    xn, yn = x, (y - W["coil_y"]) / 0.45
    bias_poly = (np.stack([np.ones_like(x), x, x * x - 0.35], 1) @ W["bias"].astype(np.float32)
                 @ np.stack([np.ones_like(y), yn, yn * yn - 0.35], 0))
    bias_poly *= W["bias_amp"] / float(np.abs(bias_poly).max())
    shade = (1 + W["coil"] * yn[None, :] ** 2 + 0.15 * W["coil"] * xn[:, None] ** 2) / (1 + 0.4 * W["coil"])
    img *= (W["gain"] * shade * (1 + bias_poly)).astype(np.float32)
    rng = _rng(seed, case, week, slice_idx, n_slices)
    if end == 1:   # beyond the body's coverage: a sliver of body near a coil, or noise only
        e = rng.uniform(size=3)
        if e[0] < 0.5:
            img[:] = 0
            lab[:] = 0
        else:
            ys = (y - W["dy"]) / sy if e[1] < 0.6 else -(y - W["dy"]) / sy   # anterior or posterior sliver
            edge = -(B - bcy) if e[1] < 0.6 else -(B + bcy + 0.07)
            m = np.clip((edge + (0.03 + 0.07 * e[2]) - ys) / (6 * PIX), 0, 1).astype(np.float32)
            img *= m[None, :] * (0.4 + 0.6 * e[2])
            lab[:, m <= 0.5] = 0
    # Rician noise: magnitude of complex signal with gaussian noise in both channels
    sigma = W["sigma"] * FAT * W["gain"] * rng.uniform(0.9, 1.1)
    noise = rng.standard_normal((2,) + img.shape, dtype=np.float32) * np.float32(sigma)
    out = np.hypot(img + noise[0], noise[1]).astype(np.float64)
    return (out, lab) if labels else out


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
    path, seg_path, case, week, k, n_week, seed = item
    # deterministic file-format mix so loaders get exercised: 10% wide, 10% 3D, 20% int16
    kind = int(np.random.SeedSequence([seed, case, week, k, 1]).generate_state(1)[0] % 10)
    data, seg = phantom_slice(case, week, k, n_week, width=144 if kind == 0 else 128, seed=seed, labels=True,
                              scan_ends=True)
    if kind in (2, 3):
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    else:
        data = data.astype(np.float32)
        if kind == 1:
            data, seg = data[..., None], seg[..., None]
    affine = np.diag(list(VOXEL_MM) + [1.0])
    for arr, p in ((data, path), (seg, seg_path)):
        img = nib.Nifti1Image(arr, affine)
        img.set_data_dtype(arr.dtype)
        nib.save(img, p)


def write_phantom(root, n_per_split={"train": 640, "validate": 80, "test": 60}, seed=0, progress=False) -> None:
    """Writes root/keras_slices_{train,validate,test}/case_XXX_week_N_slice_K.nii.gz (XXX zero-padded to 3 digits)
    and their label maps root/keras_slices_seg_{split}/seg_XXX_week_N_slice_K.nii.gz (uint8, same shape and affine),
    in parallel over the machine's cores."""
    items = []
    for split, n in n_per_split.items():
        out, seg = os.path.join(root, f"keras_slices_{split}"), os.path.join(root, f"keras_slices_seg_{split}")
        os.makedirs(out, exist_ok=True)
        os.makedirs(seg, exist_ok=True)
        items += [(os.path.join(out, f"case_{case:03d}_week_{week}_slice_{k}.nii.gz"),
                   os.path.join(seg, f"seg_{case:03d}_week_{week}_slice_{k}.nii.gz"), case, week, k, n_week, seed)
                  for case, week, k, n_week in _plan(split, n, seed)]
    from tqdm import tqdm
    # items run in patient order and in chunks, so each worker reuses its cached per-patient texture fields
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        for _ in tqdm(pool.imap_unordered(_write_one, items, chunksize=16), total=len(items), disable=not progress,
                      desc="phantom"):
            pass


DEMO_SIZES = {"train": 640, "validate": 80, "test": 60}
# (case, position along the scan from caudal 0 to cranial 1): different patients, levels and set-ups
DEMO_VIEWS = ((4, 0.15), (11, 0.25), (37, 0.35), (17, 0.5), (23, 0.6), (30, 0.75), (40, 0.9))


def figure(path, seed=0, views=DEMO_VIEWS, end_view=True):
    """Slices of the demo set (the ones nearest each view's case and position) beside their label maps, for the
    README; with end_view, also the demo set's first near-empty end-of-scan slice that shows a sliver of body."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    demo = [v for split, n in DEMO_SIZES.items() for v in _plan(split, n, seed)]
    shown = []
    for case, pos in views:
        ok = [v for v in demo if v[0] == case and scan_end_kind(seed, *v) == 0]
        shown.append(min(ok, key=lambda v: abs((v[2] + 0.5) / v[3] - pos)))
    if end_view:
        shown += [v for v in demo if scan_end_kind(seed, *v) == 1
                  and phantom_slice(*v, seed=seed, labels=True, scan_ends=True)[1].any()][:1]
    views = shown
    colors = ["#000000", "#5a5a5a", "#f0e2a8", "#3d8fd9", "#c87533", "#e0301e"]
    cmap = ListedColormap(colors)
    rows = (len(views) + 1) // 2
    fig, axes = plt.subplots(rows, 4, figsize=(12, 1.62 * rows + 0.35), dpi=80)
    for i, (c, w, k, n) in enumerate(views):
        img, lab = phantom_slice(c, w, k, n, seed=seed, labels=True, scan_ends=True)
        ax_i, ax_l = axes.flat[2 * i], axes.flat[2 * i + 1]
        ax_i.imshow(img.T, cmap="gray", vmin=0, vmax=np.percentile(img, 99.5), interpolation="antialiased")
        ax_l.imshow(lab.T, cmap=cmap, vmin=-0.5, vmax=5.5, interpolation="nearest")
        end = " (end of scan)" if scan_end_kind(seed, c, w, k, n) else ""
        ax_i.set_title(f"case_{c:03d}_week_{w}_slice_{k} (of {n}){end}", fontsize=8, pad=2)
        ax_l.set_title("labels", fontsize=8, pad=2)
    for ax in axes.flat:
        ax.axis("off")
    fig.legend(handles=[Patch(color=col, label=f"{i} {name}") for i, (col, name) in enumerate(zip(colors, LABELS))],
               loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.005, right=0.995, top=0.96, bottom=0.35 / (1.62 * rows + 0.35) + 0.01,
                        wspace=0.02, hspace=0.15)
    fig.canvas.draw()
    from PIL import Image   # a 128-colour palette keeps the PNG small (grey levels plus the six label colours)
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    rgb.quantize(128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--figure", default="assets/phantom.png", help="where to write the demo figure")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.figure)), exist_ok=True)
    figure(args.figure, args.seed)
    print(f"wrote {args.figure}")
