"""Forward + backward time and peak memory of kdiv's chunked divergences at LLM vocabulary sizes.

For each shape N x V and each token-level divergence, three things run in one process, interleaved:

- ``kdiv``: the chunked divergence (lib/kdiv/divergences.py);
- ``plain``: the same divergence written the usual way, with [N, V] temporaries and autograd (kdiv.testing.plain);
- ``ce``: ``torch.nn.functional.cross_entropy`` with soft targets (the teacher's probabilities) on the same shape,
  the yardstick of the targets (see the README's Performance section).

Also, per shape: ``floor``, the least any chunked implementation must do (two chunked softmax passes, one exp per
element of each model, and the write of the gradient q - p, on the same worker threads and chunks as kdiv): each
divergence's time over it says how close to the limit it is, whatever CE costs on this CPU; ``shifted/<name>``,
the causal-LM shift (student and teacher ``logits.view(B, T, V)[:, :-1]``, row-strided views) with its gradient
into the full logits; ``nograd/<name>``, the loss under ``torch.no_grad()`` with a student that requires grad (a
logged loss: no gradient computed or allocated); ``native/<name>``, the same divergence on the native backend
(``kdiv.backend("native")``: the fused C++ row kernel, built once before the measurements, its build time
recorded) wherever that backend covers it, timed in the same rounds as the eager engine's case (``--no-native``
leaves it out).

Time: one forward + backward (``loss.backward()`` into the student's ``.grad``), wall clock. Every round runs CE
right before each kdiv case, so that a slower or faster spell of a shared machine hits both alike; a kdiv case's
ratio to CE is the median over ``--repeats`` rounds of its time over the CE run just before it. The plain versions
take 4 to 35 times as long as CE: they are timed once, in their memory run, against the median CE time.

Memory (CPU): extra peak resident memory beyond the inputs, which includes the gradient the call returns. Before
each case's first (untimed) run the process returns freed heap memory to the system (``malloc_trim``), reads its
resident set size, and resets its peak (``/proc/self/clear_refs``); after the run the peak (``VmHWM``) minus that
baseline is the case's extra memory. The inputs (student and teacher logits, the CE targets) exist before the
baseline. On CUDA: ``torch.cuda.max_memory_allocated`` minus the allocated memory before the run.

Inputs: Gaussian logits of std 4 for both models (and std 2 for AKL's ``@stress`` case); ``--logits std1`` (any
std) or ``--logits lm`` (a peaked, LM-like teacher and a student near it: see make_inputs) for the other input
families the targets cover, written to results files tagged with the family.

Usage: ``python bench/run.py`` (``make bench``), ``--quick`` (``make bench QUICK=1``: one round, N / 4), see
``--help``. Writes figures/bench_<device>.png and bench/results_<device>.json.
"""

from __future__ import annotations

import argparse
import ctypes
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
from kdiv.core.engine import chunked
from kdiv.testing import plain

try:
    from kdiv.core.engine import workers

    _pool, _n_workers, _usable_cpus = workers.pool, workers.n_workers, workers.usable_cpus
except ImportError:  # an earlier kdiv (this script run against an older checkout, for before / after ratios)
    _pool, _n_workers, _usable_cpus = chunked._workers, torch.get_num_threads, os.cpu_count

HERE = Path(__file__).resolve().parent

SHAPES = [(4096, 32000), (1024, 128256), (512, 256000)]
NAMES = list(kdiv.DIVERGENCES)
# Gaussian logits of std 4: a teacher whose AKL head is a handful to a few dozen tokens (entropy 4-6 nats). AKL is
# also run on std-2 logits, whose head is hundreds to thousands of tokens (entropy 8-10 nats): its slow case.
LOGIT_STD = 4.0
STRESS_STD = 2.0
DEFAULT_LOGITS = ("gaussian", LOGIT_STD)  # (family, std) of make_inputs; --logits picks another
TARGETS = {"time": 0.6, "time_akl": 1.5, "memory": 1.25}
# the divergences also run shifted and without gradient (each costs a full case; these two cover both kernel kinds)
EXTRA_NAMES = ("forward_kl", "akl")
SHIFT_T = 64  # positions per sequence in the shifted case: B = N / 64 sequences of 63 predicted tokens


