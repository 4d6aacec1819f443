"""Cluster behaviour on the CPU: SIGKILL then resume, SIGTERM then resume, determinism, a NaN stop (torchrun with
gloo is in test_gpu_path, run there on the GPU path)."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

import train
from conftest import ROOT, TINY, make_study, run


def epochs(out):
    return [int(r["epoch"]) for r in csv.DictReader(open(out / "metrics.csv"))]


def strip_seconds(out):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(open(out / "metrics.csv"))]


def test_sigkill_mid_epoch_then_resume(tmp_path):
    root = make_study(tmp_path / "d", per_case=6)
    out = tmp_path / "run"
    args = [sys.executable, os.path.join(ROOT, "train.py"), f"--data_dir={root}", f"--out_dir={out}",
            "--n_epochs=4", *TINY, "--batch_size=1"]  # 24 steps an epoch: the kill lands inside the second
    p = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "metrics.csv").exists() or len(epochs(out)) < 1:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    time.sleep(0.1)  # into the next epoch
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = len(epochs(out))
    assert done < 4
    r = run("train.py", *args[2:], "--resume=True", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming {out} at epoch {done} step 0" in r.stdout  # at most the killed epoch is repeated
    assert epochs(out) == list(range(4))
    ckpt = torch.load(out / "best_model.pt", weights_only=True)
    assert ckpt["epoch"] in range(4) and (out / "test_metrics.json").exists()


def sigterm_at_step(monkeypatch, step):
    """SIGTERM to this process after the given training step, as a scheduler sends it before the wall time."""
    check = train.StopRule.check

    def check_then_signal(self, global_step):
        if global_step == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return check(self, global_step)
    monkeypatch.setattr(train.StopRule, "check", check_then_signal)


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    root = make_study(tmp_path / "d", per_case=3)
    base = [f"--data_dir={root}", "--n_epochs=2", *TINY, "--batch_size=2"]  # 6 steps per epoch
    r = run("train.py", *base, f"--out_dir={tmp_path / 'full'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        sigterm_at_step(m, 8)  # inside the second epoch
        r = run("train.py", *base, f"--out_dir={out}", cwd=tmp_path)
    assert r.returncode == 0 and "SIGTERM: saved" in r.stdout and "epoch 1 step 2" in r.stdout, r.stdout
    assert not (out / "test_metrics.json").exists() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    r = run("train.py", *base, f"--out_dir={out}", "--resume=True", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert strip_seconds(out) == strip_seconds(tmp_path / "full")  # resumed exactly where it stopped
    test = [json.load(open(d / "test_metrics.json"))["ssim"] for d in (out, tmp_path / "full")]
    assert test[0] == test[1]


def test_same_seed_same_metrics(tmp_path):
    root = make_study(tmp_path / "d", per_case=2)
    for name in ("a", "b"):
        r = run("train.py", f"--data_dir={root}", f"--out_dir={tmp_path / name}", "--n_epochs=2", *TINY, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    assert strip_seconds(tmp_path / "a") == strip_seconds(tmp_path / "b") and len(strip_seconds(tmp_path / "a")) == 2


def test_nan_loss_stops_and_keeps_last_good_checkpoint(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained.out, out)
    before = (out / "best_model.pt").read_bytes()
    state = torch.load(out / "last.pt", weights_only=True)
    state["model"]["decoder.net.up2.weight"].fill_(1e30)  # the next epoch's loss overflows to Inf/NaN
    torch.save(state, out / "last.pt")
    r = run("train.py", f"--data_dir={trained.root}", f"--out_dir={out}", *TINY, "--n_epochs=3", "--resume=True",
            cwd=tmp_path)
    assert r.returncode != 0 and "training loss became" in r.stdout + r.stderr, r.stdout + r.stderr
    assert (out / "best_model.pt").read_bytes() == before and epochs(out) == [0, 1]


def test_max_steps_stops_at_the_same_step_on_any_machine(tmp_path):
    root = make_study(tmp_path / "d", per_case=2)
    out = tmp_path / "run"
    r = run("train.py", f"--data_dir={root}", f"--out_dir={out}", "--n_epochs=10", "--max_steps=5", *TINY, cwd=tmp_path)
    assert r.returncode == 0 and "limit of 5 steps reached in epoch 2" in r.stdout, r.stdout + r.stderr
    rows = list(csv.DictReader(open(out / "metrics.csv")))  # 2 steps an epoch at batch 4: epochs 0, 1 and part of 2
    assert [int(row["steps"]) for row in rows] == [2, 4, 5] and (out / "test_metrics.json").exists()
