"""Slices from disk to normalised arrays and back: find the course layout, split by patient, load, resize, normalise,
cache; read any NIfTI files, folder or 3D volume, and write results in an input's shape, affine and header.

Normalisation: each slice is scaled by its own minimum and maximum to [0, 1] (the same scaling the reported SSIM
uses), and (lo, hi) are kept per slice so x * (hi - lo) + lo puts a reconstruction back in the file's units.
Labels: where a split folder keras_slices_<split> has a sibling keras_slices_seg_<split>, each image
case_XXX_week_N_slice_K is paired with seg_XXX_week_N_slice_K there, resized with nearest-neighbour.
"""
import contextlib
import glob
import hashlib
import itertools
import json
import os
import re

import numpy as np
from scipy.ndimage import affine_transform
from skimage.transform import resize

from pool import n_workers, parallel_map
from utils import DataError, WriteError, doing, read_image, read_nifti, write_file, write_nifti, write_text

H, W = 256, 128
SPLITS = ("train", "validate", "test")
LABELS = ("background", "body", "bone", "bladder", "rectum", "prostate")  # the study's label values 0-5
REGIONS = {value: name for value, name in enumerate(LABELS) if value}  # scored per organ: all but the background
PREP_VERSION = 2  # bump when load_slice or load_mask changes, so old caches are never used


def list_slices(folder, single_file=False):
    """Sorted NIfTI files (*.nii, *.nii.gz) of one folder; with single_file, the path may also name one file."""
    if single_file and os.path.isfile(folder):
        return [folder]
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: {'file or folder' if single_file else 'folder'} not found")
    files = sorted(glob.glob(os.path.join(folder, "*.nii")) + glob.glob(os.path.join(folder, "*.nii.gz")))
    if not files:
        raise DataError(f"{folder}: no .nii or .nii.gz files")
    return files


def case_id(path):
    m = re.search(r"case_(\d+)", os.path.basename(path))
    if not m:
        raise DataError(f"{path}: name has no case_XXX part, cannot hold out whole patients")
    return m.group(1)


def patient_split(files, val_fraction, seed):
    """Hold out whole patients: a patient's slices all land on one side."""
    cases = sorted({case_id(f) for f in files})
    if len(cases) < 2:
        raise DataError(f"{os.path.dirname(files[0])}: one patient only, cannot hold out a validation patient")
    n_val = min(len(cases) - 1, max(1, round(len(cases) * val_fraction)))
    held = set(np.random.default_rng(seed).choice(cases, n_val, replace=False))
    return [f for f in files if case_id(f) not in held], [f for f in files if case_id(f) in held]


def find_splits(data_dir=None, train_dir=None, validate_dir=None, test_dir=None, val_fraction=0.1, seed=0):
    """{split: [files]} from a course-layout root and/or per-split folders (a per-split folder wins)."""
    dirs = {s: os.path.join(data_dir, f"keras_slices_{s}") if data_dir else None for s in SPLITS}
    for s, d in zip(SPLITS, (train_dir, validate_dir, test_dir)):
        dirs[s] = d or dirs[s]
    if dirs["train"] is None:
        raise DataError("no training data: set data_dir or train_dir")
    splits = {"train": list_slices(dirs["train"])}
    if dirs["validate"] and os.path.isdir(dirs["validate"]):
        splits["validate"] = list_slices(dirs["validate"])
    else:
        splits["train"], splits["validate"] = patient_split(splits["train"], val_fraction, seed)
    if dirs["test"] and (test_dir or os.path.isdir(dirs["test"])):
        splits["test"] = list_slices(dirs["test"])
    patients = {s: {case_id(f) for f in files} for s, files in splits.items()}
    for a, b in itertools.combinations(splits, 2):
        if patients[a] & patients[b]:
            raise DataError(f"{dirs[b]}: patients {sorted(patients[a] & patients[b])} are in both {a} and {b}")
    return splits


def write_splits(path, root, prepared):
    """splits.json: the data root and the files of each prepared split (later stages read them back)."""
    write_text(path, json.dumps({"data_root": os.path.abspath(root), **{s: p["files"] for s, p in prepared.items()}},
                                indent=1))


