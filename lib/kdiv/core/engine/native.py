"""The native backend: the engine's fast path as one fused C++ row kernel (``fused_rows.cpp``), opt in.

The eager engine runs each divergence as ~10-25 torch ops per chunk, each a pass over [n, V] fp32 buffers; on CPUs
where soft-target CE is fast that costs 0.7-1.4 x CE. The native kernel does a row in at most four passes with the
row's exponentials in cache, and is the same mathematics (the formulas of :mod:`kdiv.core.kernels`, exact
normalisation, sums in double). It is opt in, because it needs a C++ compiler at run time and costs a one-time
build (3.5-3.7 s on a 2-core VM; the library is cached, per source, flags, compiler and CPU, so later processes
load it at once)::

    kdiv.set_backend("native")          # builds now (or raises, with the compiler's message)
    with kdiv.backend("native"): ...    # for a block of code
    KDIV_BACKEND=native python train.py # for a process (falls back to eager with a warning if the build fails)
    kdiv.native_build()                 # build ahead of time (e.g. in a job's set-up); returns the library's path

What it covers: the fast path of every token-level divergence (forward_kl, reverse_kl, symmetric_kl, js, tvd, skew_kl,
skew_reverse_kl, akl; AKL's head threshold is still found by :mod:`kdiv.core.head_selection`, on the teacher's
softmax as the kernel computes it, and the kernel does the rest), on the CPU, for float32 and bfloat16 logits
(student and teacher each). Everything else runs eagerly, unchanged: float64 and float16 logits, CUDA tensors, the
floored path (rows with a -inf logit or an underflowing probability, which the kernel hands back as NaN for the
engine to recompute, exactly as the eager fast path does). Skew divergences at alpha = 1 (identically 0) stay eager.

The compiler is ``$CXX`` or ``c++``, with ``-O3 -march=native``: the library is built for the CPU it runs on, and
its cache key names that CPU. The cache is ``$KDIV_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdiv``, else
``~/.cache/kdiv``; a build goes to a temporary file renamed into place, so that concurrent processes never load a
half-written library.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from ..checks import warn

__all__ = ["BACKENDS", "backend", "get_backend", "native_build", "native_kernel", "set_backend"]

SOURCE = Path(__file__).with_name("fused_rows.cpp")
# Built for the CPU it runs on: -march=native on x86 (with the widest vectors it has: GCC prefers 256 or even 128 bits
# on some CPUs by default), -mcpu=native on ARM, where -march=native is not what selects the core.
_TARGET = (
    ("-march=native", "-mprefer-vector-width=512")
    if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")
    else ("-mcpu=native",)
)
FLAGS = (
    "-O3",
    *_TARGET,
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fopenmp-simd",
    "-std=c++17",
    "-shared",
    "-fPIC",
)
_VERSION = 2  # kdiv_rows_version() of the source this module speaks to
BACKENDS = ("eager", "native")

_F32, _BF16 = 0, 1
_DTYPES = {torch.float32: _F32, torch.bfloat16: _BF16}

_lock = threading.Lock()
_library = None
_build_seconds: float | None = None
_state = threading.local()
_default = None  # set_backend's choice; None: KDIV_BACKEND, else "eager"
_env_failed = False


# ---------------------------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------------------------


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CXX", "c++"))


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    if os.environ.get("KDIV_CACHE_DIR"):
        return Path(os.environ["KDIV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kdiv"


def _library_path() -> Path:
    compiler = _compiler()
    try:
        version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"kdiv's native backend needs a C++ compiler ({shlex.join(compiler)}): {e}") from e
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), shlex.join(compiler).encode(), version.encode()):
        key.update(part)
        key.update(b"\0")
    key.update(_cpu_id().encode())
    return _cache_dir() / f"fused_rows-{key.hexdigest()[:16]}.so"


def _compile(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(fd)
    try:
        cmd = [*_compiler(), *FLAGS, str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(
                f"kdiv's native backend did not build ({shlex.join(cmd)}):\n{done.stderr.strip()[-2000:]}"
            )
        os.replace(tmp, target)  # atomic: another process sees the old state or the whole library
    except FileNotFoundError as e:
        raise RuntimeError(f"kdiv's native backend needs a C++ compiler ({shlex.join(_compiler())}): {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load():
    """The loaded library, built first where the cache has none. RuntimeError if it cannot be built."""
    global _library, _build_seconds
    if _library is not None:
        return _library
    with _lock:
        if _library is None:
            if shutil.which(_compiler()[0]) is None and not Path(_compiler()[0]).exists():
                raise RuntimeError(
                    f"kdiv's native backend needs a C++ compiler: {_compiler()[0]!r} is not on PATH "
                    "(set CXX, or use the eager backend)"
                )
            path = _library_path()
            if not path.exists():
                start = time.perf_counter()
                _compile(path)
                _build_seconds = time.perf_counter() - start
            lib = ctypes.CDLL(str(path))
            if lib.kdiv_rows_version() != _VERSION:
                raise RuntimeError(f"{path} is not the native kernel this kdiv expects; delete it to rebuild")
            f = lib.kdiv_rows
            f.restype = ctypes.c_int
            c_long, c_int, c_void, c_float = ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
            f.argtypes = [
                c_int, c_long, c_long,  # kind, n, vocab
                c_void, c_long, c_int,  # student: pointer, row stride, dtype
                c_void, c_long, c_int,  # teacher
                c_void, c_long, c_int,  # gradient (None: no gradient)
                c_void, c_void, c_void,  # scratch (two rows of V floats), loss (n floats)
                c_float, c_float, c_float, c_float,  # 1/T, w, 1 - w, gradient scale
                c_void, c_long, c_void,  # AKL: the teacher's probabilities (pointer, row stride), head thresholds
            ]  # fmt: skip
            sm = lib.kdiv_softmax_rows
            sm.restype = ctypes.c_int
            sm.argtypes = [c_long, c_long, c_void, c_long, c_int, c_float, c_void, c_long]
            hc = lib.kdiv_head_cutoff
            hc.restype = None
            hc.argtypes = [c_long, c_long, c_void, c_long, c_float, c_void, c_float, c_long, c_int, c_void]
            ht = lib.kdiv_head_threshold
            ht.restype = None
            ht.argtypes = [c_long, c_long, c_void, c_long, c_float, c_void, c_void, c_void, c_void]
            _library = lib
    return _library


def native_build() -> Path:
    """Build (or find in the cache) the native kernel now and return the path of the library; RuntimeError, with
    the compiler's message, if it cannot be built. ``native_build.seconds`` afterwards: the build's time in this
    process (None if the cache had it)."""
    _load()
    native_build.seconds = _build_seconds
    return _library_path()


native_build.seconds = None


# ---------------------------------------------------------------------------------------------------------------
# Choosing the backend
# ---------------------------------------------------------------------------------------------------------------


def _check_name(name):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def set_backend(name: str) -> None:
    """Use `name` ("eager" or "native") for the token-level divergences from now on, in every thread (a
    :func:`backend` block still overrides it). "native" builds the kernel first: RuntimeError if that fails."""
    global _default
    if _check_name(name) == "native":
        _load()
    _default = name


def get_backend() -> str:
    """The backend a call in this thread uses now: a :func:`backend` block's, else :func:`set_backend`'s, else the
    environment variable ``KDIV_BACKEND``'s, else "eager"."""
    global _env_failed
    chosen = getattr(_state, "name", None) or _default
    if chosen is not None:
        return chosen
    env = os.environ.get("KDIV_BACKEND", "").strip().lower()
    if env in ("", "eager") or _env_failed:
        return "eager"
    if env not in BACKENDS:
        raise ValueError(f"KDIV_BACKEND must be one of {BACKENDS}, got {env!r}")
    try:
        _load()
    except RuntimeError as e:
        _env_failed = True
        warn(f"KDIV_BACKEND=native, but the native kernel cannot be built; using the eager backend. {e}")
        return "eager"
    return "native"


