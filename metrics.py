"""The measures the project reports, each defined once.

Reconstruction (see README, The metric): each ground-truth slice is scaled to [0, 1] by its own min and max; the
reconstruction, in the same intensity units, is scaled by that same min and max and clipped to [0, 1]; SSIM is
scikit-image's `structural_similarity` with its defaults (7x7 uniform window, K1=0.01, K2=0.03, sample covariance)
and data_range=1; PSNR uses data_range=1. `ssim_torch` is a batched twin of the scikit-image SSIM, checked in
tests. Per-organ scores (where the data has segmentation labels) average the same SSIM map over an organ's pixels.

Generation (see README, Generation): the classifier two-sample test with its Wilson interval, diversity, left-right
symmetry, coverage and the distance of each sample to its nearest training slice.

Quality control (see README, QC): MRQy-style image statistics of one slice, and the detection measures of a score,
AUROC and average precision (MOOD's metric), defined as scikit-learn defines them.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from skimage.filters import threshold_triangle
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dataset import REGIONS, case_id, prepare
from utils import write_csv

MIN_REGION_PIXELS = 20  # a slice counts toward a region's mean only where the region has this many pixels
SIMILARITY_POOL = 2  # slices compared with one another (nearest slice, diversity, coverage) are first averaged over
                     # 2x2 pixels: SSIM at 128x64 costs a tenth of SSIM at 256x128


# ---- reconstruction: the reference metric (scikit-image) ------------------------------------------------------

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
    write_csv(path, ["file", *scores], [[name, *("" if np.isnan(v[i]) else f"{v[i]:.6f}" for v in scores.values())]
                                        for i, name in enumerate(names)])


@torch.no_grad()
def reconstruct(model, x, device, batch_size=64, amp=False, decode=True):
    """A VQ-VAE (in eval mode) over slices x float32 (N, H, W) in [0, 1] (numpy) -> reconstructions (N, H, W) numpy,
    unclipped (None without decode), and codes (N, h, w); with amp, under bf16 autocast (as in training on the GPU
    path)."""
    recs, codes, device = [], [], torch.device(device)
    for i in range(0, len(x), batch_size):
        xb = torch.as_tensor(x[i:i + batch_size], device=device)[:, None]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            if decode:
                rec, _, idx = model(xb)
                recs.append(rec.float()[:, 0].cpu().numpy())
            else:
                idx = model.encode(xb)
        codes.append(idx.cpu().numpy())
    return np.concatenate(recs) if decode else None, np.concatenate(codes)


def evaluate_split(model, prepared, device, batch_size=64, amp=False):
    """Reconstruct a prepared split and score it with the reference metric -> (reconstructions, per-slice scores
    from score_split, their split_means). The test scoring of train.py and predict.py are this one function."""
    rec, _ = reconstruct(model, prepared["x"], device, batch_size, amp)
    scores = score_split(prepared["x"], rec, prepared["lo"], prepared["hi"], prepared.get("masks"))
    return rec, scores, split_means(scores)


# ---- reconstruction on the device: the batched twin, and nearest slices ---------------------------------

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
    return s.mean(dim=(-3, -2, -1))


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
def ssim_matrix(queries, pool, chunk=8):
    """SSIM of every query (N, 1, H, W) against every pool slice (M, 1, H, W), all in [0, 1] -> (N, M). Each side's
    local statistics are computed once; a block of chunk x chunk pairs then costs one batched pooled product."""
    q_stats = [ssim_stats(c) for c in queries.split(chunk)]
    p_stats = [ssim_stats(c) for c in pool.split(chunk)]
    return torch.cat([torch.cat([ssim_from_stats([s[:, None] for s in q], [s[None] for s in p]) for p in p_stats], 1)
                      for q in q_stats])  # (n, 1, ...) against (1, m, ...) broadcasts to the n x m pairs


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


# ---- generation ---------------------------------------------------------------------------------------------

def coarse(x):
    """Slices (N, 1, H, W) averaged over SIMILARITY_POOL x SIMILARITY_POOL pixels, for SSIM between slices."""
    return F.avg_pool2d(x, SIMILARITY_POOL)


def quartiles(a):
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return dict(median=float(med), q1=float(q1), q3=float(q3), max=float(np.max(a)), n=len(a))  # max: nearest to a copy


def mirror_ssim(x):
    """Each slice's SSIM to its own left-right mirror image (N,) numpy: how much its two halves agree. A prior that
    draws one femoral head and not the other scores lower than real slices."""
    return ssim_torch(x, torch.flip(x, dims=[2])).double().cpu().numpy()


def median_pairwise_ssim(x):
    """Median SSIM over all pairs of distinct slices in x (N, 1, H, W): higher means less diverse."""
    s = ssim_matrix(x, x)
    return float(s[torch.triu_indices(len(x), len(x), 1).unbind()].median())


def density_coverage(real, fake, k=5, patients=None):
    """Density and coverage of Naeem et al. 2020, with SSIM as the similarity: each real slice's neighbourhood
    reaches as far as its k-th most similar other real slice, of another patient where patients (a patient per real
    slice) are given: neighbouring slices of one patient are near-copies, and would otherwise set every reach
    within the patient, leaving no room for anyone else's slices. Coverage is the share of real slices whose
    neighbourhood holds at least one fake slice (1: no part of the real set is missed); density is how many real
    neighbourhoods hold each fake slice, over k (about 1 where fakes are distributed as the real slices are)."""
    rr = ssim_matrix(real, real)
    same = torch.eye(len(real), dtype=torch.bool)
    if patients is not None:
        p = np.asarray(patients)
        same = torch.from_numpy(p[:, None] == p[None, :])
    radius = rr.masked_fill(same, -math.inf).topk(k, dim=1).values[:, -1:]
    inside = ssim_matrix(real, fake) >= radius  # (R, F): fake f lies in real r's neighbourhood
    return dict(coverage=float(inside.any(1).float().mean()), density=float(inside.sum() / (k * len(fake))))


def classifier():
    """The two-sample test's CNN: 256x128 -> five stride-2 convolutions, each batch-normalised (without it a few
    epochs leave the CNN blind to blur) -> mean over the grid -> one logit. It sees the slice at full resolution,
    where texture differs, and its deepest features span 63 pixels, a femoral head with its acetabulum."""
    layers, width = [], 1
    for w in (8, 16, 32, 64, 64):
        layers += [nn.Conv2d(width, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        width = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1))


def c2st(real, fake, folds=4, steps=100, seed=0, batch_size=32):
    """Classifier two-sample test, cross-fitted: N real and N fake slices (N, 1, H, W; N the smaller count) are dealt
    into `folds` folds of equal numbers of each; for each fold a fresh CNN learns to tell fake from real on the other
    folds and labels the held-out one, so that every slice is labelled once, by a classifier that never saw it.
    -> the accuracy over the 2N held-out labels with its 95% Wilson interval. 0.5: indistinguishable."""
    n = min(len(real), len(fake))
    gen = torch.Generator().manual_seed(seed)
    real, fake = (a[torch.randperm(len(a), generator=gen)[:n]] for a in (real, fake))
    x = torch.cat([real, fake])
    y = torch.cat([torch.zeros(n), torch.ones(n)])
    fold = torch.arange(2 * n) % n % folds  # the i-th real and the i-th fake slice share a fold
    correct = 0.0
    for f in range(folds):
        fit, held = fold != f, fold == f
        with torch.random.fork_rng():  # the classifier's own seeded initialisation, not the caller's stream
            torch.manual_seed(seed + f)
            net = classifier()
        fit_classifier(net, x[fit], y[fit], steps, batch_size, torch.Generator().manual_seed(seed + f))
        with torch.no_grad():
            correct += float(((net.eval()(x[held])[:, 0] > 0).float() == y[held]).sum())
    return dict(accuracy=correct / (2 * n), ci95=wilson(correct, 2 * n), n_real=n, n_fake=n, folds=folds)


def fit_classifier(net, x, y, steps, batch_size, gen):
    """`steps` steps of Adam on the binary cross-entropy, over shuffled mini-batches (epoch after epoch)."""
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    batches = []
    for _ in range(steps):
        if not batches:
            batches = list(torch.randperm(len(x), generator=gen).split(batch_size))
        idx = batches.pop(0)
        loss = nn.functional.binary_cross_entropy_with_logits(net(x[idx])[:, 0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def wilson(k, n, z=1.96):
    """95% Wilson score interval of a proportion k / n."""
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [centre - half, centre + half]


def real_slices(vqvae, splits, cache_dir, dev, batch_size=64, amp=False):
    """The real slices samples are judged against, each as the VQ-VAE reconstructs it (samples are decoder outputs
    too): the training split's, with each one's patient, and the validation split's; and the stored training
    slices, for the search of each sample's nearest."""
    out = {}
    for split in ("train", "validate"):
        p = prepare(splits[split], cache_dir, True, desc=split)
        rec, _ = reconstruct(vqvae, p["x"], dev, batch_size, amp)
        out[split] = torch.from_numpy(rec).clamp(0, 1)[:, None]
        if split == "train":
            out["train_x"] = torch.from_numpy(p["x"])[:, None]
            out["patients"] = [case_id(f) for f in p["files"]]
    return out


