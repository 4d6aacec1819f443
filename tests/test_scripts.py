"""The scripts as a researcher runs them: options and config files, bad input, train -> predict end to end."""
import csv
import json
import os
import sys

import nibabel as nib
import numpy as np
import pytest
from tqdm import tqdm

import options
import utils
from conftest import TINY, make_study, run, write_slice
from metrics import score
from options import Option
from utils import DataError

BLOCK = dict(lr=Option(3e-4, above=0), n=Option(8, at_least=1), name=Option("x"), flag=Option(False),
             limit=Option(None, kind=float), path=Option(None, kind=str), resume=Option(False, kind=(bool, str)),
             cache=Option("c", nullable=True))


def test_options_keep_types():
    cfg = options.parse(BLOCK, ["--lr=1e-3", "--n=16", "--name=abc", "--flag=True", "--limit=3", "--path=/a/b",
                                "--resume=runs/x", "--cache=None"])
    assert vars(cfg) == dict(lr=1e-3, n=16, name="abc", flag=True, limit=3.0, path="/a/b", resume="runs/x", cache=None)
    assert options.parse(BLOCK, ["--flag"]).flag is True


@pytest.mark.parametrize("arg, says", [("--nope=1", "unknown option --nope"), ("--n=abc", "expected int"),
                                       ("--flag=3", "expected bool"), ("--limit=abc", "expected float"),
                                       ("--n=None", "expected int"), ("--n=0", "--n=0 must be at least 1"),
                                       ("--lr=-1", "--lr=-1.0 must be positive"),
                                       ("positional", "unexpected argument"), ("missing.py", "config file not found")])
def test_options_refuse_bad_names_types_and_ranges(arg, says):
    with pytest.raises(DataError) as e:
        options.parse(BLOCK, [arg])
    assert says in str(e.value) and "\n" not in str(e.value)


def test_config_files_then_overrides_in_order(tmp_path):
    (tmp_path / "a.py").write_text("# a named run\nn = 32\nlr = 2e-3\n")
    (tmp_path / "b.py").write_text("n = 64\n")
    cfg = options.parse(BLOCK, [str(tmp_path / "a.py"), str(tmp_path / "b.py"), "--lr=5e-3"])
    assert (cfg.n, cfg.lr) == (64, 5e-3)
    assert options.parse(BLOCK, ["--n=2", str(tmp_path / "a.py")]).n == 32  # what comes later wins
    for text, says in (("nope = 1\n", "unknown option --nope"), ("n = 0\n", "must be at least 1"),
                       ("n = (\n", "not a config file")):
        (tmp_path / "c.py").write_text(text)
        with pytest.raises(DataError, match=says):
            options.parse(BLOCK, [str(tmp_path / "c.py")])


def test_repo_config_files_are_accepted_by_their_scripts():
    import train
    for name in os.listdir(os.path.join(os.path.dirname(train.__file__), "config")):
        options.parse(train.BLOCK, [os.path.join(os.path.dirname(train.__file__), "config", name)])


def test_train_refuses_bad_input_before_training(tmp_path):
    root = make_study(tmp_path / "d", per_case=2)
    bad = os.path.join(root, "keras_slices_train", "case_004_week_0_slice_9.nii.gz")
    write_slice(bad, np.full((256, 128), np.nan, np.float32))
    r = run("train.py", f"--data_dir={root}", f"--out_dir={tmp_path / 'run'}", *TINY, cwd=tmp_path)
    assert r.returncode != 0 and f"error: {bad}: contains" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run" / "best_model.pt").exists()
    r = run("train.py", "--data_dir=/nonexistent", cwd=tmp_path)
    assert r.returncode != 0 and "/nonexistent/keras_slices_train: folder not found" in r.stderr


