"""Checkpoints: what each kind holds, the models they rebuild, and one way to write, read and check them.

    vqvae  best_model.pt  the best VQ-VAE epoch: weights, the class and arguments that rebuild it, scores, settings
    prior  best_prior.pt  the best prior epoch, likewise, and the VQ-VAE checkpoint whose codes it models
    state  last.pt        everything --resume needs to continue a run exactly where it stopped

A model's checkpoint records its class, a name in MODELS, so that adding a model is one line there. Each file
records its kind and FORMAT. Files are written atomically and read with weights_only=True; a missing, truncated,
foreign or wrong-kind file, or one of an unknown format, is one line. A file of format 1, written before classes
were recorded (when each kind had one class), is read as its kind's class.
"""
import io
import os
import pickle
import zipfile

import torch

from prior import CodePrior
from utils import DataError, newest, write_file
from vqvae import VQVAE

MODELS = {m.__name__: m for m in (VQVAE, CodePrior)}  # every model a checkpoint can rebuild
FORMAT = 2  # bump when a kind's fields change; upgrade() reads the formats before it, or says what to do
MODEL_FIELDS = ("model", "model_class", "model_args", "config", "epoch", "score")
SCHEMA = {  # the fields each kind must hold (a stage may add its own)
    "vqvae": MODEL_FIELDS + ("val_ssim", "data_root", "image_size", "normalisation"),
    "prior": MODEL_FIELDS + ("val_bits_per_code", "unigram_bits_per_code", "vqvae_checkpoint"),
    "state": ("model", "optimizer", "rng", "stage", "config", "data", "position"),
}
NAMES = {"vqvae": "a VQ-VAE (best_model.pt)", "prior": "a prior (best_prior.pt)",
         "state": "a training state (last.pt), for --resume"}
FORMAT_1_CLASSES = {"vqvae": "VQVAE", "prior": "CodePrior"}


def save(path, kind, **fields):
    """Write a checkpoint of `kind` holding at least the schema's fields."""
    assert set(SCHEMA[kind]) <= set(fields), f"{kind} checkpoint lacks {sorted(set(SCHEMA[kind]) - set(fields))}"
    buf = io.BytesIO()  # serialised in memory, so that a failing disk raises OSError, not torch's RuntimeError
    torch.save(dict(kind=kind, format=FORMAT, **fields), buf)
    write_file(path, buf.getvalue())


def save_model(path, kind, model, model_args, **fields):
    """A model's checkpoint: its weights, its class and the arguments that rebuild it, and the kind's fields."""
    save(path, kind, model=model.state_dict(), model_class=type(model).__name__, model_args=model_args, **fields)


def save_state(path, model, optimizer, **fields):
    """A training state (last.pt): the model's and the optimiser's state and the random generators', with the stage,
    settings, data and position that --resume checks and continues from."""
    rng = dict(cpu=torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_initialized()
                                              else {}))
    save(path, "state", model=model.state_dict(), optimizer=optimizer.state_dict(), rng=rng, **fields)


def restore_state(state, model, optimizer, device):
    """A training state's weights, optimiser and random generators restored -> its position (a dict)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["position"]


def upgrade(path, ckpt):
    """A checkpoint of an earlier format, brought to this one, or a DataError that says what to do."""
    if isinstance(ckpt, dict) and ckpt.get("format") == 1 and ckpt.get("kind") in SCHEMA:
        return dict(ckpt, format=FORMAT, **({"model_class": FORMAT_1_CLASSES[ckpt["kind"]]}
                                            if ckpt["kind"] in FORMAT_1_CLASSES else {}))
    raise DataError(f"{path}: not a checkpoint of this version of the project (format {FORMAT}); retrain, or "
                    "use the version that wrote it")


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
        ckpt = upgrade(path, ckpt)
    if kind and ckpt["kind"] != kind:
        raise DataError(f"{path}: {NAMES[ckpt['kind']]}; expected {NAMES[kind]}")
    return ckpt


def load_model(path, device="cpu", kind="vqvae"):
    """A model checkpoint of `kind` -> (its model, rebuilt from its class and arguments, in eval mode; the dict)."""
    ckpt = load(path, kind, device)
    if ckpt["model_class"] not in MODELS:
        raise DataError(f"{path}: holds a {ckpt['model_class']}, a model this version of the project does not know")
    model = MODELS[ckpt["model_class"]](**ckpt["model_args"]).to(device)
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