def judge(samples, real, n_real=256, c2st_steps=100, seed=0):
    """Samples (N, 1, H, W) in [0, 1] against real_slices(), the measures of README, Generation: the two-sample test
    against n_real training reconstructions; density and coverage of half the training patients by the samples
    beside the same by the other half (the real yardstick), each reference slice's reach set by other patients'
    slices; diversity and symmetry beside the real slices'; and each sample's SSIM to its nearest training slice
    beside the same for validation reconstructions (patients the prior never saw), which no copy of a training
    slice matches -> (measures, each sample's SSIM to its nearest training slice, that slice's index)."""
    pick = np.linspace(0, len(real["train"]) - 1, min(n_real, len(real["train"]))).astype(int)
    compared = real["train"][pick]
    patients = np.asarray(real["patients"])
    halves = np.isin(patients, sorted(set(patients))[::2])
    a, b = real["train"][halves][:n_real], real["train"][~halves][:n_real]
    # k: the neighbours that set each real slice's reach, of other patients where half a holds more than one
    by = patients[halves][:n_real]
    others = int(min(np.sum(by != p) for p in by))
    by, k = (by, min(5, others)) if others else (None, min(5, len(a) - 1))
    n = min(len(b), len(samples))
    pool = coarse(real["train_x"])
    s_samples, nearest = nearest_ssim(coarse(samples), pool)
    s_val, _ = nearest_ssim(coarse(real["validate"]), pool)
    return dict(c2st=c2st(compared, samples, steps=c2st_steps, seed=seed),
                density_coverage=dict(samples=density_coverage(coarse(a), coarse(samples[:n]), k, by),
                                      real=density_coverage(coarse(a), coarse(b[:n]), k, by), n_reference=len(a),
                                      n=n, k=k, radii="another patient's slices" if others else "any other slice"),
                diversity=dict(samples=median_pairwise_ssim(coarse(samples)),
                               real=median_pairwise_ssim(coarse(compared))),
                symmetry=dict(samples=quartiles(mirror_ssim(samples)), real=quartiles(mirror_ssim(compared))),
                nearest_train_ssim=dict(samples=quartiles(s_samples), validation=quartiles(s_val))), s_samples, nearest


