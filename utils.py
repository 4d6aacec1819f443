"""Input and output, each failure one line: NIfTI files read and written, every other file written atomically,
output folders, progress bars that stay off a batch job's log, and the entry point that turns a DataError into
`error: ...` with exit status 1 and a SIGTERM into `stopped: ...` with exit status 143."""
import contextlib
import csv
import glob
import gzip
import io
import os
import signal
import sys
import zlib

import nibabel as nib
import numpy as np
from tqdm import tqdm


class DataError(ValueError):
    """A bad input: a data file or folder, a checkpoint, an option. The message is one line that names it and the
    problem; each script's entry point prints it as `error: ...` and exits with status 1."""


class WriteError(DataError):
    """An output file that could not be written (disk full, quota, read-only, permission); the file it replaces, if
    any, is left as it was."""


class Terminated(BaseException):
    """SIGTERM (a scheduler's warning before the wall time, or kill) outside the training steps, which stop cleanly
    themselves (job.StopRule). Raised wherever the script is, so that it ends within seconds; a BaseException, so
    that no `except Exception` swallows it, while every `finally` and atomic write cleans up on its way out."""


_activity = "starting"


def doing(what):
    """Say what the script is doing, for the line a SIGTERM would end it with."""
    global _activity
    _activity = what


def raise_terminated(*_):
    raise Terminated(f"SIGTERM while {_activity}; no file was left half-written")


def call_main(main, argv):
    """main(argv) -> its exit status: 0; 1 for a DataError, said as one `error:` line on stderr; 143 for a SIGTERM
    outside the training steps, said as one `stopped:` line."""
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    doing("starting")
    try:
        main(argv)
        return 0
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Terminated as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_script(main):
    """A script's entry point: main(sys.argv[1:]), ended as call_main says."""
    sys.exit(call_main(main, sys.argv[1:]))


# ---- reading --------------------------------------------------------------------------------------------------

def read_image(path):
    """A NIfTI file -> (its nibabel image, float64 array of any shape). Raises DataError on bad input."""
    path = str(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":  # one C call: twice as fast as nibabel's streaming gzip reader
            raw = zlib.decompress(raw, 31)
        try:
            img = nib.Nifti1Image.from_bytes(raw)
        except Exception:  # NIfTI-2, Analyze, or not an image at all: let nibabel decide, and say why
            img = nib.load(path)
        a = np.asarray(img.dataobj, dtype=np.float64)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:
        raise DataError(f"{path}: corrupt gzip ({e})") from None
    except Exception as e:  # nibabel raises several types for non-NIfTI content
        raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    if not np.isfinite(a).all():
        raise DataError(f"{path}: contains {np.count_nonzero(~np.isfinite(a))} NaN or Inf values")
    return img, a


def read_slice(path):
    """One 2D slice stored as (H, W) or (H, W, 1) -> (its nibabel image, float64 (H, W)). Raises DataError on bad
    input."""
    img, a = read_image(path)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim != 2:
        raise DataError(f"{path}: expected a 2D slice (H, W) or (H, W, 1), got shape {a.shape}")
    return img, a


def read_nifti(path):
    """One 2D slice stored as (H, W) or (H, W, 1) -> float64 (H, W). Raises DataError on bad input."""
    return read_slice(path)[1]


# ---- writing --------------------------------------------------------------------------------------------------

def write_file(path, content):
    """Write bytes, or whatever content(f) writes to a binary file, to a temporary file beside `path`, then rename
    it into place: a crash or a failed write never leaves a half-written file, nor a temporary one. A failure is
    a WriteError naming the file and the cause."""
    path = str(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(content) if isinstance(content, bytes) else content(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None
        raise


def write_text(path, text):
    write_file(path, text.encode())


def write_csv(path, header, rows):
    """A CSV file of a header and rows of values."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def write_nifti(path, data, affine, header=None):
    """An array as a NIfTI file (gzipped for .nii.gz) with the given affine and header, in the array's dtype."""
    img = nib.Nifti1Image(data, affine, header)
    img.set_data_dtype(data.dtype)
    raw = img.to_bytes()
    write_file(path, gzip.compress(raw, compresslevel=1, mtime=0) if str(path).endswith(".gz") else raw)


def make_folder(path):
    """Create an output folder (and its parents) unless it exists; a file in its place is a DataError, and a folder
    that cannot be created (read-only, permission, quota) a WriteError."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"{path}: is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{path}: cannot create the folder ({e.strerror or e})") from None


def newest_first(pattern):
    """The paths matching a glob pattern, the most recently modified first."""
    return sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True)


def newest(pattern):
    """The most recently modified path matching a glob pattern, or None."""
    return next(iter(newest_first(pattern)), None)


def progress(iterable, desc, total=None, enabled=True):
    """A tqdm bar on a terminal; the bare iterable where stderr is a file (a batch job's log keeps every refresh)."""
    if not (enabled and sys.stderr.isatty()):
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)
