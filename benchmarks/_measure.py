"""What the benchmark scripts share: peak memory, one case per process, the matmul rate.

* :class:`PeakMemory`: peak memory above a baseline. CPU: the resident set size; on Linux its
  high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` at the baseline, elsewhere
  ``ru_maxrss`` is read (it may under-count when an earlier peak was higher; the method is
  recorded). CUDA: ``torch.cuda.max_memory_allocated``.
* :func:`run_worker` / :func:`worker_main`: each case runs in a fresh interpreter, so that its
  peak memory is its own. The parent runs ``python SCRIPT --worker JSON``; the script's
  ``main`` hands the JSON case to :func:`worker_main`, which prints the measured row as one
  ``ROW {json}`` line.
* :func:`matmul_rate`: the float32 ``torch.mm`` rate, the roofline of the achieved rates
  (:func:`matmul_rate_in_subprocess` runs it as a worker of this file).
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

MIB = 2.0**20

#: Environment of a memory pass: glibc returns every block over 64 KiB to the system when it is
#: freed. Its default (a threshold that rises to 32 MiB after the first large free) keeps freed
#: 1–32 MiB tensors in the heap, so the peak RSS would count memory that is free.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

WORKER_FLAG = "--worker"
ROW_PREFIX = "ROW "


# -- peak memory ------------------------------------------------------------------------------


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field}:\s+(\d+)", f.read())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _reset_peak_rss() -> bool:
    """Reset the peak RSS (VmHWM) to the current RSS; True when supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


class PeakMemory:
    """Peak memory above the level at :meth:`start`, in MiB.

    Args:
        device: where the measured tensors live (``cpu`` or ``cuda``).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.cuda = torch.device(device).type == "cuda"
        self.method = ""
        self.base = 0

    def start(self) -> None:
        """Take the baseline (and reset the high-water mark)."""
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base, self.method = torch.cuda.memory_allocated(), "max_memory_allocated"
        elif _reset_peak_rss() and (rss := _proc_status_kib("VmRSS")) is not None:
            self.base, self.method = rss * 1024, "VmHWM"
        else:
            self.base, self.method = self._ru_maxrss(), "ru_maxrss"

    def extra_mib(self) -> float:
        """Peak minus baseline since :meth:`start`."""
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        elif self.method == "VmHWM":
            peak = (_proc_status_kib("VmHWM") or 0) * 1024
        else:
            peak = self._ru_maxrss()
        return max(peak - self.base, 0) / MIB

    @staticmethod
    def _ru_maxrss() -> int:
        """Peak RSS of the process in bytes (``ru_maxrss`` is in KiB on Linux, bytes on macOS)."""
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024


# -- one case per process ---------------------------------------------------------------------


class WorkerError(RuntimeError):
    """A case's process failed, timed out or printed no row.

    Attributes:
        stderr: the end of the process's standard error (or output).
    """

    def __init__(self, message: str, stderr: str = "") -> None:
        super().__init__(message)
        self.stderr = stderr


def run_worker(
    script: str | Path,
    case: Mapping[str, Any],
    *,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python script --worker JSON`` in a fresh process and return the row it printed.

    Args:
        script: a script whose ``main`` hands ``--worker JSON`` to :func:`worker_main`.
        case: the case, as JSON-serialisable values.
        timeout: seconds allowed.
        env: variables added to this process's environment.

    Returns:
        The row (the last ``ROW`` line of the process's output).

    Raises:
        WorkerError: the process timed out, failed, or printed no row; the message holds the
            exit status and the last lines of its standard error.
    """
    cmd = [sys.executable, str(script), WORKER_FLAG, json.dumps(dict(case))]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=full_env, check=False
        )
    except subprocess.TimeoutExpired as err:
        raise WorkerError(f"timed out after {timeout:.0f} s") from err
    rows = [line for line in proc.stdout.splitlines() if line.startswith(ROW_PREFIX)]
    if proc.returncode == 0 and rows:
        return json.loads(rows[-1][len(ROW_PREFIX) :])
    stderr = (proc.stderr or proc.stdout).strip()
    tail = " | ".join(stderr.splitlines()[-3:])
    raise WorkerError(f"exit {proc.returncode}: {tail}", stderr[-4000:])


def worker_main(measure: Callable[[dict[str, Any]], Mapping[str, Any]], case: str) -> int:
    """Measure the JSON ``case`` in this process and print its row for :func:`run_worker`."""
    row = measure(json.loads(case))
    print(ROW_PREFIX + json.dumps(dict(row)), flush=True)
    return 0


# -- matmul rate ------------------------------------------------------------------------------


def matmul_rate(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """Float32 ``torch.mm`` rate of n×n matrices, median of ``reps`` products after a warm-up.

    Returns:
        GFLOP/s of wall time and GFLOP/s of process CPU time.
    """
    a = torch.randn(n, n)
    b = torch.randn(n, n)
    torch.mm(a, b)
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    gflop = 2 * n**3 / 1e9
    return gflop / statistics.median(wall), gflop / statistics.median(cpu)


def _matmul_case(case: dict[str, Any]) -> dict[str, float]:
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    wall, cpu = matmul_rate(case["n"])
    return {"wall": wall, "cpu": cpu}


def matmul_rate_in_subprocess(
    n: int, *, timeout: float, threads: int | None = None
) -> tuple[float, float]:
    """:func:`matmul_rate` in a fresh process with ``threads`` torch threads (None: torch's)."""
    row = run_worker(__file__, {"n": n, "threads": threads}, timeout=timeout)
    return row["wall"], row["cpu"]


if __name__ == "__main__":
    if sys.argv[1:2] != [WORKER_FLAG] or len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} {WORKER_FLAG} JSON (the matmul worker of the benchmarks)")
    sys.exit(worker_main(_matmul_case, sys.argv[2]))