# ---- quality control -----------------------------------------------------------------------------------------

def image_statistics(x):
    """MRQy-style statistics (Sadri et al. 2020) of one slice x (H, W) in [0, 1], with the foreground (fg) above the
    triangle threshold (which finds the body against the background's peak: Dice 0.97-0.99 with the phantom's
    body labels, where Otsu's splits fat from muscle) and the background (bg) below it -> dict: snr = mean(fg) /
    std(bg); cnr = |mean(fg) - mean(bg)| / sqrt(var(fg) + var(bg)); cv = std(fg) / mean(fg); background =
    mean(bg) / mean(fg); efc, the entropy focus criterion normalised to [0, 1] (1: every pixel alike; low: energy
    in few pixels); foreground, fg's share; saturation, the share of fg at the slice's maximum (within 1% of the
    range): a plateau where a receiver clipped."""
    x = x.astype(np.float64)
    fg = x > (threshold_triangle(x) if x.max() > x.min() else x.max())
    f, b = (x[fg], x[~fg]) if fg.any() and not fg.all() else (x.ravel(), x.ravel())
    eps = 1e-12
    n, energy = x.size, np.sqrt((x * x).sum()) + eps
    efc_max = n / np.sqrt(n) * np.log(1 / np.sqrt(n))
    efc = float(np.sum(x / energy * np.log(x / energy + eps)) / efc_max)
    return dict(snr=float(f.mean() / (b.std() + eps)), cnr=float(abs(f.mean() - b.mean()) / np.sqrt(f.var() + b.var()
                                                                                                    + eps)),
                cv=float(f.std() / (f.mean() + eps)), background=float(b.mean() / (f.mean() + eps)), efc=efc,
                foreground=float(fg.mean()), saturation=float(np.mean(f >= x.max() - 0.01 * (x.max() - x.min()))))


def auroc(labels, scores):
    """Area under the ROC curve of scores for binary labels (1: positive): the chance that a positive scores above a
    negative, ties counting half (the Mann-Whitney statistic; scikit-learn's roc_auc_score)."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, np.float64)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]  # average ranks, 1-based
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(labels, scores):
    """Average precision of scores for binary labels: the sum over thresholds of precision times the rise in recall,
    each run of tied scores one threshold (scikit-learn's average_precision_score; MOOD's metric)."""
    labels, scores = np.asarray(labels, bool).ravel(), np.asarray(scores, np.float64).ravel()
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last place of each run of tied scores
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