def read_splits(run_folder):
    """The splits.json of a VQ-VAE run: {"data_root": ..., split: [files]}."""
    path = os.path.join(run_folder, "splits.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the run's splits ({type(e).__name__}: {e})") from None


def split_files(run_folder, split, data_dir=None, data_root=None, val_fraction=0.1, seed=0):
    """A split's files: from data_dir when given, else from the run's splits.json, else from data_root (the data a
    checkpoint was trained on), split as the run split it."""
    if data_dir is None and os.path.exists(os.path.join(run_folder, "splits.json")):
        splits = read_splits(run_folder)
        if split in splits:
            return splits[split]
    root = data_dir or data_root
    splits = find_splits(root, val_fraction=val_fraction, seed=seed)
    if split not in splits:
        raise DataError(f"{root}: no {split} split")
    return splits[split]


class ConstantSlice(DataError):
    """A slice with one value throughout (scanner padding at the end of a scan): no image to learn, skipped."""


def normalise(a, path=""):
    """A 2D array -> float32 (H, W) in [0, 1], resized if needed, and its (lo, hi) intensity range."""
    if a.max() == a.min():
        raise ConstantSlice(f"{path}: constant slice (every value is {a.min():g}), skipped")
    if a.shape != (H, W):
        a = resize(a, (H, W), anti_aliasing=True, preserve_range=True)
    lo, hi = float(a.min()), float(a.max())
    return ((a - lo) / (hi - lo)).astype(np.float32), lo, hi


def load_slice(path, mask=None):
    """One file -> float32 (H, W) in [0, 1], its (lo, hi) intensity range, and the labels of the label file mask
    (None without one). Raises DataError."""
    raw = read_nifti(path)
    return (*normalise(raw, path), None if mask is None else load_mask(mask, path, raw.shape))


def seg_folder(folder):
    """keras_slices_<split> -> its sibling keras_slices_seg_<split>, or None for a folder outside that layout."""
    folder = os.path.normpath(folder)
    name = os.path.basename(folder)
    if not name.startswith("keras_slices_") or name.startswith("keras_slices_seg_"):
        return None
    return os.path.join(os.path.dirname(folder), "keras_slices_seg_" + name[len("keras_slices_"):])


def pairing_key(path, prefix):
    """The part of a file name that pairs an image with its labels: case_004_week_0_slice_1.nii.gz and
    seg_004_week_0_slice_1.nii.gz both give 004_week_0_slice_1."""
    name = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path))
    return name[len(prefix):] if name.startswith(prefix) else name


def find_masks(files):
    """The label file of each image, or None when the images' folders have no seg folder. An image without its
    label file is a DataError naming both."""
    folders = {os.path.dirname(f) for f in files}
    segs = {d: seg_folder(d) for d in folders}
    if not all(s and os.path.isdir(s) for s in segs.values()):
        return None
    listed = {(s, pairing_key(m, "seg_")): m for s in set(segs.values())
              for m in glob.glob(os.path.join(s, "seg_*.nii*"))}
    masks = []
    for f in files:
        key, seg = pairing_key(f, "case_"), segs[os.path.dirname(f)]
        if (seg, key) not in listed:
            raise DataError(f"{f}: no label file seg_{key}.nii[.gz] in {seg}")
        masks.append(listed[(seg, key)])
    return masks


def load_mask(path, image, shape):
    """Labels of one slice -> uint8 (H, W), resized with nearest-neighbour. The label file must have its image's
    shape and hold only the study's labels."""
    m = read_nifti(path)
    if m.shape != shape:
        raise DataError(f"{path}: labels of shape {m.shape} do not match {image} of shape {shape}")
    bad = ~np.isin(m, [0, *REGIONS])
    if bad.any():
        raise DataError(f"{path}: {np.count_nonzero(bad)} values are not labels 0-{max(REGIONS)} (e.g. {m[bad][0]:g})")
    if m.shape != (H, W):
        m = resize(m, (H, W), order=0, anti_aliasing=False, preserve_range=True)
    return m.astype(np.uint8)


