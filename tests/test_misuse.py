"""Ordinary mistakes, as a user or a job array makes them: no run overwrites another, resume checks what it
continues, and each mistake is one `error:` line with exit status 1, never a traceback."""
import csv
import multiprocessing
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

import checkpoints
import dataset
import job
import train
from conftest import TINY, TINY_PRIOR, make_study, run, run_process, write_slice
from utils import DataError


def one_error_line(r, *says):
    """The script failed with exactly one line on stderr, an `error:` line holding each of `says`."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "weights_only=False" not in r.stderr
    for s in says:
        assert s in lines[0], lines[0]
    return lines[0]


class Foreign:
    """Pickled as a reference to this class: weights_only loading refuses it."""


def claim(folder):
    os.chdir(folder)
    job.time.strftime = lambda fmt: "20260101-120000"  # every process in the same second
    return job.claim_folder(None)


def test_runs_started_together_get_their_own_folders(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        names = pool.map(claim, [str(tmp_path)] * 4)
    assert sorted(names) == [os.path.join("runs", "20260101-120000" + s) for s in ("", "-2", "-3", "-4")]
    assert sorted(os.listdir(tmp_path / "runs")) == sorted(os.path.basename(n) for n in names)


def test_folder_names_are_claimed_atomically_within_one_second(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(job.time, "strftime", lambda fmt: "20260101-120000")
    names = [job.claim_folder(None) for _ in range(3)]
    assert names == [os.path.join("runs", "20260101-120000" + s) for s in ("", "-2", "-3")]


def test_out_dir_holding_a_run_is_refused(trained):
    before = (trained.out / "best_model.pt").read_bytes()
    r = run("train.py", f"--data_dir={trained.root}", f"--out_dir={trained.out}", "--n_epochs=1", *TINY,
            cwd=trained.tmp)
    one_error_line(r, f"--out_dir={trained.out}", "already holds a run", "--resume=True")
    assert (trained.out / "best_model.pt").read_bytes() == before


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    r = run("train.py", f"--out_dir={tmp_path / 'afile'}", "--n_epochs=1", *TINY, cwd=tmp_path)
    one_error_line(r, "afile", "is a file")


@pytest.mark.parametrize("change, says", [
    (["--beta=0.5"], ["beta=0.25 there, 0.5 here"]),
    (["--n_hiddens=32"], ["n_hiddens=16 there, 32 here"]),
    (["--data_dir=OTHER"], ["data_dir=", "'OTHER' here"]),
    (["--beta=0.5", "--learning_rate=0.1"],
     ["beta=0.25 there", f"learning_rate={train.BLOCK['learning_rate'].default} there, 0.1 here"]),
])
def test_resume_refuses_other_settings_naming_each(trained, change, says):
    base = [f"--data_dir={trained.root}", f"--out_dir={trained.out}", "--n_epochs=3", *TINY, "--resume=True"]
    rows = (trained.out / "metrics.csv").read_text()
    r = run("train.py", *base, *change, cwd=trained.tmp)
    one_error_line(r, "will not continue", *says)
    assert (trained.out / "metrics.csv").read_text() == rows


def test_resume_refuses_changed_files_of_the_same_folder(tmp_path):
    root = make_study(tmp_path / "d", per_case=1, cases={"train": [4, 5], "validate": [36]})
    out = tmp_path / "run"
    base = [f"--data_dir={root}", f"--out_dir={out}", *TINY]
    assert run("train.py", *base, "--n_epochs=1", cwd=tmp_path).returncode == 0
    os.remove(os.path.join(root, "keras_slices_train", "case_004_week_0_slice_0.nii.gz"))
    r = run("train.py", *base, "--n_epochs=2", "--resume=True", cwd=tmp_path)
    one_error_line(r, "on other data", "the train files differ")


def test_resume_true_without_out_dir_continues_only_a_matching_run(trained):
    r = run("train.py", f"--data_dir={trained.root}", "--n_epochs=3", *TINY, "--beta=0.3", "--resume=True",
            cwd=trained.tmp)
    one_error_line(r, "will not continue runs/vq", "beta=0.25 there, 0.3 here")  # the newest VQ-VAE run
    r = run("train.py", "--stage=prior", "--resume=True", "--prior_n_epochs=2", cwd=trained.tmp)
    one_error_line(r, "will not continue runs/prior", "prior_d_model=16 there, 256 here")


def test_every_pair_of_splits_is_patient_disjoint(tmp_path):
    root = make_study(tmp_path / "d", cases={"train": [4, 5, 6], "validate": [36], "test": [5]}, per_case=1)
    with pytest.raises(DataError, match="patients \\['005'\\] are in both train and test"):
        dataset.find_splits(root)


@pytest.mark.parametrize("arg, says", [
    ("--n_epochs=0", "--n_epochs=0 must be at least 1"), ("--batch_size=0", "--batch_size=0 must be at least 1"),
    ("--learning_rate=-0.001", "--learning_rate=-0.001 must be positive"),
    ("--time_limit_minutes=-1", "--time_limit_minutes=-1.0 must be positive"),
    ("--ema_decay=1.5", "--ema_decay=1.5 must be at least 0 and below 1"), ("--stage=gan", "vqvae or prior"),
    ("--np=3", "unknown option --np"), ("--prior_patch=3", "--prior_patch=3 must be 1 or 2 or 4"),
    ("--prior_d_model=30", "must be a multiple of --prior_n_heads=8"),
])
def test_out_of_range_settings_stop_before_any_data_is_read(tmp_path, arg, says):
    r = run("train.py", "--data_dir=/nonexistent", arg, cwd=tmp_path)
    line = one_error_line(r, says)
    assert "nonexistent" not in line and not (tmp_path / "runs").exists()


def test_unknown_option_lists_only_the_block(tmp_path):
    for script, name in (("predict.py", "checkpoint"), ("sample.py", "temperature"), ("train.py", "n_hiddens"),
                         ("bench.py", "steps")):
        line = one_error_line(run(script, "--np=3", cwd=tmp_path), "unknown option --np")
        known = line.split("known: ")[1].split(", ")
        assert name in known and not {"np", "csv", "torch", "main", "BLOCK", "Option"} & set(known)


def test_an_error_is_one_line_and_exit_status_1_from_the_shell(tmp_path):
    one_error_line(run_process("train.py", "--n_epochs=0", cwd=tmp_path), "--n_epochs=0 must be at least 1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda(tmp_path):
    one_error_line(run("train.py", "--device=cuda", "--n_epochs=1", cwd=tmp_path), "--device=cuda", "not available")


def test_wrong_truncated_foreign_and_old_checkpoints(trained, tmp_path):
    tmp, vq, prior = trained.tmp, trained.out, trained.prior
    good = (vq / "best_model.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[:len(good) // 2])
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    torch.save({"model": Foreign()}, tmp_path / "foreign.pt")
    old = torch.load(vq / "best_model.pt", weights_only=True)
    del old["kind"], old["format"]  # as the project's earlier versions wrote it
    torch.save(old, tmp_path / "old.pt")
    for path, says in ((prior / "best_prior.pt", "a prior (best_prior.pt); expected a VQ-VAE"),
                       (vq / "last.pt", "a training state (last.pt)"), (tmp_path / "truncated.pt", "truncated"),
                       (tmp_path / "random.pt", "not a torch checkpoint"), (tmp_path / "foreign.pt", "refused"),
                       (tmp_path / "missing.pt", "checkpoint not found"),
                       (tmp_path / "old.pt", "not a checkpoint of this version of the project")):
        one_error_line(run("predict.py", f"--checkpoint={path}", cwd=tmp), str(path), says)
    one_error_line(run("sample.py", f"--prior_checkpoint={vq / 'best_model.pt'}", cwd=tmp),
                   "a VQ-VAE (best_model.pt); expected a prior")
    one_error_line(run("train.py", *TINY_PRIOR, f"--vqvae_checkpoint={prior / 'best_prior.pt'}",
                       f"--out_dir={tmp_path / 'p'}", cwd=tmp), "expected a VQ-VAE")


def test_corrupt_cache_is_rebuilt_saying_so(study, tmp_path, capsys):
    files = dataset.find_splits(study)["train"]
    cache = tmp_path / "cache"
    a = dataset.prepare(files, str(cache))
    npy = next(cache.glob("*.npy"))
    npy.write_bytes(npy.read_bytes()[:1000])
    b = dataset.prepare(files, str(cache))
    assert "unreadable" in capsys.readouterr().out and (a["x"] == b["x"]).all()
    assert (dataset.prepare(files, str(cache))["x"] == a["x"]).all()  # and the rebuilt cache is good


def test_run_killed_before_its_best_checkpoint_resumes(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained.out, out)
    os.remove(out / "best_model.pt")  # last.pt is written first: a kill can only leave this state, never the reverse
    r = run("train.py", f"--data_dir={trained.root}", f"--out_dir={out}", "--n_epochs=3", *TINY, "--resume=True",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(out / "best_model.pt", weights_only=True)["epoch"] == 2
    assert [row["epoch"] for row in csv.DictReader(open(out / "metrics.csv"))] == ["0", "1", "2"]


def test_folder_of_a_run_killed_in_its_first_epoch_can_be_reused(tmp_path):
    root = make_study(tmp_path / "d", per_case=1, cases={"train": [4, 5], "validate": [36]})
    out = tmp_path / "run"
    out.mkdir()
    (out / "splits.json").write_text("{}")  # what a run leaves before its first last.pt
    r = run("train.py", f"--data_dir={root}", f"--out_dir={out}", "--n_epochs=1", *TINY, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no test split" in r.stdout and "the test is skipped" in r.stdout


def test_rarer_mistakes_are_one_line_each(tmp_path):
    archive = tmp_path / "other.pt"
    with zipfile.ZipFile(archive, "w") as z:  # a zip archive, as torch.save writes, but not one torch wrote
        z.writestr("notes.txt", "hello")
    for call, says in [(lambda: checkpoints.load(archive), "other.pt: corrupt checkpoint"),
                       (lambda: checkpoints.find(None, str(tmp_path / "runs/*/best_model.pt")), "train first"),
                       (lambda: dataset.case_id("/d/scan_12.nii"), "scan_12.nii: name has no case_XXX part"),
                       (lambda: dataset.patient_split(["/d/case_004_week_0_slice_0.nii"] * 2, 0.1, 0),
                        "/d: one patient only"),
                       (lambda: dataset.find_splits(), "no training data"),
                       (lambda: dataset.read_splits(str(tmp_path)), "splits.json: cannot read the run's splits")]:
        with pytest.raises(DataError, match=says):
            call()


def test_a_split_of_constant_slices_only_is_refused(tmp_path):
    folder = tmp_path / "keras_slices_train"
    folder.mkdir()
    for k in range(2):
        write_slice(folder / f"case_004_week_0_slice_{k}.nii.gz", np.zeros((256, 128), np.int16))
    with pytest.raises(DataError, match="no usable slices"):
        dataset.prepare(dataset.list_slices(str(folder)))


def test_predict_refuses_what_it_cannot_reconstruct(trained, tmp_path):
    ckpt = trained.out / "best_model.pt"
    write_slice(tmp_path / "four_d.nii.gz", np.ones((256, 128, 2, 2), np.float32))
    one_error_line(run("predict.py", f"--checkpoint={ckpt}", f"--input={tmp_path / 'four_d.nii.gz'}", cwd=tmp_path),
                   "four_d.nii.gz: expected a 2D slice or a 3D volume")
    write_slice(tmp_path / "blank.nii.gz", np.zeros((256, 128, 3), np.int16))
    one_error_line(run("predict.py", f"--checkpoint={ckpt}", f"--input={tmp_path / 'blank.nii.gz'}", cwd=tmp_path),
                   "every slice is constant")
    train_only = make_study(tmp_path / "d", per_case=1, cases={"train": [4, 5]})
    one_error_line(run("predict.py", f"--checkpoint={ckpt}", f"--data_dir={train_only}", cwd=tmp_path),
                   "no test split")


def test_resume_and_run_folder_mistakes(trained, tmp_path, monkeypatch):
    one_error_line(run("train.py", f"--out_dir={trained.out}", "--stage=prior", "--resume=True", cwd=tmp_path),
                   "is a vqvae run; add --stage=vqvae")
    one_error_line(run("train.py", "--resume=True", cwd=tmp_path), "no vqvae run under runs/ to resume")
    one_error_line(run("train.py", f"--resume={tmp_path}", cwd=tmp_path), "last.pt not found")
    one_error_line(run("train.py", "--device=gpu0", cwd=tmp_path), "--device=gpu0: not a device name")
    os.chdir(tmp_path)
    (tmp_path / "runs").mkdir()

    def refuse(path, *a):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(job.os, "mkdir", refuse)
    with pytest.raises(DataError, match="cannot create the run folder \\(Permission denied\\)"):
        job.claim_folder(None)

    def taken(path, *a):
        raise FileExistsError(17, "File exists")
    monkeypatch.setattr(job.os, "mkdir", taken)
    with pytest.raises(DataError, match="no free run folder name"):
        job.claim_folder(None)


@pytest.mark.parametrize("script", ["predict.py", "sample.py", "bench.py", "phantom.py"])
def test_every_script_stops_in_one_line_from_the_shell(tmp_path, script):
    one_error_line(run_process(script, "--seed=x" if script == "phantom.py" else "--np=3", cwd=tmp_path),
                   "--seed=x" if script == "phantom.py" else "unknown option --np")
