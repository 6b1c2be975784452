"""The fused hidden-state path (kdiv.fused_linear) against the plain path and Liger-Kernel, side by side.

For each shape N x H x V (tokens, hidden size of both models, vocabulary) and divergence, in one process:

- ``plain``: ``logits = hidden @ weight.T`` for both models (the teacher's under no_grad), then the kdiv divergence;
  autograd back to the student's hidden states and head weight. The target's yardstick: the matmuls are the floor.
- ``fused``: ``kdiv.fused_linear`` on the same hidden states and weights.
- ``liger``: Liger-Kernel's ``LigerFusedLinearJSDLoss`` (its torch code, ``compiled=False``, soft loss only:
  ``weight_hard_loss=0``), for ``js`` only, when liger-kernel is installed (a benchmark dependency only).

Time: one forward + backward into the student's ``.grad`` (hidden states and weight), wall clock and process CPU
time (all threads: less sensitive than the wall clock to other processes on a shared machine); each round runs
every kdiv case once, interleaved, and a case's ratio to ``plain`` is the median over rounds of its time over the plain
run of the same round (Liger, 3 to 4 times slower, is timed once, in its memory run, against the median plain
run). Memory: extra peak resident memory of the first (untimed) run, measured as bench/run.py does
(``malloc_trim``, then the ``VmHWM`` high-water mark reset through ``/proc/self/clear_refs``), minus the weight
gradient [V, H] that any implementation returns, over one fp32 [N, V] logits tensor. Targets: fused extra memory
<= 0.25 x logits, fused time <= 1.1 x plain.

Usage: ``python bench/fused.py`` (both shapes, js, 3 rounds), ``--quick`` (N / 8, one round), ``--names``,
``--shapes 4096x512x32000``, ``--rounds``, ``--chunks 4194304,8388608`` (fused chunk sizes to compare, in logits
per chunk: rows = chunks // V).
Writes bench/results_fused_<device>[_quick].json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import kdiv
import torch
from run import PeakMemory

HERE = Path(__file__).resolve().parent
SHAPES = [(4096, 512, 32000), (1024, 512, 128256)]
LOGIT_STD = 4.0  # as bench/run.py: Gaussian logits of std 4
TARGETS = {"memory": 0.25, "time": 1.1}


def make_inputs(n, h, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = [torch.randn(n, h, generator=g) for _ in range(2)]
    weight = [torch.randn(vocab, h, generator=g).mul_(LOGIT_STD / h**0.5) for _ in range(2)]
    return hidden[0], weight[0], hidden[1], weight[1]


def plain_case(name):
    fn = kdiv.get(name)

    def run(sh, sw, th, tw):
        with torch.no_grad():
            zt = th @ tw.T
        return fn(sh @ sw.T, zt)

    return run


def fused_case(name, chunk_size=None):
    def run(sh, sw, th, tw):
        return kdiv.fused_linear(name, sh, sw, th, tw, chunk_size=chunk_size)

    return run


def liger_case():
    """LigerFusedLinearJSDLoss, soft (JSD) loss only, torch code; or the reason it cannot run."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except Exception as e:  # noqa: BLE001  (any import failure means: not available here)
        return None, f"{type(e).__name__}: {e}"
    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=False)

    def run(sh, sw, th, tw):
        labels = torch.zeros(sh.shape[0], dtype=torch.long)
        return loss(sh, sw, th, tw, labels)

    return run, None