@contextlib.contextmanager
def backend(name: str):
    """``with kdiv.backend("native"):`` the token-level divergences called in this block (in this thread) use
    `name`; "native" builds the kernel first (RuntimeError if that fails)."""
    if _check_name(name) == "native":
        _load()
    previous = getattr(_state, "name", None)
    _state.name = name
    try:
        yield
    finally:
        _state.name = previous


# ---------------------------------------------------------------------------------------------------------------
# The kernel as the engine calls it
# ---------------------------------------------------------------------------------------------------------------

# kind codes of fused_rows.cpp, and the weight w each passes (see its mix())
_FKL, _RKL, _SKL, _JS, _TVD, _SKEW_KL, _SKEW_RKL, _AKL = range(8)


def _kind(kernel, hyper):
    """(kind, w, 1 - w) of the native kernel computing `kernel` with `hyper`, or None where it has none."""
    from .. import kernels as k

    if kernel is k.forward_kl_rows:
        return _FKL, 0.0, 1.0
    if kernel is k.reverse_kl_rows:
        return _RKL, 1.0, 0.0
    if kernel is k.tvd_rows:
        return _TVD, 0.0, 1.0
    if kernel is k.symmetric_kl_rows:
        return _SKL, float(hyper["w"]), 1.0 - float(hyper["w"])
    if kernel is k.js_rows:
        beta = float(hyper["beta"])
        if beta in (0.0, 1.0):  # forward KL, reverse KL
            return _kind(k.forward_kl_rows if beta == 0.0 else k.reverse_kl_rows, {})
        return _JS, beta, 1.0 - beta
    if kernel in (k.skew_kl_rows, k.skew_reverse_kl_rows):
        alpha = float(hyper["alpha"])
        if alpha == 1.0:
            return None  # KL(x || x) = 0: the eager kernel's
        if alpha == 0.0:
            return _kind(k.forward_kl_rows if kernel is k.skew_kl_rows else k.reverse_kl_rows, {})
        return (_SKEW_KL if kernel is k.skew_kl_rows else _SKEW_RKL), 1.0 - alpha, alpha
    if kernel is k.akl_rows:
        return _AKL, 0.0, 1.0  # the weights are per row, from the head (NativeKernel.mu)
    return None


