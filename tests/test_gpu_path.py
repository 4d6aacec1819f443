"""The GPU path on the CPU: bf16 autocast, fused AdamW and channels_last (and torch.compile), end to end through
train.py, sample.py, torchrun and bench.py, so that no line a cluster GPU runs has run only there."""
import csv
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters as dynamo_counters

import bench
import checkpoints
import phantom
from conftest import ROOT, TINY, TINY_PRIOR, job_env, make_study, run
from metrics import score
from metrics import reconstruct
from vqvae import VectorQuantizer, VQVAE
from test_cluster import sigterm_at_step, strip_seconds

GPU_PATH = ["--amp=True", "--fused_adamw=True", "--channels_last=True"]


def rows(out):
    return list(csv.DictReader(open(out / "metrics.csv")))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("gpu") / "d", per_case=3)


@pytest.fixture
def dtypes(monkeypatch):
    """What the quantiser's distances and the decoder's output were computed in, as the run goes."""
    seen = dict(distances=set(), decoded=set())
    distances, forward = VectorQuantizer.distances, VQVAE.forward

    def record_distances(self, flat):
        d = distances(self, flat)
        seen["distances"].add(d.dtype)
        return d

    def record_decoded(self, x):
        out = forward(self, x)
        seen["decoded"].add(out[0].dtype)
        return out
    monkeypatch.setattr(VectorQuantizer, "distances", record_distances)
    monkeypatch.setattr(VQVAE, "forward", record_decoded)
    return seen