def read_inputs(path, skip_bad=False):
    """A NIfTI file or a folder of them, in any layout: 2D slices, or 3D volumes (H, W, D) taken slice by slice along
    their last axis -> what prepare() gives (x, lo, hi, files: a name per slice, with :k in a volume, masks=None,
    skipped), with sources (each slice's file), index (its place on a volume's last axis; None in a 2D file) and
    read (every file read). Constant slices are skipped, and with skip_bad the files that cannot be read; both are
    listed in skipped."""
    p = dict(x=[], lo=[], hi=[], files=[], sources=[], index=[], read=[], masks=None, skipped=[])
    for f in list_slices(path, single_file=True):
        try:
            a = read_image(f)[1]
            if a.ndim not in (2, 3):
                raise DataError(f"{f}: expected a 2D slice or a 3D volume (H, W, D), got shape {a.shape}")
        except DataError as e:
            if not skip_bad:
                raise
            p["skipped"].append(str(e))
            continue
        vol = a.reshape(a.shape[0], a.shape[1], -1)
        volume = vol.shape[2] > 1
        p["read"].append(f)
        for k in range(vol.shape[2]):
            name = f"{os.path.basename(f)}:{k}" if volume else os.path.basename(f)
            try:
                x, lo, hi = normalise(vol[:, :, k], name)
            except ConstantSlice as e:
                p["skipped"].append(str(e))
                continue
            for key, v in zip(("x", "lo", "hi", "files", "sources", "index"),
                              (x, lo, hi, name, f, k if volume else None)):
                p[key].append(v)
    if not p["files"]:
        raise DataError(f"{path}: every slice is constant or unreadable, nothing to read ({len(p['skipped'])} "
                        "skipped)")
    return dict(p, x=np.array(p["x"], np.float32), lo=np.array(p["lo"]), hi=np.array(p["hi"]))


def to_file_shape(a, shape2d):
    """A slice (H, W) -> a file's in-plane shape, by linear interpolation."""
    return a if a.shape == shape2d else resize(a, shape2d, order=1, preserve_range=True, anti_aliasing=False)


def write_like(source, slices, index, path, keep_source=True):
    """Arrays (N, H, W), each for the slice index[i] of the NIfTI file source (None: its only slice) -> a float32
    NIfTI file at path in the source's shape, affine and header, each slice resized to its in-plane shape; the
    slices not given are the source's own (keep_source) or zero."""
    img, a = read_image(source)
    vol = (a.copy() if keep_source else np.zeros(a.shape)).reshape(a.shape[0], a.shape[1], -1)
    for k, s in zip(index, slices):
        vol[:, :, k or 0] = to_file_shape(s, vol.shape[:2])
    write_nifti(path, vol.reshape(a.shape).astype(np.float32), img.affine, img.header)


def denormalise(x, lo, hi):
    """Inverse of the per-slice scaling; x (..., H, W), lo/hi broadcastable per slice."""
    return x * (hi - lo) + lo


def _load_or_error(item):
    """(image, label file or None) -> (x, lo, hi, mask or None), or the one-line problem as a string; a constant
    slice comes back as the ConstantSlice itself, to be skipped."""
    try:
        return load_slice(*item)
    except ConstantSlice as e:
        return e
    except DataError as e:
        return str(e)


def _read_cache(path):
    """A prepared split from its .json and .npy files; raises ValueError if they do not fit together."""
    with open(path + ".json") as f:
        cached = json.load(f)
    # mapped copy-on-write: pages come straight from the OS page cache as they are touched, no 1.6 GB copy
    x = np.load(path + ".npy", mmap_mode="c")
    masks = np.load(path + ".masks.npy", mmap_mode="c") if cached.pop("has_masks") else None
    n = len(cached["files"])
    if x.shape != (n, H, W) or len(cached["lo"]) != n or len(cached["hi"]) != n or (
            masks is not None and masks.shape != x.shape):
        raise ValueError(f"array of shape {x.shape} for {n} files")
    return dict(x=x, masks=masks, **{k: np.array(v) if k in ("lo", "hi") else v for k, v in cached.items()})