def test_train_then_predict_end_to_end(trained):
    out, log = trained.out, trained.vq_log
    for name in ("best_model.pt", "last.pt", "metrics.csv", "loss.png", "ssim.png", "recon_epoch0.png",
                 "recon_best.png", "splits.json", "data_samples.png", "test_metrics.json", "recon_test.png",
                 "test_per_slice.csv", "skipped.txt"):
        assert (out / name).exists(), name
    assert trained.blank in (out / "skipped.txt").read_text() and trained.blank in log.stdout
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["0", "1"] and all(0 < float(r["codebook_usage"]) <= 1 for r in rows)
    test = json.load(open(out / "test_metrics.json"))
    assert test["n_slices"] == 4 and 0 < test["ssim"] < 1
    assert 0 < test["regions"]["prostate"]["ssim"] < 1 and 1 <= test["regions"]["prostate"]["n_slices"] <= 4
    per_slice = list(csv.DictReader(open(out / "test_per_slice.csv")))
    assert len(per_slice) == 4 and {"prostate_ssim", "bladder_psnr", "rectum_ssim"} <= set(per_slice[0])
    have = [float(p["prostate_ssim"]) for p in per_slice if p["prostate_ssim"]]
    assert len(have) == test["regions"]["prostate"]["n_slices"] and abs(np.mean(have) -
                                                                        test["regions"]["prostate"]["ssim"]) < 1e-5
    splits = json.load(open(out / "splits.json"))
    assert len(splits["train"]) == 16 and len(splits["validate"]) == 8

    # predict with no checkpoint argument finds the newest run under ./runs, and its data
    r = run("predict.py", "--save_nifti", cwd=trained.tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    pred = out / "predict_test"
    m = json.load(open(pred / "metrics.json"))
    assert abs(m["ssim"] - test["ssim"]) < 1e-6  # same model, same split, same metric
    for name, region in test["regions"].items():
        assert m["regions"][name] == pytest.approx(region)
    assert m["skipped"] == []  # the run's splits.json lists the slices it kept
    rows = list(csv.DictReader(open(pred / "per_slice.csv")))
    assert rows == per_slice and (pred / "reconstructions.png").exists()
    for src, row in zip(splits["test"], rows):
        rec = nib.load(pred / "nifti" / os.path.basename(src))
        img = nib.load(src)
        assert rec.shape == img.shape and np.allclose(rec.affine, img.affine)
        a, b = rec.get_fdata().reshape(256, -1), img.get_fdata().reshape(256, -1)
        if b.shape == (256, 128):  # in the input's intensity units: scored against it, the file gives the same SSIM
            assert score(b, a)["ssim"] == pytest.approx(float(row["ssim"]), abs=1e-4)


def test_time_limit_stops_then_validates_and_tests(tmp_path):
    root = make_study(tmp_path / "d", per_case=3)
    out = tmp_path / "run"
    r = run("train.py", f"--data_dir={root}", f"--out_dir={out}", "--n_epochs=500", "--time_limit_minutes=0.02",
            *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "time limit of 0.02 min reached" in r.stdout
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert 1 <= len(rows) < 500 and json.load(open(out / "test_metrics.json"))["epochs"] == len(rows)


def test_predict_input_any_nifti_and_3d_volumes(trained, tmp_path):
    ckpt = trained.out / "best_model.pt"
    scans = tmp_path / "scans"
    scans.mkdir()
    files = sorted((trained.tmp / "d" / "keras_slices_test").iterdir())[:2]
    vol = np.stack([nib.load(f).get_fdata().reshape(256, -1)[:, :128] for f in files] + [np.zeros((256, 128))], -1)
    affine = np.array([[0, -0.9, 0, 10], [1.1, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]])
    write_slice(scans / "volume.nii.gz", (vol * 3).astype(np.int16), affine)  # (256, 128, 3), the last one empty
    write_slice(scans / "one.nii", nib.load(files[0]).get_fdata().astype(np.float32))
    out = tmp_path / "predict_input"
    r = run("predict.py", f"--checkpoint={ckpt}", f"--input={scans}", f"--out_dir={out}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = list(csv.DictReader(open(out / "per_slice.csv")))
    assert [r["file"] for r in rows] == ["one.nii", "volume.nii.gz:0", "volume.nii.gz:1"]
    ssim = {r["file"]: float(r["ssim"]) for r in rows}
    for name in ("volume.nii.gz", "one.nii"):
        src, rec = nib.load(scans / name), nib.load(out / "nifti" / name)
        assert rec.shape == src.shape and np.allclose(rec.affine, src.affine)
        assert rec.header.get_zooms() == src.header.get_zooms()
        a, b = rec.get_fdata().reshape(256, 128, -1), src.get_fdata().reshape(256, 128, -1)
        for k in range(a.shape[2]):
            if b[:, :, k].max() > b[:, :, k].min():  # in the input's units: scored against it, the same SSIM
                key = name if a.shape[2] == 1 else f"{name}:{k}"
                assert score(b[:, :, k], a[:, :, k])["ssim"] == pytest.approx(ssim[key], abs=1e-4)
            else:  # constant: copied through
                assert np.array_equal(a[:, :, k], b[:, :, k])
    m = json.load(open(out / "metrics.json"))
    assert m["n_slices"] == 3 and len(m["skipped"]) == 1 and "volume.nii.gz:2: constant slice" in m["skipped"][0]
    r = run("predict.py", f"--checkpoint={ckpt}", f"--input={tmp_path / 'nothing.nii'}", cwd=tmp_path)
    assert r.returncode != 0 and f"error: {tmp_path / 'nothing.nii'}: file or folder not found" in r.stderr


def test_tensorboard_is_optional(tmp_path):
    root = make_study(tmp_path / "d", per_case=1, cases={"train": [4, 5], "validate": [36]})
    r = run("train.py", f"--data_dir={root}", f"--out_dir={tmp_path / 'run'}", "--n_epochs=1", "--tensorboard=True",
            *TINY, cwd=tmp_path)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert r.returncode != 0 and "--tensorboard=True needs the tensorboard package" in r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "run" / "last.pt").exists()
        return
    assert r.returncode == 0, r.stderr[-3000:]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "run" / "tensorboard"))


