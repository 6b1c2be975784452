"""The native row kernel alone (lib/kdiv/core/engine/fused_rows.cpp), one core, ns per element, against an earlier
version of itself.

bench/run.py times the native backend as users call it (two threads, the engine's chunking, against CE). This
benchmark times only the kernel's ``kdiv_rows`` on one thread, for every kind it computes, so that a change to the
kernel can be measured without the noise of CE and the engine: each source is compiled with the flags the backend
uses (``kdiv.core.engine.native.FLAGS``, or ``--march`` in place of its target flags, e.g. ``haswell`` for an AVX2
build on an AVX-512 CPU) into a small driver, and the drivers run alternately, ``--rounds`` times; each figure is
the fastest of its round's 7 runs, then the median over rounds.

Inputs: Gaussian student logits of std 4 and a teacher of 0.5 x the student plus std-4 noise, float32, with the
weights the engine passes for the default hyper-parameters (symmetric KL and JS 0.5, skew alpha 0.1: w = 0.9).

Usage: ``python bench/native_kernel.py`` (this checkout's kernel), ``--against HEAD~1`` (a git revision's kernel
beside it), ``--march haswell``, ``--shapes 64x32000,16x256000``, ``--rounds 3``. Needs a C++ compiler. Prints a
table; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from kdiv.core.engine import native
from run import _cpu_model

KINDS = ("forward_kl", "reverse_kl", "symmetric_kl", "js", "tvd", "skew_kl", "skew_reverse_kl")

DRIVER = r"""
#include KERNEL_SOURCE
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

int main(int argc, char** argv) {
    const long n = std::atol(argv[1]), V = std::atol(argv[2]);
    std::mt19937 gen(0);
    std::normal_distribution<float> normal(0.0f, 4.0f);
    std::vector<float> s(n * V), t(n * V), g(n * V), eq(V), ep(V), loss(n);
    for (long i = 0; i < n * V; ++i) {
        s[i] = normal(gen);
        t[i] = 0.5f * s[i] + normal(gen);
    }
    const float w[] = {0.0f, 1.0f, 0.5f, 0.5f, 0.0f, 0.9f, 0.9f};
    for (int kind = 0; kind < 7; ++kind) {
        double best = 1e30;
        for (int run = 0; run < 7; ++run) {
            const auto start = std::chrono::steady_clock::now();
            kdiv_rows(kind, n, V, s.data(), V, 0, t.data(), V, 0, g.data(), V, 0, eq.data(), ep.data(), loss.data(),
                      1.0f, w[kind], 1.0f - w[kind], 1.0f, nullptr, 0, nullptr);
            const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
            best = seconds < best ? seconds : best;
        }
        std::printf("%d %.6f\n", kind, best / double(n * V) * 1e9);
    }
    return 0;
}
"""


def _flags(march: str | None) -> list[str]:
    flags = [f for f in native.FLAGS if f not in ("-shared", "-fPIC")]
    if march:
        flags = [f for f in flags if not f.startswith(("-march=", "-mcpu=", "-mprefer-vector-width="))]
        flags.append(f"-march={march}")
    return flags


def _build(source: Path, out: Path, march: str | None) -> Path:
    driver = out.with_suffix(".cpp")
    driver.write_text(DRIVER)
    cmd = [*native._compiler(), *_flags(march), f'-DKERNEL_SOURCE="{source}"', str(driver), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the driver did not build ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    return out


def _run(binary: Path, n: int, vocab: int) -> dict[str, float]:
    """{kind: ns per element} of one run of a driver."""
    out = subprocess.run([str(binary), str(n), str(vocab)], capture_output=True, text=True, check=True).stdout
    return {KINDS[int(kind)]: float(ns) for kind, ns in map(str.split, out.splitlines())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", help="a git revision whose fused_rows.cpp is timed beside this checkout's")
    ap.add_argument("--march", help="-march= in place of the backend's target flags (e.g. haswell: AVX2)")
    ap.add_argument("--shapes", default="64x32000,16x256000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="kdiv-kernel-bench") as tmp:
        tmp = Path(tmp)
        sources = {"this": native.SOURCE}
        if args.against:
            root = _repo_root()
            rel = native.SOURCE.resolve().relative_to(root)
            text = subprocess.run(
                ["git", "show", f"{args.against}:{rel.as_posix()}"],
                cwd=root,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            (tmp / "against.cpp").write_text(text)
            sources = {args.against: tmp / "against.cpp", **sources}
        binaries = {
            label: _build(src, tmp / f"driver{i}", args.march) for i, (label, src) in enumerate(sources.items())
        }
        print(f"{_cpu_model() or 'an unnamed CPU'}; flags: {' '.join(_flags(args.march))}")
        for shape in args.shapes.split(","):
            n, vocab = (int(x) for x in shape.lower().split("x"))
            times = {label: {k: [] for k in KINDS} for label in binaries}
            for _ in range(args.rounds):
                for label, binary in binaries.items():
                    for kind, ns in _run(binary, n, vocab).items():
                        times[label][kind].append(ns)
            labels = list(binaries)
            head = "".join(f"{label[:14]:>16}" for label in labels)
            print(f"\n{n} x {vocab}, ns per element, one core (median of {args.rounds} rounds)")
            print(f"{'kind':<18}{head}" + ("       this / against" if len(labels) > 1 else ""))
            for kind in KINDS:
                med = [statistics.median(times[label][kind]) for label in labels]
                line = f"{kind:<18}" + "".join(f"{m:>16.3f}" for m in med)
                if len(labels) > 1:
                    line += f"{med[-1] / med[0]:>21.2f}"
                print(line)


def _repo_root() -> Path:
    out = subprocess.run(
        ["git", "rev-parse", "--show-toplevel"], cwd=native.SOURCE.parent, capture_output=True, text=True, check=True
    )
    return Path(out.stdout.strip()).resolve()


if __name__ == "__main__":
    main()
