import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from phantom import phantom_slice  # noqa: E402

TINY = ["--n_hiddens=16", "--n_residual_hiddens=8", "--n_residual_layers=1", "--embedding_dim=8",
        "--n_embeddings=32", "--batch_size=4", "--eval_batch_size=16", "--warmup_steps=2", "--cache_dir=None"]


def run(script, *args, cwd):
    """One of the repo's scripts as a user runs it, in folder cwd."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def write_slice(path, data, affine=None):
    img = nib.Nifti1Image(data, np.diag([0.7, 0.7, 3.0, 1.0]) if affine is None else affine)
    img.set_data_dtype(data.dtype)
    nib.save(img, str(path))


def make_study(root, cases=None, per_case=3, seed=0, seg=False):
    """A course-layout folder with the study's names, shapes and dtypes (all four kinds in every split), and with
    seg the label files beside them (keras_slices_seg_<split>/seg_XXX_week_N_slice_K)."""
    cases = cases or {"train": [4, 5, 6, 7], "validate": [36], "test": [40]}
    kinds = ["f32", "i16", "wide", "3d"]
    for split, ids in cases.items():
        d = os.path.join(root, f"keras_slices_{split}")
        os.makedirs(d, exist_ok=True)
        for c in ids:
            for k in range(per_case):
                kind = kinds[(c + k) % 4]
                # slices from the middle of a scan, where the organs are (the ends may be empty)
                a, labels = phantom_slice(c, 0, k + per_case, 3 * per_case, width=144 if kind == "wide" else 128,
                                          seed=seed, labels=True)
                a = np.rint(a).astype(np.int16) if kind == "i16" else a.astype(np.float32)
                if kind == "3d":
                    a, labels = a[..., None], labels[..., None]
                ext = ".nii" if k == 1 else ".nii.gz"
                write_slice(os.path.join(d, f"case_{c:03d}_week_0_slice_{k}{ext}"), a)
                if seg:
                    os.makedirs(os.path.join(root, f"keras_slices_seg_{split}"), exist_ok=True)
                    write_slice(os.path.join(root, f"keras_slices_seg_{split}", f"seg_{c:03d}_week_0_slice_{k}{ext}"),
                                labels)
    return str(root)


@pytest.fixture
def study(tmp_path):
    return make_study(tmp_path / "keras_slices_data")
