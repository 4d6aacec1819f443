"""Worker pools measured (EXPERIMENTS.md, Worker pools): the time and peak memory of preparing and of writing the
study-sized phantom (11,460 + 660 + 540 slices) with the project's pool (pool.py) and with the fork pool it
replaced (multiprocessing.Pool, fork context, chunks of 16), at 2, 8 and 16 workers; and `--task=receive`, the
run's side alone: workers that send back a slice-sized result at no cost, so the time is the run's receiving.

    python experiments/pools.py                      # every row; writes data/study first if it is not there
    python experiments/pools.py --task=prepare --workers=16 --pool=fork

Each row runs in a new process that has imported torch and run one operation, as train.py has when it prepares
data. Memory is the peak, sampled every 0.1 s, of the proportional set size (PSS: shared pages split between the
processes that share them) summed over that process and all its descendants, so it is what the machine gives the
whole pool; the summed resident set size counts shared pages once per process and is shown beside it.
"""
import itertools
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import options  # noqa: E402
import phantom  # noqa: E402
import pool  # noqa: E402
from options import Option  # noqa: E402
from utils import run_script  # noqa: E402

BLOCK = dict(
    task=Option(None, kind=str, choices=("prepare", "write", "receive")),  # None: every task, pool and count
    pool=Option(None, kind=str, choices=("project", "fork")),
    workers=Option(None, kind=int, at_least=1),
)


def tree(root):
    """root's pid and those of all its descendants."""
    parent = {}
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    found, todo = [], [root]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += [c for c, pp in parent.items() if pp == p]
    return found


def memory(pids):
    """Summed PSS and RSS in MB of the given processes."""
    pss = rss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith(("Pss:", "Rss:")):
                        kb = int(line.split()[1])
                        pss, rss = (pss + kb, rss) if line.startswith("Pss:") else (pss, rss + kb)
        except OSError:
            continue
    return pss / 1024, rss / 1024


def peak_while(fn):
    """(seconds fn took, peak summed PSS, peak summed RSS) of this process and its descendants while fn runs."""
    peak, running = [0.0, 0.0], [True]

    def sample():
        while running[0]:
            pss, rss = memory(tree(os.getpid()))
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            time.sleep(0.1)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    running[0] = False
    sampler.join()
    return seconds, *peak


def fork_map(fn, items, workers):
    """The pool dataset.prepare and phantom.write_phantom used before pool.py."""
    with mp.get_context("fork").Pool(workers) as p:
        return list(p.imap(fn, items, chunksize=pool.CHUNK))


def loaded_slice(_):
    """What a worker sends back per slice when it prepares data, made at no cost: the run's receiving alone."""
    return np.zeros((dataset.H, dataset.W), np.float32), 0.0, 1.0, np.zeros((dataset.H, dataset.W), np.uint8)


def task_items(task, scratch):
    """The function and items of one task on the study-sized phantom."""
    if task == "receive":
        return loaded_slice, list(range(sum(phantom.STUDY_SIZES.values())))
    if task == "prepare":
        files = [f for s in dataset.SPLITS for f in dataset.list_slices(os.path.join(phantom.STUDY_ROOT,
                                                                                       f"keras_slices_{s}"))]
        return dataset._load_or_error, list(zip(files, dataset.find_masks(files)))
    items = []
    for split, n in phantom.STUDY_SIZES.items():
        for sub in (f"keras_slices_{split}", f"keras_slices_seg_{split}"):
            os.makedirs(os.path.join(scratch, sub), exist_ok=True)
        items += [(os.path.join(scratch, f"keras_slices_{split}", f"case_{c:03d}_week_{w}_slice_{k}.nii.gz"),
                   os.path.join(scratch, f"keras_slices_seg_{split}", f"seg_{c:03d}_week_{w}_slice_{k}.nii.gz"), c, w,
                   k, n_week, 0, 0.0) for c, w, k, n_week in phantom._plan(split, n, 0)]
    return phantom._write_one, items


def one(task, kind, workers):
    """One row, measured in this process."""
    import torch
    float(torch.ones(8).sum())  # a parent that has imported torch and used it, as train.py's has
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the fork pool's workers would inherit run_script's handler
    scratch = os.path.join(os.path.dirname(phantom.STUDY_ROOT), f"pools-scratch-{os.getpid()}")
    fn, items = task_items(task, scratch)
    try:
        run = (lambda: fork_map(fn, items, workers)) if kind == "fork" else (
            lambda: pool.parallel_map(fn, items, workers, [str(i) for i in range(len(items))], show=False))
        seconds, pss, rss = peak_while(run)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"| {task} | {kind} | {workers} | {len(items)} | {seconds:.1f} | {pss:,.0f} | {rss:,.0f} |", flush=True)


def main(argv):
    cfg = options.parse(BLOCK, argv)
    if cfg.task and cfg.pool and cfg.workers:
        return one(cfg.task, cfg.pool, cfg.workers)
    phantom.ensure_demo(phantom.STUDY_ROOT, phantom.STUDY_SIZES)
    print(f"{len(os.sched_getaffinity(0))} CPUs; each row in a new process")
    print("| task | pool | workers | items | seconds | peak PSS, MB | peak summed RSS, MB |\n"
          "| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for task, kind, workers in itertools.product(("prepare", "write"), ("fork", "project"), (2, 8, 16)):
        if (cfg.task or task) == task and (cfg.pool or kind) == kind and (cfg.workers or workers) == workers:
            subprocess.run([sys.executable, os.path.abspath(__file__), f"--task={task}", f"--pool={kind}",
                            f"--workers={workers}"], check=True)


if __name__ == "__main__":
    run_script(main)