def test_vqvae_trains_in_bf16_with_fused_adamw_and_channels_last(study, tmp_path, dtypes, monkeypatch):
    base = [f"--data_dir={study}", "--n_epochs=3", *TINY, "--batch_size=2", *GPU_PATH]
    full = tmp_path / "full"
    r = run("train.py", *base, f"--out_dir={full}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert dtypes["decoded"] == {torch.bfloat16} and dtypes["distances"] == {torch.float32}
    losses = [float(row["train_loss"]) for row in rows(full)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    best = checkpoints.load(full / "best_model.pt", "vqvae")
    codebook = ("embedding", "cluster_size", "embed_sum")  # the EMA statistics stay fp32
    assert {best["model"][f"quantizer.{b}"].dtype for b in codebook} == {torch.float32}
    # the validation SSIM of the best epoch is scikit-image's on the run's own (bf16, channels_last) reconstructions
    model, _ = checkpoints.load_model(full / "best_model.pt", kind="vqvae")
    model = model.to(memory_format=torch.channels_last)
    import dataset
    val = dataset.prepare(dataset.read_splits(full)["validate"])
    rec, _ = reconstruct(model, val["x"], "cpu", amp=True)
    ssim = np.mean([score(x.astype(np.float64), r.astype(np.float64))["ssim"] for x, r in zip(val["x"], rec)])
    assert ssim == pytest.approx(float(rows(full)[best["epoch"]]["val_ssim"]), abs=1e-4)
    # SIGTERM inside the second epoch, then --resume, gives the uninterrupted run's numbers
    cut = tmp_path / "cut"
    with monkeypatch.context() as m:
        sigterm_at_step(m, 8)
        assert "SIGTERM: saved" in run("train.py", *base, f"--out_dir={cut}", cwd=tmp_path).stdout
    r = run("train.py", *base, f"--out_dir={cut}", "--resume=True", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert strip_seconds(cut) == strip_seconds(full)


def test_prior_and_sample_on_the_gpu_path(trained, tmp_path, monkeypatch):
    base = [*TINY_PRIOR, f"--vqvae_checkpoint={trained.out / 'best_model.pt'}", "--prior_n_epochs=3", *GPU_PATH,
            "--prior_batch_size=2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = run("train.py", *base, f"--out_dir={full}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    bits = [float(row["train_loss"]) for row in rows(full)]
    assert all(np.isfinite(bits)) and bits[-1] < bits[0]
    with monkeypatch.context() as m:
        sigterm_at_step(m, 10)
        assert "SIGTERM: saved" in run("train.py", *base, f"--out_dir={cut}", cwd=tmp_path).stdout
    assert run("train.py", *base, f"--out_dir={cut}", "--resume=True", cwd=tmp_path).returncode == 0
    assert strip_seconds(cut) == strip_seconds(full)
    r = run("sample.py", f"--prior_checkpoint={full / 'best_prior.pt'}", "--n_samples=3", "--n_real=4", "--amp=True",
            "--c2st_steps=2", f"--out_dir={tmp_path / 'samples'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    import nibabel as nib
    assert all(np.isfinite(nib.load(f).get_fdata()).all() for f in (tmp_path / "samples" / "nifti").iterdir())


def test_torch_compile_on_the_cpu(tmp_path, monkeypatch):
    # dynamo and AOT autograd trace the training step as on a GPU; the CPU's inductor backend would add 35 s of C++
    # compilation on 2 cores (a GPU compiles Triton kernels instead), so the graphs run eagerly
    compiled = []
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compiled.append(model) or compile_(model, backend="aot_eager"))
    root = make_study(tmp_path / "d", per_case=1, cases={"train": [4, 5], "validate": [36]})
    r = run("train.py", f"--data_dir={root}", f"--out_dir={tmp_path / 'run'}", "--n_epochs=1", *TINY, *GPU_PATH,
            "--compile=True", "--batch_size=2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(compiled) == 1 and not dynamo_counters["graph_break"]
    assert np.isfinite(float(rows(tmp_path / "run")[0]["train_loss"]))


def test_torchrun_two_processes_on_the_gpu_path(tmp_path):
    root = make_study(tmp_path / "d", per_case=4)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train.py"), f"--data_dir={root}", f"--out_dir={out}", "--n_epochs=2",
                        "--device=cpu", *TINY, *GPU_PATH, "--batch_size=1", "--time_limit_minutes=10"],  # 16 steps:
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)  # one wall-time exchange
    assert r.returncode == 0, r.stderr[-3000:]
    line = [l for l in r.stdout.splitlines() if l.startswith("state fingerprints")]
    assert len(line) == 1 and "identical on all 2 ranks" in line[0], r.stdout
    assert r.stdout.count("test: ssim=") == 1 and [int(row["epoch"]) for row in rows(out)] == [0, 1]
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".pt") == ["best_model.pt", "last.pt"]
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_bench_rows_on_the_gpu_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(phantom, "STUDY_ROOT", str(tmp_path / "study"))
    monkeypatch.setattr(phantom, "STUDY_SIZES", {"train": 8, "validate": 4, "test": 4})
    monkeypatch.chdir(tmp_path)
    bench.main(["--device=cpu", *GPU_PATH, *TINY, "--steps=1", "--warmup=1", "--sample_n=1", "--prep=True",
                "--prior_d_model=16", "--prior_n_layers=1", "--prior_n_heads=2", "--prior_batch_size=2"])
    out = capsys.readouterr().out
    for row in ("train images/s", "train FLOPs per image", "peak host memory", "epoch overhead in all",
                "prior training code grids/s", "prior sampling", "data preparation, cold (16 slices)",
                "data preparation, cached (16 slices)", "amp=True fused_adamw=True channels_last=True"):
        assert row in out, out
    flops = float(out.split("train FLOPs per image")[1].split()[0])
    assert flops > 0


def test_the_generation_check_runs_small_on_the_cpu(study, tmp_path):
    """slurm/generation_check.sh as a GPU node runs it, in a copy of the repo, on a tiny study with tiny models."""
    import shutil
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns("data", "runs", ".git", ".venv*", "__pycache__", "tests"))
    env = job_env(GEN_CHECK_DATA=study, GEN_CHECK_VQ_MINUTES="0.05", GEN_CHECK_PRIOR_MINUTES="0.05",
                  GEN_CHECK_ARGS=" ".join(TINY + [a for a in TINY_PRIOR if not a.startswith("--stage")]),
                  GEN_CHECK_SAMPLE_ARGS="--n_samples=6 --n_real=6 --c2st_steps=2")
    r = subprocess.run(["bash", str(repo / "slurm" / "generation_check.sh")], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "no GPU: these are CPU numbers" in r.stdout and "two-sample test accuracy" in r.stdout
    assert "generation check:" in r.stdout and "coverage" in r.stdout