class NativeKernel:
    """The native kernel bound to one divergence: ``run(s, t, grad, eq, ep, loss, scale)`` on [n, V] row views.
    ``mu``: AKL's head mass (None for the others), whose head the caller finds and passes (head_p, tau)."""

    __slots__ = ("lib", "fn", "kind", "w", "omw", "inv_t", "mu")

    def __init__(self, lib, kind, w, omw, inv_t, mu=None):
        self.lib, self.fn = lib, lib.kdiv_rows
        self.kind, self.w, self.omw, self.inv_t, self.mu = kind, w, omw, inv_t, mu

    def softmax(self, x, out):
        """softmax(x / T) of rows x [n, V] (float32 / bfloat16, unit stride along V) into out [n, V] float32."""
        n, vocab = x.shape
        rc = self.lib.kdiv_softmax_rows(
            n, vocab, x.data_ptr(), x.stride(0), _DTYPES[x.dtype], self.inv_t, out.data_ptr(), out.stride(0)
        )
        if rc != 0:
            raise RuntimeError(f"kdiv's native softmax refused its arguments (code {rc})")

    def head_cutoff(self, p, mu, hi, slack, few, max_passes):
        """AKL's bisection for a cutoff above mu of the mass, row by row in one fused pass per step (the rule of
        kdiv.core.head_selection._cutoff_above_mu): p [n, V] float32 rows, hi [n] -> [n] float32."""
        n, vocab = p.shape
        hi = hi.to(torch.float32).contiguous()
        out = torch.empty(n, dtype=torch.float32)
        self.lib.kdiv_head_cutoff(
            n, vocab, p.data_ptr(), p.stride(0), mu, hi.data_ptr(), slack, few, max_passes, out.data_ptr()
        )
        return out

    def head_threshold(self, p, mu, cutoff):
        """kdiv.core.headtail.threshold's arithmetic on each row's probabilities >= cutoff (sorted, cumulative
        sums as torch's CPU cumsum forms them): (tau [n], settled [n] bool); a row not settled (its prefix holds no
        more than mu) must be sorted whole. p [n, V] float32 rows, cutoff [n]."""
        n, vocab = p.shape
        cutoff = cutoff.to(torch.float32).contiguous()
        buf = torch.empty(vocab, dtype=torch.float32)
        tau = torch.empty(n, dtype=torch.float32)
        settled = torch.empty(n, dtype=torch.uint8)
        self.lib.kdiv_head_threshold(
            n, vocab, p.data_ptr(), p.stride(0), mu, cutoff.data_ptr(), buf.data_ptr(), tau.data_ptr(),
            settled.data_ptr(),
        )  # fmt: skip
        return tau, settled.bool()

    def run(self, s, t, grad, eq, ep, loss, scale, head_p=None, tau=None):
        """s, t: [n, V] (unit stride along V); grad: [n, V] float32 / bfloat16 rows or None; eq, ep: >= V
        contiguous float32 each (scratch); loss: [n] contiguous float32. AKL: head_p [n, V] float32, the teacher's
        probabilities, and tau [n] float32 contiguous, the head thresholds on them."""
        n, vocab = s.shape
        g_ptr, g_stride, g_dtype = (None, 0, _F32) if grad is None else (grad.data_ptr(), grad.stride(0), None)
        if grad is not None:
            g_dtype = _DTYPES[grad.dtype]
        rc = self.fn(
            self.kind, n, vocab,
            s.data_ptr(), s.stride(0), _DTYPES[s.dtype],
            t.data_ptr(), t.stride(0), _DTYPES[t.dtype],
            g_ptr, g_stride, g_dtype,
            eq.data_ptr(), ep.data_ptr(), loss.data_ptr(),
            self.inv_t, self.w, self.omw, scale,
            None if head_p is None else head_p.data_ptr(), 0 if head_p is None else head_p.stride(0),
            None if tau is None else tau.data_ptr(),
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"kdiv's native kernel refused its arguments (code {rc})")


def native_kernel(kernel, hyper, dtypes, device, temperature, grad_dtype) -> NativeKernel | None:
    """The native kernel for this call, or None where the eager engine runs it (backend "eager", a kernel, dtype or
    device the native kernel does not cover)."""
    if device.type != "cpu" or get_backend() != "native":
        return None
    if any(d not in _DTYPES for d in dtypes) or (grad_dtype is not None and grad_dtype not in _DTYPES):
        return None
    kind = _kind(kernel, hyper)
    if kind is None:
        return None
    mu = float(hyper["mu"]) if kind[0] == _AKL else None
    return NativeKernel(_load(), *kind, 1.0 / temperature, mu)
