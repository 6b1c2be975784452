"""The CPU worker pool of the chunked engine: single-core threads that each take whole chunks of rows.

Why a pool of its own. On CPU the engine shares its blocks of rows out to Python threads, each running its torch
ops on one core (the ops release the GIL) and taking the next block when it is done with one. Torch's own
intra-op threading would instead split every op of every chunk over the cores and join them again: thousands of
fork/joins per call, each waiting for the slowest core. That costs little on an idle machine but can multiply the
time when other processes share the cores. One block per worker needs no join until the end.

Why each worker is single-core. A worker sets its own OpenMP team size to 1 (``omp_set_num_threads`` of the
OpenMP runtime torch loaded, looked up in the process's mapped libraries), so that its ops do not fork again. Where
that cannot be done (no OpenMP, not Linux), :func:`pool` returns None and the engine runs the blocks in the calling
thread with torch's own threading.

How many. :func:`usable_cpus` is the number of CPUs this process may run on (``os.sched_getaffinity``: a
container's or ``taskset``'s limit, not the machine's ``os.cpu_count()``); a call uses
``min(torch.get_num_threads(), usable_cpus())`` workers (:func:`n_workers`), so ``torch.set_num_threads`` still
decides. The pool itself is started lazily, once, under a lock (two threads calling at once get the same pool), and
forgotten in a forked child, which has none of the parent's threads.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["pool", "n_workers", "usable_cpus"]

_local = threading.local()
_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_usable: bool | None = None


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def n_workers() -> int:
    """Workers a call uses: torch's thread count, capped by the CPUs this process may use."""
    return max(1, min(torch.get_num_threads(), usable_cpus()))


def _omp_set_num_threads():
    """omp_set_num_threads of the OpenMP runtime loaded in this process (torch's), or None."""
    if not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info():
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line and "/" in line}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    # torch's own copy first, where another package has loaded a second OpenMP runtime
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_dir), p)):
        if os.path.basename(path).startswith(("libgomp", "libiomp5", "libomp")):
            try:
                return ctypes.CDLL(path).omp_set_num_threads
            except (OSError, AttributeError):
                continue
    return None


def _init_worker(set_threads):
    # torch sets a thread's OpenMP team size when the thread first asks for it: ask first, then set it to 1
    torch.get_num_threads()
    set_threads(1)
    _local.single = torch.get_num_threads() == 1


def _forget():
    # a forked child has none of the parent's threads (and maybe a held lock): it starts its own pool when needed
    global _executor, _usable, _lock
    _executor = _usable = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget)


def pool() -> ThreadPoolExecutor | None:
    """The shared pool of single-core worker threads, started on first use; None where a thread's torch ops cannot
    be kept to one core. Thread-safe: concurrent first calls build one pool."""
    global _executor, _usable
    if _usable is None:
        with _lock:
            if _usable is None:  # another thread may have built it while this one waited
                set_threads = _omp_set_num_threads()
                usable = False
                if set_threads is not None:
                    # threads are created on demand, up to this many: one per CPU the process may use
                    executor = ThreadPoolExecutor(
                        max_workers=max(usable_cpus(), 2),
                        thread_name_prefix="kdiv",
                        initializer=_init_worker,
                        initargs=(set_threads,),
                    )
                    usable = executor.submit(lambda: _local.single).result()
                    _executor = executor if usable else None
                    if not usable:
                        executor.shutdown(wait=False)
                _usable = usable
    return _executor if _usable else None
