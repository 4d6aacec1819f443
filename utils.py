"""What the scripts share: NIfTI reading, the metrics we report, the figures, and small helpers.

The metric (see README): each ground-truth slice is scaled to [0, 1] by its own min and max; the reconstruction,
in the same intensity units, is scaled by that same min and max and clipped to [0, 1]; SSIM is scikit-image's
`structural_similarity` with its defaults (7x7 uniform window, K1=0.01, K2=0.03, sample covariance) and
data_range=1; PSNR uses data_range=1. `ssim_torch` is a batched twin of the scikit-image SSIM, checked in tests.
Per-organ scores (where the data has segmentation labels) average the same SSIM map over an organ's pixels.
"""
import ast
import csv
import glob
import gzip
import os
import sys
import zlib

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from skimage.metrics import peak_signal_noise_ratio, structural_similarity


REGIONS = {1: "body", 2: "bone", 3: "bladder", 4: "rectum", 5: "prostate"}  # the study's label values
PROSTATE = 5
OUTLINED = {PROSTATE: "red", 3: "cyan"}  # prostate and bladder in the reconstruction figures
MIN_REGION_PIXELS = 20  # a slice counts toward a region's mean only where the region has this many pixels


class DataError(ValueError):
    """A bad input: a data file or folder, a checkpoint, an option. The message is one line that names it and the
    problem; each script's entry point prints it as `error: ...` and exits with status 1."""


def read_image(path):
    """Read a NIfTI file -> (its nibabel image, float64 array of any shape). Raises DataError on bad input."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # one C call: twice as fast as nibabel's streaming gzip reader
            raw = zlib.decompress(raw, 31)
        try:
            img = nib.Nifti1Image.from_bytes(raw)
        except Exception:  # NIfTI-2, Analyze, or not an image at all: let nibabel decide, and say why
            img = nib.load(path)
        a = np.asarray(img.dataobj, dtype=np.float64)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:
        raise DataError(f"{path}: corrupt gzip ({e})") from None
    except Exception as e:  # nibabel raises several types for non-NIfTI content
        raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if not np.isfinite(a).all():
        raise DataError(f"{path}: contains {np.count_nonzero(~np.isfinite(a))} NaN or Inf values")
    return img, a


def read_nifti(path):
    """Read one 2D slice stored as (H, W) or (H, W, 1) -> float64 (H, W). Raises DataError on bad input."""
    _, a = read_image(path)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim != 2:
        raise DataError(f"{path}: expected a 2D slice (H, W) or (H, W, 1), got shape {a.shape}")
    return a


# ---- metrics ----------------------------------------------------------------------------------------------------

def score(gt, rec, labels=None):
    """Reference metric for one slice in intensity units -> {"ssim", "psnr"}, plus "<region>_ssim" and
    "<region>_psnr" for each labelled region that the slice holds (see region_scores)."""
    lo, hi = float(gt.min()), float(gt.max())
    g = (gt - lo) / max(hi - lo, 1e-8)
    r = np.clip((rec - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
    ssim, ssim_map = structural_similarity(g, r, data_range=1.0, full=True)
    out = dict(ssim=float(ssim), psnr=float(peak_signal_noise_ratio(g, r, data_range=1.0)))
    if labels is not None:
        out.update(region_scores(g, r, ssim_map, labels))
    return out


def region_scores(g, r, ssim_map, labels, win=7):
    """Per-organ SSIM and PSNR of one slice pair in [0, 1]: SSIM is scikit-image's SSIM map averaged over the
    region's pixels, and PSNR comes from the mean squared error over the same pixels. Both leave out the win // 2
    border, as the whole-image SSIM does. A region counts only where it has MIN_REGION_PIXELS pixels there."""
    inner = (slice(win // 2, -(win // 2)),) * 2
    g, r, ssim_map, labels = g[inner], r[inner], ssim_map[inner], labels[inner]
    out = {}
    for value, name in REGIONS.items():
        m = labels == value
        if m.sum() >= MIN_REGION_PIXELS:
            mse = max(float(((g[m] - r[m]) ** 2).mean()), 1e-12)
            out[f"{name}_ssim"], out[f"{name}_psnr"] = float(ssim_map[m].mean()), 10 * np.log10(1 / mse)
    return out


def score_split(x, rec, lo, hi, masks=None):
    """Per-slice scores of a split with the reference metric, both arrays brought back to intensity units ->
    {column: (N,) array}: ssim and psnr, and with masks each region's, NaN where the slice lacks the region."""
    columns = ["ssim", "psnr"] + ([f"{n}_{m}" for n in REGIONS.values() for m in ("ssim", "psnr")] if masks is not None
                                  else [])
    out = {c: np.full(len(x), np.nan) for c in columns}
    for i in range(len(x)):
        units = [a[i].astype(np.float64) * (hi[i] - lo[i]) + lo[i] for a in (x, rec)]
        s = score(*units, None if masks is None else masks[i])
        for c, v in s.items():
            out[c][i] = v
    return out


