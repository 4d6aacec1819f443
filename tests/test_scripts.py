"""The scripts as a researcher runs them: overrides, bad input, a small train -> predict run."""
import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest

from conftest import TINY, make_study, run, write_slice
from utils import apply_overrides


def test_overrides_keep_types():
    cfg = dict(lr=3e-4, n=8, name="x", flag=False, limit=None, path=None, resume=False)
    types = {"limit": (float,), "resume": (bool, str)}
    apply_overrides(cfg, ["--lr=1e-3", "--n=16", "--name=abc", "--flag=True", "--limit=3", "--path=/a/b",
                          "--resume=runs/x"], types=types)
    assert cfg == dict(lr=1e-3, n=16, name="abc", flag=True, limit=3.0, path="/a/b", resume="runs/x")
    apply_overrides(cfg, ["--flag"], bare_true=("flag",))
    assert cfg["flag"] is True


@pytest.mark.parametrize("arg, says", [("--nope=1", "unknown option --nope"), ("--n=abc", "expected int"),
                                       ("--flag=3", "expected bool"), ("--limit=abc", "expected float"),
                                       ("positional", "unexpected argument")])
def test_overrides_refuse_bad_names_and_types(arg, says):
    cfg = dict(n=8, flag=False, limit=None)
    with pytest.raises(SystemExit) as e:
        apply_overrides(cfg, [arg], types={"limit": (float,)})
    assert says in str(e.value)


def test_train_refuses_bad_input_before_training(tmp_path):
    root = make_study(tmp_path / "d", per_case=2)
    bad = os.path.join(root, "keras_slices_train", "case_004_week_0_slice_9.nii.gz")
    write_slice(bad, np.full((256, 128), 3.0, np.float32))
    r = run("train.py", f"--data_dir={root}", f"--out_dir={tmp_path / 'run'}", *TINY, cwd=tmp_path)
    assert r.returncode != 0 and f"error: {bad}: constant slice" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "best_model.pt").exists()
    r = run("train.py", "--data_dir=/nonexistent", cwd=tmp_path)
    assert r.returncode != 0 and "/nonexistent/keras_slices_train: folder not found" in r.stderr


def test_train_then_predict_end_to_end(tmp_path):
    root = make_study(tmp_path / "d", per_case=4)
    out = tmp_path / "runs" / "a"
    r = run("train.py", f"--data_dir={root}", f"--out_dir={out}", "--n_epochs=2", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("best_model.pt", "last.pt", "metrics.csv", "loss.png", "ssim.png", "recon_epoch0.png",
                 "recon_best.png", "splits.json", "data_samples.png", "test_metrics.json", "recon_test.png"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(0 < float(r["codebook_usage"]) <= 1 for r in rows)
    test = json.load(open(out / "test_metrics.json"))
    assert test["n_slices"] == 4 and 0 < test["ssim"] < 1
    splits = json.load(open(out / "splits.json"))
    assert len(splits["train"]) == 16 and len(splits["validate"]) == 4

    # predict with no checkpoint argument finds the newest run under ./runs, and its data
    r = run("predict.py", "--save_nifti", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    pred = out / "predict_test"
    m = json.load(open(pred / "metrics.json"))
    assert abs(m["ssim"] - test["ssim"]) < 1e-6  # same model, same split, same metric
    rows = list(csv.DictReader(open(pred / "per_slice.csv")))
    assert len(rows) == 4 and (pred / "reconstructions.png").exists()
    for src in splits["test"]:
        rec = nib.load(pred / "nifti" / os.path.basename(src))
        img = nib.load(src)
        assert rec.shape == img.shape and np.allclose(rec.affine, img.affine)
        a, b = rec.get_fdata(), img.get_fdata()
        assert abs(np.median(a) - np.median(b)) < 0.2 * (b.max() - b.min())  # same intensity units


def test_time_limit_stops_then_validates_and_tests(tmp_path):
    root = make_study(tmp_path / "d", per_case=3)
    out = tmp_path / "run"
    r = run("train.py", f"--data_dir={root}", f"--out_dir={out}", "--n_epochs=500", "--time_limit_minutes=0.05",
            *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "time limit of 0.05 min reached" in r.stdout
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert 1 <= len(rows) < 500 and json.load(open(out / "test_metrics.json"))["epochs"] == len(rows)
