"""A top-k teacher (kdiv.TopK) against the dense teacher at V = 128256: time and extra peak memory of one forward +
backward, and what the teacher side costs, for k in {8, 64, 512}; side by side in one process.

For each divergence, interleaved in every round: the dense teacher (``kdiv.<name>(student, teacher_logits)``) and
the top-k teacher at each k (``kdiv.<name>(student, kdiv.TopK(ids, logprobs))``, int32 ids and fp16
log-probabilities as read from a store, ``missing="tail"``; for forward_kl also "renorm" and "fkl_topk"). The
ratio of a case is the median over rounds of its time over the dense run of the same round.

- time: one forward + backward into the student's ``.grad``, wall clock and CPU time (all threads);
- memory: extra peak resident memory of the first run beyond the inputs (the student's [N, V] gradient
  included: any implementation returns it), as a multiple of one fp32 [N, V] tensor;
- teacher input: the bytes of the teacher as the loss receives it (dense fp32 logits, or 6 B per id);
- teacher side: the time of the divergence on the k + 1 categories alone (student categories precomputed), the
  part whose cost is in proportion to k; the rest (the student's gather, logsumexp and gradient over V) is O(N V)
  for any teacher.

Usage: ``python bench/topk.py [--n 512] [--repeats 5] [--names forward_kl,reverse_kl,js,akl]``; writes
bench/results_topk_<device>.json.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import kdiv
import torch

HERE = Path(__file__).resolve().parent
VOCAB = 128256
KS = (8, 64, 512)
LOGIT_STD = 4.0  # as bench/run.py: a teacher of entropy 4-6 nats


def _status_bytes(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakMemory:
    """Extra peak resident memory of a block (Linux): malloc_trim, reset the high-water mark, read it after."""

    def __enter__(self):
        gc.collect()
        if sys.platform.startswith("linux"):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self._base = _status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self

    def __exit__(self, *exc):
        self.extra = _status_bytes("VmHWM") - self._base


def fwd_bwd(fn, student, teacher):
    x = student.detach().requires_grad_()
    fn(x, teacher).backward()
    return x.grad


def timed(fn, student, teacher):
    """(wall seconds, CPU seconds of the whole process, worker threads included) of one forward + backward. The
    CPU time is the steadier number where other processes share the cores."""
    start, cpu = time.perf_counter(), time.process_time()
    grad = fwd_bwd(fn, student, teacher)
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    del grad
    return elapsed


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--names", default="forward_kl,reverse_kl,js,akl")
    args = ap.parse_args()
    names = args.names.split(",")
    n = args.n
    g = torch.Generator().manual_seed(0)
    student = torch.randn(n, VOCAB, generator=g).mul_(LOGIT_STD)
    teacher = torch.randn(n, VOCAB, generator=g).mul_(LOGIT_STD)
    logits_bytes = n * VOCAB * 4
    tops = {}
    for k in KS:
        t = kdiv.topk_from_logits(teacher, k)
        tops[k] = (t.indices.int(), t.logprobs.half())  # as a store gives them back

    cases = {}  # case -> (fn, teacher input, teacher bytes, name, k)
    for name in names:
        fn = kdiv.DIVERGENCES[name]
        cases[f"{name}/dense"] = (fn, teacher, logits_bytes, name, None)
        treatments = ["tail"] + (["renorm", "fkl_topk"] if name == "forward_kl" else [])
        for k in KS:
            for missing in treatments:
                ids, lp = tops[k]
                cases[f"{name}/k={k}/{missing}"] = (fn, kdiv.TopK(ids, lp, missing), n * k * 6, name, k)

    results = {c: {"times": [], "ratios": [], "cpu": [], "cpu_ratios": []} for c in cases}
    for case, (fn, t, _, _, _) in cases.items():
        with PeakMemory() as m:
            timed(fn, student, t)
        results[case]["memory"] = m.extra
    for _ in range(args.repeats):
        for name in names:
            dense = timed(cases[f"{name}/dense"][0], student, teacher)
            for case, (fn, t, _, case_name, k) in cases.items():
                if case_name != name:
                    continue
                elapsed = dense if k is None else timed(fn, student, t)
                r = results[case]
                r["times"].append(elapsed[0])
                r["cpu"].append(elapsed[1])
                r["ratios"].append(elapsed[0] / dense[0])
                r["cpu_ratios"].append(elapsed[1] / dense[1])

    # the teacher side alone: the divergence on [N, k + 1] categories, student categories given (CPU time)
    side = {}
    for name in names:
        for k in KS:
            s_small = torch.randn(n, k + 1, generator=g).mul_(LOGIT_STD)
            t_small = torch.randn(n, k + 1, generator=g).mul_(LOGIT_STD)
            fn = kdiv.DIVERGENCES[name]
            timed(fn, s_small, t_small)
            side[f"{name}/k={k}"] = statistics.median(timed(fn, s_small, t_small)[1] for _ in range(20))

    print(f"CPU: {cpu_name()} ({torch.get_num_threads()} threads), torch {torch.__version__}, N={n}, V={VOCAB}")
    print(f"one fp32 [N, V] tensor: {logits_bytes / 2**20:.0f} MiB\n")
    print(
        f"{'case':28s} {'wall s':>7s} {'x dense':>8s} {'CPU s':>7s} {'x dense':>8s} {'extra mem':>10s} "
        f"{'teacher in':>11s} {'teacher side CPU ms':>20s}"
    )
    table = {}
    for case, (_, _, tbytes, name, k) in cases.items():
        r = results[case]
        row = dict(
            wall_s=statistics.median(r["times"]),
            wall_ratio_to_dense=statistics.median(r["ratios"]),
            cpu_s=statistics.median(r["cpu"]),
            cpu_ratio_to_dense=statistics.median(r["cpu_ratios"]),
            extra_memory_x_logits=r["memory"] / logits_bytes,
            teacher_input_bytes=tbytes,
            teacher_side_cpu_s=None if k is None else side[f"{name}/k={k}"],
        )
        table[case] = row
        side_text = "" if k is None else f"{row['teacher_side_cpu_s'] * 1e3:20.2f}"
        print(
            f"{case:28s} {row['wall_s']:7.3f} {row['wall_ratio_to_dense']:8.2f} {row['cpu_s']:7.3f} "
            f"{row['cpu_ratio_to_dense']:8.2f} {row['extra_memory_x_logits']:9.2f}x {tbytes / 2**20:9.2f}Mi "
            f"{side_text}"
        )
    out = HERE / "results_topk_cpu.json"
    out.write_text(
        json.dumps(
            dict(
                cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__, n=n, vocab=VOCAB, cases=table
            ),
            indent=1,
        )
    )
    print(f"\nwrote {out.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
