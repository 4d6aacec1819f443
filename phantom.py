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

``python phantom.py --figure=assets/phantom.png`` draws demo slices beside their label maps; ``python phantom.py
--out_dir=data/other --seed=7`` writes a data set of other patients in the course layout.
"""
import functools
import math
import os
import shutil

import numpy as np

import options
from options import Option
from pool import n_workers, parallel_map
from utils import DataError, WriteError, doing, make_folder, run_script, write_nifti

SPLIT_CASES = {"train": range(4, 36), "validate": range(36, 40), "test": range(40, 43)}
REPO = os.path.dirname(os.path.abspath(__file__))
DEMO_ROOT = os.path.join(REPO, "data", "demo")  # written by the first run that finds no data given
DEMO_SIZES = {"train": 640, "validate": 80, "test": 60}
STUDY_ROOT = os.path.join(REPO, "data", "study")  # the phantom at the study's size, for timings (bench.py, slurm/)
STUDY_SIZES = {"train": 11460, "validate": 660, "test": 540}
N_LR = 256
W_MAX = 144                           # widest field of view; narrower slices are its centre rows
PIX = 2.0 / N_LR                      # pixel size in normalised units; x spans [-1, 1)
VOXEL_MM = (1.6, 1.6, 3.0)            # matches a ~38 cm wide pelvis filling ~80% of x
EDGE = 1.2                            # edge ramp width in pixels (partial volume / anti-aliasing)
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
def _patient(seed, case, mix=0.0):
    """Per-patient anatomy: sizes/positions that stay fixed across that patient's scans."""
    r = _rng(seed, case)
    u = r.uniform
    obese = float(r.beta(2.0 + 2.0 * mix, 2.5 - 1.0 * mix))  # mix > 0: a heavier population
    pr_a = u(0.10, 0.16) + 0.03 * mix                # prostate half-width: small gland to marked BPH
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
def _week(seed, case, week, mix=0.0):
    """Per-fraction changes: set-up (zoom/field of view, shift, rotation, scan range), bladder filling, rectal
    distension and gas, coil shading, receiver gain and noise level."""
    r = _rng(seed, case, week)
    u = r.uniform
    return dict(zoom=u(0.96, 1.04), dx=float(np.clip(r.normal(0, 0.02), -0.05, 0.05)),
                dy=float(np.clip(r.normal(0, 0.015), -0.035, 0.035)),
                theta=float(np.clip(r.normal(0, 0.025), -0.06, 0.06)),
                zshift=float(np.clip(r.normal(0, 0.035), -0.08, 0.08)), fill=u(0.45, 1.15) + 0.25 * mix,
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


class Slice:
    """Drawing state of one slice: the image and label map being painted, the coordinate grid, the patient's anatomy
    and this week's set-up (pose, filling, coil), and the per-slice texture fields, each computed at most once."""

    def __init__(self, seed, case, week, slice_idx, n_slices, width, mix=0.0):
        self.x, self.y, self.row0 = _grid(width)
        self.width = width
        self.patient, self.session = _patient(seed, case, mix), _week(seed, case, week, mix)
        # position along the scan, 0 = caudal (below the prostate apex), 1 = cranial, moved by the set-up
        z = (slice_idx + 0.5) / max(n_slices, 1)
        self.z = z + self.session["zshift"]
        self.img = np.zeros((N_LR, width), np.float32)
        self.lab = np.zeros((N_LR, width), np.uint8)
        zoom = self.patient["zoom"] * self.session["zoom"]
        self.scale_x, self.scale_y = zoom, zoom * self.patient["aspect"]
        self.cos_theta, self.sin_theta = math.cos(self.session["theta"]), math.sin(self.session["theta"])
        self.x0, self.y0 = (N_LR - 1) / 2, (width - 1) / 2              # pixel index of the origin
        self.textures = _textures(seed, case)
        self.cache = {}
        self.warp_field = self.field(7)

    def field(self, kind):
        """Texture field `kind` at this slice's z: the per-patient fields combined with this z's phases."""
        if kind not in self.cache:
            re, im, om, ph = self.textures
            row0, width = self.row0, self.width
            f = np.zeros((N_LR, width), np.float32)
            for k in range(_K):
                a = om[k, kind] * self.z + ph[k, kind]
                f += re[k, kind, :, row0:row0 + width] * float(math.cos(a) / math.sqrt(_K))
                f += im[k, kind, :, row0:row0 + width] * float(math.sin(a) / math.sqrt(_K))
            self.cache[kind] = f
        return self.cache[kind]

    def tissue(self, name):
        """Full-slice intensity texture (float32) of a tissue; "m0".."m3" are muscle with fibres along 0..135 deg."""
        if name not in self.cache:
            field = self.field
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
                t = 700.0 * self.session["content"] * (1 + 0.3 * field(1))
            else:                   # muscle with fibre orientation index name[1]
                f = field(3 + int(name[1]))
                t = MUSCLE * (1 + 0.06 * f + 0.6 * np.maximum(f - 1.9, 0)) * (1 + 0.05 * field(1))
            self.cache[name] = t.astype(np.float32)
        return self.cache[name]

    def muscle(self, angle):
        """Muscle texture with fibres along `angle` (body frame, radians, 0 = left-right)."""
        return self.tissue("m%d" % (round((angle + self.session["theta"]) / (math.pi / 4)) % 4))

    def paint(self, cx, cy, a, b, value, label=None, angle=0.0, rim=None, thick=0.0, p=2, warp=0.6):
        """Blend a soft-edged ellipse (p=2) or superellipse (p=3) into img, optionally with a rim `thick` px
        wide (bone cortex, bowel wall, capsule, fat plane), computing only its bounding box.  value/rim are
        numbers or full-slice texture arrays.  label (if given) goes where the outer blend weight is > 0.5.
        warp: amplitude (in edge widths) of a smooth random displacement of the outline, shared by all structures
        so that neighbours deform together."""
        sx, sy, session = self.scale_x, self.scale_y, self.session
        a, b = a * sx, b * sy
        if min(a, b) < 0.5 * PIX:
            return
        # patient pose moves and scales the structure centres rather than the grid, so boxes stay axis-aligned
        cx, cy = sx * cx, sy * cy
        ct, st = self.cos_theta, self.sin_theta
        cx, cy, angle = ct * cx - st * cy + session["dx"], st * cx + ct * cy + session["dy"], angle + session["theta"]
        c, s = math.cos(angle), math.sin(angle)
        pad = (thick + 2.5 + 3.5 * EDGE * warp) * PIX   # the warp field rarely exceeds 3.5 (unit variance)
        if p == 2:
            ex, ey = math.hypot(a * c, b * s) + pad, math.hypot(a * s, b * c) + pad  # exact extents
        else:
            ex = ey = max(a, b) + pad
        i0, i1 = max(0, math.ceil((cx - ex) / PIX + self.x0)), min(N_LR, math.ceil((cx + ex) / PIX + self.x0))
        j0, j1 = max(0, math.ceil((cy - ey) / PIX + self.y0)), min(self.width, math.ceil((cy + ey) / PIX + self.y0))
        if i0 >= i1 or j0 >= j1:
            return
        dx, dy = self.x[i0:i1, None] - cx, self.y[None, j0:j1] - cy
        u, v = (c / a) * dx + (s / a) * dy, (c / b) * dy - (s / b) * dx
        uu, vv = u * u, v * v
        k = PIX * EDGE
        if p == 2:   # signed distance ~ (q - 1) / |grad q|, q = u^2 + v^2, in units of the edge ramp width
            dist = (uu + vv - 1) / np.sqrt(uu * (2 * k / a) ** 2 + vv * (2 * k / b) ** 2 + 1e-12)
        else:        # the same with q = |u|^3 + |v|^3: a rounded rectangle
            au, av = np.abs(u), np.abs(v)
            dist = (uu * au + vv * av - 1) / np.sqrt(uu * uu * (3 * k / a) ** 2 + vv * vv * (3 * k / b) ** 2 + 1e-12)
        if warp:
            dist += self.warp_field[i0:i1, j0:j1] * np.float32(warp)
        sub = self.img[i0:i1, j0:j1]
        passes = ((rim, thick / EDGE), (value, 0.0)) if rim is not None else ((value, 0.0),)
        for val, off in passes:
            t = np.clip((0.5 + off) - dist, 0, 1)
            if isinstance(val, np.ndarray):
                val = val[i0:i1, j0:j1]
            sub += t * t * (3 - 2 * t) * (val - sub)   # smoothstep: a cheap polynomial sigmoid
        if label is not None:
            self.lab[i0:i1, j0:j1][dist < passes[0][1]] = label

    def ring(self, cx, cy, a, b, rim, inner, thick, label=None, angle=0.0, p=2, warp=0.6):
        """paint() with a rim: `inner` inside a `rim` band `thick` px wide."""
        self.paint(cx, cy, a, b, inner, label, angle, rim, thick, p, warp)


def _rectum_y(s):
    """Centre of the rectum, behind the prostate; it follows the sacral curve cranially."""
    pat = s.patient
    return pat["pr_cy"] + pat["pr_b"] + pat["re_b"] + 0.015 + 0.10 * _step(s.z, 0.45, 1.1)


def _body_and_subcutaneous_fat(s):
    """Body outline (a rounded-rectangle trunk plus the buttocks), all subcutaneous fat."""
    pat, fat = s.patient, s.tissue("fat")
    body_a, body_b, body_y = pat["body_a"], pat["body_b"], pat["body_cy"]
    s.paint(0, body_y, body_a, body_b, fat, BODY, p=3, warp=1.0)
    for side in (-1, 1):
        s.paint(side * 0.36 * body_a, body_y + 0.45 * body_b, 0.52 * body_a, 0.62 * body_b, fat, BODY, side * 0.12,
                warp=1.0)
    s.paint(0, body_y + body_b + 0.03, 0.02, 0.08, 0.0, 0)                       # natal cleft


def _deep_muscles(s):
    """Deep compartment: muscle under the subcutaneous fat of trunk and buttocks (_hip_muscles splits it into groups
    by thin fat planes)."""
    pat = s.patient
    body_a, body_b, body_y = pat["body_a"], pat["body_b"], pat["body_cy"]
    fat_lateral = pat["fat"]
    fat_anterior, fat_posterior = fat_lateral * pat["fat_ant"], fat_lateral * pat["fat_post"]
    s.paint(0, body_y + (fat_anterior - fat_posterior) / 2, body_a - fat_lateral,
            body_b - (fat_anterior + fat_posterior) / 2, s.muscle(0.0), BODY, p=3, warp=1.5)
    for side in (-1, 1):
        s.paint(side * 0.36 * body_a, body_y + 0.45 * body_b, 0.52 * body_a - fat_posterior,
                0.62 * body_b - fat_posterior, s.muscle(side * 0.6), BODY, side * 0.12, warp=1.5)


def _hip_muscles(s, side):
    """Muscle groups around one hip (side -1 or 1), split by thin fat planes."""
    pat, plane, muscle, ring, z = s.patient, s.tissue("plane"), s.muscle, s.ring, s.z
    body_a, body_b, body_y = pat["body_a"], pat["body_b"], pat["body_cy"]
    femur_x, femur_y = pat["fem_cx"] + side * pat["fem_asym"], pat["fem_cy"]
    hip_z, muscle_size, glut = pat["fem_z"], pat["mus"], pat["glut"]
    # gluteus maximus: big, posterolateral, fibres running obliquely
    ring(side * 0.43 * body_a, body_y + 0.5 * body_b + 0.02, 0.33 * body_a * glut, 0.55 * body_b * glut, plane,
         muscle(side * 0.6), 1.3, BODY, side * 0.5)
    # lateral group: gluteus medius/minimus cranially, vastus lateralis caudally
    ring(side * (femur_x + 0.17), femur_y + 0.03, 0.085 * muscle_size, 0.15 * muscle_size, plane, muscle(side * 1.5),
         1.2, BODY, side * 0.25)
    # hip flexors: iliopsoas in front of the femoral head, sartorius / rectus femoris, tensor fasciae latae
    ring(side * (femur_x - 0.03), femur_y - 0.185, 0.10 * muscle_size, 0.065 * muscle_size, plane, muscle(side * 0.3),
         1.3, BODY, side * 0.2)
    ring(side * (femur_x + 0.12), femur_y - 0.23, 0.07 * muscle_size, 0.05 * muscle_size, plane, muscle(0.0), 1.2,
         BODY, side * 0.3)
    ring(side * (femur_x + 0.25), femur_y - 0.13, 0.055 * muscle_size, 0.05 * muscle_size, plane, muscle(side * 0.9),
         1.2, BODY, side * 0.7)
    # pectineus / adductors and obturator externus caudally, quadratus femoris behind the femoral neck
    adductors = _prof(z, -0.4, hip_z + 0.05, 0.3)
    ring(side * (femur_x - 0.21), femur_y - 0.13, 0.09 * adductors, 0.06 * adductors, plane, muscle(side * 0.8), 1.2,
         BODY, side * 0.5)
    ring(side * (femur_x - 0.11), femur_y - 0.03, 0.075 * adductors, 0.045 * adductors, plane, muscle(side * 0.2),
         1.2, BODY, -side * 0.3)
    quadratus = _prof(z, -0.2, hip_z - 0.05, 0.3)
    ring(side * (femur_x - 0.01), femur_y + 0.15, 0.09 * quadratus, 0.035 * quadratus, plane, muscle(0.0), 1.2, BODY,
         -side * 0.2)


def _femoral_vessels(s, side):
    """Femoral artery and vein in their fat pad, anteromedial to the hip."""
    pat = s.patient
    femur_x, femur_y = pat["fem_cx"] + side * pat["fem_asym"], pat["fem_cy"]
    s.paint(side * (femur_x - 0.155), femur_y - 0.215, 0.055, 0.035, s.tissue("fat"), BODY)
    s.paint(side * (femur_x - 0.13), femur_y - 0.215, 0.02, 0.02, 60.0, BODY, warp=0)   # artery: flow void
    s.paint(side * (femur_x - 0.18), femur_y - 0.21, 0.025, 0.022, 430.0, BODY, warp=0)  # vein: slow flow


def _prevesical_fat_and_rectus_abdominis(s):
    """Prevesical / suprapubic fat in the midline, rectus abdominis above the symphysis."""
    pat = s.patient
    front = pat["body_cy"] - pat["body_b"] + pat["fat"] * pat["fat_ant"]   # inner edge of the anterior fat
    s.paint(0, front + 0.06, 0.17, 0.11, s.tissue("fat"), BODY)
    rectus = _step(s.z, 0.35, 0.55)
    for side in (-1, 1):
        s.ring(side * 0.065, front + 0.012, 0.06 * rectus, 0.02 * rectus, s.tissue("plane"), s.muscle(0), 1.0, BODY)


def _pelvic_cavity_fat_and_obturator_internus(s):
    """Fat around the pelvic organs (narrow between the ischial tuberosities caudally), obturator internus lining the
    side walls."""
    pat = s.patient
    half_width = 0.19 + 0.09 * _step(s.z, 0.1, 0.7)
    centre_y = (pat["pr_cy"] + _rectum_y(s)) / 2 + 0.03
    s.paint(0, centre_y, half_width, 0.26, s.tissue("fat"), BODY)
    obturator = _prof(s.z, -0.05, pat["fem_z"] + 0.25, 0.3)
    for side in (-1, 1):
        s.ring(side * (half_width - 0.01), centre_y + 0.02, 0.035 * obturator, 0.16 * obturator, s.tissue("plane"),
               s.muscle(side * 1.57), 1.2, BODY, side * 0.12)


def _pelvic_floor(s):
    """Levator ani sling around prostate and rectum (open anteriorly), ischioanal fat outside it."""
    pat = s.patient
    levator = _prof(s.z, -0.15, pat["pr_z1"] + 0.06, 0.3)
    if levator:
        prostate_y, rectum_y, fat = pat["pr_cy"], _rectum_y(s), s.tissue("fat")
        sling_b = (rectum_y - prostate_y) / 2 + pat["re_b"] + 0.035
        s.ring(0, (prostate_y + rectum_y) / 2 + 0.01, max(pat["pr_a"], pat["re_a"]) * levator + 0.045, sling_b,
               s.muscle(1.57), fat, 1.4, BODY, warp=1.0)
        s.paint(0, prostate_y - sling_b * 0.5, max(pat["pr_a"], pat["re_a"]) * levator + 0.07, sling_b * 0.55, fat,
                BODY)


def _acetabulum_and_ilium(s, side):
    """Acetabulum cupping the femoral head; ilium above it."""
    pat, marrow = s.patient, s.tissue("marrow")
    femur_x, femur_y, femur_r, hip_z = pat["fem_cx"] + side * pat["fem_asym"], pat["fem_cy"], pat["fem_r"], pat["fem_z"]
    ilium = _step(s.z, hip_z + 0.05, hip_z + 0.3)
    acetabulum = _step(s.z, hip_z - 0.14, hip_z - 0.02) * (1 - 0.5 * ilium)   # grows from below, merges into the ilium
    if acetabulum > 0.2:
        s.ring(side * (femur_x - 0.06 - 0.03 * ilium), femur_y, (femur_r * 0.7 + 0.05) * acetabulum,
               (femur_r * 0.85 + 0.04) * acetabulum, CORTEX, marrow, 1.6, BONE)
    if ilium:
        s.ring(side * (femur_x - 0.12 + 0.03 * ilium), femur_y + 0.10 - 0.02 * ilium, 0.06 + 0.10 * ilium,
               0.045 + 0.01 * ilium, CORTEX, marrow, 1.6, BONE, side * (-1.0 + 0.3 * ilium))


def _ischium(s, side):
    """Ischium (posterior column) down to the ischial tuberosity."""
    pat = s.patient
    femur_x, femur_y, hip_z = pat["fem_cx"] + side * pat["fem_asym"], pat["fem_cy"], pat["fem_z"]
    size = _prof(s.z, -0.15, hip_z + 0.08, 0.3)
    if size:
        back = 0.12 + 0.05 * (1 - _step(s.z, 0.0, hip_z))
        s.ring(side * (femur_x - 0.12), femur_y + back, 0.045 * size + 0.01, 0.085 * size, CORTEX, s.tissue("marrow"),
               1.6, BONE, -side * 0.35)


def _pubis(s, side):
    """Pubis: superior ramus towards the acetabulum, body at the symphysis, inferior ramus caudally."""
    pat, z, marrow = s.patient, s.z, s.tissue("marrow")
    femur_y, hip_z, symphysis_y = pat["fem_cy"], pat["fem_z"], pat["sym_y"]
    superior = _prof(z, hip_z - 0.16, hip_z + 0.05, 0.25)
    if superior:
        s.ring(side * (0.24 + 0.04 * (1 - superior)), (symphysis_y + femur_y) / 2 - 0.04, 0.16 * (0.4 + 0.6 * superior),
               0.035 * superior, CORTEX, marrow, 1.5, BONE, -side * 0.4)
    body = _prof(z, 0.0, hip_z, 0.3)
    if body:
        s.ring(side * 0.05, symphysis_y, 0.04 * body, 0.06 * body, CORTEX, marrow, 1.5, BONE, -side * 0.25)
    inferior = _prof(z, -0.2, 0.2, 0.3)
    if inferior:
        s.ring(side * 0.15, symphysis_y + 0.09, 0.10, 0.03 * inferior + 0.005, CORTEX, marrow, 1.5, BONE, side * 0.9)


def _femur(s, side):
    """Femur: head (a sphere), neck and greater trochanter below its centre, shaft further down."""
    pat, z, marrow = s.patient, s.z, s.tissue("marrow")
    femur_x, femur_y, femur_r, hip_z = pat["fem_cx"] + side * pat["fem_asym"], pat["fem_cy"], pat["fem_r"], pat["fem_z"]
    head_r = femur_r * _prof(z, hip_z - 0.15, hip_z + 0.15)
    # proximal femur: round shaft with a thick cortex, widening into the greater trochanter, which gives way to
    # the neck and head above
    trochanter = _step(z, hip_z - 0.34, hip_z - 0.12)
    fade = 1 - _step(z, hip_z - 0.12, hip_z + 0.02)
    if fade > 0.3:
        size = 0.3 + 0.7 * fade
        s.ring(side * (femur_x + 0.09 + 0.05 * trochanter), femur_y + 0.03 + 0.02 * trochanter,
               (0.06 + 0.05 * trochanter) * size, (0.06 + 0.02 * trochanter) * size, CORTEX, marrow,
               4.0 - 2.2 * trochanter, BONE, side * 0.35 * trochanter)
    neck = _step(z, hip_z - 0.22, hip_z - 0.1) * (1 - _step(z, hip_z - 0.06, hip_z + 0.02))
    if neck > 0.2:
        s.ring(side * (femur_x + 0.06), femur_y + 0.015, 0.1 * neck + 0.02, 0.045 * (0.5 + 0.5 * neck), CORTEX,
               marrow, 1.8, BONE, side * 0.3)
    if head_r > 0.3 * femur_r:
        s.paint(side * femur_x, femur_y, head_r + 2.5 * PIX, head_r + 2.5 * PIX, 330.0, BODY)  # joint cartilage / fluid
        s.ring(side * femur_x, femur_y, head_r, head_r, CORTEX, marrow, 1.6, BONE)


def _bones(s):
    """Bones: dark cortex around fatty marrow.  Each side's pelvic bones and femur, the symphysis, the sacrum."""
    pat, marrow = s.patient, s.tissue("marrow")
    for side in (-1, 1):
        _acetabulum_and_ilium(s, side)
        _ischium(s, side)
        _pubis(s, side)
        _femur(s, side)
    if _prof(s.z, 0.0, pat["fem_z"], 0.3):
        s.paint(0, pat["sym_y"], 0.01, 0.04, 260.0, BODY)                            # symphyseal disc
    sacrum = _step(s.z, 0.45, 1.1)                                                 # coccyx, then sacrum cranially
    if s.z > 0.3:
        s.ring(0, pat["sac_y"] + 0.05 * sacrum, 0.03 + 0.16 * sacrum, 0.03 + 0.035 * sacrum, CORTEX, marrow, 1.6, BONE)


def _bowel_loops(s):
    """Bowel loops cranially (sigmoid / small bowel): dark wall, intermediate content."""
    for loop_x, loop_y, loop_z, loop_r in s.patient["loops"]:
        size = _prof(s.z, loop_z - 0.15, loop_z + 0.15, 0.4)
        if size:
            s.ring(loop_x, loop_y, loop_r * size, loop_r * size * 0.8, 160.0, s.tissue("content") * 0.8, 1.5, BODY)


def _seminal_vesicles(s):
    """Seminal vesicles between bladder base and rectum."""
    pat = s.patient
    size = _prof(s.z, pat["pr_z1"] - 0.05, pat["pr_z1"] + 0.13, 0.4)
    if size:
        for side in (-1, 1):
            s.ring(side * 0.075, _rectum_y(s) - pat["re_b"] - 0.025, 0.075 * size, 0.022 * size, 200.0,
                   s.tissue("sv"), 1.0, BODY, -side * 0.35)


def _bladder(s):
    """Bladder: very bright urine, thin dark wall; its height grows with the week's filling."""
    pat, fill = s.patient, s.session["fill"]
    neck_z = pat["pr_z1"] - 0.015                              # the bladder neck sits on the prostate base
    size = _prof(s.z, neck_z - 0.03, neck_z + pat["bl_h"] * (0.6 + 0.6 * fill), 0.35)
    if size:
        centre_y = pat["pr_cy"] - 0.03 - 0.05 * fill * _step(s.z, neck_z, neck_z + 0.3)
        half_a, half_b = pat["bl_a"] * (0.7 + 0.35 * fill) * size, pat["bl_b"] * (0.7 + 0.35 * fill) * size
        s.ring(0, centre_y - 0.3 * (1 - size) * half_b, half_a, half_b, 170.0, URINE, 1.4, BLADDER, 0.0,
               p=3 if fill > 0.9 else 2)


def _rectum(s):
    """Rectum: mesorectal fat, layered wall (dark muscularis, bright submucosa, dark mucosa), content and gas."""
    pat, session, z = s.patient, s.session, s.z
    if not _prof(z, -0.15, 1.25):
        return
    rectum_y = _rectum_y(s)
    distension = session["dist"] * (0.75 + 0.25 * _step(z, 0.1, pat["pr_z0"] + 0.1))
    half_a, half_b = pat["re_a"] * distension, pat["re_b"] * distension
    # mesorectal fat inside its fascia, then the wall around the content
    s.ring(0, rectum_y, half_a + 0.04, half_b + 0.035, s.tissue("plane"), s.tissue("fat"), 0.8, BODY, warp=1.5)
    s.ring(0, rectum_y, half_a, half_b, 150.0, 400.0 * (1 + 0.1 * s.field(1)), 2.0, RECTUM, warp=1.0)
    wall = 3.2 * PIX
    # lumen: a slit when collapsed, round when distended, lined by darker mucosa
    lumen_a, lumen_b = half_a - wall, (half_b - wall) * min(1.0, 0.35 + 0.6 * (session["dist"] - 0.8) / 0.55)
    s.ring(0, rectum_y, lumen_a, lumen_b, 230.0, s.tissue("content"), 1.2, warp=1.0)
    gas = session["gas"] + 0.5 * math.sin(2 * math.pi * (2.1 * z + session["gas_phase"]))
    if gas > 0.2:
        gas_size = min(1.0, gas - 0.2) ** 0.5
        s.paint(0, rectum_y - 0.3 * lumen_b, (lumen_a - 1.5 * PIX) * 0.85 * gas_size,
                (lumen_b - 1.5 * PIX) * 0.65 * gas_size, 0.0)


def _prostate(s):
    """Prostate: dark capsule, bright peripheral zone, darker nodular central gland anteriorly."""
    pat = s.patient
    size = _prof(s.z, pat["pr_z0"], pat["pr_z1"], 0.45)
    if not size:
        return
    centre_y = pat["pr_cy"]
    half_a, half_b = pat["pr_a"] * size, pat["pr_b"] * size
    for side in (-1, 1):   # periprostatic venous plexus (bright) and neurovascular bundles
        s.paint(side * (half_a * 0.8), centre_y - half_b * 0.6, 0.018, 0.012, 620.0, BODY)
        s.paint(side * (half_a * 0.7), centre_y + half_b * 0.85, 0.012, 0.012, 150.0, BODY)
    s.ring(0, centre_y, half_a, half_b, 150.0, s.tissue("pz"), 1.2, PROSTATE)
    # central gland (transition zone), inside the capsule, and the anterior fibromuscular stroma
    central = pat["tz"] * (0.8 + 0.2 * _step(s.z, pat["pr_z0"], pat["pr_z1"]))
    s.paint(0, centre_y - 0.15 * half_b, half_a * central, half_b * central * 0.95, s.tissue("tz"))
    s.paint(0, centre_y - 0.72 * half_b, 0.45 * half_a, 0.2 * half_b, 190.0)


def _coil_shading_and_bias_field(s):
    """Brighter near the anterior and posterior coils, plus a smooth random bias field, times the receiver gain."""
    x, y, session = s.x, s.y, s.session
    xn, yn = x, (y - session["coil_y"]) / 0.45     # coordinates scaled to the coils' sensitivity profile
    bias_poly = (np.stack([np.ones_like(x), x, x * x - 0.35], 1) @ session["bias"].astype(np.float32)
                 @ np.stack([np.ones_like(y), yn, yn * yn - 0.35], 0))
    bias_poly *= session["bias_amp"] / float(np.abs(bias_poly).max())
    coil = session["coil"]
    shade = (1 + coil * yn[None, :] ** 2 + 0.15 * coil * xn[:, None] ** 2) / (1 + 0.4 * coil)
    s.img *= (session["gain"] * shade * (1 + bias_poly)).astype(np.float32)


def _beyond_the_body(s, rng):
    """An end-of-scan slice beyond the body's coverage: a sliver of body near a coil, or noise only."""
    draw = rng.uniform(size=3)
    if draw[0] < 0.5:
        s.img[:] = 0
        s.lab[:] = 0
        return
    pat, anterior = s.patient, draw[1] < 0.6
    body_b, body_y = pat["body_b"], pat["body_cy"]
    y_body = (s.y - s.session["dy"]) / s.scale_y if anterior else -(s.y - s.session["dy"]) / s.scale_y
    edge = -(body_b - body_y) if anterior else -(body_b + body_y + 0.07)
    keep = np.clip((edge + (0.03 + 0.07 * draw[2]) - y_body) / (6 * PIX), 0, 1).astype(np.float32)
    s.img *= keep[None, :] * (0.4 + 0.6 * draw[2])
    s.lab[:, keep <= 0.5] = 0


def _rician_noise(s, rng):
    """Magnitude of the complex signal with gaussian noise in both channels, as float64."""
    session = s.session
    sigma = session["sigma"] * FAT * session["gain"] * rng.uniform(0.9, 1.1)
    noise = rng.standard_normal((2,) + s.img.shape, dtype=np.float32) * np.float32(sigma)
    return np.hypot(s.img + noise[0], noise[1]).astype(np.float64)


def phantom_slice(case: int, week: int, slice_idx: int, n_slices: int, width: int = 128, seed: int = 0,
                  labels: bool = False, scan_ends: bool = False, mix: float = 0.0):
    """float64 array of shape (256, width), raw 'scanner' intensities (roughly 0..~1500, Rician noise background).
    labels=True returns (image, uint8 labels of the same shape).  scan_ends=True makes the outermost slices of a
    scan near-empty or all zero as scan_end_kind says (write_phantom does this); by default every slice is an
    ordinary one.  mix=0 draws patients from the demo's population; towards 1 the patients are heavier, with
    larger prostates and fuller bladders (another patient mix, for data a model was not tuned on)."""
    end = scan_end_kind(seed, case, week, slice_idx, n_slices) if scan_ends else 0
    if end == 2:
        img = np.zeros((N_LR, width))
        return (img, np.zeros((N_LR, width), np.uint8)) if labels else img
    s = Slice(seed, case, week, slice_idx, n_slices, width, mix)
    # painted outside in: later structures cover earlier ones
    _body_and_subcutaneous_fat(s)
    _deep_muscles(s)
    for side in (-1, 1):
        _hip_muscles(s, side)
        _femoral_vessels(s, side)
    _prevesical_fat_and_rectus_abdominis(s)
    _pelvic_cavity_fat_and_obturator_internus(s)
    _pelvic_floor(s)
    _bones(s)
    _bowel_loops(s)
    _seminal_vesicles(s)
    _bladder(s)
    _rectum(s)
    _prostate(s)
    _coil_shading_and_bias_field(s)
    rng = _rng(seed, case, week, slice_idx, n_slices)   # the end-of-scan draw, then the noise
    if end == 1:
        _beyond_the_body(s, rng)
    out = _rician_noise(s, rng)
    return (out, s.lab) if labels else out


OTHER_ANATOMIES = ("head", "thorax", "knee")


def _head(s):
    """Head: scalp fat, a dark skull, a bright rim of CSF, mottled brain, two bright lateral ventricles."""
    s.paint(0, 0, 0.33, 0.41, s.tissue("fat"))
    s.ring(0, 0.005, 0.305, 0.385, CORTEX, URINE * 0.8, 3.0)                    # skull around the CSF
    s.paint(0, 0.005, 0.285, 0.365, 450.0 * (1 + 0.15 * s.field(1)))             # brain
    for side in (-1, 1):
        s.paint(side * 0.05, -0.03, 0.025, 0.11, URINE, angle=-side * 0.3)         # lateral ventricles


def _thorax(s):
    """Thorax: oval chest with subcutaneous fat and chest wall muscle, dark lungs, the heart anteriorly between
    them, a vertebral body with the spinal canal behind it, back muscles, the aorta beside the spine."""
    s.paint(0, 0, 0.82, 0.4, s.tissue("fat"), warp=1.0)
    s.paint(0, 0.005, 0.76, 0.35, s.muscle(0.0), warp=1.0)
    for side in (-1, 1):
        s.paint(side * 0.34, -0.02, 0.3, 0.27, 30.0 * (1 + 0.3 * s.field(1)))     # lungs: air, almost no signal
        s.paint(side * 0.12, 0.3, 0.1, 0.055, s.muscle(1.57))                     # erector spinae
    s.paint(0.05, -0.12, 0.19, 0.16, s.tissue("fat"), angle=0.4)                 # pericardial fat
    s.paint(0.05, -0.12, 0.17, 0.14, 350.0 * (1 + 0.1 * s.field(1)), angle=0.4)  # heart
    s.ring(0, -0.33, 0.03, 0.02, CORTEX, s.tissue("marrow"), 1.5)                # sternum
    s.ring(0, 0.2, 0.065, 0.055, CORTEX, s.tissue("marrow"), 1.8)                # vertebral body
    s.paint(0, 0.29, 0.025, 0.022, URINE)                                        # spinal canal (CSF)
    s.paint(-0.08, 0.15, 0.03, 0.03, 60.0, warp=0)                               # descending aorta: flow void


def _knee(s):
    """Knee: a round leg of fat and muscle, the two femoral condyles (marrow in cortex), the patella in front with
    bright joint fluid behind it, and the popliteal fossa's fat and vessels behind."""
    s.paint(0, 0, 0.3, 0.28, s.tissue("fat"))
    s.paint(0, 0.03, 0.26, 0.23, s.muscle(1.57))
    s.paint(0, -0.11, 0.2, 0.05, URINE * 0.9)                                     # joint effusion
    for side in (-1, 1):
        s.ring(side * 0.1, 0.0, 0.1, 0.12, CORTEX, s.tissue("marrow"), 1.6)      # femoral condyles
    s.paint(0, 0.07, 0.025, 0.05, 150.0)                                         # cruciate ligaments in the notch
    s.ring(0, -0.19, 0.09, 0.035, CORTEX, s.tissue("marrow"), 1.6)               # patella
    s.paint(0, 0.19, 0.07, 0.05, s.tissue("fat"))                                # popliteal fossa
    s.paint(-0.02, 0.18, 0.015, 0.015, 60.0, warp=0)                             # popliteal artery: flow void
    s.paint(0.02, 0.19, 0.018, 0.015, 430.0, warp=0)                             # popliteal vein


def other_anatomy(kind, seed=0, width=128):
    """float32 (256, width) slice of another body part, "head", "thorax" or "knee", drawn like the pelvis (same
    tissues, textures, coil shading and Rician noise, in the same units): data that is not a pelvis, for tests of
    slice-quality checks.  Deterministic in (kind, seed)."""
    case = 1000 + OTHER_ANATOMIES.index(kind)   # a patient of its own: pose, textures and noise level
    s = Slice(seed, case, 0, 0, 1, width)
    {"head": _head, "thorax": _thorax, "knee": _knee}[kind](s)
    _coil_shading_and_bias_field(s)
    return _rician_noise(s, _rng(seed, case, 0, 0, 1)).astype(np.float32)


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
    path, seg_path, case, week, k, n_week, seed, mix = item
    # deterministic file-format mix so loaders get exercised: 10% wide, 10% 3D, 20% int16
    kind = int(np.random.SeedSequence([seed, case, week, k, 1]).generate_state(1)[0] % 10)
    data, seg = phantom_slice(case, week, k, n_week, width=144 if kind == 0 else 128, seed=seed, labels=True,
                              scan_ends=True, mix=mix)
    if kind in (2, 3):
        data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
    else:
        data = data.astype(np.float32)
        if kind == 1:
            data, seg = data[..., None], seg[..., None]
    affine = np.diag(list(VOXEL_MM) + [1.0])
    write_nifti(path, data, affine)
    write_nifti(seg_path, seg, affine)


def write_phantom(root, n_per_split, seed=0, progress=False, mix=0.0, workers=None) -> None:
    """Writes root/keras_slices_{train,validate,test}/case_XXX_week_N_slice_K.nii.gz (XXX zero-padded to 3 digits)
    and their label maps root/keras_slices_seg_{split}/seg_XXX_week_N_slice_K.nii.gz (uint8, same shape and affine),
    in parallel. The folder appears whole or not at all: it is written under a temporary name beside root and then
    renamed, so that a run stopped half-way (SIGTERM, a full disk) leaves nothing that looks like a data set."""
    if os.path.exists(root) and not (os.path.isdir(root) and not os.listdir(root)):
        raise DataError(f"{root}: already exists and is not an empty folder; choose another folder")
    make_folder(os.path.dirname(os.path.abspath(root)))
    doing(f"writing the phantom to {root}")
    tmp = f"{os.path.abspath(root)}.tmp{os.getpid()}"
    try:
        items = []
        for split, n in n_per_split.items():
            out, seg = os.path.join(tmp, f"keras_slices_{split}"), os.path.join(tmp, f"keras_slices_seg_{split}")
            make_folder(out)
            make_folder(seg)
            items += [(os.path.join(out, f"case_{case:03d}_week_{week}_slice_{k}.nii.gz"),
                       os.path.join(seg, f"seg_{case:03d}_week_{week}_slice_{k}.nii.gz"), case, week, k, n_week,
                       seed, mix)
                      for case, week, k, n_week in _plan(split, n, seed)]
        # items run in patient order and in chunks, so each worker reuses its cached per-patient texture fields
        parallel_map(_write_one, items, workers or n_workers(len(items), per_worker=16),
                     [it[0].replace(tmp, root) for it in items], "phantom", progress)
        try:
            os.replace(tmp, root)
        except OSError as e:
            raise WriteError(f"{root}: cannot move the written phantom into place ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo(root=DEMO_ROOT, sizes=DEMO_SIZES, seed=0):
    """Write the synthetic pelvis phantom once and return its root."""
    if not os.path.isdir(root):
        print(f"writing the synthetic pelvis phantom to {root} (once)")
        write_phantom(root, sizes, seed=seed, progress=True)
    return root


# (case, position along the scan from caudal 0 to cranial 1): different patients, levels and set-ups
FIGURE_VIEWS = ((4, 0.15), (11, 0.25), (37, 0.35), (17, 0.5), (23, 0.6), (30, 0.75), (40, 0.9))


def figure_slices(seed=0, views=FIGURE_VIEWS):
    """The demo set's slices nearest each view's case and position, and its first near-empty end-of-scan slice
    that shows a sliver of body -> [(name, image, labels)], for the README's figure."""
    demo = [v for split, n in DEMO_SIZES.items() for v in _plan(split, n, seed)]
    shown = []
    for case, pos in views:
        ok = [v for v in demo if v[0] == case and scan_end_kind(seed, *v) == 0]
        shown.append(min(ok, key=lambda v: abs((v[2] + 0.5) / v[3] - pos)))
    shown += [v for v in demo if scan_end_kind(seed, *v) == 1
              and phantom_slice(*v, seed=seed, labels=True, scan_ends=True)[1].any()][:1]
    out = []
    for case, week, k, n in shown:
        end = " (end of scan)" if scan_end_kind(seed, case, week, k, n) else ""
        out.append((f"case_{case:03d}_week_{week}_slice_{k} (of {n}){end}",
                    *phantom_slice(case, week, k, n, seed=seed, labels=True, scan_ends=True)))
    return out


BLOCK = dict(
    figure=Option(None, kind=str),   # write the README figure of demo slices beside their labels here
    out_dir=Option(None, kind=str),  # write a phantom data set here, in the course layout
    seed=Option(0),                  # the demo is seed 0; another seed gives other patients
    mix=Option(0.0, at_least=0, at_most=1),  # 0: the demo's population; towards 1 heavier patients, larger
                                             # prostates, fuller bladders
    n_train=Option(DEMO_SIZES["train"], at_least=1),
    n_validate=Option(DEMO_SIZES["validate"], at_least=1),
    n_test=Option(DEMO_SIZES["test"], at_least=1),
)


def main(argv):
    """python phantom.py --figure=assets/phantom.png, or --out_dir=data/other --seed=7 for another data set."""
    cfg = options.parse(BLOCK, argv)
    if not (cfg.figure or cfg.out_dir):
        raise DataError("give --figure=PATH (the README figure) or --out_dir=FOLDER (a data set)")
    if cfg.figure:
        import figures  # matplotlib and torch (through metrics), which the phantom's workers do without
        make_folder(os.path.dirname(os.path.abspath(cfg.figure)))
        figures.plot_phantom(cfg.figure, figure_slices(cfg.seed))
        print(f"wrote {cfg.figure}")
    if cfg.out_dir:
        sizes = dict(train=cfg.n_train, validate=cfg.n_validate, test=cfg.n_test)
        write_phantom(cfg.out_dir, sizes, cfg.seed, progress=True, mix=cfg.mix)
        print(f"wrote {sum(sizes.values())} slices and their labels to {cfg.out_dir}")


if __name__ == "__main__":
    run_script(main)
