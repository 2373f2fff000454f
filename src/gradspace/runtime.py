"""Device selection, seeding and timing helpers shared by all commands."""

from __future__ import annotations

import contextlib
import os
import random
import time

import numpy as np


def resolve_device(spec: str = "auto"):
    """Return a torch.device: 'auto' picks CUDA when present, else CPU."""
    import torch

    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import ConfigError

        raise ConfigError(f"device '{spec}' requested but CUDA is not available")
    return dev


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_threads(n: int | None = None) -> None:
    """Limit torch intra-op threads (SLURM/Snakemake pass the job's core count).

    Does nothing unless torch is already imported or a count is given, so numpy-only
    commands do not pay for importing torch."""
    import sys

    n = n or int(os.environ.get("GRADSPACE_THREADS", "0") or 0)
    if n > 0 and "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


class Timer:
    """Accumulating wall-clock timer; synchronizes CUDA so GPU time is measured."""

    def __init__(self):
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, device=None):
        _sync(device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            _sync(device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - t0


def _sync(device) -> None:
    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def hardware_description(device=None) -> str:
    import platform

    if device is not None and getattr(device, "type", None) == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def pause_point(name: str) -> None:
    """Fault-injection hook for the resume tests.

    When ``$GRADSPACE_PAUSE_AT`` equals ``name``, the job appends a line to
    ``$GRADSPACE_PAUSE_MARKER`` (if set) and sleeps ``$GRADSPACE_PAUSE_SECONDS`` (120), so
    a test can kill it at a known point in the middle of writing its output. With
    ``$GRADSPACE_PAUSE_ALLOC_MB`` it first allocates (and touches) that many MB and holds
    them while it sleeps, like a job that needs more memory than it asked for (the SLURM
    retry test: the scheduler kills it, Snakemake resubmits it with more). It does nothing
    otherwise.
    """
    if os.environ.get("GRADSPACE_PAUSE_AT") != name:
        return
    marker = os.environ.get("GRADSPACE_PAUSE_MARKER")
    if marker:
        with open(marker, "a") as fh:
            fh.write(f"{name} {os.getpid()} {os.environ.get('SLURM_JOB_ID', '-')}\n")
    mb = int(os.environ.get("GRADSPACE_PAUSE_ALLOC_MB", "0") or 0)
    ballast = np.ones(mb * (1 << 20) // 8, dtype=np.float64) if mb > 0 else None  # touched pages
    time.sleep(float(os.environ.get("GRADSPACE_PAUSE_SECONDS", "120")))
    del ballast


def paused_iter(name: str, iterable):
    """Yield from ``iterable``, passing ``pause_point(name)`` after the first item, i.e.
    while the job is in the middle of its work (see ``pause_point``)."""
    for i, item in enumerate(iterable):
        yield item
        if i == 0:
            pause_point(name)


def progress_interval() -> float:
    """Seconds between progress lines: ``$GRADSPACE_PROGRESS_INTERVAL`` when set, else 1 s
    on a terminal and 30 s when stderr is a file (a SLURM log under ``tail -f``)."""
    import sys

    env = os.environ.get("GRADSPACE_PROGRESS_INTERVAL", "").strip()
    if env:
        try:
            return max(float(env), 0.0)
        except ValueError:
            pass
    return 1.0 if sys.stderr.isatty() else 30.0


def progress_bar(name: str, total: int | None):
    """A tqdm bar on stderr (the job log) that logs samples done / total, samples/s and the
    ETA at a bounded rate (:func:`progress_interval`); ``update(n)`` after each n samples,
    ``close()`` at the end (or use it as a context manager)."""
    import sys

    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=name, unit="sample", unit_scale=True,
                file=sys.stderr if tty else _LogLines(sys.stderr), mininterval=progress_interval(),
                miniters=1, dynamic_ncols=False, ascii=not tty)


class _LogLines:
    """A file for tqdm that writes each status as its own line (tqdm redraws one line with
    carriage returns, which a log file keeps as one ever-growing line)."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.fh.write(s + "\n")

    def flush(self) -> None:
        self.fh.flush()


def progress(name: str, batches, total: int | None):
    """Yield the batches (x, ...) of a model-running job, logging samples done / total,
    samples/s and the ETA to stderr (the job log) at a bounded rate: every 30 s when the log
    is a file (a SLURM log under ``tail -f``), every second on a terminal
    (``$GRADSPACE_PROGRESS_INTERVAL`` overrides both)."""
    bar = progress_bar(name, total)
    try:
        for batch in batches:
            yield batch
            bar.update(int(batch[0].shape[0]))
    finally:
        bar.close()


# The last line of every successful ``gradspace`` job: its own peak resident memory. Snakemake's
# ``benchmark:`` samples RSS every 0.5 s during a job's first 15 s and every 30 s after, so its
# max_rss of a long job with a short peak varies from run to run; this figure does not.
PEAK_MEMORY_LINE = "gradspace: peak resident memory"


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size in bytes (Linux VmHWM; elsewhere ru_maxrss)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
        import sys

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(ru if sys.platform == "darwin" else ru * 1024)
    except (ImportError, OSError):
        return None


def peak_memory_line() -> str | None:
    peak = peak_rss_bytes()
    return None if peak is None else f"{PEAK_MEMORY_LINE} {peak} bytes ({peak / 2**30:.2f} GiB, VmHWM)"


def read_peak_memory(log_path) -> int | None:
    """The peak memory a job's log records (its last such line), or None."""
    import re

    try:
        with open(log_path, errors="replace") as fh:
            found = re.findall(re.escape(PEAK_MEMORY_LINE) + r" (\d+) bytes", fh.read())
    except OSError:
        return None
    return int(found[-1]) if found else None
