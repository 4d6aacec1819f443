"""Functions that test_pools.py has the pool's workers run: a worker imports this module, which imports nothing
heavy. Also the helper that finds a process's workers."""
import glob
import os
import signal
import time


def signals_in_worker(_):
    """A worker's pid, and whether it takes SIGTERM's default action and ignores SIGINT."""
    return (os.getpid(), signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
            signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def die_on_five(i):
    if i == 5:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer ends a worker
    time.sleep(0.01)
    return i


def fail_on_three(i):
    if i == 3:
        raise ZeroDivisionError("a bug in the worker's function")
    return i


def workers_of(pid):
    """pids of the pool workers started by process pid."""
    found = []
    for d in glob.glob("/proc/[0-9]*"):
        try:
            with open(f"{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"{d}/cmdline") as f:
                cmd = f.read()
        except (OSError, ValueError):
            continue
        if ppid == pid and "pool.py" in cmd:
            found.append(int(os.path.basename(d)))
    return found
