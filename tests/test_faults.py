"""A cluster's everyday faults: a full disk, a quota, a read-only scratch folder. Each ends the run with one
`error:` line naming the file, the cause and the checkpoints kept; no temporary file is left and no earlier
checkpoint is damaged."""
import errno
import os

import pytest

import checkpoints
import utils
from conftest import TINY, make_study, run
from test_misuse import one_error_line


def fail_writes(monkeypatch, name, err=errno.ENOSPC, after=0):
    """The file called `name` (as utils.write_file writes it, through a temporary file beside it) fails after `after`
    good writes: with ENOSPC (disk full, quota) half of it is written and then the write fails, as a full disk
    does; with EROFS or EACCES it cannot even be opened."""
    real_open, writes = open, []

    class HalfWritten:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            self.f.write(data[:len(data) // 2])
            raise OSError(err, os.strerror(err))

        def __getattr__(self, attr):
            return getattr(self.f, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def faulty_open(path, mode="r", *a, **kw):
        if ".tmp" in str(path) and os.path.basename(str(path)).split(".tmp")[0] == name:
            writes.append(path)
            if len(writes) > after:
                if err != errno.ENOSPC:
                    raise OSError(err, os.strerror(err), str(path))
                return HalfWritten(real_open(path, mode, *a, **kw))
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(utils, "open", faulty_open, raising=False)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("faults") / "d", per_case=1, cases={"train": [4, 5], "validate": [36],
                                                                                  "test": [40]})


def no_temporary_files(folder):
    return not [p for p in folder.rglob("*") if ".tmp" in p.name]


@pytest.mark.parametrize("name, after, says", [
    ("last.pt", 1, "last.pt (1 epochs done)"),        # the second epoch's last.pt: the first stays
    ("best_model.pt", 0, "last.pt (1 epochs done)"),  # last.pt is written before the best model
    ("metrics.csv", 0, "last.pt (1 epochs done)"),
    ("loss.png", 0, "last.pt (2 epochs done)"),       # curves are drawn at the last epoch
])
def test_a_full_disk_ends_in_one_line_keeping_the_last_good_checkpoint(study, tmp_path, monkeypatch, name, after,
                                                                       says):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        fail_writes(m, name, after=after)
        r = run("train.py", f"--data_dir={study}", f"--out_dir={out}", "--n_epochs=2", *TINY, cwd=tmp_path)
    line = one_error_line(r, f"{out / name}: cannot write (No space left on device)", "kept:", says)
    assert no_temporary_files(tmp_path), line
    checkpoints.load(out / "last.pt", "state")  # each checkpoint left is whole: it loads, and predict.py uses it
    if (out / "best_model.pt").exists():
        r = run("predict.py", f"--checkpoint={out / 'best_model.pt'}", f"--out_dir={tmp_path / 'p'}", cwd=tmp_path)
        assert r.returncode == 0, r.stderr


def test_nothing_kept_yet_is_said_too(study, tmp_path, monkeypatch):
    fail_writes(monkeypatch, "splits.json")
    r = run("train.py", f"--data_dir={study}", f"--out_dir={tmp_path / 'run'}", "--n_epochs=1", *TINY, cwd=tmp_path)
    one_error_line(r, "splits.json: cannot write (No space left on device)", "no checkpoint was written yet")
    assert no_temporary_files(tmp_path)


@pytest.mark.parametrize("err, says", [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied")])
def test_a_read_only_or_forbidden_output_folder_is_one_line(study, tmp_path, monkeypatch, err, says):
    def refuse(path, *a, **kw):
        raise OSError(err, os.strerror(err), path)
    monkeypatch.setattr(utils.os, "makedirs", refuse)
    monkeypatch.setattr(os, "mkdir", refuse)
    r = run("train.py", f"--data_dir={study}", f"--out_dir={tmp_path / 'scratch' / 'run'}", *TINY, cwd=tmp_path)
    one_error_line(r, f"{tmp_path / 'scratch' / 'run'}: cannot create the folder ({says})")
    r = run("train.py", f"--data_dir={study}", *TINY, cwd=tmp_path)  # runs/<time> in a read-only working folder
    one_error_line(r, "runs: cannot create the folder", says)


def test_a_run_folder_that_turns_read_only_is_one_line(study, tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    fail_writes(monkeypatch, "splits.json", err=errno.EROFS)
    r = run("train.py", f"--data_dir={study}", f"--out_dir={out}", "--n_epochs=1", *TINY, cwd=tmp_path)
    one_error_line(r, f"{out / 'splits.json'}: cannot write (Read-only file system)")


def test_predict_and_sample_say_which_file_they_cannot_write(trained, tmp_path, monkeypatch):
    fail_writes(monkeypatch, "metrics.json")
    r = run("predict.py", f"--checkpoint={trained.out / 'best_model.pt'}", f"--out_dir={tmp_path / 'p'}",
            cwd=tmp_path)
    one_error_line(r, f"{tmp_path / 'p' / 'metrics.json'}: cannot write (No space left on device)")
    fail_writes(monkeypatch, "measures.json")
    r = run("sample.py", f"--prior_checkpoint={trained.prior / 'best_prior.pt'}", "--n_samples=2", "--n_real=2",
            "--c2st_steps=1", f"--out_dir={tmp_path / 's'}", cwd=tmp_path)
    one_error_line(r, f"{tmp_path / 's' / 'measures.json'}: cannot write (No space left on device)")
    assert no_temporary_files(tmp_path)


def test_a_cache_that_cannot_be_written_is_said_and_skipped(study, tmp_path, monkeypatch, capsys):
    import dataset
    files = dataset.find_splits(study)["train"]

    def full(path, content):
        raise utils.WriteError(f"{path}: cannot write (No space left on device)")
    monkeypatch.setattr(dataset, "write_file", full)
    p = dataset.prepare(files, str(tmp_path / "cache"))
    assert len(p["x"]) == len(files) and not list((tmp_path / "cache").glob("*.npy"))
    assert "not written" in capsys.readouterr().out


def test_write_file_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "a.csv"
    utils.write_text(path, "old\n")
    fail_writes(monkeypatch, "a.csv")
    with pytest.raises(utils.WriteError, match="a.csv: cannot write"):
        utils.write_text(path, "new\n" * 1000)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["a.csv"]


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    target = tmp_path / "metrics.csv"
    target.write_text("old")

    def interrupted(f):
        f.write(b"half a row")
        raise KeyboardInterrupt  # Ctrl-C in the middle of a write: re-raised as it is, after the clean-up
    with pytest.raises(KeyboardInterrupt):
        utils.write_file(target, interrupted)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.csv"]
    with pytest.raises(utils.DataError, match="gone.nii.gz: file not found"):  # a file removed after the listing
        utils.read_image(str(tmp_path / "gone.nii.gz"))
