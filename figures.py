"""Every figure the project draws, written atomically (matplotlib is imported only when one is drawn).

Slices are stored transposed (axis 0, 256, runs left-right), so each is shown as img.T: a wide axial slice.
"""
import os

import numpy as np

from dataset import LABELS, REGIONS
from metrics import MIN_REGION_PIXELS, score
from utils import write_file

PROSTATE = 5
OUTLINED = {PROSTATE: "red", 3: "cyan"}  # prostate and bladder in the reconstruction figures
LABEL_COLOURS = ["#000000", "#5a5a5a", "#f0e2a8", "#3d8fd9", "#c87533", "#e0301e"]  # LABELS' order


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path, dpi=100):
    """A figure as a PNG, atomically; the figure is closed either way."""
    try:
        write_file(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    finally:
        pyplot().close(fig)


def plot_grid(x, path, titles=None, ncols=4):
    """A grid of slices (N, H, W) in [0, 1]."""
    plt = pyplot()
    nrows = -(-len(x) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols, 1.7 * nrows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(x):
            ax.imshow(np.asarray(x[i]).T, cmap="gray", vmin=0, vmax=1)
            if titles:
                ax.set_title(titles[i], fontsize=7)
    fig.tight_layout()
    save(fig, path)


def plot_reconstructions(x, rec, path, title="", masks=None):
    """Rows: originals, reconstructions, absolute error; x, rec (N, H, W) in [0, 1]. With masks (N, H, W) of
    labels, the prostate and the bladder are outlined on the originals and reconstructions."""
    plt = pyplot()
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
    save(fig, path)


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


def plot_split(prepared, reconstructions_of, path, title, n=6):
    """The reconstruction figure of a split: n slices from figure_slices, outlined where there are labels;
    reconstructions_of(indices) gives the reconstructions of the slices shown."""
    show = figure_slices(prepared, n)
    plot_reconstructions(prepared["x"][show], reconstructions_of(show), path, title, shown_masks(prepared, show))


def strip(x, rec):
    """Slices (N, H, W) above their reconstructions, as one (2 * W, N * H) image in [0, 1] (for TensorBoard)."""
    return np.concatenate([np.concatenate(list(a.transpose(0, 2, 1)), 1) for a in (x, np.clip(rec, 0, 1))])


def plot_curves(rows, out):
    """loss.png from train_loss, and one figure per validation metric that the rows carry."""
    plt = pyplot()
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
        save(fig, os.path.join(out, name))


def plot_samples(out, samples, to_train, nearest, train_x):
    """samples.png (16 samples, each with its SSIM to the nearest training slice), samples_64.png (the next 64, to
    look at many) and samples_nearest.png (8 samples, each beside that training slice)."""
    plot_grid(samples[:16], os.path.join(out, "samples.png"),
              [f"sample {i}, nearest train SSIM {s:.2f}" for i, s in enumerate(to_train[:16])])
    first = 16 if len(samples) > 16 else 0  # the 64 after samples.png's, where there are more
    more = samples[first:first + 64]
    plot_grid(more, os.path.join(out, "samples_64.png"), [f"sample {first + i}" for i in range(len(more))], ncols=8)
    n = min(8, len(samples))
    pairs = np.stack([a for i in range(n) for a in (samples[i], train_x[nearest[i]])])
    plot_grid(pairs, os.path.join(out, "samples_nearest.png"),
              [t for i in range(n) for t in (f"sample {i}", f"nearest train, SSIM {to_train[i]:.3f}")], ncols=4)


def plot_qc(path, x, rec, maps, titles):
    """Columns: the most unusual slices, each above its reconstruction and its anomaly map (0 to the 99.5th
    percentile of all maps shown)."""
    plt = pyplot()
    n = len(x)
    if not n:
        return
    vmax = max(float(np.percentile(maps, 99.5)), 1e-6)
    fig, axes = plt.subplots(3, n, figsize=(2.6 * n, 5.0), squeeze=False)
    for i in range(n):
        for row, (img, cmap, top) in enumerate(((x[i], "gray", 1), (np.clip(rec[i], 0, 1), "gray", 1),
                                               (maps[i], "inferno", vmax))):
            axes[row, i].imshow(img.T, cmap=cmap, vmin=0, vmax=top)
            axes[row, i].axis("off")
        axes[0, i].set_title(titles[i], fontsize=7)
    for row, name in enumerate(("slice", "reconstruction", "anomaly map")):
        axes[row, 0].text(-0.05, 0.5, name, transform=axes[row, 0].transAxes, rotation=90, va="center", ha="right",
                          fontsize=8)
    fig.tight_layout()
    save(fig, path)


def plot_phantom(path, slices):
    """Phantom slices beside their label maps, [(title, image, labels)], with a legend (the README's figure)."""
    write_file(path, lambda f: phantom_panels(slices).save(f, format="png", optimize=True))


def phantom_panels(slices):
    """[(title, image, labels)] -> a PIL image of each slice beside its labels, with a legend."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    from PIL import Image
    plt = pyplot()
    rows = (len(slices) + 1) // 2
    fig, axes = plt.subplots(rows, 4, figsize=(12, 1.62 * rows + 0.35), dpi=80)
    for i, (title, img, lab) in enumerate(slices):
        ax_i, ax_l = axes.flat[2 * i], axes.flat[2 * i + 1]
        ax_i.imshow(img.T, cmap="gray", vmin=0, vmax=np.percentile(img, 99.5), interpolation="antialiased")
        ax_l.imshow(lab.T, cmap=ListedColormap(LABEL_COLOURS), vmin=-0.5, vmax=5.5, interpolation="nearest")
        ax_i.set_title(title, fontsize=8, pad=2)
        ax_l.set_title("labels", fontsize=8, pad=2)
    for ax in axes.flat:
        ax.axis("off")
    fig.legend(handles=[Patch(color=col, label=f"{i} {name}") for i, (col, name) in enumerate(zip(LABEL_COLOURS,
                                                                                                   LABELS))],
               loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.subplots_adjust(left=0.005, right=0.995, top=0.96, bottom=0.35 / (1.62 * rows + 0.35) + 0.01,
                        wspace=0.02, hspace=0.15)
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    return rgb.quantize(128, method=Image.Quantize.MEDIANCUT)  # 128 colours: grey levels and the six labels
