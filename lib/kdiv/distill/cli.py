"""``python -m kdiv.distill run --arm {synthetic,real} --divergences a,b --seeds 0,1 --out DIR [--quick]``.

Also ``python -m kdiv.distill build-corpus --wordnet DIR --out FILE`` (the real arm's data from WordNet).
A bad divergence name, an unreadable data file or a teacher/student vocabulary mismatch ends with a one-line error
and exit status 2. ``torchrun --nproc-per-node N -m kdiv.distill run ...`` trains every model data-parallel on N
processes (gloo); rank 0 evaluates and writes the results (see :mod:`kdiv.distill.train`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

__all__ = ["main"]


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kdiv.distill", description="The KD lab: sequence-level distillation.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and evaluate a sweep (resumable)")
    r.add_argument("--arm", choices=("synthetic", "real"), required=True)
    r.add_argument("--divergences", default=None, help="comma-separated registry names (default: every one)")
    r.add_argument("--seeds", default=None, help="comma-separated training seeds (default: the preset's)")
    r.add_argument("--regimes", default=None, help="comma-separated, among sft,kd,kd_oracle,onpolicy")
    r.add_argument("--onpolicy-divergences", default=None, help="which divergences also run on-policy")
    r.add_argument("--out", required=True, help="results folder (results.json, samples.jsonl)")
    r.add_argument("--data", default=None, help="Dolly-format JSONL (the real arm)")
    r.add_argument("--steps", type=int, default=None)
    r.add_argument("--kd-ratio", type=float, default=None)
    r.add_argument("--threads", type=int, default=None)
    r.add_argument("--quick", action="store_true", help="the whole pipeline at toy sizes (seconds)")
    r.add_argument("--no-progress", action="store_true")
    b = sub.add_parser("build-corpus", help="the real arm's JSONL from WordNet's data files")
    b.add_argument("--wordnet", default="/usr/share/wordnet", help="folder with data.noun (Debian: wordnet-base)")
    b.add_argument("--out", required=True)
    b.add_argument("--pos", default="noun", help="comma-separated among noun,verb,adj,adv")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "build-corpus":
            from .corpus import build_wordnet_jsonl

            n = build_wordnet_jsonl(args.wordnet, args.out, pos=tuple(_csv(args.pos)))
            print(f"wrote {n} records to {args.out}")
            return 0
        from .config import DistillConfig
        from .sweep import run

        over = {}
        if args.divergences is not None:
            over["divergences"] = tuple(_csv(args.divergences))
        if args.onpolicy_divergences is not None:
            over["onpolicy_divergences"] = tuple(_csv(args.onpolicy_divergences))
        if args.seeds is not None:
            try:
                over["seeds"] = tuple(int(s) for s in _csv(args.seeds))
            except ValueError:
                raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
        if args.regimes is not None:
            over["regimes"] = tuple(_csv(args.regimes))
        for name in ("data", "steps", "kd_ratio", "threads"):
            if getattr(args, name) is not None:
                over[name] = getattr(args, name)
        cfg = DistillConfig.preset(args.arm, quick=args.quick, **over)
        with _process_group():
            results = run(cfg, args.out, progress=not args.no_progress)
    except (ValueError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{len(results['records'])} records in {args.out}/results.json")
    return 0


@contextlib.contextmanager
def _process_group():
    """Under ``torchrun --nproc-per-node N`` (N > 1: WORLD_SIZE, RANK and MASTER_ADDR set), the default process
    group for the data-parallel harness, with the gloo backend (the lab's models run on the CPU); else nothing."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()