def _write_cache(path, res):
    """The .npy files first and the .json last, each written atomically, so an interrupted write is never taken
    for a cache, and the files of one that is interrupted (SIGTERM, a full disk) are removed. A cache that cannot
    be written (disk full, read-only) is only a slower next start: said, not fatal."""
    arrays = [("", res["x"])] + ([(".masks", res["masks"])] if res["masks"] is not None else [])
    doing(f"writing the cache {path}")
    written = []
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for suffix, a in arrays:
            write_file(f"{path}{suffix}.npy", lambda f: np.save(f, a))
            written.append(f"{path}{suffix}.npy")
        write_text(path + ".json", json.dumps(dict(has_masks=res["masks"] is not None, **{
            k: v.tolist() if k in ("lo", "hi") else v for k, v in res.items() if k not in ("x", "masks")})))
    except BaseException as e:
        for f in written:
            with contextlib.suppress(OSError):
                os.remove(f)
        if not isinstance(e, (OSError, WriteError)):
            raise
        print(f"cache {path}: not written ({e}); the next start prepares the data again", flush=True)


def _cache_key(files):
    stats = [(f, os.path.getsize(f), os.stat(f).st_mtime_ns) for f in files if f is not None]
    return hashlib.sha1(json.dumps([PREP_VERSION, H, W, stats]).encode()).hexdigest()[:16]


def prepare(files, cache_dir=None, skip_bad=False, desc="prepare", workers=None):
    """Load every file once -> dict(x=float32 (N, H, W) in [0, 1], lo, hi, files, masks=uint8 (N, H, W) labels or
    None, skipped, bad).

    Constant slices are dropped and listed in skipped. Bad files raise one DataError listing each (file: problem),
    unless skip_bad, which drops them too and lists them in skipped and bad. With cache_dir, the result is stored
    under a key of the file lists, sizes, mtimes and preprocessing settings, so any change rebuilds it and nothing
    stale is used."""
    masks = find_masks(files) or [None] * len(files)
    path = os.path.join(cache_dir, f"{desc}-{_cache_key(files + masks)}") if cache_dir else None
    if path and os.path.exists(path + ".json"):
        try:
            cached = _read_cache(path)
        except (OSError, ValueError, KeyError) as e:  # truncated or corrupt: rebuild it, saying so
            print(f"cache {path}: unreadable ({type(e).__name__}: {e}); rebuilding it", flush=True)
            cached = None
        if cached and (skip_bad or not cached["bad"]):  # a strict run must still refuse the bad files it skipped
            return cached
    doing(f"preparing the {desc} slices ({len(files)} files)")
    out = parallel_map(_load_or_error, list(zip(files, masks)), workers or n_workers(len(files)), files, desc)
    bad = [o for o in out if isinstance(o, str)]
    if bad and not skip_bad:
        raise DataError("\n".join(bad))
    good = [(f, o) for f, o in zip(files, out) if isinstance(o, tuple)]
    if not good:
        raise DataError(f"{os.path.dirname(files[0])}: no usable slices ({len(out)} skipped)")
    res = dict(x=np.stack([o[0] for _, o in good]), lo=np.array([o[1] for _, o in good]),
               hi=np.array([o[2] for _, o in good]), files=[f for f, _ in good],
               masks=np.stack([o[3] for _, o in good]) if masks[0] is not None else None,
               skipped=[str(o) for o in out if isinstance(o, ConstantSlice)] + bad, bad=bad)
    if path:
        _write_cache(path, res)
    return res


def augment(x, rng, zoom=0.05, shift=8):
    """Copies of slices x (N, H, W) in [0, 1], each flipped left-right with probability 1/2, zoomed by up to +-zoom
    and shifted by up to +-shift pixels on each axis (linear interpolation, the border's value outside), one draw per
    slice: new slices of the same anatomy, for the prior's training grids."""
    out = np.empty_like(x)
    centre = (np.array(x.shape[1:]) - 1) / 2
    for i, s in enumerate(x):
        scale = 1 + rng.uniform(-zoom, zoom)
        offset = centre - centre / scale + rng.uniform(-shift, shift, 2)
        s = s[::-1] if rng.random() < 0.5 else s
        out[i] = affine_transform(s, np.full(2, 1 / scale), offset=offset, order=1, mode="nearest")
    return out


def batches(n, batch_size, seed, epoch, rank=0, world=1, shuffle=True):
    """Index batches for one epoch: a seeded permutation, this rank's shard; every rank gets the same count."""
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    per_rank = n // world if shuffle else -(-n // world)
    mine = order[rank::world][:per_rank]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]

