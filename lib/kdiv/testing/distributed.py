"""Start a gloo process group on this machine, run a function on every rank, and get every rank's outcome back,
within a deadline: the tests and the benchmark of :mod:`kdiv.parallel` use it.

``run_ranks(fn, world_size, *args)`` spawns ``world_size`` processes (``torch.multiprocessing``, spawn start
method), each of which joins a gloo group on a free localhost port and returns ``fn(rank, world_size, *args)``. A
rank that raises reports its exception instead; a rank still running at the deadline is killed and reported as
timed out, so a caller never hangs. ``fn`` must be importable by the children (a module-level function of a
module on ``sys.path``; the children get the parent's ``sys.path`` and ``PYTHONPATH``).
"""

from __future__ import annotations

import datetime
import os
import queue as queue_module
import socket
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp

__all__ = ["run_ranks", "free_port"]


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, collective_timeout, threads, results, args):
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=collective_timeout),
        )
        value = fn(rank, world_size, *args)
        results.put((rank, "ok", value))
    except BaseException as e:  # reported to the parent, whatever it is
        results.put((rank, "error", (type(e).__name__, str(e), traceback.format_exc())))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, world_size, *args, timeout=120.0, collective_timeout=30.0, threads=1):
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns one outcome per rank, in rank order:
    ``("ok", value)``, ``("error", (type name, message, traceback))`` or ``("timeout", None)``.

    timeout: seconds for the whole run; collective_timeout: the process group's timeout (a rank waiting for one
    that died raises within it); threads: torch threads per rank.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # the children import kdiv and fn's module: hand them this process's import path
    path = os.pathsep.join(p for p in [os.environ.get("PYTHONPATH", ""), *sys.path] if p)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path
    try:
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, port, collective_timeout, threads, results, args),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old
    outcomes = [("timeout", None)] * world_size
    deadline = time.monotonic() + timeout
    pending = set(range(world_size))
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            rank, status, value = results.get(timeout=min(left, 1.0))
        except queue_module.Empty:
            # a rank that died without reporting (killed, crashed in C) will never report
            for rank in list(pending):
                if not procs[rank].is_alive() and procs[rank].exitcode not in (None, 0):
                    outcomes[rank] = ("error", ("ExitCode", f"exit code {procs[rank].exitcode}", ""))
                    pending.discard(rank)
            continue
        outcomes[rank] = (status, value)
        pending.discard(rank)
    for p in procs:
        p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
        if p.is_alive():
            p.kill()
            p.join()
    return outcomes
