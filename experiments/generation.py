"""The generation recipe, run as a user runs it and judged by sample.py, over seeds, phantoms and candidate settings
(EXPERIMENTS.md, Generation). Each run trains the VQ-VAE (once per data, seed and VQ-VAE settings, then reused),
the prior, and draws and judges 256 samples; its measures go to a line of runs/gen/results.jsonl.

    python experiments/generation.py --data_dir=data/demo --seed=0 --name=recipe
    python experiments/generation.py --data_dir=data/other --seed=1 --name=aug --prior_args="--prior_augment=4"
    python experiments/generation.py --summary                 # mean and spread over seeds, a row per candidate
    python experiments/generation.py --compare=A/samples-x,B/samples-y --figure=sampling.png  # 8 of each, a row each

Budgets are in epochs and steps (deterministic, and the same on a busy machine), each what the named minutes give on
a 2-core CPU alone; --prior_minutes (wall time, as the README's demo runs) may replace --prior_steps.
"""
import csv
import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import figures  # noqa: E402
import options  # noqa: E402
from options import Option  # noqa: E402
from utils import DataError, make_folder, read_nifti, run_script  # noqa: E402

BLOCK = dict(
    data_dir=Option("data/demo"),
    seed=Option(0),
    name=Option("recipe"),                  # the candidate's name in the results
    vq_args=Option(""),                     # train.py options of the VQ-VAE, after the demo's config files
    vq_epochs=Option(8, at_least=1),        # 8 epochs: about 3 minutes on a 2-core CPU at the demo's settings
    prior_args=Option(""),                  # train.py options of the prior
    prior_steps=Option(480, at_least=1),    # the budget; 480: 8 minutes of the demo's prior on a 2-core CPU alone
    prior_minutes=Option(None, kind=float, above=0),  # wall time instead of steps
    sample_args=Option(""),                 # sample.py options (temperature, top_k)
    out=Option("runs/gen"),
    summary=Option(False),
    compare=Option(None, kind=str),         # sample folders, comma-separated: their first 8 samples, a row each
    figure=Option("runs/gen/compare.png"),
)
CONFIGS = ["config/cpu.py", "config/demo_generation.py"]


