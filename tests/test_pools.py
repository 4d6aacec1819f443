"""No run hangs: the worker pool under an installed SIGTERM handler, a worker killed mid-map, and SIGTERM at every
stage of a run. Whatever starts a process runs under a hard kill timeout, so that a hang fails the test."""
import glob
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import stages
import train
from conftest import ROOT, TINY, TINY_PRIOR, make_study, run
from pool_tasks import workers_of

LIMIT = 60  # seconds: a SIGTERM must end any stage within it; a hang fails the test
HERE = os.path.dirname(os.path.abspath(__file__))


# ---- helpers -------------------------------------------------------------------------------------------------

def python(code, timeout=LIMIT * 2, **kw):
    """Python code in a new process with the repo and tests importable, killed if it outlives timeout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, HERE]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env, **kw)


def many_files(root, n):
    """A course-layout folder whose training split holds n copies of a few slices (no labels): enough files for
    16 workers, written in a second."""
    make_study(root, cases={"train": [4, 5, 6, 7], "validate": [36], "test": [40]}, per_case=1)
    folder = os.path.join(root, "keras_slices_train")
    sources = sorted(glob.glob(os.path.join(folder, "*.nii*")))
    for k in range(n - len(sources)):
        src = sources[k % len(sources)]
        ext = ".nii.gz" if src.endswith(".gz") else ".nii"
        shutil.copy(src, os.path.join(folder, f"case_{8 + k % 20:03d}_week_0_slice_{k}{ext}"))
    return str(root)


def start_and_wait_for_workers(args, cwd):
    """A script started as a process, once its pool has workers -> (the process, their pids)."""
    p = subprocess.Popen([sys.executable, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + LIMIT
    while not (found := workers_of(p.pid)):
        assert time.time() < deadline and p.poll() is None, p.communicate()
        time.sleep(0.005)
    return p, found


def ended_within_limit(p):
    """(stdout, stderr, seconds) of a process that must end within LIMIT."""
    t0 = time.time()
    try:
        out, err = p.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        p.kill()
        pytest.fail(f"still running {LIMIT} s after the signal: {p.communicate()}")
    return out, err, time.time() - t0


# ---- the pool ------------------------------------------------------------------------------------------------

def test_workers_inherit_no_signal_handler_and_are_joined():
    code = """
import os, signal, pool, pool_tasks
signal.signal(signal.SIGTERM, lambda *_: None)  # as a training run installs one
out = pool.parallel_map(pool_tasks.signals_in_worker, list(range(300)), 16, None)
print(len({pid for pid, _, _ in out}), all(dfl and ign for _, dfl, ign in out), len(pool_tasks.workers_of(os.getpid())))
"""
    r = python(code)
    assert r.returncode == 0 and r.stdout.split() == ["16", "True", "0"], r.stderr[-2000:]


@pytest.mark.parametrize("task", ["prepare", "phantom"])
def test_every_pool_with_16_workers_under_a_sigterm_handler_several_times(tmp_path, task):
    root = many_files(tmp_path / "d", 300) if task == "prepare" else None
    call = (f"p = dataset.prepare(dataset.find_splits({root!r})['train'], workers=16); assert len(p['x']) >= 280"
            if task == "prepare" else
            f"phantom.write_phantom({str(tmp_path)!r} + f'/p{{k}}', {{'train': 260, 'validate': 4, 'test': 4}}, "
            "workers=16)")
    code = f"""
import signal, dataset, phantom
signal.signal(signal.SIGTERM, lambda *_: None)
for k in range(3):
    {call}
import os, pool_tasks
print("workers left:", len(pool_tasks.workers_of(os.getpid())))
"""
    r = python(code, timeout=240)
    assert r.returncode == 0 and r.stdout.strip() == "workers left: 0", r.stderr[-2000:]


def test_a_worker_killed_mid_map_is_one_line_naming_its_item():
    code = """
import pool, pool_tasks, utils
utils.run_script(lambda argv: pool.parallel_map(pool_tasks.die_on_five, list(range(64)), 4,
                                                [f"item-{i}" for i in range(64)]))
