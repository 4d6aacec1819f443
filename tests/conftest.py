import contextlib
import importlib
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from phantom import phantom_slice  # noqa: E402
from utils import call_main  # noqa: E402

TINY = ["--n_hiddens=16", "--n_residual_hiddens=8", "--n_residual_layers=1", "--embedding_dim=8",
        "--n_embeddings=32", "--batch_size=4", "--eval_batch_size=16", "--warmup_steps=2", "--cache_dir=None"]
TINY_PRIOR = ["--stage=prior", "--prior_d_model=16", "--prior_n_layers=1", "--prior_n_heads=2",
              "--prior_batch_size=4", "--prior_warmup_steps=2", "--cache_dir=None"]


def pytest_configure(config):
    """A deprecation warning (from torch or anything else) fails the test that meets it, but for one that torch
    raises at its own import of torch.utils.mkldnn when torch.compile loads inductor (no call of ours is involved)."""
    for category in ("DeprecationWarning", "FutureWarning"):
        config.addinivalue_line("filterwarnings", f"error::{category}")
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def run(script, *args, cwd):
    """One of the repo's scripts as a user runs it, in folder cwd, but in this process (a new Python would spend
    seconds importing torch): its main() through utils.call_main, as its entry point calls it, a DataError becoming
    the one `error:` line on stderr and exit status 1, a SIGTERM the one `stopped:` line and 143. Returns what
    subprocess.run would: returncode, stdout, stderr."""
    module = importlib.import_module(script.removesuffix(".py"))
    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = call_main(module.main, list(args))
    finally:
        os.chdir(here)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def run_process(script, *args, cwd, **kw):
    """A script in a new Python process, for what only a process shows (exit status, signals, torchrun)."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, **kw)


def job_env(**extra):
    """The environment for a job script (slurm/*.sh), which calls `python` from PATH: this interpreter's folder
    first, so that the script runs the tests' own Python, with its packages, whether or not a virtual environment
    is activated."""
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return dict(os.environ, PATH=path, **extra)


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


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One finished two-epoch VQ-VAE run on a study with labels and a blank test slice, and a one-epoch prior on
    it: shared by every test that only reads them (copy a run folder before changing it)."""
    tmp = tmp_path_factory.mktemp("trained")
    root = make_study(tmp / "d", per_case=4, seg=True,
                      cases={"train": [4, 5, 6, 7], "validate": [36, 37], "test": [40]})
    blank = os.path.join(root, "keras_slices_test", "case_040_week_0_slice_9.nii.gz")
    write_slice(blank, np.zeros((256, 128), np.int16))  # scanner padding: skipped, listed, never fatal
    write_slice(blank.replace("keras_slices_test", "keras_slices_seg_test").replace("case_", "seg_"),
                np.zeros((256, 128), np.uint8))
    out, prior = tmp / "runs" / "vq", tmp / "runs" / "prior"
    vq = run("train.py", f"--data_dir={root}", f"--out_dir={out}", "--n_epochs=2", *TINY, cwd=tmp)
    assert vq.returncode == 0, vq.stderr
    pr = run("train.py", *TINY_PRIOR, f"--out_dir={prior}", "--prior_n_epochs=1", cwd=tmp)  # the newest VQ-VAE
    assert pr.returncode == 0, pr.stderr
    return SimpleNamespace(tmp=tmp, root=root, out=out, prior=prior, blank=blank, vq_log=vq, prior_log=pr)