def split_means(scores):
    """Means of score_split's columns: ssim, psnr, n_slices, and per region its means and how many slices it
    covers."""
    means = dict(ssim=float(scores["ssim"].mean()), psnr=float(scores["psnr"].mean()), n_slices=len(scores["ssim"]))
    regions = {}
    for name in REGIONS.values():
        if f"{name}_ssim" in scores:
            have = ~np.isnan(scores[f"{name}_ssim"])
            regions[name] = dict(ssim=float(scores[f"{name}_ssim"][have].mean()) if have.any() else None,
                                 psnr=float(scores[f"{name}_psnr"][have].mean()) if have.any() else None,
                                 n_slices=int(have.sum()))
    return dict(means, regions=regions) if regions else means


def write_per_slice(path, names, scores):
    """per_slice.csv: one row per slice, a column per score; empty where a region is absent."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", *scores])
        for i, name in enumerate(names):
            w.writerow([name, *("" if np.isnan(v[i]) else f"{v[i]:.6f}" for v in scores.values())])


def box_mean(x, win):
    """Mean over every win x win window of (N, 1, H, W) -> (N, 1, H - win + 1, W - win + 1), like
    F.avg_pool2d(x, win, stride=1) but from running sums, one axis at a time: ~4x faster on a CPU, where the
    pool dominates the nearest-slice search. Within 1e-5 of the pool for images in [0, 1] (tests)."""
    s = F.pad(x, (1, 0)).cumsum(-1)
    s = s[..., win:] - s[..., :-win]
    s = F.pad(s, (0, 0, 1, 0)).cumsum(-2)
    return (s[..., win:, :] - s[..., :-win, :]) / (win * win)


def ssim_stats(x, win=7):
    """Local means and (sample) variances of (N, 1, H, W) images: the per-image half of SSIM, reusable."""
    x = x.float()
    u = box_mean(x, win)
    return x, u, win * win / (win * win - 1) * (box_mean(x * x, win) - u * u)


def ssim_from_stats(a, b, win=7, k1=0.01, k2=0.03):
    """SSIM per image pair from ssim_stats of each side (broadcastable over N)."""
    (x, ux, vx), (y, uy, vy) = a, b
    vxy = win * win / (win * win - 1) * (box_mean(x * y, win) - ux * uy)
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def ssim_torch(x, y, win=7):
    """Per-image SSIM of (N, 1, H, W) tensors in [0, 1], matching scikit-image's defaults with data_range=1.

    scikit-image filters with a uniform window, uses the sample covariance (N/(N-1)), and averages the SSIM map
    over the image cropped by win//2 on each side: exactly the 'valid' region of a win x win average pool."""
    return ssim_from_stats(ssim_stats(x, win), ssim_stats(y, win), win)


