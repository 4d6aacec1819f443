"""Checkpoints: one schema that says what each kind holds, and one way to write, read and check them.

    vqvae  best_model.pt  the best VQ-VAE epoch: weights, the arguments that rebuild it, its scores and settings
    prior  best_prior.pt  the best prior epoch, likewise, and the VQ-VAE checkpoint whose codes it models
    state  last.pt        everything --resume needs to continue a run exactly where it stopped

Each file records its kind and the schema's FORMAT. Files are written atomically and read with weights_only=True;
a missing, truncated, foreign or wrong-kind file, or one written by another version of the project, is one line.
"""
import io
import os
import pickle
import zipfile

import torch

from modules import VQVAE, CodePrior
from utils import DataError, newest, write_file

FORMAT = 1  # bump when a kind's fields change: older files are then refused with one line, never half-read
SCHEMA = {
    "vqvae": ("model", "model_args", "config", "epoch", "val_ssim", "score", "data_root", "image_size",
              "normalisation"),
    "prior": ("model", "model_args", "config", "epoch", "val_bits_per_code", "score", "unigram_bits_per_code",
              "vqvae_checkpoint"),
    "state": ("model", "optimizer", "rng", "stage", "config", "data", "position"),
}
NAMES = {"vqvae": "a VQ-VAE (best_model.pt)", "prior": "a prior (best_prior.pt)",
         "state": "a training state (last.pt), for --resume"}
MODELS = {"vqvae": VQVAE, "prior": CodePrior}


def save(path, kind, **fields):
    """Write a checkpoint of `kind` holding exactly the schema's fields."""
    assert set(fields) == set(SCHEMA[kind]), f"{kind} checkpoint fields {sorted(fields)} != {sorted(SCHEMA[kind])}"
    buf = io.BytesIO()  # serialised in memory, so that a failing disk raises OSError, not torch's RuntimeError
    torch.save(dict(kind=kind, format=FORMAT, **fields), buf)
    write_file(path, buf.getvalue())


def load(path, kind=None, device="cpu", mmap=False):
    """A checkpoint's dict; with `kind`, any other kind is refused, saying what the file is."""
    path = str(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: checkpoint not found" if not os.path.exists(path) else f"{path}: not a file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive: anything else is truncated or foreign
        raise DataError(f"{path}: not a torch checkpoint (truncated, or another kind of file)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        raise DataError(f"{path}: refused: it holds objects other than tensors and plain data, which are not loaded "
                        "(weights_only)") from None
    except Exception as e:
        raise DataError(f"{path}: corrupt checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT or ckpt.get("kind") not in SCHEMA:
        raise DataError(f"{path}: not a checkpoint of this version of the project (format {FORMAT}); retrain, or "
                        "use the version that wrote it")
    if kind and ckpt["kind"] != kind:
        raise DataError(f"{path}: {NAMES[ckpt['kind']]}; expected {NAMES[kind]}")
    return ckpt


def load_model(path, device="cpu", kind="vqvae"):
    """A best-epoch checkpoint -> (its model in eval mode, the checkpoint dict)."""
    ckpt = load(path, kind, device)
    model = MODELS[kind](**ckpt["model_args"]).to(device)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


def find(path, pattern):
    """The given checkpoint path, or the newest file matching pattern (e.g. runs/*/best_model.pt)."""
    path = path or newest(pattern)
    if path is None:
        raise DataError(f"no checkpoint given and none found as {pattern}; train first")
    return path


def kept(folder):
    """What a run folder keeps, in words: each checkpoint with its epoch (for the line of a run that stops)."""
    found = []
    for name in ("best_model.pt", "best_prior.pt", "last.pt"):
        try:
            c = load(os.path.join(folder, name), mmap=True)
        except DataError:
            continue
        done = f"epoch {c['epoch']}" if "epoch" in c else f"{c['position']['epoch']} epochs done"
        found.append(f"{os.path.join(folder, name)} ({done})")
    return "kept: " + ", ".join(found) if found else "no checkpoint was written yet"