def test_organ_weight_and_another_data_root(trained, tmp_path):
    out = tmp_path / "run"
    r = run("train.py", f"--data_dir={trained.root}", f"--out_dir={out}", "--n_epochs=1", "--organ_weight=4", *TINY,
            cwd=tmp_path)  # each pixel's loss weight rides beside the image: 5 in the organs, 1 elsewhere
    assert r.returncode == 0, r.stderr[-3000:]
    assert np.isfinite(float(next(csv.DictReader(open(out / "metrics.csv")))["train_loss"]))
    # predict on a named data root and split rather than the ones the run trained on
    r = run("predict.py", f"--checkpoint={out / 'best_model.pt'}", f"--data_dir={trained.root}", "--split=validate",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(out / "predict_validate" / "metrics.json"))["n_slices"] == 8


def test_progress_bars_only_on_a_terminal(monkeypatch):
    steps = range(3)
    assert utils.progress(steps, "epoch 0") is steps  # a batch job's log: no bar, the loop prints a line per epoch
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = utils.progress(steps, "epoch 0")
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]


def test_tensorboard_receives_the_metrics_and_reconstructions(trained, tmp_path, monkeypatch):
    """With a stand-in for tensorboard's SummaryWriter (the package is optional): what a run hands it."""
    calls = []

    class Writer:
        def __init__(self, folder):
            calls.append(("open", folder))

        def __getattr__(self, name):
            return lambda *a, **k: calls.append((name, a[0] if a else None))
    module = type(sys)("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    r = run("train.py", f"--data_dir={trained.root}", f"--out_dir={tmp_path / 'run'}", "--n_epochs=1",
            "--tensorboard=True", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    names = {c[0] for c in calls}
    assert calls[0] == ("open", str(tmp_path / "run" / "tensorboard")) and {"add_scalar", "add_image", "close"} <= names
    assert ("add_scalar", "vqvae/val_ssim") in calls


def test_each_split_in_a_folder_of_its_own(tmp_path):
    root = make_study(tmp_path / "d", per_case=1, cases={"train": [4, 5], "validate": [36], "test": [40]})
    r = run("train.py", f"--train_dir={root}/keras_slices_train", f"--test_dir={root}/keras_slices_test",
            "--n_epochs=1", f"--out_dir={tmp_path / 'run'}", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    splits = json.load(open(tmp_path / "run" / "splits.json"))
    assert splits["data_root"] == root and len(splits["test"]) == 1 and len(splits["validate"]) == 1