"""
    r = python(code)
    assert r.returncode == 1 and r.stderr.strip() == ("error: item-5: the worker process handling it was killed by "
                                                      "SIGKILL (out of memory?)"), r.stderr


def test_a_bug_in_a_worker_is_its_traceback_not_a_hang():
    r = python("import pool, pool_tasks; pool.parallel_map(pool_tasks.fail_on_three, list(range(40)), 2, None)")
    assert r.returncode == 1 and "a worker failed on item 3" in r.stderr and "ZeroDivisionError" in r.stderr


def test_a_worker_killed_while_a_run_prepares_its_data_is_one_line(tmp_path):
    root = many_files(tmp_path / "d", 2000)
    p, found = start_and_wait_for_workers([os.path.join(ROOT, "train.py"), f"--data_dir={root}", *TINY],
                                          tmp_path)
    os.kill(found[0], signal.SIGKILL)
    _, err, _ = ended_within_limit(p)
    lines = err.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, err[-2000:]
    assert re.fullmatch(f"error: {root}/keras_slices_train/case_\\d+_week_0_slice_\\d+\\.nii(\\.gz)?: the worker "
                        r"process handling it was killed by SIGKILL \(out of memory\?\)", lines[0]), lines[0]


# ---- SIGTERM at every stage ------------------------------------------------------------------------------------

def test_sigterm_while_preparing_data_ends_the_run_in_one_line_leaving_no_cache(tmp_path):
    root = many_files(tmp_path / "d", 2000)
    cache = tmp_path / "cache"
    p, found = start_and_wait_for_workers([os.path.join(ROOT, "train.py"), f"--data_dir={root}", *TINY,
                                           f"--cache_dir={cache}", f"--out_dir={tmp_path / 'run'}"], tmp_path)
    p.send_signal(signal.SIGTERM)
    _, err, took = ended_within_limit(p)
    lines = err.strip().splitlines()
    assert p.returncode == 143 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("stopped: SIGTERM while preparing the train slices") and lines[0].endswith(
        "no file was left half-written; no checkpoint was written yet"), lines[0]
    assert took < LIMIT and not any(os.path.exists(f"/proc/{w}") for w in found)
    assert not list(cache.glob("*")) if cache.exists() else True
    assert not (tmp_path / "run" / "last.pt").exists()


def test_sigterm_while_writing_the_phantom_leaves_no_folder(tmp_path):
    out = tmp_path / "other"
    p, _ = start_and_wait_for_workers([os.path.join(ROOT, "phantom.py"), f"--out_dir={out}", "--n_train=3000"],
                                      tmp_path)
    p.send_signal(signal.SIGTERM)
    _, err, _ = ended_within_limit(p)
    assert p.returncode == 143 and err.strip().splitlines()[-1].startswith(
        f"stopped: SIGTERM while writing the phantom to {out}"), err[-2000:]
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary twin


def sigterm_in(monkeypatch, module, name):
    """SIGTERM to this process as soon as module.name is called, as a scheduler sends it."""
    real = getattr(module, name)

    def signalled(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)
    monkeypatch.setattr(module, name, signalled)


@pytest.mark.parametrize("script, module, name, says", [
    ("train.py", "stages", "evaluate_split", "SIGTERM while scoring the best model on the test split"),
    ("prior", "stages", "reconstruct", "SIGTERM while encoding the training and validation slices with"),
    ("predict.py", "predict", "evaluate_split", "SIGTERM while reconstructing and scoring the test split"),
    ("sample.py", "sample", "draw", "SIGTERM while drawing 4 samples"),
    ("sample.py", "sample", "judge", "SIGTERM while judging the samples"),
    ("qc.py", "qc", "slice_scores", "SIGTERM while scoring the validation slices for calibration"),
])
def test_sigterm_outside_the_training_steps_is_one_line(trained, tmp_path, monkeypatch, script, module, name, says):
    sigterm_in(monkeypatch, importlib.import_module(module), name)
    args = {"train.py": [f"--data_dir={trained.root}", f"--out_dir={tmp_path / 'run'}", "--n_epochs=1", *TINY],
            "prior": [*TINY_PRIOR, f"--vqvae_checkpoint={trained.out / 'best_model.pt'}",
                      f"--out_dir={tmp_path / 'run'}"],
            "predict.py": [f"--checkpoint={trained.out / 'best_model.pt'}", f"--out_dir={tmp_path / 'p'}"],
            "sample.py": [f"--prior_checkpoint={trained.prior / 'best_prior.pt'}", "--n_samples=4", "--n_real=4",
                          "--c2st_steps=1", f"--out_dir={tmp_path / 's'}"],
            "qc.py": [f"--checkpoint={trained.out / 'best_model.pt'}", f"--out_dir={tmp_path / 'q'}"]}[script]
    r = run("train.py" if script == "prior" else script, *args, cwd=trained.tmp)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 143 and len(lines) == 1 and lines[0].startswith(f"stopped: {says}"), r.stderr[-2000:]
    assert "no file was left half-written" in lines[0]
    if script == "train.py":
        assert lines[0].endswith("last.pt (1 epochs done)") and not (tmp_path / "run" / "test_metrics.json").exists()
        monkeypatch.undo()
        r = run("train.py", *args, "--resume=True", cwd=trained.tmp)  # the stopped run finishes on resume
        assert r.returncode == 0 and (tmp_path / "run" / "test_metrics.json").exists(), r.stderr[-2000:]
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_sigterm_in_the_last_validation_stops_before_the_test(trained, tmp_path, monkeypatch):
    calls = []
    real = stages.VQVAEStage.validate

    def validate(self):
        calls.append(1)
        if len(calls) == 2:  # the second and last epoch's validation
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)
    monkeypatch.setattr(stages.VQVAEStage, "validate", validate)
    out = tmp_path / "run"
    r = run("train.py", f"--data_dir={trained.root}", f"--out_dir={out}", "--n_epochs=2", *TINY, cwd=trained.tmp)
    assert r.returncode == 143 and r.stderr.strip().startswith("stopped: SIGTERM after the last training step")
    assert "last.pt (2 epochs done)" in r.stderr and not (out / "test_metrics.json").exists()


def test_cache_files_of_an_interrupted_write_are_removed(tmp_path, monkeypatch):
    import dataset
    import utils
    root = make_study(tmp_path / "d", per_case=1, seg=True)
    files = dataset.find_splits(root)["train"]
    real, writes = utils.write_file, []

    def interrupted(path, content):
        writes.append(path)
        if str(path).endswith(".masks.npy"):  # after the images' array, before the .json
            raise utils.Terminated("SIGTERM")
        return real(path, content)
    monkeypatch.setattr(dataset, "write_file", interrupted)
    with pytest.raises(utils.Terminated):
        dataset.prepare(files, str(tmp_path / "cache"))
    assert len(writes) == 2 and os.listdir(tmp_path / "cache") == []
    assert np.isfinite(dataset.prepare(files)["x"]).all()
