"""The project's one process pool: dataset.prepare reads slices with it, phantom.write_phantom writes them.

Each worker is a new Python process (`python pool.py FD`) that talks to the run over a socket of its own, so
it inherits nothing from the run: not its SIGTERM handler, not torch, a CUDA context or gigabytes of data.
multiprocessing.Pool forked its workers from the run: they inherited the run's SIGTERM handler, ignored the
SIGTERM that Pool.terminate() relies on, and the run waited for them forever. A forkserver would start workers
clean, but on Python 3.11 it does not preload the run's main module, so every worker imports train.py and with
it torch again (1.1 s per worker, measured). A new process imports only the module of the function it runs.
One socket per worker, rather than concurrent.futures, says which worker died and which item it held, so that
a worker killed by the OOM killer or a crash in a decoder ends the run with one line naming the file. A pool
that has finished is closed and joined; on an error or a signal its workers are terminated, which is safe
because their work is pure or written atomically. Timings and memory against the fork pool:
EXPERIMENTS.md, Worker pools (`python experiments/pools.py`).
"""
import collections
import importlib
import os
import signal
import socket
import subprocess
import sys
import traceback
from multiprocessing.connection import Connection, wait

from utils import DataError, progress

MAX_WORKERS = 16  # beyond it the run's own receiving of results, not the workers, sets the pace (EXPERIMENTS.md)
CHUNK = 16        # consecutive items a worker takes at a time: a phantom worker reuses a patient's texture fields


def n_workers(n_items, per_worker=64):
    """Workers for n_items: one per per_worker items, at most the CPUs this process may run on (a SLURM job's
    allocation, not the node's count) and MAX_WORKERS."""
    return max(1, min(n_items // per_worker + 1, len(os.sched_getaffinity(0)), MAX_WORKERS))


def serve(conn):
    """A worker: the run's sys.path and the function first, then one reply per item of each chunk it is sent,
    until told to stop or the run is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the run handles it
    try:
        sys.path[:] = conn.recv()  # before the function, which may live on it
        fn = conn.recv()
        while (task := conn.recv()) is not None:
            start, chunk = task
            for k, item in enumerate(chunk):
                try:
                    conn.send((start + k, True, fn(item)))
                except Exception:  # a bug, not bad input (fn returns that): its traceback goes to the run
                    conn.send((start + k, False, traceback.format_exc()))
    except (EOFError, OSError):  # the run has exited
        pass


class WorkerDied(Exception):
    """A worker process ended while it held items[index]."""

    def __init__(self, index, returncode):
        how = f"exited with status {returncode}"
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name
            how = f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
        super().__init__(how)
        self.index, self.how = index, how


def start_worker():
    """A new Python running serve() -> (the run's end of its socket, the process)."""
    ours, theirs = socket.socketpair()
    with theirs:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
                                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
    return Connection(ours.detach()), proc


def _completed(fn, items, workers):
    """(index, fn(item)) as the workers finish them; a worker that dies raises WorkerDied."""
    chunks = collections.deque((i, items[i:i + CHUNK]) for i in range(0, len(items), CHUNK))
    procs, held = {}, {}  # socket -> its worker; socket -> the indices sent to it and not yet answered, in order

    def give(conn, first=False):
        start, chunk = chunks.popleft()
        held[conn].extend(range(start, start + len(chunk)))
        try:
            if first:
                conn.send(sys.path)
                conn.send(fn)
            conn.send((start, chunk))
        except OSError:  # the worker is gone
            died(conn)

    def died(conn):
        try:
            procs[conn].wait(5)
        except subprocess.TimeoutExpired:
            pass
        raise WorkerDied(held[conn][0], procs[conn].returncode)

    try:
        for _ in range(min(workers, len(chunks))):
            conn, proc = start_worker()
            procs[conn], held[conn] = proc, collections.deque()
            give(conn, first=True)
        while any(held.values()):
            for conn in wait([c for c, h in held.items() if h]):
                try:
                    i, ok, result = conn.recv()
                except (EOFError, OSError):  # the worker is gone
                    died(conn)
                if not ok:
                    raise RuntimeError(f"a worker failed on item {i}:\n{result}")
                held[conn].popleft()
                if not held[conn] and chunks:
                    give(conn)
                yield i, result
        for conn in procs:  # finished: closed and joined, not terminated
            conn.send(None)
        for proc in procs.values():
            proc.wait(10)
    finally:  # an error, a signal, or a worker that would not stop
        for conn, proc in procs.items():
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            conn.close()


def importable(fn):
    """fn, which a worker imports by its module's name: for a function of a script run as __main__ (python
    phantom.py), the same function of the script imported by its file's name (each script guards its main)."""
    if fn.__module__ != "__main__":
        return fn
    name = os.path.splitext(os.path.basename(sys.modules["__main__"].__file__))[0]
    return getattr(importlib.import_module(name), fn.__qualname__)


def parallel_map(fn, items, workers, names, desc="", show=True):
    """[fn(item) for item in items] in `workers` processes (in this one for workers <= 1), with a progress bar.
    fn must be a module-level function (a worker imports it). A worker that dies ends the map with one DataError
    naming the item it held, names[i]."""
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in progress(items, desc, len(items), show)]
    fn = importable(fn)
    results = [None] * len(items)
    done = _completed(fn, items, workers)
    try:
        for i, result in progress(done, desc, len(items), show):
            results[i] = result
    except WorkerDied as e:
        raise DataError(f"{names[e.index]}: the worker process handling it {e.how}") from None
    finally:
        done.close()
    return results


if __name__ == "__main__":
    serve(Connection(int(sys.argv[1])))
