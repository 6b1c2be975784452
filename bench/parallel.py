"""Vocab-parallel divergences (kdiv.parallel) on gloo ranks against one process: time, peak memory per rank and
bytes communicated per token, for every token-level divergence.

For N x V logits (default 4096 x 32000, fp32, Gaussian of std 4 as in bench/run.py), ``--ranks`` processes (default
2) each hold a contiguous shard of the vocabulary (``kdiv.parallel.vocab_range``) and run
``kdiv.<name>(shard_s, shard_t, vocab_group=WORLD)`` forward + backward; one process runs ``kdiv.<name>(s, t)`` on
the whole rows. Every process is started fresh (``kdiv.testing.distributed.run_ranks``) and gets ``--threads``
torch threads in all (default 2: one per rank, two for the single process). Both build the same logits (the
shards are generated one by one from their own seeds and the single process concatenates them) and the losses are
compared.

Time: median over ``--repeats`` forward + backward passes, each started together on all ranks (a barrier), the
slowest rank's. Memory: the extra peak resident memory of the first pass beyond the inputs (as bench/run.py
measures it), per rank. Communication: the bytes each rank sends into ``all_reduce`` per call (its message sizes,
as kdiv.parallel.Stats counts them) divided by N, the number of collectives per call, and AKL's head-search
rounds; a ring all_reduce moves about twice its message size per rank over the wire.

Usage: ``python bench/parallel.py`` (about 3 minutes on 2 cores), ``--quick`` (N = 512), see ``--help``. Writes
bench/results_parallel_cpu.json (``--quick``: results_parallel_cpu_quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kdiv  # noqa: E402
import kdiv.parallel  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from kdiv.testing.distributed import run_ranks  # noqa: E402
from run import PeakMemory  # noqa: E402

NAMES = list(kdiv.DIVERGENCES)
LOGIT_STD = 4.0


def shard_logits(n, start, stop, vocab_sizes, std, seed):
    """(student, teacher) columns [start, stop) of the benchmark's logits: made of blocks of ids, each from its
    own seed, so that any process can build any shard."""
    blocks_s, blocks_t = [], []
    lo = 0
    for i, size in enumerate(vocab_sizes):
        hi = lo + size
        if hi > start and lo < stop:
            g = torch.Generator().manual_seed(seed * 1000 + i)
            s = torch.randn(n, size, generator=g).mul_(std)
            t = torch.randn(n, size, generator=g).mul_(std)
            a, b = max(start, lo) - lo, min(stop, hi) - lo
            blocks_s.append(s[:, a:b])
            blocks_t.append(t[:, a:b])
        lo = hi
    cat = (lambda x: x[0].contiguous()) if len(blocks_s) == 1 else (lambda x: torch.cat(x, 1))
    return cat(blocks_s), cat(blocks_t)


def work(rank, world, n, vocab, blocks, names, repeats, sharded):
    """On every rank: each divergence's pass times, extra peak memory, loss, and collectives."""
    start, stop = kdiv.parallel.vocab_range(vocab, rank, world) if sharded else (0, vocab)
    s, t = shard_logits(n, start, stop, blocks, LOGIT_STD, seed=0)
    group = dist.group.WORLD if sharded else None
    out = {}
    for name in names:
        fn = kdiv.get(name)

        def once(fn=fn):
            x = s.detach().requires_grad_()
            dist.barrier()
            begin = time.perf_counter()
            loss = fn(x, t, vocab_group=group) if sharded else fn(x, t)
            loss.backward()
            return time.perf_counter() - begin, float(loss.detach())

        with PeakMemory("cpu") as mem:
            _, loss = once()
        stats = dict(
            calls=kdiv.parallel.Stats.calls,
            bytes=kdiv.parallel.Stats.nbytes,
            head_rounds=kdiv.parallel.Stats.head_rounds,
        )
        times = [once()[0] for _ in range(repeats)]
        out[name] = dict(times=times, memory=mem.extra, loss=loss, **(stats if sharded else {}))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (split over the ranks)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="N = 512, 2 repeats")
    parser.add_argument("--names", nargs="*", default=NAMES)
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats = 512, 2
    blocks = [
        stop - start
        for start, stop in (kdiv.parallel.vocab_range(args.vocab, r, args.ranks) for r in range(args.ranks))
    ]
    load_before = os.getloadavg()
    wall = time.perf_counter()
    common = (args.n, args.vocab, blocks, args.names, args.repeats)
    rank_threads = max(1, args.threads // args.ranks)
    sharded = run_ranks(work, args.ranks, *common, True, timeout=3000.0, collective_timeout=600.0, threads=rank_threads)
    single = run_ranks(work, 1, *common, False, timeout=3000.0, collective_timeout=600.0, threads=args.threads)
    for label, outcome in (("sharded", sharded), ("single", single)):
        for status, value in outcome:
            if status != "ok":
                sys.exit(f"{label}: {status}: {value[2] if value else ''}")
    ranks = [value for _, value in sharded]
    one = single[0][1]
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?")
    rows = {}
    print(
        f"{args.n} x {args.vocab} fp32, {args.ranks} gloo ranks ({rank_threads} thread each) vs 1 process "
        f"({args.threads} threads); CPU: {cpu}, {os.cpu_count()} cores; load {load_before[0]:.1f}"
    )
    header = f"{'divergence':16} {'1 proc s':>9} {'ranks s':>8} {'ratio':>6} {'1 proc MB':>10} {'rank MB':>8} "
    print(header + f"{'B/token':>8} {'calls':>6} {'rounds':>6} {'|dloss|':>8}")
    for name in args.names:
        t_one = statistics.median(one[name]["times"])
        # each pass takes as long as its slowest rank
        t_ranks = statistics.median(max(r[name]["times"][i] for r in ranks) for i in range(args.repeats))
        mem_rank = max(r[name]["memory"] for r in ranks)
        per_token = max(r[name]["bytes"] for r in ranks) / args.n
        row = dict(
            single_s=t_one,
            ranks_s=t_ranks,
            ratio=t_ranks / t_one,
            single_extra_bytes=one[name]["memory"],
            rank_extra_bytes=[r[name]["memory"] for r in ranks],
            allreduce_bytes_per_token=per_token,
            collectives=ranks[0][name]["calls"],
            akl_head_rounds=ranks[0][name]["head_rounds"],
            loss_single=one[name]["loss"],
            loss_ranks=[r[name]["loss"] for r in ranks],
        )
        rows[name] = row
        diff = max(abs(x - row["loss_single"]) for x in row["loss_ranks"])
        print(
            f"{name:16} {t_one:9.3f} {t_ranks:8.3f} {row['ratio']:6.2f} {one[name]['memory'] / 2**20:10.0f} "
            f"{mem_rank / 2**20:8.0f} {per_token:8.1f} {row['collectives']:6d} {row['akl_head_rounds']:6d} {diff:8.1e}"
        )
    logits_mb = args.n * args.vocab * 4 / 2**20
    print(f"(one fp32 logits tensor: {logits_mb:.0f} MB; a rank's shard: {logits_mb / args.ranks:.0f} MB)")
    result = dict(
        machine=dict(
            cpu=cpu,
            cores=os.cpu_count(),
            python=platform.python_version(),
            torch=torch.__version__,
            ranks=args.ranks,
            threads=args.threads,
            repeats=args.repeats,
            n=args.n,
            vocab=args.vocab,
            load_average_before=load_before,
            load_average_after=os.getloadavg(),
            wall_seconds=round(time.perf_counter() - wall, 1),
        ),
        divergences=rows,
    )
    name = "results_parallel_cpu_quick.json" if args.quick else "results_parallel_cpu.json"
    (HERE / name).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