def call(args, log):
    """A repo script in a new process, its output appended to log; its wall time."""
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ python {' '.join(args)}\n")
        f.flush()
        r = subprocess.run([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise DataError(f"python {' '.join(args)} failed (exit {r.returncode}); see {log}")
    return time.time() - t0


def prior_rows(run):
    rows = list(csv.DictReader(open(os.path.join(run, "metrics.csv"))))
    best = min(rows, key=lambda r: float(r["val_bits_per_code"]))
    last = rows[-1]
    return dict(prior_steps=int(last["steps"]), prior_epochs=len(rows), best_epoch=int(best["epoch"]),
                best_val_bits=float(best["val_bits_per_code"]), last_val_bits=float(last["val_bits_per_code"]),
                last_train_bits=float(last["train_loss"]), unigram_bits=float(last["unigram_bits_per_code"]))


def one(cfg):
    data = os.path.basename(os.path.normpath(cfg.data_dir))
    vq_key = "".join(c for c in cfg.vq_args if c.isalnum() or c in "=._-") or "default"
    vq_run = os.path.join(cfg.out, f"{data}-vq-{vq_key}-s{cfg.seed}")
    budget = f"m{cfg.prior_minutes:g}" if cfg.prior_minutes else f"s{cfg.prior_steps}"
    prior_run = os.path.join(vq_run, f"prior-{cfg.name}-{budget}")
    samples = os.path.join(prior_run, "samples-" + ("".join(c for c in cfg.sample_args if c.isalnum() or c in "=._")
                                                    or "default"))
    make_folder(cfg.out)
    log = os.path.join(cfg.out, "log.txt")
    times = {}
    if not os.path.exists(os.path.join(vq_run, "test_metrics.json")):
        times["vqvae_s"] = call(["train.py", *CONFIGS, f"--data_dir={cfg.data_dir}", f"--seed={cfg.seed}",
                                 f"--n_epochs={cfg.vq_epochs}", f"--out_dir={vq_run}", *shlex.split(cfg.vq_args)], log)
    if not os.path.exists(os.path.join(prior_run, "best_prior.pt")):
        limit = [f"--time_limit_minutes={cfg.prior_minutes}" if cfg.prior_minutes else f"--max_steps={cfg.prior_steps}",
                 "--prior_n_epochs=10000"]
        times["prior_s"] = call(["train.py", *CONFIGS, "--stage=prior", f"--seed={cfg.seed}", *limit,
                                 f"--vqvae_checkpoint={vq_run}/best_model.pt", f"--out_dir={prior_run}",
                                 *shlex.split(cfg.prior_args)], log)
    times["sample_s"] = call(["sample.py", f"--prior_checkpoint={prior_run}/best_prior.pt", f"--seed={cfg.seed}",
                              f"--out_dir={samples}", *shlex.split(cfg.sample_args)], log)
    m = json.load(open(os.path.join(samples, "measures.json")))
    row = dict(data=data, name=cfg.name, seed=cfg.seed, vq_args=cfg.vq_args, prior_args=cfg.prior_args,
               budget=budget, sample_args=cfg.sample_args, samples=samples,
               vq_test_ssim=json.load(open(os.path.join(vq_run, "test_metrics.json")))["ssim"],
               **prior_rows(prior_run), c2st=m["c2st"]["accuracy"], c2st_ci=m["c2st"]["ci95"],
               coverage=m["density_coverage"]["samples"]["coverage"],
               coverage_real=m["density_coverage"]["real"]["coverage"],
               density=m["density_coverage"]["samples"]["density"],
               density_real=m["density_coverage"]["real"]["density"],
               diversity=m["diversity"]["samples"], diversity_real=m["diversity"]["real"],
               symmetry=m["symmetry"]["samples"]["median"], symmetry_real=m["symmetry"]["real"]["median"],
               nearest=m["nearest_train_ssim"]["samples"]["median"],
               nearest_max=m["nearest_train_ssim"]["samples"]["max"], **times)
    with open(os.path.join(cfg.out, "results.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def summary(out):
    """A row per data, candidate, budget and sampling: mean +- standard deviation over its seeds."""
    rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    groups = {}
    for r in rows:
        groups.setdefault((r["data"], r["name"], r["budget"], r["sample_args"]), []).append(r)
    keys = ("c2st", "coverage", "coverage_real", "diversity", "diversity_real", "symmetry", "symmetry_real",
            "best_val_bits", "last_val_bits", "last_train_bits", "vq_test_ssim")
    print("| data | candidate | budget | sampling | seeds | " + " | ".join(keys) + " |")
    print("|" + " --- |" * (5 + len(keys)))
    for (data, name, budget, sampling), rs in sorted(groups.items()):
        cells = [f"{np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs], ddof=1) if len(rs) > 1 else 0:.3f}"
                 for k in keys]
        print(f"| {data} | {name} | {budget} | {sampling or 'default'} | {len(rs)} | " + " | ".join(cells) + " |")


def compare(folders, path):
    """The first 8 samples of each folder (their NIfTI files), a row per folder titled by its prior run and name."""
    rows, titles = [], []
    for folder in folders:
        folder = os.path.normpath(folder)
        name = os.path.relpath(folder, os.path.dirname(os.path.dirname(folder)))  # prior-X/samples-Y
        for i in range(8):
            rows.append(read_nifti(os.path.join(folder, "nifti", f"sample_{i:03d}.nii.gz")))
            titles.append(f"{name} #{i}")
    figures.plot_grid(np.clip(np.stack(rows), 0, 1), path, titles, ncols=8)
    print(f"-> {path}")


def main(argv):
    cfg = options.parse(BLOCK, argv)
    if cfg.compare:
        return compare(cfg.compare.split(","), cfg.figure)
    summary(cfg.out) if cfg.summary else one(cfg)


if __name__ == "__main__":
    run_script(main)
