"""Tune kdiv.core.engine.chunked.CHUNK_ELEMENTS: forward + backward time per chunk size, as a ratio to soft-target CE.

Every round runs CE and then each (divergence, chunk size) once, so that a busier or quieter spell of a shared
machine hits all of them alike; medians over rounds. Usage: ``python bench/chunk_size.py [--rounds 5]
[--threads 2] [--names forward_kl,skew_kl,akl] [--sizes 65536,131072,262144,524288,1048576]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import kdiv
import torch
import torch.nn.functional as F
from kdiv.core.engine import chunked

SHAPES = [(1024, 32000), (256, 128256), (128, 256000)]


def timed(times, key, fn, student, target):
    x = student.detach().requires_grad_()
    start = time.perf_counter()
    fn(x, target).backward()
    times.setdefault(key, []).append(time.perf_counter() - start)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--names", default="forward_kl,skew_kl,akl")
    ap.add_argument("--sizes", default="65536,131072,262144,524288,1048576")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names, sizes = args.names.split(","), [int(v) for v in args.sizes.split(",")]
    default = chunked.CHUNK_ELEMENTS
    print(f"{torch.get_num_threads()} threads; time / soft-target CE, median of {args.rounds} rounds")
    for n, vocab in SHAPES:
        g = torch.Generator().manual_seed(0)
        student = torch.randn(n, vocab, generator=g).mul_(4.0)
        teacher = torch.randn(n, vocab, generator=g).mul_(4.0)
        targets = torch.softmax(teacher, -1)
        times = {}
        cases = [("ce", F.cross_entropy, targets, default)]
        cases += [((name, size), kdiv.DIVERGENCES[name], teacher, size) for name in names for size in sizes]
        for r in range(args.rounds + 1):
            for key, fn, target, size in cases:
                chunked.CHUNK_ELEMENTS = size
                timed(times, key, fn, student, target)
            if r == 0:
                times.clear()  # the first round is a warm-up
        chunked.CHUNK_ELEMENTS = default
        ce = statistics.median(times["ce"])
        print(f"\n{n} x {vocab}: CE {ce:.3f} s")
        print(f"{'':18}" + "".join(f"{size // 1024:>8}k" for size in sizes))
        for name in names:
            print(f"{name:<18}" + "".join(f"{statistics.median(times[(name, s)]) / ce:>9.2f}" for s in sizes))


if __name__ == "__main__":
    main()