def psnr_torch(x, y):
    """Per-image PSNR in dB of (N, 1, H, W) tensors in [0, 1], data_range=1."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


@torch.no_grad()
def ssim_matrix(queries, pool, chunk=32):
    """SSIM of every query (N, 1, H, W) against every pool slice (M, 1, H, W), all in [0, 1] -> (N, M). The pool's
    local statistics are computed once; each pair then costs one pooled product."""
    pool_stats = [ssim_stats(c) for c in pool.split(chunk)]
    return torch.stack([torch.cat([ssim_from_stats(ssim_stats(q[None]), ps) for ps in pool_stats]) for q in queries])


def nearest_ssim(queries, pool):
    """For each query: the SSIM to, and the index of, its most similar slice in pool -> two numpy arrays."""
    best, where = ssim_matrix(queries, pool).max(dim=1)
    return best.double().cpu().numpy(), where.cpu().numpy()


def entropy(counts, reference=None):
    """Cross-entropy in nats of the histogram `counts` under the distribution of `reference` (itself by default,
    which makes it the entropy). Codebook perplexity is exp(entropy(counts)); divided by ln 2 it is in bits."""
    p = counts.double() / counts.sum().clamp_min(1)
    q = p if reference is None else reference.double() / reference.sum()
    return float(-(p * torch.log(q.clamp_min(1e-12))).sum())


@torch.no_grad()
def reconstruct(model, x, device, batch_size=64):
    """x float32 (N, H, W) in [0, 1] (numpy) -> reconstructions (N, H, W) numpy, unclipped, and codes (N, h, w)."""
    recs, codes, device = [], [], torch.device(device)
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i:i + batch_size], device=device)[:, None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            xh, _, idx = model(xb)
        recs.append(xh.float()[:, 0].cpu().numpy())
        codes.append(idx.cpu().numpy())
    return np.concatenate(recs), np.concatenate(codes)


def evaluate_split(model, prepared, device, batch_size=64):
    """Reconstruct a prepared split and score it with the reference metric -> (reconstructions, per-slice scores
    from score_split, their split_means). The test scoring of train.py and predict.py are this one function."""
    rec, _ = reconstruct(model, prepared["x"], device, batch_size)
    scores = score_split(prepared["x"], rec, prepared["lo"], prepared["hi"], prepared.get("masks"))
    return rec, scores, split_means(scores)


# ---- figures ----------------------------------------------------------------------------------------------------

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_grid(x, path, titles=None, ncols=4):
    """A grid of slices (N, H, W) in [0, 1], shown as axial images (transposed: left-right across)."""
    plt = _pyplot()
    nrows = -(-len(x) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 1.7 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(x):
            ax.imshow(np.asarray(x[i]).T, cmap="gray", vmin=0, vmax=1)
            if titles:
                ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reconstructions(x, rec, path, title="", masks=None):
    """Rows: originals, reconstructions, absolute error; x, rec (N, H, W) in [0, 1], shown as axial images. With
    masks (N, H, W) of labels, the prostate and the bladder are outlined on the originals and reconstructions."""
    plt = _pyplot()
    n = len(x)
    fig, axes = plt.subplots(3, n, figsize=(2.6 * n, 4.6), squeeze=False)
    for i in range(n):
        err = np.abs(np.clip(rec[i], 0, 1) - x[i])
        s = score(x[i].astype(np.float64), rec[i].astype(np.float64))["ssim"]
        for row, (img, vmax) in enumerate(((x[i], 1), (np.clip(rec[i], 0, 1), 1), (err, 0.2))):
            axes[row, i].imshow(img.T, cmap="gray" if row < 2 else "inferno", vmin=0, vmax=vmax)
            axes[row, i].axis("off")
            if masks is not None and row < 2:
                for value, colour in OUTLINED.items():
                    if (masks[i] == value).any():
                        axes[row, i].contour(masks[i].T == value, levels=[0.5], colors=colour, linewidths=0.6)
        axes[1, i].set_title(f"SSIM {s:.3f}", fontsize=8)
    for row, name in enumerate(("original", "reconstruction", "|error| (0-0.2)")):
        axes[row, 0].text(-0.05, 0.5, name, transform=axes[row, 0].transAxes, rotation=90,
                          va="center", ha="right", fontsize=8)
    if masks is not None:
        title += "   (outlined: " + ", ".join(f"{REGIONS[v]} {c}" for v, c in OUTLINED.items()) + ")"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_slices(prepared, n=6):
    """Indices of n slices for a reconstruction figure, spread over the split; where there are labels, among the
    slices that hold the prostate, so that its outline shows."""
    pool = np.arange(len(prepared["x"]))
    masks = prepared.get("masks")
    if masks is not None:
        holding = np.flatnonzero((masks == PROSTATE).reshape(len(masks), -1).sum(1) >= MIN_REGION_PIXELS)
        pool = holding if len(holding) >= n else pool
    return pool[np.linspace(0, len(pool) - 1, min(n, len(pool))).astype(int)]


def shown_masks(prepared, show):
    """The labels of the slices a figure shows, or None for a split without labels."""
    return None if prepared.get("masks") is None else prepared["masks"][show]


def plot_curves(rows, out):
    """loss.png from train_loss, and one figure per validation metric that the rows carry."""
    plt = _pyplot()
    ep = [r["epoch"] for r in rows]
    for name, key, label in (("loss.png", "train_loss", "training loss"), ("ssim.png", "val_ssim", "validation SSIM"),
                             ("bits.png", "val_bits_per_code", "validation bits per code")):
        if key not in rows[0]:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(ep, [r[key] for r in rows], marker="o", ms=3, label=label)
        if key == "train_loss":
            ax.set_yscale("log")  # the loss falls by orders of magnitude; a log axis keeps the late epochs legible
        if key == "val_bits_per_code":
            ax.plot(ep, [r["unigram_bits_per_code"] for r in rows], ls="--", label="unigram baseline (train codes)")
            ax.legend()
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(out, name), dpi=100)
        plt.close(fig)


# ---- helpers ----------------------------------------------------------------------------------------------------

def pick_device(name="auto"):
    """'auto' -> cuda if available, else cpu; otherwise the named device, which must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device={name}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device={name}: CUDA is not available on this machine; use --device=cpu or auto")
    return dev