# ---------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class PeakMemory:
    """Extra peak memory of a block of code: RSS high-water mark on CPU (Linux), the allocator's peak on CUDA."""

    def __init__(self, device: str):
        self.device = device
        self._libc = ctypes.CDLL("libc.so.6") if device == "cpu" and sys.platform.startswith("linux") else None

    def __enter__(self):
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            if self._libc is not None:
                self._libc.malloc_trim(0)
            self._base = _status_bytes("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.extra = torch.cuda.max_memory_allocated() - self._base
        else:
            self.extra = _status_bytes("VmHWM") - self._base


# ---------------------------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------------------------


def make_inputs(n, vocab, device, std, seed=0, family="gaussian"):
    """Student and teacher logits [n, vocab]. "gaussian": independent N(0, std^2) entries. "lm": a peaked,
    LM-like teacher (each row a Zipf profile, p ~ rank^-1.5 over a random order of the vocabulary, times a
    log-normal factor of std 0.5: top-1 probability ~0.4, entropy ~3 nats) and a student that roughly agrees
    with it (the teacher's logits plus N(0, 2^2) noise); std is then unused."""
    g = torch.Generator(device=device).manual_seed(seed)
    if family == "gaussian":
        student = torch.randn(n, vocab, generator=g, device=device).mul_(std)
        teacher = torch.randn(n, vocab, generator=g, device=device).mul_(std)
        return student, teacher
    if family != "lm":
        raise ValueError(f"family must be 'gaussian' or 'lm', got {family!r}")
    ranks = torch.rand(n, vocab, generator=g, device=device).argsort(dim=-1).add_(1).float()
    teacher = ranks.log_().mul_(-1.5).add_(torch.randn(n, vocab, generator=g, device=device).mul_(0.5))
    del ranks
    student = teacher + torch.randn(n, vocab, generator=g, device=device).mul_(2.0)
    return student, teacher


def fwd_bwd(fn, student, target):
    """One forward + backward; returns the gradient (kept alive until the caller drops it)."""
    x = student.detach().requires_grad_()
    fn(x, target).backward()
    return x.grad


def floor(student, teacher):
    """The floor: softmax of both models chunk by chunk and the gradient q - p written, on kdiv's worker threads
    and chunk size; what any chunked implementation computes at least. Returns the gradient."""
    n, vocab = student.shape
    grad = torch.empty_like(student)
    rows = max(1, min(n, chunked.CHUNK_ELEMENTS // vocab)) if student.device.type == "cpu" else n
    blocks = [slice(i, min(i + rows, n)) for i in range(0, n, rows)]
    pool = _pool() if student.device.type == "cpu" and _n_workers() > 1 else None

    def work(my_blocks):
        q, p = (torch.empty(rows, vocab, device=student.device) for _ in range(2))
        for b in my_blocks:
            k = b.stop - b.start
            torch.softmax(student[b], -1, out=q[:k])
            torch.softmax(teacher[b], -1, out=p[:k])
            torch.sub(q[:k], p[:k], out=grad[b])

    if pool is None:
        work(blocks)
    else:
        k = _n_workers()
        for f in [pool.submit(work, blocks[i::k]) for i in range(k)]:
            f.result()
    return grad


def shifted(fn):
    """fn on the causal shift of [N, V] logits seen as [N / SHIFT_T, SHIFT_T, V]: row-strided views."""

    def call(x, target):
        vocab = x.shape[-1]
        return fn(x.view(-1, SHIFT_T, vocab)[:, :-1], target.view(-1, SHIFT_T, vocab)[:, :-1])

    return call


class NoGrad:
    """Marks a case run under torch.no_grad() (forward only) with a student that requires grad."""

    def __init__(self, fn):
        self.fn = fn


def on_native(fn):
    """fn on the native backend (the gradient is computed in the forward call, inside the block)."""

    def call(x, target):
        with kdiv.backend("native"):
            return fn(x, target)

    return call


NATIVE_NAMES = ("forward_kl", "reverse_kl", "symmetric_kl", "js", "tvd", "skew_kl", "skew_reverse_kl", "akl")


def native_build_seconds(log):
    """Build the native kernel now (outside every measurement): its build time in seconds (0.0 if it was cached), or
    None if it cannot be built here."""
    try:
        kdiv.native_build()
    except (RuntimeError, AttributeError) as e:  # AttributeError: an earlier kdiv without the native backend
        log(f"native backend unavailable, left out: {e}")
        return None
    return kdiv.native_build.seconds or 0.0


def run_case(fn, student, target, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if fn is floor:
        grad = floor(student, target)
    elif isinstance(fn, NoGrad):
        with torch.no_grad():
            grad = fn.fn(student.detach().requires_grad_(), target)
    else:
        grad = fwd_bwd(fn, student, target)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del grad
    return elapsed


def bench_shape(n, vocab, device, repeats, names, log, with_native=False, logits=DEFAULT_LOGITS):
    """{case: {"times": [...], "memory": bytes, "ratios": [...]}} for one shape; cases "ce", "kdiv/<name>",
    "plain/<name>", "kdiv/akl@stress" (AKL with a flatter teacher, whose head is large: default logits only)."""
    family, std = logits
    student, teacher = make_inputs(n, vocab, device, std, family=family)
    targets = torch.softmax(teacher, dim=-1)  # CE's soft targets: an input, made before any measurement
    cases = {"ce": (plain.soft_cross_entropy, targets), "floor": (floor, teacher)}
    for name in names:
        cases[f"kdiv/{name}"] = (kdiv.DIVERGENCES[name], teacher)
        cases[f"plain/{name}"] = (plain.DIVERGENCES[name], teacher)
        if with_native and name in NATIVE_NAMES:
            cases[f"native/{name}"] = (on_native(kdiv.DIVERGENCES[name]), teacher)
    if "akl" in names and logits == DEFAULT_LOGITS:
        cases["kdiv/akl@stress"] = (kdiv.DIVERGENCES["akl"], teacher * (STRESS_STD / LOGIT_STD))
        if with_native:
            cases["native/akl@stress"] = (on_native(kdiv.DIVERGENCES["akl"]), teacher * (STRESS_STD / LOGIT_STD))
    for name in (nm for nm in EXTRA_NAMES if nm in names and n % SHIFT_T == 0):
        cases[f"shifted/{name}"] = (shifted(kdiv.DIVERGENCES[name]), teacher)
        cases[f"nograd/{name}"] = (NoGrad(kdiv.DIVERGENCES[name]), teacher)
        if with_native and name in NATIVE_NAMES:
            cases[f"native-shifted/{name}"] = (on_native(shifted(kdiv.DIVERGENCES[name])), teacher)
    results = {case: {"times": [], "ratios": []} for case in cases}

    # First run of every case: the memory measurement; a warm-up for kdiv and CE, and the one timed run of each
    # plain version (they take 4 to 35 times as long as CE; one run is enough to place them).
    for case, (fn, target) in cases.items():
        with PeakMemory(device) as mem:
            elapsed = run_case(fn, student, target, device)
        results[case]["memory"] = mem.extra
        if case.startswith("plain/"):
            results[case]["times"].append(elapsed)
        log(f"  first run {case}: {elapsed:.2f} s, extra memory {mem.extra / 2**20:.0f} MiB")

    # Rounds: CE and the floor right before every kdiv case, so that each ratio compares runs a second apart
    timed = [c for c in cases if c.startswith(("kdiv/", "shifted/", "nograd/", "native/", "native-shifted/"))]
    for r in range(repeats):
        for case in timed:
            t_ce = run_case(cases["ce"][0], student, cases["ce"][1], device)
            t_floor = run_case(floor, student, teacher, device)
            t = run_case(cases[case][0], student, cases[case][1], device)
            results["ce"]["times"].append(t_ce)
            results["floor"]["times"].append(t_floor)
            results[case]["times"].append(t)
            results[case]["ratios"].append(t / t_ce)
            results[case].setdefault("floor_ratios", []).append(t / t_floor)
        log(f"  round {r + 1}/{repeats}: ce {statistics.median(results['ce']['times']):.2f} s")
    del student, teacher, targets, cases
    gc.collect()
    return results


# ---------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------


def summarise(results, n, vocab):
    """Per divergence: median seconds and ratios to CE (time) and to one fp32 logits tensor (extra memory)."""
    logits_bytes = n * vocab * 4
    ce = statistics.median(results["ce"]["times"])
    rows = {}
    for case, r in results.items():
        t = statistics.median(r["times"])
        ratio = statistics.median(r["ratios"]) if r.get("ratios") else t / ce
        rows[case] = {"seconds": t, "time_vs_ce": ratio, "memory_vs_logits": r["memory"] / logits_bytes}
        if r.get("floor_ratios"):
            rows[case]["time_vs_floor"] = statistics.median(r["floor_ratios"])
    return rows


def print_table(shape_rows, names, out=print):
    for (n, vocab), rows in shape_rows.items():
        ce = rows["ce"]
        out(
            f"\nN x V = {n} x {vocab} (fp32)   soft-target CE: {ce['seconds']:.2f} s, extra memory "
            f"{ce['memory_vs_logits']:.2f} x logits"
        )
        if "floor" in rows:
            fl = rows["floor"]
            out(
                f"floor (2 chunked softmax passes + gradient write): {fl['seconds']:.2f} s = "
                f"{fl['seconds'] / ce['seconds']:.2f} x CE"
            )
        out(
            f"{'divergence':<30}{'kdiv s':>8}{'plain s':>9}{'kdiv/CE':>9}{'/floor':>8}{'plain/CE':>9}"
            f"{'kdiv/plain':>11}{'mem kdiv':>10}{'mem plain':>10}{'native/CE':>11}{'/floor':>8}"
            "   (kdiv: the eager engine; native: kdiv.backend('native'); memory: extra peak / one logits tensor)"
        )
        for name in names:
            k, p = rows[f"kdiv/{name}"], rows[f"plain/{name}"]
            nat = rows.get(f"native/{name}")
            native_cols = f"{nat['time_vs_ce']:>11.2f}{nat['time_vs_floor']:>8.2f}" if nat else f"{'-':>11}{'-':>8}"
            out(
                f"{name:<30}{k['seconds']:>8.2f}{p['seconds']:>9.2f}{k['time_vs_ce']:>9.2f}"
                f"{k.get('time_vs_floor', float('nan')):>8.2f}{p['time_vs_ce']:>9.2f}"
                f"{k['seconds'] / p['seconds']:>11.2f}{k['memory_vs_logits']:>10.2f}{p['memory_vs_logits']:>10.2f}"
                + native_cols
            )
        extra = [("kdiv/akl@stress", "akl, std-2 logits"), ("native/akl@stress", "akl, std-2 logits, native")]
        extra += [(f"{kind}/{nm}", f"{nm}, {kind}") for kind in ("shifted", "nograd") for nm in EXTRA_NAMES]
        extra += [(f"native-shifted/{nm}", f"{nm}, shifted, native") for nm in EXTRA_NAMES]
        for case, label in extra:
            if case in rows:
                k = rows[case]
                out(
                    f"{label:<30}{k['seconds']:>8.2f}{'':>9}{k['time_vs_ce']:>9.2f}"
                    f"{k.get('time_vs_floor', float('nan')):>8.2f}{'':>9}{'':>11}{k['memory_vs_logits']:>10.2f}"
                )


def plot(shape_rows, names, device, path_name):
    """Two panels, time / CE and extra memory / logits: kdiv as bars (one shade per shape), the plain versions as
    grey diamonds, soft-target CE and the targets as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import kdiv.lab.plotting as kp
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    kp.use_style()
    fig, axes = kp.subplots(1, 2, width=11.0, height=4.4)
    shapes = sorted(shape_rows, key=lambda shape: shape[1])
    width = 0.8 / len(shapes)
    shades = [0.45, 0.7, 1.0][-len(shapes) :]
    for ax, key, lines, title in (
        (
            axes[0, 0],
            "time_vs_ce",
            [
                (1.0, "soft-target CE", ":"),
                (TARGETS["time"], "target 0.6", "--"),
                (TARGETS["time_akl"], "AKL target 1.5", "--"),
            ],
            "forward + backward time / soft-target CE's",
        ),
        (
            axes[0, 1],
            "memory_vs_logits",
            [(TARGETS["memory"], "target 1.25", "--")],
            "extra peak memory / one fp32 logits tensor",
        ),
    ):
        for j, shape in enumerate(shapes):
            rows = shape_rows[shape]
            xs = [i + (j - (len(shapes) - 1) / 2) * width for i in range(len(names))]
            _ = ax.bar(
                xs,
                [rows[f"kdiv/{nm}"][key] for nm in names],
                width * 0.9,
                color=[kp.color(nm) for nm in names],
                alpha=shades[j],
                edgecolor="black",
                linewidth=0.4,
            )
            _ = ax.plot(
                xs,
                [rows[f"plain/{nm}"][key] for nm in names],
                linestyle="none",
                marker="D",
                markersize=4,
                color="#777777",
            )
            if key == "time_vs_ce" and "kdiv/akl@stress" in rows and "akl" in names:
                _ = ax.plot(
                    [xs[names.index("akl")]],
                    [rows["kdiv/akl@stress"][key]],
                    linestyle="none",
                    marker="x",
                    markersize=6,
                    color="black",
                )
        if key == "memory_vs_logits":
            ce = statistics.median(shape_rows[s]["ce"][key] for s in shapes)
            lines = [(ce, "soft-target CE", ":")] + lines
        for value, text, style in lines:
            _ = ax.axhline(value, color="black", linestyle=style, linewidth=0.8)
            _ = ax.annotate(text, (-0.45, value), ha="left", va="bottom", fontsize=8)
        _ = ax.set_xticks(range(len(names)), [kp.label(nm) for nm in names])
        if key == "time_vs_ce":
            _ = ax.set_yscale("log")
        else:
            _ = ax.set_ylim(0, None)
        _ = ax.set_title(title, fontsize=10)
    handles = [Patch(facecolor="#999999", alpha=a, edgecolor="black", linewidth=0.4) for a in shades]
    labels = [f"kdiv, {n} x {v}" for n, v in shapes]
    handles += [
        Line2D([], [], linestyle="none", marker="D", markersize=4, color="#777777"),
        Line2D([], [], linestyle="none", marker="x", markersize=6, color="black"),
    ]
    labels += ["plain PyTorch", f"kdiv AKL, std-{STRESS_STD:g} logits (large head)"]
    kp.legend_outside(fig, handles=handles, labels=labels, loc="outside lower center", ncols=len(handles))
    fig.suptitle(f"{device.upper()}, fp32, forward + backward; bar colour = divergence, shade = shape", fontsize=10)
    return kp.savefig(fig, path_name)


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def machine_info(device):
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "chunk_elements": chunked.CHUNK_ELEMENTS,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    else:
        info["cpu"] = _cpu_model() or platform.processor() or platform.machine()
        info["cores"] = os.cpu_count()
        info["usable_cpus"] = _usable_cpus()
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round, N / 4 (about a minute on 2 cores)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds per shape (default 4, quick 1)")
    ap.add_argument("--shapes", default=None, help="comma-separated NxV, default 4096x32000,1024x128256,512x256000")
    ap.add_argument("--names", default=None, help="comma-separated divergences (default: all)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--no-figure", action="store_true")
    ap.add_argument("--no-native", action="store_true", help="leave out the native backend's cases")
    ap.add_argument(
        "--logits",
        default=f"std{LOGIT_STD:g}",
        help=f"input logits: stdS (Gaussian of std S; default std{LOGIT_STD:g}) or lm (peaked, LM-like: make_inputs)",
    )
    ap.add_argument("--tag", default="", help="appended to the results file's name (e.g. a before / after run)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the figure and table from results_<device>.json")
    args = ap.parse_args(argv)
    if args.plot_only:
        saved = json.loads((HERE / f"results_{args.device}.json").read_text())
        shape_rows = {tuple(int(v) for v in k.split("x")): rows for k, rows in saved["summary"].items()}
        names = [nm for nm in NAMES if f"plain/{nm}" in next(iter(shape_rows.values()))]
        print_table(shape_rows, names)
        print(f"wrote {plot(shape_rows, names, args.device, f'bench_{args.device}').relative_to(HERE.parent)}")
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.quick:
        shapes = [(max(1, n // 4), v) for n, v in shapes]
    repeats = args.repeats or (1 if args.quick else 4)
    names = NAMES if args.names is None else args.names.split(",")
    if args.logits == "lm":
        logits = ("lm", None)
    elif args.logits.startswith("std"):
        logits = ("gaussian", float(args.logits[3:]))
    else:
        ap.error(f"--logits must be stdS (e.g. std1) or lm, got {args.logits!r}")
    default_logits = logits == DEFAULT_LOGITS

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    build = None if args.no_native or args.device != "cpu" else native_build_seconds(log)
    start = time.time()
    load_before = os.getloadavg()
    shape_rows, raw = {}, {}
    for n, vocab in shapes:
        log(f"{n} x {vocab}")
        results = bench_shape(n, vocab, args.device, repeats, names, log, with_native=build is not None, logits=logits)
        raw[f"{n}x{vocab}"] = results
        shape_rows[(n, vocab)] = summarise(results, n, vocab)
    info = machine_info(args.device)
    info.update(
        {
            "repeats": repeats,
            "logits": args.logits,
            "logit_std": logits[1],
            "stress_std": STRESS_STD if default_logits else None,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "wall_seconds": round(time.time() - start, 1),
            "native_build_seconds": build,
        }
    )

    print(
        f"kdiv benchmark, {args.device} ({info.get('gpu') or info.get('cpu')}), torch {info['torch']}, "
        f"{info['threads']} threads, median of {repeats} "
        f"round(s); load average {load_before[0]:.1f} before, {info['load_average_after'][0]:.1f} after"
        + ("" if build is None else f"; native kernel build {build:.1f} s (0.0: cached)")
    )
    print_table(shape_rows, names)
    # results_cpu.json (and the figure) for the default run only; other runs are tagged
    suffix = ("_quick" if args.quick else "") + (f"_t{args.threads}" if args.threads else "")
    suffix += "_partial" if args.shapes is not None or args.names is not None else ""
    suffix += "" if default_logits else f"_{args.logits}"
    suffix += f"_{args.tag}" if args.tag else ""
    out = HERE / f"results_{args.device}{suffix}.json"
    out.write_text(
        json.dumps(
            {"machine": info, "summary": {f"{n}x{v}": rows for (n, v), rows in shape_rows.items()}, "raw": raw},
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )
    print(f"\nwrote {out.relative_to(HERE.parent)}")
    if not args.no_figure and not suffix:
        path = plot(shape_rows, names, args.device, f"bench_{args.device}")
        print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
    main()