def fwd_bwd(fn, inputs):
    """Wall and CPU seconds of one forward + backward, the loss value and the student's gradients."""
    sh, sw, th, tw = inputs
    sh, sw = sh.detach().requires_grad_(), sw.detach().requires_grad_()
    wall, cpu = time.perf_counter(), time.process_time()
    loss = fn(sh, sw, th, tw)
    loss.backward()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return wall, cpu, float(loss.detach()), (sh.grad, sw.grad)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def bench_shape(n, h, vocab, names, rounds, chunks, log, liger=True):
    inputs = make_inputs(n, h, vocab)
    cases = {}
    liger_error = None
    for name in names:
        cases[f"plain/{name}"] = plain_case(name)
        for c in chunks or [None]:
            rows = None if c is None else max(1, c // vocab)  # chunk sizes are given in logits per chunk
            cases[f"fused/{name}" + (f"@{rows}" if c else "")] = fused_case(name, rows)
        if name == "js" and liger:
            run, liger_error = liger_case()
            if run is not None:
                cases["liger/js"] = run
    results = {case: {"wall": [], "cpu": []} for case in cases}
    grads = {}
    for case, fn in cases.items():
        try:
            with PeakMemory("cpu") as mem:
                wall, cpu, value, g = fwd_bwd(fn, inputs)
        except Exception as e:  # noqa: BLE001  (Liger on CPU, say why)
            log(f"  {case}: cannot run: {type(e).__name__}: {e}")
            results[case]["error"] = f"{type(e).__name__}: {e}"
            continue
        results[case].update(memory=mem.extra, value=value, first_wall=wall, first_cpu=cpu)
        name = case.split("/")[1].split("@")[0]
        if case.startswith("plain/"):
            grads[name] = g
        else:
            pg = grads[name]
            results[case]["grad_rel_diff"] = [_rel(g[0], pg[0]), _rel(g[1], pg[1])]
        del g
        log(f"  first run {case}: {wall:.2f} s, value {value:.6f}, extra memory {mem.extra / 2**20:.0f} MiB")
    grads.clear()
    # Liger takes 3 to 4 times as long as the plain path: its first run places it (its ratio is to the median plain
    # run); the rounds interleave the kdiv cases only
    runnable = [c for c in cases if "error" not in results[c] and not c.startswith("liger/")]
    for r in range(rounds):
        for case in runnable:
            wall, cpu, _, _ = fwd_bwd(cases[case], inputs)
            results[case]["wall"].append(wall)
            results[case]["cpu"].append(cpu)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{c} {results[c]['wall'][-1]:.2f} s" for c in runnable))
    return results, liger_error


def summarise(results, n, h, vocab):
    logits = n * vocab * 4
    weight_grad = vocab * h * 4
    rows = {}
    for case, r in results.items():
        if "error" in r:
            rows[case] = {"error": r["error"]}
            continue
        name = case.split("/")[1].split("@")[0]
        base = results[f"plain/{name}"]
        row = {
            "seconds": statistics.median(r["wall"]) if r["wall"] else r["first_wall"],
            "cpu_seconds": statistics.median(r["cpu"]) if r["cpu"] else None,
            "memory_vs_logits": (r["memory"] - weight_grad) / logits,
            "value": r["value"],
        }
        if r["wall"] and base["wall"]:
            row["time_vs_plain"] = statistics.median(a / b for a, b in zip(r["wall"], base["wall"], strict=True))
            row["cpu_vs_plain"] = statistics.median(a / b for a, b in zip(r["cpu"], base["cpu"], strict=True))
        elif base["wall"]:
            row["time_vs_plain"] = r["first_wall"] / statistics.median(base["wall"])
            row["cpu_vs_plain"] = r["first_cpu"] / statistics.median(base["cpu"])
            row["cpu_seconds"] = r["first_cpu"]
        if "grad_rel_diff" in r:
            row["grad_rel_diff"] = r["grad_rel_diff"]
        rows[case] = row
    return rows


def print_table(shape_rows, out=print):
    for (n, h, vocab), rows in shape_rows.items():
        out(f"\nN x H x V = {n} x {h} x {vocab} (fp32); memory: extra peak beyond the weight gradient / one logits")
        out(f"{'case':<22}{'wall s':>8}{'cpu s':>8}{'wall/plain':>11}{'cpu/plain':>10}{'memory':>8}  grad vs plain")
        for case, r in rows.items():
            if "error" in r:
                out(f"{case:<22}  cannot run: {r['error']}")
                continue
            ratio = f"{r['time_vs_plain']:>11.2f}{r['cpu_vs_plain']:>10.2f}" if "time_vs_plain" in r else " " * 21
            diff = " ".join(f"{d:.1e}" for d in r.get("grad_rel_diff", []))
            cpu = f"{r['cpu_seconds']:>8.2f}" if r["cpu_seconds"] is not None else " " * 8
            out(f"{case:<22}{r['seconds']:>8.2f}{cpu}{ratio}{r['memory_vs_logits']:>8.2f}  {diff}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N / 8, one round")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per shape (default 3, quick 1)")
    ap.add_argument("--shapes", default=None, help="comma-separated NxHxV, default 4096x512x32000,1024x512x128256")
    ap.add_argument("--names", default="js", help="comma-separated divergences (default js, Liger's)")
    ap.add_argument(
        "--chunks", default=None, help="comma-separated fused chunk sizes, in logits per chunk (rows x V), to compare"
    )
    ap.add_argument("--no-liger", action="store_true", help="leave Liger-Kernel out")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.quick:
        shapes = [(max(1, n // 8), h, v) for n, h, v in shapes]
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    names = args.names.split(",")
    chunks = None if args.chunks is None else [int(c) for c in args.chunks.split(",")]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    start, load_before = time.time(), os.getloadavg()
    shape_rows, raw, liger_error = {}, {}, None
    for n, h, vocab in shapes:
        log(f"{n} x {h} x {vocab}")
        results, liger_error = bench_shape(n, h, vocab, names, rounds, chunks, log, liger=not args.no_liger)
        raw[f"{n}x{h}x{vocab}"] = results
        shape_rows[(n, h, vocab)] = summarise(results, n, h, vocab)
        gc.collect()
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "rounds": rounds,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "wall_seconds": round(time.time() - start, 1),
        "liger": liger_error or _liger_version(),
    }
    print(
        f"kdiv fused benchmark, cpu, torch {info['torch']}, {info['threads']} threads, median of {rounds} round(s); "
        f"load average {load_before[0]:.1f} before, {info['load_average_after'][0]:.1f} after; Liger-Kernel: "
        f"{info['liger']}"
    )
    print_table(shape_rows)
    for (n, h, vocab), rows in shape_rows.items():
        for case, r in rows.items():
            if case.startswith("fused/") and "time_vs_plain" in r:
                mem_ok = r["memory_vs_logits"] <= TARGETS["memory"]
                time_ok = r["time_vs_plain"] <= TARGETS["time"]
                print(
                    f"{n}x{h}x{vocab} {case}: memory {r['memory_vs_logits']:.2f} <= {TARGETS['memory']} "
                    f"{'met' if mem_ok else 'NOT met'}; time {r['time_vs_plain']:.2f} <= {TARGETS['time']} "
                    f"{'met' if time_ok else 'NOT met'} (CPU time {r['cpu_vs_plain']:.2f})"
                )
    suffix = ("_quick" if args.quick else "") + ("_noliger" if args.no_liger else "")
    suffix += "_partial" if args.shapes or args.threads else ""
    out = HERE / f"results_fused_cpu{suffix}.json"
    summary = {f"{n}x{h}x{v}": rows for (n, h, v), rows in shape_rows.items()}
    out.write_text(json.dumps({"machine": info, "summary": summary, "raw": raw}, indent=1, sort_keys=True) + "\n")
    print(f"\nwrote {out.relative_to(HERE.parent)}")


def _liger_version():
    try:
        import importlib.metadata

        return "liger-kernel " + importlib.metadata.version("liger-kernel")
    except Exception:  # noqa: BLE001
        return "not installed"


if __name__ == "__main__":
    main()