def atomic_torch_save(obj, path):
    """Write to a temp file beside `path`, then rename: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def newest_first(pattern):
    """The paths matching a glob pattern, the most recently modified first."""
    return sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True)


def newest(pattern):
    """The most recently modified path matching a glob pattern, or None."""
    return next(iter(newest_first(pattern)), None)


def make_folder(path):
    """Create an output folder (and its parents) unless it exists; a file in its place is a DataError."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"--out_dir={path}: is a file, not a folder")
    os.makedirs(path, exist_ok=True)


def find_checkpoint(path, pattern):
    """The given checkpoint path, or the newest match of pattern."""
    path = path or newest(pattern)
    if path is None:
        raise DataError(f"no checkpoint given and none found as {pattern}; train first")
    return path


def check_ranges(config, rules):
    """rules: [(names, test, wording)]; every setting that fails its test, in one DataError line."""
    bad = [f"--{k}={config[k]} must be {wording}" for names, test, wording in rules for k in names
           if config[k] is not None and not test(config[k])]
    if bad:
        raise DataError("; ".join(bad))


def block_names(namespace):
    """The names of a script's hyperparameter block: its public plain values so far (numbers, strings, bools, None).
    Called right after the block, so that modules, functions and later constants are not options."""
    return [k for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, type(None)))]


def configure(namespace, names, argv, bare_true=(), types=None):
    """Apply `--name=value` overrides to the block's `names` in a script's globals -> the resulting config dict."""
    config = apply_overrides({k: namespace[k] for k in names}, argv, bare_true, types)
    namespace.update(config)
    return config


def apply_overrides(config, argv, bare_true=(), types=None):
    """nanoGPT-style configurator: each `--name=value` in argv overrides config[name], keeping its type.

    `value` is parsed as a Python literal, falling back to a plain string; a name in `bare_true` may be given
    without a value (means True). `types` gives the accepted types of a name whose default does not say them
    (a None default, or one that takes a bool or a path).
    Unknown names and wrongly typed values exit with a one-line error."""
    types = types or {}
    for arg in argv:
        if not arg.startswith("--"):
            sys.exit(f"error: unexpected argument {arg!r}; use --name=value")
        name, eq, text = arg[2:].partition("=")
        if name not in config:
            sys.exit(f"error: unknown option --{name}; known: {', '.join(sorted(config))}")
        if not eq:
            if name not in bare_true:
                sys.exit(f"error: --{name} needs a value, as --{name}=VALUE")
            text = "True"
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        old = config[name]
        if name in types:
            if float in types[name] and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            ok = value is None or isinstance(value, types[name])
        elif isinstance(old, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) and (old is None or isinstance(old, bool))
        elif isinstance(old, float) and isinstance(value, int):
            value, ok = float(value), True
        elif value is None or old is None:
            ok = True
        else:
            ok = isinstance(value, type(old))
        if not ok:
            want = "/".join(t.__name__ for t in types[name]) if name in types else type(old).__name__
            sys.exit(f"error: --{name}={text}: expected {want}, got {type(value).__name__}")
        config[name] = value
    return config
