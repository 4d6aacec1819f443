"""The job around a training run: where this process runs (device, rank under torchrun), the run folder it writes
(claimed atomically, or the one it resumes, checked against this command's settings and data), when it stops (the
time limit, SIGTERM), and the few collectives the stages need (each a no-op without torch.distributed).
"""
import hashlib
import inspect
import math
import os
import signal
import time

import torch
import torch.distributed as dist

import checkpoints
import dataset
from utils import DataError, Terminated, make_folder, newest_first, progress, write_text

SYNC_EVERY = 16  # steps between stop-flag exchanges under DDP


def on_cuda(choice, dev):
    """A GPU-path option ("auto", True or False) -> whether it is on: auto means where the device is CUDA."""
    return dev.type == "cuda" if choice == "auto" else choice


def pick_device(name="auto"):
    """'auto' -> cuda if available, else cpu; otherwise the named device, which must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise DataError(f"--device={name}: not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DataError(f"--device={name}: CUDA is not available on this machine; use --device=cpu or auto")
    return dev


class Job:
    """This process's place in the job: rank, device, autocast and run folder, one decision a line as in nanoGPT."""

    def __init__(self, cfg):
        self.ddp = "RANK" in os.environ  # started by torchrun
        dev = pick_device(cfg.device)
        if self.ddp:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.ddp else (0, 1)
        self.master = self.rank == 0
        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(dev)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.dev = dev
        self.amp, self.fused_adamw, self.channels_last = (on_cuda(c, dev) for c in (cfg.amp, cfg.fused_adamw,
                                                                                      cfg.channels_last))
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp)
        self.out = self.on_master(lambda: resume_folder(cfg) if cfg.resume else claim_folder(cfg.out_dir))
        self.tb = self.tensorboard() if cfg.tensorboard and self.master else None

    # ---- output ------------------------------------------------------------------------------------------------
    def log(self, *a):
        if self.master:
            print(*a, flush=True)

    def progress(self, iterable, desc):
        return progress(iterable, desc, enabled=self.master)

    def path(self, name):
        return os.path.join(self.out, name)

    def tensorboard(self):
        """A SummaryWriter into <run>/tensorboard; tensorboard is imported only when switched on."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise DataError("--tensorboard=True needs the tensorboard package: pip install tensorboard") from None
        return SummaryWriter(self.path("tensorboard"))

    def log_scalars(self, row, stage):
        if self.tb:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{stage}/{k}", v, row["epoch"])
            self.tb.flush()

    # ---- collectives -------------------------------------------------------------------------------------------
    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.ddp:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, 0)
        return box[0]

    def on_master(self, fn):
        """fn() run on rank 0 alone, its result (or its DataError, raised everywhere) shared with every rank."""
        try:
            out = fn() if self.master else None
        except DataError as e:
            out = e
        out = self.broadcast(out)
        if isinstance(out, DataError):
            raise out
        return out

    def all_sum(self, t):
        if self.ddp:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def prepare(self, splits, names, cache_dir, skip_bad):
        """The named splits read, checked and normalised (dataset.prepare), rank 0 first so that it fills the cache
        the others read; the slices skipped are listed in skipped.txt."""
        prepared = {}
        for s in names:
            if not self.master:
                self.barrier()
            prepared[s] = dataset.prepare(splits[s], cache_dir, skip_bad, desc=s)
            if self.master:
                self.barrier()
        skipped = [m for p in prepared.values() for m in p["skipped"]]
        if self.master and skipped:
            write_text(self.path("skipped.txt"), "\n".join(skipped) + "\n")
            self.log(f"skipped {len(skipped)} slices, constant or bad (listed in {self.path('skipped.txt')}):\n  "
                     + "\n  ".join(skipped[:5]) + ("\n  ..." if len(skipped) > 5 else ""))
        return prepared

    def wrap(self, model, compile_model):
        """What the training steps call: the model, through torch.compile if asked, and DDP under torchrun."""
        net = torch.compile(model) if compile_model else model
        if self.ddp:  # the quantiser keeps its buffers in step itself (all-reduced EMA), so no buffer sync per step
            ddp = torch.nn.parallel.DistributedDataParallel
            no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else "broadcast_buffers")  # torch >= 2.14 names it so and warns on the old name
            net = ddp(net, device_ids=[self.dev.index] if self.dev.type == "cuda" else None, **{no_sync: False})
        return net

    def check_ranks_agree(self, model):
        """Under DDP, the codebook EMA and restarts must leave every rank with the same state: compare fingerprints."""
        if not self.ddp:
            return
        digest = hashlib.sha1(b"".join(t.detach().cpu().numpy().tobytes() for t in model.state_dict().values()))
        digests = [None] * self.world
        dist.all_gather_object(digests, digest.hexdigest()[:12])
        self.log(f"state fingerprints {'identical on all' if len(set(digests)) == 1 else 'DIFFER across'} "
                 f"{self.world} ranks: {' '.join(digests)}")

    def close(self):
        if self.tb:
            self.tb.close()
        if self.ddp:
            dist.barrier()
            dist.destroy_process_group()

    # ---- resume ------------------------------------------------------------------------------------------------
    def resume_state(self, cfg, block, best_file):
        """last.pt of the run being resumed (None for a new run), refused unless its settings match this command's
        in every option that is not resumable. The best score comes from the best checkpoint itself, so that a run
        killed between the two files stays consistent."""
        if not cfg.resume:
            return None
        path = self.path("last.pt")
        state = checkpoints.load(path, "state")
        if state["stage"] != cfg.stage:
            raise DataError(f"--resume: {path} is a {state['stage']} run; add --stage={state['stage']}")
        differences = [f"{k}={state['config'].get(k)!r} there, {v!r} here" for k, v in vars(cfg).items()
                       if not block[k].resumable and state["config"].get(k) != v]
        if differences:
            raise DataError(f"--resume: will not continue {self.out}, its settings differ: {'; '.join(differences)}")
        best = self.path(best_file)
        state["position"]["best"] = checkpoints.load(best)["score"] if os.path.exists(best) else -math.inf
        return state

    def check_same_data(self, state, data):
        """On resume, the data must be what the run was trained on: the same root and the same files in each split."""
        if state is None:
            return
        differences = [f"the {k} files differ" if isinstance(v, list) else f"{k} {state['data'].get(k)} there, {v} here"
                       for k, v in data.items() if state["data"].get(k) != v]
        if differences:
            raise DataError(f"--resume: will not continue {self.out} on other data: {'; '.join(differences)}")


def resume_folder(cfg):
    """--resume=RUN, or --resume=True: out_dir when given, else the newest run of this stage (whose settings
    resume_state then checks against this command's)."""
    out = cfg.resume if isinstance(cfg.resume, str) else cfg.out_dir
    if not out:
        out = next((os.path.dirname(p) for p in newest_first("runs/*/last.pt")
                    if checkpoints.load(p, mmap=True).get("stage") == cfg.stage), None)
    if not out:
        raise DataError(f"--resume=True: no {cfg.stage} run under runs/ to resume; give --out_dir or "
                        "--resume=RUN_FOLDER")
    if not os.path.exists(os.path.join(out, "last.pt")):
        raise DataError(f"--resume: {os.path.join(out, 'last.pt')} not found")
    return out


def claim_folder(out_dir):
    """Create the output folder of a new run. A given out_dir must not hold a run (a last.pt); without one, a new
    runs/<timestamp>, with -2, -3, ... when runs started in the same second: creating it is the atomic claim."""
    if out_dir:
        if os.path.exists(os.path.join(out_dir, "last.pt")):
            raise DataError(f"--out_dir={out_dir}: already holds a run; continue it with --resume=True, or choose "
                            "another --out_dir")
        make_folder(out_dir)
        return out_dir
    make_folder("runs")
    stamp = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    for n in range(1, 1000):
        out = stamp if n == 1 else f"{stamp}-{n}"
        try:
            os.mkdir(out)
            return out
        except FileExistsError:
            continue
        except OSError as e:
            raise DataError(f"{out}: cannot create the run folder ({e.strerror or e})") from None
    raise DataError(f"{stamp}: no free run folder name")


def lr_at(step, progress, peak, warmup):
    """The learning rate: linear warm-up, then cosine decay to 10% over the run's progress (by steps or by wall time,
    as StopRule measures it)."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


class StopRule:
    """When to leave the step loop: after the step that crosses the time limit, or on SIGTERM. From its creation to
    close() a SIGTERM only sets a flag, so that the loop saves its position before it leaves; elsewhere it raises
    utils.Terminated. Under DDP both come from rank 0, shared every SYNC_EVERY steps (reading them back is a host
    sync), so every rank leaves after the same step and follows the same wall-time learning-rate schedule."""

    def __init__(self, job, time_limit_minutes, elapsed, max_steps=None):
        self.job, self.max_steps = job, max_steps
        self.limit = time_limit_minutes * 60 if time_limit_minutes else None
        self.t_start = time.time() - elapsed
        self.shared = elapsed / self.limit if self.limit else 0.0  # rank 0's progress, as last shared
        self.signalled = False
        self.previous = signal.signal(signal.SIGTERM, lambda *_: setattr(self, "signalled", True))

    def close(self, reason):
        """After the loop, which left for `reason`: SIGTERM raises again, and one that the loop did not stop for
        (it came during the last validation) is raised now."""
        signal.signal(signal.SIGTERM, self.previous)
        if self.signalled and reason != "signal":
            raise Terminated("SIGTERM after the last training step; no file was left half-written")

    def elapsed(self):
        return time.time() - self.t_start

    def used(self):
        return self.elapsed() / self.limit if self.limit else 0.0

    def progress(self):
        """Fraction of the time limit used: this process's clock, or rank 0's under DDP."""
        return self.shared if self.job.ddp else self.used()

    def limit_text(self, reason):
        return f"time limit of {self.limit / 60:g} min" if reason == "time" else f"limit of {self.max_steps} steps"

    def check(self, global_step):
        """After a step: 'signal', 'time', 'steps' (max_steps reached: the same step on every rank) or None."""
        if self.max_steps and global_step >= self.max_steps:
            return "steps"
        used, signalled = self.used(), self.signalled
        if self.job.ddp:
            if global_step % SYNC_EVERY:
                return None
            t = torch.tensor([used, signalled], dtype=torch.float64, device=self.job.dev)
            dist.broadcast(t, 0)
            self.shared, signalled = t.tolist()
            used = self.shared
        return "signal" if signalled else "time" if used >= 1 else None
